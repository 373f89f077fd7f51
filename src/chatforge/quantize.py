"""Weight-only quantization (int8, int4): less weight memory, and faster batch-1 decoding on a CPU.

    model = quantize_model(model)                                  # int8, in place; returns the model
    model, tok = chatforge.loader.load(path, quantize="int4")      # quantized while it loads

Model surgery only: this module changes a built model (or fills a meta-device skeleton from a
source of weight rows) and reads no files. It sits below formats/ and chatforge.loader, beside
chatforge.lora, above the model; the loader opens the weights file and hands it over as a
`RowSource`.

Decoding one token reads every weight once, so its speed is bounded by memory bandwidth:
one byte per weight instead of four (fp32) or two (bf16) moves that much less. Each Linear's
weight becomes int8 with one scale per output row (symmetric: w ~ q * scale, q in [-127, 127]);
the token embedding is quantized per row too, and when it is tied to the output head both
read the same int8 table. Activations, norms, biases and position tables stay in floating point,
bf16 where the hardware has it, because torch's int8 kernel is fastest with bf16 inputs.

The forward picks its kernel by the number of rows: a few rows (decoding) go to torch's
`_weight_int8pack_mm`, which reads the int8 weights directly; many rows (a prefill) widen the
weight to the activation dtype and run an ordinary matrix multiply, which is compute-bound then
anyway. `quantize_from` (what the loader uses for a chatforge checkpoint) quantizes row chunk by
row chunk as they are read, so the full-precision model never sits in memory.

Where chatforge's own CPU kernels are built (chatforge.kernels: a C compiler on the machine), both
modes are ggml's block formats instead, the kernels multiplying by the blocks as they are stored
(GGMLLinear): int8 is Q8_0 (32 weights and an fp16 scale), int4 is Q4_1 (32 weights, an fp16 scale
and minimum), activations fp32; a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks are kept byte for byte. The
rest of this docstring describes torch's layouts, used without those kernels.

int4 halves the bytes again: each Linear's weight is cut into groups of inputs (INT4_GROUP = 64 when
chatforge quantizes; 32 for blocks a GGUF file hands over, the group being a property of each layer),
each group with its own scale and zero point (asymmetric: w ~ (q - 8) * scale + zero, q in [0, 15]),
packed two to a byte in the blocked layout torch's CPU kernel `_weight_int4pack_mm_for_cpu` reads.
Decoding rows go to that kernel; a prefill unpacks one layer at a time to the activation dtype for
the GEMM. A tied embedding reads its rows from the head's int4 table; an untied one is int8 (only
one row per token is read, so its size does not slow decoding). A layer whose width is not a
multiple of the group stays int8. `Int4Linear.from_blocks` takes 4-bit values already grouped
(GGUF's Q4_0, Q4_1, Q4_K) as they are: no float round trip.
"""
from __future__ import annotations

import functools
import threading
from typing import Iterable, Iterator, Mapping, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge import kernels
from chatforge.errors import ChatforgeError
from chatforge.kernels import ggml
from chatforge.utils import bf16_supported

QUANT_MODES = ("int8", "int4")
# torch's int8-weight x float-activation kernel; it needs the input width to be a multiple of 16
_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
INT8_MM_MAX_ROWS = 16  # more rows than this: widening the weight for a real GEMM is faster (measured)


def check_mode(quantize: Optional[str]) -> Optional[str]:
    """None for no quantization, else the mode; a ChatforgeError names the choices."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANT_MODES:
        raise ChatforgeError(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANT_MODES)} "
                             "(or leave it out for full precision)")
    return quantize


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q, scale) with weight[i] ~ q[i] * scale[i], scale in fp32."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    _quantize_into(weight.detach().to(torch.float32, copy=True), q, scale)
    return q, scale


def _quantize_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize fp32 rows `w` into q and scale, using w itself as the scratch space (no temporaries
    the size of w: while loading, each one would be a hole the allocator keeps)."""
    torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_(), out=scale)
    scale.div_(127.0).clamp_(min=1e-12)  # an all-zero row stays zero
    q.copy_(w.div_(scale[:, None]).round_().clamp_(-127, 127))


def quantize_rows(chunks: Iterable[torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8 of a matrix handed over in row chunks, holding one chunk in full precision at a time.

    The chunks are used as scratch space (their contents are destroyed).
    """
    q = torch.empty(shape, dtype=torch.int8)
    scale = torch.empty(shape[0], dtype=torch.float32)
    start = 0
    for chunk in chunks:
        end = start + chunk.shape[0]
        _quantize_into(chunk if chunk.dtype == torch.float32 else chunk.float(), q[start:end], scale[start:end])
        start = end
    if start != shape[0]:
        raise ValueError(f"expected {shape[0]} rows, got {start}")
    return q, scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and one scale per output row: y = (x q^T) * scale + bias."""

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q.contiguous())
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.kernel_ok = _INT8_MM is not None and self.in_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel_ok and x2.shape[0] <= INT8_MM_MAX_ROWS and x.dtype == self.scale.dtype:
            y = _INT8_MM(x2.contiguous(), self.weight, self.scale)
        else:  # compute-bound: widen the weight once, use the fast GEMM, scale the outputs
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of the weight, dequantized (a tied embedding's lookup)."""
        return F.embedding(idx, self.weight).to(self.scale.dtype) * self.scale[idx][..., None]

    def dequantized(self) -> torch.Tensor:
        """The weight this layer effectively multiplies by, in fp32 (for tests and inspection)."""
        return self.weight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Token embedding rows read from a quantized table: its own int8 one, or (tied) the output head's."""

    def __init__(self, weight_q: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                 head: Optional[nn.Module] = None):
        super().__init__()
        # a list, not an attribute: the head stays a child of the model only, its tensors stored once
        self._tied = [head] if head is not None else []
        if head is None:
            self.register_buffer("weight", weight_q)
            self.register_buffer("scale", scale)

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._tied[0] if self._tied else self
        return owner.weight, getattr(owner, "scale", getattr(owner, "scales_zeros", None))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self._tied:
            return self._tied[0].rows(idx)
        return F.embedding(idx, self.weight).to(self.scale.dtype) * self.scale[idx][..., None]


# --- int4 -----------------------------------------------------------------------------------------

_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
INT4_GROUP = 64  # inputs that share one scale and zero point, when chatforge quantizes (the kernel takes 32 too)
INT4_BLOCK = 64  # output rows per block of the CPU kernel's packed layout
INT4_MM_MAX_ROWS = 32  # more rows than this: unpacking the layer for a real GEMM is faster (measured)
_STAGE_BLOCKS = 16  # blocks quantized and packed together while loading


def int4_ok(in_features: int, group: int = INT4_GROUP) -> bool:
    """Whether a Linear with this input width can be int4 (whole groups only)."""
    return in_features % group == 0


def padded_rows(rows: int) -> int:
    """Rows rounded up to whole INT4_BLOCKs, as the packed layout needs (the extra rows are zero)."""
    return -(-rows // INT4_BLOCK) * INT4_BLOCK


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group int4: q uint8 (out, in) in [0, 15], and scale, zero (out, in / group) in fp32,
    with weight ~ (q - 8) * scale + zero group by group."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    scale, zero = (torch.empty(rows, cols // group, device=weight.device) for _ in range(2))
    _quantize_int4_into(weight.detach().to(torch.float32, copy=True), q, scale, zero)
    return q, scale, zero


def _quantize_int4_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Quantize fp32 rows `w` into q, scale and zero, using w itself as the scratch space (while
    loading, a temporary the size of w would be a hole the allocator keeps). The group is w's width
    over scale's."""
    g = w.view(w.shape[0], scale.shape[1], -1)
    lo = g.amin(-1)
    torch.sub(g.amax(-1), lo, out=scale)
    scale.div_(15).clamp_(min=1e-12)  # an all-zero group stays zero
    torch.add(lo, scale, alpha=8, out=zero)
    q.view(g.shape).copy_(g.sub_(lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15))


def quantize_rows_int4(chunks: Iterable[torch.Tensor], shape: tuple[int, int],
                       group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """(packed, scale, zero) of a matrix handed over in row chunks (used as scratch), rows padded to
    whole blocks. Rows are quantized into a small staging buffer and packed from there whenever it
    fills, so the only matrix-sized buffers are the results."""
    rows, cols = shape
    padded = padded_rows(rows)
    packed = torch.empty(padded, cols // 2, dtype=torch.uint8)
    scale, zero = (torch.zeros(padded, cols // group) for _ in range(2))
    stage = torch.zeros(min(padded, _STAGE_BLOCKS * INT4_BLOCK), cols, dtype=torch.uint8)
    done = filled = 0  # rows packed; rows waiting in the stage

    def flush(n: int) -> None:
        packed[done:done + n] = pack_int4(stage[:n])

    for chunk in chunks:
        chunk = chunk if chunk.dtype == torch.float32 else chunk.float()
        pos = 0
        while pos < chunk.shape[0]:
            take = min(stage.shape[0] - filled, chunk.shape[0] - pos)
            at = done + filled
            _quantize_int4_into(chunk[pos:pos + take], stage[filled:filled + take], scale[at:at + take],
                                zero[at:at + take])
            pos, filled = pos + take, filled + take
            if filled == stage.shape[0]:
                flush(filled)
                done, filled = done + filled, 0
    if done + filled != rows:
        raise ValueError(f"expected {rows} rows, got {done + filled}")
    if filled:  # the last, partly filled blocks: zero rows below the real ones
        stage[filled:].zero_()
        flush(padded - done)
    return packed, scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15], N a multiple of INT4_BLOCK -> (N, K / 2) bytes in the CPU kernel's
    layout: blocks of 64 output rows, each stored input by input, byte j = row j | row j + 32 << 4.
    Packed _STAGE_BLOCKS blocks at a time, so its temporaries stay small."""
    rows, cols = q.shape
    half, step = INT4_BLOCK // 2, _STAGE_BLOCKS * INT4_BLOCK
    out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=q.device)
    for r in range(0, rows, step):
        v = q[r:r + step].view(-1, INT4_BLOCK, cols).transpose(1, 2)
        out[r:r + step].view(-1, cols, half).copy_(v[..., :half] | (v[..., half:] << 4))
    return out


@functools.lru_cache(maxsize=1)
def _kernel_layout_matches() -> bool:
    """Whether torch packs int4 weights the way pack_int4 does (checked once: a torch release may change
    it; then the kernel is not used, and the unpacking path, which reads pack_int4's layout, still is)."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if _INT4_MM is None or convert is None:
        return False
    q = torch.randint(0, 16, (2 * INT4_BLOCK, 2 * INT4_GROUP), generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(convert(q.to(torch.int32), 2), pack_int4(q.to(torch.uint8)))
    except RuntimeError:
        return False


class Int4Linear(nn.Module):
    """A Linear layer with int4 weights, a scale and zero point per group of `group` inputs (64 or 32)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: Optional[torch.Tensor],
                 dtype: torch.dtype, out_features: int):
        """packed: (padded rows, in / 2) from pack_int4; scale, zero: (padded rows, in / group), which
        sets the group."""
        super().__init__()
        self.out_features, self.in_features = out_features, packed.shape[1] * 2
        self.register_buffer("weight", packed)
        # (in / group, padded out, 2): scale and zero, the kernel's layout
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self._decide()

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int4Linear":
        q, scale, zero = quantize_int4(linear.weight)
        extra = padded_rows(q.shape[0]) - q.shape[0]  # whole blocks; the extra rows are zero
        q, scale, zero = (torch.cat([t, t.new_zeros(extra, t.shape[1])]) for t in (q, scale, zero))
        return cls(pack_int4(q), scale, zero, linear.bias, dtype, linear.out_features)

    @classmethod
    def from_blocks(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor],
                    dtype: torch.dtype) -> "Int4Linear":
        """The layer of 4-bit values already grouped, kept as they are: q uint8 (out, in) in 0..15 and
        scale, offset (out, in / group) with w = q * scale + offset in each group (the group is in / the
        scales' width; 32 for GGUF's Q4_0, Q4_1, Q4_K).

        In this layer's terms, (q - 8) * scale + zero, zero = offset + 8 * scale: GGUF's Q4_0
        (w = d (q - 8)) has zero 0, its Q4_1 (w = d q + m) zero m + 8 d. Only the scales are computed.
        """
        out = q.shape[0]
        extra = padded_rows(out) - out  # whole blocks; the extra rows are zero
        zero = offset.float() + 8 * scale.float()
        q, scale, zero = (torch.cat([t, t.new_zeros(extra, t.shape[1])]) for t in (q, scale.float(), zero))
        return cls(pack_int4(q), scale, zero, bias, dtype, out)

    @property
    def group(self) -> int:
        """Inputs that share one scale and zero point."""
        return self.in_features // self.scales_zeros.shape[0]

    @property
    def kernel_ok(self) -> bool:
        return self.weight.device.type == "cpu" and _kernel_layout_matches()

    def _decide(self) -> None:
        """Whether decoding rows may use the kernel, decided once per placement: forward runs once per
        layer per token, so its own checks must cost next to nothing."""
        self._kernel, self._padded = self.kernel_ok, self.weight.shape[0] != self.out_features
        self._group = self.group

    def _apply(self, fn, recurse=True):  # .to() / .cpu() / .cuda(): decide again
        out = super()._apply(fn, recurse)
        self._decide()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        padded = self._padded
        if x2.shape[0] <= INT4_MM_MAX_ROWS and self._kernel and x.dtype == self.scales_zeros.dtype:
            y = _INT4_MM(x2.contiguous(), self.weight, self._group, self.scales_zeros)
        else:  # compute-bound: unpack the layer once, use the fast GEMM
            y = x2 @ self._unpacked_t(x.dtype)
        if padded:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y.add_(self.bias) if not padded else y + self.bias  # a fresh output: add in place
        return y.view(*lead, self.out_features) if not padded else y.reshape(*lead, self.out_features)

    def _unpacked_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight transposed, (in, padded out), in `dtype`: written input-major straight from the
        packed blocks, so no transposing copy follows."""
        blocks, cols, half = self.weight.shape[0] // INT4_BLOCK, self.in_features, INT4_BLOCK // 2
        v = self.weight.view(blocks, cols, half).permute(1, 0, 2)
        w = torch.empty(cols, blocks, INT4_BLOCK, dtype=dtype, device=v.device)
        w[..., :half].copy_(v & 15)
        w[..., half:].copy_(v >> 4)
        sz = self.scales_zeros.to(dtype)
        scale, offset = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # (q - 8) * s + z = q * s + (z - 8 s)
        w.view(cols // self.group, self.group, -1).mul_(scale[:, None]).add_(offset[:, None])
        return w.view(cols, -1)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of the weight, dequantized (a tied embedding's lookup)."""
        half = INT4_BLOCK // 2
        v = self.weight.view(-1, self.in_features, half)
        block, j = idx // INT4_BLOCK, idx % INT4_BLOCK
        b = v[block, :, j % half]  # (..., in)
        q = torch.where((j < half)[..., None], b & 15, b >> 4).to(self.scales_zeros.dtype)
        sz = self.scales_zeros[:, idx].movedim(0, -2)  # (..., groups, 2)
        g = q.view(*idx.shape, -1, self.group)
        return ((g - 8) * sz[..., :1] + sz[..., 1:]).view(*idx.shape, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer effectively multiplies by, (out, in) in fp32 (for tests and inspection)."""
        return self._unpacked_t(torch.float32).t()[:self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group={self.group}")


# --- ggml's blocks, read as stored by chatforge's kernels ---------------------------------------------

KERNEL_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # block formats chatforge.kernels multiplies by as they are
MODE_TYPES = {"int8": "Q8_0", "int4": "Q4_1"}  # what each mode quantizes to where the kernels are
GEMV_MAX_ROWS = 16  # more rows than this: widen the layer once and use torch's GEMM (measured: 12-32 rows
# cost the same either way on a 2-core EPYC, fewer favour the GEMV, a prefill's hundreds the GEMM)


def kernels_for(device: torch.device) -> bool:
    """Whether layers on `device` keep ggml blocks: a CPU where chatforge's kernels are built."""
    return device.type == "cpu" and kernels.available()


class GGMLLinear(nn.Module):
    """A Linear whose weight stays in one of ggml's block formats (Q4_0, Q4_1, Q8_0; see
    chatforge.kernels.ggml), as a GGUF file stores it or as chatforge's int8 / int4 quantize to it.

    A few rows (decoding, a small batch) are multiplied by chatforge's kernel straight from the blocks:
    4.5 to 8.5 bits per weight stream from memory instead of 32. With int8 activations (the default, see
    kernels.int8_activations) Q4_0 / Q4_1 weights are repacked at load time in groups of 8 rows
    (`packed`, see ggml.unpack8), whose integer kernel also beats widening the layer for torch's fp32
    GEMM at a prefill's hundreds of rows (2.7x measured). Otherwise more rows widen the layer to the
    activations' dtype once and use torch's GEMM. Without the kernels (another device, no compiler)
    every call widens the layer with the torch reference; so does a call whose input autograd tracks
    (the widened path is differentiable in x; the weight is a buffer).
    """

    def __init__(self, blocks: torch.Tensor, kind: str, in_features: int, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if kind not in KERNEL_TYPES or blocks.dtype != torch.uint8 or blocks.shape[1] != ggml.row_bytes(kind, in_features):
            raise ValueError(f"not {kind} blocks of {in_features} inputs: {tuple(blocks.shape)} {blocks.dtype}")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        k = kernels.get() if blocks.device.type == "cpu" else None
        self.packed = (kind in ggml.PACKED_TYPES and k is not None and k.isa != "generic"
                       and kernels.int8_activations())
        self.register_buffer("weight", k.repack8(blocks, kind, in_features) if self.packed else blocks.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        # empty but floating: model.to(dtype) converts it with the rest, so it holds the activations' dtype
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, kind: str, bias: Optional[torch.Tensor] = None) -> "GGMLLinear":
        return cls(ggml.quantize(weight, kind), kind, weight.shape[1], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = kernels.get() if x.device.type == "cpu" else None
        bias = self.bias
        if k is not None and not x.requires_grad:
            int8, few = kernels.int8_activations(), x.numel() <= GEMV_MAX_ROWS * self.in_features
            packed = self.packed and k.isa != "generic"
            if (packed and (int8 or few)) or (not self.packed and few):
                if bias is not None and bias.dtype != torch.float32:
                    bias = bias.float()
                run = k.linear8 if packed else k.linear
                y = run(x.float(), self.weight, self.kind, self.out_features, self.in_features, bias, int8)
                return y if x.dtype == torch.float32 else y.to(x.dtype)
        scratch = _scratch(self.out_features * self.in_features)
        if k is not None and self.packed and k.isa != "generic":
            w = k.dequantize8(self.weight, self.kind, self.out_features, self.in_features, out=scratch)
        elif k is not None and not self.packed:
            w = k.dequantize(self.weight, self.kind, self.in_features, out=scratch)
        else:
            w = self.dequantized()
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def kernel_desc(self) -> Optional[tuple[list[int], int]]:
        """How chatforge's whole-block kernel (model.Block) reads this layer: (cf_block_step's 7 ints, the most
        rows it may multiply at once), or None off the CPU."""
        w, b = self.weight, self.bias
        if w.device.type != "cpu":
            return None
        return [ggml.TYPE_IDS[self.kind], w.data_ptr(), self.out_features, self.in_features,
                0 if b is None else b.data_ptr(), int(self.packed), w.stride(0)], (64 if self.packed else GEMV_MAX_ROWS)

    def blocks(self) -> torch.Tensor:
        """The weight's blocks row after row, as a GGUF file stores them (a repacked weight unpacked)."""
        return ggml.unpack8(self.weight, self.kind, self.out_features, self.in_features) if self.packed else self.weight

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` of the weight, dequantized to the activations' dtype (a tied embedding's lookup)."""
        k = kernels.get() if self.weight.device.type == "cpu" else None
        if k is not None and self.packed and k.isa != "generic":
            out = k.dequantize8(self.weight, self.kind, self.out_features, self.in_features, idx=idx)
        elif k is not None and not self.packed:
            out = k.dequantize(self.weight, self.kind, self.in_features, rows=idx)
        else:
            out = ggml.dequantize(self.blocks()[idx.reshape(-1)], self.kind, self.in_features)
        return out.view(*idx.shape, self.in_features).to(self.dtype_probe.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, (out, in) in fp32 (the torch reference: tests, other devices)."""
        return ggml.dequantize(self.blocks(), self.kind, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind}{', packed in 8-row groups' if self.packed else ''}")


_SCRATCH = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A reusable fp32 buffer of at least `numel` values (per thread) for a layer widened for a prefill: a fresh
    one per layer would be fresh pages from the OS each time, and touching them cost more than the widening."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH.buf = torch.empty(numel)
    return buf[:numel]


def quantize_blocks(chunks: Iterable[torch.Tensor], shape: tuple[int, int], kind: str) -> torch.Tensor:
    """ggml.quantize of a matrix handed over in row chunks, written into one buffer as they come."""
    out = torch.empty(shape[0], ggml.row_bytes(kind, shape[1]), dtype=torch.uint8)
    start = 0
    for chunk in chunks:
        out[start:start + chunk.shape[0]] = ggml.quantize(chunk, kind)
        start += chunk.shape[0]
    if start != shape[0]:
        raise ValueError(f"expected {shape[0]} rows, got {start}")
    return out


def quantized_linear(linear: nn.Linear, mode: str, dtype: torch.dtype) -> nn.Module:
    """The quantized replacement for one Linear: ggml blocks (Q8_0 for int8, Q4_1 for int4) where the
    kernels are and its width is whole blocks; else torch's layouts: int4 where its width allows, else int8."""
    if kernels_for(linear.weight.device) and linear.in_features % ggml.QK == 0:
        return GGMLLinear.quantize(linear.weight, MODE_TYPES[mode], linear.bias)
    if mode == "int4" and int4_ok(linear.in_features):
        return Int4Linear.from_linear(linear, dtype)
    return Int8Linear.from_linear(linear, dtype)


def default_dtype(device: torch.device, current: torch.dtype = torch.float32) -> torch.dtype:
    """Activation dtype of a quantized model: fp32 where chatforge's kernels are (they widen the weights to
    fp32 and take fp32 rows: bf16 activations would only add conversions), else bf16 where multiplies in
    it are native, else `current`."""
    if current == torch.float32 and kernels_for(device):
        return current
    return torch.bfloat16 if current != torch.float16 and bf16_supported(device) else current


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every Linear and the token embedding of a chatforge Transformer by quantized versions
    (mode "int8" or "int4"), in place.

    dtype: the activations' dtype afterwards (default: bf16 where the hardware has it, else the
    model's). The result is for inference only: int8 buffers take no gradient.
    """
    if check_mode(mode) is None or getattr(model, "quantized", None):
        return model
    param = next(model.parameters())
    dtype = dtype or default_dtype(param.device, param.dtype)
    tied = model.lm_head.weight is model.wte.weight
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        _replace(model, name, quantized_linear(linear, mode, dtype))
    if tied:
        model.wte = Int8Embedding(head=model.lm_head)
    else:
        q, scale = quantize_int8(model.wte.weight)
        model.wte = Int8Embedding(q.to(param.device), scale.to(param.device, dtype))
    model.to(dtype)  # what stays floating point (norms, biases, positions, scales) in the compute dtype
    model.quantized = mode
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --- quantizing while the weights are read --------------------------------------------------------

class RowSource(Protocol):
    """Where quantize_from reads the weights of a model, by state-dict name (chatforge.formats'
    SafetensorsFile is one): shapes first, matrices a slab of rows at a time."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def rows(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, slab) pairs covering tensor `name` along dim 0; a slab may be reused (and is
        overwritten here) once the next one is asked for."""
        ...

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole tensor `name`, floating ones converted to `dtype`."""
        ...


@torch.no_grad()
def quantize_from(model: nn.Module, source: RowSource, mode: Optional[str] = "int8",
                  dtype: Optional[torch.dtype] = None, *, group: int = INT4_GROUP,
                  modes: Optional[Mapping[str, str]] = None) -> nn.Module:
    """Fill `model`, a chatforge Transformer built on the meta device (no memory), from `source`
    with quantized layers (mode "int8" or "int4"); returns it on the CPU.

    Each matrix is quantized slab by slab as `source` hands its rows over, so the peak memory is
    about the quantized model, never the full-precision one. The weights' names and shapes must
    already have been checked against the model. dtype: the activations' dtype (default_dtype).
    group: inputs per int4 group (torch's layout). modes: the mode of a weight (by name) where it is
    not `mode`.

    Where chatforge's kernels are, layers keep ggml blocks (GGMLLinear): a source that has
    `ggml_blocks(name)` (a GGUF file) hands Q4_0 / Q4_1 / Q8_0 weights over as stored and they are
    kept in any mode; a Q4_K one becomes Q4_1 in int4 mode (its 4-bit values kept, each group's scale
    and offset rounded to fp16); the rest are quantized to Q8_0 (int8) or Q4_1 (int4). mode None, only
    there, keeps the stored blocks and reads every other weight in full precision (dtype, default fp32).
    Elsewhere: torch's layouts (Int8Linear, Int4Linear; a source's `int4_blocks` kept as they are).
    """
    if mode is None and not kernels_for(torch.device("cpu")):
        raise ValueError("quantize_from needs a mode (int8 or int4) where chatforge's kernels are not built")
    if mode is not None and check_mode(mode) is None:
        raise ValueError("quantize_from needs a mode: int8 or int4")
    dtype = dtype or (torch.float32 if mode is None else default_dtype(torch.device("cpu")))
    tied = model.lm_head.weight is model.wte.weight
    for full, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        weight = "wte.weight" if tied and full == "lm_head" else f"{full}.weight"
        bias = source.read(f"{full}.bias") if linear.bias is not None else None
        layer = _layer_from(source, weight, (modes or {}).get(weight, mode), linear.in_features, bias, dtype, group)
        if layer is not None:  # None: a full-precision Linear, read with the rest below
            _replace(model, full, layer)
    head_replaced = not isinstance(model.lm_head, nn.Linear)
    if tied and head_replaced:
        model.wte = Int8Embedding(head=model.lm_head)
    elif mode is not None:
        q, scale = quantize_rows((slab for _, slab in source.rows("wte.weight")), source.shape("wte.weight"))
        model.wte = Int8Embedding(q, scale.to(dtype))
    rest = {name: source.read(name, dtype) for name, _ in model.named_parameters()}
    model.load_state_dict(rest, strict=False, assign=True)
    if tied and not head_replaced:  # assign=True gave the embedding a new tensor: tie the head to it again
        model.lm_head.weight = model.wte.weight
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, GGMLLinear)})
    model.quantized = mode or "+".join(kinds) or None
    return model.eval()


def _layer_from(source: RowSource, name: str, mode: Optional[str], in_features: int, bias: Optional[torch.Tensor],
                dtype: torch.dtype, group: int) -> Optional[nn.Module]:
    """The layer for weight `name` of `source` in `mode` (see quantize_from); None: leave it full precision."""
    shape = source.shape(name)

    def slabs() -> Iterator[torch.Tensor]:
        return (slab for _, slab in source.rows(name))

    if kernels_for(torch.device("cpu")):
        stored = getattr(source, "ggml_blocks", None)
        blocks = stored(name) if stored is not None else None
        if blocks is not None:
            return GGMLLinear(blocks[1], blocks[0], in_features, bias)
        if mode is None:
            return None
        if in_features % ggml.QK == 0:
            affine = getattr(source, "int4_blocks", None) if mode == "int4" else None
            values = affine(name) if affine is not None else None
            if values is not None:
                return GGMLLinear(ggml.q4_1_from_affine(*values), "Q4_1", in_features, bias)
            kind = MODE_TYPES[mode]
            return GGMLLinear(quantize_blocks(slabs(), shape, kind), kind, in_features, bias)
        return Int8Linear(*quantize_rows(slabs(), shape), bias, dtype)
    stored = getattr(source, "int4_blocks", None)
    blocks = stored(name) if mode == "int4" and stored is not None else None
    if blocks is not None:
        return Int4Linear.from_blocks(*blocks, bias, dtype)
    if mode == "int4" and int4_ok(in_features, group):
        return Int4Linear(*quantize_rows_int4(slabs(), shape, group), bias, dtype, out_features=shape[0])
    return Int8Linear(*quantize_rows(slabs(), shape), bias, dtype)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
