"""Flags from dataclasses: every ModelConfig / TrainConfig / ServeConfig field is a flag
(`--n-layer` is `n_layer`), so the command line and the Python API never drift."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, NoReturn, Optional, Sequence


class Parser(argparse.ArgumentParser):
    """argparse with chatforge's error style: a mistake in the flags is one line on stderr,
    `chatforge VERB: error: WHAT; see chatforge VERB --help`, and exit status 2, rather than the
    whole usage block before it (which buries the one line that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def json_value(text: str) -> Any:
    """A flag's JSON value (e.g. --rope-scaling '{"rope_type": "linear", "factor": 2}')."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise argparse.ArgumentTypeError(f"not valid JSON: {text[:80]!r}") from None


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
    if typing.get_origin(hint) is dict:  # e.g. --rope-scaling '{"rope_type": "linear", "factor": 2}'
        return json_value, {}
    return hint, {}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                        keep_defaults: bool = True, title: Optional[str] = None,
                        help: Optional[dict[str, str]] = None) -> None:
    """One `--field-name` flag per field; with keep_defaults=False every default is None (= not given).
    `help` maps field names to their one-line help."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ, extra = _flag_type(hints[f.name])
        default = f.default if (keep_defaults and f.default is not dataclasses.MISSING) else None
        kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=(help or {}).get(f.name), **extra)
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


def sampling_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
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
