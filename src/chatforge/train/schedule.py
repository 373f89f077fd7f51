"""Learning-rate schedule: linear warmup, then cosine or linear decay to min_lr (or constant)."""
from __future__ import annotations

import math

from chatforge.config import TrainConfig


def min_lr_of(config: TrainConfig) -> float:
    return config.lr / 10 if config.min_lr is None else config.min_lr


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `config.max_steps`."""
    lr, floor = config.lr, min_lr_of(config)
    warmup = min(config.warmup_steps, config.max_steps)
    if step < warmup:  # from lr/(warmup+1) up to lr: never exactly 0, as in nanoGPT
        return lr * (step + 1) / (warmup + 1)
    if config.schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - 1 - warmup))
    if config.schedule == "linear":
        return lr - progress * (lr - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - floor)
