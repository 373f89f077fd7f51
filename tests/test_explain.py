"""Explanations: attention maps, the engine's attention trace, token alternatives, the logit lens,
input attribution, and `chatforge explain` end to end."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

from chatforge import ModelConfig, Tokenizer, Transformer
from chatforge.formats.checkpoint import save_checkpoint
from chatforge.engine import Engine, GenerationConfig
from chatforge.errors import ChatforgeError
from chatforge.explain.attention import attention_maps, explain_attention
from chatforge.explain.attribution import attention_rollout, attribute_text
from chatforge.explain.tokens import explain_generation, inspect_reply, logit_lens
from chatforge.loader import load

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog. qz"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char([TEXT])


def decoder(tok, seed=0, **overrides) -> Transformer:
    """A random decoder with weights large enough that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    options = dict(vocab_size=tok.vocab_size, init_std=0.3, pos_encoding="rope", n_kv_head=1, n_layer=3)
    return Transformer(ModelConfig.preset("test", **{**options, **overrides})).eval()


def ids_of(tok, text="the lazy dog jumps"):
    return tok.encode(text)


# --- attention maps -----------------------------------------------------------------------------------

def test_attention_rows_sum_to_one_and_never_look_ahead(tok):
    model, ids = decoder(tok), ids_of(tok)
    maps = attention_maps(model, ids)
    T = len(ids)
    assert len(maps) == 3 and all(m.shape == (2, T, T) for m in maps)
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(2, T), atol=1e-5)
        assert (m >= 0).all()
        assert (m.triu(1) == 0).all()  # a query never attends to a later key
        assert (m[:, torch.ones(T, T, dtype=torch.bool).tril()] > 0).all()  # ...and to every earlier one a little
    # causality by intervention: changing the last token leaves every earlier row unchanged
    changed = attention_maps(model, ids[:-1] + [tok.encode("q")[0]])
    for a, b in zip(maps, changed):
        assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])


def test_encoder_attention_is_bidirectional(tok):
    model, ids = decoder(tok, causal=False), ids_of(tok)
    for m in attention_maps(model, ids):
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-5)
        later = torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1)
        assert (m[:, later] > 0).all()  # every token sees the tokens after it too


def test_sliding_window_layers_ignore_far_keys(tok):
    model, ids = decoder(tok, sliding_window=3, local_layers=[1]), ids_of(tok)
    maps = attention_maps(model, ids)
    far = torch.ones(len(ids), len(ids), dtype=torch.bool).tril(-3)  # keys 3 or more positions back
    assert (maps[1][:, far] == 0).all() and (maps[0][:, far] > 0).all()


def test_explicit_attention_path_computes_the_same_logits(tok):
    model, ids = decoder(tok), torch.tensor([ids_of(tok)])
    fast = model(ids)
    explicit, _ = model(ids, return_attention=True)
    assert torch.allclose(fast, explicit, atol=1e-4)


def test_heatmap_png(tok, tmp_path):
    model = decoder(tok)
    path = explain_attention(model, tok, "the fox", layer=0, head=1, out_png=tmp_path / "a.png")
    grid = explain_attention(model, tok, "the fox", layer=-1, grid=True, out_png=tmp_path / "g.png")
    for p in (path, grid):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    with pytest.raises(ChatforgeError, match="head 5 does not exist"):
        explain_attention(model, tok, "the fox", head=5, out_png=tmp_path / "x.png")
    with pytest.raises(ChatforgeError, match="layer 3 does not exist"):
        explain_attention(model, tok, "the fox", layer=3, out_png=tmp_path / "x.png")


# --- the engine's trace and explained generation ------------------------------------------------------------

@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=8, seed=3)])
def test_explain_path_gives_the_same_tokens_as_the_engine(tok, sampling):
    model, prompt = decoder(tok), ids_of(tok)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[], **sampling)
    [normal] = Engine(model, tok).generate(prompt, config)
    explained = explain_generation(model, tok, prompt, 12, stop_token_ids=[], **sampling)
    assert explained.token_ids == normal.token_ids and explained.text == normal.text
    assert explained.finish_reason == normal.finish_reason == "length"
    # each step's probability is the model's own softmax at that prefix (computed here independently)
    seq = prompt + explained.token_ids
    with torch.no_grad():
        probs = model(torch.tensor([seq])).softmax(-1)[0]
    for j, step in enumerate(explained.steps):
        pos = len(prompt) - 1 + j
        assert step["prob"] == pytest.approx(float(probs[pos, seq[pos + 1]]), abs=1e-5)
        assert [a["id"] for a in step["alternatives"]] == probs[pos].topk(5).indices.tolist()
    # the attention the engine traced step by step (KV cache) is one forward pass's attention
    traced = explained.attention_maps()
    full = attention_maps(model, seq[:-1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(traced, full))


def test_a_stop_token_is_explained_and_marked(tok):
    model, prompt = decoder(tok), ids_of(tok)
    [free] = Engine(model, tok).generate(prompt, temperature=0, max_new_tokens=8, stop_token_ids=[])
    stop = [free.token_ids[3]]  # make a token the greedy run reaches a stop token
    [normal] = Engine(model, tok).generate(prompt, temperature=0, max_new_tokens=8, stop_token_ids=stop)
    explained = explain_generation(model, tok, prompt, 8, stop_token_ids=stop)
    assert explained.token_ids == normal.token_ids and explained.finish_reason == normal.finish_reason == "stop"
    assert len(explained.steps) == len(normal.token_ids) + 1 == normal.completion_tokens
    assert explained.steps[-1]["stop"] and explained.steps[-1]["id"] == stop[0]
    assert not any(s.get("stop") for s in explained.steps[:-1])


def test_engine_trace_in_a_padded_batch_matches_each_prompt_alone(tok):
    model = decoder(tok)
    prompts = [ids_of(tok, "the"), ids_of(tok, "over the lazy dog")]
    config = GenerationConfig(temperature=0, max_new_tokens=5, stop_token_ids=[])
    engine = Engine(model, tok)
    batch = engine.generate(prompts, config, trace=True)
    for prompt, together in zip(prompts, batch):
        [alone] = engine.generate(prompt, config, trace=True, use_cache=False)
        assert together.token_ids == alone.token_ids
        for a, b in zip(together.trace, alone.trace):
            assert a.token == b.token and torch.allclose(a.logits, b.logits, atol=1e-4)
            assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.attention, b.attention))
    assert engine.generate(prompts, config)[0].trace is None  # the normal path records nothing


def test_only_traced_generation_takes_the_explicit_attention_path(tok, monkeypatch):
    from chatforge.model import Attention

    calls = []
    explicit = Attention._explicit
    monkeypatch.setattr(Attention, "_explicit", lambda self, *args: calls.append(1) or explicit(self, *args))
    engine, prompts = Engine(decoder(tok), tok), [ids_of(tok, "the"), ids_of(tok, "a dog")]
    normal = engine.generate(prompts, temperature=0, max_new_tokens=4, stop_token_ids=[])
    assert calls == [] and all(g.trace is None for g in normal)
    traced = engine.generate(prompts, temperature=0, max_new_tokens=4, stop_token_ids=[], trace=True)
    assert len(calls) == 3 * 4 and [g.token_ids for g in traced] == [g.token_ids for g in normal]  # 3 layers x 4 steps


def test_inspect_reply_is_json_and_matches_the_model(tok):
    model = decoder(tok)
    prompt, reply = ids_of(tok, "the fox"), ids_of(tok, " jumps")
    rows = inspect_reply(model, tok, prompt, reply, top_k=3, top_attn=4)
    json.dumps(rows)
    seq = prompt + reply
    with torch.no_grad():
        probs = model(torch.tensor([seq])).softmax(-1)[0]
    assert [r["id"] for r in rows] == reply
    for j, r in enumerate(rows):
        pos = len(prompt) + j
        assert r["position"] == pos and r["text"] == tok.decode([reply[j]])
        assert r["prob"] == pytest.approx(float(probs[pos - 1, reply[j]]), abs=1e-5)
        assert r["rank"] == int((probs[pos - 1] > probs[pos - 1, reply[j]]).sum()) + 1
        assert len(r["alternatives"]) == 3 and len(r["attended"]) == 4
        assert all(0 <= a["index"] < pos for a in r["attended"])
        weights = [a["weight"] for a in r["attended"]]
        assert weights == sorted(weights, reverse=True)
    assert inspect_reply(model, tok, prompt, []) == []
    with pytest.raises(ChatforgeError):
        inspect_reply(model, tok, [], reply)


# --- logit lens -------------------------------------------------------------------------------------------

def test_logit_lens_final_layer_is_the_models_own_prediction(tok, tmp_path):
    model, ids = decoder(tok), ids_of(tok)
    lens = logit_lens(model, tok, ids, top_k=3)
    assert lens.layers == ["embed", "layer 0", "layer 1", "layer 2"]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).softmax(-1)[0]
    top = probs.topk(3)
    assert (torch.from_numpy(lens.top_ids[-1]) == top.indices).all()
    assert torch.allclose(torch.from_numpy(lens.top_probs[-1]), top.values, atol=1e-5)
    assert not (lens.top_ids[0] == lens.top_ids[-1]).all()  # earlier layers predict something else
    json.dumps(lens.to_dict())
    assert "layer 2" in lens.table() and lens.save_png(tmp_path / "lens.png").stat().st_size > 5000


# --- input attribution ----------------------------------------------------------------------------------

def keyword_classifier(tok, keyword: str = "q") -> Transformer:
    """A decoder classifier that decides by one letter: the blocks are switched off (their output
    projections are zero), so the mean-pooled vector is the mean of the token embeddings, and only
    `keyword`'s embedding points along the direction that separates the two labels."""
    torch.manual_seed(0)
    config = ModelConfig.preset("test", vocab_size=tok.vocab_size, task="classify", num_labels=2,
                                labels=["ham", "spam"], pooling="mean", norm="rmsnorm", bias=False)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            if name.endswith("proj.weight"):
                p.zero_()
        model.wpe.weight.zero_()
        model.wte.weight.normal_()
        model.wte.weight[:, 0] = -0.2  # every token leans a little towards ham...
        model.wte.weight[tok.encode(keyword)[0], 0] = 30.0  # ...the keyword strongly towards spam
        direction = torch.zeros(config.n_embd)
        direction[0] = 20.0
        model.classifier.weight.copy_(torch.stack([-direction, direction]))
        model.classifier.bias.zero_()
    return model


def test_gradient_times_input_finds_the_deciding_token(tok):
    model = keyword_classifier(tok)
    text = "the lazy q dog"
    a = attribute_text(model, tok, text)
    assert a.target == "spam" and a.prob > 0.9
    q = a.ids.index(tok.encode("q")[0])
    assert max(range(len(a.scores)), key=lambda i: a.scores[i]) == q and a.scores[q] > 0
    against = attribute_text(model, tok, text, target="ham")
    assert against.prob < 0.1 and min(range(len(a.scores)), key=lambda i: against.scores[i]) == q
    assert attribute_text(model, tok, "the lazy dog").target == "ham"
    assert "<span" in a.html_page() and json.dumps(a.to_dict())
    with pytest.raises(ChatforgeError, match="unknown label"):
        attribute_text(model, tok, text, target="eggs")


def test_attention_rollout_is_a_causal_distribution(tok):
    model = decoder(tok)
    ids = ids_of(tok)
    rollout = attention_rollout(attention_maps(model, ids))
    assert torch.allclose(rollout.sum(-1), torch.ones(len(ids)), atol=1e-5) and (rollout.triu(1) == 0).all()
    a = attribute_text(model, tok, "the lazy dog jumps", method="rollout")  # a language model: the next token
    assert a.ids == ids and a.scores == pytest.approx(rollout[-1].tolist(), abs=1e-6)


# --- `chatforge explain` ----------------------------------------------------------------------------------

def ok(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cli_explain_attention_and_tokens(chat_model_dir, tmp_path):
    png = tmp_path / "attn.png"
    out = ok(run_cli("explain", "--model", str(chat_model_dir), "--text", "Hello you", "--layer", "0", "--head", "1",
                     "--out", str(png), "--device", "cpu"))
    assert f"wrote {png}" in out and png.read_bytes()[:4] == b"\x89PNG"
    result = json.loads(ok(run_cli("explain", "--model", str(chat_model_dir), "--mode", "tokens", "--text", "Hello",
                                   "--max-new-tokens", "6", "--json", "--device", "cpu")))
    model, tok = load(str(chat_model_dir), device="cpu")
    [normal] = Engine(model, tok).generate(tok.encode("Hello"), temperature=0, max_new_tokens=6)
    assert result["token_ids"] == normal.token_ids and result["text"] == normal.text
    assert len(result["steps"]) == normal.completion_tokens


def test_cli_explain_attribution_and_bad_input(tok, tmp_path):
    save_checkpoint(tmp_path / "clf", keyword_classifier(tok), tok)
    page = tmp_path / "why.html"
    out = ok(run_cli("explain", "--model", str(tmp_path / "clf"), "--mode", "attribution", "--text", "the q dog",
                     "--out", str(page), "--device", "cpu"))
    assert "why 'spam'" in out and "<span" in page.read_text()
    bad = run_cli("explain", "--model", str(tmp_path / "clf"), "--text", "the dog", "--layer", "7", "--device", "cpu")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["chatforge explain: error: layer 7 does not exist: the model has "
                                               "2 layers (0..1)"]
