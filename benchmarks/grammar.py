"""B7-grammar: what structured output costs per token, tokens/s with and without a JSON schema.

The same model decodes the same chat prompt greedily for exactly NEW_TOKENS tokens, at batch 1 and
batch 8, free and under a JSON schema (engine/grammar.py: llguidance computes each row's token mask
before sampling and follows every sampled token). The schema asks for a long array of records, so
the constrained reply is still going when the free one is cut at NEW_TOKENS (the free run ignores
the end-of-turn token for the same reason). tokens/s = rows x NEW_TOKENS / wall time of the whole
call (prefill included); runs are interleaved round by round, figures are medians.

Full size: SmolLM2-135M-Instruct (Q4_1 GGUF from the catalogue, 49k-token vocabulary: the mask's
cost grows with the vocabulary), skipped where it cannot be had. --quick: the demo model, 16 tokens.
"""
from __future__ import annotations

from typing import Callable

import torch

from .common import chat_model, interleaved, median, spread

NEW_TOKENS = 64
SCHEMA = {  # every reply stays inside it for far longer than NEW_TOKENS: at least 64 records
    "type": "array", "minItems": 64,
    "items": {"type": "object", "required": ["name", "age", "city", "member"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "city": {"type": "string", "maxLength": 24},
                             "member": {"type": "boolean"}}},
}
PROMPT = "List 100 people as JSON records with their name, age, city and whether they are members."


def run(quick: bool = False, rounds: int = 3) -> dict:
    from chatforge import catalog
    from chatforge.chat.session import ChatModel
    from chatforge.engine import Engine

    try:
        label, model, tokenizer = chat_model(quick)
    except catalog.ModelUnavailable as e:
        return {"skipped": f"SmolLM2 cannot be had here: {e}"}
    chat = ChatModel(Engine(model, tokenizer))
    new = 16 if quick else NEW_TOKENS
    base = chat.defaults.replace(max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    prompt, _ = chat.prompt([{"role": "user", "content": PROMPT}], base)
    configs = {"free": base, "json_schema": base.replace(json_schema=SCHEMA)}
    chat.engine.generate(prompt, configs["json_schema"])  # warm-up: llguidance reads the vocabulary once

    counts: dict[str, int] = {}

    def call(batch: int, kind: str) -> Callable[[], None]:
        def go() -> None:
            results = chat.engine.generate([prompt] * batch, configs[kind])
            counts[f"{kind} b{batch}"] = sum(g.completion_tokens for g in results)
        return go

    batches = (1, 8)
    runs = {f"{kind} b{b}": call(b, kind) for b in batches for kind in configs}
    times = interleaved(runs, rounds=1 if quick else rounds)
    rows = {name: {"tokens_per_s": counts[name] / median(t), "seconds": median(t), "spread": spread(t),
                   "completion_tokens": counts[name]} for name, t in times.items()}
    ratios = {f"batch {b}": rows[f"json_schema b{b}"]["tokens_per_s"] / rows[f"free b{b}"]["tokens_per_s"]
              for b in batches}
    sample = chat.engine.generate(prompt, configs["json_schema"])[0].text
    return {"model": label, "new_tokens": new, "rounds": 1 if quick else rounds, "threads": torch.get_num_threads(),
            "rows": rows, "ratios": ratios, "target_met": all(r >= 0.85 for r in ratios.values()),
            "sample": sample[:160]}
