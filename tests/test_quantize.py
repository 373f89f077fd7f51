"""Weight-only quantization: logits close to fp32, generation runs, a fraction of the memory.

Tolerance (int8): the largest logit difference stays under 3% of the largest logit (per-row int8
keeps ~0.4% relative error per weight; measured ~1% on these models), 5% with bf16 activations.
int4's own rounding is larger (a step is 1/15 of a group's range), so its kernels are checked
against an fp32 model holding the same dequantized weights, and its quality on the trained demo
model: cross-entropy within 3% of fp32's.
"""
from __future__ import annotations

import copy

import pytest
import torch

from chatforge.formats.checkpoint import save_checkpoint
from chatforge.config import ModelConfig
from chatforge.engine import Engine
from chatforge.errors import ChatforgeError
from chatforge.loader import load
from chatforge.model import Transformer
from chatforge.quantize import (GEMV_MAX_ROWS, INT4_MM_MAX_ROWS, GGMLLinear, Int4Linear, Int8Embedding, Int8Linear,
                                kernels_for, pack_int4, padded_rows, quantize_int4, quantize_int8, quantize_model,
                                quantize_rows_int4, weight_bytes)

FP32_TOL, BF16_TOL = 0.03, 0.05
# the layers each mode makes here: ggml blocks (Q8_0, Q4_1) where chatforge's kernels are built, torch's
# layouts elsewhere (and under CHATFORGE_KERNELS=0, which the suite also runs under)
KERNELS = kernels_for(torch.device("cpu"))
INT8_LAYER = GGMLLinear if KERNELS else Int8Linear
INT4_LAYER = GGMLLinear if KERNELS else Int4Linear
LAYOUTS = {
    "gpt": dict(),
    "llama-untied": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, n_kv_head=1,
                         tie_embeddings=False),
    "odd-width": dict(n_embd=24, n_head=2),  # not a multiple of 16: the dequantizing path
}


def model_of(layout: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("test", **LAYOUTS[layout])).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_quantize_int8_round_trip():
    w = torch.randn(64, 48)
    w[3] = 0.0  # an all-zero row must stay zero, not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    back = q.float() * scale[:, None]
    assert torch.all(back[3] == 0)
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-6  # within half a step of each row


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantized_logits_close_to_fp32(layout, one_thread):
    model = model_of(layout)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(ids)
        q32 = quantize_model(copy.deepcopy(model), dtype=torch.float32)
        assert rel_err(q32(ids), ref) < FP32_TOL
        q16 = quantize_model(copy.deepcopy(model), dtype=torch.bfloat16)
        assert rel_err(q16(ids), ref) < BF16_TOL
        # one row (the decoding kernel) agrees with the same row inside a batch (the prefill path)
        one = q16(ids[:1, :1])
        assert rel_err(one[0, 0], q16(ids[:1, :1].repeat(1, 20))[0, 0]) < 0.02
    assert all(not isinstance(m, torch.nn.Linear) for m in q16.modules())
    whole_blocks = model.config.n_embd % 32 == 0  # ggml's blocks hold 32 inputs; other widths stay per-row int8
    assert isinstance(q16.wte, Int8Embedding) and isinstance(q16.lm_head, INT8_LAYER if whole_blocks else Int8Linear)


def test_quantized_weights_take_a_quarter_of_fp32(one_thread):
    model = Transformer(ModelConfig.preset("test", n_embd=128, n_head=4, vocab_size=2048))
    fp32 = weight_bytes(model)
    q = quantize_model(copy.deepcopy(model), dtype=torch.float32)
    assert 0.24 < weight_bytes(q) / fp32 < 0.30, weight_bytes(q) / fp32
    tied = q.lm_head.weight.data_ptr() == q.wte._table()[0].data_ptr()
    assert tied  # the embedding reads the head's int8 table: stored once


@pytest.mark.parametrize("layout", ["gpt", "llama-untied"])
def test_quantized_greedy_generation_runs(layout, char_tokenizer, one_thread):
    model = Transformer(ModelConfig.preset("test", vocab_size=char_tokenizer.vocab_size, **LAYOUTS[layout]))
    engine = Engine(quantize_model(model), char_tokenizer)
    [g] = engine.generate("Hello", max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    assert g.completion_tokens == 12 and g.finish_reason == "length"
    [s] = engine.generate("Hello", max_new_tokens=12, temperature=0.8, seed=1, stop_token_ids=[])
    assert s.completion_tokens == 12


def test_loader_quantizes_while_loading(tmp_path, char_tokenizer, one_thread):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=char_tokenizer.vocab_size)).eval()
    save_checkpoint(tmp_path / "ck", model, char_tokenizer)
    loaded, tok = load(str(tmp_path / "ck"), device="cpu", quantize="int8")
    assert loaded.quantized == "int8" and tok.vocab_size == char_tokenizer.vocab_size
    in_place = quantize_model(copy.deepcopy(model))
    ids = torch.randint(0, char_tokenizer.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), in_place(ids))
    same_dtype, _ = load(str(tmp_path / "ck"), device="cpu", dtype="fp32", quantize="int8")
    assert next(same_dtype.parameters()).dtype == torch.float32


def test_loader_refuses_unknown_quantization(tmp_path):
    with pytest.raises(ChatforgeError, match="int8, int4"):
        load("chatforge-demo", device="cpu", quantize="int3")


def test_loader_quantizes_hugging_face_directories(tmp_path, char_tokenizer, one_thread):
    from chatforge.export import export_hf

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=char_tokenizer.vocab_size)).eval()
    export_hf(model, tmp_path / "hf", tokenizer=char_tokenizer)
    loaded, _ = load(str(tmp_path / "hf"), device="cpu", dtype="fp32", quantize="int8")
    ids = torch.randint(0, char_tokenizer.vocab_size, (1, 10))
    with torch.no_grad():
        assert loaded.quantized == "int8"
        assert rel_err(loaded(ids), model(ids)) < FP32_TOL


# --- int4 ---------------------------------------------------------------------------------------

WIDE = dict(n_embd=128, n_head=4, vocab_size=1000)  # widths that are whole int4 groups (64)


def dequantized_twin(model: Transformer, quantized: torch.nn.Module) -> Transformer:
    """An fp32 copy of `model` holding exactly the weights the quantized model multiplies by."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (Int4Linear, Int8Linear, GGMLLinear)):
                twin.get_submodule(name).weight.copy_(module.dequantized())
        if not quantized.wte._tied:  # an untied embedding is int8: its own table
            twin.wte.weight.copy_(quantized.wte.weight.float() * quantized.wte.scale.float()[:, None])
    return twin


def test_int4_kernel_is_used_only_where_torch_packs_as_we_do():
    """torch's packed int4 layout depends on the CPU (AVX-512 machines pack blocks of 64 rows as pack_int4
    does; AVX2 ones do not): the run-time check must agree with what torch really does here, and a layer
    whose layout torch would read differently must not call the kernel."""
    from chatforge.quantize import _kernel_layout_matches

    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        pytest.skip("this torch has no int4 CPU kernel")
    q = torch.randint(0, 16, (192, 256), generator=torch.Generator().manual_seed(3))
    same = torch.equal(pack_int4(q.to(torch.uint8)), convert(q.to(torch.int32), 2))
    assert _kernel_layout_matches() == same
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 192), torch.float32)
    assert layer.kernel_ok == same


def test_quantize_int4_round_trip():
    w = torch.randn(8, 256)
    w[2, 64:128] = 0.0  # an all-zero group stays zero
    q, scale, zero = quantize_int4(w)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (8, 4)
    back = (q.float().view(8, 4, 64) - 8) * scale[..., None] + zero[..., None]
    assert torch.all(back[2, 1] == 0)
    assert torch.all((back - w.view(8, 4, 64)).abs() <= scale[..., None] / 2 + 1e-6)  # half a step per group


def test_int4_quantized_in_row_chunks_equals_all_at_once():
    """Loading quantizes odd-sized row chunks through a staging buffer: several full flushes and a
    partly filled last block must give exactly what quantizing the whole matrix gives."""
    w = torch.randn(2500, 128)
    q, scale, zero = quantize_int4(w)
    packed, s2, z2 = quantize_rows_int4((c.clone() for c in w.split(700)), (2500, 128))
    extra = padded_rows(2500) - 2500
    assert packed.shape == (2560, 64) and extra == 60
    assert torch.equal(packed, pack_int4(torch.cat([q, q.new_zeros(extra, 128)])))
    assert torch.equal(s2[:2500], scale) and torch.equal(z2[:2500], zero) and not s2[2500:].any()


@pytest.mark.parametrize("layout", ["gpt", "llama-untied"])
def test_int4_model_computes_its_dequantized_weights(layout, one_thread, exact_gemv):
    """Both int4 paths (the kernel for few rows, unpacking for many) equal an fp32 model holding the
    dequantized weights; the tied embedding reads the head's int4 table."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", **{**LAYOUTS[layout], **WIDE})).eval()
    q32 = quantize_model(copy.deepcopy(model), "int4", dtype=torch.float32)
    twin = dequantized_twin(model, q32)
    few = torch.randint(0, 1000, (1, (GEMV_MAX_ROWS if KERNELS else INT4_MM_MAX_ROWS) // 2))
    many = torch.randint(0, 1000, (2, INT4_MM_MAX_ROWS + 8))
    with torch.no_grad():
        for ids in (few, many):
            assert rel_err(q32(ids), twin(ids)) < 1e-4
        q16 = quantize_model(copy.deepcopy(model), "int4", dtype=torch.bfloat16)
        assert rel_err(q16(few), twin(few)) < BF16_TOL and rel_err(q16(many), twin(many)) < BF16_TOL
        assert rel_err(model(many), twin(many)) > 1e-3  # int4 did round: the test above is not vacuous
    layers = [m for n, m in q32.named_modules() if n.endswith(("attn.qkv", "mlp.fc", "lm_head"))]
    assert layers and all(isinstance(m, INT4_LAYER) for m in layers)
    assert not KERNELS or all(m.kind == "Q4_1" for m in layers)
    if model.config.tie_embeddings:
        assert q32.wte._tied and q32.wte._tied[0] is q32.lm_head


def test_int4_keeps_odd_widths_int8_and_takes_a_seventh_of_fp32(one_thread):
    model = Transformer(ModelConfig.preset("test", n_embd=128, n_head=4, vocab_size=2048))
    q = quantize_model(copy.deepcopy(model), "int4", dtype=torch.float32)
    assert 0.12 < weight_bytes(q) / weight_bytes(model) < 0.19, weight_bytes(q) / weight_bytes(model)
    odd = quantize_model(Transformer(ModelConfig.preset("test", **LAYOUTS["odd-width"])), "int4")
    group = 32 if KERNELS else 64  # a Q4_1 block, or torch's int4 group
    layers = [m for m in odd.modules() if isinstance(m, (Int4Linear, Int8Linear, GGMLLinear))]
    assert layers and all(isinstance(m, Int8Linear) == bool(m.in_features % group) for m in layers)
    assert any(isinstance(m, Int8Linear) for m in layers)  # the 24-input layers: no whole groups -> int8 per row


def test_int4_loads_from_a_checkpoint_like_in_place(tmp_path, char_tokenizer, one_thread):
    torch.manual_seed(0)
    cfg = dict(LAYOUTS["llama-untied"], n_embd=128, n_head=4, vocab_size=char_tokenizer.vocab_size)
    model = Transformer(ModelConfig.preset("test", **cfg)).eval()
    save_checkpoint(tmp_path / "ck", model, char_tokenizer)
    loaded, _ = load(str(tmp_path / "ck"), device="cpu", dtype="fp32", quantize="int4")
    in_place = quantize_model(copy.deepcopy(model), "int4", dtype=torch.float32)
    assert loaded.quantized == "int4" and isinstance(loaded.lm_head, INT4_LAYER)
    ids = torch.randint(0, char_tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), in_place(ids))


def test_int4_demo_model_quality(one_thread):
    """On a trained model int4 costs little: the demo model's cross-entropy on its own fp32 reply
    stays within 3% of fp32's, and it still answers."""
    model, tok = load(None, device="cpu", dtype="fp32")
    q4, _ = load(None, device="cpu", quantize="int4")
    assert any(isinstance(m, INT4_LAYER) for m in q4.modules())
    prompt = tok.encode("Hello, how are you today? Tell me about your day.")
    [g] = Engine(model, tok).generate(prompt, max_new_tokens=48, temperature=0.0, stop_token_ids=[])
    ids = torch.tensor([prompt + g.token_ids])

    def loss(m) -> float:
        with torch.no_grad():
            logits = m(ids[:, :-1]).float()[0, len(prompt) - 1:]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):]))
    assert loss(q4) < 1.03 * loss(model) + 0.02, (loss(q4), loss(model))
    [r] = Engine(q4, tok).generate(prompt, max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    assert r.completion_tokens == 8 and tok.decode(r.token_ids).strip()
