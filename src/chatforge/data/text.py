"""Plain text for encoders: sentences, documents, and the id sequences an encoder reads.

    docs = read_documents(["corpus.txt"])                   # [["A sentence.", "Another."], [...], ...]
    train, val = split_documents(docs, 0.05, seed=1337)     # a seeded hold-out of whole documents
    ids, segments = pair_layout(a_ids, b_ids, cls, sep)     # [CLS] A [SEP] B [SEP], segment ids 0.. 1..
    batch = pad_batch([ids, other_ids], pad_id)             # (B, T) right-padded

Input is either BERT's format, one sentence per line with blank lines between documents,
or plain prose, which a small regular expression splits into sentences (its blank-line
separated paragraphs are then the documents). `sentences="auto"` tells them apart per
file by how many lines end like a sentence. Training (masked-LM, classification) and
inference (fill-mask, text-classification) both lay inputs out with the helpers here, so
a model reads the same layout it was trained on.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import numpy as np
import torch

from chatforge.data.shards import find_inputs
from chatforge.errors import ConfigError, DataError

SENTENCE_MODES = ("auto", "lines", "prose")
DOC_MAX_SENTENCES = 200  # longer documents are cut, so a file without blank lines still has several
IGNORE_INDEX = -100  # label of positions that carry no loss (Hugging Face convention)

T = TypeVar("T")


# --- text -> documents of sentences --------------------------------------------------------

_SENTENCE_END = re.compile(r"([.!?]+[\"'\u2019\u201d)\]]*)\s+(?=[\"'\u2018\u201c(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "mt", "no", "vol", "fig",
                  "e.g", "i.e", "cf", "co", "inc", "ltd"}
_LINE_END = re.compile(r"[.!?:;\"'\u2019\u201d)\]]$")


def split_sentences(text: str) -> list[str]:
    """Sentences of a prose passage: cut after . ! or ? (and closing quotes) before a capital or digit.

    A deliberately small rule: it keeps "Mr. Smith" and initials such as "J. R. R." together
    and otherwise trusts the punctuation. Whitespace inside a sentence becomes single spaces.
    """
    text = " ".join(text.split())
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        word = text[start:m.start(1)].rsplit(" ", 1)[-1]
        if m.group(1) == "." and (word.lower().rstrip(".") in _ABBREVIATIONS or (len(word) == 1 and word.isupper())):
            continue
        out.append(text[start:m.end(1)])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return [s for s in out if s]


def looks_like_sentence_lines(text: str) -> bool:
    """Whether most non-blank lines end like a sentence: BERT's one-sentence-per-line format."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return bool(lines) and sum(bool(_LINE_END.search(line)) for line in lines) >= 0.6 * len(lines)


def read_documents(files: Sequence[str | Path], sentences: str = "auto") -> list[list[str]]:
    """Documents (lists of sentences) of text files: blank lines and file ends separate documents."""
    if sentences not in SENTENCE_MODES:
        raise ConfigError(f"sentences must be one of {', '.join(SENTENCE_MODES)}, got {sentences!r}")
    docs: list[list[str]] = []
    for path in find_inputs(files):
        text = Path(path).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        as_lines = sentences == "lines" or (sentences == "auto" and looks_like_sentence_lines(text))
        for block in re.split(r"\n[ \t]*\n", text):
            if as_lines:
                doc = [" ".join(line.split()) for line in block.splitlines() if line.strip()]
            else:
                doc = split_sentences(block)
            for i in range(0, len(doc), DOC_MAX_SENTENCES):
                docs.append(doc[i:i + DOC_MAX_SENTENCES])
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"no sentences in {', '.join(map(str, files))}: the input holds only whitespace")
    return docs


def running_text(text: str) -> str:
    """How an encoder sees every sentence and input: after a space, as inside running text, so that
    consecutive sentences join naturally and a text's first word is tokenized like any other word."""
    return " " + text.lstrip()


def split_documents(docs: list[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, val) documents: a seeded random `val_fraction` of them (at least one) for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(docs) < 2:
        raise DataError("the input has a single document, too little to hold some out for validation; "
                        "add text, or separate documents with blank lines")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val = set(order[:n_val].tolist())
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# --- id sequences an encoder reads ----------------------------------------------------------------

def truncate_pair(a: list[int], b: list[int], max_tokens: int,
                  rng: Optional[np.random.Generator] = None) -> tuple[list[int], list[int]]:
    """BERT's rule: while the pair is too long, drop one token from the longer side (B on a tie),
    from its end, or with `rng` from its front or end at random."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng is not None and rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def pair_layout(a: Sequence[int], b: Optional[Sequence[int]], cls: int, sep: int) -> tuple[list[int], list[int]]:
    """`[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`) and its segment ids: 0 up to the first [SEP], then 1."""
    ids = [cls, *a, sep]
    segments = [0] * len(ids)
    if b is not None:
        ids += [*b, sep]
        segments += [1] * (len(b) + 1)
    return ids, segments


def pad_batch(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Right-pad lists of ids to the longest into a (B, T) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out


__all__ = ["IGNORE_INDEX", "read_documents", "split_sentences", "looks_like_sentence_lines", "running_text",
           "split_documents", "truncate_pair", "pair_layout", "pad_batch"]
