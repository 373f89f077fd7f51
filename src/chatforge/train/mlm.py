"""Masked-LM (+ next-sentence) pre-training of encoders, BERT's recipe on the one Trainer.

    from chatforge import ModelConfig, TrainConfig
    from chatforge.train.mlm import pretrain_encoder

    pretrain_encoder(["corpus.txt"], ModelConfig.preset("bert-mini"), TrainConfig(out_dir="runs/bert"))

Input is either BERT's format, one sentence per line with blank lines between documents,
or plain prose, which a small regular expression splits into sentences (its blank-line
separated paragraphs are then the documents). `sentences="auto"` tells them apart per
file by how many lines end like a sentence.

Every time a sequence is drawn it is built and masked afresh (dynamic masking):

- mlm+nsp: `[CLS] A [SEP] B [SEP]`, segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`.
  Half the time B is the text that follows A in its document, half the time it comes
  from another document; the pair is cut to fit by trimming the longer side, token by token.
- mlm: `[CLS] sentences [SEP]`, as many consecutive sentences as fit.
- masking: 15% of the non-special tokens are chosen (whole words with whole_word=True);
  of those 80% become [MASK], 10% a random token and 10% stay as they were.

The loss is the masked-LM cross-entropy (the tied output head over the final hidden
states, at the chosen positions only) plus, for mlm+nsp, the cross-entropy of the
next-sentence head (pooler + classifier over [CLS], the model's sequence-level head).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.formats.checkpoint import is_checkpoint, load_checkpoint
from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.shards import find_inputs
from chatforge.errors import ConfigError, DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer, train_tokenizer
from chatforge.utils import atomic_write_text
from chatforge.train.objectives import IGNORE_INDEX, Objective
from chatforge.train.pretrain import VOCAB_MULTIPLE, run_training

OBJECTIVES = ("mlm+nsp", "mlm")
SENTENCE_MODES = ("auto", "lines", "prose")
DOC_MAX_SENTENCES = 200  # longer documents are cut, so a file without blank lines still has several
NSP_LABELS = ["is_next", "not_next"]  # next-sentence label ids, in Hugging Face BERT's order


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


# --- documents -> token arrays ---------------------------------------------------------------

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


def split_documents(docs: list[list[str]], val_fraction: float, seed: int) -> tuple[list, list]:
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


# --- building one training sequence -----------------------------------------------------------

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


# --- masking -----------------------------------------------------------------------------------

class Masker:
    """BERT's masking of one sequence: choose `prob` of the maskable tokens (or whole words), then
    replace 80% of them with [MASK], 10% with a random token and leave 10% as they were."""

    def __init__(self, tokenizer: Tokenizer, prob: float = 0.15, whole_word: bool = False):
        if not 0.0 < prob < 1.0:
            raise ConfigError(f"mask_prob must be between 0 and 1 (exclusive), got {prob}")
        self.mask_id = require_special(tokenizer, "mask")
        self.prob, self.whole_word = prob, whole_word
        n = tokenizer.vocab_size
        self.special = np.zeros(n, dtype=bool)
        self.special[list(tokenizer.special_ids)] = True
        self.random_ids = np.flatnonzero(~self.special)  # what a "random token" may be
        self.continues_word = None
        if whole_word:  # a token continues the word before it when they touch with letters or digits
            texts = [tokenizer.decode([i]) for i in range(n)]
            self.starts_alnum = np.array([bool(t) and t[0].isalnum() for t in texts]) & ~self.special
            self.ends_alnum = np.array([bool(t) and t[-1].isalnum() for t in texts]) & ~self.special

    def units(self, ids: np.ndarray) -> list[list[int]]:
        """The positions that may be chosen, grouped into words when masking whole words."""
        maskable = ~self.special[ids]
        units: list[list[int]] = []
        for p in np.flatnonzero(maskable).tolist():
            if (self.whole_word and units and units[-1][-1] == p - 1
                    and self.ends_alnum[ids[p - 1]] and self.starts_alnum[ids[p]]):
                units[-1].append(p)
            else:
                units.append([p])
        return units

    def __call__(self, ids: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels): labels hold the original id at chosen positions, -100 elsewhere."""
        ids = np.asarray(ids, dtype=np.int64)
        units = self.units(ids)
        n_maskable = sum(len(u) for u in units)
        budget = min(n_maskable, max(1, round(n_maskable * self.prob)))
        chosen: list[int] = []
        for u in rng.permutation(len(units)).tolist():
            if len(chosen) >= budget:
                break
            if len(chosen) + len(units[u]) <= budget:  # a word that would overshoot is skipped
                chosen.extend(units[u])
        chosen_arr = np.array(sorted(chosen), dtype=np.int64)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[chosen_arr] = ids[chosen_arr]
        out = ids.copy()
        roll = rng.random(len(chosen_arr))
        out[chosen_arr[roll < 0.8]] = self.mask_id
        randomised = chosen_arr[(roll >= 0.8) & (roll < 0.9)]
        out[randomised] = rng.choice(self.random_ids, len(randomised))
        return out, labels


def require_special(tokenizer: Tokenizer, role: str) -> int:
    token_id = tokenizer.token_id(role)
    if token_id is None:
        raise ConfigError(f"the tokenizer has no {role.upper()} token; an encoder needs [CLS], [SEP] and [MASK] "
                          "(train a new tokenizer with --tokenizer bpe or char)")
    return token_id


def pad_batch(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Right-pad lists of ids to the longest into a (B, T) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out


def unwrap(model: torch.nn.Module) -> Transformer:
    """The Transformer inside DDP and torch.compile wrappers (for its heads)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --- the objective -------------------------------------------------------------------------------

class MaskedLM(Objective):
    """Masked-LM (and with nsp=True next-sentence) batches built afresh from sentence corpora.

    An item is (start sentence, is-next coin, seed): the Trainer's generator draws it, and
    `collate` builds and masks the sequence with a generator seeded from it, so batches are
    reproducible (resume, validation) while every draw of a sequence gets new masks.
    """

    def __init__(self, splits: dict[str, SentenceCorpus], tokenizer: Tokenizer, max_len: int, *,
                 nsp: bool = True, whole_word: bool = False, mask_prob: float = 0.15, short_seq_prob: float = 0.1):
        if max_len < 8:
            raise ConfigError(f"an encoder sequence needs room for at least 8 tokens, got max length {max_len}")
        self.splits, self.max_len, self.nsp, self.short_seq_prob = splits, max_len, nsp, short_seq_prob
        self.cls, self.sep = require_special(tokenizer, "cls"), require_special(tokenizer, "sep")
        self.pad = tokenizer.pad_id
        self.masker = Masker(tokenizer, mask_prob, whole_word)
        for split, corpus in splits.items():
            what = "training" if split == "train" else "validation"
            if corpus.n_sentences == 0:
                raise DataError(f"the {what} split has no sentences; add more text")
            if nsp and len(corpus.pair_starts) == 0:
                raise DataError(f"no document of the {what} split has two sentences, so there are no true "
                                "next-sentence pairs; use --objective mlm, or give documents of several sentences")

    @classmethod
    def from_dir(cls, data_dir: str | Path, tokenizer: Tokenizer, max_len: int, **kw: Any) -> "MaskedLM":
        return cls({s: SentenceCorpus.load(Path(data_dir) / f"{s}.npz") for s in ("train", "val")},
                   tokenizer, max_len, **kw)

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        corpus = self.splits[split]
        starts = corpus.pair_starts if self.nsp else np.arange(corpus.n_sentences)
        pick = torch.randint(len(starts), (n,), generator=generator)
        is_next = torch.randint(2, (n,), generator=generator)
        seeds = torch.randint(2**31 - 1, (n,), generator=generator)
        return torch.stack([torch.as_tensor(starts)[pick], is_next, seeds], dim=1)

    def example(self, split: str, start: int, is_next: bool, seed: int) -> dict[str, Any]:
        """One sequence before masking: ids, segment ids and (with nsp) the next-sentence label."""
        corpus, rng = self.splits[split], np.random.default_rng(seed)
        budget = self.max_len - (3 if self.nsp else 2)
        if rng.random() < self.short_seq_prob:  # BERT: some short sequences, so short inputs are seen too
            budget = int(rng.integers(2, budget + 1))
        if self.nsp:
            a, b = nsp_pair(corpus, start, is_next, budget, rng)
            ids, segments = pair_layout(a, b, self.cls, self.sep)
        else:
            ids, segments = pair_layout(mlm_span(corpus, start, budget), None, self.cls, self.sep)
        label = NSP_LABELS.index("is_next" if is_next else "not_next")
        return {"ids": ids, "segments": segments, "nsp_label": label, "rng": rng}

    def collate(self, split: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, labels, segments, nsp = [], [], [], []
        for start, is_next, seed in items.tolist():
            ex = self.example(split, start, bool(is_next), seed)
            masked, target = self.masker(ex["ids"], ex["rng"])
            inputs.append(masked)
            labels.append(target)
            segments.append(ex["segments"])
            nsp.append(ex["nsp_label"])
        input_ids = pad_batch(inputs, self.pad)
        batch = {"input_ids": input_ids, "labels": pad_batch(labels, IGNORE_INDEX),
                 "token_type_ids": pad_batch(segments, 0),
                 "attention_mask": pad_batch([[1] * len(r) for r in inputs], 0)}
        if self.nsp:
            batch["next_sentence_label"] = torch.tensor(nsp, dtype=torch.long)
        return batch

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses and logits of both heads; the output head runs only at the masked positions."""
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], logits="none")
        heads = unwrap(model)
        chosen = batch["labels"] != IGNORE_INDEX
        targets = batch["labels"][chosen]
        mlm_logits = heads.lm_head(hidden[chosen]).float()
        out = {"mlm_logits": mlm_logits, "mlm_targets": targets,
               "mlm_loss": F.cross_entropy(mlm_logits, targets)}
        out["loss"] = out["mlm_loss"]
        if self.nsp:
            nsp_logits = heads.classify(hidden, batch["attention_mask"]).float()
            out["nsp_logits"] = nsp_logits
            out["nsp_loss"] = F.cross_entropy(nsp_logits, batch["next_sentence_label"])
            out["loss"] = out["loss"] + out["nsp_loss"]
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.outputs(model, batch)["loss"]

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        out = self.outputs(model, batch)
        n = len(out["mlm_targets"])
        sums = {"loss": float(out["loss"]), "mlm_loss_sum": float(out["mlm_loss"]) * n, "mlm_count": float(n),
                "mlm_correct": float((out["mlm_logits"].argmax(-1) == out["mlm_targets"]).sum())}
        if self.nsp:
            labels = batch["next_sentence_label"]
            sums["nsp_loss_sum"] = float(out["nsp_loss"]) * len(labels)
            sums["nsp_count"] = float(len(labels))
            sums["nsp_correct"] = float((out["nsp_logits"].argmax(-1) == labels).sum())
        return sums

    def summarize(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        result = {"val_loss": sums["loss"] / batches,
                  "mlm_loss": sums["mlm_loss_sum"] / max(1.0, sums["mlm_count"]),
                  "mlm_accuracy": sums["mlm_correct"] / max(1.0, sums["mlm_count"])}
        if "nsp_count" in sums:
            result["nsp_loss"] = sums["nsp_loss_sum"] / max(1.0, sums["nsp_count"])
            result["nsp_accuracy"] = sums["nsp_correct"] / max(1.0, sums["nsp_count"])
        return result


# --- text files -> a pre-trained encoder --------------------------------------------------------

def encoder_config(config: ModelConfig, nsp: bool) -> ModelConfig:
    """The config an MLM(+NSP) run trains: bidirectional, and with the next-sentence head for NSP."""
    if config.causal:
        raise ConfigError("masked-LM pre-training needs a bidirectional encoder (causal=False); "
                          "use e.g. --preset bert-mini")
    if not nsp:
        return config
    return dataclasses.replace(config, type_vocab_size=max(2, config.type_vocab_size), pooler=True,
                               num_labels=2, labels=list(NSP_LABELS), pooling="cls")


def pretrain_encoder(data: list[str], model_config: ModelConfig, train_config: TrainConfig, *,
                     objective: str = "mlm+nsp", whole_word_mask: bool = False, tokenizer: str = "bpe",
                     vocab_size: Optional[int] = 8192, val_fraction: float = 0.05, mask_prob: float = 0.15,
                     sentences: str = "auto", max_seq_len: Optional[int] = None, resume: bool = False,
                     init_from: Optional[str] = None) -> dict:
    """Pre-train a BERT-style encoder on text files, folders or globs; returns the final metrics.

    objective: "mlm+nsp" (BERT) or "mlm" (masked LM alone, as RoBERTa).
    tokenizer: "bpe", "char" or a directory / tokenizer.json to reuse.
    sentences: "auto", "lines" (one sentence per line) or "prose" (split by a regular expression).
    max_seq_len: longest training sequence, [CLS] and [SEP]s included; None = the model's block_size.
    resume / init_from: as in `pretrain` (continue out_dir/last, or start from another checkpoint).
    Layout of out_dir: tokenizer files, data/{train,val}.npz + meta.json, best/, last/, metrics.jsonl, loss.png.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    nsp = objective == "mlm+nsp"

    def masked_lm(out: Path, model: Transformer, tok: Tokenizer) -> MaskedLM:
        max_len = min(max_seq_len or model.config.block_size, model.config.block_size)
        return MaskedLM.from_dir(out / "data", tok, max_len, nsp=nsp, whole_word=whole_word_mask, mask_prob=mask_prob)

    return run_training(
        train_config, resume=resume, init_from=init_from, title=f"pretrain {objective}", objective=masked_lm,
        start=lambda out, dist: _start(data, model_config, train_config, out, dist, nsp=nsp, tokenizer=tokenizer,
                                       vocab_size=vocab_size, val_fraction=val_fraction, sentences=sentences,
                                       init_from=init_from))


def _start(data, model_config, train_config, out: Path, dist, *, nsp, tokenizer, vocab_size, val_fraction,
           sentences, init_from) -> tuple[Transformer, Tokenizer]:
    if is_checkpoint(out / "last"):
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it, "
                          "or choose another --out-dir")
    docs = read_documents(data, sentences)  # on every process, so that all of them fail alike
    train_docs, val_docs = split_documents(docs, val_fraction, train_config.seed)
    model, tok = None, None
    if init_from:
        model, tok = load_checkpoint(init_from)
        model_config = model.config
    elif tokenizer in ("char", "bpe"):
        if dist.is_main:
            texts = (" ".join(d) for d in train_docs)
            tok = train_tokenizer(tokenizer, texts, vocab_size, show_progress=train_config.progress)
    elif Path(tokenizer).exists():
        tok = Tokenizer.load(tokenizer)
    else:
        raise ConfigError(f"tokenizer must be char, bpe or a directory / tokenizer.json to reuse; "
                          f"{tokenizer!r} is none of these")
    config = encoder_config(model_config if model is None else model.config, nsp)
    if dist.is_main:
        for role in ("cls", "sep", "mask"):
            require_special(tok, role)
        tok.save(out)
        prepare_sentences(train_docs, val_docs, tok, out / "data")
    dist.barrier()
    if tok is None:
        tok = Tokenizer.load(out)
    torch.manual_seed(train_config.seed)  # the same initial weights on every process
    if model is None:
        config.vocab_size = -(-tok.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config.validate()
        model = Transformer(config)
    elif config != model.config:  # init_from an encoder without the NSP head: keep its weights, add the head
        fresh = Transformer(config)
        fresh.load_state_dict(model.state_dict(), strict=False)
        model = fresh
    return model, tok


def prepare_sentences(train_docs, val_docs, tok: Tokenizer, data_dir: Path) -> dict:
    """Tokenize both splits into data_dir/{train,val}.npz and write meta.json; returns the meta."""
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"version": 1, "format": "sentences", "vocab_size": tok.vocab_size}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        corpus = SentenceCorpus.build(docs, tok)
        corpus.save(tmp / f"{split}.npz")
        meta[split] = {"documents": corpus.n_docs, "sentences": corpus.n_sentences, "tokens": len(corpus.tokens)}
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    os.rename(tmp, data_dir)
    return meta


__all__ = ["pretrain_encoder", "MaskedLM", "Masker", "SentenceCorpus", "read_documents", "split_sentences",
           "truncate_pair", "pair_layout", "nsp_pair"]
