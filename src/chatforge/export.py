"""`chatforge export`: write a model as a Hugging Face directory or as a chatforge checkpoint.

`--format hf` gives a directory that transformers' AutoModelForCausalLM / AutoTokenizer load (and
vLLM or TGI serve); `--format chatforge` turns anything `load` reads (a Hugging Face model, say)
into a chatforge checkpoint, optionally in another dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from chatforge.errors import ChatforgeError

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
        from chatforge.formats.hf.export import export_hf

        return export_hf(loaded, out, tokenizer=tokenizer, dtype=dtype)
    from chatforge.formats.checkpoint import save_checkpoint

    return save_checkpoint(out, loaded, tokenizer)
