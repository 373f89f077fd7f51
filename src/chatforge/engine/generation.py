"""GenerationConfig: how many tokens, how random, and when to stop.

Field names and meanings follow Hugging Face `generate()` so users can bring what they
know; every interface (CLI, chat, pipeline, server) fills one of these and hands it to
the Engine. It is the one place generation settings are checked: a value out of range is
a GenerationConfigError naming the field, which the CLI prints on one line and the server
answers with a 400 whose `param` is the request's name for that field.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from chatforge.errors import ConfigError


INT64_MAX = 2**63 - 1  # the engine keeps top_k and lengths in int64 tensors
# torch seeds a generator with any 64-bit value, signed or not (-1 and 2**64 - 1 are the same seed)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def derived_seed(seed: int, offset: int) -> int:
    """The seed of sample `offset` of a seeded request (choice i of n): seed + offset, wrapped to 64 bits."""
    return (seed + offset) % 2**64 if offset else seed


MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


class GenerationConfigError(ConfigError):
    """A generation setting out of range: `field` names it, `rule` says what is allowed."""

    def __init__(self, field: str, rule: str, value: Any) -> None:
        self.field, self.rule, self.value = field, rule, value
        super().__init__(self.message(field))

    def message(self, name: str) -> str:
        """The error worded for an interface that calls the field `name` (the server's max_tokens, say)."""
        return f"{name} {self.rule}, got {self.value!r}"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256  # clipped to the room left in the model's context
    temperature: float = 1.0  # 0 = greedy (always the most likely token)
    top_k: Optional[int] = None  # keep the k most likely tokens; None or 0 = off
    top_p: float = 1.0  # nucleus: the fewest tokens whose probabilities add up to top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style penalty on tokens already in prompt or output; 1 = off
    seed: Optional[int] = None  # reproducible sampling, independent of other requests in the batch
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: Optional[list[int]] = None  # None = the tokenizer's eos and im_end tokens
    skip_special_tokens: bool = False  # leave special tokens out of the text
    # OpenAI's penalties on tokens this reply already has (its prompt does not count), in [-2, 2]; 0 = off:
    frequency_penalty: float = 0.0  # minus count x this from a token's logit: fewer verbatim repeats
    presence_penalty: float = 0.0  # minus this once a token has appeared at all: new topics
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit, in [-100, 100]; -100 bans
    logprobs: Optional[int] = None  # record each new token's log-probability and the k most likely (0-20)
    prompt_logprobs: Optional[int] = None  # the same for the prompt's tokens (the first has none)
    # structured output (engine/grammar.py): a token mask keeps the reply inside a grammar
    json_schema: Union[dict, bool, None] = None  # a JSON Schema the reply must match; True = any JSON object
    grammar: Optional[str] = None  # a Lark grammar (llguidance's dialect); wins over json_schema

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, numbers.Integral):
                self.stop_token_ids = [self.stop_token_ids]
            self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias)
        self.validate()

    def validate(self) -> None:
        """Refuse values that make no sense: a GenerationConfigError naming the field and the allowed range.

        The rules are Hugging Face's: temperature has no upper bound here (an API may declare one).
        """
        checks = [
            ("max_new_tokens", "must be a positive integer below 2**63", self.max_new_tokens,
             _is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= INT64_MAX),
            ("temperature", "must be >= 0 (0 = greedy)", self.temperature,
             _is_real(self.temperature) and self.temperature >= 0),
            ("top_k", "must be a positive integer below 2**63 or None (off)", self.top_k,
             self.top_k is None or (_is_int(self.top_k) and 0 <= self.top_k <= INT64_MAX)),
            ("top_p", "must be in (0, 1] (1 = off)", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1),
            ("min_p", "must be in [0, 1] (0 = off)", self.min_p, _is_real(self.min_p) and 0 <= self.min_p <= 1),
            ("repetition_penalty", "must be > 0 (1 = off)", self.repetition_penalty,
             _is_real(self.repetition_penalty) and self.repetition_penalty > 0),
            ("seed", f"must be a 64-bit integer ({SEED_MIN} to {SEED_MAX}) or None", self.seed,
             self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX)),
        ]
        for name, rule, value, ok in checks:
            if not ok:
                raise GenerationConfigError(name, rule, value)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationConfigError("stop", "must be non-empty strings", s)
        for i in self.stop_token_ids or []:
            if not _is_int(i) or i < 0:
                raise GenerationConfigError("stop_token_ids", "must be non-negative token ids", i)
        self._validate_scoring()
        if not (self.json_schema is None or isinstance(self.json_schema, (dict, bool))):
            raise GenerationConfigError("json_schema", "must be a JSON Schema (a dict), True (any JSON object) "
                                                       "or None", self.json_schema)
        if not (self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip())):
            raise GenerationConfigError("grammar", "must be a non-empty Lark grammar or None", self.grammar)

    def _validate_scoring(self) -> None:
        """OpenAI's ranges for the penalties, logit_bias and logprobs (the engine checks the ids' vocabulary)."""
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2 <= value <= 2):
                raise GenerationConfigError(name, "must be between -2 and 2 (0 = off)", value)
        for token, bias in (self.logit_bias or {}).items():
            if not _is_int(token) or token < 0:
                raise GenerationConfigError("logit_bias", "keys must be token ids (non-negative integers)", token)
            if not (_is_real(bias) and -100 <= bias <= 100):
                raise GenerationConfigError("logit_bias", f"values must be between -100 and 100 (token {token})",
                                            bias)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_TOP_LOGPROBS):
                raise GenerationConfigError(name, f"must be an integer from 0 to {MAX_TOP_LOGPROBS} (how many of the "
                                                  "most likely tokens to list), or None (off)", value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
