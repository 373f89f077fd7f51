"""The sizing advisor: parameter counts against real models (ours and transformers'), the load-memory
estimate against the measured peak, the recommendation, and `chatforge plan`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli

from chatforge.formats.checkpoint import save_checkpoint
from chatforge.config import PRESETS, ModelConfig
from chatforge.errors import ChatforgeError
from chatforge.sizing.plan import count_params, load_bytes, lora_params, parse_count, plan
from chatforge.lora import LoRAConfig, apply_lora
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
STATED = dict(tflops=10.0, bandwidth_gbs=100.0)  # no calibration: these tests are about memory


def real_count(config: ModelConfig) -> int:
    with torch.device("meta"):  # the real module structure, without allocating its weights
        return sum(p.numel() for p in Transformer(config).parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_of_every_preset(name):
    assert plan(name, **STATED).model.params == real_count(ModelConfig.preset(name))


@pytest.mark.parametrize("options", [
    dict(tie_embeddings=False, qkv_bias=True, bias=False),
    dict(task="classify", num_labels=3, pooler=True, causal=False, type_vocab_size=2, embd_norm=True),
    dict(n_kv_head=1, head_dim=24, intermediate_size=100, pos_encoding="rope", mlp="swiglu", norm="rmsnorm"),
])
def test_parameter_count_of_other_shapes(options):
    config = ModelConfig.preset("test", **options)
    assert count_params(config) == real_count(config)


def test_lora_count_matches_the_adapters_chatforge_adds():
    for config in (ModelConfig.preset("test"), ModelConfig.preset("mini", vocab_size=256)):
        model = Transformer(config)
        apply_lora(model, LoRAConfig(rank=4))
        assert lora_params(config, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


HF_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)),
    "gpt_neo": ("GPTNeoConfig", dict(num_layers=2, hidden_size=64, num_heads=4, max_position_embeddings=128,
                                     attention_types=[[["global", "local"], 1]], window_size=16)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=160,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                      sliding_window=32)),
}


def hf_model_and_config(kind: str) -> tuple[int, dict]:
    """(parameters of transformers' own model, its config.json as a dict) for a small config of `kind`."""
    transformers = pytest.importorskip("transformers")
    cls, options = HF_CONFIGS[kind]
    config = getattr(transformers, cls)(vocab_size=300, bos_token_id=0, eos_token_id=1, **options)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.to_dict()


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_parameter_count_of_hugging_face_configs(kind, tmp_path):
    theirs, config = hf_model_and_config(kind)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert plan(str(tmp_path / "config.json"), **STATED).model.params == theirs
    assert plan(str(tmp_path), **STATED).model.params == theirs  # the model directory works too


def test_hugging_face_id_reads_config_json_from_the_cache(tmp_path, monkeypatch):
    theirs, config = hf_model_and_config("llama")
    repo = tmp_path / "cache" / "models--someone--tiny-llama"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = plan("someone/tiny-llama", **STATED)
    assert p.model.params == theirs and p.model.source == "llama config"
    with pytest.raises(ChatforgeError, match="not in the Hugging Face cache"):
        plan("someone/absent", **STATED)


# --- memory to load, measured -----------------------------------------------------------------------------

CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
import chatforge.loader
from chatforge.config import ModelConfig
from chatforge.model import Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with torch.device("meta"):  # torch's one-time lazy imports are not load memory
    Transformer(ModelConfig.preset("test"))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak resident memory := current
base = status("VmRSS")
model, tok = chatforge.loader.load(sys.argv[1], device="cpu")
with torch.no_grad():  # every weight is in memory, not just mapped
    for p in model.parameters():
        p.sum()
print(status("VmHWM") - base)
"""

SIZES = {  # two sizes, each saved and loaded in its own dtype
    "fp32": dict(vocab_size=8192, block_size=256, n_layer=6, n_head=8, n_embd=512),
    "bf16": dict(vocab_size=16384, block_size=256, n_layer=8, n_head=12, n_embd=768, pos_encoding="rope",
                 mlp="swiglu", norm="rmsnorm", bias=False),
}


def test_load_memory_estimate_is_within_15_percent_of_the_measured_peak(tmp_path):
    tok = Tokenizer.train_char(["abc"])
    estimates, paths = [], []
    for dtype, options in SIZES.items():
        config = ModelConfig(**options)
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to_empty(device="cpu").to(torch.float32 if dtype == "fp32" else torch.bfloat16)
        model.lm_head.weight = model.wte.weight
        save_checkpoint(tmp_path / dtype, model, tok)
        del model
        estimates.append(plan(config, **STATED).load[dtype]["bytes"])
        paths.append(str(tmp_path / dtype))
    assert estimates[1] > 1.4 * estimates[0]  # two clearly different sizes
    # each load in a fresh process (memory freed in one process is reused without counting again)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for path in paths]
    for estimate, child in zip(estimates, children):
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        peak = int(out.strip().splitlines()[-1])
        assert abs(estimate - peak) / peak < 0.15, (estimate, peak)


# --- the plan ----------------------------------------------------------------------------------------------

def test_budgets_and_recommendation():
    p = plan("gpt2-124m", gpu_gb=0.1, **STATED)  # a 100 MB GPU: mini (24 MB in bf16) fits, GPT-2 does not
    n = p.model.params
    assert p.load["fp32"]["bytes"] == load_bytes(n, "fp32") and p.load["int8"]["bytes"] < p.load["bf16"]["bytes"]
    assert p.load["int4"]["bytes"] < 0.6 * p.load["int8"]["bytes"]  # half a byte per weight, plus group scales
    # weight-only quantization keeps the activations' dtype for the KV cache (bf16 or fp32), not int8/int4
    kv = {d: p.load[d]["kv_cache_bytes_per_1k"] for d in p.load}
    assert kv["int8"] == kv["int4"] == kv["bf16" if p.machine.bf16 else "fp32"]
    assert not p.load["bf16"]["fits"] and p.recommend["inference"] == "mini"  # every larger preset is > 100M
    for goal, key in (("lora", "lora_bytes"), ("full_finetune", "full_bytes")):
        chosen = next(r for r in p.presets if r["preset"] == p.recommend[goal])
        assert chosen[key] <= 0.9 * 0.1e9  # it fits, and no preset with more parameters does
        assert all(r[key] > 0.9 * 0.1e9 for r in p.presets if r["params"] > chosen["params"])
    full, lora = p.finetune["full"], p.finetune["lora"]
    assert full["weights"] + full["gradients"] + full["optimizer"] == 16 * n
    assert lora["trainable"] == lora_params(p.model.config, 8) and lora["total"] < full["total"]
    assert p.pretrain["tokens"] == 20 * n and p.pretrain["flops"] == 6 * n * 20 * n
    assert p.pretrain["seconds"] == pytest.approx(p.pretrain["tokens"] / p.pretrain["tokens_per_s"])
    big = plan("gpt2-124m", gpu_gb=80, **STATED)
    assert big.recommend["inference"] == "gpt-neo-1.3b" and big.load["fp32"]["fits"]
    assert big.finetune["full"]["tokens_per_s"] < big.finetune["lora"]["tokens_per_s"]
    json.dumps(big.to_dict())
    assert "largest preset that fits here" in big.format()


def test_counts_and_bad_input():
    assert [parse_count(t) for t in ("125M", "1.3B", "350k", "7e9", "124439808", "banana")] == [
        125_000_000, 1_300_000_000, 350_000, 7_000_000_000, 124_439_808, None]
    p = plan("350M", **STATED)
    assert p.model.shape_assumed and abs(count_params(p.model.config) - 350e6) / 350e6 < 0.1
    for bad, words in (("banana", "cannot read"), ("12", "too few"), (str(ROOT / "README.md"), "cannot read")):
        with pytest.raises(ChatforgeError, match=words):
            plan(bad, **STATED)
    for options, words in ((dict(batch_size=0), "batch_size"), (dict(seq_len=0), "seq_len"),
                           (dict(ram_gb=-1), "ram_gb"), (dict(mfu=2.0), "mfu")):
        with pytest.raises(ChatforgeError, match=words):
            plan("test", **options, **STATED)
    with pytest.raises(ChatforgeError, match="cannot be planned"):
        plan({"model_type": "t5"}, **STATED)


def test_cli_plan(tmp_path):
    theirs, config = hf_model_and_config("qwen2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run_cli("plan", str(tmp_path / "config.json"), "--ram-gb", "2", "--json")  # speeds measured here
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert p["model"]["params"] == theirs and p["machine"]["ram_gb"] == 2 and p["machine"]["measured"]
    assert p["machine"]["tflops_fp32"] > 0 and p["load"]["bf16"]["tokens_per_s"] > 0
    assert p["recommend"]["inference"] in PRESETS
    bad = run_cli("plan", "banana")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("chatforge plan: error: cannot read 'banana' as a model")
