"""B2-llamacpp: batch-1 decoding and prefill, chatforge against llama.cpp on the same GGUF file.

    python -m benchmarks --only B2-llamacpp          # builds the peer on first use, then measures
    python -m benchmarks.llamacpp --install          # only build the peer

The peer is llama.cpp as a user gets it: `llama-cpp-python` (pinned below) from PyPI, which compiles
llama.cpp for this CPU (GGML_NATIVE) as it installs, into a benchmark-only virtual environment
(~/.cache/chatforge/bench-venv, or $CHATFORGE_BENCH_VENV), never into chatforge's own dependencies.
It runs in a child process of that environment (PEER below), driven over a pipe, so its rounds
interleave with chatforge's, which runs in this process; each side's threads idle while the other runs.

Models: SmolLM2-135M-Instruct Q4_1 (the catalogue's `smollm2`) and a 1B-class file (Llama-3.2-1B's
shape, SmolLM2's tokenizer, random Q4_0 weights; benchmarks/gguf_memory.random_gguf). Both sides read
the same file: llama.cpp runs its blocks as they are; chatforge loads it with `chatforge.loader.load` in
each of its modes (fp32: dequantized; int8 and int4: quantize=..., activations in the loader's default
dtype and, in the block GEMVs, rounded to int8 blocks as llama.cpp does (the default); any further mode
chatforge.quantize.QUANT_MODES lists), and int4+exact: int4 with exact fp32 activations in the GEMVs
(CHATFORGE_GEMV=exact, set before loading: the Q4 blocks then stay row by row, not repacked).

Per model, mode and thread count (1 and 2: llama.cpp's n_threads = torch's threads):
- decode: a 32-token prompt, then greedy tokens up to 128 new ones (the first comes from the prefill).
  "decode tokens/s" = the 127 later tokens / their time (what llama-bench's tg figure measures);
  "end-to-end" = 128 / the whole call, prefill included (B2's figure). Greedy = argmax of the logits
  on both sides; both sides step once per token.
- prefill: a 512-token prompt until its first token.
  The 1B-class file decodes 8x slower: 32 new tokens and a 128-token prefill there.
- the memory-bandwidth bound: read bandwidth (benchmarks/common.memory_bandwidth: the time to sum a
  1 GiB fp32 tensor in torch, best of 3, on the same number of threads) / the weight bytes a decoding
  step reads (the file's tensors for llama.cpp; the model's tensors in memory for chatforge).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .common import cpu_model, memory_bandwidth, spread
from .gguf_memory import LLAMA_1B, TINY, random_gguf, random_gguf_name

LLAMA_CPP_PYTHON = "0.3.16"  # vendors llama.cpp 4227c9be (August 2025)
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"  # this CPU's vector units; ggml's own kernels
VENV_ENV = "CHATFORGE_BENCH_VENV"
PROMPT, NEW, LONG = 32, 128, 512
QUICK_SIZES = (8, 16, 64)
TARGETS = {"decode": 1.0, "prefill": 2.0}  # issue 15: decode >= 1.0x llama.cpp, prefill >= 2x
FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_bf16", "amx_int8")
NOTE = Path(__file__).parent / "notes" / "b2_llamacpp.md"


class PeerUnavailable(Exception):
    """llama.cpp cannot be run here; the message says why (B2-llamacpp then reports chatforge alone)."""


# --- the peer's environment -----------------------------------------------------------------------

def cache_dir() -> Path:
    home = os.environ.get("CHATFORGE_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".cache" / "chatforge"


def venv_dir() -> Path:
    return Path(os.environ.get(VENV_ENV, "").strip() or cache_dir() / "bench-venv").expanduser()


def peer_python(venv: Path) -> Path:
    """The venv's interpreter, if llama-cpp-python at the pinned version imports there; else PeerUnavailable."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise PeerUnavailable(f"no benchmark environment at {venv} (`python -m benchmarks.llamacpp --install` "
                              f"builds llama-cpp-python=={LLAMA_CPP_PYTHON} there)")
    done = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True)
    version = done.stdout.strip()
    if done.returncode or version != LLAMA_CPP_PYTHON:
        raise PeerUnavailable(f"{venv} does not hold llama-cpp-python=={LLAMA_CPP_PYTHON} "
                              f"({version or done.stderr.strip().splitlines()[-1:]}); delete it to rebuild")
    return python


def install(venv: Path) -> Path:
    """Build llama-cpp-python (compiling llama.cpp for this CPU) into a fresh venv at `venv`; its python.

    Minutes on a small machine; pip's output goes to VENV-install.log. The venv is built beside and
    moved into place only once it works, so an interrupted build is never taken for a finished one.
    """
    partial = venv.with_name(venv.name + ".partial")
    log = venv.with_name(venv.name + "-install.log")
    shutil.rmtree(partial, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    print(f"B2-llamacpp: building llama-cpp-python=={LLAMA_CPP_PYTHON} into {venv} (minutes; log {log})",
          flush=True)
    with open(log, "w") as out:
        done = subprocess.run([str(partial / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir",
                               f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"pip could not build llama-cpp-python=={LLAMA_CPP_PYTHON}: {tail[0]} (see {log})")
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)
    return peer_python(venv)


def find_peer(build: bool) -> Path:
    """The peer's python; built first when missing and `build`; PeerUnavailable says why not."""
    venv = venv_dir()
    try:
        return peer_python(venv)
    except PeerUnavailable:
        if not build:
            raise
    return install(venv)


# The child: loads each (file, threads) once, then answers {"path", "threads", "prompt", "new"} lines
# with one JSON line of timings and the greedy tokens.
PEER = r"""
import json, sys, time
import numpy as np
import llama_cpp

models = {}

def model(path, threads):
    if (path, threads) not in models:
        models[(path, threads)] = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512,
                                                  n_threads=threads, n_threads_batch=threads, verbose=False)
    return models[(path, threads)]

def greedy(llm):
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())

print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    llm = model(ask["path"], ask["threads"])
    llm.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    llm.eval(ask["prompt"])
    tokens = [greedy(llm)]
    t1 = time.perf_counter()
    while len(tokens) < ask["new"]:
        llm.eval([tokens[-1]])
        tokens.append(greedy(llm))
    t2 = time.perf_counter()
    print(json.dumps({"first_s": t1 - t0, "total_s": t2 - t0, "cpu_s": time.process_time() - c0, "tokens": tokens}),
          flush=True)
"""


class LlamaCpp:
    """llama.cpp in a child process of the benchmark venv (PEER); `info` has its version and build."""

    def __init__(self, python: Path) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(python), "-c", PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise PeerUnavailable(f"llama.cpp's process ended: {self.log.read().strip()[-500:] or 'no output'}")
        return json.loads(line)

    def generate(self, path: Path, threads: int, prompt: list[int], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path), "threads": threads, "prompt": prompt, "new": new}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


# --- chatforge's side ------------------------------------------------------------------------------

def chatforge_modes() -> dict[str, tuple[Optional[str], Optional[str], str]]:
    """{mode: (dtype, quantize, CHATFORGE_GEMV)} for chatforge.loader.load: fp32 (the file dequantized) and
    every weight-only quantization chatforge has, each with the loader's default activation dtype and the
    block GEMVs' default int8 activations (llama.cpp's own way of multiplying); and int4 with exact fp32
    activations (CHATFORGE_GEMV=exact)."""
    from chatforge.quantize import QUANT_MODES

    return {"fp32": ("fp32", None, ""), **{q: (None, q, "") for q in QUANT_MODES}, "int4+exact": (None, "int4", "exact")}


def gemv_setting(value: str) -> None:
    """CHATFORGE_GEMV for the next loads and calls (read through kernels.int8_activations(); a load under
    "exact" keeps Q4 blocks row by row, the default repacks them)."""
    from chatforge import kernels

    os.environ[kernels.GEMV_ENV] = value
    kernels.reset()


def chatforge_generate(engine, prompt: list[int], new: int) -> dict:
    """PEER's measurement, in chatforge: the first step prefills and picks the first token."""
    state = engine.start([prompt], max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    [request] = state.requests
    c0, t0 = time.process_time(), time.perf_counter()
    state.step()
    t1 = time.perf_counter()
    while not state.done:
        state.step()
    t2 = time.perf_counter()
    return {"first_s": t1 - t0, "total_s": t2 - t0, "cpu_s": time.process_time() - c0, "tokens": list(request.tokens)}


def file_bytes_per_token(path: Path) -> int:
    """Bytes of the file's tensors a decoding step reads: all of them, less the embedding table when a
    separate output matrix exists (then only one embedding row is read per token)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or "output.weight" not in tensors)


# --- measuring ---------------------------------------------------------------------------------------

def summarize(runs: list[dict], new: int, threads: int) -> dict:
    """Decode figures from a contender's decode runs (PEER's fields). `cpu_share`: the CPU time the
    contender got over wall time x threads; well under 1 means other processes took its cores (on a
    shared machine: compare rows only where it is close to 1)."""
    decode = [(new - 1) / (r["total_s"] - r["first_s"]) for r in runs]
    return {"decode_tokens_per_s": statistics.median(decode), "end_to_end_tokens_per_s":
            statistics.median(new / r["total_s"] for r in runs), "decode_spread": spread(decode),
            "cpu_share": statistics.median(r["cpu_s"] / (r["total_s"] * threads) for r in runs)}


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def add_ratios(rows: dict[str, dict], bandwidth: float) -> None:
    """Each row's share of its bandwidth bound, and chatforge's rows against llama.cpp's (when measured)."""
    peer = rows.get("llama.cpp")
    for row in rows.values():
        row["bound_tokens_per_s"] = bandwidth / row["weight_bytes_per_token"]
        row["pct_of_bound"] = 100 * row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
        if peer is not None and row is not peer:
            row["decode_vs_llamacpp"] = row["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
            row["prefill_vs_llamacpp"] = peer["prefill_s"] / row["prefill_s"]  # speed: > 1 is faster
            row["tokens_equal_to_llamacpp"] = leading_equal(row.pop("tokens"), peer["tokens"])
    for row in rows.values():
        row.pop("tokens", None)


def best_ratios(rows: dict[str, dict]) -> dict[str, float]:
    """chatforge's fastest mode against llama.cpp: decode speed and prefill speed."""
    ours = {n: r for n, r in rows.items() if n != "llama.cpp"}
    decode = max(ours, key=lambda n: ours[n]["decode_tokens_per_s"])
    prefill = min(ours, key=lambda n: ours[n]["prefill_s"])
    return {"decode": ours[decode]["decode_vs_llamacpp"], "decode_mode": decode,
            "prefill": ours[prefill]["prefill_vs_llamacpp"], "prefill_mode": prefill}


def measure_file(label: str, path: Path, peer: Optional[LlamaCpp], threads: list[int], rounds: int,
                 sizes: tuple[int, int, int]) -> dict:
    """Every contender on one GGUF file at each thread count; rounds interleave llama.cpp and each mode."""
    from chatforge.engine import Engine
    from chatforge.loader import load
    from chatforge.quantize import GGMLLinear

    from .inference import decode_weight_bytes

    prompt_len, new, long_len = sizes
    engines, dtypes, gemv = {}, {}, {}
    for mode, (dtype, quantize, gemv[mode]) in chatforge_modes().items():
        gemv_setting(gemv[mode])
        model, tok = load(path, device="cpu", dtype=dtype, quantize=quantize)
        engines[mode] = Engine(model, tok)
        dtypes[mode] = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(engines[mode].dtype, str(engines[mode].dtype))
        if gemv[mode] != "exact" and any(isinstance(m, GGMLLinear) for m in model.modules()):
            dtypes[mode] = "int8 blocks"  # rounded to int8 blocks of 32 where they meet the weights' blocks
    vocab = min(e.model.config.vocab_size for e in engines.values())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    long_prompt = torch.randint(0, vocab, (long_len,), generator=g).tolist()
    result: dict = {"file": path.name, "file_bytes": path.stat().st_size, "by_threads": {}}
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            runs: dict[str, tuple] = {}
            if peer is not None:
                runs["llama.cpp"] = (lambda p, n, t=t: peer.generate(path, t, p, n))
            for mode, engine in engines.items():
                runs[f"chatforge {mode}"] = (lambda p, n, e=engine, g=gemv[mode]: (gemv_setting(g),
                                                                                 chatforge_generate(e, p, n))[1])
            for run in runs.values():  # warm-up: first-call costs (loading, kernel set-up) stay out
                run(prompt, 4)
                run(long_prompt[:64], 1)
            decodes: dict[str, list[dict]] = {n: [] for n in runs}
            prefills: dict[str, list[float]] = {n: [] for n in runs}
            bandwidths = []
            names = list(runs)
            for r in range(rounds):
                bandwidths.append(memory_bandwidth(256 if sizes == QUICK_SIZES else 1024, threads=t))
                for name in names[r % len(names):] + names[:r % len(names)]:
                    decodes[name].append(runs[name](prompt, new))
                    prefills[name].append(runs[name](long_prompt, 1)["first_s"])
            rows = {}
            for name in names:
                mode = name.removeprefix("chatforge ")
                rows[name] = {**summarize(decodes[name], new, t), "prefill_s": statistics.median(prefills[name]),
                              "prefill_spread": spread(prefills[name]), "tokens": decodes[name][0]["tokens"],
                              "dtype": "int8 blocks" if name == "llama.cpp" else dtypes[mode],
                              "weight_bytes_per_token": file_bytes_per_token(path) if name == "llama.cpp" else
                              decode_weight_bytes(engines[mode].model)}
            bandwidth = statistics.median(bandwidths)
            add_ratios(rows, bandwidth)
            entry = {"bandwidth_GBps": bandwidth / 1e9, "rows": rows}
            if peer is not None:
                entry["best"] = best_ratios(rows)
            result["by_threads"][str(t)] = entry
    finally:
        torch.set_num_threads(before)
        gemv_setting("")
        engines.clear()
        gc.collect()
    return result


def files(quick: bool, work: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """{label: (GGUF path, (prompt, new, prefill) tokens)}: SmolLM2-135M's file (pulled from the catalogue)
    and the random 1B-class one, whose decoding is 8x slower (so 32 new tokens, a 128-token prefill);
    in a quick run a tiny random file only."""
    if quick:
        return {"tiny random Q4_0 (quick)": (random_gguf(work / random_gguf_name(TINY, None), TINY), QUICK_SIZES)}
    from chatforge import catalog

    try:
        smollm2 = catalog.pull("smollm2", progress=False)
    except catalog.ModelUnavailable as e:
        raise PeerUnavailable(f"smollm2 cannot be had here ({e.why})") from e
    bench = cache_dir() / "bench"
    big = random_gguf(bench / random_gguf_name(LLAMA_1B, smollm2), LLAMA_1B, tokenizer_from=smollm2)
    return {"SmolLM2-135M-Instruct Q4_1": (smollm2, (PROMPT, NEW, LONG)),
            "1B-class (Llama-3.2-1B shape), random Q4_0": (big, (PROMPT, 32, 128))}


def cpu_description() -> dict:
    from chatforge.utils import cpu_flags

    flags = cpu_flags()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}


def run(quick: bool = False, rounds: int = 3, threads: Optional[list[int]] = None, build: Optional[bool] = None) -> dict:
    """B2-llamacpp. `build`: build the peer's venv when missing (default: yes, except in a quick run)."""
    threads = threads or sorted({1, min(2, os.cpu_count() or 1)})
    result: dict = {**cpu_description(), "threads": threads, "bandwidth_method": "torch: sum of a 1 GiB fp32 tensor, best of 3, "
                    "same thread count" if not quick else "torch: sum of a 256 MiB fp32 tensor",
                    "models": {}, "ratios": {}}
    peer: Optional[LlamaCpp] = None
    try:
        peer = LlamaCpp(find_peer(build=not quick if build is None else build))
        result["llama_cpp"] = {**peer.info, "package": f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "cmake_args": CMAKE_ARGS,
                               "venv": str(venv_dir())}
    except PeerUnavailable as e:
        result["llama_cpp_skipped"] = str(e)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for label, (path, sizes) in files(quick, Path(tmp)).items():
                print(f"B2-llamacpp: {label} ({path.name})", flush=True)
                rounds_here = 1 if quick else rounds if path.stat().st_size < 2**28 else max(1, rounds // 2)
                result["models"][label] = m = measure_file(label, path, peer, threads, rounds_here, sizes)
                m.update(rounds=rounds_here, prompt_tokens=sizes[0], new_tokens=sizes[1], prefill_tokens=sizes[2])
                for t, entry in m["by_threads"].items():
                    if "best" in entry:
                        short = label.split()[0]
                        result["ratios"][f"{short} {t}t decode"] = entry["best"]["decode"]
                        result["ratios"][f"{short} {t}t prefill"] = entry["best"]["prefill"]
        except PeerUnavailable as e:  # the model itself cannot be had
            return {"skipped": str(e)}
        finally:
            if peer is not None:
                peer.close()
    decode = [v for k, v in result["ratios"].items() if k.endswith("decode")]
    prefill = [v for k, v in result["ratios"].items() if k.endswith("prefill")]
    result["target"] = "decode >= 1.0x llama.cpp and prefill >= 2x, every file and thread count"
    result["target_met"] = bool(decode) and min(decode) >= TARGETS["decode"] and min(prefill) >= TARGETS["prefill"]
    return result


# --- the table -------------------------------------------------------------------------------------

def table(result: dict) -> str:
    """The result as Markdown: a header naming the CPU and the peer, one table per file."""
    if "skipped" in result:
        return f"B2-llamacpp skipped: {result['skipped']}"
    peer = result.get("llama_cpp")
    lines = [f"CPU: {result['cpu']}, {result['cores']} cores; vector extensions: {' '.join(result['flags'])}.",
             (f"llama.cpp: {peer['package']} (vendored llama.cpp built by pip with CMAKE_ARGS=\"{peer['cmake_args']}\"); "
              f"its system info: `{peer['system_info']}`." if peer else
              f"llama.cpp: not measured ({result.get('llama_cpp_skipped')})."),
             "Batch 1, greedy; each file's prompt, new tokens and prefill length are given with it. "
             "decode tokens/s = the tokens after the first / their time; end-to-end "
             f"= all new tokens / the whole call. Bound = memory read bandwidth ({result['bandwidth_method']}) / weight "
             "bytes read per token. Ratios are chatforge / llama.cpp in speed (prefill: llama.cpp's time / chatforge's). "
             "CPU share = CPU time / (wall time x threads) while decoding: well under 1 means other processes took "
             "the contender's cores (a shared machine), and its row says more about them than about it.", ""]
    for label, m in result["models"].items():
        lines += [f"**{label}** (`{m['file']}`, {m['file_bytes'] / 1e6:.0f} MB): {m['prompt_tokens']}-token prompt, "
                  f"{m['new_tokens']} new tokens; prefill of {m['prefill_tokens']} tokens; {m['rounds']} round(s), "
                  "medians", "",
                  "| threads | contender | activations | decode tokens/s | vs llama.cpp | % of bound | end-to-end tokens/s "
                  "| prefill s | prefill vs llama.cpp | MB read / token | greedy tokens equal to llama.cpp's | CPU share |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t, entry in m["by_threads"].items():
            for name, r in entry["rows"].items():
                vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
                equal = r.get("tokens_equal_to_llamacpp", "-")
                lines.append(f"| {t} | {name} | {r['dtype']} | {r['decode_tokens_per_s']:.1f} | "
                             f"{vs('decode_vs_llamacpp')} | {r['pct_of_bound']:.0f}% | "
                             f"{r['end_to_end_tokens_per_s']:.1f} | {r['prefill_s']:.3f} | {vs('prefill_vs_llamacpp')} | "
                             f"{r['weight_bytes_per_token'] / 1e6:.0f} | {equal} | {r['cpu_share']:.2f} |")
        bw = ", ".join(f"{t} thread(s) {e['bandwidth_GBps']:.1f} GB/s" for t, e in m["by_threads"].items())
        lines += ["", f"Memory read bandwidth in this run: {bw}.", ""]
    if result["ratios"]:
        lines += ["| chatforge's fastest mode / llama.cpp | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items()]
        lines += ["", f"Target ({result['target']}): {'met' if result['target_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


def write_note(result: dict, command: str, when: str, path: Path = NOTE) -> None:
    """The table as benchmarks/notes/b2_llamacpp.md, which report.py puts at the end of docs/benchmarks.md."""
    from chatforge.utils import atomic_write_text

    atomic_write_text(path, "\n".join([
        "## B2-llamacpp: batch-1 decoding and prefill against llama.cpp, on the same GGUF file", "",
        f"Written by `{command}` ({when}, {result.get('seconds', '?')} s); see benchmarks/llamacpp.py for the method.",
        "", table(result)]).rstrip() + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true", help="only build the benchmark venv with llama-cpp-python")
    args = p.parse_args(argv)
    if args.install:
        try:
            print(f"llama.cpp ready: {find_peer(build=True)}")
        except PeerUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    print("run it through the runner: python -m benchmarks --only B2-llamacpp", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
