"""Tokenized sentence corpora and the sequences masked-LM (+ next-sentence) training draws from them.

    corpus = SentenceCorpus.build(read_documents(["corpus.txt"]), tokenizer)
    a, b = nsp_pair(corpus, start, is_next=True, max_tokens=125, rng=rng)   # BERT's segments A and B
    ids = mlm_span(corpus, start, max_tokens=126)                           # whole sentences that fit
    prepare_sentences(train_docs, val_docs, tokenizer, "run/data")          # {train,val}.npz + meta.json

A corpus keeps all token ids of one split in one array, with the bounds of every sentence and
document, so drawing a sequence is slicing. For a next-sentence pair, half the time B is the
text that follows A in its document, half the time it comes from another document; the pair
is cut to fit by trimming the longer side, token by token (`truncate_pair`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chatforge.data.text import running_text, truncate_pair
from chatforge.errors import DataError
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_directory, atomic_write_text


class SentenceCorpus:
    """Tokenized sentences of one split: all ids in one array, with sentence and document bounds."""

    def __init__(self, tokens: np.ndarray, sent_bounds: np.ndarray, doc_bounds: np.ndarray):
        self.tokens, self.sent_bounds, self.doc_bounds = tokens, sent_bounds, doc_bounds
        self.n_sentences, self.n_docs = len(sent_bounds) - 1, len(doc_bounds) - 1
        self.doc_of = np.repeat(np.arange(self.n_docs), np.diff(doc_bounds))
        last_of_doc = doc_bounds[1:] - 1
        # sentences followed by another one of the same document: where a true next-sentence pair can start
        self.pair_starts = np.setdiff1d(np.arange(self.n_sentences), last_of_doc)

    @classmethod
    def build(cls, docs: Sequence[Sequence[str]], tokenizer: Tokenizer) -> "SentenceCorpus":
        flat = [s for d in docs for s in d]
        encoded = tokenizer.encode_batch([running_text(s) for s in flat])
        lengths, doc_sizes, k = [], [], 0
        for d in docs:
            kept = [len(ids) for ids in encoded[k:k + len(d)] if ids]
            k += len(d)
            if kept:
                lengths.extend(kept)
                doc_sizes.append(len(kept))
        tokens = np.fromiter((t for ids in encoded for t in ids), dtype=np.int32)
        sent_bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        doc_bounds = np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64)
        return cls(tokens, sent_bounds, doc_bounds)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, tokens=self.tokens, sent_bounds=self.sent_bounds, doc_bounds=self.doc_bounds)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "SentenceCorpus":
        if not path.is_file():
            raise DataError(f"{path} is missing; prepare the data again (start a new run in another --out-dir)")
        with np.load(path, allow_pickle=False) as f:
            return cls(f["tokens"], f["sent_bounds"], f["doc_bounds"])

    def sentence(self, i: int) -> list[int]:
        return self.tokens[self.sent_bounds[i]:self.sent_bounds[i + 1]].tolist()

    def span(self, first: int, last: int) -> list[int]:
        """Tokens of sentences first..last-1, joined."""
        return self.tokens[self.sent_bounds[first]:self.sent_bounds[last]].tolist()


def prepare_sentences(train_docs: Sequence[Sequence[str]], val_docs: Sequence[Sequence[str]], tok: Tokenizer,
                      data_dir: Path) -> dict[str, Any]:
    """Tokenize both splits into data_dir/{train,val}.npz and write meta.json (the folder is replaced
    atomically); returns the meta."""
    meta: dict[str, Any] = {"version": 1, "format": "sentences", "vocab_size": tok.vocab_size}
    with atomic_directory(data_dir) as tmp:
        for split, docs in (("train", train_docs), ("val", val_docs)):
            corpus = SentenceCorpus.build(docs, tok)
            corpus.save(tmp / f"{split}.npz")
            meta[split] = {"documents": corpus.n_docs, "sentences": corpus.n_sentences, "tokens": len(corpus.tokens)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


# --- building one training sequence -----------------------------------------------------------

def nsp_pair(corpus: SentenceCorpus, start: int, is_next: bool, max_tokens: int,
             rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Segments A and B of a next-sentence example that starts at sentence `start` (BERT's
    create_instances_from_document, one example at a time)."""
    doc = int(corpus.doc_of[start])
    doc_end = int(corpus.doc_bounds[doc + 1])
    end, length = start, 0
    while end < doc_end and (end - start < 2 or length < max_tokens):  # at least two sentences
        length += int(corpus.sent_bounds[end + 1] - corpus.sent_bounds[end])
        end += 1
    a_end = int(rng.integers(start + 1, end)) if end - start > 1 else end
    a = corpus.span(start, a_end)
    if is_next:
        b = corpus.span(a_end, end)
    else:
        b = _random_segment(corpus, doc, start, end, max_tokens - len(a), rng)
    return truncate_pair(a, b, max_tokens, rng)


def _random_segment(corpus: SentenceCorpus, doc: int, lo: int, hi: int, want: int,
                    rng: np.random.Generator) -> list[int]:
    """Consecutive sentences (about `want` tokens) from a random other document (if there is only one,
    from outside sentences lo..hi-1 of it)."""
    if corpus.n_docs > 1:
        other = int(rng.integers(corpus.n_docs - 1))
        other += other >= doc
        first, end = int(corpus.doc_bounds[other]), int(corpus.doc_bounds[other + 1])
        s = int(rng.integers(first, end))
    else:
        outside = [i for i in range(corpus.n_sentences) if not lo <= i < hi] or [lo]
        s, end = int(rng.choice(outside)), corpus.n_sentences
    e = s + 1
    while e < end and corpus.sent_bounds[e] - corpus.sent_bounds[s] < max(1, want):
        e += 1
    return corpus.span(s, e)


def mlm_span(corpus: SentenceCorpus, start: int, max_tokens: int) -> list[int]:
    """As many whole consecutive sentences from `start` as fit (at least one, cut to fit)."""
    end = start + 1
    while end < corpus.n_sentences and corpus.sent_bounds[end + 1] - corpus.sent_bounds[start] <= max_tokens:
        end += 1
    return corpus.span(start, end)[:max_tokens]


__all__ = ["SentenceCorpus", "prepare_sentences", "nsp_pair", "mlm_span"]
