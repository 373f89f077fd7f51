"""chatforge's CPU kernels (chatforge.kernels) against plain torch references, on whatever CPU runs them.

Every variant this CPU can run is built and checked (AVX-512, AVX2, plain C), not only the one in use,
so an AVX-512 machine tests the AVX2 code too; under ATEN_CPU_CAPABILITY=avx2 the choice follows torch's.
Stated tolerances: a GEMV output within 1e-5 of sum |w x| (fp32 accumulation of at most ~1k products,
against a float64 reference of the dequantized weights); the small ops within 1e-5 relative (RMSNorm,
rotary, attention) or 1e-6 absolute (SwiGLU's exp is a polynomial); a model's logits within 1e-4 of its
largest, and its greedy tokens equal, between the kernels and the torch reference path.
"""
from __future__ import annotations

import pytest
import torch

import gguf

from chatforge import kernels, loader
from chatforge.chat.template import CHATML_TEMPLATE
from chatforge.engine import Engine
from chatforge.kernels import build, ggml
from chatforge.quantize import GGMLLinear
from chatforge.tokenizer import Tokenizer
from test_gguf import TEXT, random_model, tiny_config, write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["Q4_0", "Q4_1", "Q8_0", "F32", "BF16"]


def variant(isa: str) -> kernels.Kernels:
    """Variant `isa` built here; skipped (with the reason) where this CPU or machine cannot have it."""
    if isa not in build.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    try:
        return kernels.variant(isa)
    except build.BuildError as e:
        pytest.skip(f"the kernels cannot be built here: {e}")


def random_weight(kind: str, rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, its fp32 values): random ggml blocks (any bytes for the integers, finite fp16 scales
    and minima of both signs), or a random fp32 / bf16 matrix."""
    if kind == "F32":
        w = torch.randn(rows, cols, generator=g)
        return w, w
    if kind == "BF16":
        w = torch.randn(rows, cols, generator=g).bfloat16()
        return w, w.float()
    blocks = torch.randint(0, 256, (rows, ggml.row_bytes(kind, cols)), generator=g, dtype=torch.uint8)
    view = blocks.view(rows, cols // 32, ggml.BLOCK_BYTES[kind])
    for at in (0, 2) if kind == "Q4_1" else (0,):
        scale = (torch.randn(rows, cols // 32, 1, generator=g) * 0.02).half()
        view[..., at:at + 2] = scale.view(torch.uint8)
    return blocks, ggml.dequantize(blocks, kind, cols)


# --- the block formats in torch (the reference) -----------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_reference_reads_and_writes_what_the_gguf_package_does(kind):
    """ggml.dequantize reads blocks the gguf package (maintained with llama.cpp) wrote exactly as it
    reads them back; ggml.quantize writes blocks it reads, within half a step of each block."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
    assert torch.equal(ggml.dequantize(torch.from_numpy(theirs), kind, 96),
                       torch.from_numpy(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType[kind])))
    ours = ggml.quantize(w, kind)
    back = torch.from_numpy(gguf.quants.dequantize(ours.numpy(), gguf.GGMLQuantizationType[kind]))
    assert torch.equal(back, ggml.dequantize(ours, kind, 96))
    blocks = w.view(37, 3, 32)
    amax = blocks.abs().amax(-1)
    # each format's step d; the error is at most half of it (Q4_0: a whole one on the clamped side)
    step = {"Q8_0": amax / 127, "Q4_1": (blocks.amax(-1) - blocks.amin(-1)) / 15, "Q4_0": amax / 8}[kind]
    assert torch.all((back - w).view(37, 3, 32).abs() <= step[..., None] * (1.0 if kind == "Q4_0" else 0.51) + 1e-6)


def test_q4_1_from_affine_keeps_values():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.uint8)
    scale, offset = (torch.randn(5, 2, generator=g) * 0.1).half().float(), (torch.randn(5, 2, generator=g)).half().float()
    w = (q.float().view(5, 2, 32) * scale[..., None] + offset[..., None]).view(5, 64)
    assert torch.equal(ggml.dequantize(ggml.q4_1_from_affine(q, scale, offset), "Q4_1", 64), w)


# --- the kernels against the reference -------------------------------------------------------------

def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 mode reads it: each block of 32 rounded to int8 steps of max |x| / 127."""
    b = x.view(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, (b * (127 / amax)).round(), torch.zeros_like(b))
    return (q * (amax / 127)).view_as(x)


def int8_reference(x: torch.Tensor, stored: torch.Tensor, kind: str) -> torch.Tensor:
    """What the int8 mode computes, in float64: the weights times x's int8 blocks, except that Q4_1's minima
    meet x's exact block sums (Q4_0's -8 d is part of its weights, and meets the int8 blocks)."""
    rows, cols = stored.shape[0], x.shape[1]
    w = ggml.dequantize(stored, kind, cols).double()
    if kind != "Q4_1":
        return int8_blocks(x).double() @ w.T
    minima = stored.view(rows, cols // 32, 20)[..., 2:4].contiguous().view(torch.float16).double()
    m = minima.expand(rows, cols // 32, 32).reshape(rows, cols)
    return int8_blocks(x).double() @ (w - m).T + x.double() @ m.T


@pytest.mark.parametrize("isa", build.ISAS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("int8", [False, True])
def test_gemv_matches_dequantize_then_matmul(isa, kind, int8):
    """Odd shapes, 1..9 rows of activations (the 4-row unrolled groups and their remainders), with and
    without a bias, on one thread and on two (a matrix large enough to be split). int8 (the block kinds
    on AVX2 and AVX-512): against the same product with x rounded to int8 blocks, as that mode reads it, and
    off the exact product by at most what half an int8 step of each activation can move it."""
    k = variant(isa)
    rounded = int8 and kind in ggml.BLOCK_BYTES and isa != "generic"
    g = torch.Generator().manual_seed(KINDS.index(kind))
    for rows, cols, threads in ((1, 32, 1), (7, 96, 1), (77, 160, 1), (301, 1024, 2)):
        stored, w = random_weight(kind, rows, cols, g)
        for n in (1, 2, 3, 4, 5, 9):
            x = torch.randn(n, cols, generator=g)
            bias = torch.randn(rows, generator=g) if n % 2 else None
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                y = k.linear(x, stored, kind, rows, cols, bias, int8=int8)
            finally:
                torch.set_num_threads(before)
            add = 0 if bias is None else bias.double()
            exact = x.double() @ w.double().T + add
            ref = int8_reference(x, stored, kind) + add if rounded else exact
            bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
            assert y.shape == (n, rows) and torch.all((y.double() - ref).abs() <= bound), (rows, cols, n)
            step = x.abs().view(n, -1, 32).amax(-1, keepdim=True).expand(n, cols // 32, 32).reshape(n, cols) / 127
            rounding = (step.double() / 2) @ w.double().abs().T if rounded else 0  # half an int8 step per value
            assert torch.all((y.double() - exact).abs() <= rounding + bound)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("kind", list(ggml.PACKED_TYPES))
def test_packed_gemv_matches_dequantize_then_matmul(isa, vnni, kind, monkeypatch):
    """Block weights repacked in groups of 8 rows (the default layout with int8 activations): the repacking
    undone by the torch reference (ggml.unpack8) and by cf_dequantize8 gives back the blocks; the product
    with int8 activations equals int8_reference, the exact one the fp32 product, for row counts that leave
    a partial last group, 1..40 activation rows (the 4-row loops, their remainders, a prefill's tiles), one
    and two threads. vnni: built with the integer dot-product instructions, or with AVX2's pair (built and
    run only where the CPU has them both ways, so an AVX2-only CPU checks its own loop)."""
    if vnni and not build.vnni(isa):
        pytest.skip(f"this CPU has no VNNI for the {isa} kernels")
    if not vnni:
        monkeypatch.setenv(build.VNNI_ENV, "0")
    k = variant(isa)
    g = torch.Generator().manual_seed(ggml.PACKED_TYPES.index(kind))
    for rows, cols, threads in ((1, 32, 1), (7, 96, 1), (77, 160, 2), (301, 1024, 2)):
        stored, w = random_weight(kind, rows, cols, g)
        packed = k.repack8(stored, kind, cols)
        assert packed.shape == ((rows + 7) // 8, 8 * stored.shape[1])
        assert torch.equal(ggml.unpack8(packed, kind, rows, cols), stored)
        idx = torch.randint(0, rows, (5,), generator=g)
        assert torch.equal(k.dequantize8(packed, kind, rows, cols), w)
        assert torch.equal(k.dequantize8(packed, kind, rows, cols, idx=idx), w[idx])
        for n in (1, 3, 4, 5, 9, 40):
            x = torch.randn(n, cols, generator=g)
            bias = torch.randn(rows, generator=g) if n % 2 else None
            add = 0 if bias is None else bias.double()
            bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for int8 in (True, False):
                    y = k.linear8(x, packed, kind, rows, cols, bias, int8=int8)
                    ref = (int8_reference(x, stored, kind) if int8 else x.double() @ w.double().T) + add
                    assert y.shape == (n, rows) and torch.all((y.double() - ref).abs() <= bound), (rows, cols, n, int8)
            finally:
                torch.set_num_threads(before)


@pytest.mark.parametrize("isa", build.ISAS)
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_matches_reference(isa, kind):
    k = variant(isa)
    stored, w = random_weight(kind, 45, 96, torch.Generator().manual_seed(2))
    assert torch.equal(k.dequantize(stored, kind, 96), w)
    idx = torch.tensor([[44, 0], [7, 7]])
    assert torch.equal(k.dequantize(stored, kind, 96, rows=idx).view(2, 2, 96), w[idx])


@pytest.mark.parametrize("isa", build.ISAS)
def test_small_ops_match_torch(isa):
    k = variant(isa)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 5, 72, generator=g), torch.randn(72, generator=g)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(k.rmsnorm(x, w, 1e-5), rms * w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(k.rmsnorm(x, w, 1e-5, plus_one=True), rms * (1 + w), rtol=1e-5, atol=1e-6)
    h = torch.randn(2, 3, 2 * 40, generator=g) * 4
    gate, up = h.chunk(2, dim=-1)
    assert torch.allclose(k.swiglu(h), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-6)
    # rotary in place on a strided view, as the qkv projection's output is split into heads
    from chatforge.model import apply_rope, rope_cos_sin

    qkv = torch.randn(2, 3, 4 * 16, generator=g)
    q = qkv.view(2, 3, 4, 16).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.tensor([[3, 4, 5], [0, 1, 2]]), 16, 10000.0)
    expected = apply_rope(q, cos, sin)
    k.rope_(q, cos, sin)
    assert torch.allclose(q, expected, rtol=1e-5, atol=1e-6)


def reference_attention(q, k, v, mask, scale, causal):
    """softmax(q k^T * scale) v in float64, key/value heads repeated, mask (B, 1, Tq, S) or causal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = q.double() @ k.transpose(-1, -2) * scale
    Tq, S = q.shape[2], k.shape[2]
    allowed = torch.ones(Tq, S, dtype=torch.bool).tril(S - Tq) if causal else torch.ones(Tq, S, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).float()


@pytest.mark.parametrize("isa", build.ISAS)
@pytest.mark.parametrize("tq,masked,causal", [(1, False, False), (1, True, False), (3, False, True), (3, True, False)])
def test_attention_matches_reference(isa, tq, masked, causal):
    """Grouped heads (6 queries over 2 key/value heads), keys read from a cache's strided views."""
    kern = variant(isa)
    g = torch.Generator().manual_seed(4)
    B, H, KVH, S, D = 2, 6, 2, 11, 16
    q = torch.randn(B, tq, H, D, generator=g).transpose(1, 2)
    cache_k, cache_v = (torch.randn(B, KVH, 20, D, generator=g) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    mask = torch.rand(B, 1, tq, S, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., -1] = True  # every query sees some key
    out = kern.attention(q, k, v, mask, 0.25, causal=causal)
    assert torch.allclose(out, reference_attention(q, k, v, mask, 0.25, causal), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", build.ISAS)
@pytest.mark.parametrize("norms", [False, True])
def test_attention_step_matches_its_torch_lines(isa, norms):
    """The fused step (per-head norms, rotary, cache write, attention) equals the torch lines it stands for."""
    from chatforge.model import apply_rope, rope_cos_sin

    kern = variant(isa)
    g = torch.Generator().manual_seed(5)
    B, T, H, KVH, D, start = 2, 2, 4, 2, 16, 5
    qkv = torch.randn(B, T, (H + 2 * KVH) * D, generator=g)
    cache_k, cache_v = (torch.randn(B, KVH, 12, D, generator=g) for _ in range(2))
    weights = (torch.randn(D, generator=g), torch.randn(D, generator=g), 1e-6, False) if norms else None
    cos, sin = rope_cos_sin(torch.arange(start, start + T).expand(B, T), D, 10000.0)
    mask = torch.ones(B, 1, T, start + T, dtype=torch.bool)
    mask[0, ..., :2] = False  # row 0 was left-padded
    mask[..., 0, -1] = False  # the first new token does not see the second

    q, k, v = qkv.clone().split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    if norms:
        def norm(t, w):
            return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))
        q, k = norm(q, weights[0]), norm(k, weights[1])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = cache_k.clone(), cache_v.clone()
    keys[:, :, start:start + T], values[:, :, start:start + T] = k, v
    expected = reference_attention(q, keys[:, :, :start + T], values[:, :, :start + T], mask, 0.25, False)

    out = kern.attention_step(qkv, H, KVH, D, (cos, sin), cache_k, cache_v, start, mask, False, 0.25, weights)
    assert torch.allclose(cache_k, keys, rtol=1e-5, atol=1e-6) and torch.equal(cache_v, values)
    assert torch.allclose(out, expected.transpose(1, 2).reshape(B, T, H * D), rtol=1e-5, atol=1e-5)


# --- choosing, building, falling back --------------------------------------------------------------

def test_variant_follows_what_the_cpu_and_torch_are_told(monkeypatch):
    have = build.supported_isas()
    assert have[-1] == "generic" and "generic" in have
    monkeypatch.delenv(build.ENV, raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert build.chosen_isa() == "generic"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert build.chosen_isa() == ("avx2" if "avx2" in have else "generic")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert build.chosen_isa() == have[0]
    monkeypatch.setenv(build.ENV, "generic")
    assert build.chosen_isa() == "generic"


def test_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path))
    try:
        path = build.library_path("generic")
    except build.BuildError as e:
        pytest.skip(f"no kernels here: {e}")
    assert path.parent == tmp_path / "kernels" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert build.library_path("generic") == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.fixture
def no_kernels(monkeypatch):
    """The process as if chatforge's kernels were off (CHATFORGE_KERNELS=0), restored afterwards."""
    monkeypatch.setenv(build.ENV, "0")
    kernels.reset()
    yield
    monkeypatch.delenv(build.ENV, raising=False)
    kernels.reset()


def test_off_switch_and_missing_compiler_fall_back_to_torch(no_kernels, monkeypatch, tmp_path):
    assert kernels.get() is None and "off" in kernels.status()
    monkeypatch.delenv(build.ENV)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang either
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path))  # nothing built before
    build.compiler.cache_clear()
    kernels._variant.cache_clear()
    kernels.reset()
    try:
        assert kernels.get() is None and "no C compiler" in kernels.status()
    finally:
        build.compiler.cache_clear()
        kernels._variant.cache_clear()


# --- whole models: the kernel path against the torch path -----------------------------------------------

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.train_bpe(TEXT, vocab_size=301, show_progress=False)
    t.chat_template = CHATML_TEMPLATE
    return t


def decode(model, tok, prompts) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of each prompt (one batch, left-padded), and the logits of decoding steps fed the same
    tokens whatever the model predicts (the first prompt, then FORCED one by one through the KV cache)."""
    from chatforge.engine.kv_cache import KVCache

    out = Engine(model, tok).generate(prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    cache = KVCache(model.config, 1, len(prompts[0]) + len(FORCED))
    with torch.inference_mode():
        steps = [model(torch.tensor([prompts[0]]), cache=cache, logits="last")[0, -1]]
        steps += [model(torch.tensor([[t]]), cache=cache, logits="last")[0, -1] for t in FORCED[:-1]]
    return [g.token_ids for g in out], torch.stack(steps)


FORCED = [7, 250, 3, 99, 64, 12, 200, 5]
PROMPTS = [[5, 17, 42, 7, 99, 3], [250, 12], [64, 31, 8, 200, 11]]
INT8_TOL = 0.15  # the default int8 activations: decoding logits within 15% of the largest (measured on these random
# models: up to 5.5%; on SmolLM2-135M 9%, with the same top token at every step)


@pytest.mark.parametrize("arch,kind", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("qwen3", "Q4_1"), ("gemma3", "Q4_1")])
def test_gguf_model_decodes_like_torch_with_the_kernels(arch, kind, tok, tmp_path, monkeypatch):
    """The file's blocks kept and multiplied by the kernels (GGMLLinear; the fused attention step, norms,
    SwiGLU) against the same file dequantized to fp32 on torch's ops alone. CHATFORGE_GEMV=exact (fp32
    activations): the same greedy tokens for a batch of prompts of different lengths (padding masks) and
    decoding logits within 1e-4 of the largest; by default (activations rounded to int8 blocks, Q4 weights
    repacked in groups of 8 rows at load time): within INT8_TOL."""
    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.status()}")
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(tiny_config(arch, tok.vocab_size), seed=3), arch, tok, kind)
    runs = {}
    for name, env in (("exact", {kernels.GEMV_ENV: "exact"}), ("int8", {}), ("torch", {build.ENV: "0"})):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        kernels.reset()
        try:
            model = loader.load(path, device="cpu", dtype="fp32" if name == "torch" else None)[0]
            if name != "torch":
                layers = [m for m in model.modules() if isinstance(m, GGMLLinear)]
                assert layers and all(m.packed == (name == "int8" and m.kind in ggml.PACKED_TYPES
                                                   and kernels.get().isa != "generic") for m in layers)
            runs[name] = decode(model, tok, PROMPTS)
        finally:
            for key in env:
                monkeypatch.delenv(key)
            kernels.reset()
    reference = runs["torch"][1]
    assert runs["exact"][0] == runs["torch"][0]
    assert (runs["exact"][1] - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert (runs["int8"][1] - reference).abs().max() <= INT8_TOL * reference.abs().max()
    assert (runs["int8"][1] - reference).abs().max() > 0  # the int8 mode did round (it is the one that ran)


@pytest.mark.parametrize("arch,kind", [("llama", "Q4_0"), ("qwen2", "Q8_0"), ("qwen3", "Q4_1"), ("qwen2", None)])
@pytest.mark.parametrize("gemv", ["int8", "exact"])
def test_block_step_equals_the_step_layer_by_layer(arch, kind, gemv, tok, tmp_path, monkeypatch):
    """cf_block_step (a whole pre-norm block of a decoding step in one call) against the same step taken
    layer by layer through the same kernels (Block._kernel_desc answering None): logits within 1e-5 of the
    largest, for a batch of prompts of different lengths; GGUF blocks (packed in 8-row groups in the int8
    mode, as stored with exact activations; Qwen2's biases, Qwen3's per-head norms) or fp32 weights."""
    from chatforge.model import Block

    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.status()}")
    if gemv == "exact":
        monkeypatch.setenv(kernels.GEMV_ENV, "exact")
    kernels.reset()
    try:
        if kind is None:
            model = random_model(tiny_config(arch, tok.vocab_size), seed=4)
        else:
            path = tmp_path / "m.gguf"
            write_gguf(path, random_model(tiny_config(arch, tok.vocab_size), seed=4), arch, tok, kind)
            model = loader.load(path, device="cpu")[0]
        calls = []
        real = kernels.Kernels.block_step
        monkeypatch.setattr(kernels.Kernels, "block_step", lambda self, *a: calls.append(1) or real(self, *a))
        fused = decode(model, tok, PROMPTS)
        assert calls  # the whole-block kernel ran
        monkeypatch.setattr(Block, "_kernel_desc", lambda self: None)
        layered = decode(model, tok, PROMPTS)
    finally:
        monkeypatch.delenv(kernels.GEMV_ENV, raising=False)
        kernels.reset()
    assert fused[0] == layered[0]
    assert (fused[1] - layered[1]).abs().max() <= 1e-5 * layered[1].abs().max()


def test_plan_says_which_kernels_decode():
    """`chatforge plan` names what multiplies a decoding step here, and sizes int8 / int4 as those kernels
    store them (Q8_0: 34 bytes per 32 weights, Q4_1: 20) or as torch's layouts do."""
    from chatforge.sizing.plan import BYTES, KERNEL_BYTES, load_bytes, plan

    p = plan("gpt2-124m", tflops=1.0, bandwidth_gbs=10.0)  # stated speeds: no calibration
    n = p.model.params
    if kernels.available():
        assert p.kernels.startswith("chatforge's kernels") and kernels.status() in p.kernels
        assert p.load["int4"]["bytes"] == load_bytes(n, "int4", KERNEL_BYTES) and KERNEL_BYTES["int4"] == 20 / 32
    else:
        assert p.kernels.startswith("torch's") and p.load["int4"]["bytes"] == load_bytes(n, "int4", BYTES)
    assert f"decoded by                  {p.kernels}" in p.format()
    rates = [p.load[d]["tokens_per_s"] for d in ("fp32", "int8", "int4")]
    assert rates == sorted(rates)  # fewer bytes per weight, no slower


def test_benchmark_harness_measures_every_contender(tok, tmp_path):
    """B2-kernels (benchmarks/inference.kernel_decode) on a tiny file: the stored blocks, fp32 on the kernels
    and fp32 on torch alone are each timed, with their share of the bound, and decode the same tokens."""
    from benchmarks.inference import KERNEL_CONTENDERS, kernel_decode

    if not kernels.available():
        pytest.skip(f"no kernels here: {kernels.status()}")
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(tiny_config("llama", tok.vocab_size), seed=3), "llama", tok, "Q4_1")
    r = kernel_decode(path, threads=(1,), rounds=1, prompt_len=6, new=5, prefill_len=12)
    entry = r["by_threads"]["1"]
    assert set(entry["rows"]) == set(KERNEL_CONTENDERS) and entry["greedy_tokens_equal"]
    assert all(row["decode_tokens_per_s"] > 0 and 0 < row["pct_of_bound"] for row in entry["rows"].values())
    assert kernels.available()  # the run switched CHATFORGE_KERNELS back
