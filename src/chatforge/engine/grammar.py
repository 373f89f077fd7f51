"""Grammar-constrained decoding: a JSON schema (or a Lark grammar) becomes a mask on the next-token logits.

    matcher = matcher_for(tokenizer, config, stop_ids)  # None unless config.json_schema / grammar is set
    logits = apply_masks(logits, rows, matchers)        # before sampling: what a row's grammar forbids is -inf
    matcher.advance(token)                              # after sampling; matcher.done once nothing may follow

The grammar library is llguidance (Microsoft's, the engine behind Guidance and vLLM/SGLang's
`guidance` backend), chosen against xgrammar and outlines-core on SmolLM2's 49k-token vocabulary
(benchmarks/grammar_libraries.py; figures in docs/benchmarks.md): llguidance and xgrammar both cost
about 0.1-0.2 ms a token; outlines-core is cheaper per token but compiles each schema for 0.1-1 s
(28 s for "any JSON object") and lets through numbers out of range. llguidance compiles a schema in
about 1 ms, reads the tokenizer.json chatforge already holds (no transformers), is one small wheel
(xgrammar pulls triton and transformers), and refuses a keyword it cannot enforce ("Unimplemented
keys: uniqueItems") where xgrammar ignores it or, for allOf, generates text the schema rejects. A
refusal is what the API needs: a 400 naming the problem rather than JSON that does not validate.

Generated JSON is compact with ", " and ": " between items (no other whitespace, so a weak model cannot
wander into endless blank space), and an object schema that lists `properties` without saying
`additionalProperties` gets no other keys (OpenAI's strict mode): output still validates against the
schema as given, and a model cannot keep inventing keys.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.engine.generation import GenerationConfig
    from chatforge.tokenizer import Tokenizer

# llguidance's JSON options: compact output, the separators people (and models) write
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
Schema = Union[dict, bool]

# keywords whose value is one subschema / a list of them / a name -> subschema map
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_MANY = ("prefixItems", "anyOf", "oneOf", "allOf")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


class GrammarError(ChatforgeError):
    """A schema or grammar the grammar library cannot compile; `param` names where it came from."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a declared dependency; only a broken install lacks it
        raise ChatforgeError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


# --- schemas and grammars ---------------------------------------------------------------------------

def closed_objects(schema: Any, _in_all_of: bool = False) -> Any:
    """A copy of `schema` in which every object schema that lists `properties` but says nothing about
    other keys allows none (OpenAI's strict mode). allOf's direct parts are left open: closing each
    would forbid the keys the others add."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = _merged_all_of(dict(schema))
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s, _in_all_of=key == "allOf") for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if (isinstance(out.get("properties"), dict) and not _in_all_of
            and not any(k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties"))):
        out["additionalProperties"] = False
    return out


_PLAIN_OBJECT = {"type", "properties", "required", "title", "description"}


def _merged_all_of(schema: dict) -> dict:
    """allOf of plain object schemas (properties and required, nothing else) as one object schema, which
    can then be closed like any other: {"allOf": [{a}, {b}]} -> {"properties": {a, b}}. The same property
    in two parts must match both (allOf of the two)."""
    parts = schema.get("allOf")
    if not (isinstance(parts, list) and parts and all(isinstance(p, dict) and set(p) <= _PLAIN_OBJECT
                                                      and p.get("type", "object") == "object" for p in parts)):
        return schema
    if not set(schema) - {"allOf"} <= _PLAIN_OBJECT | {"$defs", "definitions", "$schema", "$id"}:
        return schema
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    properties = dict(merged.get("properties") or {})
    required = list(merged.get("required") or [])
    for part in parts:
        for name, sub in (part.get("properties") or {}).items():
            properties[name] = {"allOf": [properties[name], sub]} if name in properties else sub
        required += [r for r in part.get("required") or [] if r not in required]
    merged.update(type="object", properties=properties, required=required)
    return merged


def schema_grammar(schema: Schema) -> str:
    """The llguidance grammar for a JSON schema (True: any JSON object, as OpenAI's json_object mode)."""
    if schema is True:
        schema = {"type": "object"}
    if schema is False or not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object (a JSON Schema document); false accepts nothing")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(schema)),
                                                                defaults=dict(JSON_OPTIONS))
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be used: {_one_line(e)}") from None


def check_schema(schema: Schema, param: Optional[str] = None) -> None:
    """Refuse a schema llguidance cannot compile, before any model is loaded (no tokenizer needed)."""
    error = _llguidance().LLMatcher.validate_grammar(schema_grammar(schema))
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"the JSON schema cannot be compiled: {_one_line(error)}", param)


def json_rule(schema: Schema) -> str:
    """`%json {...}`: a JSON schema as one rule of a Lark grammar (for tool calls wrapped in tags)."""
    body = closed_objects(schema if isinstance(schema, dict) else {"type": "object"})
    return "%json " + json.dumps({**body, "x-guidance": dict(JSON_OPTIONS)})


def lark_grammar(lark: str) -> str:
    """The llguidance grammar for a Lark grammar in llguidance's dialect (`%json {...}` embeds a schema)."""
    return _llguidance().LLMatcher.grammar_from_lark(lark)


def config_grammar(config: "GenerationConfig") -> Optional[str]:
    """The grammar a GenerationConfig asks for, or None when its output is free."""
    if config.grammar is not None:
        return lark_grammar(config.grammar)
    if config.json_schema is not None:
        return schema_grammar(config.json_schema)
    return None


def response_format_schema(response_format: Any, param: str = "response_format") -> Optional[Schema]:
    """OpenAI's `response_format` as GenerationConfig.json_schema: None for text, True for json_object,
    the schema for json_schema. A malformed one is a GrammarError naming its field."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError(f"{param} must be an object such as {{\"type\": \"json_object\"}}", param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return True
    if kind != "json_schema":
        raise GrammarError(f"{param}.type must be text, json_object or json_schema, got {kind!r}", f"{param}.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError(f"{param}.json_schema must be an object with a name and a schema", f"{param}.json_schema")
    schema = spec.get("schema")
    if schema is None:  # OpenAI: no schema = any JSON object
        schema = True
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{param}.json_schema.schema must be a JSON Schema object", f"{param}.json_schema.schema")
    return schema


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --- one tokenizer's view, and compiled grammars ------------------------------------------------------

class GrammarTokenizer:
    """llguidance's view of a chatforge Tokenizer (its tokenizer.json), built once per tokenizer: about 1 s
    for a 49k vocabulary. `end` is the token llguidance allows once the grammar may end; a request's own
    stop tokens take its place."""

    _cache: "weakref.WeakKeyDictionary[Tokenizer, GrammarTokenizer]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer: "Tokenizer") -> None:
        llg = _llguidance()
        ends = [tokenizer.token_id(role) for role in ("eos", "im_end", "pad")]
        self.end = next((i for i in ends if i is not None), 0)
        try:
            self.ll = llg.LLTokenizer(tokenizer.hf.to_str(), eos_token=self.end)
        except (ValueError, RuntimeError) as e:
            raise ChatforgeError(f"structured output cannot use this tokenizer: {_one_line(e)}") from None
        self.vocab = self.ll.vocab_size
        self.words = (self.vocab + 31) // 32  # int32 words of one row's bitmask
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar -> a fresh matcher to copy

    @classmethod
    def of(cls, tokenizer: "Tokenizer") -> "GrammarTokenizer":
        with cls._lock:
            found = cls._cache.get(tokenizer)
            if found is None:
                found = cls._cache[tokenizer] = cls(tokenizer)
            return found

    def matcher(self, grammar: str, stop_ids: Sequence[int] = ()) -> "Matcher":
        """A fresh Matcher at the start of `grammar`; compiled once, then copied (microseconds)."""
        llg = _llguidance()
        with self._lock:
            start = self._compiled.get(grammar)
            if start is None:
                start = llg.LLMatcher(self.ll, grammar, log_level=0)
                if start.is_error():
                    raise GrammarError(f"the JSON schema cannot be compiled: {_one_line(start.get_error())}")
                self._compiled[grammar] = start
                if len(self._compiled) > 64:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return Matcher(self, start.deep_copy(), stop_ids)


class Matcher:
    """One request's place in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, owner: GrammarTokenizer, ll: Any, stop_ids: Sequence[int]) -> None:
        self.owner, self.ll = owner, ll
        self.stop_ids = np.array(sorted(stop_ids), dtype=np.int64)

    def advance(self, token: int) -> None:
        """Move past a sampled token (never a stop token: those end the request instead)."""
        self.ll.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing may follow (the grammar is complete and admits no more), or the matcher broke."""
        return self.ll.is_stopped() or self.ll.is_error()

    @property
    def accepting(self) -> bool:
        return self.ll.is_accepting()


def matcher_for(tokenizer: "Tokenizer", config: "GenerationConfig", stop_ids: Sequence[int]) -> Optional[Matcher]:
    """The Matcher a request with this config needs (None for free text); GrammarError for a bad schema."""
    grammar = config_grammar(config)
    if grammar is None:
        return None
    return GrammarTokenizer.of(tokenizer).matcher(grammar, stop_ids)


# --- the mask -----------------------------------------------------------------------------------------------

def allowed_tokens(matchers: Sequence[Matcher]) -> np.ndarray:
    """(len(matchers), vocab) bool: the tokens each matcher allows next. The grammar's own end token is
    replaced by the row's stop tokens (allowed exactly when the grammar may end here)."""
    owner = matchers[0].owner
    bits = np.zeros((len(matchers), owner.words), dtype=np.int32)
    for k, m in enumerate(matchers):
        row = bits[k]
        m.ll.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :owner.vocab].view(np.bool_)
    may_end = allowed[:, owner.end].copy()
    allowed[:, owner.end] = False
    for k, m in enumerate(matchers):
        if m.stop_ids.size:
            allowed[k, m.stop_ids[m.stop_ids < owner.vocab]] = may_end[k]
        if not allowed[k].any():  # nothing allowed (a broken matcher): end the row if it can end, else free it
            stops = m.stop_ids[m.stop_ids < owner.vocab]
            if stops.size:
                allowed[k, stops] = True
            else:
                allowed[k] = True
    return allowed


_ADD = np.array([float("-inf"), 0.0], dtype=np.float32)  # allowed (0/1) -> what to add to the logit


def apply_masks(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[Matcher]) -> torch.Tensor:
    """`logits` (B, V) with every token the grammar of row rows[k] forbids at -inf (a new tensor; rows not
    listed are unchanged). The mask is built in numpy and added by one torch operation: a decoding step of a
    small model takes milliseconds, and each extra multi-threaded kernel over (B, V) shows."""
    allowed = allowed_tokens(matchers).view(np.uint8)
    add = np.zeros(tuple(logits.shape), dtype=np.float32)
    width = min(allowed.shape[1], logits.shape[1])
    add[list(rows), :width] = _ADD[allowed[:, :width]]
    add[list(rows), width:] = float("-inf")  # ids past the tokenizer's vocabulary decode to nothing
    if logits.device.type == "cpu" and logits.dtype == torch.float32:  # numpy: no thread pool woken for this
        return torch.from_numpy(logits.numpy() + add)
    return logits + torch.from_numpy(add).to(logits.device, logits.dtype)
