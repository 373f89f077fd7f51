"""GenerationConfig: how many tokens, how random, and when to stop.

Field names and meanings follow Hugging Face `generate()` so users can bring what they
know; every interface (CLI, chat, pipeline, server) fills one of these and hands it to
the Engine.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from chatforge.errors import ConfigError


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
        """Refuse values that make no sense, naming the field and the allowed range."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ConfigError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty text, got {s!r}")
        for i in self.stop_token_ids or []:
            if not _is_int(i) or i < 0:
                raise ConfigError(f"stop_token_ids must be non-negative token ids, got {i!r}")

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
