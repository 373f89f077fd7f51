"""Masked-LM (+ next-sentence) pre-training of encoders, BERT's recipe on the one Trainer.

    from chatforge import ModelConfig, TrainConfig
    from chatforge.train.mlm import pretrain_encoder

    pretrain_encoder(["corpus.txt"], ModelConfig.preset("bert-mini"), TrainConfig(out_dir="runs/bert"))

What is particular to it: the MaskedLM objective, BERT's masking (Masker) and the encoder's
config; reading text into sentences and documents is data/text.py's, building the sequences
data/pairs.py's, and the run around it the training frame's (frame.py).

Every time a sequence is drawn it is built and masked afresh (dynamic masking):

- mlm+nsp: `[CLS] A [SEP] B [SEP]`, segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`.
  Half the time B is the text that follows A in its document, half the time it comes
  from another document; the pair is cut to fit by trimming the longer side, token by token.
- mlm: `[CLS] sentences [SEP]`, as many consecutive sentences as fit.
- masking: 15% of the non-special tokens are chosen (whole words with whole_word=True);
  of those 80% become [MASK], 10% a random token and 10% stay as they were.

The loss is the masked-LM cross-entropy (the tied output head over the final hidden states, after
BERT's dense + activation + norm transform when the config has mlm_head, at the chosen positions
only) plus, for mlm+nsp, the cross-entropy of the next-sentence head (pooler + classifier over
[CLS], the model's sequence-level head). With post_norm and mlm_head the result is a BERT that
`chatforge export --format hf` writes as BertForPreTraining / BertForMaskedLM.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.config import ModelConfig, TrainConfig
from chatforge.data.pairs import SentenceCorpus, mlm_span, nsp_pair, prepare_sentences
from chatforge.data.text import IGNORE_INDEX, pad_batch, pair_layout, read_documents, split_documents
from chatforge.errors import ConfigError, DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.distributed import Dist
from chatforge.train.frame import new_model, run_training, save_and_prepare, starting_point
from chatforge.train.objectives import Objective, unwrap

OBJECTIVES = ("mlm+nsp", "mlm")
NSP_LABELS = ["is_next", "not_next"]  # next-sentence label ids, in Hugging Face BERT's order


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
    """The id of the tokenizer's `role` special token ("cls", "sep", "mask"), which an encoder needs."""
    token_id = tokenizer.token_id(role)
    if token_id is None:
        raise ConfigError(f"the tokenizer has no {role.upper()} token; an encoder needs [CLS], [SEP] and [MASK] "
                          "(train a new tokenizer with --tokenizer bpe or char)")
    return token_id


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
        mlm_logits = heads.lm_logits(hidden[chosen]).float()
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
                     init_from: Optional[str] = None) -> dict[str, Any]:
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


def _start(data: list[str], model_config: ModelConfig, train_config: TrainConfig, out: Path, dist: Dist, *,
           nsp: bool, tokenizer: str, vocab_size: Optional[int], val_fraction: float, sentences: str,
           init_from: Optional[str]) -> tuple[Transformer, Tokenizer]:
    docs = read_documents(data, sentences)  # on every process, so that all of them fail alike
    train_docs, val_docs = split_documents(docs, val_fraction, train_config.seed)
    model, tok = starting_point(tokenizer, (" ".join(d) for d in train_docs), vocab_size=vocab_size,
                                init_from=init_from, dist=dist, progress=train_config.progress)
    config = encoder_config(model_config if model is None else model.config, nsp)
    if dist.is_main:
        for role in ("cls", "sep", "mask"):
            require_special(tok, role)
    tok = save_and_prepare(out, tok, dist, lambda tok: prepare_sentences(train_docs, val_docs, tok, out / "data"))
    if model is None:
        return new_model(config, tok, train_config.seed), tok
    torch.manual_seed(train_config.seed)  # the same initial weights on every process
    if config != model.config:  # init_from an encoder without the NSP head: keep its weights, add the head
        fresh = Transformer(config)
        fresh.load_state_dict(model.state_dict(), strict=False)
        model = fresh
    return model, tok


__all__ = ["pretrain_encoder", "MaskedLM", "Masker", "encoder_config", "require_special"]
