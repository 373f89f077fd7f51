"""Training: one Trainer for every objective, and the entry points that set it up."""
from .objectives import CausalLM, Objective
from .pretrain import pretrain
from .schedule import lr_at
from .trainer import Trainer

__all__ = ["CausalLM", "Objective", "Trainer", "lr_at", "pretrain"]
