"""Hugging Face interoperability: tiny random transformers models loaded onto chatforge's own
Transformer must give the same logits and greedy tokens; exported chatforge models must load
in transformers with the same logits and chat template; bad input is one clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from chatforge import loader  # noqa: E402
from chatforge.chat.template import CHATML_TEMPLATE, ChatFormat  # noqa: E402
from chatforge.formats.checkpoint import save_checkpoint  # noqa: E402
from chatforge.config import ModelConfig  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.export import export_hf  # noqa: E402
from chatforge.formats.hf import read_hf as load_hf  # noqa: E402
from chatforge.model import Transformer  # noqa: E402
from chatforge.tokenizer import Tokenizer  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! How are you today? " * 3,
        "Models read tokens, tokens make text, and text makes models. " * 2]
HUB_ID = "EleutherAI/gpt-neo-1.3B"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.train_bpe(TEXT, vocab_size=300, show_progress=False)
    t.chat_template = CHATML_TEMPLATE
    return t


def hf_config(kind: str, vocab: int):
    """Tiny configs: 2 layers, width 32, windows shorter than the test sequences."""
    T = transformers
    llama = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        "gpt2": lambda: T.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=5),
        "llama": lambda: T.LlamaConfig(**llama, rope_theta=50000.0, tie_word_embeddings=False),
        "llama_bias": lambda: T.LlamaConfig(**llama, attention_bias=True, mlp_bias=False, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**llama, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**llama, sliding_window=5, tie_word_embeddings=False),
    }[kind]()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter away from its init (biases non-zero, norms not 1), logits well spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def make_hf_model(kind: str, tok: Tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return randomize(transformers.AutoModelForCausalLM.from_config(hf_config(kind, tok.vocab_size)), seed)


def save_hf(model, tok: Tokenizer, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    tok.save(path)
    return path


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def greedy(forward, prompt: torch.Tensor, n: int = 32) -> list[int]:
    """n argmax tokens, each from a full forward pass over everything so far."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def assert_same_model(ours: Transformer, theirs, vocab: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    with torch.no_grad():
        mine = ours(ids)
    ref = hf_logits(theirs, ids)
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max().item() < 1e-4
    prompt = ids[:1, :8]
    assert greedy(ours, prompt) == greedy(lambda x: hf_logits(theirs, x), prompt)


# --- loading ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo", "llama", "llama_bias", "qwen2", "mistral"])
def test_load_matches_transformers(kind, tok, tmp_path):
    theirs = make_hf_model(kind, tok)
    path = save_hf(theirs, tok, tmp_path / kind)
    ours, our_tok = load_hf(path, device="cpu", dtype=torch.float32)
    assert isinstance(ours, Transformer)
    assert our_tok.encode(TEXT[0]) == tok.encode(TEXT[0])
    assert ChatFormat.for_tokenizer(our_tok).template == CHATML_TEMPLATE
    assert_same_model(ours, theirs, tok.vocab_size)


def test_family_options_map_onto_the_config(tok, tmp_path):
    neo, _ = load_hf(save_hf(make_hf_model("gpt_neo", tok), tok, tmp_path / "neo"))
    c = neo.config
    assert (c.sliding_window, c.local_layers, c.attn_scale, c.qkv_bias, c.mlp) == (5, [1], 1.0, False, "gelu_tanh")
    llama, _ = load_hf(save_hf(make_hf_model("llama", tok), tok, tmp_path / "llama"))
    c = llama.config
    assert (c.n_kv_head, c.rope_theta, c.norm, c.mlp, c.tie_embeddings) == (2, 50000.0, "rmsnorm", "swiglu", False)
    qwen, _ = load_hf(save_hf(make_hf_model("qwen2", tok), tok, tmp_path / "qwen"))
    assert (qwen.config.qkv_bias, qwen.config.bias, qwen.config.tie_embeddings) == (True, False, True)


def test_sharded_safetensors(tok, tmp_path):
    theirs = make_hf_model("llama", tok)
    path = save_hf(theirs, tok, tmp_path / "sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    ours, _ = load_hf(path)
    assert_same_model(ours, theirs, tok.vocab_size)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_pytorch_model_bin(kind, tok, tmp_path):
    theirs = make_hf_model(kind, tok)
    path = tmp_path / kind
    theirs.config.save_pretrained(path)
    tok.save(path)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    if kind == "gpt2":  # like the Hub's gpt2 file: saved from GPT2Model (no "transformer."), mask buffers kept
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    # else what transformers 4 wrote with safe_serialization=False: the whole state dict, tied head included
    torch.save(state, path / "pytorch_model.bin")
    ours, _ = load_hf(path)
    assert_same_model(ours, theirs, tok.vocab_size)


def test_dtype_conversion(tok, tmp_path):
    path = save_hf(make_hf_model("llama", tok), tok, tmp_path / "m")
    ours, _ = load_hf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(ours(ids).float()).all()


def test_loader_routes_hf_directories(tok, tmp_path):
    theirs = make_hf_model("gpt2", tok)
    ours, _ = loader.load(str(save_hf(theirs, tok, tmp_path / "g")), device="cpu", dtype="fp32")
    assert_same_model(ours, theirs, tok.vocab_size)


# --- Hub ids through the local cache --------------------------------------------------------

def fake_hub_cache(root, theirs, tok: Tokenizer):
    """The layout huggingface_hub writes: models--OWNER--NAME/{refs/main, snapshots/<hash>/...}.
    The tokenizer is GPT-2-style vocab.json + merges.txt, as in the real gpt-neo-1.3B repository."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    theirs.save_pretrained(snap)
    tok.hf.model.save(str(snap))
    (snap / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>", "special": True},
         "add_prefix_space": False}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_loads_from_the_cache(tok, tmp_path, monkeypatch):
    theirs = make_hf_model("gpt_neo", tok)
    fake_hub_cache(tmp_path / "hf" / "hub", theirs, tok)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, our_tok = loader.load(HUB_ID, device="cpu")
    assert_same_model(ours, theirs, tok.vocab_size)
    assert our_tok.encode(TEXT[1]) == tok.encode(TEXT[1])
    assert our_tok.eos_id == tok.eos_id
    assert ChatFormat.for_tokenizer(our_tok).is_fallback  # no template in the checkpoint: the plain fallback


def test_spec_example_pipeline_from_the_cache(tok, tmp_path, monkeypatch):
    """pipeline("conversational", model="EleutherAI/gpt-neo-1.3B") with the model in the HF cache."""
    from chatforge import pipeline

    fake_hub_cache(tmp_path / "cache", make_hf_model("gpt_neo", tok), tok)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat = pipeline("conversational", model=HUB_ID, device="cpu", max_new_tokens=6, temperature=0)
    conversation = chat("Hello world!")
    assert conversation.messages[-1]["role"] == "assistant"


def test_hub_id_honours_hf_hub_cache(tok, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "cache", make_hf_model("gpt_neo", tok), tok)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = loader.load(HUB_ID, device="cpu")
    assert model.config.local_layers == [1]


def test_hub_id_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ChatforgeError) as e:
        loader.load(HUB_ID, device="cpu")
    msg = str(e.value)
    assert HUB_ID in msg and str(tmp_path / "empty") in msg and f"download {HUB_ID}" in msg
    assert "HF_HOME" in msg and "\n" not in msg


# --- export -----------------------------------------------------------------------------------

EXPORTABLE = {
    "llama": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, n_kv_head=2, rope_theta=5e5),
    "llama_bias_untied": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=True, tie_embeddings=False),
    "qwen2": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, qkv_bias=True, n_kv_head=1),
    "mistral": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, sliding_window=5),
    "gpt2": dict(mlp="gelu_tanh"),
    "gpt2_gelu_untied": dict(mlp="gelu", tie_embeddings=False),
    "gpt_neo": dict(mlp="gelu_tanh", qkv_bias=False, attn_scale=1.0, sliding_window=5, local_layers=[1]),
}


def chatforge_model(tok: Tokenizer, **options) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test", vocab_size=tok.vocab_size, n_head=4, **options)
    return randomize(Transformer(cfg))


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_loads_in_transformers(name, tok, tmp_path):
    ours = chatforge_model(tok, **EXPORTABLE[name])
    out = export_hf(ours, tmp_path / "out", tokenizer=tok)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_model(ours, theirs, tok.vocab_size)
    back, _ = load_hf(out)  # and round-trips through our own loader unchanged
    assert back.config.n_embd == ours.config.n_embd
    ids = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))


def test_export_carries_tokenizer_and_chat_template(tok, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", chatforge_model(tok, **EXPORTABLE["llama"]), tok)
    out = export_hf(str(ckpt), str(tmp_path / "out"))  # the CLI's call: a checkpoint dir and an output dir
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.chat_template == CHATML_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ChatFormat.for_tokenizer(tok).render(messages)
    assert hf_tok(TEXT[2], add_special_tokens=False)["input_ids"] == tok.encode(TEXT[2])
    assert hf_tok.eos_token == "<|endoftext|>"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id and config["model_type"] == "llama"


@pytest.mark.parametrize("options, reason", [
    (dict(pos_encoding="sinusoidal"), "sinusoidal positions have no transformers equivalent"),
    (dict(causal=False, type_vocab_size=2, embd_norm=True), "pre-norm blocks (post_norm=False)"),  # BERT's are post-norm
    (dict(pos_encoding="rope"), "norm='layernorm'"),
    (dict(n_kv_head=2), "grouped-query attention"),
    (dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, sliding_window=4, local_layers=[0]),
     "local_layers"),
    (dict(qkv_bias=False), "attn_scale=1.0"),
    (dict(bias=False), "bias=False"),
])
def test_export_refuses_what_transformers_cannot_run(options, reason, tok, tmp_path):
    with pytest.raises(ChatforgeError) as e:
        export_hf(chatforge_model(tok, **options), tmp_path / "out", tokenizer=tok)
    assert reason in str(e.value) and "cannot export" in str(e.value)
    assert not (tmp_path / "out").exists()


# --- bad input: one clear ChatforgeError each ---------------------------------------------------

def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ChatforgeError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert "no config.json" in one_line_error(load_hf, tmp_path / "m")
    assert "no config.json" in one_line_error(loader.load, str(tmp_path / "m"), device="cpu")


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "t5", "hidden_size": 32}))
    msg = one_line_error(loader.load, str(tmp_path / "m"), device="cpu")
    assert "'t5'" in msg and "gpt2, gpt_neo, llama, mistral, qwen2" in msg and "bert, roberta, distilbert" in msg


def test_weights_that_do_not_fit_the_config(tok, tmp_path):
    path = save_hf(make_hf_model("llama", tok), tok, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    msg = one_line_error(load_hf, path)
    assert "gate_proj.weight has shape [48, 32]" in msg and "[64, 32]" in msg


def test_truncated_safetensors(tok, tmp_path):
    path = save_hf(make_hf_model("gpt2", tok), tok, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "truncated" in one_line_error(load_hf, path)
    weights.write_bytes(b"\x05")
    assert "not a readable safetensors file" in one_line_error(load_hf, path)


def test_truncated_pytorch_bin(tok, tmp_path):
    path = tmp_path / "m"
    theirs = make_hf_model("gpt_neo", tok)
    theirs.config.save_pretrained(path)
    torch.save(theirs.state_dict(), path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "pytorch_model.bin" in one_line_error(load_hf, path)


def test_missing_shard_and_missing_weights(tok, tmp_path):
    path = save_hf(make_hf_model("llama", tok), tok, tmp_path / "m", max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert "shards" in one_line_error(load_hf, path)
    for f in path.glob("model*"):
        f.unlink()
    assert "has no weights" in one_line_error(load_hf, path)


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_features(change, words, tok, tmp_path):
    path = save_hf(make_hf_model("llama", tok), tok, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    assert words in one_line_error(load_hf, path)


def test_weights_of_another_model(tok, tmp_path):
    gpt2 = save_hf(make_hf_model("gpt2", tok), tok, tmp_path / "gpt2")
    neo = save_hf(make_hf_model("gpt_neo", tok), tok, tmp_path / "neo")
    shutil.copy(gpt2 / "model.safetensors", neo / "model.safetensors")
    assert "q_proj" in one_line_error(load_hf, neo)
