"""LoRA adapter directories: adapter_config.json (PEFT's key names) + adapter_model.safetensors.

Part of formats/, the layer that knows file layouts: it reads and writes the settings and the
low-rank tensors, and knows nothing of LoRA layers (it does not import chatforge.lora). Putting
adapters on a model is chatforge.lora's job; `chatforge.loader.load_adapter` and
`chatforge.export.save_adapter` join the two.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file

from chatforge.errors import CheckpointError
from chatforge.formats.checkpoint import read_weights
from chatforge.utils import atomic_directory, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter(directory: str | Path, settings: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                  layers: list[str], base_model: Optional[str] = None) -> Path:
    """Write an adapter directory atomically; returns its path.

    settings: LoRAConfig's fields (rank, alpha, dropout, targets); tensors: the low-rank tensors
    alone; layers: the adapted layers' names (recorded for people reading the file).
    """
    with atomic_directory(directory) as tmp:
        meta = {"peft_type": "LORA", "r": settings["rank"], "lora_alpha": settings["alpha"],
                "lora_dropout": settings["dropout"], "target_modules": settings["targets"],
                "base_model_name_or_path": base_model, "layers": sorted(layers)}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
    return Path(directory)


def read_adapter_settings(directory: str | Path) -> dict[str, Any]:
    """LoRAConfig's fields (rank, alpha, dropout, targets) as an adapter directory records them."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory")
    meta = read_json(path, CheckpointError, obj=True)
    try:
        return {"rank": meta["r"], "alpha": meta["lora_alpha"], "dropout": meta.get("lora_dropout", 0.0),
                "targets": meta["target_modules"]}
    except KeyError as e:
        raise CheckpointError(f"{path} is not a valid adapter config ({type(e).__name__}: {e})") from None


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The low-rank tensors of an adapter directory, by their state-dict names."""
    return read_weights(Path(directory) / ADAPTER_WEIGHTS)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "write_adapter", "read_adapter_settings", "read_adapter_tensors"]
