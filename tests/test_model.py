"""The Transformer: causality, positional encodings, attention options, config round trip."""
from __future__ import annotations

import math

import pytest
import torch

from chatforge.config import PRESETS, ModelConfig
from chatforge.errors import ConfigError
from chatforge.model import Transformer, apply_rope, rope_cos_sin, sinusoidal_encoding

VARIANTS = {
    "gpt": dict(),
    "llama": dict(pos_encoding="rope", n_kv_head=1, mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False),
    "sinusoidal": dict(pos_encoding="sinusoidal", mlp="gelu_tanh"),
    "window": dict(sliding_window=3, local_layers=[1], qkv_bias=False, attn_scale=1.0),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_changing_a_later_token_never_changes_earlier_logits(name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", **VARIANTS[name])).eval()
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_encoder_is_bidirectional():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", causal=False, type_vocab_size=2)).eval()
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 512
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(y)[:, 0])
        seg = torch.zeros_like(x)
        seg[:, 6:] = 1
        assert not torch.allclose(model(x), model(x, token_type_ids=seg))


def test_sinusoidal_encoding_matches_the_formula():
    d = 16
    pe = sinusoidal_encoding(torch.arange(50)[None], d)[0]
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_rotary_matches_a_rotation_computed_by_hand():
    d, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, d)
    cos, sin = rope_cos_sin(torch.arange(5)[None], d, theta)
    out = apply_rope(x, cos, sin)[0, 0]
    for pos in range(5):
        for i in range(d // 2):
            angle = pos * theta ** (-2 * i / d)
            a, b = x[0, 0, pos, i].item(), x[0, 0, pos, i + d // 2].item()
            assert out[pos, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert out[pos, i + d // 2].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    d = 8
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), d, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), d, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", n_layer=1, sliding_window=3)).eval()
    x = torch.randint(0, 512, (1, 10))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % 512
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, 8:], b[:, 8:], atol=1e-6)  # position 5 is outside 8's window of 3
    assert not torch.allclose(a[:, 5:8], b[:, 5:8])


def test_grouped_query_attention_equals_repeated_heads():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test", n_head=4, n_kv_head=2, n_embd=32)
    gqa = Transformer(cfg).eval()
    mha = Transformer(ModelConfig.preset("test", n_head=4, n_embd=32)).eval()
    sd = gqa.state_dict()
    hd = cfg.dim_head
    for i in range(cfg.n_layer):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        b = sd[f"blocks.{i}.attn.qkv.bias"]
        q, k, v = w.split([4 * hd, 2 * hd, 2 * hd])
        qb, kb, vb = b.split([4 * hd, 2 * hd, 2 * hd])
        rep = lambda t: t.view(2, hd, *t.shape[1:]).repeat_interleave(2, 0).reshape(4 * hd, *t.shape[1:])
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat([qb, rep(kb), rep(vb)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_left_padding_gives_the_same_logits_as_no_padding():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", **VARIANTS["llama"])).eval()
    x = torch.randint(0, 512, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], 1).long()
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded, attention_mask=mask)[:, 3:], atol=1e-5)


def test_explicit_attention_path_equals_sdpa_and_weights_sum_to_one():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", **VARIANTS["window"])).eval()
    x = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        fast = model(x)
        slow, weights = model(x, return_attention=True)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert len(weights) == 2 and weights[0].shape == (1, 2, 10, 10)
    for w in weights:
        assert torch.allclose(w.sum(-1), torch.ones(1, 2, 10))
        assert torch.all(w.triu(1) == 0)  # causal
    assert torch.all(weights[1][0, :, 9, :7] == 0)  # window of 3 on layer 1


def test_tied_and_untied_heads():
    tied = Transformer(ModelConfig.preset("test"))
    untied = Transformer(ModelConfig.preset("test", tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == tied.num_params() + 512 * 32


def test_dropout_only_in_training_mode():
    model = Transformer(ModelConfig.preset("test", dropout=0.5))
    x = torch.randint(0, 512, (1, 8))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.allclose(model(x), model(x))


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = ModelConfig.preset(name)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("bad,fragment", [
    (dict(n_embd=30, n_head=4), "n_head (4) must divide n_embd (30)"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-3), "vocab_size must be a positive integer"),
    (dict(n_kv_head=3), "n_kv_head (3) must be positive and divide n_head"),
    (dict(pos_encoding="alibi"), "pos_encoding must be one of"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
])
def test_impossible_configs_are_refused_with_a_clear_message(bad, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig.preset("test", **bad)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_position_beyond_learned_context_is_a_clear_error():
    from chatforge.errors import ChatforgeError

    model = Transformer(ModelConfig.preset("test", block_size=8))
    with pytest.raises(ChatforgeError, match="context is 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_fused_linear_gelu_matches_the_separate_ops(monkeypatch):
    """Inference in bf16 on a CPU runs a GELU MLP's first layer and its GELU as one oneDNN call; it
    must compute what the separate ops compute, and training (autograd on) must not take it."""
    import chatforge.model as model_module

    if not model_module._fused_gelu_works():  # checked (and cached) before the op is wrapped below
        pytest.skip("this torch has no working oneDNN linear with a fused activation")
    calls = []
    fused = model_module._LINEAR_POINTWISE
    monkeypatch.setattr(model_module, "_LINEAR_POINTWISE", lambda *a: calls.append(a[3:]) or fused(*a))
    for mlp in ("gelu_tanh", "gelu"):
        torch.manual_seed(0)
        m = Transformer(ModelConfig.preset("test", mlp=mlp, n_embd=64, n_head=2)).to(torch.bfloat16)
        ids = torch.randint(0, m.config.vocab_size, (2, 16))
        calls.clear()
        with torch.no_grad():
            out = m(ids).float()
        assert len(calls) == m.config.n_layer and calls[0][2] == ("tanh" if mlp == "gelu_tanh" else "none")
        calls.clear()
        ref = m(ids).float()  # autograd on: the separate ops
        assert not calls
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_linear_fast_paths_leave_autocast_alone():
    """A block of rows inside CPU autocast (a bf16 evaluation during training) gets autocast's bf16 multiply,
    and the once-per-process oneDNN timing, when first asked from inside autocast, still measures fp32."""
    import chatforge.model as model_module

    model_module._onednn_pays.cache_clear()
    layer = model_module.Linear(384, 1536)
    x = torch.randn(2, 128, 384)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert layer.fused_gelu(x).dtype == torch.bfloat16
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
