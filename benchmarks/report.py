"""Turn benchmark results into one printed line each and the Markdown of docs/benchmarks.md."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

TARGETS = {
    "B1": "chatforge trains at >= 2x the tokens/s of GPT2LMHeadModel at the same shape",
    "B1-converge": "chatforge reaches val loss 1.88 in <= 1/3 of the nanoGPT recipe's wall time",
    "B2": "fp32 >= 1.5x generate(); fastest mode >= 3x generate()'s fastest and >= 70% of its bandwidth bound",
    "B2-kernels": "a GGUF file's blocks multiplied as stored (chatforge's kernels) decode faster than the file "
                  "dequantized to fp32, on chatforge's kernels and on torch's ops; the share of the bandwidth bound",
    "B2-llamacpp": "decode >= 1.0x llama.cpp and prefill >= 2x, on the same GGUF file, 1 and 2 threads",
    "B3": ">= 2x generate()'s fastest prefill",
    "B4": "8 clients >= 4x the tokens/s of 1 client, TTFT p95 < 1 s at 8 clients, no failed request (default model)",
    "B4-125m": "the same, serving a GPT-Neo-125M-shaped model in bf16",
    "B5": "int8 peak memory <= 0.35x fp32's",
    "B5-gguf": "loading the SmolLM2-135M Q4_1 GGUF as int4 adds < 2x the file's size to the peak memory",
    "B6-embed": "sentence embeddings (batch 32, 128 tokens) >= 1.5x the texts/s of sentence-transformers' encode",
    "B7-grammar": "decoding under a JSON schema at >= 0.85x the tokens/s of free decoding, batch 1 and 8",
    "B8-speculative": "speculative decoding (prompt lookup) >= 1.8x plain greedy tokens/s on an edit task, batch 1, "
                      "output identical",
    "compile": "torch.compile used only where it pays; compiled equal to eager",
}


def _x(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def summary_line(name: str, result: dict) -> str:
    if "skipped" in result:
        return f"{name}: skipped ({result['skipped']})"
    ratios = result.get("ratios") or {}
    parts = [f"{k} {_x(v) if isinstance(v, float) or v is None else v}" for k, v in ratios.items()]
    return f"{name}: " + ("; ".join(parts) if parts else "done") + f"  [{result.get('seconds', '?')} s]"


# --- Markdown ------------------------------------------------------------------------------------

def markdown(data: dict) -> str:
    results = data.get("results", {})
    out = ["# Benchmarks", "",
           "chatforge against its peers, measured side by side in one process and one run: the peer gets the",
           "same shapes, weights, data, batch, precision and optimizer; contenders are interleaved round by",
           "round so that load from other processes hits them alike, and each figure is a median. Ratios are",
           "the result; absolute times move with the machine's load (the `spread` column is (max - min) /",
           "median over the rounds). Regenerate with `python -m benchmarks` (or `--only B2,B3`); this file",
           "is written from `benchmarks/results/latest.json`.", ""]
    out += _machine(results)
    out += ["## Targets", "", "| benchmark | target | result |", "| --- | --- | --- |"]
    for name, target in TARGETS.items():
        out.append(f"| {name} | {target} | {_verdict(name, results.get(name))} |")
    out.append("")
    out += _notes(results)
    for name, render in (("B1", _b1), ("B1-converge", _b1c), ("B2", _b2), ("B2-kernels", _b2_kernels), ("B3", _b3), ("B4", _b4),
                         ("B4-125m", _b4), ("B5", _b5), ("B5-gguf", _b5_gguf), ("B6-embed", _b6),
                         ("B7-grammar", _b7), ("B8-speculative", _b8), ("compile", _compile)):
        r = results.get(name)
        out.append(f"## {name}: {_TITLES[name]}")
        out.append("")
        if r is None:
            out += ["Not run yet.", ""]
            continue
        if "skipped" in r:
            out += [f"Skipped: {r['skipped']}.", ""]
            continue
        out += render(r)
        out += [f"Command: `{r.get('command', '?')}` ({r.get('when', '?')}, {r.get('seconds', '?')} s, "
                f"load average before {r.get('load_average_before')}, torch threads "
                f"{r.get('machine', {}).get('torch_threads')}{', QUICK sizes' if r.get('quick') else ''}).", ""]
    out += hand_written()
    return "\n".join(out) + "\n"


NOTES = Path(__file__).parent / "notes"


def hand_written(folder: Path = NOTES) -> list[str]:
    """benchmarks/notes/*.md, in name order: sections measured by a recipe rather than by `python -m benchmarks`
    (e.g. the SMS classifier table), kept at the end of docs/benchmarks.md whenever it is regenerated."""
    out: list[str] = []
    for path in sorted(folder.glob("*.md")) if folder.is_dir() else []:
        out += [path.read_text().strip(), ""]
    return out


_TITLES = {"B1": "training tokens/s", "B1-converge": "wall time to validation loss 1.88",
           "B2": "batch-1 decoding", "B2-kernels": "batch-1 decoding of GGUF files on chatforge's kernels", "B3": "prefill (time to first token)", "B4": "serving load",
           "B4-125m": "serving load, 125M-shaped model in bf16", "B5": "peak memory to load and generate",
           "B5-gguf": "peak memory to load a GGUF file", "B6-embed": "sentence-embedding throughput",
           "B7-grammar": "structured output (JSON schema) vs free decoding",
           "B8-speculative": "speculative decoding vs plain greedy decoding",
           "compile": "torch.compile, measured"}


def _machine(results: dict) -> list[str]:
    info = next((r["machine"] for r in results.values() if "machine" in r), None)
    if info is None:
        return []
    v = info["versions"]
    return ["## Machine", "",
            f"- CPU: {info['cpu']}, {info['cores']} cores (AVX-512: {info['avx512']}, AMX: {info['amx']}, "
            f"native bf16: {info['bf16_native']}); torch threads: as each section's command says",
            f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
            f"numpy {v['numpy']}, chatforge {v['chatforge']}",
            f"- OS: {info['os']}", ""]


def _verdict(name: str, r: Optional[dict]) -> str:
    if r is None:
        return "not run"
    if "skipped" in r:
        return "skipped"
    ratios = r.get("ratios", {})
    if name == "B1":
        return f"{_x(ratios.get('fastest/fastest'))} fastest vs fastest; {_x(ratios.get('gpt2-layout best/best'))} same layout"
    if name == "B1-converge":
        f = ratios.get("wall_time_fraction")
        return "target not reached by a run" if f is None else f"{f:.2f} of the nanoGPT recipe's wall time"
    if name == "B2":
        return (f"fp32 {_x(ratios.get('fp32'))}, bf16 {_x(ratios.get('bf16'))}, fastest {_x(ratios.get('fastest'))}; "
                f"fastest at {r['fastest']['chatforge_pct_of_bound']:.0f}% of its bound")
    if name == "B2-kernels":
        return "; ".join(f"{k} {_x(v)}" for k, v in ratios.items()) + " (decode tokens/s)"
    if name == "B2-llamacpp":  # its table is benchmarks/notes/b2_llamacpp.md, written by the run
        return "; ".join(f"{k} {_x(v)}" for k, v in ratios.items()) + " (chatforge's fastest mode / llama.cpp)"
    if name == "B3":
        return f"fastest {_x(ratios.get('fastest'))} (fp32 {_x(ratios.get('fp32'))}, bf16 {_x(ratios.get('bf16'))})"
    if name == "B5":
        return (f"int8/fp32 peak {ratios.get('int8/fp32 peak (largest)', 0):.2f}, added "
                f"{ratios.get('int8/fp32 added (largest)', 0):.2f} (largest shape); int4/fp32 peak "
                f"{ratios.get('int4/fp32 peak (largest)', 0):.2f}")
    if name == "B5-gguf":
        return f"int4 adds {ratios.get('int4 added / file', 0):.2f}x the file's size"
    if name == "B6-embed":
        return (f"fp32 {_x(ratios.get('fp32'))}" + (f", bf16 {_x(ratios['bf16'])}" if "bf16" in ratios else "")
                + f", fastest vs fastest {_x(ratios.get('fastest'))}; vectors agree in fp32: {r.get('vectors_agree_fp32')}")
    if name == "B7-grammar":
        return ", ".join(f"{k} {_x(v)}" for k, v in ratios.items()) + " of free decoding's tokens/s"
    if name == "B8-speculative":
        best = max((v, k) for k, v in ratios.items() if "decode" not in k and "default" not in k)
        return (f"{next(iter(ratios))} {_x(next(iter(ratios.values())))} plain greedy's tokens/s (best: "
                f"{best[1].split(' /')[0]} {_x(best[0])}); output identical: {r.get('identical')}")
    if name == "compile":
        return (f"decode {_x(ratios.get('decode speedup'))}, training {_x(ratios.get('train speedup'))} "
                f"(compiled / eager speed); logits within {r['decode']['max_rel_logit_diff']:.1e} (relative)")
    if name in ("B4", "B4-125m"):
        return "; ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ratios.items()) or "see below"
    return ""


def _b1(r: dict) -> list[str]:
    out = []
    for shape, s in r["shapes"].items():
        out += [f"Shape: {shape}; {r['steps_per_timing']} optimizer steps per timing, {r['rounds']} rounds.", "",
                "| contender | tokens/s | spread |", "| --- | ---: | ---: |"]
        out += [f"| {n} | {row['tokens_per_s']:.0f} | {row['spread']:.2f} |" for n, row in s["rows"].items()]
        out += ["", "| ratio (chatforge / GPT2LMHeadModel) | value |", "| --- | ---: |"]
        out += [f"| {k} | {_x(v)} |" for k, v in s["ratios"].items()]
        out.append("")
    return out


def _b1c(r: dict) -> list[str]:
    out = [f"Validation loss on {r['eval_batches']} fixed batches every {r['eval_every']} steps; "
           f"target {r['target_val_loss']}; training time only (evaluations off the clock). The nanoGPT recipe "
           f"trains in fp32 (as nanoGPT's CPU command does), chatforge's recipe with `--precision auto` "
           f"({r.get('recipe_precision', 'fp32')} on this machine).", "",
           "| recipe | steps to target | seconds to target | final step | final val loss | final seconds |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for n, row in r["rows"].items():
        st = row["steps_to_target"]
        sec = row["seconds_to_target"]
        out.append(f"| {n} | {st if st is not None else 'not reached'} | "
                   f"{f'{sec:.1f}' if sec is not None else '-'} | {row['final_step']} | "
                   f"{row['final_val_loss']:.4f} | {row['final_seconds']:.1f} |")
    out += ["", "Validation curves (step: val loss @ training seconds):", ""]
    for n, row in r["rows"].items():
        shown = [p for p in row["curve"] if p["step"] % 250 == 0 or p is row["curve"][-1]]
        points = ", ".join(f"{p['step']}: {p['val_loss']:.3f} @ {p['seconds']:.0f}s" for p in shown)
        out.append(f"- {n}: {points}")
    f = r["ratios"].get("wall_time_fraction")
    out += ["", f"chatforge's wall time as a fraction of the nanoGPT recipe's: {'n/a' if f is None else f'{f:.2f}'} "
            f"({r.get('ratio_basis', '')}).", ""]
    return out


def _b2(r: dict) -> list[str]:
    out = [f"Shape {r['shape']}, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, greedy, batch 1, "
           f"{r['rounds']} rounds. Memory read bandwidth measured in the run: {r['bandwidth_GBps']:.1f} GB/s. "
           "tokens/s = new tokens / wall time of the whole call.", "",
           "| contender | tokens/s | bound tokens/s | % of bound | weight MB read per token | spread |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for n, row in r["rows"].items():
        out.append(f"| {n} | {row['tokens_per_s']:.1f} | {row['bound_tokens_per_s']:.1f} | {row['pct_of_bound']:.0f}% | "
                   f"{row['weight_bytes_per_token'] / 2**20:.0f} | {row['spread']:.2f} |")
    ratios = r["ratios"]
    out += ["", "| ratio (chatforge / generate()) | value |", "| --- | ---: |",
            f"| fp32 | {_x(ratios['fp32'])} |", f"| bf16 | {_x(ratios['bf16'])} |",
            f"| fastest ({r['fastest']['chatforge']}) / fastest ({r['fastest']['transformers']}) | "
            f"{_x(ratios['fastest'])} |", "",
            f"Greedy tokens equal to the peer's: {r['greedy_tokens_equal_to_peer']}.", ""]
    return out


def _b2_kernels(r: dict) -> list[str]:
    out = [f"CPU: {r['cpu']}; vector extensions: {' '.join(r['flags'])}. Contenders: the file's blocks multiplied as "
           "stored (`load(path)`: Q4_0 / Q4_1 / Q8_0, chatforge's GEMV), the file dequantized to fp32 on chatforge's "
           "kernels (`load(path, dtype=\"fp32\")`), and that model on torch's ops alone (CHATFORGE_KERNELS=0: "
           "chatforge before its kernels). Batch 1, greedy; decode tokens/s = the tokens after the first / their "
           "time; bound = read bandwidth on the same threads / weight bytes a step reads.", ""]
    for label, f in r["files"].items():
        out += [f"{label} (`{f['file']}`), {f['prompt']}-token prompt, {f['new']} new tokens, prefill of "
                f"{f['prefill_len']} tokens, {f['rounds']} rounds; kernels: {f['kernels']}.", "",
                "| threads | contender | decode tokens/s | % of bound | MB read per token | prefill s | spread |",
                "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for t, entry in f["by_threads"].items():
            for n, row in entry["rows"].items():
                out.append(f"| {t} | {n} | {row['decode_tokens_per_s']:.1f} | {row['pct_of_bound']:.0f}% | "
                           f"{row['weight_bytes_per_token'] / 1e6:.0f} | {row['prefill_s']:.2f} | "
                           f"{row['decode_spread']:.2f} |")
        equal = {t: e["greedy_tokens_equal"] for t, e in f["by_threads"].items()}
        int8 = {t: e.get("int8_tokens_leading_equal") for t, e in f["by_threads"].items()}
        out += ["", f"Bandwidth (GB/s) by threads: "
                + ", ".join(f"{t}: {e['bandwidth_GBps']:.1f}" for t, e in f["by_threads"].items())
                + f"; greedy tokens equal across the contenders with fp32 activations: {equal}; tokens the int8 "
                f"activations' reply shares with theirs before the first difference: {int8}.", ""]
    return out


def _b3(r: dict) -> list[str]:
    out = [f"Shape {r['shape']}, {r['prompt_tokens']}-token prompt, time until the first new token.", "",
           "| contender | time to first token (s) | spread |", "| --- | ---: | ---: |"]
    out += [f"| {n} | {row['ttft_s']:.3f} | {row['spread']:.2f} |" for n, row in r["rows"].items()]
    ratios = r["ratios"]
    out += ["", "| ratio (generate() time / chatforge time) | value |", "| --- | ---: |",
            f"| fp32 | {_x(ratios['fp32'])} |", f"| bf16 | {_x(ratios['bf16'])} |",
            f"| fastest ({r['fastest']['chatforge']}) vs fastest ({r['fastest']['transformers']}) | "
            f"{_x(ratios['fastest'])} |", ""]
    return out


def _b4(r: dict) -> list[str]:
    """benchmarks/serve_load.py's rows as a table (its own keys), anything else as JSON."""
    import json

    rows = r.get("rows")
    if not rows or not isinstance(rows, list):
        return ["```json", json.dumps({k: v for k, v in r.items() if k != "machine"}, indent=1, default=str), "```", ""]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    out = [f"Model `{r.get('model')}` ({r.get('dtype', 'the checkpoint')} weights), {r.get('tokens_per_request')} "
           "tokens per request, "
           f"{r.get('requests_per_client')} requests per client, {r.get('rounds')} rounds, "
           f"server threads {r.get('server_threads')}.", "",
           "| " + " | ".join(keys) + " |", "|" + " ---: |" * len(keys)]
    out += ["| " + " | ".join(str(row.get(k)) for k in keys) + " |" for row in rows]
    out += ["", "| ratio | value |", "| --- | ---: |"]
    out += [f"| {k} | {v} |" for k, v in r.get("ratios", {}).items()]
    out.append("")
    return out


def _b5(r: dict) -> list[str]:
    out = ["Fresh process per row: load, then 16 greedy tokens. `peak` is VmHWM; `added` is the peak minus the",
           "resident memory after importing torch and chatforge.", "",
           "| shape | mode | peak MB | added MB | peak after load MB |", "| --- | --- | ---: | ---: | ---: |"]
    for shape, s in r["shapes"].items():
        for mode, row in s["rows"].items():
            out.append(f"| {shape} | {mode} | {row['peak'] / 2**20:.0f} | {row['added'] / 2**20:.0f} | "
                       f"{row['peak_after_load'] / 2**20:.0f} |")
    out += ["", "| shape | int8/fp32 peak | int8/fp32 added | bf16/fp32 peak | int4/fp32 peak |",
            "| --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {shape} | {s['int8_over_fp32_peak']:.2f} | {s['int8_over_fp32_added']:.2f} | "
            f"{s['bf16_over_fp32_peak']:.2f} | {s.get('int4_over_fp32_peak', float('nan')):.2f} |"
            for shape, s in r["shapes"].items()]
    out.append("")
    return out


def _b5_gguf(r: dict) -> list[str]:
    size = r["file_bytes"] / 2**20
    out = [f"`{r['file']}` ({size:.0f} MiB) in a fresh process per row, as B5: load, then 16 greedy tokens.",
           "`added` is the peak once loaded (VmHWM) minus the resident memory after importing torch and chatforge;",
           "the last column is the peak after generating. int4 (dtype `auto`: bf16 where the CPU has it) keeps the",
           "file's Q4_1 blocks (Int4Linear, groups of 32) and makes the Q8_0 embedding (tied to the head) int8 per",
           "row; bf16 and fp32 dequantize every tensor.", "",
           "| mode | dtype | added MiB | added / file | with 16 tokens MiB |", "| --- | --- | ---: | ---: | ---: |"]
    for mode, row in r["rows"].items():
        out.append(f"| {mode} | {row['dtype']} | {row['added'] / 2**20:.0f} | {row['added_over_file']:.2f}x | "
                   f"{row['added_generating'] / 2**20:.0f} |")
    out.append("")
    return out


def _b6(r: dict) -> list[str]:
    m = r.get("machine", {})
    out = [f"CPU of this run: {m.get('cpu')}, {m.get('cores')} cores (native bf16: {m.get('bf16_native')}, AMX: "
           f"{m.get('amx')}). Model {r['model']}; {r['texts']} texts of {', '.join(map(str, r['tokens_per_text']))} tokens each "
           f"(special tokens included), batch {r['batch']}, {r['rounds']} rounds; tokenization inside the timing. "
           "chatforge: `pipeline(\"sentence-embedding\", dtype=...)`; its peer: `SentenceTransformer(dir)"
           ".encode(batch_size=32)` (bf16: `.to(torch.bfloat16)`). Cosine: the smallest over the texts, against "
           "sentence-transformers in fp32.", "",
           "| contender | texts/s | seconds per run | min cosine vs peer fp32 | spread |",
           "| --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {n} | {row['texts_per_s']:.1f} | {row['seconds']:.2f} | {row['min_cosine_vs_st_fp32']:.6f} | "
            f"{row['spread']:.2f} |" for n, row in r["rows"].items()]
    out += ["", "| ratio (chatforge / sentence-transformers, texts/s; fp32 and bf16: median of the rounds' own "
            "ratios) | value |", "| --- | ---: |"]
    out += [f"| {k} | {_x(v)} |" for k, v in r["ratios"].items()]
    out.append("")
    return out


def _b7(r: dict) -> list[str]:
    out = [f"Model {r['model']}; greedy, {r['new_tokens']} new tokens per row, {r['rounds']} rounds, "
           f"{r['threads']} torch thread(s). The schema: an array of at least 64 records (name, age, city, "
           "member); llguidance masks every row's logits before sampling (engine/grammar.py). Ratios from "
           "this process's CPU time, which other processes on a shared machine cannot stretch; wall-time "
           "figures beside them. 'grammar alone': the masks and matcher steps of the constrained replies "
           "replayed without the model.", "",
           "| run | tokens/s (CPU time) | tokens/s (wall) | CPU s | wall s | wall spread |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {n} | {row['tokens_per_cpu_s']:.1f} | {row['tokens_per_s']:.1f} | {row['cpu_seconds']:.2f} | "
            f"{row['seconds']:.2f} | {row['spread']:.2f} |" for n, row in r["rows"].items()]
    out += ["", "| json_schema / free, tokens/s | CPU time | wall | grammar alone, ms per step |",
            "| --- | ---: | ---: | ---: |"]
    out += [f"| {k} | {_x(v)} | {_x(r['wall_ratios'][k])} | {r['grammar_ms_per_step'][k]:.2f} |"
            for k, v in r["ratios"].items()]
    out += ["", f"Start of the constrained reply: `{r.get('sample', '')}`", ""]
    return out


def _b8(r: dict) -> list[str]:
    out = [f"Model {r['model']}; batch 1, greedy, a {r['prompt_tokens']}-token chat prompt asking to repeat a "
           f"paragraph with every 'colour' changed to 'color'; {r['rounds']} rounds, {r['threads']} torch threads. "
           "Prompt lookup drafts k tokens per step from the prompt and reply; the model checks them in one "
           "forward pass (engine/speculative.py).", "",
           "| run | tokens/s | decode tokens/s | seconds (prefill) | spread | drafts kept | tokens per forward pass "
           "| identical to plain |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n, row in r["rows"].items():
        kept = f"{row['acceptance']:.0%}" if "acceptance" in row else "-"
        per = f"{row['tokens_per_pass']:.2f}" if "tokens_per_pass" in row else "1"
        out.append(f"| {n} | {row['tokens_per_s']:.1f} | {row['decode_tokens_per_s']:.1f} | {row['seconds']:.2f} "
                   f"({row['prefill_seconds']:.2f}) | {row['spread']:.2f} | {kept} | {per} | {row['identical_to_plain']} |")
    out += ["", "| ratio (speculative / plain, tokens/s) | value |", "| --- | ---: |"]
    out += [f"| {k} | {_x(v)} |" for k, v in r["ratios"].items()]
    out += ["", f"Start of the reply: `{r.get('reply', '')[:160]}`", ""]
    return out


def _compile(r: dict) -> list[str]:
    d, t = r["decode"], r["train"]
    return ["| what | compile s | eager ms/step | compiled ms/step | compiled speed-up | largest difference |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            f"| decode step (B2 model, fp32) | {d['compile_s']:.0f} | {d['eager_ms_per_step']:.1f} | "
            f"{d['compiled_ms_per_step']:.1f} | {_x(d['speedup'])} | logits {d['max_abs_logit_diff']:.1e} abs, "
            f"{d['max_rel_logit_diff']:.1e} rel |",
            f"| training step (nano, recipe layout, fp32) | {t['compile_s']:.0f} | {t['eager_ms_per_step']:.1f} | "
            f"{t['compiled_ms_per_step']:.1f} | {_x(t['speedup'])} | loss {t['max_abs_loss_diff']:.1e} |", ""]


def _notes(results: dict) -> list[str]:
    """Why the missed targets are missed, with this run's own figures."""
    out = ["## Where a target is missed, and what limits it", ""]
    b1 = results.get("B1")
    if b1 and "shapes" in b1:
        first = next(iter(b1["shapes"].values()))["ratios"]
        out.append(f"- **B1 tokens/s**: the matrix multiplies run the same MKL/oneDNN kernels on both sides, so with "
                   f"GPT-2's own layout in fp32 the gain is only the leaner graph ({_x(first['gpt2-layout fp32'])}). "
                   f"bf16 adds the most ({_x(first['gpt2-layout bf16'])} against the peer in bf16): chatforge keeps the "
                   "attention in fp32 for training, because torch's CPU flash-attention backward is ~15x slower in "
                   "bf16 (which makes the peer slower in bf16 than in fp32 at the nano shape). What is left are elementwise kernels "
                   "both sides share (GELU-tanh alone is ~17% of a nano step, then layer norm, softmax, AdamW).")
    b2 = results.get("B2")
    if b2 and "rows" in b2:
        rows = b2["rows"]
        peer = rows["transformers fp32"]["pct_of_bound"]
        out.append(f"- **B2 fp32**: decoding reads every weight once per token, so it is bound by memory bandwidth "
                   f"({b2['bandwidth_GBps']:.0f} GB/s measured here). generate() already runs at {peer:.0f}% of that "
                   f"bound and chatforge at {rows['chatforge fp32']['pct_of_bound']:.0f}%: no fp32 implementation can "
                   f"beat it by more than {100 / peer:.2f}x on this machine.")
        fastest = max((r["tokens_per_s"], n) for n, r in rows.items() if n.startswith("chatforge"))[1]
        best = rows[fastest]
        others = ", ".join(f"{n.split()[-1]} {r['pct_of_bound']:.0f}%" for n, r in rows.items()
                           if n.startswith("chatforge") and n != fastest)
        out.append(f"- **B2 fastest**: {fastest} is chatforge's fastest mode ({_x(b2['ratios']['fastest'])} "
                   f"generate()'s fastest) but runs at {best['pct_of_bound']:.0f}% of its own bandwidth bound "
                   f"({best['weight_bytes_per_token'] / 1e6:.0f} MB per token; {others} for the other modes). "
                   "The quantized kernels do not stream weights at the bus's rate: they are compute-bound. "
                   "torch's int4 kernel unpacks each weight and multiplies in float; measured alone on this "
                   "model's 48 block matrices it takes 10.4 ms per token on one thread and 5.0-6.4 ms on two "
                   "(about 10 GB/s of weights at best; the int8 kernel and int8 x int8 `_int_mm` do no better per "
                   "byte). What a token costs besides the matrices (attention over the cache, norms, residual "
                   "adds, the sampler, Python dispatch: 2-4 ms) weighs more as the matrices shrink. 70% of the "
                   f"bound would mean {1e3 / (0.7 * best['bound_tokens_per_s']):.1f} ms per token for everything; "
                   "it would take a hand-written SIMD kernel, which torch 2.13 does not ship for the CPU.")
    b2l = results.get("B2-llamacpp")
    if b2l and b2l.get("ratios") and not b2l.get("quick") and min(b2l["ratios"].values()) < 1.0:
        short = "; ".join(f"{k} {v:.2f}x" for k, v in b2l["ratios"].items() if v < 1.0 or "prefill" in k and v < 2.0)
        out.append(f"- **B2-llamacpp** (short: {short}): both sides now decode the same way: activations rounded "
                   "to int8 blocks, weights repacked at load so that one VNNI dot instruction serves several rows "
                   "(chatforge: groups of 8 rows, q_gemv.c's cf_gemv8; llama.cpp: its `REPACK = 1`), and both "
                   "prefill with the same integer instructions (chatforge's packed loop: 120-150 GMAC/s on one "
                   "core of the AMD EPYC, 2.7x the fp32 GEMM it replaced). On the 135M model llama.cpp's "
                   "per-token and per-matrix overheads leave chatforge ahead; on the 1B-class file the prefill "
                   "is the integer dot instructions' throughput on both sides, so the ratio sits near 1x. "
                   "Twice llama.cpp's prefill there would need more multiplies per cycle than VNNI gives (AMX "
                   "tiles, which this AMD EPYC lacks); a fp32 or bf16 GEMM is slower still (widening each layer "
                   "to bf16 for torch's GEMM took the 128-token prefill from 3.9 s only to 3.0 s).")
    b3 = results.get("B3")
    if b3 and "ratios" in b3:
        out.append("- **B3**: a 512-token prefill is compute-bound: in chatforge's bf16 prefill the matrix multiplies "
                   "(AMX; the first MLP layer with its GELU fused into one oneDNN call) take ~66% of the time, "
                   "attention ~18%, copies into the KV cache and layouts ~5%, layer norms ~3% (torch profiler). The "
                   "matrix multiplies and attention are the same torch kernels the peer calls, which caps how far "
                   f"apart the two can be (fastest vs fastest: {_x(b3['ratios']['fastest'])}; 1.4x-1.9x across runs).")
    b4, b4m = results.get("B4"), results.get("B4-125m")
    if b4 and "ratios" in b4:
        key = "8 clients / 1 client tokens/s"
        ratio = b4["ratios"].get(key, 0)
        if b4.get("model") != "chatforge-demo":
            ttft = b4["ratios"].get("TTFT p95 at 8 clients (ms)")
            line = (f"- **B4** ({b4.get('model')}, {ratio:.2f}x one client's tokens/s at 8 clients, TTFT p95 {ttft} ms: "
                    f"{'met' if b4.get('target_met') else 'missed'}): one client is served by the batch-1 GEMV, "
                    "which shares each activation block between four weight rows and streams the Q4_1 blocks near "
                    "the memory's speed (13 ms a token on the server's one thread); 8 rows are multiplied exactly, "
                    "in fp32 FMAs, and that is compute-bound: the engine alone (no server) takes 48 ms a step for 8 "
                    "rows, 3.6x one row's time, so 8 clients can get at most about 2.2x one client's tokens/s on "
                    "one thread. The ratio fell as one client got faster: it was 15x when one client decoded at "
                    "3 tokens/s (a loaded machine and the torch path).")
        else:
            line = (f"- **B4** (demo model, {ratio:.2f}x in this run: {'met' if ratio >= 4 else 'missed'}; it moves "
                    "between about 2.5x and 4.6x from run to run on this shared machine): the demo model (4 layers, width 256) is so "
                    "small that a decoding step is mostly costs that grow with the batch: on one thread MKL's fp32 "
                    "matrix multiply takes about twice as long for 8 rows as for 1 at its sizes (measured alone: 1.8 "
                    "vs 0.9 ms for the model's 17 matrices), and each request's chunks are encoded and written by the "
                    "event loop, which shares the GIL with the model's thread.")
        if b4m and "ratios" in b4m:
            line += (f" Serving a model of a real size, where a step is the weights' matrix multiplies (B4-125m: "
                     f"GPT-Neo-125M shape in bf16), 8 clients get {b4m['ratios'].get(key, 0):.2f}x one client's "
                     "tokens/s.")
        out.append(line)
    b6 = results.get("B6-embed")
    if b6 and "ratios" in b6 and not b6.get("quick") and b6["ratios"]["fastest"] < 1.5:
        ratios = b6["ratios"]
        out.append(f"- **B6-embed** (fp32 {_x(ratios['fp32'])}" + (f", bf16 {_x(ratios['bf16'])}" if "bf16" in ratios
                   else "") + f"; short of 1.5x by {1.5 / ratios['fastest']:.2f}x): with every text 128 tokens "
                   "there is no padding to save, so both sides do the same arithmetic with the same kinds of "
                   "kernels. chatforge's gain is in how the multiplies are called: oneDNN's linear with the bias and "
                   "GELU fused in, where the peer's F.linear goes to MKL's sgemm (1.35x slower than oneDNN on this "
                   "AMD EPYC, and it first copies the bias into every row) and runs GELU as a separate pass; and one "
                   "fused q/k/v multiply instead of three. What is left is the same on both sides (torch profiler, "
                   "one batch of 32 x 128 in chatforge): the matrix multiplies ~75% of the time in fp32 (~60% in "
                   "bf16), attention (the same flash-attention kernel) ~12% (~16%), the residual adds ~6% (~11%) "
                   "and layer norms ~5% (~12%). Fusing the residual add into the output projection "
                   "(oneDNN's binary post-op) measured 8% faster for that multiply in fp32 and no faster in bf16, "
                   "so it was left out. Beyond that it would take fewer or cheaper multiplies (int8 activations, "
                   "a smaller model), not a better call of the same ones.")
    c = results.get("compile")
    if c and "decode" in c:
        pays = [what for what, part in (("decoding", c["decode"]), ("training", c["train"])) if part["speedup"] > 1.1]
        verdict = "pays for " + " and ".join(pays) if pays else "does not pay"
        out.append(f"- **torch.compile** {verdict} on this CPU: decoding {_x(c['decode']['speedup'])}, training "
                   f"{_x(c['train']['speedup'])} of eager speed, after compiling for {c['decode']['compile_s']:.0f} s "
                   f"and {c['train']['compile_s']:.0f} s (inductor's disk cache off: a first compile). chatforge "
                   "leaves it off by default; TrainConfig.compile / --compile turn it on.")
    out.append("")
    return out
