"""One loader for every model a user can name: the built-in demo, a chatforge checkpoint
directory, or (through chatforge.formats.hf) a Hugging Face directory or Hub id."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from chatforge.formats.checkpoint import CONFIG, is_checkpoint, load_checkpoint, resolve
from chatforge.errors import ChatforgeError, CheckpointError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import pick_device

DEMO_MODEL = "chatforge-demo"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def demo_model_path() -> Path:
    return Path(__file__).resolve().parent / "demo"


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ChatforgeError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPES[dtype]


def load(name_or_path: Optional[str] = None, device: str | torch.device = "auto",
         dtype: Optional[str | torch.dtype] = None, quantize: Optional[str] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer for a name or path; the demo model when none is given.

    quantize="int8" or "int4": weight-only inference (chatforge.quantize), about 1/4 or 1/7 of the
    fp32 weight memory; `dtype` is then the activations' dtype (default bf16 where the hardware has it). A
    chatforge checkpoint is quantized while it is read, so its full-precision model never exists.
    """
    from chatforge.quantize import check_mode

    quantize = check_mode(quantize)
    device = pick_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype)
    name = name_or_path or DEMO_MODEL
    if name == DEMO_MODEL:
        path = demo_model_path()
        if not is_checkpoint(path):
            raise ChatforgeError(f"the built-in demo model is missing from this installation ({path}); "
                                 "reinstall chatforge or rebuild it with recipes/demo_model.sh")
        return load_checkpoint(path, device=device, dtype=dtype, quantize=quantize)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; --model needs a checkpoint directory or a model name")
        if is_checkpoint(path) and _is_chatforge(path):
            return load_checkpoint(path, device=device, dtype=dtype, quantize=quantize)
        if (path / CONFIG).is_file():
            from chatforge.formats.hf import load_hf  # a Hugging Face directory

            return _quantized(load_hf, path, device, dtype, quantize)
        if not is_checkpoint(path):
            raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json "
                                  "(train one with `chatforge pretrain`, or point at a model directory)")
    if name.startswith(("/", ".", "~")) or "\\" in name:
        raise CheckpointError(f"no model at {path}: the path does not exist")
    try:
        from chatforge.formats.hf import load_hf_id
    except ImportError:
        load_hf_id = None
    if load_hf_id is not None and "/" in name and not name.startswith((".", "/", "~")):
        return _quantized(load_hf_id, name, device, dtype, quantize)
    raise ChatforgeError(f"unknown model {name!r}: not a directory, not a Hugging Face id (owner/name), "
                         f"and not the built-in {DEMO_MODEL!r}")


def _quantized(loader, source, device: torch.device, dtype: Optional[torch.dtype],
               quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face model loaded, then (with `quantize`) quantized in place; it is loaded in the
    activation dtype first, which for bf16 halves the peak memory."""
    if quantize is None:
        return loader(source, device=device, dtype=dtype)
    from chatforge.quantize import default_dtype, quantize_model

    dtype = dtype or default_dtype(device)
    model, tok = loader(source, device=device, dtype=dtype)
    return quantize_model(model, quantize, dtype=dtype), tok


def _is_chatforge(path: Path) -> bool:
    import json

    try:
        return json.loads((resolve(path) / CONFIG).read_text()).get("model_type", "chatforge") == "chatforge"
    except (OSError, json.JSONDecodeError):
        return True  # let the checkpoint loader report the corruption
