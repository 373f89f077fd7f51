"""Small helpers shared by every module: atomic writes (files and whole directories), device and
dtype choice, and the one table of dtype names. The ground floor: it imports only chatforge.errors,
so formats/, train/ and everything else can use it without an import cycle."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import torch

from chatforge.errors import ChatforgeError, ConfigError


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` only when the block ends without an exception.

    It is written beside `path` (`.NAME.PID.*.tmp`, so the rename stays on one file system and a
    killed writer's leftover can be told by its process id), fsynced, then renamed over `path`; any
    exception (a failed check inside the block, Ctrl-C) deletes it and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `target` only once everything in it is on disk.

    The scratch directory is a sibling (so the final rename stays on one file system); every
    file in it is fsynced, then the old `target` is renamed aside to `.NAME.old`, the new one
    renamed into place and the old one removed. A kill at any moment leaves either the old or
    the new directory readable (mid-swap, at `.NAME.old`: see formats.checkpoint.resolve).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):  # files in subfolders too (sentence-transformers' 1_Pooling/)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            else:
                fsync_dir(f)
        fsync_dir(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)  # from here until the next rename, readers fall back to .old
        os.rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- dtypes: the one table of names ----------------------------------------------------------

# what users type (--dtype, dtype=) and what config.json's (torch_)dtype holds -> torch.dtype
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """The torch.dtype a name stands for; None (and "auto") for "as stored", a ChatforgeError for unknown names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ChatforgeError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The long name of a dtype ("float32", "bfloat16", "float16"), as config.json's torch_dtype spells it."""
    return str(dtype).removeprefix("torch.")


def pick_device(name: str = "auto") -> torch.device:
    """CUDA > MPS > CPU, chosen once and passed down."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix multiply is native (fast) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        flags = cpu_flags()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_precision(precision: str, device: torch.device) -> str:
    """Resolve 'auto' to 'bf16' where the hardware has it, else 'fp32'."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision
