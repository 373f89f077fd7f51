"""Text classification: tables, splits, metrics, the head swap, early stopping on a metric, fine-tuning,
text-classification pipeline and evaluation, and the mistakes a user can make."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatforge import ModelConfig, TrainConfig, pipeline
from chatforge.formats.checkpoint import read_checkpoint as load_checkpoint, read_weights, save_checkpoint
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.data.tables import load_examples, read_table, split_table, stratified_split
from chatforge.train.classify import classification_metrics, confusion_matrix, finetune_classifier, with_classifier
from chatforge.train.objectives import Objective
from chatforge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = "xyz zzk kyx yyk".split()  # the classes' words share no letter with each other or the filler
BAD = "qvw jbq wvj bbq".split()
FILLER = "the a film it and so on he me".split()


def reviews(n: int, seed: int = 0, words=(GOOD, BAD, FILLER)) -> list[tuple[str, str]]:
    """(text, label): a text is good or bad by the one mood word among filler words."""
    good, bad, filler = words
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "good" if i % 3 else "bad"  # two good for each bad
        words = list(rng.choice(filler, 3)) + [rng.choice(good if label == "good" else bad)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path, rows, header=("label", "text")):
    path.write_text("\t".join(header) + "\n" + "".join(f"{y}\t{x}\n" for x, y in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char([" ".join(GOOD + BAD + FILLER) + "\"'.,!?"])


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tok):
    """A tiny random encoder with BERT's NSP head, as pretrain_encoder leaves one."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32, causal=False,
                         type_vocab_size=2, embd_norm=True, pooler=True, num_labels=2, labels=["is_next", "not_next"])
    path = tmp_path_factory.mktemp("models") / "encoder"
    save_checkpoint(path, Transformer(config), tok)
    return path


def quick(out_dir, **overrides) -> TrainConfig:
    fields = dict(out_dir=str(out_dir), max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=20,
                  log_interval=20, progress=False, precision="fp32", weight_decay=0.01, save_interval=1000)
    return TrainConfig(**{**fields, **overrides})


# --- metrics --------------------------------------------------------------------------------------

def test_metrics_equal_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 7)
    # precision a 1/2, b 2/3, c 2/2; recall a 1/2, b 2/2, c 2/3; F1 a 0.5, b 0.8, c 0.8
    assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [m["per_class"][c]["recall"] for c in "abc"] == pytest.approx([0.5, 1.0, 2 / 3])
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([0.5, 0.8, 0.8])
    assert [m["per_class"][c]["support"] for c in "abc"] == [2, 2, 3]
    assert m["macro_f1"] == pytest.approx(0.7)
    never_predicted = classification_metrics(confusion_matrix([0, 1], [0, 0], 2))
    assert never_predicted["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


# --- data ----------------------------------------------------------------------------------------------

def test_tables_in_three_formats(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"Hello, world",pos\nplain,neg\n')
    assert read_table(csv_path) == (["text", "label"], [{"text": "Hello, world", "label": "pos"},
                                                         {"text": "plain", "label": "neg"}])
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text('Label\tSMS\nham\tHe said "hi\nspam\t"Win" now\n')  # quotes in a TSV are plain text
    assert [r["SMS"] for r in read_table(tsv_path)[1]] == ['He said "hi', '"Win" now']
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text('{"t": "a", "y": 1}\n\n{"t": "b", "y": 0}\n')
    ex = load_examples(jsonl_path, "t", "y")
    assert ex.texts == ["a", "b"] and ex.labels == ["1", "0"]


def test_stratified_split_is_seeded_disjoint_and_keeps_proportions():
    labels = ["a"] * 800 + ["b"] * 200
    train, val, test = stratified_split(labels, [0.1, 0.2], seed=3)
    assert sorted(train + val + test) == list(range(1000))
    assert (len(val), len(test)) == (100, 200)
    assert sum(labels[i] == "b" for i in val) == 20 and sum(labels[i] == "b" for i in test) == 40
    assert stratified_split(labels, [0.1, 0.2], seed=3) == [train, val, test]
    assert stratified_split(labels, [0.1, 0.2], seed=4)[1] != val


def test_split_table_writes_the_same_split_finetune_makes(tmp_path):
    data = write_tsv(tmp_path / "d.tsv", reviews(90))
    parts = split_table(data, tmp_path / "split", text_column="text", label_column="label", seed=7)
    examples = load_examples(data, "text", "label")
    index = stratified_split(examples.labels, [0.1, 0.1], seed=7)
    for (name, path), idx in zip(parts.items(), index):
        assert load_examples(path, "text", "label").texts == examples.subset(idx).texts, name


def test_bad_input_is_one_clear_line(tmp_path, encoder_dir):
    cfg = quick(tmp_path / "run")
    data = write_tsv(tmp_path / "d.tsv", reviews(30))

    def one_line_error(match, **kw):
        with pytest.raises(ChatforgeError, match=match) as err:
            finetune_classifier(kw.pop("data", data), str(encoder_dir), cfg, **{"text_column": "text",
                                                                                "label_column": "label", **kw})
        assert "\n" not in str(err.value)
        return str(err.value)

    msg = one_line_error("no label column 'sentiment'", label_column="sentiment")
    assert msg.endswith("its columns are: label, text")
    one_class = write_tsv(tmp_path / "one.tsv", [(x, "good") for x, _ in reviews(10)])
    one_line_error("single class in column 'label'", data=one_class)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    one_line_error("is empty", data=empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    one_line_error("has a header but no rows", data=header_only)
    one_line_error("metric", metric="f2")
    one_line_error("lora_rank must be a positive integer", lora_rank=-1)
    one_line_error("pooling", pooling="median")
    with pytest.raises(DataError, match="unknown table format"):
        read_table(write_tsv(tmp_path / "d.xlsx", []))


def test_empty_texts_are_skipped_and_counted(tmp_path):
    path = tmp_path / "holes.tsv"
    path.write_text("label\ttext\ngood\tnice day\nbad\t\ngood\t   \nbad\tgrim\n\t no label\n")
    with pytest.warns(UserWarning, match="skipped 3 of 5 rows"):
        ex = load_examples(path, "text", "label")
    assert ex.texts == ["nice day", "grim"]


# --- the model --------------------------------------------------------------------------------------------------

def test_head_replacement_keeps_every_encoder_weight(encoder_dir):
    base, _ = load_checkpoint(encoder_dir)
    clf = with_classifier(base, ["x", "y", "z"], dropout=0.2)
    before, after = base.state_dict(), clf.state_dict()
    assert set(before) == set(after)
    for name, tensor in before.items():
        if name.startswith("classifier."):
            assert after[name].shape[0] == 3 and tensor.shape[0] == 2
        else:
            assert torch.equal(after[name], tensor), name
    assert clf.config.task == "classify" and clf.config.labels == ["x", "y", "z"] and clf.config.pooling == "cls"
    assert clf.config.dropout == 0.2 and clf.pooler is not None
    scratch = with_classifier(base, ["x", "y"], random_init=True, seed=1)
    assert not torch.equal(scratch.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    decoder = Transformer(ModelConfig.preset("test"))
    assert with_classifier(decoder, ["x", "y"]).config.pooling == "last"
    with pytest.raises(ConfigError, match="decoder"):
        with_classifier(decoder, ["x", "y"], pooling="cls")


def test_pooling_reads_cls_last_real_token_or_mean():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for pooling, expected in (("cls", hidden[:, 0]), ("last", torch.stack([hidden[0, 2], hidden[1, 3]])),
                              ("mean", torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))):
        model = Transformer(ModelConfig.preset("test", pooling=pooling, num_labels=2))
        assert torch.allclose(model.pool(hidden, mask), expected)


# --- early stopping on a metric ------------------------------------------------------------------------------------

class ScriptedAccuracy(Objective):
    """Real gradient steps on random tokens; the validation 'accuracy' follows a script."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def sample(self, split, n, generator):
        return torch.randint(0, 512, (n, 9), generator=generator)

    def collate(self, split, items):
        return {"input_ids": items[:, :-1], "labels": items[:, 1:]}

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())

    def evaluate(self, model, batch):
        return {"loss": 1.0}

    def summarize(self, sums, batches):
        self.calls += 1
        return {"val_loss": 1.0, "accuracy": self.script[min(self.calls, len(self.script)) - 1]}


def test_early_stopping_on_a_metric_restores_the_best_weights(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", block_size=16))
    cfg = quick(tmp_path / "run", max_steps=100, eval_interval=2, eval_iters=1, patience=3, log_interval=2,
                metric="accuracy", metric_mode="max", restore_best=True, save_interval=1000)
    result = Trainer(model, ScriptedAccuracy([0.5, 0.8, 0.7, 0.8, 0.6, 0.9]), cfg).fit()
    # best at the 2nd evaluation (step 4); 3 evaluations without a higher accuracy (steps 6, 8, 10): stop
    assert result["stopped_early"] and result["step"] == 10 and result["best_step"] == 4
    assert result["best_metric"] == 0.8
    best = read_weights(tmp_path / "run" / "best" / "model.safetensors")
    last = read_weights(tmp_path / "run" / "last" / "model.safetensors")
    assert json.loads((tmp_path / "run" / "best" / "training.json").read_text())["step"] == 4
    for name, tensor in model.state_dict().items():
        if name in best:
            assert torch.equal(tensor, best[name]), name
    assert not torch.equal(best["blocks.0.attn.qkv.weight"], last["blocks.0.attn.qkv.weight"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in rows if "accuracy" in r] == [0.5, 0.8, 0.7, 0.8, 0.6]
    with pytest.raises(ConfigError, match="metric 'f1' is not among"):
        Trainer(Transformer(ModelConfig.preset("test")), ScriptedAccuracy([0.5]),
                quick(tmp_path / "r2", max_steps=2, eval_interval=2, eval_iters=1, metric="f1")).fit()


# --- fine-tuning end to end -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, encoder_dir, one_thread):
    root = tmp_path_factory.mktemp("clf")
    data = write_tsv(root / "reviews.tsv", reviews(300))
    result = finetune_classifier(data, str(encoder_dir), quick(root / "run", max_steps=80, patience=3),
                                 text_column="text", label_column="label", metric="macro_f1")
    return root, data, result


def test_finetune_classifier_learns_and_reports(finetuned):
    root, _, result = finetuned
    out = root / "run"
    assert result["labels"] == ["bad", "good"] and result["examples"] == {"train": 240, "val": 30, "test": 30}
    assert result["val"]["macro_f1"] == pytest.approx(result["best_metric"])  # the restored best weights
    assert result["test"]["accuracy"] > 0.9 and result["test"]["macro_f1"] > 0.9
    assert set(result["test"]["per_class"]) == {"bad", "good"} and np.sum(result["test"]["confusion_matrix"]) == 30
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["accuracy"] == result["test"]["accuracy"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"accuracy", "macro_f1", "val_loss"} <= set(r) for r in rows if "val_loss" in r)
    assert (out / "loss.png").stat().st_size > 0
    model, _ = load_checkpoint(out / "best")
    assert model.config.labels == ["bad", "good"] and model.config.task == "classify"


def test_text_classification_pipeline_and_evaluation(finetuned, encoder_dir, tmp_path):
    from chatforge.train.evaluate import evaluate, summary

    root, data, result = finetuned
    best = str(root / "run" / "best")
    classify = pipeline("text-classification", model=best, device="cpu")
    out = classify("he and the xyz film")
    assert len(out) == 1 and set(out[0]) == {"label", "score"} and out[0]["label"] == "good"
    assert 0.5 < out[0]["score"] <= 1.0
    both = classify(["so qvw", "a film zzk"])
    assert [o["label"] for o in both] == ["bad", "good"]
    every = classify("so qvw", top_k=None)
    assert [o["label"] for o in every] == ["bad", "good"] and sum(o["score"] for o in every) == pytest.approx(1.0)
    test = write_tsv(tmp_path / "test.tsv", reviews(40, seed=9), header=("label", "review"))
    report = evaluate(best, str(test), device="cpu")  # columns found by name: label + the only other one
    assert report["task"] == "classification" and report["examples"] == 40 and report["accuracy"] > 0.9
    assert "macro-F1" in summary(report) and "confusion matrix" in summary(report)
    with pytest.raises(ChatforgeError, match="not a text classifier"):
        pipeline("text-classification", model=str(encoder_dir), device="cpu")


def test_decoders_fine_tune_too_and_scratch_runs(tmp_path, tok):
    torch.manual_seed(0)
    decoder = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size, block_size=32, pos_encoding="rope"))
    save_checkpoint(tmp_path / "gpt", decoder, tok)
    data = write_tsv(tmp_path / "d.tsv", reviews(120))
    for kw in ({"pooling": "mean"}, {"random_init": True}):
        result = finetune_classifier(data, str(tmp_path / "gpt"), quick(tmp_path / str(len(kw)) / str(kw)[2:6],
                                     max_steps=10, eval_interval=5), text_column="text", label_column="label",
                                     test_fraction=0, **kw)
        assert "test" not in result and 0 <= result["val"]["accuracy"] <= 1 and math.isfinite(result["val"]["loss"])


def test_lora_trains_adapters_and_the_head_then_merges(tmp_path, encoder_dir):
    data = write_tsv(tmp_path / "d.tsv", reviews(120))
    result = finetune_classifier(data, str(encoder_dir), quick(tmp_path / "run", max_steps=20, eval_interval=10),
                                 text_column="text", label_column="label", lora_rank=4, test_fraction=0)
    assert result["model_dir"] == str(tmp_path / "run" / "merged")
    base, _ = load_checkpoint(encoder_dir)
    merged, _ = load_checkpoint(result["model_dir"])  # a plain checkpoint: adapters folded in
    before, after = base.state_dict(), merged.state_dict()
    assert torch.equal(before["wte.weight"], after["wte.weight"])  # frozen, not adapted
    assert torch.equal(before["blocks.0.mlp.fc.weight"], after["blocks.0.mlp.fc.weight"])
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])  # adapted
    assert not torch.equal(before["pooler.weight"], after["pooler.weight"])  # the head trains
    assert after["classifier.weight"].shape == (2, 32)
    best = read_weights(tmp_path / "run" / "best" / "model.safetensors")
    assert any(k.endswith("lora_A") for k in best)
    assert pipeline("text-classification", model=result["model_dir"], device="cpu")("so qvw")[0]["label"] in {
        "bad", "good"}
