"""Token shards: inputs, split, dtype, round trip, sampling and the errors users can cause."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge.data.shards import (TokenShards, find_inputs, iter_corpus, load_meta, prepare_shards, split_offset,
                                   token_dtype)
from chatforge.errors import ConfigError, DataError
from chatforge.tokenizer import Tokenizer

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog. é ü 漢字\n" for i in range(300))


@pytest.fixture
def tok():
    return Tokenizer.train_char([TEXT])


def test_shards_round_trip_dtype_and_split(tmp_path, tok):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prepare_shards([src], tok, tmp_path / "data", val_fraction=0.2, progress=False)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char"
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta == load_meta(tmp_path / "data")
    total, val_start = split_offset([src], 0.2)
    assert meta["bytes"] == {"train": val_start, "val": total - val_start}
    train, val = (TokenShards(tmp_path / "data", s) for s in ("train", "val"))
    assert len(train) == meta["tokens"]["train"] and len(val) == meta["tokens"]["val"]
    assert train.arrays[0].dtype == np.uint16
    # the concatenated splits decode back to the corpus, and val is its last ~20% of bytes
    ids = np.concatenate([train.arrays[0], val.arrays[0]]).tolist()
    assert tok.decode(ids) == TEXT
    val_text = tok.decode(val.arrays[0].tolist())
    assert TEXT.endswith(val_text)
    assert abs(len(val_text.encode()) - 0.2 * len(TEXT.encode())) <= 4


def test_chunked_reading_cuts_at_newlines_and_characters(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(TEXT, encoding="utf-8")
    total, val_start = split_offset([src], 0.1)
    chunks = list(iter_corpus([src], val_start, chunk_bytes=100))
    assert "".join(text for _, _, text in chunks) == TEXT  # no character split by a 100-byte read
    splits = [s for s, _, _ in chunks]
    assert splits == sorted(splits, key=["train", "val"].index)  # train first, then val
    train = [text for split, _, text in chunks if split == "train"]
    assert len(train) > 10 and all(t.endswith("\n") for t in train[:-1])  # the last one is cut at the split


def test_folder_and_glob_inputs(tmp_path, tok):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bravo\n" * 50)
    (tmp_path / "corpus" / "sub" / "a.md").write_text("alpha\n" * 50)
    (tmp_path / "corpus" / "notes").write_text("plain text without a suffix\n")
    (tmp_path / "corpus" / "image.bin").write_bytes(b"\x89PNG\0\0\0binary")
    (tmp_path / "corpus" / ".hidden.txt").write_text("secret\n")
    files = find_inputs([tmp_path / "corpus"])
    assert [p.name for p in files] == ["b.txt", "notes", "a.md"]
    assert [p.name for p in find_inputs([str(tmp_path / "corpus" / "**" / "*.md")])] == ["a.md"]
    meta = prepare_shards([tmp_path / "corpus"], tok, tmp_path / "data", val_fraction=0.1, progress=False)
    ids = np.concatenate([TokenShards(tmp_path / "data", s).arrays[0] for s in ("train", "val")]).tolist()
    assert ids.count(tok.eos_id) == 2  # files are joined by end-of-text tokens
    assert len(meta["sources"]) == 3


def test_big_vocabulary_uses_uint32():
    assert token_dtype(333) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_sampling_is_reproducible_and_shifted(tmp_path, tok):
    src = tmp_path / "c.txt"
    src.write_text(TEXT)
    prepare_shards([src], tok, tmp_path / "data", progress=False)
    shards = TokenShards(tmp_path / "data", "train")
    starts = shards.sample(8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(starts, shards.sample(8, 16, torch.Generator().manual_seed(0)))
    assert int(starts.max()) < len(shards) - 16
    x, y = shards.blocks(starts, 16)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    s = int(starts[0])
    assert x[0].tolist() == shards.arrays[0][s:s + 16].tolist()


def test_several_shards(tmp_path, tok):
    src = tmp_path / "c.txt"
    src.write_text(TEXT)
    meta = prepare_shards([src], tok, tmp_path / "data", shard_tokens=1000, progress=False)
    assert len(meta["shards"]["train"]) > 3
    shards = TokenShards(tmp_path / "data", "train")
    x, y = shards.blocks(shards.sample(64, 32, torch.Generator().manual_seed(1)), 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def _bad_input(kind: str, d):
    if kind == "missing":
        return [str(d / "nope.txt")]
    if kind == "glob":
        return [str(d / "*.nothing")]
    if kind == "empty":
        (d / "empty.txt").write_text("")
        return [str(d / "empty.txt")]
    if kind == "binary folder":
        (d / "bin").mkdir()
        (d / "bin" / "x.bin").write_bytes(b"\0\1\2")
        return [str(d / "bin")]
    return []


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("glob", "matches no files"),
                                           ("empty", "input is empty"), ("binary folder", "no text files"),
                                           ("nothing", "no input data")])
def test_bad_inputs_raise_data_error(tmp_path, kind, message):
    with pytest.raises(DataError, match=message) as err:
        find_inputs(_bad_input(kind, tmp_path))
    assert "\n" not in str(err.value)


def test_too_little_text_and_bad_fraction(tmp_path, tok):
    src = tmp_path / "tiny.txt"
    src.write_text("h")
    with pytest.raises(DataError, match="split is empty"):
        prepare_shards([src], tok, tmp_path / "data", val_fraction=0.1, progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_shards([src], tok, tmp_path / "data", val_fraction=1.0, progress=False)
    src.write_text(TEXT[:400])
    prepare_shards([src], tok, tmp_path / "data", val_fraction=0.1, progress=False)
    with pytest.raises(DataError, match="block-size"):
        TokenShards(tmp_path / "data", "val").check_block(64)
