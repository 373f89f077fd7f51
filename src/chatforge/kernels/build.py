"""Compile q_gemv.c on first use for the instruction set this CPU really has, cache it, load it with ctypes.

The library is built with the system's C compiler ($CC, else cc, gcc or clang) into
$CHATFORGE_HOME/kernels (else ~/.cache/chatforge/kernels), named by a hash of the source, the flags
and the compiler's version, so an upgrade rebuilds and a second process reuses the file (written to a
temporary name and renamed: processes racing to build it each finish with a whole file). About a
second of compiling, once.

The variant is chosen from /proc/cpuinfo's flags: "avx512" (AVX-512 F/BW/VL), "avx2" (AVX2 + FMA +
F16C), else "generic" (plain C). ATEN_CPU_CAPABILITY=avx2 (or default), which makes torch use its AVX2
(or plain) kernels, caps the choice the same way, so one variable emulates an older CPU for both.
CHATFORGE_KERNELS=0 turns the kernels off (the pure-torch paths run); =avx2 / =generic asks for a
variant (never one the CPU lacks).
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from chatforge.utils import cpu_flags

SOURCE = Path(__file__).with_name("q_gemv.c")
ENV = "CHATFORGE_KERNELS"
ISAS = ("avx512", "avx2", "generic")  # best first
FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
COMMON = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-math-errno"]
_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
          "avx2": {"avx2", "fma", "f16c"}, "generic": set()}
_ATEN_CAP = {"default": "generic", "avx2": "avx2"}  # torch's own names for its capped levels
# integer dot products (VNNI) where the CPU has them: the int8 GEMV's inner instruction, else two AVX2 ones
_VNNI = {"avx512": ("avx512_vnni", "-mavx512vnni"), "avx2": ("avx_vnni", "-mavxvnni")}
VNNI_ENV = "CHATFORGE_VNNI"  # =0: build without them (the plain AVX2 loop, as on a CPU that lacks them)


class BuildError(RuntimeError):
    """The kernels cannot be had here (no compiler, a failed compile, turned off); the message says why."""


def disabled() -> bool:
    """Whether CHATFORGE_KERNELS turns the kernels off (0, off, false, no)."""
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no", "none")


def supported_isas() -> list[str]:
    """The variants this CPU can run, best first ("generic" everywhere; the x86 ones by cpuinfo flags)."""
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [isa for isa in ISAS if isa == "generic" or (x86 and _NEEDS[isa] <= flags)]


def chosen_isa() -> str:
    """The variant to use: the best this CPU runs, capped by ATEN_CPU_CAPABILITY and CHATFORGE_KERNELS."""
    have = supported_isas()
    for cap in (_ATEN_CAP.get(os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()),
                os.environ.get(ENV, "").strip().lower()):
        if cap in ISAS:
            have = [isa for isa in have if ISAS.index(isa) >= ISAS.index(cap)]
    return have[0]


def vnni(isa: str) -> bool:
    """Whether variant `isa` is built with integer dot-product instructions: the CPU has them for that
    width, and CHATFORGE_VNNI is not 0."""
    if isa not in _VNNI or os.environ.get(VNNI_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    return _VNNI[isa][0] in cpu_flags()


def isa_flags(isa: str) -> list[str]:
    """The compiler's instruction-set flags for variant `isa` on this CPU."""
    return FLAGS[isa] + ([_VNNI[isa][1]] if vnni(isa) else [])


def cache_dir() -> Path:
    """$CHATFORGE_HOME/kernels, else $XDG_CACHE_HOME/chatforge/kernels (~/.cache/chatforge/kernels)."""
    home = os.environ.get("CHATFORGE_HOME")
    if home:
        return Path(home).expanduser() / "kernels"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "chatforge" / "kernels"


@functools.lru_cache(maxsize=1)
def compiler() -> tuple[str, str]:
    """(path, version line) of the C compiler: $CC, else cc, gcc or clang; BuildError without one."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0:
                return path, (out.stdout.splitlines() or [""])[0]
    raise BuildError("no C compiler found (set CC, or install gcc or clang)")


def library_path(isa: str) -> Path:
    """Where variant `isa` is (or would be) built, compiling it first if it is not there yet."""
    cc, version = compiler()
    source = SOURCE.read_bytes()
    errors = []
    for openmp in (["-fopenmp"], []):  # without OpenMP (Apple's clang) the kernels run on one thread
        flags = COMMON + isa_flags(isa) + openmp
        key = hashlib.sha256(source + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
        target = cache_dir() / f"q_gemv-{isa}-{key}.so"
        if target.is_file():
            return target
        try:
            _compile(cc, flags, target)
            return target
        except BuildError as e:
            errors.append(str(e))
    raise BuildError(errors[0])


def _compile(cc: str, flags: list[str], target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write to {target.parent} ({e.strerror or e}); set CHATFORGE_HOME elsewhere") from None
    try:
        out = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=300)
        if out.returncode != 0:
            why = (out.stderr.strip().splitlines() or ["no message"])[0]
            raise BuildError(f"compiling {SOURCE.name} failed ({why})")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiling {SOURCE.name} failed ({e})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
