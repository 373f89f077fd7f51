"""`chatforge export`: write a model as a Hugging Face directory or as a chatforge checkpoint.

`--format hf` gives a directory that transformers' AutoModelForCausalLM / AutoTokenizer load (and
vLLM or TGI serve); `--format chatforge` turns anything `load` reads (a Hugging Face model, say)
into a chatforge checkpoint, optionally in another dtype.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .errors import ChatforgeError

FORMATS = ("hf", "chatforge")


def export(model: Optional[str], out_dir: str | Path, fmt: str = "hf", dtype: Optional[str] = None) -> Path:
    """Write `model` (anything `chatforge.load` accepts) to `out_dir` in format `fmt`; returns the path."""
    if fmt not in FORMATS:
        raise ChatforgeError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChatforgeError(f"{out} already exists and is not empty; choose another output directory")
    from .loader import load

    loaded, tokenizer = load(model, device="cpu", dtype=dtype)
    if fmt == "hf":
        from .hf.export import export_hf

        return export_hf(loaded, out, tokenizer=tokenizer, dtype=dtype)
    from .checkpoint import save_checkpoint

    return save_checkpoint(out, loaded, tokenizer)


def cmd_export(args: argparse.Namespace) -> int:
    path = export(args.model, args.out, args.format, args.dtype)
    hint = ("load it with transformers.AutoModelForCausalLM.from_pretrained" if args.format == "hf"
            else "chat with it: chatforge chat --model " + str(path))
    print(f"wrote {path} ({args.format}); {hint}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the export verb to the `chatforge` parser."""
    p = sub.add_parser("export", help="write a model as a Hugging Face directory (or a chatforge checkpoint)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    p.add_argument("--model", default=None, help="checkpoint dir, Hugging Face dir/id or chatforge-demo "
                                                 "(default: the demo model)")
    p.add_argument("--format", choices=FORMATS, default="hf")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model's own)")
    p.set_defaults(func=cmd_export)
