"""BERT-family encoders in and out: tiny random transformers models (BERT, RoBERTa, DistilBERT, with and
without their masked-LM and pre-training heads) loaded onto chatforge's one Transformer give the same
hidden states, MLM logits and next-sentence logits on padded batches; chatforge encoders export to the
family that computes the same; fill-mask runs on a Hugging Face MLM checkpoint; refusals are one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from chatforge import pipeline  # noqa: E402
from chatforge.config import ModelConfig  # noqa: E402
from chatforge.errors import ChatforgeError, ConfigError  # noqa: E402
from chatforge.export import export_hf  # noqa: E402
from chatforge.formats.hf.read import read_hf_tokenizer  # noqa: E402
from chatforge.loader import load  # noqa: E402
from chatforge.model import Transformer  # noqa: E402
from chatforge.sizing.plan import count_params  # noqa: E402
from encoder_helpers import VOCAB, randomize, save_hf, write_vocab  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = transformers
V = len(VOCAB)
ROBERTA_PAD = 1  # RoBERTa's padding_idx: its positions start at 2


def bert_config(**kw):  # odd sizes: width 30, 5 heads of 6, MLP 37, 3 layers
    return T.BertConfig(vocab_size=V, hidden_size=30, num_hidden_layers=3, num_attention_heads=5,
                        intermediate_size=37, max_position_embeddings=40, type_vocab_size=3, **kw)


def roberta_config(**kw):
    return T.RobertaConfig(vocab_size=V, hidden_size=30, num_hidden_layers=2, num_attention_heads=3,
                           intermediate_size=37, max_position_embeddings=40 + ROBERTA_PAD + 1, type_vocab_size=1,
                           pad_token_id=ROBERTA_PAD, bos_token_id=2, eos_token_id=3, **kw)


def distilbert_config(**kw):
    return T.DistilBertConfig(vocab_size=V, dim=30, n_layers=2, n_heads=5, hidden_dim=37, max_position_embeddings=40,
                              **kw)


ARCHITECTURES = {
    "BertModel": lambda: T.BertModel(bert_config()),
    "BertForMaskedLM": lambda: T.BertForMaskedLM(bert_config()),
    "BertForPreTraining": lambda: T.BertForPreTraining(bert_config(hidden_act="gelu_new")),
    "RobertaModel": lambda: T.RobertaModel(roberta_config()),
    "RobertaForMaskedLM": lambda: T.RobertaForMaskedLM(roberta_config()),
    "DistilBertModel": lambda: T.DistilBertModel(distilbert_config()),
    "DistilBertForMaskedLM": lambda: T.DistilBertForMaskedLM(distilbert_config()),
}


def batch(name: str):
    """Three rows of 13: one full, one right-padded, one left-padded; segments 0 then 1 where the family has them."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :4] = 0
    pad = ROBERTA_PAD if name.startswith("Roberta") else 0
    ids = ids.masked_fill(mask == 0, pad)
    types = None
    if name.startswith("Bert"):
        types = torch.zeros_like(ids)
        types[:, 6:] = 1
    return ids, mask, types


def hf_outputs(model, ids, mask, types):
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    logits = getattr(out, "prediction_logits", None)
    logits = logits if logits is not None else getattr(out, "logits", None)
    return out.hidden_states[-1], logits, getattr(out, "seq_relationship_logits", None)


def ours_outputs(model, ids, mask, types):
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, token_type_ids=types, logits="none")
        logits = model(ids, attention_mask=mask, token_type_ids=types) if model.config.task == "lm" else None
        nsp = model(ids, attention_mask=mask, token_type_ids=types, logits="classify") if model.config.num_labels \
            else None
    return hidden, logits, nsp


def assert_same(ours, theirs, what: str, atol: float = 1e-4) -> None:
    assert (ours is None) == (theirs is None), what
    if ours is not None:
        assert ours.shape == theirs.shape, what
        assert torch.allclose(ours, theirs, atol=atol, rtol=0), f"{what}: {(ours - theirs).abs().max():.3g}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each architecture saved once: (its transformers model, its directory)."""
    out = {}
    for i, (name, make) in enumerate(ARCHITECTURES.items()):
        torch.manual_seed(i)
        model = randomize(make(), seed=i)
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_hidden_states_and_mlm_logits_match_transformers(name, saved):
    hf_model, directory = saved[name]
    model, tok = load(directory, device="cpu", dtype="fp32")
    config = model.config
    assert not config.causal and config.post_norm and config.embd_norm
    assert config.task == ("lm" if "MaskedLM" in name or "PreTraining" in name else "features")
    assert config.mlm_head == (config.task == "lm")
    assert config.num_labels == (2 if "PreTraining" in name else 0)
    assert count_params(config) == model.num_params()
    ids, mask, types = batch(name)
    for what, ours, theirs in zip(("hidden states", "MLM logits", "next-sentence logits"),
                                  ours_outputs(model, ids, mask, types), hf_outputs(hf_model, ids, mask, types)):
        assert_same(ours, theirs, f"{name} {what}")
    assert tok.special["mask"] == "[MASK]" and tok.token_id("pad") == 0


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_export_round_trip(name, saved, tmp_path):
    """Loaded, exported, read back by transformers (the class config.json names) and by chatforge: the same."""
    hf_model, directory = saved[name]
    model, tok = load(directory, device="cpu", dtype="fp32")
    out = export_hf(model, tmp_path / "out", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [name]
    back = getattr(T, config["architectures"][0]).from_pretrained(out).eval()
    ids, mask, types = batch(name)
    for what, a, b in zip(("hidden states", "logits", "nsp"), hf_outputs(back, ids, mask, types),
                          hf_outputs(hf_model, ids, mask, types)):
        assert_same(a, b, f"{name} {what} after export", atol=1e-6)
    again, _ = load(out, device="cpu", dtype="fp32")
    assert again.config == model.config
    text = "The quick brown fox jumps, very fast!"
    assert T.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == [
        tok.token_id("cls"), *tok.encode(text), tok.token_id("sep")]
    if name.endswith("Model"):  # an encoder without LM head also leaves as a sentence-transformers directory
        assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True


def own_encoder(**options) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=V, block_size=24, n_layer=2, n_head=3, n_embd=27, intermediate_size=41, causal=False,
                post_norm=True, embd_norm=True, type_vocab_size=2, norm_eps=1e-12)
    model = Transformer(ModelConfig(**{**base, **options}))
    return randomize(model, seed=3)


@pytest.mark.parametrize("options, architecture", [
    (dict(mlm_head=True, pooler=True, num_labels=2, labels=["is_next", "not_next"]), "BertForPreTraining"),
    (dict(mlm_head=True, mlp="relu"), "BertForMaskedLM"),
    (dict(task="features", pooler=True, pooling="mean", normalize=True), "BertModel"),
    (dict(mlm_head=True, position_offset=2, type_vocab_size=1), "RobertaForMaskedLM"),
    (dict(mlm_head=True, type_vocab_size=0), "DistilBertForMaskedLM"),
])
def test_chatforge_encoders_export_to_the_family_that_computes_the_same(options, architecture, tmp_path):
    model = own_encoder(**options)
    tok = read_hf_tokenizer(write_vocab(tmp_path))
    out = export_hf(model, tmp_path / "hf", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    theirs = getattr(T, architecture).from_pretrained(out).eval()
    family = "Roberta" if "position_offset" in options else "Distil" if "type_vocab_size" in options else "Bert"
    ids, mask, types = batch(family)  # RoBERTa's padding is its padding_idx (1), one below the first position
    for what, a, b in zip(("hidden states", "logits", "nsp"), ours_outputs(model, ids, mask, types),
                          hf_outputs(theirs, ids, mask, types)):
        assert_same(a, b, f"{architecture} {what}")


@pytest.mark.parametrize("options, message", [
    (dict(post_norm=False, mlm_head=True), "post_norm"),
    (dict(), "masked-LM head without BERT's transform"),
    (dict(mlm_head=True, norm="rmsnorm"), "layernorm"),
    (dict(task="classify", num_labels=3, pooler=True), "classifier"),
])
def test_encoders_transformers_cannot_run_are_refused(options, message, tmp_path):
    with pytest.raises(ChatforgeError, match=message):
        export_hf(own_encoder(**options), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_bert_mini_preset_says_how_to_become_exportable(tmp_path):
    with pytest.raises(ChatforgeError, match="--post-norm"):
        export_hf(Transformer(ModelConfig.preset("bert-mini", mlm_head=True)), tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    (dict(post_norm=True, sandwich_norm=True), "pick one"),
    (dict(position_offset=2, pos_encoding="rope"), "pos_encoding='learned'"),
    (dict(mlm_head=True, mlp="swiglu"), "activation"),
    (dict(task="features", mlm_head=True), "features"),
    (dict(embed_max_len=99), "embed_max_len"),
    (dict(pooling="median"), "pooling"),
])
def test_config_refuses_impossible_encoder_options(options, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("test", **options)


def test_mlm_head_is_what_the_pretraining_objective_scores():
    """chatforge's own MLM objective reads the same head (lm_logits) a loaded BertForMaskedLM answers with."""
    model = own_encoder(mlm_head=True)
    ids, mask, types = batch("Bert")
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, token_type_ids=types, logits="none")
        assert torch.equal(model.lm_logits(hidden), model(ids, attention_mask=mask, token_type_ids=types))
    assert set(dict(model.named_parameters())) >= {"lm_transform.dense.weight", "lm_transform.norm.weight",
                                                   "lm_head.bias"}


def test_tensorflow_era_names_buffers_and_tied_copies_load(saved, tmp_path):
    """BERT's original checkpoints: LayerNorm.gamma/.beta, a position_ids buffer, the tied decoder stored."""
    hf_model, directory = saved["BertForMaskedLM"]
    state = load_file(directory / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    renamed["bert.embeddings.position_ids"] = torch.arange(40)[None]
    renamed["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    renamed["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    old = tmp_path / "old"
    old.mkdir()
    save_file(renamed, str(old / "model.safetensors"))
    (old / "config.json").write_text((directory / "config.json").read_text())
    write_vocab(old)
    model, _ = load(old, device="cpu", dtype="fp32")
    ids, mask, types = batch("Bert")
    assert_same(ours_outputs(model, ids, mask, types)[1], hf_outputs(hf_model, ids, mask, types)[1], "logits")


def test_a_base_model_saved_without_its_pooler_loads(tmp_path):
    model = randomize(T.BertModel(bert_config(), add_pooling_layer=False))
    ours, _ = load(save_hf(model, tmp_path), device="cpu", dtype="fp32")
    assert ours.config.task == "features" and not ours.config.pooler
    ids, mask, types = batch("Bert")
    assert_same(ours_outputs(ours, ids, mask, types)[0], hf_outputs(model, ids, mask, types)[0], "hidden")


LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.parametrize("make, name", [
    (lambda: T.BertForSequenceClassification(bert_config(num_labels=3, id2label=LABELS)), "Bert"),
    (lambda: T.RobertaForSequenceClassification(roberta_config(num_labels=3, id2label=LABELS)), "Roberta"),
])
def test_sequence_classification_checkpoints_load_with_their_head_and_labels(make, name, tmp_path):
    """BERT's pooler + classifier and RoBERTa's dense + tanh + out_proj are chatforge's pooler + classifier."""
    hf_model = randomize(make(), seed=7)
    ours, _ = load(save_hf(hf_model, tmp_path), device="cpu", dtype="fp32")
    assert ours.config.task == "classify" and ours.config.labels == list(LABELS.values())
    ids, mask, types = batch(name)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, **({} if types is None else {"token_type_ids": types}))
        logits = ours(ids, attention_mask=mask, token_type_ids=types, logits="classify")
    assert_same(logits, theirs.logits, f"{name} classifier logits")
    got = pipeline("text-classification", model=str(tmp_path), device="cpu", dtype="fp32")("the cat sat")
    want = transformers.pipeline("text-classification", model=str(tmp_path), device="cpu")("the cat sat")
    assert got[0]["label"] == want[0]["label"] and got[0]["score"] == pytest.approx(want[0]["score"], abs=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: T.BertModel(bert_config(position_embedding_type="relative_key")), "relative position"),
    (lambda: T.BertForTokenClassification(bert_config(num_labels=3)), "task head other than"),
    (lambda: T.BertForSequenceClassification(bert_config(num_labels=1)), "regression"),
    (lambda: T.DistilBertForSequenceClassification(distilbert_config(num_labels=2)), "pre_classifier"),
])
def test_encoders_chatforge_cannot_compute_are_refused_in_one_line(make, message, tmp_path):
    save_hf(randomize(make()), tmp_path)
    with pytest.raises(ChatforgeError, match=message) as e:
        load(tmp_path, device="cpu")
    assert "\n" not in str(e.value)


def test_fill_mask_on_a_hugging_face_mlm_checkpoint(saved):
    """pipeline("fill-mask") on a BertForMaskedLM directory gives transformers' own fill-mask answers."""
    _, directory = saved["BertForMaskedLM"]
    ours = pipeline("fill-mask", model=str(directory), device="cpu", dtype="fp32")
    theirs = transformers.pipeline("fill-mask", model=str(directory), device="cpu")
    text = "the cat sat on the [MASK] ."
    got, want = ours(text, top_k=5), theirs(text, top_k=5)
    assert [r["token_str"] for r in got] == [r["token_str"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)


def test_fill_mask_refuses_an_encoder_without_mlm_head(saved):
    _, directory = saved["BertModel"]
    with pytest.raises(ChatforgeError, match="without a masked-LM head"):
        pipeline("fill-mask", model=str(directory), device="cpu")
