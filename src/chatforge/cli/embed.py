"""`chatforge embed`: one sentence embedding per line of a text file, written as a .npy matrix.

    chatforge embed --model all-minilm-l6-v2 --data texts.txt --out vectors.npy

Row i of the (lines, dimensions) float32 matrix is line i's vector (numpy.load reads it). Pooling and
normalisation are the model's (a sentence-transformers directory's modules.json) unless a flag says
otherwise; a line longer than the model reads is cut (--no-truncate refuses it instead).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chatforge.errors import ChatforgeError, DataError


def read_lines(path: str) -> list[str]:
    """The texts of a file, one per line; a missing, unreadable or empty file, or an empty line, is one error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p} does not exist (or is not a file); give a text file with one text per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    if not lines:
        raise DataError(f"{p} is empty: there is nothing to embed")
    blank = next((i for i, line in enumerate(lines, 1) if not line.strip()), None)
    if blank is not None:
        raise DataError(f"{p} line {blank} is empty; every line is one text (row i of the output is line i), "
                        "so remove empty lines")
    return lines


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from chatforge.pipelines.embeddings import TextTooLong, embedder
    from chatforge.utils import atomic_file

    texts = read_lines(args.data)
    out = Path(args.out).expanduser()
    if out.suffix != ".npy":
        raise ChatforgeError(f"--out {out} should end in .npy (numpy.load reads it)")
    if not out.parent.is_dir():
        raise ChatforgeError(f"the folder of --out ({out.parent}) does not exist")
    model = embedder(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                     pooling=args.pooling, normalize=args.normalize, max_length=args.max_length)
    started = time.perf_counter()
    encoded = model.encode(texts)
    cut = sum(len(ids) + model.extra > model.max_length for ids in encoded)
    try:
        rows = model.prepare(encoded, truncate=args.truncate)
    except TextTooLong as e:
        raise DataError(f"{args.data} line {e.index + 1} is {e.tokens} tokens long, but this model reads at most "
                        f"{e.limit} (special tokens included); shorten it, or leave out --no-truncate to cut it") from None
    with tqdm(total=len(texts), desc="embed", unit="text", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
        vectors = model.embed(rows, progress=bar.update)
    seconds = time.perf_counter() - started
    with atomic_file(out) as f:
        np.save(f, vectors)
    note = f"; {cut} line(s) longer than {model.max_length} tokens were cut" if cut else ""
    print(f"wrote {out}: {vectors.shape[0]} x {vectors.shape[1]} float32 (pooling {model.pooling}"
          f"{', unit length' if model.normalize else ''}) in {seconds:.1f} s, {len(texts) / seconds:.0f} texts/s{note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the embed verb to the `chatforge` parser."""
    p = sub.add_parser("embed", help="sentence embeddings of a text file (one per line) into a .npy matrix",
                       description="Embed every line of a text file with a sentence-embedding model and write the "
                                   "(lines, dimensions) float32 matrix as .npy, row i for line i.")
    p.add_argument("--model", required=True, help="an encoder: catalogue name (all-minilm-l6-v2), Hugging Face "
                                                  "directory or id, or chatforge checkpoint")
    p.add_argument("--data", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--out", required=True, help="the .npy file to write")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--pooling", choices=("cls", "mean", "max", "last"), default=None,
                   help="how token vectors become one (default: the model's)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="scale vectors to unit length (default: the model's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens, special tokens included (default: the model's)")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut lines longer than the model reads (default); --no-truncate refuses them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: the model's own)")
    p.set_defaults(func=cmd_embed)
