"""GGUF files (llama.cpp, Ollama, LM Studio) -> chatforge's ModelConfig, Tokenizer and tensors.

    f = GGUFFile("model.gguf")      # metadata and the tensor directory, read with gguf.GGUFReader
    f.config, f.tokenizer           # ModelConfig from the metadata, Tokenizer from tokenizer.ggml.*
    f.read("blocks.0.attn.qkv.weight", torch.bfloat16)   # dequantized, in chatforge's layout
    f.int4_blocks("blocks.0.mlp.fc.weight")              # (q, scale, offset) where stored as 4-bit groups
    f.ggml_blocks("blocks.0.mlp.fc.weight")              # ("Q4_1", raw blocks) where stored as Q4_0/Q4_1/Q8_0

Part of formats/ (file layouts only): chatforge.loader decides dtype, device and quantization and
calls this; nothing here quantizes a model. The container is parsed by the `gguf` package (the
reader maintained with llama.cpp); what this module adds is the meaning of llama.cpp's names:

- architectures `llama` (SmolLM2, TinyLlama, Llama 3.x, whose rope scaling llama.cpp stores as a
  `rope_freqs` tensor), `qwen2`, `qwen3` and `gemma3` (text) become a ModelConfig; any other is refused;
- tensors are addressed by chatforge's state-dict names; one of ours may be several of the file's
  stacked (attn_q, attn_k, attn_v -> attn.qkv; ffn_gate, ffn_up -> mlp.fc);
- llama.cpp's converter permutes the rows of a `llama` model's Q and K weights for its rotary
  kernel (pairs interleaved, (x0, x1), (x2, x3), ...); chatforge's rotary, like Hugging Face's,
  pairs each half with the other, so those rows are put back; `gemma3` norms are stored as 1 + w
  (llama.cpp multiplies by the weight itself), so 1 is taken off again;
- tensors are read with plain reads, a slab of rows at a time, each slab dequantized on its own
  (a memory map would keep every page it touched resident): no tensor is ever whole in fp32;
- the tokenizer is a Hugging Face `tokenizers` object built from the metadata: byte-level BPE
  (`gpt2`: tokens, merges, the pre-tokenizer `tokenizer.ggml.pre` names) or SentencePiece (`llama`:
  tokens with scores, merges recovered from them as transformers' GGUF converter does).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from chatforge.config import SIZE_LIMITS, ModelConfig
from chatforge.errors import CheckpointError, ConfigError
from chatforge.formats.checkpoint import check_state_shapes
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
MAGIC = b"GGUF"
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit values in groups of 32 with a scale and an offset each
GGML_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # handed over as stored (ggml_blocks): chatforge's kernels read them so
# the tensor types chatforge reads (each dequantized by gguf.quants); IQ*, TQ* and the like are refused
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SLAB_VALUES = 1 << 19  # about this many weights dequantized at a time (2 MB of fp32)
_IGNORED = ("rope_freqs.weight",)  # consumed by the config (Llama 3's rope scaling)
_VISION = ("v.", "mm.")  # a vision tower some files (Ollama's gemma3) carry: chatforge reads the text model


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts like a GGUF (Ollama's blobs have no .gguf suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Part:
    """One GGUF tensor (or zeros, where the file has none) stacked into one of chatforge's."""

    tensor: Optional[str]  # its name in the file; None: the file has no such tensor, it loads as zeros
    rows: int
    heads: int = 0  # undo llama.cpp's Q/K row permutation over this many heads (0: no permutation)
    shift: float = 0.0  # subtracted after dequantizing (Gemma's norms are stored as 1 + w)


@dataclass(frozen=True)
class _Info:
    type: str  # GGML type name, e.g. "Q4_1"
    shape: tuple[int, ...]  # in torch order: (rows, columns) for a matrix
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // (self.shape[0] if len(self.shape) > 1 else 1)


class GGUFFile:
    """A GGUF model file: its ModelConfig, its Tokenizer and its tensors under chatforge's names.

    Opening it reads the metadata and the tensor directory and checks that every tensor the config
    implies is there, in a type chatforge reads and with the shape it needs; no tensor data is
    read until asked for (`read`, `rows`, `int4_blocks`, `ggml_blocks`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta, infos = _read_container(self.path)
        self.architecture = str(meta.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"{self.path} holds a {self.architecture or 'nameless'!r} model, which chatforge "
                                  f"cannot load from GGUF; supported architectures: {', '.join(ARCHITECTURES)}")
        self._infos = infos
        try:
            self.config = _config(self.architecture, meta, infos, self.path)
        except ConfigError as e:
            raise CheckpointError(f"{self.path} describes an impossible model: {e}") from None
        except (TypeError, ValueError, ArithmeticError) as e:  # metadata of the wrong kind (text for a number, 0 heads)
            raise CheckpointError(f"{self.path} is corrupt: its metadata holds a value of the wrong kind "
                                  f"({type(e).__name__}: {str(e)[:160]})") from None
        self.plan = _plan(self.architecture, self.config, infos)
        self._check()
        try:
            self.tokenizer = _tokenizer(meta, self.architecture, self.path)
        except CheckpointError:
            raise
        except Exception as e:  # metadata of the wrong kind; the tokenizers library raises plain Exceptions
            raise CheckpointError(f"{self.path} is corrupt: its tokenizer metadata cannot be read "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None

    # --- what is where ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.plan)

    def shape(self, name: str) -> tuple[int, ...]:
        rows, width = sum(p.rows for p in self.plan[name]), self._width(name)
        return (rows, width) if width else (rows,)

    def types(self, name: str) -> tuple[str, ...]:
        """The GGML types of the file's tensors that make up `name` ("F32" for zeros)."""
        return tuple(self._infos[p.tensor].type if p.tensor else "F32" for p in self.plan[name])

    def _width(self, name: str) -> int:
        for p in self.plan[name]:
            if p.tensor:
                shape = self._infos[p.tensor].shape
                return shape[1] if len(shape) > 1 else 0
        return 0

    # --- reading ---------------------------------------------------------------------------------
    def rows(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, fp32 slab) pairs covering tensor `name` along dim 0 (quantize.RowSource):
        each slab is read and dequantized on its own, whole heads at a time where rows are permuted."""
        start = 0
        for part in self.plan[name]:
            for slab in self._part_slabs(part):
                yield start, slab
                start += slab.shape[0]

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole tensor `name`, dequantized into `dtype` (default fp32) slab by slab."""
        out = torch.empty(self.shape(name), dtype=dtype or torch.float32)
        for start, slab in self.rows(name):
            out[start:start + slab.shape[0]] = slab
        return out

    def int4_blocks(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`name`'s values as stored, where every part of it is a 4-bit type with groups of 32 inputs
        (Q4_0, Q4_1, Q4_K): (q uint8 (rows, cols) in 0..15, scale, offset (rows, cols / 32) fp32),
        the weight being q * scale + offset group by group. None for any other type."""
        parts = self.plan[name]
        if any(p.tensor is None or self._infos[p.tensor].type not in INT4_TYPES or p.shift for p in parts):
            return None
        rows, cols = self.shape(name)
        q = np.empty((rows, cols), dtype=np.uint8)  # filled part by part: no concatenated copies
        scale, offset = (np.empty((rows, cols // 32), dtype=np.float32) for _ in range(2))
        start = 0
        for part in parts:
            info = self._infos[part.tensor]
            values = _int4_affine(self._read_rows(part.tensor, 0, part.rows), info.type, cols)
            for out, value in zip((q, scale, offset), values):
                out[start:start + part.rows] = _unpermute(value, part.heads) if part.heads else value
            start += part.rows
        return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(offset)

    def ggml_blocks_type(self, name: str) -> Optional[str]:
        """The type ggml_blocks(name) would hand over, without reading anything; None where it would not."""
        parts = self.plan[name]
        kinds = {self._infos[p.tensor].type if p.tensor else None for p in parts}
        if len(kinds) != 1 or not kinds <= set(GGML_TYPES) or any(p.shift for p in parts) or not self._width(name):
            return None
        return kinds.pop()

    def ggml_blocks(self, name: str) -> Optional[tuple[str, torch.Tensor]]:
        """`name`'s bytes as stored, where it is a matrix whose parts are all one of GGML_TYPES:
        (type, uint8 (rows, row bytes)), rows in chatforge's order (Q/K permutation undone, which moves
        whole rows). None for any other type, or parts of different types."""
        kind = self.ggml_blocks_type(name)
        if kind is None:
            return None
        parts = self.plan[name]
        out = np.empty((self.shape(name)[0], self._infos[parts[0].tensor].row_bytes), dtype=np.uint8)
        start = 0
        for part in parts:
            raw = self._read_rows(part.tensor, 0, part.rows)
            out[start:start + part.rows] = _unpermute(raw, part.heads) if part.heads else raw
            start += part.rows
        return kind, torch.from_numpy(out)

    def _part_slabs(self, part: Part) -> Iterator[torch.Tensor]:
        if part.tensor is None:  # a bias the file does not have: zeros (as transformers does)
            yield torch.zeros(part.rows)
            return
        info = self._infos[part.tensor]
        if len(info.shape) == 1:
            values = _dequantize(self._read_rows(part.tensor, 0, 1), info.type).reshape(-1)
            if part.heads:
                values = _unpermute(values, part.heads)
            yield torch.from_numpy(values - np.float32(part.shift) if part.shift else values)
            return
        rows, cols = info.shape
        step = max(1, SLAB_VALUES // cols)
        if part.heads:  # slabs of whole heads: the permutation stays inside a head
            per_head = rows // part.heads
            step = max(1, step // per_head) * per_head
        for start in range(0, rows, step):
            n = min(step, rows - start)
            values = _dequantize(self._read_rows(part.tensor, start, n), info.type).reshape(n, cols)
            if part.heads:
                values = _unpermute(values, n // (rows // part.heads))
            yield torch.from_numpy(values - np.float32(part.shift) if part.shift else values)

    def _read_rows(self, tensor: str, start: int, n: int) -> np.ndarray:
        """Rows start..start+n of a tensor as raw bytes, (n, row bytes) uint8, with one plain read."""
        info = self._infos[tensor]
        row = info.row_bytes
        buf = np.empty((n, row), dtype=np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(info.offset + start * row)
                got = f.readinto(memoryview(buf).cast("B"))
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        if got != buf.nbytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {tensor} ends past the end of the file")
        return buf

    # --- checks ------------------------------------------------------------------------------------
    def _check(self) -> None:
        used: set[str] = set()
        for name, parts in self.plan.items():
            width = None
            for part in parts:
                if part.tensor is None:
                    continue
                info = self._infos.get(part.tensor)
                if info is None:
                    raise CheckpointError(f"{self.path} lacks tensor {part.tensor}, which its metadata implies; "
                                          "the file is incomplete or not a model chatforge knows")
                used.add(part.tensor)
                if info.shape[0] != part.rows or (width is not None and len(info.shape) > 1 and info.shape[1] != width):
                    raise CheckpointError(f"{self.path}: tensor {part.tensor} has shape {list(info.shape)}, which does "
                                          "not fit the sizes in its metadata; the file is inconsistent")
                width = info.shape[1] if len(info.shape) > 1 else None
        extra = sorted(n for n in set(self._infos) - used - set(_IGNORED) if not n.startswith(_VISION))
        if extra:
            raise CheckpointError(f"{self.path} has tensors a {self.architecture} model does not account for "
                                  f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}); chatforge cannot "
                                  "load this variant")
        check_state_shapes(self.config, {n: self.shape(n) for n in self.plan}, str(self.path))


# --- the container ------------------------------------------------------------------------------

def _read_container(path: Path) -> tuple[dict[str, Any], dict[str, _Info]]:
    """(metadata, tensor directory) of a GGUF file, parsed by gguf.GGUFReader, as plain Python:
    the reader's own objects (one array per string of the vocabulary) are dropped straight away."""
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes")
    try:
        reader = _reader_class()(path)
    except ValueError as e:  # the reader's own checks: version, types it does not know, sizes past the end
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in why:
            why = (f"a tensor has a type the installed gguf package does not know ({why}); the file is corrupt "
                   "or newer than the package")
        elif "version" in why:
            why = f"a GGUF version the installed gguf package does not read ({why})"
        else:
            why = f"it is truncated or corrupt (the gguf reader: {why})"
        raise CheckpointError(f"{path} is not a GGUF file chatforge can read: {why}") from None
    except (IndexError, KeyError, TypeError, OSError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: its GGUF header cannot be read "
                              f"({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: metadata {key} cannot be read ({e}); the file is corrupt") from None
    size = path.stat().st_size
    infos: dict[str, _Info] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if kind not in TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} is stored as {kind}, a type chatforge does not read "
                                  f"(it reads {', '.join(TYPES)})")
        if t.data_offset + int(t.n_bytes) > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
        if len(shape) > 2 and any(d != 1 for d in shape[:-2]):
            raise CheckpointError(f"{path}: tensor {t.name} has {len(shape)} dimensions {list(shape)}; chatforge "
                                  "reads matrices and vectors")
        infos[t.name] = _Info(kind, shape[-2:], int(t.data_offset), int(t.n_bytes))
    del reader
    return meta, infos


@functools.lru_cache(maxsize=1)
def _reader_class() -> type:
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf.GGUFReader over a plain ndarray view of its memory map: the reader slices the map once per
        value (a 49k-token vocabulary is ~250k slices), and every slice of a np.memmap is a memmap that
        carries its own bookkeeping. Plain views parse ~4x faster in half the memory (for SmolLM2's file
        0.7 s and 72 MB instead of 2.9 s and 163 MB); the parsing itself is the reader's own."""

        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray)  # the view keeps the map alive (its .base)

    return Reader


def _dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """fp32 values of raw rows (n, row bytes) of GGML type `kind`, (n, columns)."""
    import gguf

    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
    return out if out.dtype == np.float32 else out.astype(np.float32)


def _int4_affine(raw: np.ndarray, kind: str, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack 4-bit blocks without a float round trip of the values: (q (n, cols) uint8, scale, offset
    (n, cols / 32) fp32) with w = q * scale + offset in each group of 32 inputs.

    Q4_0: w = d (q - 8): scale d, offset -8d. Q4_1: w = d q + m. Q4_K: super-blocks of 256 holding 8
    groups of 32, each w = (d sc_j) q - dmin m_j with 6-bit sc_j, m_j.
    """
    import gguf

    n = raw.shape[0]
    f16 = np.float16

    def nibbles(qs: np.ndarray) -> np.ndarray:  # 16 bytes -> 32 values: low nibbles first, then high
        return np.concatenate([qs & 15, qs >> 4], axis=-1)

    if kind == "Q4_0":
        b = raw.reshape(-1, 18)
        d = b[:, :2].copy().view(f16).astype(np.float32)
        q, scale, offset = nibbles(b[:, 2:]), d, -8 * d
    elif kind == "Q4_1":
        b = raw.reshape(-1, 20)
        d, m = (b[:, i:i + 2].copy().view(f16).astype(np.float32) for i in (0, 2))
        q, scale, offset = nibbles(b[:, 4:]), d, m
    elif kind == "Q4_K":
        b = raw.reshape(-1, 144)
        d, dmin = (b[:, i:i + 2].copy().view(f16).astype(np.float32) for i in (0, 2))
        sc, mins = gguf.quants.Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)
        scale, offset = d * sc.astype(np.float32), -dmin * mins.astype(np.float32)
    else:
        raise ValueError(f"{kind} is not a 4-bit block type")
    return q.reshape(n, cols), scale.reshape(n, cols // 32), offset.reshape(n, cols // 32)


def _unpermute(a: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of Q/K rows (convert_hf_to_gguf's `permute`): within each head its
    rows are stored pair-interleaved (row 2i, 2i+1 = the pair (i, i + d/2) of the half-split layout)."""
    rows = a.shape[0]
    return a.reshape(heads, rows // heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# --- the config ---------------------------------------------------------------------------------

def _config(arch: str, meta: dict[str, Any], infos: dict[str, _Info], path: Path) -> ModelConfig:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            if required:
                raise CheckpointError(f"{path} has no {arch}.{key} in its metadata, which a {arch} model needs")
            return default
        if isinstance(value, list):  # per-layer values: chatforge's layers are all alike
            if len(set(value)) != 1:
                raise CheckpointError(f"{path}: {arch}.{key} differs between layers ({value[:4]}...); chatforge's "
                                      "layers all have the same shape")
            value = value[0]
        return value

    if "token_embd.weight" not in infos:
        raise CheckpointError(f"{path} lacks tensor token_embd.weight; the file is incomplete")
    n_layer, n_embd = int(get("block_count", required=True)), int(get("embedding_length", required=True))
    if not 0 < n_layer <= SIZE_LIMITS["n_layer"]:  # before anything loops over the layers
        raise ConfigError(f"block_count is {n_layer}; a model has 1 to {SIZE_LIMITS['n_layer']} layers")
    n_head = int(get("attention.head_count", required=True))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", (256 if arch == "gemma3" else n_embd // n_head)))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: keys and values of different widths, which chatforge's attention does not do")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: rotary encoding over part of each head (rope.dimension_count "
                              f"{get('rope.dimension_count')} of {head_dim}), which chatforge does not implement")
    theta = _f32(get("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10_000.0))
    block = int(get("context_length", 2048))
    scaling = _rope_scaling(arch, get, meta, infos, path, theta, head_dim, block)
    has = infos.__contains__
    options: dict[str, Any] = dict(
        vocab_size=infos["token_embd.weight"].shape[0], block_size=block, n_layer=n_layer, n_head=n_head,
        n_embd=n_embd, n_kv_head=n_kv, head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", required=True)),
        pos_encoding="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu", norm="rmsnorm",
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)), tie_embeddings=not has("output.weight"),
        qkv_bias=has("blk.0.attn_q.bias"),
        # one `bias` switch covers o_proj and the MLP: whichever the file lacks loads as zeros
        bias=has("blk.0.attn_output.bias") or has("blk.0.ffn_down.bias"))
    if arch == "qwen3":
        options["qk_norm"] = True
    if arch == "gemma3":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if get(key) is not None:
                raise CheckpointError(f"{path}: this gemma3 model uses logit soft-capping ({key}), which chatforge's "
                                      "Transformer does not implement")
        window = get("attention.sliding_window")
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one flag per layer: true for a sliding-window layer
            local = [i for i, swa in enumerate(pattern) if swa]
        else:  # every pattern-th layer global (llama.cpp's and transformers' default: 6)
            local = [i for i in range(n_layer) if int(pattern) <= 0 or i % int(pattern) < int(pattern) - 1]
        # llama.cpp's rule, as Gemma 3 itself: query_pre_attn_scalar is head_dim, hidden / heads for the 27B
        scalar = n_embd / n_head if n_layer == 62 else head_dim
        options.update(mlp="geglu_tanh", qk_norm=True, norm_plus_one=True, sandwich_norm=True,
                       embd_scale=n_embd ** 0.5, attn_scale=scalar ** -0.5,
                       rope_local_theta=_f32(get("rope.freq_base_swa", 10_000.0)),
                       sliding_window=int(window) if window and local else None,
                       local_layers=local if window and local else None)
    return ModelConfig(**options)


def _f32(value: Any) -> float:
    """A float32 from the metadata as the number it was written as (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(arch: str, get, meta: dict[str, Any], infos: dict[str, _Info], path: Path, theta: float,
                  dim: int, context: int) -> Optional[dict[str, Any]]:
    """chatforge's rope_scaling: linear from `{arch}.rope.scaling.*`; Llama 3's from the rope_freqs tensor
    llama.cpp stores instead of its parameters (the factor that divides each pair's frequency)."""
    kind = str(get("rope.scaling.type", "none"))
    if kind not in ("none", "linear"):
        raise CheckpointError(f"{path}: rope scaling {kind!r}, which chatforge's rotary encoding does not "
                              "implement (it does linear and Llama 3's)")
    factor = _f32(get("rope.scaling.factor", 1.0) or 1.0)
    if "rope_freqs.weight" not in infos:
        return {"rope_type": "linear", "factor": factor} if kind == "linear" and factor != 1.0 else None
    if kind == "linear" and factor != 1.0:
        raise CheckpointError(f"{path}: both linear rope scaling and a rope_freqs tensor; chatforge does one or "
                              "the other")
    info = infos["rope_freqs.weight"]
    if info.type != "F32" or info.shape != (dim // 2,):
        raise CheckpointError(f"{path}: rope_freqs.weight should be {dim // 2} F32 values, not {info.type} "
                              f"{list(info.shape)}")
    with open(path, "rb") as f:
        f.seek(info.offset)
        factors = np.frombuffer(f.read(info.nbytes), dtype=np.float32).astype(np.float64)
    return llama3_scaling(factors, theta, dim, path)


def llama3_scaling(factors: np.ndarray, theta: float, dim: int, where: Any = "the file",
                   original: int = 8192) -> Optional[dict[str, Any]]:
    """Llama 3's rope_scaling parameters from the per-pair factors they produce (what llama.cpp stores).

    Pairs whose wavelength is below original / high_freq_factor keep factor 1, those above
    original / low_freq_factor get `factor`, and between the two 1 / factor_i is linear in
    original / wavelength. Only the two wavelengths matter, so `original` is chosen (8192, Llama 3's)
    and the two factors solved for; the parameters are checked by recomputing every factor.
    """
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelength = 2 * math.pi / inv
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    if np.allclose(factors, factor, rtol=1e-6, atol=0):
        return {"rope_type": "linear", "factor": factor}
    high = np.isclose(factors, 1.0, rtol=0, atol=1e-6)
    low = np.isclose(factors, factor, rtol=1e-6, atol=0)
    mid = ~(high | low)
    x = original / wavelength
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 0 at the slow edge, 1 at the fast edge
    if mid.sum() >= 2:  # smooth = (x - lo) / (hi - lo): a line through the blended pairs
        slope, icept = np.polyfit(x[mid], smooth[mid], 1)
        lo = -icept / slope
        hi = lo + 1 / slope
    else:  # one blended pair or none: edges between the groups, through the blended pair if any
        x_high = x[high].min() if high.any() else x.max() * 2
        x_low = x[low].max() if low.any() else x.min() / 2
        if mid.any():
            x0, s0 = float(x[mid][0]), float(smooth[mid][0])
            hi = (x0 + x_high) / 2
            lo = (x0 - s0 * hi) / (1 - s0)
        else:
            lo, hi = x_low + (x_high - x_low) / 3, x_low + 2 * (x_high - x_low) / 3
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(lo),
               "high_freq_factor": float(hi), "original_max_position_embeddings": original}
    if not (0 < lo < hi) or not np.allclose(_llama3_factors(scaling, wavelength), factors, rtol=1e-4, atol=1e-6):
        raise CheckpointError(f"{where}: its rope_freqs.weight is not Llama 3's rope scaling, which is the one "
                              "chatforge reads from a rope_freqs tensor")
    return scaling


def _llama3_factors(s: dict[str, Any], wavelength: np.ndarray) -> np.ndarray:
    """What divides each pair's frequency under Llama 3's scaling (the inverse of llama3_scaling)."""
    original, factor = s["original_max_position_embeddings"], s["factor"]
    smooth = (original / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelength > original / s["low_freq_factor"], factor, blended)
    return np.where(wavelength < original / s["high_freq_factor"], 1.0, out)


# --- where each of our tensors is ------------------------------------------------------------------

def _plan(arch: str, config: ModelConfig, infos: dict[str, _Info]) -> dict[str, tuple[Part, ...]]:
    """chatforge state-dict name -> the file's tensors (llama.cpp's names) stacked into it."""
    d, hd, ffn = config.n_embd, config.dim_head, config.ffn_dim
    q, kv = config.n_head * hd, config.kv_heads * hd
    permuted = arch == "llama"  # llama.cpp's converter permutes Q/K only where its rotary is the interleaved one
    qh, kh = (config.n_head, config.kv_heads) if permuted else (0, 0)
    shift = 1.0 if config.norm_plus_one else 0.0
    plan: dict[str, tuple[Part, ...]] = {"wte.weight": (Part("token_embd.weight", config.vocab_size),),
                                         "norm_f.weight": (Part("output_norm.weight", d, shift=shift),)}
    has = infos.__contains__
    for i in range(config.n_layer):
        ours, blk = f"blocks.{i}.", f"blk.{i}."

        def norm(name: str, rows: int = d) -> tuple[Part, ...]:
            return (Part(blk + name, rows, shift=shift),)

        plan[ours + "norm1.weight"] = norm("attn_norm.weight")
        plan[ours + "norm2.weight"] = norm("ffn_norm.weight")
        if config.sandwich_norm:
            plan[ours + "post_attn_norm.weight"] = norm("post_attention_norm.weight")
            plan[ours + "post_mlp_norm.weight"] = norm("post_ffw_norm.weight")
        if config.qk_norm:
            plan[ours + "attn.q_norm.weight"] = norm("attn_q_norm.weight", hd)
            plan[ours + "attn.k_norm.weight"] = norm("attn_k_norm.weight", hd)
        plan[ours + "attn.qkv.weight"] = (Part(blk + "attn_q.weight", q, qh), Part(blk + "attn_k.weight", kv, kh),
                                          Part(blk + "attn_v.weight", kv))
        if config.qkv_bias:
            plan[ours + "attn.qkv.bias"] = (Part(blk + "attn_q.bias", q, qh), Part(blk + "attn_k.bias", kv, kh),
                                            Part(blk + "attn_v.bias", kv))
        plan[ours + "attn.proj.weight"] = (Part(blk + "attn_output.weight", d),)
        plan[ours + "mlp.fc.weight"] = (Part(blk + "ffn_gate.weight", ffn), Part(blk + "ffn_up.weight", ffn))
        plan[ours + "mlp.proj.weight"] = (Part(blk + "ffn_down.weight", d),)
        if config.bias:
            def maybe(name: str, rows: int) -> Part:
                return Part(blk + name if has(blk + name) else None, rows)

            plan[ours + "attn.proj.bias"] = (maybe("attn_output.bias", d),)
            plan[ours + "mlp.fc.bias"] = (maybe("ffn_gate.bias", ffn), maybe("ffn_up.bias", ffn))
            plan[ours + "mlp.proj.bias"] = (maybe("ffn_down.bias", d),)
    if not config.tie_embeddings:
        plan["lm_head.weight"] = (Part("output.weight", config.vocab_size),)
    return plan


# --- the tokenizer ------------------------------------------------------------------------------

# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) by the regular expression that splits text before BPE
_GPT2 = "gpt2"  # GPT-2's own (tokenizers' ByteLevel with use_regex)
_DIGITS_GPT2 = "digits+gpt2"  # every digit alone, then GPT-2's (StarCoder, SmolLM)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2, "codeshell": _DIGITS_GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "dbrx": _LLAMA3, "smaug-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "stablelm2": _QWEN2, "megrez": _QWEN2,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _tokenizer(meta: dict[str, Any], arch: str, path: Path) -> Tokenizer:
    """The Tokenizer the metadata describes: its vocabulary and merges, its special tokens (control
    tokens kept whole), bos/eos/pad/unk and end-of-turn ids, add_bos_token, and the chat template."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        hf, tokens = _byte_level_bpe(meta, tokens, path)
    elif kind == "llama":
        hf, tokens = _sentencepiece(meta, tokens, types, arch, path)
    else:
        raise CheckpointError(f"{path} has a {kind!r} tokenizer (tokenizer.ggml.model); chatforge reads 'gpt2' "
                              "(byte-level BPE) and 'llama' (SentencePiece)")
    byte_level = kind == "gpt2"
    alphabet = set(_bytes_to_unicode().values())
    # control tokens (<|im_start|>, <s>) are special, kept whole; user-defined ones (<think>) whole too
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == _CONTROL and (not byte_level or set(t) <= alphabet)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)

    def token(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if isinstance(i, int) and 0 <= i < len(tokens) else None

    roles = {role: token(key) for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                                                 ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    eot = token("eot_token_id")
    if eot is not None and eot != roles["eos"]:
        roles["im_end"] = eot  # the end of a turn (Llama 3's <|eot_id|>, Gemma's <end_of_turn>): a stop token
    roles = {role: t for role, t in roles.items() if t is not None}
    for role, t in SPECIAL_TOKENS.items():  # ChatML's tokens, where the vocabulary has them (SmolLM2, Qwen)
        if role not in roles and hf.token_to_id(t) is not None:
            roles[role] = t
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's defaults
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    ends = [(t, hf.token_to_id(t)) for t, on in ((roles.get("bos"), add_bos), (roles.get("eos"), add_eos)) if on and t]
    if ends:  # bos (and eos) around a text encoded with its special tokens, as llama.cpp and transformers do
        first = f"{roles['bos']}:0 " if add_bos and "bos" in roles else ""
        last = f" {roles['eos']}:0" if add_eos and "eos" in roles else ""
        hf.post_processor = processors.TemplateProcessing(single=f"{first}$A:0{last}",
                                                          pair=f"{first}$A:0{last} $B:1{last.replace(':0', ':1')}",
                                                          special_tokens=ends)
    template = meta.get("tokenizer.chat_template")
    return Tokenizer(hf, roles, template if isinstance(template, str) else None, kind="bpe")


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: Path):
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: its tokenizer splits text the {pre!r} way (tokenizer.ggml.pre), which "
                              f"chatforge does not know; it knows {', '.join(sorted(PRE_TOKENIZERS))}")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # every real token is spelled in the byte alphabet; one that is not (a mislabelled special) is respelled
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    try:
        hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
    except Exception as e:  # tokenizers raises plain Exceptions for merges naming unknown tokens
        raise CheckpointError(f"{path}: its BPE vocabulary and merges do not fit together ({e})") from None
    split = PRE_TOKENIZERS[pre]
    if split == _GPT2:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_GPT2:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf, tokens


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int], arch: str, path: Path):
    """SentencePiece as BPE with byte fallback, as transformers' GGUF converter builds it: merges from
    the scores (best first) where the file has none; Gemma splits on spaces and orders merges by position."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    gemma = arch.startswith("gemma")
    if gemma:  # a token of two or more spaces is stored as spaces; Gemma's tokenizer spells it with U+2581
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = ({t: -i for i, t in enumerate(tokens)} if gemma
                  else dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))))
        merges = _merges_from_scores(vocab, scores)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    try:
        model = models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True,
                           **({"unk_token": unk_token} if gemma and unk_token else {}))
    except Exception as e:  # tokenizers raises plain Exceptions for merges naming unknown tokens
        raise CheckpointError(f"{path}: its SentencePiece vocabulary cannot be built ({e})") from None
    hf = HFTokenizer(model)
    if gemma:
        hf.normalizer = normalizers.Replace(" ", "\u2581")
        hf.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(content=" ", left=1)])
    return hf, tokens


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens, the
    token's score ranking it (best first), ties broken by the pieces' lengths (transformers' rule)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet tokens are spelled in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


__all__ = ["GGUFFile", "is_gguf", "llama3_scaling", "ARCHITECTURES", "TYPES", "INT4_TYPES", "GGML_TYPES",
           "PRE_TOKENIZERS"]
