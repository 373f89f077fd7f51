"""Text classification: labelled tables in, a fine-tuned classifier checkpoint out.

    from chatforge import TrainConfig
    from chatforge.train.classify import finetune_classifier

    finetune_classifier("sms.tsv", "runs/bert/best", TrainConfig(out_dir="runs/sms", lr=1e-4),
                        text_column="SMS", label_column="Label", metric="macro_f1")

The base model keeps every weight; only its sequence-level head is new: a linear layer
over [CLS] for encoders (after BERT's pooler when the base has one), over the last real
token or the mean of all tokens for decoders. Data is CSV, TSV or JSONL; without a
validation (or test) file a stratified, seeded split of the data is held out. The Trainer
evaluates the whole validation set, keeps the best checkpoint by the chosen metric, stops
after `patience` evaluations without improvement and ends with the best weights, which
are then scored on the test split. Label names are saved in config.json ("labels").
With lora_rank > 0 only LoRA adapters (chatforge.lora) and the head train.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.formats.checkpoint import is_checkpoint, model_state, save_checkpoint
from chatforge.config import POOLINGS, TrainConfig
from chatforge.errors import ConfigError, DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_write_text
from chatforge.train.mlm import pad_batch, pair_layout, running_text, truncate_pair
from chatforge.train.distributed import setup_distributed
from chatforge.train.objectives import Objective
from chatforge.train.trainer import Trainer

METRICS = ("accuracy", "macro_f1")
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
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line (or JSON objects) and one row per example")
    if TABLE_SUFFIXES[suffix] is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n} is not a JSON object")
                rows.append(row)
        columns = list(dict.fromkeys(k for row in rows for k in row))
    else:
        quoting = csv.QUOTE_NONE if TABLE_SUFFIXES[suffix] == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(text.splitlines(), delimiter=TABLE_SUFFIXES[suffix], quoting=quoting)
        columns = [c.strip() for c in next(reader)]
        rows = [dict(zip(columns, values)) for values in reader if any(v.strip() for v in values)]
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

def encode_examples(tokenizer: Tokenizer, config, texts: Sequence[str], pairs: Optional[Sequence[str]],
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


# --- metrics ------------------------------------------------------------------------------------------

def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """counts[i, j] = examples of true class i predicted as class j."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_metrics(cm: np.ndarray, labels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix
    (a class never predicted has precision 0, one never seen recall 0)."""
    cm = np.asarray(cm, dtype=np.int64)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(cm))]
    tp = np.diag(cm).astype(float)
    predicted, actual = cm.sum(0).astype(float), cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "examples": int(total),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(labels, precision, recall, f1, actual)},
        "confusion_matrix": cm.tolist(),
        "labels": labels,
    }


# --- the objective --------------------------------------------------------------------------------------

class Classification(Objective):
    """Cross-entropy of the sequence-level head; validation is one pass over the whole split,
    summed into a confusion matrix so accuracy and macro-F1 are exact."""

    def __init__(self, splits: dict[str, tuple[list[tuple[list[int], list[int]]], list[int]]],
                 num_labels: int, pad_id: int):
        self.splits, self.num_labels, self.pad = splits, num_labels, pad_id

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.splits[split][1]), (n,), generator=generator)

    def eval_batches(self, batch_size: int) -> int:
        return max(1, math.ceil(len(self.splits["val"][1]) / batch_size))

    def eval_items(self, index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(index * n, min((index + 1) * n, len(self.splits["val"][1])))

    def collate(self, split: str, items: torch.Tensor) -> dict[str, torch.Tensor]:
        encoded, labels = self.splits[split]
        rows = [encoded[i] for i in items.tolist()]
        return {"input_ids": pad_batch([ids for ids, _ in rows], self.pad),
                "token_type_ids": pad_batch([seg for _, seg in rows], 0),
                "attention_mask": pad_batch([[1] * len(ids) for ids, _ in rows], 0),
                "labels": torch.tensor([labels[i] for i in items.tolist()], dtype=torch.long)}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], logits="classify").float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = self.logits(model, batch)
        cm = confusion_matrix(batch["labels"].cpu(), logits.argmax(-1).cpu(), self.num_labels)
        sums = {"loss_sum": float(F.cross_entropy(logits, batch["labels"], reduction="sum"))}
        sums.update({f"cm_{i}_{j}": float(cm[i, j]) for i in range(self.num_labels) for j in range(self.num_labels)})
        return sums

    def confusion(self, sums: dict[str, float]) -> np.ndarray:
        k = self.num_labels
        return np.array([[sums[f"cm_{i}_{j}"] for j in range(k)] for i in range(k)], dtype=np.int64)

    def summarize(self, sums: dict[str, float], batches: int) -> dict[str, float]:
        cm = self.confusion(sums)
        metrics = classification_metrics(cm)
        return {"val_loss": float(sums["loss_sum"] / max(1, cm.sum())), "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"]}


def score(model: Transformer, encoded: list[tuple[list[int], list[int]]], labels: Sequence[int],
          label_names: Sequence[str], pad_id: int, batch_size: int = 32,
          device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class figures and confusion matrix of `model` on encoded examples."""
    from chatforge.train.evaluate import run_objective

    objective = Classification({"val": (encoded, list(labels))}, len(label_names), pad_id)
    sums = run_objective(model, objective, objective.eval_batches(batch_size), batch_size, device)
    return {"loss": sums["val_loss"], **classification_metrics(objective.confusion(sums), label_names)}


# --- the model -----------------------------------------------------------------------------------------

def with_classifier(model: Transformer, labels: Sequence[str], *, pooling: Optional[str] = None,
                    dropout: Optional[float] = None, random_init: bool = False, seed: int = 0) -> Transformer:
    """A copy of `model` whose sequence-level head is a new classifier over `labels`.

    Every other weight (embeddings, blocks, final norm, BERT's pooler) is the base model's, unless
    random_init=True, which keeps only the shape: the same model trained from scratch, for comparison.
    """
    base = model.config
    pooling = pooling or ("last" if base.causal else "cls")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "cls" and base.causal:
        raise ConfigError("a decoder's first token sees nothing after it: use --pooling last or mean")
    config = dataclasses.replace(base, task="classify", num_labels=len(labels), labels=list(labels), pooling=pooling,
                                 dropout=base.dropout if dropout is None else dropout)
    torch.manual_seed(seed)
    new = Transformer(config)
    if not random_init:
        kept = {k: v for k, v in model_state(model).items() if not k.startswith("classifier.")}
        missing, unexpected = new.load_state_dict(kept, strict=False)
        assert not unexpected and set(missing) <= {"classifier.weight", "classifier.bias", "lm_head.weight"}, missing
    return new


# --- labelled files -> a fine-tuned classifier ------------------------------------------------------------

def finetune_classifier(data: str | Path, base_model: str, train_config: TrainConfig, *, text_column: str,
                        label_column: str, text_pair_column: Optional[str] = None,
                        val_data: Optional[str | Path] = None, test_data: Optional[str | Path] = None,
                        val_fraction: float = 0.1, test_fraction: float = 0.1, pooling: Optional[str] = None,
                        metric: str = "accuracy", dropout: Optional[float] = 0.1,
                        max_length: Optional[int] = None, random_init: bool = False, lora_rank: int = 0,
                        lora_alpha: float = 16, lora_dropout: float = 0.0,
                        lora_targets: Sequence[str] = ("qkv", "proj")) -> dict:
    """Fine-tune `base_model` (a checkpoint directory or model name) as a classifier; returns the metrics.

    val_data / test_data: separate files; without them a stratified seeded split of `data` (by
        val_fraction / test_fraction, seed = train_config.seed) is held out. test_fraction=0: no test.
    pooling: cls (encoders' default), last (decoders' default) or mean.
    metric: accuracy or macro_f1, what picks the best checkpoint and drives early stopping
        (train_config.patience); the model ends with the best evaluation's weights.
    dropout: dropout of the fine-tuned model (None = the base model's); weight decay is train_config's.
    random_init: the base model's shape and tokenizer with random weights (to see what pre-training gives).
    lora_rank: 0 = fine-tune every weight; > 0 = freeze the base model and train LoRA adapters of that
        rank on `lora_targets` (chatforge.lora) plus the new head; best/ and last/ then hold base weights
        plus adapters, and merged/ the classifier with the adapters folded in.
    Writes out_dir/best, last, metrics.jsonl, loss.png (loss and the metric against step) and report.json;
    the result's "model_dir" is the checkpoint to use (best/, or merged/ with LoRA).
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if is_checkpoint(Path(train_config.out_dir) / "last"):
        raise ConfigError(f"{train_config.out_dir} already holds a training run; choose another --out-dir")
    lora = None
    if lora_rank:
        from chatforge.lora import LoRAConfig, apply_lora, merge_lora

        lora = LoRAConfig(lora_rank, float(lora_alpha), lora_dropout, list(lora_targets))
    columns = dict(text_column=text_column, label_column=label_column, text_pair_column=text_pair_column)
    examples = load_examples(data, **columns)
    names = label_names(examples.labels, str(data), label_column)
    fractions = [0.0 if val_data else val_fraction, 0.0 if test_data else test_fraction]
    train_idx, val_idx, test_idx = stratified_split(examples.labels, fractions, train_config.seed)
    parts = {"train": examples.subset(train_idx),
             "val": load_examples(val_data, **columns) if val_data else examples.subset(val_idx),
             "test": load_examples(test_data, **columns) if test_data else examples.subset(test_idx)}
    for split in ("train", "val"):
        if len(parts[split]) == 0:
            raise DataError(f"the {split} split is empty: {len(examples)} examples are too few; "
                            "add data or change --val-fraction / --test-fraction")
    from chatforge.loader import load

    model, tok = load(base_model, device="cpu")  # after the data: its mistakes are found without waiting
    model = model.float()
    max_length = min(max_length or model.config.block_size, model.config.block_size)
    encoded = {}
    for split, ex in parts.items():
        unknown = sorted(set(ex.labels) - set(names))
        if unknown:
            raise DataError(f"the {split} data has labels the training data lacks: {', '.join(unknown[:5])}")
        encoded[split] = (encode_examples(tok, model.config, ex.texts, ex.pairs, max_length),
                          [names.index(y) for y in ex.labels])

    classifier = with_classifier(model, names, pooling=pooling, dropout=dropout, random_init=random_init,
                                 seed=train_config.seed)
    if lora is not None:
        apply_lora(classifier, lora)  # freezes every weight...
        for head in (classifier.pooler, classifier.classifier):  # ...but the head's, which is new or re-purposed
            if head is not None:
                head.requires_grad_(True)
    config = dataclasses.replace(train_config, metric=metric, metric_mode="max", restore_best=True)
    objective = Classification({s: encoded[s] for s in ("train", "val")}, len(names), tok.pad_id)
    dist = setup_distributed(config.device)
    try:
        title = f"classify ({metric}{', LoRA' if lora else ''})"
        trainer = Trainer(classifier, objective, config, tokenizer=tok, dist=dist, title=title)
        result = trainer.fit()  # ends with the best evaluation's weights
        model_dir = Path(config.out_dir) / "best"
        if lora is not None:
            model_dir = Path(config.out_dir) / "merged"
            merge_lora(trainer.model)
            if dist.is_main:
                save_checkpoint(model_dir, trainer.model, tok, extra_json={"training.json": {
                    "step": result["best_step"], "base_model": str(base_model), "lora": lora.to_dict()}})
        report: dict[str, Any] = {"labels": names, "examples": {s: len(p) for s, p in parts.items()},
                                  "best_step": result["best_step"], "base_model": str(base_model),
                                  "random_init": random_init, "model_dir": str(model_dir)}
        for split in ("val", "test"):
            if len(parts[split]):
                report[split] = score(trainer.model, *encoded[split], names, tok.pad_id, config.batch_size,
                                      trainer.device)
        if dist.is_main:
            atomic_write_text(Path(config.out_dir) / "report.json", json.dumps(report, indent=2) + "\n")
    finally:
        dist.close()
    return {**result, **report}


__all__ = ["finetune_classifier", "Classification", "with_classifier", "score", "read_table", "load_examples",
           "split_table", "stratified_split", "confusion_matrix", "classification_metrics", "encode_examples"]
