"""Writing models out: `chatforge export` (a Hugging Face directory or a chatforge checkpoint),
`export_hf` for Python callers, and `save_adapter` for a LoRA run's adapters.

`--format hf` gives a directory that transformers' AutoModelForCausalLM / AutoTokenizer load (and
vLLM or TGI serve); `--format chatforge` turns anything `load` reads (a Hugging Face model, say)
into a chatforge checkpoint, optionally in another dtype. This module sits at the top of the
weights layer, beside chatforge.loader (which it uses to read a model by name) and above formats/
(whose writers it calls) and lora. Its imports happen inside the functions, so that the
`chatforge` command starts without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    import torch

    from chatforge.lora import LoRAConfig
    from chatforge.model import Transformer
    from chatforge.tokenizer import Tokenizer

FORMATS = ("hf", "chatforge")


def export(model: Optional[str], out_dir: str | Path, fmt: str = "hf", dtype: Optional[str] = None) -> Path:
    """Write `model` (anything `chatforge.load` accepts) to `out_dir` in format `fmt`; returns the path."""
    if fmt not in FORMATS:
        raise ChatforgeError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChatforgeError(f"{out} already exists and is not empty; choose another output directory")
    from chatforge.loader import load

    loaded, tokenizer = load(model, device="cpu", dtype=dtype)
    if fmt == "hf":
        return export_hf(loaded, out, tokenizer=tokenizer, dtype=dtype)
    from chatforge.formats.checkpoint import save_checkpoint

    return save_checkpoint(out, loaded, tokenizer)


def export_hf(model: str | Path | Transformer, out_dir: str | Path, tokenizer: Optional[Tokenizer] = None,
              dtype: Optional[str | torch.dtype] = None) -> Path:
    """Write `model` (a Transformer, or anything `chatforge.load` accepts) as a Hugging Face model directory.

    The directory holds config.json, generation_config.json, model.safetensors and, with a
    tokenizer, tokenizer.json + tokenizer_config.json (chat template included); dtype: the
    saved tensors' (default: the model's own).
    """
    from chatforge.formats.hf.export import write_hf
    from chatforge.utils import parse_dtype

    dtype = parse_dtype(dtype)
    if isinstance(model, (str, Path)):
        from chatforge.loader import load

        model, loaded_tok = load(str(model), device="cpu", dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    return write_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype)


def save_adapter(directory: str | Path, model: Transformer, config: LoRAConfig,
                 base_model: Optional[str] = None) -> Path:
    """Write the LoRA adapters of `model` (only the low-rank tensors) as an adapter directory
    (adapter_config.json + adapter_model.safetensors), atomically; `chatforge.loader.load_adapter` reads it."""
    from chatforge.formats.adapter import write_adapter
    from chatforge.lora import lora_layers, lora_state_dict

    return write_adapter(directory, config.to_dict(), lora_state_dict(model), layers=list(lora_layers(model)),
                         base_model=base_model)


__all__ = ["FORMATS", "export", "export_hf", "save_adapter"]
