"""Text classification: labelled tables in, a fine-tuned classifier checkpoint out.

    from chatforge import TrainConfig
    from chatforge.train.classify import finetune_classifier

    finetune_classifier("sms.tsv", "runs/bert/best", TrainConfig(out_dir="runs/sms", lr=1e-4),
                        text_column="SMS", label_column="Label", metric="macro_f1")

The base model keeps every weight; only its sequence-level head is new: a linear layer
over [CLS] for encoders (after BERT's pooler when the base has one) or over the mean of their
tokens where the checkpoint's sentence-transformers config pools so (all-MiniLM-L6-v2), over
the last real token or the mean of all tokens for decoders. The base is anything the loader
reads: a chatforge checkpoint, a Hugging Face encoder or decoder directory or id, a catalogue name. Data is CSV, TSV or JSONL, read and encoded by
data/tables.py; without a validation (or test) file a stratified, seeded split of the data is
held out. What is particular to classification is here (the head, the Classification
objective, its metrics, the report); the run around it is the training frame's. The Trainer
evaluates the whole validation set, keeps the best checkpoint by the chosen metric, stops
after `patience` evaluations without improvement and ends with the best weights, which
are then scored on the test split. Label names are saved in config.json ("labels").
With lora_rank > 0 only LoRA adapters (chatforge.lora) and the head train.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.config import POOLINGS, TrainConfig
from chatforge.data.tables import Examples, encode_examples, label_names, load_examples, stratified_split
from chatforge.data.text import pad_batch
from chatforge.errors import ConfigError, DataError
from chatforge.formats.checkpoint import model_state, save_checkpoint
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.distributed import Dist
from chatforge.train.frame import run_training
from chatforge.train.objectives import FullValidation, run_objective
from chatforge.train.trainer import Trainer
from chatforge.utils import atomic_write_text

METRICS = ("accuracy", "macro_f1")
Encoded = tuple[list[tuple[list[int], list[int]]], list[int]]  # (ids, segment ids) per example, and label ids


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

class Classification(FullValidation):
    """Cross-entropy of the sequence-level head; validation is one pass over the whole split,
    summed into a confusion matrix so accuracy and macro-F1 are exact."""

    def __init__(self, splits: dict[str, Encoded], num_labels: int, pad_id: int):
        self.splits, self.num_labels, self.pad = splits, num_labels, pad_id

    def sample(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.splits[split][1]), (n,), generator=generator)

    def val_size(self) -> int:
        return len(self.splits["val"][1])

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
    objective = Classification({"val": (encoded, list(labels))}, len(label_names), pad_id)
    sums = run_objective(model, objective, objective.eval_batches(batch_size), batch_size, device)
    return {"loss": sums["val_loss"], **classification_metrics(objective.confusion(sums), label_names)}


# --- the model -----------------------------------------------------------------------------------------

def with_classifier(model: Transformer, labels: Sequence[str], *, pooling: Optional[str] = None,
                    dropout: Optional[float] = None, random_init: bool = False, seed: int = 0) -> Transformer:
    """A copy of `model` whose sequence-level head is a new classifier over `labels`.

    Every other weight (embeddings, blocks, final norm, BERT's pooler) is the base model's, unless
    random_init=True, which keeps only the shape: the same model trained from scratch, for comparison.
    pooling: None = "last" for decoders, the base config's pooling for encoders (what a sentence-transformers
    directory's Pooling module says, e.g. mean for all-MiniLM-L6-v2; else cls). The base's pooler (BERT's
    dense + tanh, trained on [CLS]) is kept only with cls pooling. Any encoder becomes a classifier: one
    pre-trained with an LM head, with a next-sentence head, or a task="features" one (BertModel,
    sentence-transformers' models) that has none.
    """
    base = model.config
    # an encoder pools as its config says: a sentence-transformers model's Pooling module (all-MiniLM-L6-v2:
    # mean), else [CLS]; a decoder's only summary of the whole input is its last token
    pooling = pooling or ("last" if base.causal else base.pooling)
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "cls" and base.causal:
        raise ConfigError("a decoder's first token sees nothing after it: use --pooling last or mean")
    # BERT's pooler (dense + tanh) was trained on [CLS] alone; over any other pooled vector it is dropped
    pooler = base.pooler and pooling == "cls"
    config = dataclasses.replace(base, task="classify", num_labels=len(labels), labels=list(labels), pooling=pooling,
                                 pooler=pooler, normalize=False, dropout=base.dropout if dropout is None else dropout)
    torch.manual_seed(seed)
    new = Transformer(config)
    if not random_init:
        dropped = ("classifier.",) if pooler else ("classifier.", "pooler.")
        kept = {k: v for k, v in model_state(model).items() if not k.startswith(dropped)}
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
                        lora_targets: Sequence[str] = ("qkv", "proj")) -> dict[str, Any]:
    """Fine-tune `base_model` (a checkpoint directory or model name) as a classifier; returns the metrics.

    val_data / test_data: separate files; without them a stratified seeded split of `data` (by
        val_fraction / test_fraction, seed = train_config.seed) is held out. test_fraction=0: no test.
    pooling: cls, last, mean or max; None = the encoder's own (its sentence-transformers pooling, else cls),
        last for decoders (see with_classifier).
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
    config = dataclasses.replace(train_config, metric=metric, metric_mode="max", restore_best=True)
    run: Optional[_Prepared] = None

    def start(out: Path, dist: Dist) -> tuple[Transformer, Tokenizer]:
        nonlocal run
        lora = None
        if lora_rank:
            from chatforge.lora import LoRAConfig

            lora = LoRAConfig(lora_rank, float(lora_alpha), lora_dropout, list(lora_targets))
        columns = dict(text_column=text_column, label_column=label_column, text_pair_column=text_pair_column)
        parts, names = _split(data, val_data, test_data, val_fraction, test_fraction, train_config.seed, columns)
        run = _prepare(parts, names, base_model, max_length, train_config.seed, lora=lora, pooling=pooling,
                       dropout=dropout, random_init=random_init)
        return run.model, run.tok

    return run_training(
        config, title=f"classify ({metric}{', LoRA' if lora_rank else ''})", start=start, resume_model=None,
        objective=lambda out, model, tok: Classification({s: run.encoded[s] for s in ("train", "val")},
                                                         len(run.names), tok.pad_id),
        finish=lambda trainer, result: _finish(trainer, result, run, base_model, random_init))


@dataclass
class _Prepared:
    """A classification run once its data is read and its model built."""

    model: Transformer
    tok: Tokenizer
    names: list[str]
    parts: dict[str, Examples]
    encoded: dict[str, Encoded]
    lora: Any  # the LoRAConfig, or None


def _split(data: str | Path, val_data: Optional[str | Path], test_data: Optional[str | Path], val_fraction: float,
           test_fraction: float, seed: int, columns: dict[str, Any]) -> tuple[dict[str, Examples], list[str]]:
    """The train/val/test examples (from their own files or a stratified split of `data`) and the label names."""
    examples = load_examples(data, **columns)
    names = label_names(examples.labels, str(data), columns["label_column"])
    fractions = [0.0 if val_data else val_fraction, 0.0 if test_data else test_fraction]
    train_idx, val_idx, test_idx = stratified_split(examples.labels, fractions, seed)
    parts = {"train": examples.subset(train_idx),
             "val": load_examples(val_data, **columns) if val_data else examples.subset(val_idx),
             "test": load_examples(test_data, **columns) if test_data else examples.subset(test_idx)}
    for split in ("train", "val"):
        if len(parts[split]) == 0:
            raise DataError(f"the {split} split is empty: {len(examples)} examples are too few; "
                            "add data or change --val-fraction / --test-fraction")
    return parts, names


def _prepare(parts: dict[str, Examples], names: list[str], base_model: str, max_length: Optional[int], seed: int, *,
             lora: Any, pooling: Optional[str], dropout: Optional[float], random_init: bool) -> _Prepared:
    """The base model with its new head (and LoRA adapters), and every split encoded for it."""
    from chatforge.loader import load

    # after the data: its mistakes are found without waiting; fp32: weights to train (a GGUF file dequantized)
    model, tok = load(base_model, device="cpu", dtype="fp32")
    model = model.float()
    max_length = min(max_length or model.config.block_size, model.config.block_size)
    encoded = {}
    for split, ex in parts.items():
        unknown = sorted(set(ex.labels) - set(names))
        if unknown:
            raise DataError(f"the {split} data has labels the training data lacks: {', '.join(unknown[:5])}")
        encoded[split] = (encode_examples(tok, model.config, ex.texts, ex.pairs, max_length),
                          [names.index(y) for y in ex.labels])
    classifier = with_classifier(model, names, pooling=pooling, dropout=dropout, random_init=random_init, seed=seed)
    if lora is not None:
        from chatforge.lora import apply_lora

        apply_lora(classifier, lora)  # freezes every weight...
        for head in (classifier.pooler, classifier.classifier):  # ...but the head's, which is new or re-purposed
            if head is not None:
                head.requires_grad_(True)
    return _Prepared(classifier, tok, names, parts, encoded, lora)


def _finish(trainer: Trainer, result: dict[str, Any], run: _Prepared, base_model: str,
            random_init: bool) -> dict[str, Any]:
    """The best weights (merged/ with LoRA) scored on val and test, and report.json."""
    out, tok, names = trainer.out_dir, run.tok, run.names
    model_dir = out / "best"
    if run.lora is not None:
        from chatforge.lora import merge_lora

        model_dir = out / "merged"
        merge_lora(trainer.model)
        if trainer.dist.is_main:
            save_checkpoint(model_dir, trainer.model, tok, extra_json={"training.json": {
                "step": result["best_step"], "base_model": str(base_model), "lora": run.lora.to_dict()}})
    report: dict[str, Any] = {"labels": names, "examples": {s: len(p) for s, p in run.parts.items()},
                              "best_step": result["best_step"], "base_model": str(base_model),
                              "random_init": random_init, "model_dir": str(model_dir)}
    for split in ("val", "test"):
        if len(run.parts[split]):
            report[split] = score(trainer.model, *run.encoded[split], names, tok.pad_id, trainer.config.batch_size,
                                  trainer.device)
    if trainer.dist.is_main:
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return {**result, **report}


__all__ = ["finetune_classifier", "Classification", "with_classifier", "score", "confusion_matrix",
           "classification_metrics"]
