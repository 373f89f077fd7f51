"""The verbs that talk to a model: `chatforge generate` (continue a prompt) and `chatforge chat` (the REPL)."""
from __future__ import annotations

import argparse
import sys

from chatforge.cli.args import sampling_flags
from chatforge.errors import ChatforgeError


def cmd_generate(args: argparse.Namespace) -> int:
    from chatforge.engine import generate_text

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
    from chatforge.cli.repl import run_chat

    options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                            "repetition_penalty", "seed")}
    if args.json_schema is not None:  # checked before any model loads: a bad file fails at once
        options["json_schema"] = read_json_schema(args.json_schema)
    return run_chat(args.model, prompt=args.prompt, system=args.system, device=args.device, dtype=args.dtype,
                    quantize=args.quantize, **options)


def read_json_schema(path: str) -> dict:
    """`--json-schema FILE`: the JSON Schema every reply must match, checked for what the grammar supports."""
    import json
    from pathlib import Path

    from chatforge.engine.grammar import check_schema

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ChatforgeError(f"--json-schema: cannot read {path} ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"--json-schema: {path} is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ChatforgeError(f"--json-schema: {path} must hold a JSON object (a JSON Schema)")
    check_schema(schema)
    return schema


def register(sub: argparse._SubParsersAction) -> None:
    """Add the generate and chat verbs to the `chatforge` parser."""
    p = sub.add_parser("generate", help="continue a prompt with a model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint or Hugging Face directory or id, catalogue name, "
                                                  "GGUF file, or ollama:NAME[:TAG]")
    p.add_argument("--prompt", default=None, help="text to continue (default: stdin)")
    sampling_flags(p, defaults=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (SmolLM2 by default, pulled on first use)")
    p.add_argument("--model", default=None, help="checkpoint directory, Hugging Face id, catalogue name (smollm2), "
                                                 "GGUF file, ollama:NAME[:TAG] or chatforge-demo (default: $CHATFORGE_DEFAULT_MODEL, else smollm2, "
                                                 "falling back to chatforge-demo when it cannot be had)")
    p.add_argument("--prompt", default=None, help="one message: print the reply and exit (for scripts)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="a JSON Schema file: every reply is JSON matching it (grammar-constrained decoding)")
    sampling_flags(p, defaults=False)
    p.set_defaults(func=cmd_chat)
