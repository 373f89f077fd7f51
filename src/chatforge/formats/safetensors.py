"""Reading weight files (safetensors, legacy pytorch_model.bin) one tensor, and one slice of a
tensor, at a time: chatforge checkpoints and Hugging Face directories alike. Part of formats/;
it imports nothing of chatforge but its errors. `SafetensorsFile` is also what chatforge.loader
hands chatforge.quantize to quantize a checkpoint while it is read (quantize.RowSource).

Safetensors files are read with plain reads rather than a memory map: pages of a mapped
file count as resident memory for as long as the map lives, so mapping a 5 GB file to
convert it to bf16 would show 5 GB on top of the 2.5 GB model. Reading a few megabytes at
a time and converting them into the model's own tensor keeps the peak near one copy.
Legacy pytorch_model.bin files are unpickled with weights_only=True and memory-mapped.
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from chatforge.errors import CheckpointError
from chatforge.utils import read_json

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CHUNK_BYTES = 16 << 20
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on its JSON header

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class WeightFile(Protocol):
    path: Path

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def rows(self, name: str) -> Iterator[tuple[int, torch.Tensor]]: ...

    def tensor(self, name: str) -> Optional[torch.Tensor]: ...


class SafetensorsFile:
    """The header of one .safetensors file, and its tensors read a slab of rows at a time."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._broken("the file is shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise self._broken(f"its header claims {n} bytes but the file has {size}")
            if n > MAX_HEADER_BYTES:
                raise self._broken(f"its header claims {n} bytes, more than the format allows ({MAX_HEADER_BYTES})")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise self._broken(f"its header is not valid JSON: {str(e)[:160]}") from None
        if not isinstance(header, dict):
            raise self._broken("its header is not a JSON object")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self._scratch: Optional[torch.Tensor] = None
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            try:
                dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._broken(f"tensor {name!r} has an unreadable or unknown entry {info!r:.200}") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or any(d < 0 for d in shape):
                raise self._broken(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
            if self.base + end > size:
                raise self._broken(f"tensor {name!r} ends at byte {self.base + end} but the file has {size} "
                                   "(truncated: the download or copy did not finish)")
            self.entries[name] = (dtype, shape, self.base + begin)

    def _broken(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable safetensors file: {why}; download or copy it again")

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def rows(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, slab) pairs covering the tensor along dim 0, each about CHUNK_BYTES.

        Slabs share one scratch buffer (no allocator churn between reads), so each is only
        valid until the next one is read.
        """
        dtype, shape, offset = self.entries[name]
        if not shape:
            shape = (1,)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        need = min(step, shape[0]) * row_bytes
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(max(need, CHUNK_BYTES), dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            for start in range(0, shape[0], step):
                rows = min(step, shape[0] - start)
                raw = self._scratch[:rows * row_bytes]
                if raw.numel() and f.readinto(raw.numpy()) != raw.numel():
                    raise self._broken(f"tensor {name!r} is cut short (truncated)")
                yield start, raw.view(dtype).view(rows, *shape[1:])

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        return None  # always read into the model's own memory, never kept mapped

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A fresh tensor, filled slab by slab; floating tensors converted to `dtype` as they are read,
        so the stored-precision copy never exists in full."""
        stored, shape, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype if dtype is not None and stored.is_floating_point else stored)
        rows = out.view(1) if out.dim() == 0 else out
        for start, slab in self.rows(name):
            rows[start:start + len(slab)].copy_(slab)
        return out


class BinFile:
    """A legacy pytorch_model.bin: unpickled safely (weights_only) and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} is not a readable PyTorch weights file ({first}); it may be truncated, "
                                  "or an old format: re-save it with a recent PyTorch or use safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a plain dict of tensors")
        self.state: dict[str, torch.Tensor] = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def rows(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        t = self.state[name]
        yield 0, t.reshape(1) if t.dim() == 0 else t

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        return self.state[name]


class Weights:
    """Every tensor of a Hugging Face model directory, by its *ForCausalLM (*ForMaskedLM) name.

    top_level: the prefixes of head tensors stored beside the base model (lm_head., BERT's cls.).
    """

    def __init__(self, directory: Path, prefix: str, top_level: tuple[str, ...] = ("lm_head.",)):
        self.directory = directory
        self.files = [_open(p) for p in _weight_files(directory)]
        self.where: dict[str, tuple[WeightFile, str]] = {}
        for f in self.files:
            for stored in f.names():
                # a file saved from the base model (GPT2Model, LlamaModel) has no "transformer."/"model."
                full = stored if stored.startswith((prefix, *top_level)) else prefix + stored
                self.where[_modern(full)] = (f, stored)

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        f, stored = self.where[name]
        return f.shape(stored)

    def dtype(self, name: str) -> torch.dtype:
        f, stored = self.where[name]
        return f.dtype(stored)

    def direct(self, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The stored tensor itself when it needs no conversion and is already in memory (mapped)."""
        f, stored = self.where[name]
        t = f.tensor(stored)
        return t if t is not None and t.dtype == dtype and t.is_contiguous() else None

    def read_into(self, name: str, out: torch.Tensor, transpose: bool = False) -> None:
        """Copy (and convert) tensor `name` into `out`, transposed for GPT-2's Conv1D layout."""
        f, stored = self.where[name]
        for start, slab in f.rows(stored):
            if transpose:
                out[:, start:start + slab.shape[0]].copy_(slab.T)
            else:
                out[start:start + slab.shape[0]].copy_(slab)


def _modern(name: str) -> str:
    """The LayerNorm names of TensorFlow-era files (BERT's original checkpoints: LayerNorm.gamma/.beta) as
    transformers renames them on load."""
    if name.endswith(".gamma"):
        return name[:-len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        return name[:-len(".beta")] + ".bias"
    return name


def _weight_files(directory: Path) -> list[Path]:
    if (directory / SAFETENSORS).is_file():
        return [directory / SAFETENSORS]
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (directory / index).is_file():
            return _shards(directory / index)
    if (directory / BIN).is_file():
        return [directory / BIN]
    raise CheckpointError(f"{directory} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded) or "
                          f"{BIN}; other formats (TensorFlow, Flax, GGUF) are not read")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = read_json(index, CheckpointError, obj=True)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e})") from None
    if not all(isinstance(name, str) and name and Path(name).name == name for name in files):
        raise CheckpointError(f"{index} is not a valid shard index: its weight_map names files outside the directory")
    missing = [name for name in files if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index.parent} lacks {len(missing)} of the {len(files)} shards its index names "
                              f"(e.g. {missing[0]}); finish the download")
    return [index.parent / name for name in files]


def _open(path: Path) -> WeightFile:
    return BinFile(path) if path.suffix == ".bin" else SafetensorsFile(path)
