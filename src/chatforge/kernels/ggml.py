"""ggml's block formats in plain torch: what the C kernels read, written and read back without them.

    blocks = quantize(w, "Q4_1")          # (rows, cols) float -> (rows, cols / 32 * 20) uint8
    w2 = dequantize(blocks, "Q4_1", cols) # back to fp32: the reference every kernel is tested against

Each block holds 32 consecutive weights of one row with an fp16 scale d (little-endian, as in a GGUF
file): Q8_0 is d, then 32 int8 q (w = d q); Q4_0 is d, then 16 bytes whose low nibbles are weights
0..15 and high nibbles 16..31 (w = d (q - 8)); Q4_1 is d and an fp16 minimum m, then the same nibbles
(w = d q + m). A row is its blocks one after another, so a matrix is (rows, row bytes) of uint8.
"""
from __future__ import annotations

import torch

QK = 32  # weights per block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
TYPE_IDS = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}  # ggml's numbering, which the C code uses
BITS = {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5, "BF16": 16.0, "F32": 32.0}  # stored bits per weight


def row_bytes(kind: str, cols: int) -> int:
    """Bytes of one row of `cols` weights of type `kind`."""
    if kind in BLOCK_BYTES:
        if cols % QK:
            raise ValueError(f"{kind} rows hold whole blocks of {QK} weights; {cols} is not a multiple")
        return cols // QK * BLOCK_BYTES[kind]
    return cols * (4 if kind == "F32" else 2)


def dequantize(blocks: torch.Tensor, kind: str, cols: int) -> torch.Tensor:
    """fp32 (rows, cols) of uint8 rows of blocks (rows, row bytes)."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, cols // QK, BLOCK_BYTES[kind])
    d = _f16(b[..., 0:2])
    if kind == "Q8_0":
        return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(rows, cols)
    qs = b[..., 2:18] if kind == "Q4_0" else b[..., 4:20]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
    offset = -8 * d if kind == "Q4_0" else _f16(b[..., 2:4])
    return (d * q + offset).reshape(rows, cols)


def quantize(w: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 rows of `kind` blocks (Q8_0, Q4_0 or Q4_1) for a float matrix (rows, cols), cols a multiple of 32.

    The integers are rounded against the fp16 scales as stored (not the fp32 ones before rounding), so
    dequantizing gives back the nearest values those scales can express.
    """
    rows, cols = w.shape
    g = w.detach().float().reshape(rows, cols // QK, QK)
    if kind == "Q8_0":
        d = (g.abs().amax(-1, keepdim=True) / 127).half()
        q = (g / _safe(d)).round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        parts = [d.view(torch.uint8), q]
    elif kind == "Q4_1":
        lo = g.amin(-1, keepdim=True)
        d, m = ((g.amax(-1, keepdim=True) - lo) / 15).half(), lo.half()
        q = ((g - m.float()) / _safe(d)).round_().clamp_(0, 15).to(torch.uint8)
        parts = [d.view(torch.uint8), m.view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    elif kind == "Q4_0":  # the largest magnitude maps to -8 (ggml's choice): one more step on its side
        big = g.gather(-1, g.abs().argmax(-1, keepdim=True))
        d = (big / -8).half()
        q = (g / _safe(d) + 8).round_().clamp_(0, 15).to(torch.uint8)
        parts = [d.view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)]
    else:
        raise ValueError(f"cannot quantize to {kind!r}; choose one of {', '.join(BLOCK_BYTES)}")
    return torch.cat(parts, dim=-1).reshape(rows, row_bytes(kind, cols))


PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # kinds the int8 kernels read repacked in groups of 8 rows (cf_repack8)


def unpack8(packed: torch.Tensor, kind: str, rows: int, cols: int) -> torch.Tensor:
    """The row-major blocks (rows, row bytes) of a weight repacked in groups of 8 rows: the torch reference of
    q_gemv.c's layout. Per block column of a group: the 8 rows' fp16 scales (Q4_1: then their 8 minimums),
    then chunks of 32 bytes (Q4: 4, Q8_0: 8), chunk c holding quant bytes 4c..4c+3 of row 0, then row 1, ...
    (Q8_0's stored as w + 128: unsigned, for the u8 x s8 dot instruction)."""
    groups, nb, bb = packed.shape[0], cols // QK, BLOCK_BYTES[kind]
    hdr = 4 if kind == "Q4_1" else 2  # bytes before a row's quants in a block
    g = packed.reshape(groups, nb, 8 * bb)
    heads = g[..., :8 * hdr].reshape(groups, nb, hdr // 2, 8, 2).permute(0, 3, 1, 2, 4).reshape(groups, 8, nb, hdr)
    chunks = (bb - hdr) // 4
    quants = g[..., 8 * hdr:].reshape(groups, nb, chunks, 8, 4).permute(0, 3, 1, 2, 4).reshape(groups, 8, nb, 4 * chunks)
    if kind == "Q8_0":
        quants = quants ^ 0x80
    return torch.cat([heads, quants], dim=-1).reshape(groups * 8, nb * bb)[:rows]


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    """fp32 values of little-endian fp16 pairs of bytes (..., 2) -> (..., 1)."""
    return two_bytes.contiguous().view(torch.float16).float()


def _safe(d: torch.Tensor) -> torch.Tensor:
    """A scale to divide by: an all-zero block (scale 0) gives zeros, not NaN."""
    d = d.float()
    return torch.where(d == 0, torch.ones_like(d), d)


def q4_1_from_affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Q4_1 rows of 4-bit values already grouped by 32: q uint8 (rows, cols) in 0..15, and scale, offset
    (rows, cols / 32) with w = q * scale + offset (what formats.gguf reads from Q4_0, Q4_1 and Q4_K). The
    values are kept; the scales and offsets are rounded to fp16 (exact for Q4_0 and Q4_1, whose are fp16)."""
    rows, cols = q.shape
    g = q.reshape(rows, cols // QK, QK).to(torch.uint8)
    d, m = scale.reshape(rows, -1, 1).half(), offset.reshape(rows, -1, 1).half()
    parts = [d.view(torch.uint8), m.view(torch.uint8), g[..., :16] | (g[..., 16:] << 4)]
    return torch.cat(parts, dim=-1).reshape(rows, row_bytes("Q4_1", cols))
