"""The one loader: any model a user can name becomes (model, tokenizer) here.

    model, tok = load()                                         # the built-in demo model
    model, tok = load("runs/sft/best", dtype="bf16")            # a chatforge checkpoint directory
    model, tok = load("EleutherAI/gpt-neo-125m", quantize="int8")  # a Hugging Face directory or Hub id

Device, dtype and quantization are decided here, once, and passed down: the readers in
chatforge.formats know file layouts only, chatforge.quantize changes a model and reads no file.
This module sits at the top of the weights layer (only chatforge.export is beside it), above
formats/, quantize and lora. `load_adapter` puts a saved LoRA adapter on a loaded model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from chatforge.errors import ChatforgeError, CheckpointError
from chatforge.formats import checkpoint
from chatforge.formats.adapter import read_adapter_settings, read_adapter_tensors
from chatforge.formats.hf import read_hf, resolve_hub_id
from chatforge.lora import LoRAConfig, apply_lora, load_lora_state
from chatforge.model import Transformer
from chatforge.quantize import check_mode, default_dtype, quantize_from, quantize_model
from chatforge.tokenizer import Tokenizer
from chatforge.utils import parse_dtype, pick_device

DEMO_MODEL = "chatforge-demo"


def demo_model_path() -> Path:
    """Where the built-in demo model's checkpoint directory is installed."""
    return Path(__file__).resolve().parent / "demo"


def load(name_or_path: Optional[str | os.PathLike] = None, device: str | torch.device = "auto",
         dtype: Optional[str | torch.dtype] = None, quantize: Optional[str] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer for a name or path; the demo model when none is given.

    name_or_path: "chatforge-demo", a chatforge checkpoint directory, a Hugging Face model
    directory, or a Hub id (owner/name, from the local cache or downloaded). device: "auto"
    (CUDA > MPS > CPU), "cpu", "cuda", ... dtype: fp32, bf16, fp16 or None (as stored).
    quantize="int8" or "int4": weight-only inference (chatforge.quantize), about 1/4 or 1/7 of the
    fp32 weight memory; `dtype` is then the activations' dtype (default bf16 where the hardware has it). A
    chatforge checkpoint is quantized while it is read, so its full-precision model never exists.
    """
    quantize = check_mode(quantize)
    device = pick_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype)
    if quantize is not None:
        dtype = dtype or default_dtype(device)
    name = str(name_or_path) if name_or_path else DEMO_MODEL
    if name == DEMO_MODEL:
        path = demo_model_path()
        if not checkpoint.is_checkpoint(path):
            raise ChatforgeError(f"the built-in demo model is missing from this installation ({path}); "
                                 "reinstall chatforge or rebuild it with recipes/demo_model.sh")
        return _load_checkpoint(path, device, dtype, quantize)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; --model needs a checkpoint directory or a model name")
        return _load_directory(path, device, dtype, quantize)
    if name.startswith(("/", ".", "~")) or "\\" in name:
        raise CheckpointError(f"no model at {path}: the path does not exist")
    if "/" in name:  # a Hub id: its snapshot is a directory like any other
        return _load_directory(resolve_hub_id(name), device, dtype, quantize)
    raise ChatforgeError(f"unknown model {name!r}: not a directory, not a Hugging Face id (owner/name), "
                         f"and not the built-in {DEMO_MODEL!r}")


def load_adapter(model: Transformer, directory: str | Path) -> LoRAConfig:
    """Add the LoRA adapters saved in `directory` (chatforge.export.save_adapter) to `model`, a base
    model, and load their weights; returns the adapters' settings."""
    config = LoRAConfig(**read_adapter_settings(directory))
    apply_lora(model, config)
    load_lora_state(model, read_adapter_tensors(directory), str(directory))
    return config


def _load_directory(path: Path, device: torch.device, dtype: Optional[torch.dtype],
                    quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A model directory: a chatforge checkpoint or a Hugging Face model, told apart by config.json."""
    if not checkpoint.is_checkpoint(path):
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json "
                              "(train one with `chatforge pretrain`, or point at a model directory)")
    if _is_chatforge(path):
        return _load_checkpoint(path, device, dtype, quantize)
    return _load_hf(path, device, dtype, quantize)


def _load_checkpoint(path: Path, device: torch.device, dtype: Optional[torch.dtype],
                     quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A chatforge checkpoint directory; quantized, it is read a slab of rows at a time straight into
    int8 / int4 (plain reads: a memory map would keep every page it touched resident)."""
    if quantize is None:
        return checkpoint.read_checkpoint(path, device=device, dtype=dtype)
    directory = checkpoint.resolve(path)
    config = checkpoint.read_config(directory)
    weights = checkpoint.open_weights(directory, config)  # names and shapes checked against the config
    with checkpoint.reading(weights.path):
        model = quantize_from(checkpoint.meta_model(config), weights, quantize, dtype)
    model = model.to(device)
    return model, checkpoint.read_saved_tokenizer(directory, model.config)


def _load_hf(directory: Path, device: torch.device, dtype: Optional[torch.dtype],
             quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face directory; quantized, it is read in the activation dtype first (for bf16 that
    halves the peak memory), then quantized in place."""
    model, tok = read_hf(directory, device=device, dtype=dtype)
    if quantize is not None:
        model = quantize_model(model, quantize, dtype=dtype)
    return model, tok


def _is_chatforge(path: Path) -> bool:
    """Whether the directory holds a chatforge checkpoint rather than a Hugging Face model."""
    try:
        return checkpoint.is_chatforge_config(checkpoint.read_config_json(checkpoint.resolve(path)))
    except CheckpointError:
        return True  # let the checkpoint reader report the corruption


__all__ = ["load", "load_adapter", "DEMO_MODEL", "demo_model_path"]
