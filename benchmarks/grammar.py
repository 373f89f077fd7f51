"""B7-grammar: what structured output costs per token, tokens/s with and without a JSON schema.

The same model decodes the same chat prompt greedily for exactly NEW_TOKENS tokens, at batch 1 and
batch 8, free and under a JSON schema (engine/grammar.py: llguidance computes each row's token mask
before sampling and follows every sampled token). The schema asks for a long array of records, so
the constrained reply is still going when the free one is cut at NEW_TOKENS (the free run ignores
the end-of-turn token for the same reason). tokens/s = rows x NEW_TOKENS / time of the whole call
(prefill included); runs are interleaved round by round, figures are medians. Both the wall time and
this process's CPU time are measured: on a shared machine other processes stretch the wall time of
whichever run they land on, while CPU time (run it with --threads 1) counts only the work done, so the
ratios are taken from CPU time. The grammar's own cost is also measured alone: the masks and matcher
steps of the constrained replies replayed without the model, in ms per decoding step.

Full size: SmolLM2-135M-Instruct as the default chat model is served (the catalogue's Q4_1 GGUF; 49k-token
vocabulary: the mask's cost grows with the vocabulary), skipped where it cannot be had. --quick: the
demo model, 16 tokens.
"""
from __future__ import annotations

import time
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


def grammar_ms_per_step(engine, replies: list[list[int]], schema: dict) -> float:
    """Milliseconds the grammar adds to one decoding step of len(replies) rows: each step's masks applied to
    the logits, then every row's matcher moved past its token, replayed without the model."""
    from chatforge.engine.grammar import GrammarTokenizer, apply_masks, schema_grammar

    owner = GrammarTokenizer.of(engine.tokenizer)
    matchers = [owner.matcher(schema_grammar(schema), engine.default_stop_ids) for _ in replies]
    logits = torch.zeros(len(replies), engine.model.config.vocab_size)
    steps, rows = min(len(r) for r in replies), list(range(len(replies)))
    t0 = time.perf_counter()
    for i in range(steps):
        apply_masks(logits, rows, matchers)
        for m, reply in zip(matchers, replies):
            m.advance(reply[i])
    return (time.perf_counter() - t0) / steps * 1000


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
    cpu: dict[str, list[float]] = {}
    replies: dict[int, list[list[int]]] = {}

    def call(batch: int, kind: str) -> Callable[[], None]:
        name = f"{kind} b{batch}"

        def go() -> None:
            c0 = time.process_time()
            results = chat.engine.generate([prompt] * batch, configs[kind])
            cpu.setdefault(name, []).append(time.process_time() - c0)
            counts[name] = sum(g.completion_tokens for g in results)
            if kind == "json_schema":
                replies[batch] = [g.token_ids for g in results]
        return go

    batches = (1, 8)
    runs = {f"{kind} b{b}": call(b, kind) for b in batches for kind in configs}
    times = interleaved(runs, rounds=1 if quick else rounds)
    rows = {name: {"tokens_per_s": counts[name] / median(t), "tokens_per_cpu_s": counts[name] / median(cpu[name]),
                   "seconds": median(t), "cpu_seconds": median(cpu[name]), "spread": spread(t),
                   "completion_tokens": counts[name]} for name, t in times.items()}

    def ratio(b: int, key: str) -> float:
        return rows[f"json_schema b{b}"][key] / rows[f"free b{b}"][key]

    return {"model": label, "new_tokens": new, "rounds": 1 if quick else rounds, "threads": torch.get_num_threads(),
            "rows": rows, "ratios": {f"batch {b}": ratio(b, "tokens_per_cpu_s") for b in batches},
            "wall_ratios": {f"batch {b}": ratio(b, "tokens_per_s") for b in batches},
            "grammar_ms_per_step": {f"batch {b}": grammar_ms_per_step(chat.engine, replies[b], SCHEMA)
                                    for b in batches},
            "target_met": all(ratio(b, "tokens_per_cpu_s") >= 0.85 for b in batches),
            "sample": chat.engine.tokenizer.decode(replies[1][0])[:160]}
