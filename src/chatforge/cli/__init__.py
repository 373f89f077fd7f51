"""The `chatforge` command: parse flags, call one library function, print.

Every model and training flag is a ModelConfig / TrainConfig field (`--n-layer` is
`n_layer`), generated from the dataclasses so the CLI and the Python API never drift.
A ChatforgeError is printed on one line and exits with status 2; anything else is a bug.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from chatforge.errors import ChatforgeError

# the modules that add the verbs, in the order `chatforge --help` lists them; each has `register(subparsers)`
VERB_MODULES: list[str] = ["chatforge.cli.chat", "chatforge.cli.models", "chatforge.cli.train", "chatforge.cli.export", "chatforge.cli.embed", "chatforge.cli.serve",
                           "chatforge.cli.explain"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in VERB_MODULES:  # each area adds its own verbs: `register(sub)` in its cli module
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from chatforge import __version__

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
