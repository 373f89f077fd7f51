"""Today's Hugging Face families on chatforge's one Transformer: Llama 3 rope scaling, Qwen3, Gemma 3 text
and Phi-3. Tiny random transformers models at odd sizes are saved, loaded with chatforge.loader.load and
must give the same logits at every position (fp32, 1e-4), the same greedy continuation through the
engine's KV cache, and, exported back, load in transformers with the same logits. What no chatforge
option computes is refused in one line naming it."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from chatforge import loader  # noqa: E402
from chatforge.config import ModelConfig  # noqa: E402
from chatforge.engine import Engine  # noqa: E402
from chatforge.errors import ChatforgeError, ConfigError  # noqa: E402
from chatforge.export import export_hf  # noqa: E402
from chatforge.model import Transformer, rope_frequencies  # noqa: E402
from chatforge.quantize import quantize_model  # noqa: E402
from chatforge.sizing.plan import count_params  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! How are you today? " * 3,
        "Models read tokens, tokens make text, and text makes models. " * 2]
SEQ = 24  # longer than every window and than the llama3 original context below

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(TEXT, vocab_size=311, show_progress=False)  # an odd vocabulary: 311 tokens


NO_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # nothing stops or pads generation early
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          # wavelengths 6.3 (kept: < 16/8), 40 (blended), 250 and more (stretched: > 16/1)
          "original_max_position_embeddings": 16}


def hf_config(kind: str, vocab: int):
    T = transformers
    return {
        "llama3": lambda: T.LlamaConfig(vocab_size=vocab, hidden_size=60, intermediate_size=84, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                        rope_scaling=dict(LLAMA3), rope_theta=10000.0, tie_word_embeddings=True,
                                        **NO_IDS),
        "llama_linear": lambda: T.LlamaConfig(vocab_size=vocab, hidden_size=60, intermediate_size=84,
                                              num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                              max_position_embeddings=64, rope_theta=5000.0,
                                              rope_scaling={"rope_type": "linear", "factor": 3.0}, **NO_IDS),
        # head_dim 18 is not 52 / 4
        "qwen3": lambda: T.Qwen3Config(vocab_size=vocab, hidden_size=52, intermediate_size=76, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=18,
                                       max_position_embeddings=64, tie_word_embeddings=True, rope_theta=20000.0,
                                       **NO_IDS),
        "qwen3_window": lambda: T.Qwen3Config(vocab_size=vocab, hidden_size=52, intermediate_size=76,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=14, max_position_embeddings=64, tie_word_embeddings=False,
                                              use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                              **NO_IDS),
        "gemma3": lambda: T.Gemma3TextConfig(vocab_size=vocab, hidden_size=48, intermediate_size=72,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, query_pre_attn_scalar=20, max_position_embeddings=64,
                                             sliding_window=5, rope_theta=50000.0, rope_local_base_freq=300.0,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             **NO_IDS),
        "gemma3_scaled": lambda: T.Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=80,
                                                    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=24, query_pre_attn_scalar=24, max_position_embeddings=64,
                                                    sliding_window=6, sliding_window_pattern=2,
                                                    rope_scaling={"rope_type": "linear", "factor": 8.0},
                                                    tie_word_embeddings=False, **NO_IDS),
        "phi3": lambda: T.Phi3Config(vocab_size=vocab, hidden_size=60, intermediate_size=84, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                     original_max_position_embeddings=64, **NO_IDS),
        "phi3_window": lambda: T.Phi3Config(vocab_size=vocab, hidden_size=48, intermediate_size=80,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                            original_max_position_embeddings=64, sliding_window=7, **NO_IDS),
    }[kind]()


KINDS = ["llama3", "llama_linear", "qwen3", "qwen3_window", "gemma3", "gemma3_scaled", "phi3", "phi3_window"]


def make_hf_model(kind: str, vocab: int, seed: int = 0):
    """A random transformers model, every parameter moved away from its init (norms not 1 or 0)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, vocab), attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def save_hf(model, tok: Tokenizer, path):
    model.save_pretrained(path)
    tok.save(path)
    return path


def load(path) -> Transformer:
    model, _ = loader.load(str(path), device="cpu", dtype="fp32")
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_close(mine: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-4, relative to the logits' own size where they are large."""
    assert mine.shape == ref.shape
    err = (mine - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


def random_ids(vocab: int, shape=(2, SEQ), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """kind -> (transformers model, its saved directory), made once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            theirs = make_hf_model(kind, tok.vocab_size)
            cache[kind] = theirs, save_hf(theirs, tok, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


# --- loading: same logits, same greedy tokens ---------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, saved, tok):
    theirs, path = saved(kind)
    ours = load(path)
    ids = random_ids(tok.vocab_size)
    with torch.no_grad():
        mine = ours(ids)
        last = ours(ids, logits="last")
    ref = hf_logits(theirs, ids)
    assert_close(mine, ref)  # every position
    assert_close(last, ref[:, -1:])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_with_the_kv_cache_matches_transformers(kind, saved, tok):
    """Two prompts of different lengths in one batch (left padding, windows crossing the prompt) through
    the engine's KV cache; each continuation equals transformers' generate for that prompt alone. The
    explicit-attention path (trace=True) picks the same tokens."""
    theirs, path = saved(kind)
    engine = Engine(load(path), tok)
    prompts = [random_ids(tok.vocab_size, (1, n), seed=n)[0].tolist() for n in (9, 4)]
    ours = engine.generate(prompts, temperature=0, max_new_tokens=16, stop_token_ids=[])
    traced = engine.generate(prompts[:1], temperature=0, max_new_tokens=16, stop_token_ids=[], trace=True)
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert mine.token_ids == out[0, len(prompt):].tolist()
    assert traced[0].token_ids == ours[0].token_ids


def test_options_map_onto_the_config(saved):
    c = load(saved("llama3")[1]).config
    assert c.rope_scaling == LLAMA3 and c.tie_embeddings and c.n_kv_head == 2
    c = load(saved("qwen3")[1]).config
    assert (c.qk_norm, c.head_dim, c.n_embd // c.n_head, c.qkv_bias, c.bias, c.sliding_window) == \
        (True, 18, 13, False, False, None)
    c = load(saved("qwen3_window")[1]).config
    assert (c.sliding_window, c.local_layers, c.tie_embeddings) == (5, [1, 2], False)
    c = load(saved("gemma3")[1]).config
    assert (c.mlp, c.qk_norm, c.norm_plus_one, c.sandwich_norm, c.tie_embeddings) == \
        ("geglu_tanh", True, True, True, True)
    assert (c.embd_scale, c.attn_scale) == (48 ** 0.5, 20 ** -0.5)
    assert (c.sliding_window, c.local_layers, c.rope_theta, c.rope_local_theta) == (5, [0, 2], 50000.0, 300.0)
    c = load(saved("gemma3_scaled")[1]).config
    assert c.local_layers == [0, 2] and c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    c = load(saved("phi3_window")[1]).config
    assert (c.sliding_window, c.local_layers, c.mlp, c.bias) == (7, [0, 1], "swiglu", False)


def test_llama3_scaling_changes_the_logits(saved, tok):
    """The parity above is not vacuous: without the scaling the same weights give other logits."""
    theirs, path = saved("llama3")
    ours = load(path)
    ids = random_ids(tok.vocab_size)
    ours.config.rope_scaling = None
    with torch.no_grad():
        assert (ours(ids) - hf_logits(theirs, ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 2.5}])
def test_rope_frequencies_equal_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=10000.0,
                                      rope_scaling=dict(scaling))
    theirs, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert factor == 1.0 and torch.equal(rope_frequencies(32, 10000.0, scaling), theirs)


def _rewritten(path, copy, change):
    """A copy of the model directory `path` at `copy`, its config.json changed by `change(config)`."""
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _as_transformers4(kind: str):
    """config.json as transformers 4 wrote it: rope_theta and rope_scaling, Gemma 3's rope_local_base_freq and
    sliding_window_pattern, no rope_parameters or layer_types."""
    def change(config):
        params = config.pop("rope_parameters")
        if kind.startswith("gemma3"):
            config.pop("layer_types")
            config["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
            params = params["full_attention"]
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = params if params["rope_type"] != "default" else None
    return change


@pytest.mark.parametrize("kind", ["llama3", "gemma3_scaled"])
def test_transformers4_config_spelling(kind, saved, tok, tmp_path):
    theirs, path = saved(kind)
    ours = load(_rewritten(path, tmp_path / kind, _as_transformers4(kind)))
    ids = random_ids(tok.vocab_size)
    with torch.no_grad():
        assert_close(ours(ids), hf_logits(theirs, ids))


def test_new_options_train_quantize_and_count(tok):
    """A chatforge model with every new option: gradients reach every new weight, int8 stays close, the
    planner counts its parameters exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=44,
                      head_dim=12, intermediate_size=60, pos_encoding="rope", rope_local_theta=100.0,
                      rope_scaling={"rope_type": "linear", "factor": 2.0}, mlp="geglu_tanh", norm="rmsnorm",
                      norm_plus_one=True, sandwich_norm=True, qk_norm=True, embd_scale=44 ** 0.5, bias=False,
                      sliding_window=4, local_layers=[0, 2], attn_scale=0.3)
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    ids = random_ids(tok.vocab_size, (2, 20))
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name in ("attn.q_norm.weight", "attn.k_norm.weight", "post_attn_norm.weight", "post_mlp_norm.weight"):
        assert model.get_parameter(f"blocks.1.{name}").grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        full = model(ids)
        quantized = quantize_model(model, "int8", dtype=torch.float32)(ids)
    assert (quantized - full).abs().max().item() < 0.05 * full.abs().max().item()


def test_config_refuses_options_without_their_base():
    with pytest.raises(ConfigError, match="norm_plus_one"):
        ModelConfig(norm_plus_one=True)
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="embd_scale"):
        ModelConfig(embd_scale=0)
    with pytest.raises(ConfigError, match="high_freq_factor"):
        ModelConfig(pos_encoding="rope", rope_scaling={**LLAMA3, "high_freq_factor": 1.0})


# --- export back to Hugging Face ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, exported_as", [("llama3", "llama"), ("llama_linear", "llama"), ("qwen3", "qwen3"),
                                               ("qwen3_window", "qwen3"), ("gemma3", "gemma3_text"),
                                               ("gemma3_scaled", "gemma3_text"), ("phi3", "llama"),
                                               ("phi3_window", "mistral")])
def test_export_round_trip(kind, exported_as, saved, tok, tmp_path):
    """transformers model -> chatforge -> export_hf -> transformers: the same logits as the original.
    Phi-3 leaves as Llama (Mistral with its window): the same computation with q/k/v and gate/up unfused."""
    theirs, path = saved(kind)
    ours = load(path)
    out = export_hf(ours, tmp_path / "out", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["model_type"] == exported_as
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(tok.vocab_size)
    assert_close(hf_logits(back, ids), hf_logits(theirs, ids))
    again = load(out)  # and our own loader reads the export to the same model
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_export_qwen3_with_windows_on_some_layers(tok, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=40,
                      head_dim=14, pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, qk_norm=True,
                      sliding_window=4, local_layers=[0, 2], tie_embeddings=False, init_std=0.2)
    ours = Transformer(cfg).eval()
    out = export_hf(ours, tmp_path / "out", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(tok.vocab_size)
    with torch.no_grad():
        assert_close(ours(ids), hf_logits(back, ids))


GEMMA = dict(pos_encoding="rope", norm="rmsnorm", bias=False, mlp="geglu_tanh", norm_plus_one=True,
             sandwich_norm=True, qk_norm=True, embd_scale=32 ** 0.5)


@pytest.mark.parametrize("options, words", [
    (dict(GEMMA, qk_norm=False), "without qk_norm"),
    (dict(GEMMA, sandwich_norm=False), "without sandwich_norm"),
    (dict(pos_encoding="rope", norm="rmsnorm", bias=False, mlp="swiglu", norm_plus_one=True), "norm_plus_one without"),
    (dict(GEMMA, embd_scale=5.0), "embd_scale=5.0"),
    (dict(GEMMA, bias=True), "biases"),
    (dict(GEMMA, attn_scale=0.3), "attn_scale=0.3"),
    (dict(pos_encoding="rope", norm="rmsnorm", bias=True, mlp="swiglu", qk_norm=True), "qk_norm with biases"),
    (dict(pos_encoding="rope", norm="rmsnorm", bias=False, mlp="swiglu", sliding_window=4, rope_local_theta=10.0),
     "rope_local_theta"),
    (dict(qk_norm=True), "learned positions with qk_norm"),
    (dict(mlp="geglu_tanh"), "learned positions with mlp='geglu_tanh'"),
])
def test_export_refuses_what_no_family_computes(options, words, tok, tmp_path):
    model = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size, **options))
    with pytest.raises(ChatforgeError) as e:
        export_hf(model, tmp_path / "out", tokenizer=tok)
    assert words in str(e.value) and "cannot export" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- what is refused, in one line naming it -------------------------------------------------------------

@pytest.mark.parametrize("kind, change, words", [
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma3", {"model_type": "gemma3"}, "vision-language"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 5,
                                  "long_factor": [1.0] * 5}}, "rope scaling 'longrope'"),
    ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 5, "long_factor": [1.0] * 5}},
     "rope scaling 'su'"),
    ("phi3", {"partial_rotary_factor": 0.75, "rope_parameters": None}, "partial_rotary_factor"),  # Phi-4-mini
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling 'yarn'"),
    ("qwen3", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "chunked_attention"),
])
def test_unsupported_options_are_one_line_naming_them(kind, change, words, saved, tok, tmp_path):
    _, path = saved(kind)
    copy = _rewritten(path, tmp_path / "m", lambda config: config.update(change))
    with pytest.raises(ChatforgeError) as e:
        loader.load(str(copy), device="cpu")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_llama3_scaling_with_a_missing_number_names_it(saved, tmp_path):
    _, path = saved("llama3")
    copy = _rewritten(path, tmp_path / "m", lambda config: config["rope_parameters"].pop("low_freq_factor"))
    with pytest.raises(ChatforgeError) as e:
        loader.load(str(copy), device="cpu")
    assert "low_freq_factor" in str(e.value) and "\n" not in str(e.value)
