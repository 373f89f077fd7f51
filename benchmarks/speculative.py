"""B8-speculative: tokens/s with and without speculative decoding on an input-grounded task, batch 1, greedy.

The default chat model (SmolLM2-135M-Instruct: the catalogue's Q4_1 GGUF, loaded as chatforge loads it) is
asked to repeat a paragraph with every 'colour' changed to 'color': most of the reply copies its input, which
is what prompt lookup (engine/speculative.py) drafts from. Plain greedy decoding runs against prompt lookup with
several numbers of drafted tokens k; every speculative reply must equal the plain one token for token.
tokens/s = completion tokens / wall time of the whole call (prefill included: the user waits for it too);
decode tokens/s leaves the prefill (the first step, the same in every run) out. Runs are interleaved round by
round, figures are medians.

--quick: the demo model and a short paragraph, one round (a smoke test of the code path).
"""
from __future__ import annotations

import time

import torch

from .common import chat_model, interleaved, median, spread

PARAGRAPH = (
    "The colour of the sea changes with the weather. On a bright morning it is a deep blue, but under storm "
    "clouds the colour turns to a dull grey, and at sunset it takes on the colour of copper. Painters have long "
    "tried to capture this colour, mixing their paints for hours to find the right shade, and many of them "
    "kept notebooks full of colour studies made on the shore. Some say the true colour of the sea is green; "
    "others say it has no colour of its own at all and only reflects the sky above it.")
INSTRUCTION = "Repeat the following text with every 'colour' changed to 'color':\n\n"
DRAFTS = (3, 5, 7)  # numbers of drafted tokens tried (k + 1 <= 8 rows: quantize.GEMV_MAX_ROWS)
DEFAULT_K = 5  # SpeculativeConfig's default


def run(quick: bool = False, rounds: int = 3) -> dict:
    from chatforge import catalog
    from chatforge.chat.session import ChatModel
    from chatforge.engine import Engine, SpeculativeConfig

    try:
        label, model, tokenizer = chat_model(quick)
    except catalog.ModelUnavailable as e:
        return {"skipped": f"SmolLM2 cannot be had here: {e}"}
    text = PARAGRAPH.split(". ")[0] + "." if quick else PARAGRAPH
    chat = ChatModel(Engine(model, tokenizer))
    config = chat.defaults.replace(max_new_tokens=48 if quick else 256, temperature=0.0)
    prompt, _ = chat.prompt([{"role": "user", "content": INSTRUCTION + text}], config)
    engines = {"plain": chat.engine}
    engines.update({f"ngram k={k}": Engine(model, tokenizer, speculative=SpeculativeConfig("ngram", num_draft_tokens=k))
                    for k in DRAFTS})
    results, decode = {}, {name: [] for name in engines}

    def call(name: str):
        def go() -> None:  # the first step is the prefill; the decoding after it is timed on its own too
            state = engines[name].start(prompt, config)
            [request] = state.requests
            state.step()
            t0 = time.perf_counter()
            while not state.done:
                state.step()
            decode[name].append(time.perf_counter() - t0)
            results[name] = request.result()
        return go

    engines["plain"].generate(prompt, config.replace(max_new_tokens=4))  # warm-up (kernels, first allocations)
    rounds = 1 if quick else rounds
    times = interleaved({name: call(name) for name in engines}, rounds=rounds)
    plain = results["plain"]
    rows = {}
    for name, t in times.items():
        g = results[name]
        row = {"tokens_per_s": g.completion_tokens / median(t), "seconds": median(t), "spread": spread(t),
               "decode_tokens_per_s": (g.completion_tokens - 1) / median(decode[name]),
               "prefill_seconds": median(t) - median(decode[name]),
               "completion_tokens": g.completion_tokens, "identical_to_plain": g.token_ids == plain.token_ids}
        spec = engines[name].speculator
        if spec is not None:  # stats over every round: drafts kept, tokens per forward pass (prefills too)
            s = spec.stats
            row["acceptance"] = s.acceptance
            row["tokens_per_pass"] = rounds * g.completion_tokens / (s.passes + s.plain + rounds)
        rows[name] = row
    ratios = {}
    for key, label_ in (("tokens_per_s", ""), ("decode_tokens_per_s", " decode")):
        ratios.update({f"{name}{label_} / plain": row[key] / rows["plain"][key]
                       for name, row in rows.items() if name != "plain"})
    default = ratios[f"ngram k={DEFAULT_K} / plain"]
    identical = all(row["identical_to_plain"] for row in rows.values())
    return {"model": label, "prompt_tokens": len(prompt), "rounds": rounds, "threads": torch.get_num_threads(),
            "rows": rows, "ratios": {f"default (k={DEFAULT_K})": default, **ratios}, "identical": identical,
            "target_met": default >= 1.8 and identical, "reply": plain.text[:200]}
