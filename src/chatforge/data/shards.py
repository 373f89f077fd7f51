"""Text on disk -> token shards on disk -> random training blocks.

    inputs = find_inputs(["corpus/", "extra/*.txt"])        # files, folders (recursive) or globs
    meta = prepare_shards(inputs, tokenizer, "run/data")    # train_0000.bin, val_0000.bin, meta.json
    train = TokenShards("run/data", "train")
    starts = train.sample(12, 64, generator)                # nanoGPT's random block offsets
    x, y = train.blocks(starts, 64)                         # y is x shifted by one token

The corpus is streamed in chunks cut at newlines, so it never has to fit in memory.
As in nanoGPT, the last `val_fraction` of the corpus (by byte offset, all inputs
concatenated in order) is the validation split. Shards are raw little arrays of
uint16 (or uint32 for vocabularies over 65536 tokens) read back with np.memmap.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from chatforge.errors import ConfigError, DataError
from chatforge.utils import atomic_directory, atomic_write_text, read_json

META = "meta.json"
SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 22  # read 4 MiB at a time
PIECE_BYTES = 1 << 16  # encode in ~64 KiB pieces, in parallel
SHARD_TOKENS = 1 << 27  # 128M tokens per shard file
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".csv", ".tsv", ".json", ".jsonl",
                 ".html", ".htm", ".xml", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs",
                 ".sh", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".org", ".srt", ".log"}


# --- which files --------------------------------------------------------------------------

def find_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively, their text files) and globs into a list of files, in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no input data given: pass one or more text files, folders or globs")
    files: list[Path] = []
    for raw in paths:
        path = Path(os.path.expanduser(str(raw)))
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and _visible(p, path) and _looks_like_text(p)]
            if not found:
                raise DataError(f"folder {path} holds no text files; put .txt (or other text) files in it")
            files.extend(found)
        elif any(c in str(raw) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(raw)), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"the pattern {raw} matches no files; check the path or quote the glob")
            files.extend(matches)
        else:
            raise DataError(f"data path {raw} does not exist; pass a text file, a folder or a glob")
    unique = list(dict.fromkeys(p.resolve() for p in files))  # a file named twice is read once
    if sum(p.stat().st_size for p in unique) == 0:
        names = ", ".join(str(p) for p in unique[:3]) + (" ..." if len(unique) > 3 else "")
        raise DataError(f"the input is empty: {names} {'has' if len(unique) == 1 else 'have'} no text")
    for p in unique:
        check_text(p)
    return unique


TEXT_SAMPLE_BYTES = 1 << 16  # bytes read from each of a few places of a file to tell text from binary
MAX_INVALID_SHARE = 0.01  # more of a file's characters than this not valid UTF-8: not (UTF-8) text


def check_text(path: Path) -> None:
    """Refuse a file that is not UTF-8 text, naming it: one with NUL bytes (a binary file), or one where
    more than MAX_INVALID_SHARE of the characters are not valid UTF-8 (random bytes, another encoding).

    Samples from its start, middle and end are read (the whole file when small), so a corpus of
    gigabytes is checked in milliseconds; a few stray bytes in real text are tolerated (and become
    U+FFFD when the text is read).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size <= 4 * TEXT_SAMPLE_BYTES:
                samples = [f.read()]
            else:
                samples = []
                for at in (0, size // 3, 2 * size // 3, size - TEXT_SAMPLE_BYTES):
                    f.seek(at)
                    samples.append(f.read(TEXT_SAMPLE_BYTES))
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    if any(b"\0" in sample for sample in samples):
        raise DataError(f"{path} is not text: it holds NUL bytes (a binary file?); pass UTF-8 text files")
    chars = invalid = 0
    for i, sample in enumerate(samples):
        if i:  # a sample from the middle may start inside a character: skip its continuation bytes
            sample = sample[next((j for j in range(min(4, len(sample))) if sample[j] & 0xC0 != 0x80), 0):]
        text = sample.decode("utf-8", errors="replace")
        chars += len(text)
        invalid += text.count("\ufffd") - sample.count("\ufffd".encode())  # U+FFFD written in the file is fine
    if chars and invalid > MAX_INVALID_SHARE * chars:
        raise DataError(f"{path} is not UTF-8 text: {invalid / chars:.0%} of its characters are invalid UTF-8 (a "
                        "binary file, or another encoding); convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _looks_like_text(path: Path) -> bool:
    """A known text suffix, or (for other names) a start without NUL bytes that decodes as UTF-8."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # only a character cut by the 8 KiB limit
    return True


# --- reading the corpus --------------------------------------------------------------------

def split_offset(files: Sequence[Path], val_fraction: float) -> tuple[int, int]:
    """(total bytes, byte offset where validation starts) of the concatenated inputs."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    total = sum(p.stat().st_size for p in files)
    return total, int(total * (1.0 - val_fraction))


def iter_corpus(files: Sequence[Path], val_start: int, chunk_bytes: int = CHUNK_BYTES,
                bar: Optional[tqdm] = None) -> Iterator[tuple[str, int, str]]:
    """Yield (split, file index, text) chunks of the concatenated files, each cut at a newline.

    The chunk that crosses `val_start` is cut there (moved forward to a character boundary),
    so everything before the offset is "train" and everything after it is "val".
    """
    offset = 0
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            carry = b""
            while True:
                block = f.read(chunk_bytes)
                eof = not block
                data = carry + block
                if not data:
                    break
                cut = len(data) if eof else _last_cut(data)
                piece, carry = data[:cut], data[cut:]
                if bar is not None:
                    bar.update(len(piece))
                start, end = offset, offset + len(piece)
                offset = end
                if start < val_start < end:
                    mid = _char_boundary(piece, val_start - start)
                    yield from _decoded("train", index, piece[:mid])
                    yield from _decoded("val", index, piece[mid:])
                else:
                    yield from _decoded("train" if start < val_start else "val", index, piece)
                if eof:
                    break


def _decoded(split: str, index: int, data: bytes) -> Iterator[tuple[str, int, str]]:
    if data:
        yield split, index, data.decode("utf-8", errors="replace")


def _last_cut(data: bytes) -> int:
    """Cut after the last newline, or (one giant line) at the last character boundary."""
    nl = data.rfind(b"\n")
    if nl >= 0:
        return nl + 1
    i = len(data) - 1  # keep the last (maybe incomplete) character for the next chunk
    while i > 0 and (data[i] & 0xC0) == 0x80:
        i -= 1
    return i if i > 0 else len(data)


def _char_boundary(data: bytes, i: int) -> int:
    """The first index >= i that does not split a UTF-8 character."""
    while 0 < i < len(data) and (data[i] & 0xC0) == 0x80:
        i += 1
    return i


def iter_train_text(files: Sequence[Path], val_fraction: float) -> Iterator[str]:
    """Text of the training split only: what a tokenizer is trained on."""
    _, val_start = split_offset(files, val_fraction)
    for split, _, text in iter_corpus(files, val_start):
        if split == "train":
            yield text


# --- writing shards ---------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids while the vocabulary fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to split_0000.bin, split_0001.bin, ... of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype, copy=False).tofile(self._file)
            self.shards[-1]["tokens"] += len(part)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def prepare_shards(inputs: Sequence[str | Path], tokenizer, out_dir: str | Path, *, val_fraction: float = 0.1,
                   shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Tokenize text files into train/val shards in `out_dir` and write meta.json; returns the meta.

    Files are joined with the tokenizer's end-of-text token. The folder is built under a
    temporary name and renamed into place, so a killed run never leaves half a data set.
    """
    files = find_inputs(inputs)
    total, val_start = split_offset(files, val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    with atomic_directory(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
                      disable=not progress, dynamic_ncols=True) as bar:
                current_file = 0
                for split, index, text in iter_corpus(files, val_start, bar=bar):
                    if index != current_file and eos is not None:  # a document boundary
                        writers[split].write(np.array([eos], dtype=np.int64))
                    current_file = index
                    encoded = tokenizer.encode_batch(text_pieces(text, PIECE_BYTES))
                    writers[split].write(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded]))
        finally:
            for w in writers.values():
                w.close()
        for split, w in writers.items():
            if w.tokens == 0:
                what = "training" if split == "train" else "validation"
                raise DataError(f"the {what} split is empty ({total} bytes of text in all); add more text "
                                f"or change --val-fraction (now {val_fraction})")
        meta = {
            "version": 1,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": getattr(tokenizer, "kind", "bpe"),
            "val_fraction": val_fraction,
            "bytes": {"train": val_start, "val": total - val_start},
            "tokens": {s: w.tokens for s, w in writers.items()},
            "shards": {s: w.shards for s, w in writers.items()},
            "sources": [str(p) for p in files],
        }
        atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
    return meta


def text_pieces(text: str, size: int = PIECE_BYTES) -> list[str]:
    """Split text into pieces of about `size` characters at newlines (for parallel encoding)."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def load_meta(directory: str | Path) -> dict[str, Any]:
    """The meta.json of a shard directory (dtype, token counts, shard files), or a DataError saying what is wrong."""
    path = Path(directory) / META
    if not path.is_file():
        raise DataError(f"{directory} holds no token shards (no {META}); prepare them with `chatforge pretrain --data ...`")
    return read_json(path, DataError, obj=True)


# --- reading shards -----------------------------------------------------------------------------

class TokenShards:
    """The token shards of one split, read lazily through np.memmap."""

    def __init__(self, directory: str | Path, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.directory, self.split = Path(directory), split
        meta = load_meta(directory)
        try:
            self.dtype = np.dtype(meta["dtype"])
            shards = [(self.directory / Path(s["file"]).name, int(s["tokens"])) for s in meta["shards"][split]]
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(self.dtype)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{self.directory / META} is corrupt; delete {directory} and prepare the data "
                            "again") from None
        self.arrays: list[np.ndarray] = []
        for path, tokens in shards:
            if not path.is_file() or path.stat().st_size != tokens * self.dtype.itemsize:
                raise DataError(f"shard {path} is missing or truncated; delete {directory} and prepare the data again")
            if tokens:  # an empty file cannot be mapped (and holds nothing)
                self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)

    def _starts_per_shard(self, block_size: int) -> np.ndarray:
        return np.array([max(0, len(a) - block_size) for a in self.arrays], dtype=np.int64)

    def check_block(self, block_size: int) -> None:
        if self._starts_per_shard(block_size).sum() == 0:
            what = "training" if self.split == "train" else "validation"
            raise DataError(f"the {what} split has {len(self)} tokens, too few for one block of {block_size + 1}; "
                            "lower --block-size or add more text")

    def sample(self, n: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
        """n random block starts, uniform over all places a block (plus its next token) fits."""
        return torch.randint(int(self._starts_per_shard(block_size).sum()), (n,), generator=generator)

    def blocks(self, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x = tokens[s : s+T] and targets y = tokens[s+1 : s+T+1] for each start s."""
        bounds = np.cumsum(self._starts_per_shard(block_size))
        rows = []
        for s in starts.tolist():
            shard = int(np.searchsorted(bounds, s, side="right"))
            local = s - (int(bounds[shard - 1]) if shard else 0)
            rows.append(np.asarray(self.arrays[shard][local:local + block_size + 1], dtype=np.int64))
        data = torch.from_numpy(np.stack(rows))
        return data[:, :-1], data[:, 1:]
