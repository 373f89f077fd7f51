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
from typing import Any, Optional

from chatforge.errors import ConfigError


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, numbers.Integral):
                self.stop_token_ids = [self.stop_token_ids]
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Refuse values that make no sense: a GenerationConfigError naming the field and the allowed range.

        The rules are Hugging Face's: temperature has no upper bound here (an API may declare one).
        """
        checks = [
            ("max_new_tokens", "must be a positive integer", self.max_new_tokens,
             _is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
            ("temperature", "must be >= 0 (0 = greedy)", self.temperature,
             _is_real(self.temperature) and self.temperature >= 0),
            ("top_k", "must be a positive integer or None (off)", self.top_k,
             self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0)),
            ("top_p", "must be in (0, 1] (1 = off)", self.top_p, _is_real(self.top_p) and 0 < self.top_p <= 1),
            ("min_p", "must be in [0, 1] (0 = off)", self.min_p, _is_real(self.min_p) and 0 <= self.min_p <= 1),
            ("repetition_penalty", "must be > 0 (1 = off)", self.repetition_penalty,
             _is_real(self.repetition_penalty) and self.repetition_penalty > 0),
            ("seed", "must be an integer or None", self.seed, self.seed is None or _is_int(self.seed)),
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
