"""`chatforge export`: write a model as a Hugging Face directory or as a chatforge checkpoint."""
from __future__ import annotations

import argparse
import json

from chatforge.export import FORMATS, export


def cmd_export(args: argparse.Namespace) -> int:
    path = export(args.model, args.out, args.format, args.dtype)
    if args.format == "hf":  # the class config.json names: a causal LM, or an encoder's (BertForMaskedLM, ...)
        architecture = json.loads((path / "config.json").read_text())["architectures"][0]
        causal = "CausalLM" in architecture or "LMHead" in architecture
        hint = f"load it with transformers.{'AutoModelForCausalLM' if causal else architecture}.from_pretrained"
    else:
        hint = "chat with it: chatforge chat --model " + str(path)
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
