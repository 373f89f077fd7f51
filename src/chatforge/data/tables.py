"""Labelled tables: CSV, TSV or JSONL rows in, encoded classification examples out.

    examples = load_examples("sms.tsv", text_column="SMS", label_column="Label")
    names = label_names(examples.labels, "sms.tsv", "Label")            # sorted, at least two
    train, val, test = stratified_split(examples.labels, [0.1, 0.1], seed=1337)
    encoded = encode_examples(tokenizer, model.config, examples.texts, examples.pairs, max_length=128)

A TSV has no quoting (a tab ends every field); rows with an empty text or label are skipped
with a warning. The stratified split shuffles each class on its own, so every part keeps
about the data's class proportions; `split_table` writes that same split to files.
`encode_examples` lays out an example the way a classifier reads it, in training and in
the text-classification pipeline alike.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from chatforge.config import ModelConfig
from chatforge.data.shards import check_text
from chatforge.data.text import pair_layout, running_text, truncate_pair
from chatforge.errors import ConfigError, DataError
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_write_text

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".json": None, ".ndjson": None}


# --- reading labelled tables -------------------------------------------------------------------

def read_table(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a CSV, TSV (no quoting: a tab ends every field) or JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unknown table format {suffix or '(no suffix)'}; use .csv, .tsv or .jsonl")
    check_text(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line (or JSON objects) and one row per example")
    if TABLE_SUFFIXES[suffix] is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as e:
                    why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply or a number too long"
                    raise DataError(f"{path} line {n} is not valid JSON ({why})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n} is not a JSON object")
                rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:
        quoting = csv.QUOTE_NONE if TABLE_SUFFIXES[suffix] == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(text.splitlines(), delimiter=TABLE_SUFFIXES[suffix], quoting=quoting)
        try:
            columns = [c.strip() for c in next(reader)]
            rows = [dict(zip(columns, values)) for values in reader if any(v.strip() for v in values)]
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num} is not valid {suffix[1:].upper()} ({e})") from None
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return columns, rows


@dataclass
class Examples:
    """Texts (and optional second texts) with their label names, in file order."""

    texts: list[str]
    labels: list[str]
    pairs: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "Examples":
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return Examples(pick(self.texts), pick(self.labels), pick(self.pairs) if self.pairs is not None else None)


def load_examples(path: str | Path, text_column: str, label_column: str,
                  text_pair_column: Optional[str] = None) -> Examples:
    """The examples of one file; rows with an empty text or label are skipped with a warning."""
    _, kept = read_rows(path, text_column, label_column, text_pair_column)
    return Examples([_cell(r[text_column]) for r in kept], [_cell(r[label_column]) for r in kept],
                    [_cell(r[text_pair_column]) for r in kept] if text_pair_column else None)


def read_rows(path: str | Path, text_column: str, label_column: str,
              text_pair_column: Optional[str] = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of a table that has the named columns, without rows where one of them is empty."""
    columns, rows = read_table(path)
    for flag, column in (("text", text_column), ("label", label_column), ("text pair", text_pair_column)):
        if column is not None and column not in columns:
            raise DataError(f"{path} has no {flag} column {column!r}; its columns are: {', '.join(columns)}")
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    kept = [r for r in rows if all(_cell(r.get(c)) for c in wanted)]
    if len(kept) < len(rows):
        warnings.warn(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} rows with an empty "
                      f"{' or '.join(repr(c) for c in wanted)} value", stacklevel=3)
    if not kept:
        raise DataError(f"{path} has no row with a non-empty {' and '.join(repr(c) for c in wanted)}")
    return columns, kept


def _cell(value: Any) -> str:
    return "" if value is None else str(value).strip()


def label_names(labels: Sequence[str], where: str, column: str) -> list[str]:
    """The sorted distinct labels (numerically when all are integers); at least two are needed."""
    names = sorted(set(labels), key=lambda x: (0, int(x), x) if x.lstrip("-").isdigit() else (1, 0, x))
    if len(names) < 2:
        raise DataError(f"{where} has a single class in column {column!r} ({names[0]!r}); a classifier "
                        "needs examples of at least two")
    return names


# --- splits ------------------------------------------------------------------------------------------

def stratified_split(labels: Sequence[str], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices of len(fractions)+1 parts: each class is shuffled (seeded) and cut by the fractions,
    the rest going to the first part, so every part has about the data's class proportions."""
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(f"split fractions must be >= 0 and leave some data for training, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for name in sorted(by_class):
        index = rng.permutation(by_class[name]).tolist()
        start = 0
        for k, fraction in enumerate(fractions, 1):
            n = round(len(index) * fraction)
            parts[k].extend(index[start:start + n])
            start += n
        parts[0].extend(index[start:])
    return [sorted(p) for p in parts]


def split_table(path: str | Path, out_dir: str | Path, *, text_column: str, label_column: str,
                text_pair_column: Optional[str] = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 1337) -> dict[str, Path]:
    """Write the stratified train/val/test split that finetune_classifier makes of `path` (same fractions
    and seed) as out_dir/{train,val,test}.<suffix>: e.g. to pre-train on the training texts alone."""
    path, out_dir = Path(path), Path(out_dir)
    columns, rows = read_rows(path, text_column, label_column, text_pair_column)
    parts = stratified_split([_cell(r[label_column]) for r in rows], [val_fraction, test_fraction], seed)
    delimiter = TABLE_SUFFIXES[path.suffix.lower()]
    written = {}
    for split, index in zip(("train", "val", "test"), parts):
        picked = [rows[i] for i in index]
        if delimiter is None:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked)
        elif delimiter == "\t":  # TSV has no quoting: tabs and newlines inside a field become spaces
            text = "".join("\t".join(" ".join(str(r.get(c, "")).split()) for c in columns) + "\n"
                           for r in [dict(zip(columns, columns)), *picked])
        else:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([columns, *([r.get(c, "") for c in columns] for r in picked)])
            text = buf.getvalue()
        written[split] = out_dir / f"{split}{path.suffix.lower()}"
        atomic_write_text(written[split], text)
    return written


# --- encoding --------------------------------------------------------------------------------------

def encode_examples(tokenizer: Tokenizer, config: ModelConfig, texts: Sequence[str], pairs: Optional[Sequence[str]],
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, segment ids) per example: `[CLS] a [SEP] (b [SEP])` for encoders, `a ([SEP] b) [EOS]` for
    decoders, the longer text trimmed first until the whole fits in max_length."""
    prep = (lambda t: t) if config.causal else running_text
    a_ids = tokenizer.encode_batch([prep(t) for t in texts])
    b_ids = tokenizer.encode_batch([prep(t) for t in pairs]) if pairs is not None else [None] * len(a_ids)
    out = []
    if not config.causal:
        cls, sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
        if cls is None or sep is None:
            raise ConfigError("the tokenizer has no [CLS]/[SEP] tokens, which an encoder's input needs")
        for a, b in zip(a_ids, b_ids):
            budget = max_length - (3 if b is not None else 2)
            a, b = truncate_pair(a, b, budget) if b is not None else (a[:budget], None)
            out.append(pair_layout(a, b, cls, sep))
        return out
    sep = tokenizer.token_id("sep") if tokenizer.token_id("sep") is not None else tokenizer.eos_id
    end = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for a, b in zip(a_ids, b_ids):
        if b is not None and sep is not None:
            a, b = truncate_pair(a, b, max_length - 1 - len(end))
            ids = a + [sep] + b + end
        else:
            ids = a[:max_length - len(end)] + end
        out.append((ids, [0] * len(ids)))
    return out


__all__ = ["TABLE_SUFFIXES", "Examples", "read_table", "read_rows", "load_examples", "label_names",
           "stratified_split", "split_table", "encode_examples"]
