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
    from chatforge.cli.args import Parser

    parser = Parser(prog="chatforge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in VERB_MODULES:  # each area adds its own verbs: `register(sub)` in its cli module
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named after the verb they were given to, in the verb's one-line style
        prog = f"chatforge {args.command}" if getattr(args, "command", None) else "chatforge"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)}; see `{prog} --help`\n")
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
        message = " ".join(str(e).split())  # one line, whatever a message quoted
        print(f"chatforge {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"chatforge {args.command}: error: out of memory; use a smaller model, batch or block size",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the machine's side (a full disk, a path it may not write): not a bug to trace
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"chatforge {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
