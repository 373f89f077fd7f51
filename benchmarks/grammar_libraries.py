"""Why llguidance: the grammar libraries compared on SmolLM2's 49k-token vocabulary, on one CPU core.

    pip install llguidance xgrammar outlines-core   # those not installed are skipped
    python -m benchmarks.grammar_libraries

For each library and each of SCHEMAS: the time to compile the schema for the vocabulary, then a walk of
up to 200 tokens where each step computes the mask of allowed tokens and takes a random allowed token
that is not only whitespace (the same seed for every library), stopping once the end may come. The
figures are per step (mask + advance); the walk's text is then checked against the schema (jsonschema).
A library that refuses a schema says so; one that accepts it but lets through text the schema rejects
is worse than one that refuses. The results, and the choice they led to, are in
benchmarks/notes/grammar_libraries.md.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from typing import Callable, Optional

import numpy as np

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                                              "ok": {"type": "boolean"}},
             "required": ["name", "age", "ok"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 17}},
                   "required": ["n"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
                      "required": ["x"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"], "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"k": {"type": "boolean"}},
                                                 "required": ["k"], "additionalProperties": False}]},
    "refs": {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                             "additionalProperties": False}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
             "additionalProperties": False},
    "recursive": {"$defs": {"N": {"type": "object", "additionalProperties": False, "required": ["v"], "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/N"}, "maxItems": 2}}}},
        "$ref": "#/$defs/N"},
    "date_time": {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"}}, "required": ["d"],
                  "additionalProperties": False},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "unique_items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3},
    "any_object": {"type": "object"},
}
STEPS = 200


class Walk:
    """One library's view: compile(schema) -> state; allowed(state) -> token ids; advance(state, token)."""

    name = ""

    def compile(self, schema: dict):
        raise NotImplementedError

    def allowed(self, state) -> np.ndarray:
        raise NotImplementedError

    def advance(self, state, token: int) -> None:
        raise NotImplementedError


def _bits(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])


class LLGuidance(Walk):
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance

        self.llg, self.vocab = llguidance, tokenizer.vocab_size
        self.tok = llguidance.LLTokenizer(tokenizer.hf.to_str(), eos_token=tokenizer.eos_id)
        self.mask = np.zeros((self.vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict):
        matcher = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema)),
                                     log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def allowed(self, state) -> np.ndarray:
        state.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        return _bits(self.mask, self.vocab)

    def advance(self, state, token: int) -> None:
        state.consume_token(token)


class XGrammar(Walk):
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr, self.vocab = xgrammar, tokenizer.vocab_size
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, eos_token=tokenizer.special["eos"])
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab, stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.mask = xgrammar.allocate_token_bitmask(1, self.vocab)

    def compile(self, schema: dict):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False))

    def allowed(self, state) -> np.ndarray:
        state.fill_next_token_bitmask(self.mask)
        return _bits(self.mask.numpy()[0], self.vocab)

    def advance(self, state, token: int) -> None:
        state.accept_token(token)


class OutlinesCore(Walk):
    name = "outlines-core"

    def __init__(self, tokenizer) -> None:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide, self.Index, self.regex = Guide, Index, build_regex_from_schema
        vocab: dict[bytes, list[int]] = {}
        for i in range(tokenizer.vocab_size):
            if i not in tokenizer.special_ids:
                vocab.setdefault(tokenizer.token_bytes(i), []).append(i)
        self.vocabulary = Vocabulary(tokenizer.eos_id, vocab)

    def compile(self, schema: dict):
        return self.Guide(self.Index(self.regex(json.dumps(schema)), self.vocabulary))

    def allowed(self, state) -> np.ndarray:
        return np.array(state.get_tokens())

    def advance(self, state, token: int) -> None:
        state.advance(token)


def walk(lib: Walk, schema: dict, tokenizer, blank: np.ndarray) -> dict:
    """Compile, then walk; the figures and whether the text validates."""
    import jsonschema

    t0 = time.perf_counter()
    try:
        state = lib.compile(schema)
    except Exception as e:  # each library has its own error types
        return {"refused": " ".join(str(e).split())[:100]}
    compile_ms = (time.perf_counter() - t0) * 1000
    rng, steps, out = random.Random(0), [], []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        allowed = lib.allowed(state)
        if not len(allowed) or tokenizer.eos_id in set(allowed.tolist()):
            steps.append(time.perf_counter() - t0)
            break
        words = allowed[~blank[allowed]]
        token = int((words if len(words) else allowed)[rng.randrange(len(words) if len(words) else len(allowed))])
        lib.advance(state, token)
        steps.append(time.perf_counter() - t0)
        out.append(token)
    text = tokenizer.decode(out)
    try:
        jsonschema.validate(json.loads(text), schema)
        valid: Optional[str] = "valid"
    except Exception:
        valid = "INVALID: " + text[:60]
    return {"compile_ms": compile_ms, "median_us": statistics.median(steps) * 1e6,
            "mean_us": statistics.mean(steps) * 1e6, "max_us": max(steps) * 1e6, "steps": len(steps), "valid": valid}


def main() -> None:
    import torch

    from chatforge import catalog
    from chatforge.loader import load

    torch.set_num_threads(1)
    _, tokenizer = load(str(catalog.pull("smollm2", progress=False)), device="cpu")
    blank = np.array([not tokenizer.decode([i]).strip() for i in range(tokenizer.vocab_size)])
    makers: list[Callable] = [LLGuidance, XGrammar, OutlinesCore]
    for make in makers:
        try:
            t0 = time.perf_counter()
            lib = make(tokenizer)
        except ImportError as e:
            print(f"{make.name}: not installed ({e})")
            continue
        print(f"{lib.name}: reading the vocabulary {time.perf_counter() - t0:.2f} s")
        for name, schema in SCHEMAS.items():
            r = walk(lib, schema, tokenizer, blank)
            if "refused" in r:
                print(f"  {name:13s} refused: {r['refused']}")
            else:
                print(f"  {name:13s} compile {r['compile_ms']:8.1f} ms | per step median {r['median_us']:6.0f} us, "
                      f"mean {r['mean_us']:6.0f} us, max {r['max_us']:7.0f} us over {r['steps']:3d} | {r['valid']}")


if __name__ == "__main__":
    main()
