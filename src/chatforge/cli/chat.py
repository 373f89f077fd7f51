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
                  quantize=args.quantize, speculative=speculative_option(args))
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from chatforge.cli.repl import run_chat

    options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                            "repetition_penalty", "seed")}
    if args.json_schema is not None:  # checked before any model loads: a bad file fails at once
        options["json_schema"] = read_json_schema(args.json_schema)
    return run_chat(args.model, prompt=args.prompt, system=args.system, device=args.device, dtype=args.dtype,
                    quantize=args.quantize, speculative=speculative_option(args), **options)


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


def speculative_flags(p: argparse.ArgumentParser) -> None:
    """--speculative and --num-draft-tokens (engine/speculative.py)."""
    p.add_argument("--speculative", default=None, metavar="ngram|MODEL",
                   help="speculative decoding: ngram (drafts copied from the prompt and reply) or a draft model "
                        "sharing the tokenizer; same output, several tokens per forward pass (default: off)")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="K",
                   help="tokens drafted per step with --speculative (default 5)")


def speculative_option(args: argparse.Namespace):
    """The Engine's `speculative` argument from the flags (None = off); a ConfigError for bad values."""
    if args.speculative is None:
        if args.num_draft_tokens is not None:
            raise ChatforgeError("--num-draft-tokens needs --speculative ngram (or a draft model)")
        return None
    from chatforge.engine import SpeculativeConfig

    extra = {} if args.num_draft_tokens is None else {"num_draft_tokens": args.num_draft_tokens}
    return SpeculativeConfig(draft=args.speculative, **extra)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the generate and chat verbs to the `chatforge` parser."""
    p = sub.add_parser("generate", help="continue a prompt with a model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint or Hugging Face directory or id, catalogue name, "
                                                  "GGUF file, or ollama:NAME[:TAG]")
    p.add_argument("--prompt", default=None, help="text to continue (default: stdin)")
    sampling_flags(p, defaults=True)
    speculative_flags(p)
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
    speculative_flags(p)
    p.set_defaults(func=cmd_chat)
