"""LoRA: fine-tune a few low-rank matrices beside frozen weights, then fold them in.

    targets = apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["qkv", "proj"]))
    ...train: only the lora_A / lora_B tensors have requires_grad...
    merge_lora(model)          # W <- W + (alpha / rank) * B @ A; the model is a plain Transformer again

A targeted nn.Linear computes  y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T,  with A
(rank x in) random and B (out x rank) zero, so training starts from exactly the base model
(Hu et al., 2021). The adapted layer keeps its own `weight` and `bias` tensors under their
old names, so a LoRA model's state dict is the base model's plus `*.lora_A` / `*.lora_B`.

Targets are module names: "qkv" (attention in-projection), "proj" (every output projection,
attention's and the MLP's), "fc" (the MLP's first layer); a dotted suffix such as
"attn.proj" or "mlp.proj" picks one kind, and a full name like "blocks.0.attn.qkv" one layer.

Model surgery only: no file is read or written here. Adapter directories are
chatforge.formats.adapter's; `chatforge.export.save_adapter` and `chatforge.loader.load_adapter`
join the two. This module sits below formats/ and the loader, beside chatforge.quantize.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import check_field_types
from chatforge.errors import CheckpointError, ConfigError

MAX_RANK = 4096  # far above any useful rank (8-256), and a bound on what adapters may allocate


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])

    def __post_init__(self) -> None:
        if isinstance(self.targets, (str, tuple)):
            self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        try:
            check_field_types(self)
        except ConfigError as e:
            raise ConfigError(f"lora_{e}") from None
        if not 0 < self.rank <= MAX_RANK:
            raise ConfigError(f"lora_rank must be a positive integer no larger than {MAX_RANK}, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("lora_targets is empty: name the layers to adapt, e.g. qkv proj")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias adopted, not copied) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to `weight`: (alpha / rank) * B @ A."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return F.linear(x, self.weight, self.bias) + update

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding weight + delta (the same tensors, updated in place)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        with torch.no_grad():
            self.weight += self.delta().to(self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules that the targets pick (the tied output head never)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    chosen = [n for n in linears if any(_matches(n, t) for t in targets)]
    unknown = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unknown:
        kinds = sorted({n.split(".")[-1] for n in linears} | {".".join(n.split(".")[-2:]) for n in linears})
        raise ConfigError(f"LoRA target(s) {', '.join(unknown)} match no linear layer of this model; "
                          f"choose from: {', '.join(kinds)}")
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every weight of `model` and add adapters to the target layers; returns their names."""
    names = target_names(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        base = getattr(holder, child)
        if isinstance(base, LoRALinear):
            raise ConfigError(f"{name} already has a LoRA adapter; merge it first")
        setattr(holder, child, LoRALinear(base, config.rank, config.alpha, config.dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_key(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model is a plain one again (all weights trainable)."""
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (what an adapter directory holds)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_lora_key(k)}


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of a LoRA model's state dict."""
    return ({k: v for k, v in state.items() if not is_lora_key(k)},
            {k: v for k, v in state.items() if is_lora_key(k)})


def load_lora_state(model: nn.Module, adapters: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into a model that already has adapters on the same layers."""
    expected = {k for k in model.state_dict() if is_lora_key(k)}
    if set(adapters) != expected:
        missing, extra = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise CheckpointError(f"{source} does not fit this model's LoRA layers "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(adapters, strict=False)


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "lora_layers", "lora_state_dict", "split_state",
           "load_lora_state", "is_lora_key"]
