"""Chat data: JSONL conversations in, packed token rows with a loss mask out.

    convs = read_chat_jsonl(["chats.jsonl"])              # lists of {"role", "content"} messages
    fmt = ChatFormat.for_tokenizer(tokenizer)             # the template the model will be chatted with
    packed = PackedChats.build(convs, fmt, block_size=256)
    packed.batch([0, 1])                                  # {"input_ids", "labels"}, labels -100 off the replies

Input is JSONL, one conversation a line: `{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]}`, or a prompt/completion pair `{"prompt": ...,
"completion": ...}` (optionally with a "system" prompt). A line that is not valid JSON, has
neither form, uses an unknown role or has no assistant turn is a DataError naming the file
and line. `validate_messages` is the one check of a message list, for training data and
for the conversations chat/ holds alike.

Each conversation is rendered with the chat template and gets a loss mask that is 1 exactly
on the assistant's tokens and the end-of-turn token that closes each reply (so the model
learns to stop): `ChatFormat.encode_for_training`. Conversations are then packed whole into
rows of `block_size + 1` tokens (inputs plus the next token of the last one), best-fit,
longest first; the mask travels with the tokens. A conversation longer than a row is cut to
the row and counted in `stats["truncated"]` (dropped, and counted, when the cut leaves no
assistant token). Within a row, later conversations attend to earlier ones, as documents
joined by end-of-text do in pre-training; each starts with the template's own start-of-turn
token, and no loss ever falls on another conversation's text.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch

from chatforge.data.shards import find_inputs
from chatforge.data.text import IGNORE_INDEX, split_documents
from chatforge.errors import ChatforgeError, DataError
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_directory

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


class TrainingFormat(Protocol):
    """What packing needs of a chat format (chatforge.chat.template.ChatFormat is one)."""

    tokenizer: Tokenizer

    def encode_for_training(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]: ...


# --- JSONL -> conversations -----------------------------------------------------------------

def validate_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Check roles and contents; return plain {"role", "content"} dicts."""
    if not messages:
        raise ChatforgeError("the conversation is empty: add at least one user message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatforgeError(f"message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatforgeError(f"message {i} has unknown role {role!r}; use one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatforgeError(f"message {i} content must be a string")
        out.append({"role": role, "content": content})
    return out


def parse_chat_record(record: Any) -> Messages:
    """One JSONL record -> validated messages (raises ChatforgeError saying what is wrong)."""
    if not isinstance(record, dict):
        raise ChatforgeError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ChatforgeError("'messages' must be a list of {\"role\", \"content\"} objects")
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ChatforgeError("'prompt' and 'completion' must be strings")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
        if isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ChatforgeError("missing 'messages' (or a 'prompt' and 'completion' pair)")
    messages = validate_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatforgeError("no assistant turn: there is nothing to learn from this conversation")
    return messages


def read_chat_jsonl(paths: Sequence[str | Path]) -> list[Messages]:
    """Conversations of JSONL files, folders (their .jsonl files) or globs, in order; blank lines are skipped."""
    conversations: list[Messages] = []
    for path in chat_files(paths):
        try:
            lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                conversations.append(parse_chat_record(record))
            except ChatforgeError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not conversations:
        raise DataError(f"no conversations in {', '.join(map(str, paths))}: the files hold no JSONL lines")
    return conversations


def chat_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files, globs, and the .jsonl files of folders (recursively), in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[str | Path] = []
    for raw in paths:
        path = Path(os.path.expanduser(str(raw)))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not found:
                raise DataError(f"folder {path} holds no .jsonl files of conversations")
            files.extend(found)
        else:
            files.append(raw)
    return find_inputs(files)


def split_conversations(conversations: list[Messages], val_fraction: float,
                        seed: int) -> tuple[list[Messages], list[Messages]]:
    """(train, val): a seeded random `val_fraction` of the conversations (at least one) held out."""
    if len(conversations) < 2:
        raise DataError("only one conversation: too few to hold some out for validation; "
                        "add more, or pass validation data")
    return split_documents(conversations, val_fraction, seed)  # the same seeded hold-out as MLM documents


# --- conversations -> packed rows ---------------------------------------------------------

def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of items grouped into bins of at most `capacity` (items must fit)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))  # the fullest bin that still has room
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


@dataclass
class PackedChats:
    """Rows of `block_size + 1` token ids and their loss mask (1 = a token the model must predict)."""

    tokens: np.ndarray  # (rows, block_size + 1) int32, padded with the pad id
    mask: np.ndarray  # (rows, block_size + 1) uint8
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, conversations: Sequence[Messages], fmt: TrainingFormat, block_size: int,
              pad_id: Optional[int] = None) -> "PackedChats":
        return cls.from_encoded(encode_chats(conversations, fmt), block_size,
                                fmt.tokenizer.pad_id if pad_id is None else pad_id)

    @classmethod
    def from_encoded(cls, encoded: Sequence[tuple[list[int], list[int]]], block_size: int,
                     pad_id: int) -> "PackedChats":
        row = block_size + 1
        kept, truncated, dropped = [], 0, 0
        for ids, mask in encoded:
            if len(ids) > row:
                ids, mask = ids[:row], mask[:row]
                truncated += 1
                if not any(mask[1:]):  # the first token is never predicted
                    dropped += 1
                    continue
            kept.append((ids, mask))
        if not kept:
            raise DataError(f"no conversation has an assistant reply within the first {row} tokens; "
                            "use a model with a longer context or shorter conversations")
        bins = pack([len(ids) for ids, _ in kept], row)
        tokens = np.full((len(bins), row), pad_id, dtype=np.int32)
        masks = np.zeros((len(bins), row), dtype=np.uint8)
        for r, members in enumerate(bins):
            at = 0
            for i in members:
                ids, mask = kept[i]
                tokens[r, at:at + len(ids)] = ids
                masks[r, at:at + len(ids)] = mask
                at += len(ids)
        stats = {"conversations": len(encoded), "packed": len(kept), "rows": len(bins), "truncated": truncated,
                 "dropped": dropped, "tokens": sum(len(ids) for ids, _ in kept),
                 "loss_tokens": int(masks[:, 1:].sum())}
        return cls(tokens, masks, stats)

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Inputs and next-token labels of some rows; labels are IGNORE_INDEX where the mask is 0."""
        tokens = torch.from_numpy(self.tokens[np.asarray(rows, dtype=np.int64)].astype(np.int64))
        mask = torch.from_numpy(self.mask[np.asarray(rows, dtype=np.int64)].astype(bool))
        labels = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return {"input_ids": tokens[:, :-1], "labels": labels}

    # files: data/{split}.npz, like the other objectives' prepared data
    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, mask=self.mask, stats=json.dumps(self.stats))

    @classmethod
    def load(cls, path: Path) -> "PackedChats":
        if not path.is_file():
            raise DataError(f"{path} is missing; prepare the data again (start a new run in another --out-dir)")
        with np.load(path, allow_pickle=False) as f:
            return cls(f["tokens"], f["mask"], json.loads(str(f["stats"])))


def encode_chats(conversations: Sequence[Messages], fmt: TrainingFormat) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each conversation rendered with the chat template."""
    encoded = []
    for i, conv in enumerate(conversations):
        try:
            encoded.append(fmt.encode_for_training(conv))
        except ChatforgeError as e:
            raise DataError(f"conversation {i + 1} ({conv[0]['content'][:40]!r}...): {e}") from None
    return encoded


def prepare_chats(train: Sequence[Messages], val: Sequence[Messages], fmt: TrainingFormat, block_size: int,
                  data_dir: Path, *, fit: bool = False) -> dict[str, PackedChats]:
    """Encode and pack both splits into data_dir/{train,val}.npz (+ meta.json), replaced atomically.

    fit: rows only as long as the longest conversation needs, at most `block_size` tokens: short
    chats then train on short rows, not on rows of the model's whole context (8,192 tokens for
    SmolLM2), whose activations would take gigabytes for nothing.
    """
    encoded = {"train": encode_chats(train, fmt), "val": encode_chats(val, fmt)}
    if fit:  # a conversation of n tokens fills a row of block_size + 1 = n
        block_size = max(1, min(block_size, max(len(ids) for part in encoded.values() for ids, _ in part) - 1))
    pad = fmt.tokenizer.pad_id
    splits = {name: PackedChats.from_encoded(part, block_size, pad) for name, part in encoded.items()}
    meta: dict[str, Any] = {"version": 1, "format": "chat", "block_size": block_size}
    with atomic_directory(data_dir) as tmp:
        for name, packed in splits.items():
            packed.save(tmp / f"{name}.npz")
            meta[name] = packed.stats
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return splits


__all__ = ["Messages", "ROLES", "validate_messages", "parse_chat_record", "read_chat_jsonl", "chat_files",
           "split_conversations", "pack", "PackedChats", "encode_chats", "prepare_chats"]
