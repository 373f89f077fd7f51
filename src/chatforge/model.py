"""The Transformer: one class for GPT-, Llama- and BERT-style models.

Read top to bottom: positional encodings, normalisation, attention, MLP, block, model.
Every option (rotary or sinusoidal positions, rotary scaling, grouped-query heads, sliding
windows with their own rotary base, q/k norms, SwiGLU or GeGLU, RMSNorm with a (1 + w) scale,
norms around each branch or after the residual add, a scaled embedding, bidirectional attention
with segment embeddings and BERT's masked-LM head) lives in ModelConfig, so a checkpoint of
GPT-2, Llama 3, Qwen3, Gemma 3, Phi-3, BERT, RoBERTa or DistilBERT runs on this one file.
Part of the core layer (it imports only config, errors and chatforge.kernels, its CPU kernels): LoRA
and quantized layers replace its Linears from above (chatforge.lora, chatforge.quantize) without this
file naming them. A decoding step (a few rows, fp32, no autograd) runs its norms, rotary, attention,
SwiGLU and multiplies through chatforge.kernels where they are built, one call each; everything else,
and every step without them, runs the torch code below, which the kernels are tested against.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import kernels
from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError

# torch >= 2.5 lets SDPA broadcast grouped key/value heads itself (no copy per step)
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
# rows (tokens x batch) up to which an inference pass is a decoding step, the kernels' case; a prefill has more
_STEP_ROWS = 64


def step_kernels(x: torch.Tensor, rows: int = _STEP_ROWS, dtypes: tuple = (torch.float32,)) -> Optional[kernels.Kernels]:
    """chatforge's CPU kernels when `x` is a decoding step's few rows (at most `rows`) outside autograd, in
    one of `dtypes`, else None: torch's ops then (training, a prefill, another device, no kernels here)."""
    if (x.dtype in dtypes and x.numel() <= rows * x.shape[-1] and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):  # compiled: torch's ops
        return kernels.get()
    return None


# --- positional encodings ---------------------------------------------------------

def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    i = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32)[..., None] / torch.pow(10000.0, i / dim)
    pe = torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1)  # interleave sin, cos
    return pe.flatten(-2)


def rope_frequencies(dim: int, theta: float, scaling: Optional[dict] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """The rotary pairs' angular speeds theta^(-2i/dim), stretched as a long-context checkpoint asks.

    linear: every frequency divided by `factor`, so `factor` times more positions fit in the angles
    the model was trained on. llama3 (Llama 3.1+): only the slow pairs are stretched. Pairs whose
    wavelength is short next to the original context (< original / high_freq_factor) never saw it
    wrap and stay as they are; long ones (> original / low_freq_factor) are divided by `factor`; the
    band between is blended linearly in original / wavelength, so no pair jumps.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)  # 0 at the slow edge of the band, 1 at the fast one
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    stretched = torch.where(wavelength > original / low, inv_freq / factor, blended)
    return torch.where(wavelength < original / high, inv_freq, stretched)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float,
                 scaling: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, in the half-split layout Llama checkpoints use."""
    inv_freq = rope_frequencies(dim, theta, scaling, positions.device)
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]  # (B, 1, T, dim) broadcast over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its position's angle: relative positions fall out of QK^T."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --- normalisation -------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 for stability under bf16.

    plus_one (Gemma): the scale is (1 + weight), its weight stored around 0 rather than 1. Gemma
    also applies it before going back to the input's dtype, Llama after; in fp32 the two agree.
    """

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = step_kernels(x)
        if k is not None and self.weight.dtype == torch.float32:
            return k.rmsnorm(x, self.weight, self.eps, self.plus_one)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps, config.norm_plus_one)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# --- linear layers ----------------------------------------------------------------------

# oneDNN's linear with a fused activation (what torch.compile's CPU backend calls); None without it
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


@functools.lru_cache(maxsize=1)
def _fused_gelu_works() -> bool:
    """One check per process that this torch's private op takes these arguments and computes GELU(xW^T + b)."""
    if _LINEAR_POINTWISE is None:
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((4, 64), (32, 64), (32,)))
    try:
        y = _LINEAR_POINTWISE(x, w, b, "gelu", [], "tanh")
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(y.float(), F.gelu(F.linear(x, w, b).float(), approximate="tanh"), atol=0.1, rtol=0.02))


# rows from which an inference multiply may go to oneDNN (a prefill, a batch of texts to embed); fewer
# rows (decoding) stay with the kernels below, measured for them
_ONEDNN_MIN_ROWS = 64


@functools.lru_cache(maxsize=None)
def _onednn_pays(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear beats F.linear on this CPU for a block of rows of `dtype`: measured once
    per process (a 256 x 384 x 1536 multiply, best of 3 each), not assumed. bf16 always goes there when
    the op works. In fp32 F.linear is MKL's sgemm, which on an AMD EPYC (AVX-512) ran 1.35x slower than
    oneDNN's; on CPUs where MKL is as fast, F.linear stays."""
    if not _fused_gelu_works():
        return False
    if dtype == torch.bfloat16:
        return True
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g, dtype=dtype) for shape in ((256, 384), (1536, 384), (1536,)))
    with torch.autocast("cpu", enabled=False):  # measured as called: in `dtype`, whatever context asked first
        try:
            fast = _LINEAR_POINTWISE(x, w, b, "none", [], "")
        except (RuntimeError, TypeError):
            return False
        if not torch.allclose(fast, F.linear(x, w, b), atol=1e-4, rtol=1e-4):
            return False
        best = {"mkl": float("inf"), "onednn": float("inf")}
        for _ in range(3):
            for name, run in (("mkl", lambda: F.linear(x, w, b)),
                              ("onednn", lambda: _LINEAR_POINTWISE(x, w, b, "none", [], ""))):
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["onednn"] < 0.9 * best["mkl"]


def _onednn_rows(x: torch.Tensor) -> bool:
    """Whether x (a block of rows, inference on a CPU) should be multiplied by oneDNN."""
    return (x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1]  # first: decoding steps leave here at once
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # autocast decides the dtype of its multiplies itself
            and _onednn_pays(x.dtype))


# weight dtypes chatforge's GEMV reads (by its names), and the rows up to which it beats torch's GEMM
_GEMV_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
_GEMV_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear with CPU inference fast paths, chosen by the shape and dtype of what comes in.

    Batch-1 decoding multiplies a single row by every weight, which reads every weight once: where
    chatforge's kernels are built, up to _GEMV_ROWS rows go to their GEMV, which streams fp32 and bf16
    weights at the memory's speed (MKL's fp32 GEMV reached a third of it on an AMD EPYC; torch's bf16
    one, emulated without native bf16, a tenth). Without them, on CPUs torch's bf16 GEMM does a single
    row 1.5-2.5x slower than its bf16 GEMV (fp32 is as fast either way), so one row takes addmv.
    A block of rows outside autograd (a prefill, texts to embed) goes to oneDNN where that was
    measured faster (`_onednn_pays`), which also adds the bias as it writes the output (F.linear's
    addmm first copies the bias into every row).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = step_kernels(x, _GEMV_ROWS, _GEMV_DTYPES) if x.dtype == self.weight.dtype else None
        if k is not None:
            bias = None if self.bias is None else self.bias.float()
            y = k.linear(x.float(), self.weight, _GEMV_DTYPES[x.dtype], self.out_features, self.in_features, bias)
            return y.to(x.dtype)
        if x.dtype != torch.float32 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            row = x.reshape(-1)
            y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
            return y.view(*x.shape[:-1], y.shape[-1])
        if _onednn_rows(x) and self.weight.dtype == x.dtype:
            return _LINEAR_POINTWISE(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def kernel_desc(self) -> Optional[tuple[list[int], int]]:
        """How chatforge's whole-block kernel (model.Block) reads this layer: (cf_block_step's 7 ints, the most
        rows it may multiply at once), or None where the kernel cannot (not fp32 on a CPU)."""
        w, b = self.weight, self.bias
        if w.dtype != torch.float32 or w.device.type != "cpu" or (b is not None and b.dtype != torch.float32):
            return None
        return [0, w.data_ptr(), self.out_features, self.in_features, 0 if b is None else b.data_ptr(), 0,
                w.stride(0) * 4], _GEMV_ROWS

    def fused_gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """GELU(self(x)). For a block of rows on a CPU, outside autograd (inference, a prefill), one
        oneDNN call applies the GELU as the multiply writes its output: run separately, torch's GELU
        pass costs about as much as the multiply itself in bf16 (in fp32 it is ~20% of the multiply).

        A capability, not a type: MLP uses it on any layer that has it. Layers that replace this
        one (LoRA, quantized) simply do not have it, and get the separate GELU."""
        if x.numel() != x.shape[-1] and self.weight.dtype == x.dtype and (
                _onednn_rows(x) or (x.dtype == torch.bfloat16 and x.device.type == "cpu"
                                    and not torch.is_grad_enabled() and _fused_gelu_works())):
            return _LINEAR_POINTWISE(x, self.weight, self.bias, "gelu", [], approximate)
        return F.gelu(self(x), approximate=approximate)


# --- attention -------------------------------------------------------------------------

def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: Optional[torch.Tensor],
                   causal: bool, window: Optional[int]) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask of the keys each query may see.

    Positions, not indices, decide causality and windows, so left-padded batches and
    KV-cache slots work the same way as one plain sequence.
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = torch.ones(q.shape[0], q.shape[1], k.shape[2], dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed &= k <= q
    if window is not None:
        allowed &= (q - k) < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :].bool()
    # a query that may see nothing (a padding slot) would give NaN; let it see everything
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention, softmax(QK^T * scale) V, with grouped K/V heads.

    With qk_norm (Qwen3, Gemma 3) each head's queries and keys are RMS-normalised before the
    rotation: the logits' size then no longer grows with the activations', which keeps training stable.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.dim_head
        self.scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.window = config.layer_window(layer)
        self.causal = config.causal
        self.layer = layer
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.qkv = Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        if config.qk_norm:  # one weight of head_dim shared by every head
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_plus_one)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_plus_one)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        kern = step_kernels(x)
        if kern is not None and ctx.cache is not None and not ctx.want_weights and ctx.cache.k.dtype == x.dtype:
            return self.proj(self._kernel_step(kern, qkv, ctx))
        q, k, v = qkv.split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = ctx.rope_for(self.window)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)

        mask = ctx.mask_for(self.window)
        if ctx.want_weights:
            y, weights = self._explicit(q, k, v, mask)
            ctx.attn_weights.append(weights)
        else:
            y = self._sdpa(q, k, v, mask, is_causal=mask is None and self.causal and T > 1)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.proj(y)

    def _kernel_step(self, kern: kernels.Kernels, qkv: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        """The lines of forward() from the split to the output projection's input, for a decoding step
        with a cache, in one call of chatforge's kernels: per-head norms, rotary, the cache write, the
        attention. (B, T, H * D)."""
        keys, values, start = ctx.cache.slots(self.layer)
        mask = ctx.mask_for(self.window)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.plus_one) \
            if isinstance(self.q_norm, RMSNorm) else None
        return kern.attention_step(qkv, self.n_head, self.n_kv_head, self.head_dim, ctx.rope_for(self.window),
                                   keys, values, start, mask, mask is None and self.causal and qkv.shape[1] > 1,
                                   self.scale, norms)

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        if q.dtype != torch.float32 and q.device.type == "cpu" and q.requires_grad:
            # torch's CPU flash-attention backward runs ~15x slower in bf16 than in fp32 (measured, torch
            # 2.13), which made bf16 training slower than fp32: train the attention itself in fp32
            with torch.autocast("cpu", enabled=False):
                return self._sdpa(q.float(), k.float(), v.float(), mask, is_causal).to(q.dtype)
        kern = step_kernels(q, _STEP_ROWS * self.n_head) if k.dtype == q.dtype and not self.training else None
        if kern is not None:  # a decoding step's few queries: one call, no per-call setup of flash attention
            return kern.attention(q, k, v, mask, self.scale, causal=is_causal)
        p = self.dropout if self.training else 0.0
        if self.n_kv_head != self.n_head:
            if _SDPA_GQA:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                                      scale=self.scale, enable_gqa=True)
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                              scale=self.scale)

    def _explicit(self, q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The same attention written out, for when the caller wants to see the weights."""
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = (q @ k.transpose(-2, -1)).float() * self.scale
        if mask is None:
            T, S = q.shape[-2], k.shape[-2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
            if self.causal:
                mask = mask.tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1)
        return (weights.to(v.dtype) @ v), weights

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.n_head // self.n_kv_head, dim=1) if self.n_kv_head != self.n_head else x


# --- feed-forward ---------------------------------------------------------------------------

# gated MLPs: act(gate) * up, the gate's activation by mlp name
GATES = {"swiglu": F.silu, "geglu_tanh": functools.partial(F.gelu, approximate="tanh")}
# plain MLPs (and BERT's masked-LM transform): the activation by mlp name; "gelu" is the exact erf GELU
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "relu": F.relu}


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT, BERT), or gated: SwiGLU (Llama) or GeGLU-tanh (Gemma),
    with gate and up fused in one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.ffn_dim
        self.fc = Linear(config.n_embd, 2 * hidden if self.kind in GATES else hidden, bias=config.bias)
        self.proj = Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.fc, "fused_gelu", None)  # a layer that can apply the GELU as it multiplies
        if fused is not None and self.kind in ("gelu", "gelu_tanh"):
            return self.proj(fused(x, "tanh" if self.kind == "gelu_tanh" else "none"))
        h = self.fc(x)
        kern = step_kernels(h) if self.kind == "swiglu" else None
        if kern is not None:  # a decoding step: silu(gate) * up in one call
            h = kern.swiglu(h)
        elif self.kind in GATES:
            gate, up = h.chunk(2, dim=-1)
            h = GATES[self.kind](gate) * up
        else:
            h = ACTIVATIONS[self.kind](h)
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    sandwich_norm (Gemma 3) also normalises each branch's output before it is added, x + norm(attn(norm(x))):
    no branch can then swamp the residual stream, whatever its weights.
    post_norm (BERT, RoBERTa, DistilBERT, the original Transformer) normalises after the add instead,
    norm(x + attn(x)), then norm(x + mlp(x)): the stream itself is renormalised at every layer.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        sandwich = config.sandwich_norm
        self.post_norm = config.post_norm
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.post_attn_norm = make_norm(config) if sandwich else nn.Identity()
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.post_mlp_norm = make_norm(config) if sandwich else nn.Identity()
        # Identity rather than a no-op Dropout(0): one torch op less per branch per decoding step
        self.drop = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        kern = step_kernels(x) if ctx.cache is not None and not ctx.want_weights else None
        desc = self._kernel_desc() if kern is not None and ctx.cache.k.dtype == x.dtype else None
        if desc is not None and x.shape[0] * x.shape[1] <= desc[2] and (kern.isa != "generic" or not desc[3]):
            return self._kernel_step(kern, x, ctx, desc)
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x, ctx)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.post_attn_norm(self.attn(self.norm1(x), ctx)))
        return x + self.drop(self.post_mlp_norm(self.mlp(self.norm2(x))))


    def _kernel_step(self, kern: kernels.Kernels, x: torch.Tensor, ctx: "ForwardContext", desc) -> torch.Tensor:
        """forward() of a decoding step in one call of chatforge's kernels (the pre-norm lines, SwiGLU)."""
        attn = self.attn
        keys, values, start = ctx.cache.slots(attn.layer)
        mask = ctx.mask_for(attn.window)
        causal = mask is None and attn.causal and x.shape[1] > 1
        return kern.block_step(x.contiguous(), desc[0], desc[1], ctx.rope_for(attn.window), keys, values, start, mask,
                               causal)

    def _kernel_desc(self) -> Optional[tuple[torch.Tensor, torch.Tensor, int, bool]]:
        """The block as cf_block_step reads it, (int64 desc, fp32 desc, most rows, whether a linear is packed in
        8-row groups: those need the AVX2 or AVX-512 kernels), or None where that kernel
        does not apply: only a pre-norm block with RMSNorms, a SwiGLU MLP and linears that describe
        themselves (kernel_desc: fp32 Linear, GGMLLinear). Kept until a layer or weight changes."""
        attn, mlp = self.attn, self.mlp
        parts = (self.norm1, self.norm2, attn.qkv, attn.proj, mlp.fc, mlp.proj, attn.q_norm)
        key = tuple(id(p) for p in parts) + tuple(p.weight.data_ptr() for p in parts[:6])
        cached = self.__dict__.get("_desc")
        if cached is not None and cached[0] == key:
            return cached[1]
        self.__dict__["_desc"] = (key, self._describe())
        return self.__dict__["_desc"][1]

    def _describe(self) -> Optional[tuple[torch.Tensor, torch.Tensor, int, bool]]:
        attn, mlp = self.attn, self.mlp
        norms = (self.norm1, self.norm2) + ((attn.q_norm, attn.k_norm) if isinstance(attn.q_norm, RMSNorm) else ())
        if (self.post_norm or mlp.kind != "swiglu" or attn.dropout
                or not all(isinstance(m, nn.Identity) for m in (self.post_attn_norm, self.post_mlp_norm, self.drop))
                or not all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 and n.weight.device.type == "cpu"
                           for n in norms)):
            return None
        linears = [getattr(m, "kernel_desc", lambda: None)() for m in (attn.qkv, attn.proj, mlp.fc, mlp.proj)]
        if any(d is None for d in linears):
            return None
        ptrs = [n.weight.data_ptr() for n in norms] + [0, 0][:4 - len(norms)]
        desc = [self.norm1.weight.shape[0], attn.n_head, attn.n_kv_head, attn.head_dim, mlp.proj.in_features,
                int(self.norm1.plus_one), *ptrs] + [v for d, _ in linears for v in d]
        return (torch.tensor(desc, dtype=torch.int64), torch.tensor([self.norm1.eps, attn.scale]),
                min(rows for _, rows in linears), any(d[5] for d, _ in linears))


class MLMTransform(nn.Module):
    """BERT's masked-LM transform, between the last block and the vocabulary projection: norm(act(dense(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd, bias=True)
        self.act = ACTIVATIONS[config.mlp]
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


# --- the model ------------------------------------------------------------------------------

class ForwardContext:
    """What every layer of one forward pass shares: positions, rotary tables, masks, the cache."""

    def __init__(self, positions, rope, rope_local, cache, key_pos, key_valid, causal, padded, want_weights):
        self.positions, self.rope, self.rope_local, self.cache = positions, rope, rope_local, cache
        self.key_pos, self.key_valid = key_pos, key_valid
        self.causal, self.padded = causal, padded
        self.want_weights = want_weights
        self.attn_weights: list[torch.Tensor] = []
        self._masks: dict[Optional[int], Optional[torch.Tensor]] = {}

    def rope_for(self, window: Optional[int]):
        """The rotary (cos, sin) of a layer: sliding-window layers have their own when the model gives
        them their own base (Gemma 3: 10k locally, 1M globally); None without rotary positions."""
        return self.rope_local if window is not None and self.rope_local is not None else self.rope

    def mask_for(self, window: Optional[int]) -> Optional[torch.Tensor]:
        """None when SDPA's own causal (or no) mask is exact: plain training, and decoding an unpadded batch."""
        if window not in self._masks:
            if self._shapes_suffice(window):
                self._masks[window] = None
            else:
                self._masks[window] = attention_mask(self.positions, self.key_pos, self.key_valid, self.causal, window)
        return self._masks[window]

    def _shapes_suffice(self, window: Optional[int]) -> bool:
        """Whether every query may see exactly the keys SDPA shows it without a mask.

        True without padding when the window (if any) spans every key, and the queries are either
        all the keys (is_causal=True is then exact) or one new token after them (it sees them all).
        Slots are assumed to hold increasing positions, as the engine writes them.
        """
        if self.padded or self.key_valid is not None:
            return False
        queries, keys = self.positions.shape[1], self.key_pos.shape[1]
        if window is not None and keys > window:
            return False
        return not self.causal or queries == keys or queries == 1


class Transformer(nn.Module):
    """Token (+ position, + segment) embeddings -> N blocks -> final norm -> vocabulary logits
    (and, when the config asks for one, a classifier over one pooled vector per sequence).

    Post-norm blocks end normalised, so they have no final norm; BERT's masked-LM head puts its
    transform (lm_transform) before the vocabulary projection, which then has a bias. An encoder
    loaded without any LM head (task="features") answers its final hidden states instead of logits.
    """

    # the weight-only quantization its layers were given ("int8", "int4"; chatforge.quantize sets it),
    # None in full precision; the forward pass does not look at it, callers (and tests) may
    quantized: Optional[str] = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # RoBERTa numbers positions from padding_idx + 1 (position_offset), so it has that many more rows
        n_positions = config.block_size + config.position_offset
        self.wpe = nn.Embedding(n_positions, config.n_embd) if config.pos_encoding == "learned" else None
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        self.embd_norm = make_norm(config) if config.embd_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.Identity() if config.post_norm else make_norm(config)
        self.lm_transform = MLMTransform(config) if config.mlm_head else nn.Identity()
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=config.mlm_head)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # optional sequence-level head over one pooled vector: NSP while pre-training, labels when fine-tuned
        self.pooler = nn.Linear(config.n_embd, config.n_embd, bias=True) if config.pooler else None
        self.classifier = nn.Linear(config.n_embd, config.num_labels, bias=True) if config.num_labels else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        cache=None,
        logits: str = "all",
        return_attention: bool = False,
    ):
        """Logits for token ids `idx` (B, T).

        positions: (B, T) position of each token; default 0..T-1 (after the cache's tokens).
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        cache: a KVCache to read earlier keys/values from and append these to.
        logits: "all", "last" (only the final position: a cheap prefill), "none" (hidden states) or
            "classify" ((B, num_labels) logits of the sequence-level head). A task="features" model
            answers hidden states for "all" and "last" too: it has no LM head.
        token_type_ids: (B, T) segment of each token (0 = first sentence, 1 = second) for BERT-style models.
        return_attention: also return each layer's (B, H, T, S) attention weights.
        """
        x, ctx = self._embed(idx, positions, attention_mask, token_type_ids, cache, return_attention)
        for block in self.blocks:
            x = block(x, ctx)
        x = self.norm_f(x)
        if cache is not None:
            cache.advance(idx.shape[1])
        if logits == "classify":
            out = self.classify(x, attention_mask)
        else:
            if logits == "last":
                x = x[:, -1:]
            out = x if logits == "none" or self.config.task == "features" else self.lm_logits(x)
        return (out, ctx.attn_weights) if return_attention else out

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of final hidden states: the output head, after BERT's transform when it has one."""
        return self.lm_head(self.lm_transform(hidden))

    def pool(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             pooling: Optional[str] = None) -> torch.Tensor:
        """One vector per sequence: the first token ([CLS]), the last real token, or the mean or the
        element-wise max of the real tokens (`pooling`, default the config's).

        An encoder's [CLS] sees the whole input; a decoder's only summary of it is its last token.
        """
        pooling = pooling or self.config.pooling
        if pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)
        if pooling == "mean":
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        if pooling == "max":
            return hidden.masked_fill(~attention_mask.bool()[..., None], torch.finfo(hidden.dtype).min).amax(1)
        steps = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.long() * (steps + 1)).argmax(-1)  # the right-most real token, whatever the padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def classify(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, num_labels) logits of the sequence-level head from final hidden states (B, T, C)."""
        if self.classifier is None:
            raise ChatforgeError("this model has no sequence-level head (num_labels is 0); fine-tune it as a "
                                 "classifier first (`chatforge finetune --task classify`)")
        x = self.pool(hidden, attention_mask)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.drop(x))

    def _embed(self, idx, positions, attention_mask, token_type_ids, cache, want_weights):
        B, T = idx.shape
        cfg = self.config
        if positions is None:
            # count real tokens: a decoder's left padding, and RoBERTa, which numbers them whatever the padding
            if attention_mask is not None and (cfg.causal or cfg.position_offset):
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(T, device=idx.device).expand(B, T)
            if cache is not None:
                positions = positions + cache.next_position()[:, None]
        if self.wpe is not None and int(positions.max()) >= cfg.block_size:
            raise ChatforgeError(
                f"sequence reaches position {int(positions.max()) + 1} but the model's context is "
                f"{cfg.block_size} tokens; shorten the input or lower max_new_tokens")
        x = self.wte(idx)
        if cfg.embd_scale is not None:
            # Gemma: sqrt(n_embd), rounded to the embeddings' dtype as Gemma itself does (33.94 is 34.0 in bf16)
            x = x * torch.tensor(cfg.embd_scale, dtype=x.dtype, device=x.device)
        if self.wpe is not None:
            rows = positions + cfg.position_offset
            if cfg.position_offset and attention_mask is not None:  # RoBERTa's padding sits at padding_idx
                rows = rows.masked_fill(~attention_mask.bool(), cfg.position_offset - 1)
            x = x + self.wpe(rows)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(positions, cfg.n_embd).to(x.dtype)
        if self.wtt is not None:
            x = x + self.wtt(token_type_ids if token_type_ids is not None else torch.zeros_like(idx))
        if self.embd_norm is not None:
            x = self.embd_norm(x)
        x = self.drop(x)

        rope = rope_local = None
        if cfg.pos_encoding == "rope":
            rope = rope_cos_sin(positions, cfg.dim_head, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_local_theta is not None and cfg.sliding_window is not None:
                # sliding-window layers never see far, so their rotary is plain: no long-context scaling
                rope_local = rope_cos_sin(positions, cfg.dim_head, cfg.rope_local_theta)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None:
            key_pos, key_valid = cache.reserve(positions, attention_mask)
        else:
            key_pos, key_valid = positions, attention_mask if padded else None
        return x, ForwardContext(positions, rope, rope_local, cache, key_pos, key_valid, cfg.causal, padded,
                                 want_weights)
