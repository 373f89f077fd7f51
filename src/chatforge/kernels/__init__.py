"""chatforge's own CPU kernels for decoding: weight-only GEMV over ggml blocks, and the small ops of a step.

    k = kernels.get()             # the chosen variant (compiled on first use), or None: use torch
    y = k.linear(x, blocks, "Q4_1", out_features, in_features)   # x @ W^T, W as stored in a GGUF file
    kernels.status()              # "avx2, built by cc 12.2.0", or why there are none

torch's batch-1 GEMV streams weights at about a third of the memory bus on some CPUs (MKL on an AMD
EPYC), cannot read 4-bit blocks without unpacking them, and spends more time dispatching the ~100
small ops of a decoding step than computing them. q_gemv.c (next to this file) does the multiplies of
a few rows (a decoding step, a small batch) straight from the stored blocks on every core, and
RMSNorm, rotary, SwiGLU and the attention of a few queries in one call each. Prefill-sized blocks of
rows stay with torch's GEMM: it is compute-bound there, and faster.

Core layer, beside chatforge.model: it imports only torch and chatforge.utils. The library is built by
chatforge.kernels.build with the system compiler for the instruction set the CPU has; without a
compiler (or with CHATFORGE_KERNELS=0) get() is None and every caller keeps its pure-torch path,
which the tests check against the same references.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

from chatforge.kernels import build
from chatforge.kernels.ggml import TYPE_IDS

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Kernels:
    """One compiled variant of q_gemv.c ("avx512", "avx2" or "generic"), its functions typed for ctypes.

    Every method takes fp32 CPU tensors (the callers check that before calling) and returns new ones.
    """

    def __init__(self, isa: str):
        self.isa = isa
        self.path = build.library_path(isa)
        lib = ctypes.CDLL(str(self.path))  # after `import torch`: OpenMP resolves to torch's own runtime
        sigs = {
            "cf_isa": (_I32, []),
            "cf_gemv": (_I32, [_I32, _P, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _I32, _I32]),
            "cf_dequantize": (_I32, [_I32, _P, _I64, _I64, _I64, _P, _P, _I32]),
            "cf_repack8": (_I32, [_I32, _P, _I64, _I64, _I64, _P]),
            "cf_dequantize8": (_I32, [_I32, _P, _I64, _I64, _P, _P, _I32]),
            "cf_gemv8": (_I32, [_I32, _P, _I64, _I64, _P, _I64, _P, _I64, _P, _I32, _I32]),
            "cf_rmsnorm": (None, [_P, _P, _P, _I64, _I64, _F32, _I32]),
            "cf_rope": (None, [_P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P]),
            "cf_swiglu": (None, [_P, _P, _I64, _I64]),
            "cf_attention": (_I32, [_P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64,
                                    _I64, _I32, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _P, _I32]),
            "cf_attention_step": (_I32, [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _F32, _I32, _P, _P, _P, _P, _I64,
                                         _I64, _I64, _I64, _P, _I64, _I64, _I32, _F32, _P, _I32]),
            "cf_block_step": (_I32, [_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64,
                                     _I32, _I32, _I32]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self._lib = lib
        if lib.cf_isa() != ISA_CODES[isa]:
            raise build.BuildError(f"{self.path} is not the {isa} build")

    # --- multiplies ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, kind: str, out_features: int, in_features: int,
               bias: Optional[torch.Tensor] = None, int8: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias) for x (..., in_features) fp32; W: (out_features, row bytes) uint8 blocks of
        `kind` (Q4_0, Q4_1, Q8_0), or an fp32 / bf16 (out_features, in_features) matrix (kind F32 / BF16).
        int8 (block kinds, AVX2 and AVX-512 builds): x's blocks of 32 rounded to int8 first and the products
        integer (llama.cpp's way: about half the work); else exact up to fp32 rounding."""
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], out_features)
        rc = self._lib.cf_gemv(TYPE_IDS[kind], weight.data_ptr(), weight.stride(0) * weight.element_size(),
                               out_features, in_features, x.data_ptr(), x.numel() // in_features, y.data_ptr(),
                               out_features, None if bias is None else bias.data_ptr(), int(int8),
                               torch.get_num_threads())
        if rc:
            raise ValueError(f"cf_gemv: a {kind} weight of {out_features} x {in_features} cannot be multiplied")
        return y

    def dequantize(self, weight: torch.Tensor, kind: str, cols: int, rows: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 (n, cols) of the weight's rows (all of them, or the int64 indices `rows`), written into `out`
        (n * cols contiguous fp32 values) when given."""
        n = weight.shape[0] if rows is None else rows.numel()
        out = torch.empty(n, cols) if out is None else out.view(n, cols)
        idx = None if rows is None else rows.reshape(-1).contiguous().to(torch.int64)
        rc = self._lib.cf_dequantize(TYPE_IDS[kind], weight.data_ptr(), weight.stride(0) * weight.element_size(),
                                     n, cols, None if idx is None else idx.data_ptr(), out.data_ptr(),
                                     torch.get_num_threads())
        if rc:
            raise ValueError(f"cf_dequantize: not a {kind} weight of {cols} columns")
        return out

    # --- 8 rows interleaved (Q4_0, Q4_1 with int8 activations) --------------------------------------
    def repack8(self, weight: torch.Tensor, kind: str, in_features: int) -> torch.Tensor:
        """The rows of a Q4_0 / Q4_1 weight (rows, row bytes) in groups of 8 (see cf_repack8 in q_gemv.c):
        (ceil(rows / 8), 8 x row bytes) uint8, the last group padded with zero rows."""
        rows, rb = weight.shape[0], weight.stride(0) * weight.element_size()
        out = torch.empty((rows + 7) // 8, 8 * weight.shape[1], dtype=torch.uint8)
        if self._lib.cf_repack8(TYPE_IDS[kind], weight.data_ptr(), rb, rows, in_features, out.data_ptr()):
            raise ValueError(f"cf_repack8: not {kind} rows of {in_features} weights")
        return out

    def linear8(self, x: torch.Tensor, packed: torch.Tensor, kind: str, out_features: int, in_features: int,
                bias: Optional[torch.Tensor] = None, int8: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias) for W repacked by repack8 and x (..., in_features) fp32, exact or (int8) with x
        rounded to int8 blocks first, as in `linear`; AVX2 and AVX-512 builds only."""
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], out_features)
        rc = self._lib.cf_gemv8(TYPE_IDS[kind], packed.data_ptr(), out_features, in_features, x.data_ptr(),
                                x.numel() // in_features, y.data_ptr(), out_features,
                                None if bias is None else bias.data_ptr(), int(int8), torch.get_num_threads())
        if rc:
            raise ValueError(f"cf_gemv8: a repacked {kind} weight of {out_features} x {in_features} cannot be multiplied here")
        return y

    def dequantize8(self, packed: torch.Tensor, kind: str, rows: int, cols: int, idx: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 (n, cols): rows idx (int64), or the first `rows` rows, of a weight repacked by repack8, written
        into `out` (n * cols contiguous fp32 values) when given."""
        ids = None if idx is None else idx.reshape(-1).contiguous().to(torch.int64)
        n = rows if ids is None else ids.numel()
        out = torch.empty(n, cols) if out is None else out.view(n, cols)
        if self._lib.cf_dequantize8(TYPE_IDS[kind], packed.data_ptr(), n, cols, None if ids is None else ids.data_ptr(),
                                    out.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"cf_dequantize8: not a repacked {kind} weight of {cols} columns")
        return out

    # --- the small ops of a step ---------------------------------------------------------------------
    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
        """x / rms(x) * weight (or * (1 + weight)) over the last dim."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._lib.cf_rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                             eps, int(plus_one))
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D), last dim contiguous, in place by cos, sin (B, 1, T, D) contiguous."""
        B, H, T, D = x.shape
        sb, sh, st, _ = x.stride()
        cos, sin = cos.expand(B, 1, T, D).contiguous(), sin.expand(B, 1, T, D).contiguous()
        self._lib.cf_rope(x.data_ptr(), B, H, T, D, sb, sh, st, cos.data_ptr(), sin.data_ptr())
        return x

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for h = [gate | up] along the last dim."""
        h = h.contiguous()
        f = h.shape[-1] // 2
        out = torch.empty(*h.shape[:-1], f)
        self._lib.cf_swiglu(h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], f)
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float, causal: bool = False) -> torch.Tensor:
        """softmax(q k^T * scale) v with grouped key/value heads: q (B, H, Tq, D), k and v (B, KVH, S, D),
        each with its last dim contiguous; mask: bool, broadcastable to (B, 1, Tq, S), True where a key
        may be seen; causal: query i sees keys up to S - Tq + i. Returns (B, H, Tq, D), a view of a
        (B, Tq, H, D) tensor: transposed back, it is the output projection's input without a copy."""
        B, H, Tq, D = q.shape
        KVH, S = k.shape[1], k.shape[2]
        out = torch.empty(B, Tq, H, D)
        mask, (mptr, mb, mt) = _mask_args(mask)
        rc = self._lib.cf_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                    k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                                    v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                    mptr, mb, mt, int(causal), B, H, KVH, Tq, S, D, scale, out.data_ptr(),
                                    torch.get_num_threads())
        if rc:
            raise ValueError(f"cf_attention: {H} query heads cannot share {KVH} key/value heads")
        return out.transpose(1, 2)

    def attention_step(self, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                       rope: Optional[tuple[torch.Tensor, torch.Tensor]], k_cache: torch.Tensor, v_cache: torch.Tensor,
                       start: int, mask: Optional[torch.Tensor], causal: bool, scale: float,
                       norms: Optional[tuple[torch.Tensor, torch.Tensor, float, bool]] = None) -> torch.Tensor:
        """One attention layer of a decoding step in one call: qkv (B, T, (H + 2 KVH) D), the qkv projection's
        output (its query and key heads are normalised and rotated in place); its keys and values written
        into this layer's cache (B, KVH, slots, D) at slots start..start+T-1; the attention of the T queries
        over slots 0..start+T-1 (mask: bool (B, 1, T, start+T), or causal), as in `attention`. norms: the
        per-head RMSNorm weights of queries and keys, eps and plus_one (Qwen3, Gemma 3). Returns (B, T, H D)."""
        B, T, _ = qkv.shape
        if not qkv.is_contiguous():
            qkv = qkv.contiguous()
        out = torch.empty(B, T, heads * head_dim)
        cos = sin = None
        if rope is not None:  # (B, 1, T, D) tables, made once per forward pass: contiguous already
            cos, sin = (t if t.shape[0] == B and t.is_contiguous() else t.expand(B, 1, T, head_dim).contiguous()
                        for t in rope)
        qn, kn, eps, plus_one = norms if norms is not None else (None, None, 0.0, False)
        mask, (mptr, mb, mt) = _mask_args(mask)
        cb, ch, cs, _ = k_cache.stride()
        rc = self._lib.cf_attention_step(
            qkv.data_ptr(), B, T, heads, kv_heads, head_dim, None if qn is None else qn.data_ptr(),
            None if kn is None else kn.data_ptr(), eps, int(plus_one), None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cb, ch, cs, start,
            mptr, mb, mt, int(causal), scale, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"cf_attention_step: {heads} query heads cannot share {kv_heads} key/value heads")
        return out

    def block_step(self, x: torch.Tensor, desc: torch.Tensor, fdesc: torch.Tensor,
                   rope: Optional[tuple[torch.Tensor, torch.Tensor]], k_cache: torch.Tensor, v_cache: torch.Tensor,
                   start: int, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        """A whole pre-norm decoder block of a decoding step in one call (cf_block_step in q_gemv.c): x (B, T, C)
        fp32, contiguous; desc (int64) and fdesc (fp32) describe the block's weights (model.Block builds them);
        the attention's arguments as in attention_step. Returns the block's output (B, T, C)."""
        B, T, _ = x.shape
        y = torch.empty_like(x)
        cos = sin = None
        if rope is not None:
            cos, sin = (t if t.shape[0] == B and t.is_contiguous() else t.expand(B, 1, T, t.shape[-1]).contiguous()
                        for t in rope)
        mask, (mptr, mb, mt) = _mask_args(mask)
        cb, ch, cs, _ = k_cache.stride()
        rc = self._lib.cf_block_step(
            x.data_ptr(), y.data_ptr(), B, T, desc.data_ptr(), fdesc.data_ptr(), None if cos is None else cos.data_ptr(),
            None if sin is None else sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), cb, ch, cs, start, mptr, mb,
            mt, int(causal), int(int8_activations()), torch.get_num_threads())
        if rc:
            raise ValueError("cf_block_step: a layer of this block cannot be multiplied by the kernels")
        return y


def _mask_args(mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], tuple[Optional[int], int, int]]:
    """The attention kernels' mask arguments: the mask with its last dim contiguous (kept alive by the
    caller while the kernel reads it) and (pointer, batch stride, query stride), a stride 0 where that
    dim broadcasts; (None, 0, 0) without a mask."""
    if mask is None:
        return None, (None, 0, 0)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    return mask, (mask.data_ptr(), mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2) if mask.shape[2] > 1 else 0)


ISA_CODES = {"generic": 0, "avx2": 1, "avx512": 2}


def variant(isa: str) -> Kernels:
    """Variant `isa`, built on first use; BuildError when it cannot be had (tests run every variant the CPU has)."""
    if isa not in build.supported_isas():
        raise build.BuildError(f"this CPU cannot run the {isa} kernels")
    return _variant(isa, build.vnni(isa))


@functools.lru_cache(maxsize=None)
def _variant(isa: str, vnni: bool) -> Kernels:
    return Kernels(isa)


@functools.lru_cache(maxsize=1)
def _chosen() -> tuple[Optional[Kernels], str]:
    if build.disabled():
        return None, f"off ({build.ENV}={os.environ.get(build.ENV)})"
    isa = build.chosen_isa()
    try:
        k = variant(isa)
    except (build.BuildError, OSError) as e:
        return None, f"unavailable: {e}"
    cc, version = build.compiler()
    return k, f"{isa}, built by {os.path.basename(cc)} {(version.split() or ['?'])[-1]}"


GEMV_ENV = "CHATFORGE_GEMV"


@functools.lru_cache(maxsize=1)
def int8_activations() -> bool:
    """Whether the block GEMVs round the activations to int8 blocks first (the default: llama.cpp's numerics,
    2-3x the weights per second of exact fp32 products, logits within about 1% of the exact ones) or keep
    them fp32 (CHATFORGE_GEMV=exact: the dequantized weights times x up to fp32 rounding, so greedy tokens
    equal torch's)."""
    return os.environ.get(GEMV_ENV, "").strip().lower() != "exact"


def get() -> Optional[Kernels]:
    """The kernels for this CPU, compiled on first use, or None (no compiler, a failed build, turned off)."""
    return _chosen()[0]


def available() -> bool:
    return get() is not None


def status() -> str:
    """A line for `chatforge plan` and the benchmarks: the variant in use, or why none is."""
    return _chosen()[1]


def reset() -> None:
    """Forget the choice (after changing CHATFORGE_KERNELS or ATEN_CPU_CAPABILITY in this process: tests)."""
    _chosen.cache_clear()
    int8_activations.cache_clear()


__all__ = ["Kernels", "get", "available", "status", "variant", "reset", "int8_activations"]
