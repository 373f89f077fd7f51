"""B2 decoding and B3 prefill: chatforge's Engine against transformers' generate() on one model.

B2: batch-1 greedy decoding, a 32-token prompt and 128 new tokens, GPT-Neo-125M shape with random
weights; chatforge and GPTNeoForCausalLM (built from the same weights) in fp32 and bf16, plus
chatforge's int8 and int4 weight-only modes. tokens/s = new tokens / wall time of the whole call (prefill
included, as a user waits for it). Each figure is also given as a share of its memory-bandwidth
bound: bandwidth (measured in the same run) / bytes of weights read per token.

B3: time to first token for a 512-token prompt, the same models.
"""
from __future__ import annotations

import copy
import os
import statistics
from typing import Callable

import torch

from chatforge.engine import Engine
from chatforge.quantize import quantize_model, weight_bytes

from .common import TokenIds, hf_peer, interleaved, median, memory_bandwidth, preset, spread


def _config(quick: bool):
    if quick:  # GPT-Neo's layout (local/global layers, learned positions) at a toy size
        return preset("gpt-neo-125m", n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=256,
                      sliding_window=16, local_layers=[1])
    return preset("gpt-neo-125m")


def decode_weight_bytes(model) -> int:
    """Bytes a decoding step reads: every weight except the embedding tables (one row each is read)."""
    skip = set()
    for name in ("wte", "wpe"):
        module = getattr(model, name, None)
        if module is not None and not (name == "wte" and model.config.tie_embeddings):
            skip.update(id(t) for t in list(module.parameters()) + list(module.buffers()))
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def build_contenders(quick: bool) -> tuple[dict, dict]:
    """{name: (kind, model)} for chatforge fp32/bf16/int8/int4 and the peer's fp32/bf16, all from one set of weights."""
    torch.manual_seed(0)
    config = _config(quick)
    from chatforge.model import Transformer

    base = Transformer(config).eval()
    models = {
        "chatforge fp32": ("chatforge", base),
        "transformers fp32": ("hf", hf_peer(base, torch.float32)),
        "chatforge bf16": ("chatforge", copy.deepcopy(base).to(torch.bfloat16)),
        "transformers bf16": ("hf", hf_peer(base, torch.bfloat16)),
        # activations in quantize's default dtype: fp32 where chatforge's kernels are, else bf16 where native
        "chatforge int8": ("chatforge", quantize_model(copy.deepcopy(base), "int8")),
        "chatforge int4": ("chatforge", quantize_model(copy.deepcopy(base), "int4")),
    }
    info = {name: {"weight_bytes_per_token": decode_weight_bytes(m) if kind == "chatforge" else
                   decode_weight_bytes(models[name.replace("transformers", "chatforge")][1]),
                   "model_bytes": weight_bytes(m)}
            for name, (kind, m) in models.items()}
    return models, info


def generator(kind: str, model, prompt: list[int], new_tokens: int) -> Callable[[], list[int]]:
    """A call that greedily continues `prompt` by exactly `new_tokens` tokens, as each library does it."""
    if kind == "chatforge":
        engine = Engine(model, TokenIds(model.config.vocab_size))

        def run() -> list[int]:
            [g] = engine.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=[])
            return g.token_ids
        return run
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()
    return run_hf


def run(quick: bool = False, rounds: int = 5) -> dict:
    """B2 and B3 together (they share the models); returns both sections."""
    models, info = build_contenders(quick)
    vocab = _config(quick).vocab_size
    g = torch.Generator().manual_seed(1)
    prompt_len, new_tokens, long_len = (8, 16, 64) if quick else (32, 128, 512)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    long_prompt = torch.randint(0, vocab, (long_len,), generator=g).tolist()
    rounds = 1 if quick else rounds

    decode = {name: generator(kind, m, prompt, new_tokens) for name, (kind, m) in models.items()}
    prefill = {name: generator(kind, m, long_prompt, 1) for name, (kind, m) in models.items()}
    tokens = {name: fn() for name, fn in decode.items()}  # warm-up, and the greedy tokens to compare
    for fn in prefill.values():
        fn()
    bandwidths: list[float] = []
    probe = lambda: bandwidths.append(memory_bandwidth(256 if quick else 1024))  # noqa: E731
    decode_times = interleaved(decode, rounds, between=probe)
    prefill_times = interleaved(prefill, max(rounds, 3))
    bandwidth = median(bandwidths)

    b2 = {"shape": "test-neo" if quick else "gpt-neo-125m", "prompt_tokens": prompt_len, "new_tokens": new_tokens,
          "rounds": rounds, "bandwidth_GBps": bandwidth / 1e9, "rows": {}}
    for name, times in decode_times.items():
        tps = new_tokens / median(times)
        bound = bandwidth / info[name]["weight_bytes_per_token"]
        b2["rows"][name] = {"tokens_per_s": tps, "bound_tokens_per_s": bound, "pct_of_bound": 100 * tps / bound,
                            "spread": spread(times), **info[name]}
    rows = b2["rows"]
    best = lambda prefix: max((r["tokens_per_s"], n) for n, r in rows.items() if n.startswith(prefix))  # noqa: E731
    cf_best, hf_best = best("chatforge"), best("transformers")
    b2["ratios"] = {
        "fp32": rows["chatforge fp32"]["tokens_per_s"] / rows["transformers fp32"]["tokens_per_s"],
        "bf16": rows["chatforge bf16"]["tokens_per_s"] / rows["transformers bf16"]["tokens_per_s"],
        "fastest": cf_best[0] / hf_best[0],
    }
    b2["fastest"] = {"chatforge": cf_best[1], "transformers": hf_best[1],
                     "chatforge_pct_of_bound": rows[cf_best[1]]["pct_of_bound"]}
    ref = tokens["transformers fp32"]
    b2["greedy_tokens_equal_to_peer"] = {
        "fp32": tokens["chatforge fp32"] == ref,
        "bf16_first_16": tokens["chatforge bf16"][:16] == tokens["transformers bf16"][:16],
    }

    b3 = {"shape": b2["shape"], "prompt_tokens": long_len, "rows": {}}
    for name, times in prefill_times.items():
        b3["rows"][name] = {"ttft_s": median(times), "spread": spread(times)}
    cf_fast = min((r["ttft_s"], n) for n, r in b3["rows"].items() if n.startswith("chatforge"))
    hf_fast = min((r["ttft_s"], n) for n, r in b3["rows"].items() if n.startswith("transformers"))
    b3["ratios"] = {
        "fp32": b3["rows"]["transformers fp32"]["ttft_s"] / b3["rows"]["chatforge fp32"]["ttft_s"],
        "bf16": b3["rows"]["transformers bf16"]["ttft_s"] / b3["rows"]["chatforge bf16"]["ttft_s"],
        "fastest": hf_fast[0] / cf_fast[0],
    }
    b3["fastest"] = {"chatforge": cf_fast[1], "transformers": hf_fast[1]}
    return {"B2": b2, "B3": b3}


# --- B2-kernels: chatforge's own CPU kernels against its torch path, on GGUF files ---------------------

KERNEL_CONTENDERS = {  # name: (load() dtype, environment: CHATFORGE_KERNELS, CHATFORGE_GEMV)
    "stored blocks (kernels)": (None, ("1", "fp32")),  # the file's Q4_0 / Q4_1 / Q8_0 blocks multiplied as they are
    "stored blocks, int8 activations (kernels)": (None, ("1", "int8")),  # the same, x rounded to int8 blocks
    "fp32 (kernels)": ("fp32", ("1", "fp32")),  # dequantized; chatforge's fp32 GEMV and step kernels
    "fp32 (torch)": ("fp32", ("0", "fp32")),  # the same model on torch's ops alone: chatforge before its kernels
}


def kernel_decode(path, threads: tuple[int, ...] = (1, 2), rounds: int = 3, prompt_len: int = 32, new: int = 128,
                  prefill_len: int = 512, contenders: tuple[str, ...] = tuple(KERNEL_CONTENDERS)) -> dict:
    """Batch-1 greedy decoding of one GGUF file in chatforge, per contender (KERNEL_CONTENDERS) and thread count:
    decode tokens/s (the tokens after the first / their time), the prefill of `prefill_len` tokens, and the
    share of the memory-bandwidth bound (read bandwidth on the same threads / weight bytes a step reads).
    Rounds interleave the contenders; figures are medians. Importable: B2-llamacpp can call it."""
    from chatforge import kernels
    from chatforge.kernels import build
    from chatforge.loader import load

    from .llamacpp import chatforge_generate, summarize

    def switch(env: tuple[str, str]) -> None:  # read afresh: every layer asks kernels.get() per call
        os.environ[build.ENV], os.environ[kernels.GEMV_ENV] = env
        kernels.reset()

    engines, models = {}, {}
    for name in contenders:
        dtype, setting = KERNEL_CONTENDERS[name]
        if dtype not in models:
            models[dtype] = load(path, device="cpu", dtype=dtype)
        engines[name] = (Engine(*models[dtype]), setting)
    vocab = next(iter(engines.values()))[0].model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    long_prompt = torch.randint(0, vocab, (prefill_len,), generator=g).tolist()
    result: dict = {"file": str(getattr(path, "name", path)), "kernels": kernels.status(), "by_threads": {}}
    before, env = torch.get_num_threads(), {k: os.environ.get(k) for k in (build.ENV, kernels.GEMV_ENV)}
    try:
        for t in threads:
            torch.set_num_threads(t)
            runs: dict[str, list] = {n: [] for n in engines}
            prefills: dict[str, list] = {n: [] for n in engines}
            tokens: dict[str, list] = {}
            bandwidths = []
            for name, (engine, setting) in engines.items():  # warm-up (first-call costs, the kernels' build)
                switch(setting)
                chatforge_generate(engine, prompt, 4)
            for r in range(rounds):
                bandwidths.append(memory_bandwidth(1024, threads=t))
                names = list(engines)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    engine, setting = engines[name]
                    switch(setting)
                    run = chatforge_generate(engine, prompt, new)
                    runs[name].append(run)
                    tokens.setdefault(name, run["tokens"])
                    prefills[name].append(chatforge_generate(engine, long_prompt, 1)["first_s"])
            bandwidth = statistics.median(bandwidths)
            rows = {}
            for name, (engine, _) in engines.items():
                read = decode_weight_bytes(engine.model)
                row = {**summarize(runs[name], new, t), "prefill_s": statistics.median(prefills[name]),
                       "weight_bytes_per_token": read, "bound_tokens_per_s": bandwidth / read}
                row["pct_of_bound"] = 100 * row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
                rows[name] = row
            exact = [v for n, v in tokens.items() if KERNEL_CONTENDERS[n][1][1] == "fp32"]
            rounded = {n: v for n, v in tokens.items() if KERNEL_CONTENDERS[n][1][1] == "int8"}
            result["by_threads"][str(t)] = {
                "bandwidth_GBps": bandwidth / 1e9, "rows": rows,
                "greedy_tokens_equal": all(v == exact[0] for v in exact),  # every contender with fp32 activations
                "int8_tokens_leading_equal": {n: next((i for i, (a, b) in enumerate(zip(v, exact[0])) if a != b), len(v))
                                              for n, v in rounded.items()}}
    finally:
        torch.set_num_threads(before)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        kernels.reset()
    return result


def run_kernels(quick: bool = False, rounds: int = 3, threads: tuple[int, ...] = (1, 2)) -> dict:
    """B2-kernels: SmolLM2-135M-Instruct's Q4_1 file and a 1B-class random Q4_0 one (Llama-3.2-1B's shape;
    benchmarks/gguf_memory.random_gguf), 1 and 2 threads; a tiny random file in a quick run."""
    import tempfile
    from pathlib import Path

    from chatforge.utils import cpu_flags

    from .common import cpu_model
    from .gguf_memory import LLAMA_1B, TINY, random_gguf, random_gguf_name
    from .llamacpp import FLAGS, cache_dir

    flags = cpu_flags()
    result: dict = {"cpu": cpu_model(), "flags": [f for f in FLAGS if f in flags], "files": {}, "ratios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            files = {"tiny random Q4_0": (random_gguf(Path(tmp) / random_gguf_name(TINY, None), TINY), {})}
        else:
            from chatforge import catalog

            try:
                smollm2 = catalog.pull("smollm2", progress=False)
            except catalog.ModelUnavailable as e:
                return {"skipped": f"smollm2 cannot be had here ({e.why})"}
            big = random_gguf(cache_dir() / "bench" / random_gguf_name(LLAMA_1B, smollm2), LLAMA_1B,
                              tokenizer_from=smollm2)
            # the 1B file dequantized is 4 GB in fp32: fewer tokens and rounds for it
            files = {"SmolLM2-135M-Instruct Q4_1": (smollm2, {}),
                     "1B-class (Llama-3.2-1B shape), random Q4_0": (big, {"new": 32, "prefill_len": 128,
                                                                          "rounds": max(1, rounds // 2)})}
        for label, (path, options) in files.items():
            print(f"B2-kernels: {label}", flush=True)
            kw = {"rounds": 1 if quick else rounds, **options}
            if quick:
                kw.update(new=8, prompt_len=8, prefill_len=32)
            m = result["files"][label] = kernel_decode(path, threads=threads, **kw)
            m.update(new=kw.get("new", 128), prompt=kw.get("prompt_len", 32), prefill_len=kw.get("prefill_len", 512),
                     rounds=kw["rounds"])
            for t, entry in m["by_threads"].items():
                rows = entry["rows"]
                result["ratios"][f"{label.split()[0]} {t}t stored/torch"] = (
                    rows["stored blocks (kernels)"]["decode_tokens_per_s"] / rows["fp32 (torch)"]["decode_tokens_per_s"])
    return result
