"""The `chatforge` command: parse flags, call one library function, print.

Every model and training flag is a ModelConfig / TrainConfig field (`--n-layer` is
`n_layer`), generated from the dataclasses so the CLI and the Python API never drift.
A ChatforgeError is printed on one line and exits with status 2; anything else is a bug.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from typing import Any, Optional, Sequence

from .errors import ChatforgeError

# --- dataclass fields -> flags -------------------------------------------------------------


def _flag_type(hint: Any) -> tuple[Any, dict]:
    """argparse type and extra kwargs for a dataclass field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        (inner,) = typing.get_args(hint)
        return inner, {"nargs": "+"}
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return hint, {}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                        keep_defaults: bool = True, title: Optional[str] = None) -> None:
    """One `--field-name` flag per field; with keep_defaults=False every default is None (= not given)."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, extra = _flag_type(hints[f.name])
        default = f.default if (keep_defaults and f.default is not dataclasses.MISSING) else None
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, **extra)
        if typ is not None:
            kwargs["type"] = typ
            kwargs["metavar"] = f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Optional[dict] = None) -> Any:
    """Build `cls` from `base` overridden by every flag the user actually gave."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


# modules that define `register(subparsers)` to add their verbs (imported when the parser is built)
VERB_MODULES: list[str] = ["chatforge.train.cli", "chatforge.export", "chatforge.server.cli", "chatforge.explain.cli"]

# --- verbs --------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import generate_text

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ChatforgeError("no prompt: pass --prompt TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    generate_text(args.model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  seed=args.seed, device=args.device, dtype=args.dtype,
                  quantize=args.quantize)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.repl import run_chat

    options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                            "repetition_penalty", "seed")}
    return run_chat(args.model, prompt=args.prompt, system=args.system, device=args.device, dtype=args.dtype,
                    quantize=args.quantize, **options)


def _sampling_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Sampling options shared by generate and chat (None = the model's chat defaults)."""
    p.add_argument("--max-new-tokens", type=int, default=200 if defaults else None)
    p.add_argument("--temperature", type=float, default=0.8 if defaults else None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0 if defaults else None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the checkpoint's own; bf16 on CUDA)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only linear layers: int8 (~1/4 of the fp32 weight memory) or int4 "
                        "(~1/7, fastest batch-1 decoding on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt with a model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default=None, help="text to continue (default: stdin)")
    _sampling_flags(p, defaults=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (the demo model by default)")
    p.add_argument("--model", default=None, help="checkpoint directory, Hugging Face id, or chatforge-demo")
    p.add_argument("--prompt", default=None, help="one message: print the reply and exit (for scripts)")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(p, defaults=False)
    p.set_defaults(func=cmd_chat)

    for module in VERB_MODULES:  # each area adds its own verbs: `register(sub)` in its cli module
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"chatforge {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ChatforgeError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
