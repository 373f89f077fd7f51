"""Encoders: BERT's masking, next-sentence pairs, MLM(+NSP) pre-training, fill-mask and its refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatforge import ModelConfig, TrainConfig, pipeline
from chatforge.formats.checkpoint import read_checkpoint as load_checkpoint, save_checkpoint
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.data.pairs import SentenceCorpus, nsp_pair
from chatforge.data.text import pair_layout, read_documents, split_sentences, truncate_pair
from chatforge.train.mlm import MaskedLM, Masker, pretrain_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the cat sat on a mat while every dog barked loudly at strangers passing by the old wooden gate "
         "and birds were singing their morning songs above quiet gardens full of yellow flowers").split()


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train_char(["".join(sorted(set(" ".join(WORDS) + ".,!?'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")))])


def prose(n_docs: int = 40, seed: int = 0) -> str:
    """Documents of a few sentences each, wrapped like prose, separated by blank lines."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS, rng.integers(4, 9))).capitalize() + "."
                     for _ in range(rng.integers(2, 6))]
        text = " ".join(sentences)
        docs.append("\n".join(text[i:i + 60] for i in range(0, len(text), 60)))
    return "\n\n".join(docs) + "\n"


def tiny_encoder(vocab_size: int, **overrides) -> ModelConfig:
    fields = dict(vocab_size=vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32, causal=False,
                  type_vocab_size=2, embd_norm=True)
    return ModelConfig(**{**fields, **overrides})


# --- text -> documents of sentences -----------------------------------------------------------------

def test_sentence_splitter_and_both_input_formats(tmp_path):
    assert split_sentences("It rained. Mr. Smith said \"Stop!\" Then he left?  Yes 3 times.\nThe end") == [
        "It rained.", "Mr. Smith said \"Stop!\"", "Then he left?", "Yes 3 times.", "The end"]
    lines = tmp_path / "lines.txt"
    lines.write_text("First sentence here.\nSecond one, Mr. X.\n\nAnother document.\nWith two lines.\n")
    assert read_documents([lines]) == [["First sentence here.", "Second one, Mr. X."],
                                       ["Another document.", "With two lines."]]
    wrapped = tmp_path / "prose.txt"
    wrapped.write_text("A long sentence that is\nwrapped over lines. And\nanother one\n\nNew paragraph here. Ok\n")
    assert read_documents([wrapped]) == [["A long sentence that is wrapped over lines.", "And another one"],
                                         ["New paragraph here.", "Ok"]]
    empty = tmp_path / "blank.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError):
        read_documents([empty])


# --- masking -----------------------------------------------------------------------------------------------

def test_masking_proportions_and_special_tokens_never_masked(char_tok):
    masker = Masker(char_tok)
    rng = np.random.default_rng(0)
    plain = np.array(sorted(set(range(char_tok.vocab_size)) - char_tok.special_ids))
    cls, sep, mask = (char_tok.token_id(r) for r in ("cls", "sep", "mask"))
    chosen = maskable = masked = randomised = kept = 0
    for _ in range(1500):
        body = rng.choice(plain, 100).tolist()
        ids = np.array([cls, *body[:50], sep, *body[50:], sep])
        out, labels = masker(ids, rng)
        picked = labels != -100
        special = np.isin(ids, list(char_tok.special_ids))
        assert not (picked & special).any() and (out[special] == ids[special]).all()
        assert (labels[picked] == ids[picked]).all()
        maskable += (~special).sum()
        chosen += picked.sum()
        masked += (out[picked] == mask).sum()
        kept += (out[picked] == ids[picked]).sum()
        randomised += ((out[picked] != mask) & (out[picked] != ids[picked])).sum()
        assert not np.isin(out[picked & (out != mask)], list(char_tok.special_ids)).any()
    assert abs(chosen / maskable - 0.15) < 0.01
    assert abs(masked / chosen - 0.80) < 0.01
    assert abs(randomised / chosen - 0.10) < 0.01
    assert abs(kept / chosen - 0.10) < 0.01


def test_whole_word_masking_takes_whole_words():
    tok = Tokenizer.train_bpe([prose(200)], vocab_size=330, show_progress=False)
    masker = Masker(tok, whole_word=True)
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(WORDS, 400))
    ids = np.array(tok.encode(text))
    words = masker.units(ids)
    assert any(len(w) > 1 for w in words)  # the small vocabulary splits some words into pieces
    chosen = maskable = 0
    for _ in range(200):
        _, labels = masker(ids, rng)
        picked = set(np.flatnonzero(labels != -100).tolist())
        for w in words:
            assert set(w) <= picked or not set(w) & picked  # a word is masked entirely or not at all
        chosen += len(picked)
        maskable += len(ids)
    assert abs(chosen / maskable - 0.15) < 0.01


def test_masks_are_drawn_afresh_for_each_draw(char_tok):
    corpus = SentenceCorpus.build([["the cat sat on the mat.", "every dog barked."], ["birds were singing."]],
                                  char_tok)
    objective = MaskedLM({"train": corpus, "val": corpus}, char_tok, 40, nsp=False, mask_prob=0.3)
    same = objective.collate("train", torch.tensor([[0, 1, 7], [0, 1, 7]]))
    assert torch.equal(same["input_ids"][0], same["input_ids"][1])  # an item is reproducible...
    other = objective.collate("train", torch.tensor([[0, 1, 8]]))
    assert not torch.equal(same["labels"][0], other["labels"][0])  # ...and a new draw has new masks


# --- sequence layout and next-sentence pairs ---------------------------------------------------------------

def test_pair_layout_and_segment_ids(char_tok):
    assert pair_layout([5, 6], [7], cls=1, sep=2) == ([1, 5, 6, 2, 7, 2], [0, 0, 0, 0, 1, 1])
    assert pair_layout([5], None, cls=1, sep=2) == ([1, 5, 2], [0, 0, 0])
    corpus = SentenceCorpus.build(read_documents_text(prose(20)), char_tok)
    objective = MaskedLM({"train": corpus, "val": corpus}, char_tok, 48)
    gen = torch.Generator().manual_seed(0)
    batch = objective.collate("train", objective.sample("train", 16, gen))
    cls, sep = char_tok.token_id("cls"), char_tok.token_id("sep")
    for ids, seg, att, labels in zip(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                     batch["labels"]):
        n = int(att.sum())
        assert n <= 48 and (att[:n] == 1).all() and (att[n:] == 0).all()
        original = torch.where(labels != -100, labels, ids)[:n].tolist()
        seps = [i for i, t in enumerate(original) if t == sep]
        assert original[0] == cls and len(seps) == 2 and seps[1] == n - 1 and seps[0] > 1
        assert seg[:seps[0] + 1].eq(0).all() and seg[seps[0] + 1:n].eq(1).all() and seg[n:].eq(0).all()
    only_mlm = MaskedLM({"train": corpus, "val": corpus}, char_tok, 48, nsp=False)
    batch = only_mlm.collate("train", only_mlm.sample("train", 8, gen))
    assert "next_sentence_label" not in batch and batch["token_type_ids"].eq(0).all()


def read_documents_text(text: str) -> list[list[str]]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "corpus.txt"
        path.write_text(text)
        return read_documents([path])


def test_next_sentence_pairs_are_balanced_and_true_pairs_follow_each_other():
    # 30 documents of 4 sentences; sentence s of document d is [100*d + 10*s + k for k in 0..2]
    tokens = np.array([100 * d + 10 * s + k for d in range(30) for s in range(4) for k in range(3)], dtype=np.int32)
    corpus = SentenceCorpus(tokens, np.arange(0, len(tokens) + 1, 3), np.arange(0, 121, 4))
    objective = MaskedLM.__new__(MaskedLM)  # only sample() is needed here
    objective.splits, objective.nsp = {"train": corpus}, True
    items = objective.sample("train", 4000, torch.Generator().manual_seed(0))
    assert abs(items[:, 1].float().mean().item() - 0.5) < 0.03
    rng = np.random.default_rng(0)
    for start, is_next, _ in items[:300].tolist():
        a, b = nsp_pair(corpus, start, bool(is_next), max_tokens=12, rng=rng)
        assert 0 < len(a) and 0 < len(b) and len(a) + len(b) <= 12
        doc_a, doc_b = a[0] // 100, b[0] // 100
        assert all(t // 100 == doc_a for t in a) and all(t // 100 == doc_b for t in b)
        if is_next:
            assert doc_a == doc_b and b[0] == a[-1] + 8  # B starts with the sentence right after A's last
        else:
            assert doc_a != doc_b


def test_bert_truncation_trims_the_longer_side():
    a, b = truncate_pair(list(range(10)), [20, 21, 22, 23], 8)
    assert (a, b) == ([0, 1, 2, 3], [20, 21, 22, 23])
    assert truncate_pair([1, 2, 3], [4, 5, 6], 4) == ([1, 2], [4, 5])  # a tie trims B first
    assert truncate_pair([1, 2], [3], 5) == ([1, 2], [3])
    a, b = truncate_pair(list(range(10)), [20, 21, 22, 23], 8, rng=np.random.default_rng(0))
    assert len(a) == len(b) == 4 and a != [0, 1, 2, 3]  # the same lengths, cut at either end


# --- the encoder model -----------------------------------------------------------------------------------------

def test_encoder_is_bidirectional_with_segments_and_either_position_encoding():
    for pos in ("learned", "sinusoidal"):
        torch.manual_seed(0)
        model = Transformer(tiny_encoder(64, pos_encoding=pos)).eval()
        ids = torch.randint(0, 64, (1, 10))
        h = model(ids, logits="none")
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % 64
        assert not torch.allclose(model(changed, logits="none")[0, 0], h[0, 0])  # the first token sees the last
        segments = torch.tensor([[0] * 5 + [1] * 5])
        assert not torch.allclose(model(ids, token_type_ids=segments, logits="none"), h)
    with pytest.raises(ChatforgeError, match="no sequence-level head"):
        model(ids, logits="classify")


# --- pre-training, fill-mask, evaluation ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("encoder")
    corpus = root / "corpus.txt"
    corpus.write_text(prose(60))
    config = TrainConfig(out_dir=str(root / "run"), max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3,
                         eval_interval=15, eval_iters=2, log_interval=15, progress=False, precision="fp32")
    result = pretrain_encoder([str(corpus)], tiny_encoder(1), config, tokenizer="char", val_fraction=0.2)
    return root, result


def test_pretrain_encoder_reports_masked_lm_and_next_sentence_accuracy(encoder_run):
    root, result = encoder_run
    out = root / "run"
    assert result["step"] == 30 and 0 <= result["mlm_accuracy"] <= 1 and 0 <= result["nsp_accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 2 and all({"mlm_accuracy", "nsp_accuracy", "mlm_loss", "nsp_loss"} <= set(r) for r in evals)
    assert evals[-1]["mlm_accuracy"] > 0.12  # well above chance (1/vocab) after a few steps
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["train"]["documents"] == 48 and meta["val"]["documents"] == 12
    model, tok = load_checkpoint(out / "best")
    assert not model.config.causal and model.config.num_labels == 2 and model.config.pooler
    assert model.config.task == "lm" and model.config.labels == ["is_next", "not_next"]


def test_fill_mask_pipeline_and_masked_lm_evaluation(encoder_run, tmp_path):
    from chatforge.train.evaluate import evaluate, summary

    root, _ = encoder_run
    unmask = pipeline("fill-mask", model=str(root / "run" / "best"), device="cpu", top_k=3)
    out = unmask("the cat sat on the [MASK]at.")
    assert len(out) == 3 and [set(o) for o in out] == [{"score", "token", "token_str", "sequence"}] * 3
    assert out[0]["score"] >= out[1]["score"] >= out[2]["score"] and sum(o["score"] for o in out) <= 1.0 + 1e-6
    assert out[0]["sequence"] == f"the cat sat on the {out[0]['token_str']}at."
    two = unmask("[MASK]he cat sat on the m[MASK]t.")
    assert len(two) == 2 and all(len(options) == 3 for options in two)
    assert len(unmask(["a [MASK]at", "the [MASK]og"])) == 2
    with pytest.raises(ChatforgeError, match="no \\[MASK\\]"):
        unmask("nothing to fill in")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(prose(10, seed=5))
    report = evaluate(str(root / "run" / "best"), str(held_out), device="cpu", batch_size=8)
    assert report["task"] == "masked-lm" and 0 < report["mlm_accuracy"] <= 1 and "nsp_accuracy" in report
    assert report == evaluate(str(root / "run" / "best"), str(held_out), device="cpu", batch_size=8)  # seeded
    assert "masked-LM accuracy" in summary(report)


def test_fill_mask_refuses_classifiers_and_decoders(encoder_run, tmp_path):
    from chatforge.train.classify import with_classifier

    root, _ = encoder_run
    model, tok = load_checkpoint(root / "run" / "best")
    save_checkpoint(tmp_path / "clf", with_classifier(model, ["ham", "spam"]), tok)
    with pytest.raises(ChatforgeError) as err:
        pipeline("fill-mask", model=str(tmp_path / "clf"), device="cpu")
    assert "text classifier (ham, spam)" in str(err.value) and "\n" not in str(err.value)
    decoder = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "gpt", decoder, tok)
    with pytest.raises(ChatforgeError, match="causal"):
        pipeline("fill-mask", model=str(tmp_path / "gpt"), device="cpu")


def test_pretrain_encoder_refuses_bad_setups(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(prose(5))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, progress=False)
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        pretrain_encoder([str(corpus)], ModelConfig.preset("test"), cfg, tokenizer="char")
    with pytest.raises(ConfigError, match="objective"):
        pretrain_encoder([str(corpus)], tiny_encoder(1), cfg, objective="clm")
    one_liners = tmp_path / "single.txt"
    one_liners.write_text("Just one sentence.\n\nAnd another.\n\nA third.\n")
    with pytest.raises(DataError, match="next-sentence"):
        pretrain_encoder([str(one_liners)], tiny_encoder(1), cfg, tokenizer="char", val_fraction=0.3)


def test_pretrain_encoder_resumes_and_trains_mlm_alone(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(prose(30))
    cfg = dict(out_dir=str(tmp_path / "run"), batch_size=4, eval_interval=5, eval_iters=1, log_interval=5,
               progress=False, precision="fp32", warmup_steps=1)
    pretrain_encoder([str(corpus)], tiny_encoder(1), TrainConfig(max_steps=5, **cfg), objective="mlm",
                     tokenizer="char", val_fraction=0.2)
    model, _ = load_checkpoint(tmp_path / "run" / "last")
    assert model.config.num_labels == 0 and model.config.pooler is False  # no next-sentence head for mlm alone
    result = pretrain_encoder([], tiny_encoder(1), TrainConfig(max_steps=8, **cfg), objective="mlm", resume=True)
    assert result["step"] == 8 and "nsp_accuracy" not in result and "mlm_accuracy" in result


def test_evaluate_gives_the_perplexity_of_a_causal_model(tmp_path, char_tok):
    from chatforge.train.evaluate import evaluate, summary

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=char_tok.vocab_size, block_size=16)).eval()
    text = "the cat sat on a mat while every dog barked."  # 44 characters: three windows of 16
    path = tmp_path / "t.txt"
    path.write_text(text)
    report = evaluate(model, str(path), tokenizer=char_tok)
    ids = torch.tensor(char_tok.encode(text))
    losses = [torch.nn.functional.cross_entropy(model(ids[s:s + 16][None, :len(ids[s + 1:s + 17])])[0],
                                                ids[s + 1:s + 17], reduction="sum") for s in (0, 16, 32)]
    assert report["tokens"] == len(ids) - 1
    assert report["loss"] == pytest.approx(float(sum(losses).detach()) / (len(ids) - 1), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert summary(report).startswith("perplexity")
