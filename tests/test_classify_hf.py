"""Fine-tuning a classifier from Hugging Face models: a tiny random BertModel directory (as save_pretrained
writes it, and as a sentence-transformers directory that pools by mean) gets a head over [CLS] or the mean
of its tokens, trains, saves, loads back and classifies through the pipeline and `chatforge eval`; the CLI
takes the directory; a decoder-only HF model still fine-tunes as before. (fill-mask on a BertForMaskedLM
directory: tests/test_encoders.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from conftest import run_cli  # noqa: E402

from chatforge import TrainConfig, pipeline  # noqa: E402
from chatforge.formats.checkpoint import read_checkpoint  # noqa: E402
from chatforge.loader import load  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402
from chatforge.train.classify import finetune_classifier, with_classifier  # noqa: E402
from encoder_helpers import VOCAB, randomize, save_hf, sentence_transformers_dir  # noqa: E402
from test_classify import quick as quick_run, reviews as classify_reviews, write_tsv  # noqa: E402
from test_hf import TEXT, make_hf_model, save_hf as save_hf_decoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the label is the mood word's; the filler words are shared: words of the tiny WordPiece vocabulary
WORDS = ("cat red fast big".split(), "dog blue slow small".split(), "the a sat on mat is was and very".split())


def reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    return classify_reviews(n, seed, WORDS)


def quick(out_dir, **overrides) -> TrainConfig:
    return quick_run(out_dir, **{"max_steps": 80, **overrides})


def bert_model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=48)
    return randomize(transformers.BertModel(config))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BertModel directory (pooler, no LM head): chatforge loads it as task="features"."""
    return save_hf(bert_model(), tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    """The same model as a sentence-transformers directory: mean pooling, then unit length (all-MiniLM-L6-v2's)."""
    return sentence_transformers_dir(bert_model(), tmp_path_factory.mktemp("hf") / "st", pooling="mean")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tsv(tmp_path_factory.mktemp("data") / "reviews.tsv", reviews(240))


def test_a_features_encoder_becomes_a_classifier_pooling_as_its_checkpoint_says(bert_dir, st_dir):
    base, _ = load(str(bert_dir), device="cpu")
    assert base.config.task == "features" and base.config.pooler
    clf = with_classifier(base, ["bad", "good"])
    assert clf.config.task == "classify" and clf.config.pooling == "cls" and clf.pooler is not None
    before, after = base.state_dict(), clf.state_dict()
    for name, tensor in before.items():  # every encoder weight, the pooler included, is the checkpoint's
        if not name.startswith("lm_head."):
            assert torch.equal(after[name], tensor), name
    st, _ = load(str(st_dir), device="cpu")
    assert st.config.pooling == "mean" and st.config.normalize
    mean = with_classifier(st, ["bad", "good"])
    # sentence-transformers pools by mean: so does the head, without BERT's pooler, which was trained on [CLS]
    assert mean.config.pooling == "mean" and mean.pooler is None and not mean.config.pooler
    assert not mean.config.normalize
    assert "pooler.weight" not in mean.state_dict()
    assert torch.equal(mean.state_dict()["blocks.1.attn.qkv.weight"], st.state_dict()["blocks.1.attn.qkv.weight"])
    assert with_classifier(st, ["bad", "good"], pooling="cls").pooler is not None  # asked for: [CLS] + pooler


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_finetune_from_a_hugging_face_encoder_dir_saves_reloads_and_classifies(pooling, bert_dir, data, tmp_path):
    result = finetune_classifier(data, str(bert_dir), quick(tmp_path / "run"), text_column="text",
                                 label_column="label", metric="macro_f1", pooling=pooling)
    assert result["labels"] == ["bad", "good"] and result["examples"] == {"train": 192, "val": 24, "test": 24}
    assert result["test"]["accuracy"] > 0.85, result["test"]
    best = tmp_path / "run" / "best"
    model, tok = read_checkpoint(best)
    assert model.config.task == "classify" and model.config.pooling == pooling
    assert (model.pooler is not None) == (pooling == "cls")
    assert tok.token_id("cls") is not None  # the checkpoint's WordPiece vocabulary travels with it
    classify = pipeline("text-classification", model=str(best), device="cpu")
    texts, labels = zip(*reviews(30, seed=7))
    predicted = [o["label"] for o in classify(list(texts))]
    assert np.mean([p == y for p, y in zip(predicted, labels)]) > 0.85
    # the pipeline answers what the restored best weights answer
    assert classify("the cat sat on the mat", top_k=None)[0]["score"] > 0.5


def test_finetune_cli_takes_a_hugging_face_dir_and_eval_scores_it(st_dir, data, tmp_path):
    out = tmp_path / "clf"
    args = ["--max-steps", "80", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "4", "--eval-interval", "40",
            "--log-interval", "40", "--no-progress", "--precision", "fp32", "--device", "cpu"]
    done = run_cli("finetune", "--task", "classify", "--model", str(st_dir), "--data", str(data), "--metric",
                   "macro_f1", *args, "--out-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[test]" in done.stdout and "confusion matrix" in done.stdout
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["task"] == "classify" and config["pooling"] == "mean" and not config["pooler"]  # the ST pooling
    report = run_cli("eval", "--model", str(out / "best"), "--data", str(data), "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    scored = json.loads(report.stdout)
    assert scored["examples"] == 240 and scored["accuracy"] > 0.85
    bad = run_cli("finetune", "--task", "classify", "--model", str(st_dir), "--data", str(data), "--pooling", "cls",
                  "--lr", "-1", "--out-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_decoder_only_hugging_face_model_still_fine_tunes(data, tmp_path):
    tok = Tokenizer.train_bpe(TEXT, vocab_size=300, show_progress=False)
    directory = save_hf_decoder(make_hf_model("llama", tok), tok, tmp_path / "llama")
    result = finetune_classifier(data, str(directory), quick(tmp_path / "run", max_steps=10, eval_interval=5),
                                 text_column="text", label_column="label", test_fraction=0)
    assert "test" not in result and 0 <= result["val"]["accuracy"] <= 1
    model, _ = read_checkpoint(tmp_path / "run" / "best")
    assert model.config.causal and model.config.pooling == "last" and model.config.task == "classify"
    out = pipeline("text-classification", model=str(tmp_path / "run" / "best"), device="cpu")("the cat sat")
    assert out[0]["label"] in ("bad", "good")


def test_the_minilm_recipe_figures_are_in_the_readme_and_kept_in_docs_benchmarks():
    """The recipe's table is in README and docs/benchmarks.md; regenerating the latter keeps it (benchmarks/notes)."""
    from pathlib import Path

    from benchmarks import report

    root = Path(__file__).resolve().parents[1]
    note = (root / "benchmarks" / "notes" / "sms_classify.md").read_text().strip()
    assert "recipes/sms_minilm.sh ../shared/data/sms_spam.tsv" in note and "0.9809" in note and "0.9655" in note
    assert note in report.markdown({"results": {}})
    assert note in (root / "docs" / "benchmarks.md").read_text()
    readme = (root / "README.md").read_text()
    assert "recipes/sms_minilm.sh" in readme and "99.10% / 0.981" in readme and "98.39% / 0.966" in readme
