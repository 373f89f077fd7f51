"""`chatforge eval`: score any model on a file, with the measure that fits the model.

    from chatforge.train.evaluate import evaluate, summary
    evaluate("runs/shakespeare/best", "held_out.txt")     # causal LM: perplexity
    evaluate("runs/bert/best", "held_out.txt")            # encoder: masked-LM (and next-sentence) accuracy
    report = evaluate("runs/sms/best", "test.tsv", text_column="SMS", label_column="Label")  # classifier
    print(summary(report))                                # accuracy, macro-F1, per class, confusion matrix

Every figure is reproducible: masks and sentence pairs come from a seeded generator. Encoders
and classifiers are scored by the validation pass the Trainer runs (objectives.run_objective)
over their training objective, so `chatforge eval` and training report the same figures.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.errors import DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.objectives import run_objective, selected_lm_sums


def evaluate(model: Union[str, Transformer], data: Union[str, Sequence[str]], *, tokenizer: Optional[Tokenizer] = None,
             text_column: Optional[str] = None, label_column: Optional[str] = None,
             text_pair_column: Optional[str] = None, batch_size: int = 16, max_length: Optional[int] = None,
             batches: Optional[int] = None, sentences: str = "auto", whole_word_mask: bool = False,
             seed: int = 0, device: str = "auto", dtype: Optional[str] = None,
             quantize: Optional[str] = None) -> dict[str, Any]:
    """Score `model` (a name or checkpoint directory, or a Transformer with its `tokenizer`) on `data`.

    - classifier: `data` is a CSV/TSV/JSONL file; accuracy, macro-F1, per-class precision/recall/F1 and
      the confusion matrix. Columns default to one named "label" and one named "text" (or the only other).
    - encoder: `data` is text (files, folders, globs); masked-LM accuracy and loss (and next-sentence
      accuracy when the model has that head) on `batches` seeded batches (default: about one per
      `batch_size` sentences, at most 200).
    - causal LM: `data` is text; loss and perplexity over consecutive windows of the model's context.
      quantize="int8" / "int4" scores the weight-only quantized model: what quantizing costs.
    """
    if isinstance(model, str) or model is None:
        from chatforge.loader import load

        model, tokenizer = load(model, device=device, dtype=dtype, quantize=_check_quantize(model, quantize))
    elif tokenizer is None:
        raise DataError("evaluate() needs the model's tokenizer along with a Transformer object")
    model.eval()
    device_ = next(model.parameters()).device
    config = model.config
    max_length = min(max_length or config.block_size, config.block_size)
    if config.task == "classify":
        if not isinstance(data, (str, Path)):
            raise DataError("a classifier is evaluated on one labelled file (CSV, TSV or JSONL)")
        return _classifier(model, tokenizer, data, text_column, label_column, text_pair_column, batch_size,
                           max_length, device_)
    files = [data] if isinstance(data, (str, Path)) else list(data)
    if config.task == "features":
        raise DataError("this encoder has no masked-LM head (its outputs are token vectors, as BertModel's), so it "
                        "has no masked-LM accuracy to measure; evaluate a checkpoint with one (BertForMaskedLM), or "
                        "fine-tune it as a classifier first")
    if not config.causal:
        return _masked_lm(model, tokenizer, files, batch_size, max_length, batches, sentences, whole_word_mask,
                          seed, device_)
    return _perplexity(model, tokenizer, files, batch_size, max_length, device_)


def _check_quantize(model: Optional[str], quantize: Optional[str]) -> Optional[str]:
    """quantize, once it is known not to be asked of an encoder or classifier (it serves generation models)."""
    from chatforge.errors import CheckpointError
    from chatforge.formats.checkpoint import read_config_json
    from chatforge.quantize import check_mode

    quantize = check_mode(quantize)
    if quantize is None or not model or not Path(model).expanduser().is_dir():
        return quantize
    try:
        data = read_config_json(Path(model).expanduser())
    except CheckpointError:
        return quantize  # the loader says what is wrong with the directory
    if data.get("model_type", "chatforge") == "chatforge" and (data.get("task") == "classify"
                                                               or not data.get("causal", True)):
        kind = "a classifier" if data.get("task") == "classify" else "an encoder"
        raise DataError(f"--quantize is for causal language models, and {model} is {kind}: evaluate it without it")
    return quantize


def _classifier(model, tok, path, text_column, label_column, pair_column, batch_size, max_length, device):
    from chatforge.data.tables import encode_examples, load_examples, read_table
    from chatforge.train.classify import score

    columns, _ = read_table(path)
    label_column = label_column or _column(columns, "label", path)
    text_column = text_column or _column(columns, "text", path, others=[label_column, pair_column])
    examples = load_examples(path, text_column, label_column, pair_column)
    names = list(model.config.labels or [str(i) for i in range(model.config.num_labels)])
    unknown = sorted(set(examples.labels) - set(names))
    if unknown:
        raise DataError(f"{path} has labels the model does not know: {', '.join(unknown[:5])}; "
                        f"its labels are {', '.join(names)}")
    encoded = encode_examples(tok, model.config, examples.texts, examples.pairs, max_length)
    report = score(model, encoded, [names.index(y) for y in examples.labels], names, tok.pad_id, batch_size, device)
    return {"task": "classification", "data": str(path), **report}


def _column(columns: list[str], wanted: str, path, others: Sequence[Optional[str]] = ()) -> str:
    for c in columns:
        if c.strip().lower() == wanted:
            return c
    rest = [c for c in columns if c not in others]
    if wanted == "text" and len(rest) == 1:
        return rest[0]
    raise DataError(f"which column of {path} holds the {wanted}s? pass --{wanted}-column "
                    f"(its columns are: {', '.join(columns)})")


def _masked_lm(model, tok, files, batch_size, max_length, batches, sentences, whole_word, seed, device):
    from chatforge.data.pairs import SentenceCorpus
    from chatforge.data.text import read_documents
    from chatforge.pipelines.encoders import check_fill_mask
    from chatforge.train.mlm import MaskedLM

    check_fill_mask(model, tok)
    corpus = SentenceCorpus.build(read_documents(files, sentences), tok)
    nsp = model.config.num_labels == 2 and model.config.type_vocab_size >= 2 and len(corpus.pair_starts) > 0
    objective = MaskedLM({"val": corpus}, tok, max_length, nsp=nsp, whole_word=whole_word, short_seq_prob=0.0)
    batches = batches or min(200, max(1, math.ceil(corpus.n_sentences / batch_size)))
    sums = run_objective(model, objective, batches, batch_size, device, seed)
    report = {"task": "masked-lm", "mlm_accuracy": sums["mlm_accuracy"], "mlm_loss": sums["mlm_loss"],
              "masked_tokens": int(sums["mlm_count"]), "batches": batches}
    if nsp:
        report["nsp_accuracy"] = sums["nsp_accuracy"]
    return report


@torch.no_grad()
def _perplexity(model, tok, files, batch_size, max_length, device):
    from chatforge.data.shards import find_inputs, text_pieces

    ids: list[int] = []
    for i, path in enumerate(find_inputs(files)):
        if i and tok.eos_id is not None:
            ids.append(tok.eos_id)  # the document boundary, as in the training shards
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for piece in tok.encode_batch(text_pieces(text)):
            ids.extend(piece)
    if len(ids) < 2:
        raise DataError("the text is too short to measure perplexity: it needs at least two tokens")
    tokens = torch.tensor(ids, dtype=torch.long)
    # consecutive windows; each token after the first is predicted once, from its window's earlier tokens
    starts = list(range(0, len(ids) - 1, max_length))
    loss_sum, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        xs, ys = [], []
        for s in starts[b:b + batch_size]:
            x, y = tokens[s:s + max_length], tokens[s + 1:s + max_length + 1]
            x = x[:len(y)]
            xs.append(F.pad(x, (0, max_length - len(x)), value=tok.pad_id))
            ys.append(F.pad(y, (0, max_length - len(y)), value=-100))
        # the output head a chunk of positions at a time: never (batch, max_length, vocabulary) logits
        sums = selected_lm_sums(model, model(torch.stack(xs).to(device), logits="none"), torch.stack(ys).to(device))
        loss_sum += sums["loss_sum"]
        count += int(sums["count"])
    loss = loss_sum / count
    return {"task": "perplexity", "loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def summary(report: dict[str, Any]) -> str:
    """The report as a few readable lines (what `chatforge eval` prints)."""
    task = report.get("task")
    if task == "perplexity":
        return f"perplexity {report['perplexity']:.3f} (loss {report['loss']:.4f}) over {report['tokens']:,} tokens"
    if task == "masked-lm":
        line = (f"masked-LM accuracy {report['mlm_accuracy']:.4f} (loss {report['mlm_loss']:.4f}) "
                f"over {report['masked_tokens']:,} masked tokens")
        return line + (f"; next-sentence accuracy {report['nsp_accuracy']:.4f}" if "nsp_accuracy" in report else "")
    labels, cm = report["labels"], np.asarray(report["confusion_matrix"])
    width = max(8, *(len(x) for x in labels))
    lines = [f"accuracy {report['accuracy']:.4f} | macro-F1 {report['macro_f1']:.4f} | {report['examples']} examples",
             f"{'class':<{width}} precision  recall      f1  support"]
    for name in labels:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} {c['support']:8d}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f" {x:>{width}}" for x in labels))
    for name, row in zip(labels, cm):
        lines.append(f"{name:<{width}}" + "".join(f" {v:>{width}d}" for v in row))
    return "\n".join(lines)


__all__ = ["evaluate", "summary", "run_objective"]
