"""Small helpers shared by every module: atomic writes (files and whole directories), device and
dtype choice, and the one table of dtype names. The ground floor: it imports only chatforge.errors,
so formats/, train/ and everything else can use it without an import cycle."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

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


def read_json(path: str | Path, error: type[ChatforgeError] = ChatforgeError, *, obj: bool = False) -> Any:
    """The JSON value in the file `path`, or `error` saying in one line why it cannot be had: unreadable,
    not UTF-8, not JSON, nested too deep or holding a number too long to parse; with `obj`, a value
    that is not a JSON object is refused as well."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is corrupt: not UTF-8 text (byte {e.start}); it is not a JSON file") from None
    except RecursionError:
        raise error(f"{path} is corrupt: its JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, or an integer of thousands of digits
        raise error(f"{path} is corrupt: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if obj and not isinstance(data, dict):
        raise error(f"{path} is corrupt: expected a JSON object, found {type(data).__name__}")
    return data


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


# --- memory: what this process may still use -------------------------------------------------

MEMORY_LIMIT_ENV = "CHATFORGE_MEMORY_LIMIT"  # e.g. "8GB": the memory chatforge assumes it may use


def parse_bytes(text: str) -> int:
    """A size such as 1500000, "800MB", "1.5 GiB" or "2g" in bytes (decimal units; KiB/MiB/GiB binary)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"{text!r} is not a size; write it like 800MB, 1.5GB or 2GiB")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def available_memory(device: Optional[torch.device] = None) -> int:
    """Bytes this process can still allocate on `device` (default CPU), or $CHATFORGE_MEMORY_LIMIT
    when set: on a GPU its free memory; on the CPU the least of the memory the kernel reports
    available (MemAvailable), the room left in this process's cgroup and under its RLIMIT_AS."""
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if limit:
        return parse_bytes(limit)
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    room = [_meminfo_available()]
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit_file), _read_int(usage_file)
        if cap is not None and used is not None and cap < 1 << 60:
            room.append(max(0, cap - used))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            room.append(max(0, soft - _status_kib("VmSize") * 1024))
    except (ImportError, OSError, ValueError):
        pass
    known = [r for r in room if r is not None]
    return min(known) if known else 1 << 62


def _read_int(path: str) -> Optional[int]:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _status_kib(key: str) -> int:
    """A `key: N kB` line of /proc/self/status (VmSize, VmRSS, VmHWM), 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def return_large_frees(threshold: int = 8 << 20) -> bool:
    """Have glibc hand freed blocks larger than `threshold` bytes straight back to the system (mallopt
    M_MMAP_THRESHOLD); returns whether it could. By default glibc raises that threshold (up to 32 MB)
    each time a large block is freed and from then on keeps such blocks in its heap: a training step
    that frees and allocates tensors of tens of megabytes (chunks of logits, gradients) then stays
    resident at 2-3x its live tensors. Off glibc it does nothing."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as `chatforge plan` prints them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
