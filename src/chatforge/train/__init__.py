"""Training: one Trainer for every objective, and the entry points that set it up."""
from chatforge.train.objectives import CausalLM, Objective
from chatforge.train.pretrain import pretrain
from chatforge.train.schedule import lr_at
from chatforge.train.trainer import Trainer

__all__ = ["CausalLM", "Objective", "Trainer", "lr_at", "pretrain"]
