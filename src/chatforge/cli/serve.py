"""`chatforge serve`: the OpenAI-compatible API and the web chat page for one model.

Every flag is a ServeConfig field (`--max-batch` is `max_batch`); the API key can also come from
the CHATFORGE_API_KEY environment variable, the database path from CHATFORGE_DB.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading


def cmd_serve(args: argparse.Namespace) -> int:
    from chatforge.cli.args import dataclass_from_args
    from chatforge.server.app import serve
    from chatforge.server.settings import ServeConfig

    config = dataclass_from_args(ServeConfig, args)
    # a model (or --speculative draft model) that is not there: one line before anything is announced
    wanted = [config.model] + ([config.speculative] if config.speculative not in (None, "ngram") else [])
    if any(wanted):
        from chatforge.loader import locate

        for name in filter(None, wanted):
            locate(name)
    serve(config, announce=lambda line: print(line, flush=True))
    print("chatforge serve: stopped", file=sys.stderr, flush=True)
    if any(t.name == "chatforge-loader" and t.is_alive() for t in threading.enumerate()):
        # stopped while the model was still loading: leave at once, since tearing the interpreter
        # down under a thread that is inside torch aborts with "terminate called ..."
        sys.stdout.flush()
        os._exit(0)
    return 0


def register(sub) -> None:
    """Add the `serve` verb to the `chatforge` parser."""
    from chatforge.cli.args import add_dataclass_flags
    from chatforge.server.settings import API_KEY_ENV, DB_ENV, HELP, ServeConfig, default_db_path

    p = sub.add_parser(
        "serve", help="serve a model: OpenAI-compatible HTTP API and a web chat page",
        description=f"Serve a model (unless --model says otherwise $CHATFORGE_DEFAULT_MODEL, else smollm2, pulled "
                    f"on first use, falling back to the built-in demo model when it cannot be had) over an "
                    f"OpenAI-compatible API at /v1 and a web chat page at /. The API key may also come from "
                    f"${API_KEY_ENV}; conversations are kept in SQLite at --db (default {default_db_path()}, "
                    f"or ${DB_ENV}). Ctrl-C or SIGTERM stops it cleanly.")
    add_dataclass_flags(p, ServeConfig, keep_defaults=False, title="serve options", help=HELP)
    p.set_defaults(func=cmd_serve)
