"""Tokenizers: byte-level BPE or characters, both lossless for any Unicode text.

Both kinds are Hugging Face `tokenizers` objects saved as tokenizer.json, next to a
tokenizer_config.json in the Hugging Face layout (bos/eos/pad token, chat template),
so the same class also reads tokenizers that come with Hugging Face checkpoints, and
BERT's WordPiece vocabularies (vocab.txt) built into one (`Tokenizer.wordpiece`).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from chatforge.errors import ChatforgeError, CheckpointError, ConfigError, DataError
from chatforge.utils import atomic_write_text, read_json

# Reserved tokens of every tokenizer chatforge trains, always the first ids.
SPECIAL_TOKENS: dict[str, str] = {
    "eos": "<|endoftext|>",
    "bos": "<|bos|>",
    "pad": "<|pad|>",
    "im_start": "<|im_start|>",  # ChatML: start of a turn, followed by the role name
    "im_end": "<|im_end|>",  # end of turn
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "unk": "[UNK]",
}

# tokenizer_config.json keys (Hugging Face convention) for the roles that have one
_HF_KEYS = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token",
            "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
# BERT's special tokens, by chatforge role (its [CLS], [SEP], [MASK], [UNK] are also chatforge's own)
BERT_SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character byte-level BPE writes for each byte. Printable
    Latin-1 bytes stand for themselves; the others take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


class Tokenizer:
    """Text <-> token ids, plus the special tokens each role uses and an optional chat template."""

    def __init__(self, hf: HFTokenizer, special: dict[str, str], chat_template: Optional[str] = None,
                 kind: str = "bpe"):
        self.hf = hf
        # chatforge pads and cuts batches itself: a tokenizer.json saved with padding or truncation on
        # (sentence-transformers' are: 128 tokens) would otherwise pad or cut every single text
        hf.no_padding()
        hf.no_truncation()
        # a copy that reads special-token text in user input as plain text (no prompt injection)
        self._literal = HFTokenizer.from_str(hf.to_str())
        self._literal.encode_special_tokens = True
        self.special = {role: tok for role, tok in special.items() if hf.token_to_id(tok) is not None}
        self.chat_template = chat_template
        self.kind = kind

    # --- training ---------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                  show_progress: bool = True) -> "Tokenizer":
        """Byte-level BPE: starts from the 256 bytes, so nothing is ever out of vocabulary."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise ConfigError(f"a byte-level BPE vocabulary needs at least {floor} tokens "
                              f"(256 bytes + {len(SPECIAL_TOKENS)} special), got vocab_size={vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(_nonempty(texts), trainer)
        return cls(hf, dict(SPECIAL_TOKENS), kind="bpe")

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> "Tokenizer":
        """One token per character seen, with byte fallback so unseen characters still round-trip."""
        chars: set[str] = set()
        for text in _nonempty(texts):
            chars.update(text)
        vocab: dict[str, int] = {}
        for tok in SPECIAL_TOKENS.values():
            vocab[tok] = len(vocab)
        for ch in sorted(chars):
            vocab.setdefault(ch, len(vocab))
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens(list(SPECIAL_TOKENS.values()))
        return cls(hf, dict(SPECIAL_TOKENS), kind="char")

    @classmethod
    def wordpiece(cls, vocab: dict[str, int], *, lowercase: bool = True, strip_accents: Optional[bool] = None,
                  chinese_chars: bool = True, special: Optional[dict[str, str]] = None) -> "Tokenizer":
        """BERT's WordPiece tokenizer from its vocabulary (vocab.txt: token -> id), built as transformers builds
        BertTokenizer: BertNormalizer (clean text, spaces around CJK characters, lower-casing, accents stripped
        when `strip_accents` or, if None, when lower-casing), BertPreTokenizer (whitespace and punctuation),
        `##` continuation pieces, [CLS] A [SEP] (B [SEP]) around encoded inputs. `special`: role -> token
        (default BERT's [PAD] [UNK] [CLS] [SEP] [MASK])."""
        special = {role: tok for role, tok in (special or BERT_SPECIAL_TOKENS).items() if tok in vocab}
        if "unk" not in special:
            raise CheckpointError("a WordPiece vocabulary needs an unknown-token entry ([UNK]); this one has none")
        hf = HFTokenizer(models.WordPiece(vocab, unk_token=special["unk"], max_input_chars_per_word=100))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                   strip_accents=strip_accents, lowercase=lowercase)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        if "cls" in special and "sep" in special:
            cls_tok, sep_tok = special["cls"], special["sep"]
            hf.post_processor = processors.TemplateProcessing(
                single=f"{cls_tok}:0 $A:0 {sep_tok}:0", pair=f"{cls_tok}:0 $A:0 {sep_tok}:0 $B:1 {sep_tok}:1",
                special_tokens=[(cls_tok, vocab[cls_tok]), (sep_tok, vocab[sep_tok])])
        hf.add_special_tokens(sorted(set(special.values()), key=vocab.__getitem__))
        return cls(hf, special, kind="wordpiece")

    # --- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, role: str) -> Optional[int]:
        """Id of the special token for a role ("eos", "pad", "im_end", "mask", ...), or None."""
        tok = self.special.get(role)
        return None if tok is None else self.hf.token_to_id(tok)

    @property
    def eos_id(self) -> Optional[int]:
        return self.token_id("eos")

    @property
    def bos_id(self) -> Optional[int]:
        return self.token_id("bos")

    @property
    def pad_id(self) -> int:
        for role in ("pad", "eos"):
            if self.token_id(role) is not None:
                return self.token_id(role)
        return 0

    @property
    def special_ids(self) -> set[int]:
        return {self.hf.token_to_id(t) for t in self.special.values()}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings count as specials only with allow_special."""
        tok = self.hf if allow_special else self._literal
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        tok = self.hf if allow_special else self._literal
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.hf.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` adds to the UTF-8 text, even when they are only part of a character
        (byte-level BPE tokens and `<0xNN>` byte-fallback tokens hold raw bytes): OpenAI's logprob `bytes`.
        SentencePiece's word marker counts as the space it stands for."""
        token = self.hf.id_to_token(i)
        if token is None:
            return b""
        byte_level, metaspace, added = self._byte_decoding
        if i in added:
            return token.encode("utf-8")
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # byte fallback: <0xE4>
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        if byte_level and all(c in _BYTE_LEVEL for c in token):
            return bytes(_BYTE_LEVEL[c] for c in token)
        return (token.replace("\u2581", " ") if metaspace else token).encode("utf-8")

    @functools.cached_property
    def _byte_decoding(self) -> tuple[bool, bool, frozenset[int]]:
        """(byte-level decoder?, SentencePiece word marker?, ids of added tokens), read once from the decoder."""
        state = json.loads(self.hf.decoder.__getstate__()) if self.hf.decoder is not None else {}
        parts = state.get("decoders", [state]) if isinstance(state, dict) else []
        parts = [p for p in parts if isinstance(p, dict)]
        types = {p.get("type") for p in parts}
        marker = any(p.get("type") == "Replace" and "\u2581" in json.dumps(p.get("pattern"), ensure_ascii=False)
                     for p in parts)
        metaspace = marker or "Metaspace" in types
        return "ByteLevel" in types, metaspace, frozenset(self.hf.get_added_tokens_decoder())

    # --- files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the vocabulary (token -> id): checkpoints record it so that a tokenizer.json
        swapped in from another model is caught at load time instead of producing garbage."""
        vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "tokenizer.json", self.hf.to_str(pretty=False))
        conf: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "chatforge_kind": self.kind,
                      "chatforge_special_tokens": self.special}
        for role, key in _HF_KEYS.items():
            if role in self.special:
                conf[key] = self.special[role]
        extra = [t for r, t in self.special.items() if r not in _HF_KEYS]
        if extra:
            conf["additional_special_tokens"] = extra
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        conf["clean_up_tokenization_spaces"] = False
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(conf, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Read tokenizer.json (+ tokenizer_config.json) from a chatforge or Hugging Face directory."""
        directory = Path(directory)
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        if not path.is_file():
            raise CheckpointError(f"no tokenizer.json in {directory}; train one with `chatforge pretrain` "
                                  "or copy the model's tokenizer.json there")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        conf: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            conf_path = path.parent / name
            if conf_path.is_file():
                conf.update(read_json(conf_path, CheckpointError, obj=True))
        special = conf.get("chatforge_special_tokens")
        if special is not None and not (isinstance(special, dict) and all(isinstance(t, str) for t in special.values())):
            raise CheckpointError(f"{path.parent / 'tokenizer_config.json'} is corrupt: chatforge_special_tokens must "
                                  "map roles to token strings")
        if special is None:
            special = {}
            for role, key in _HF_KEYS.items():
                tok = conf.get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if isinstance(tok, str):
                    special[role] = tok
            for role, tok in [*SPECIAL_TOKENS.items(), *BERT_SPECIAL_TOKENS.items()]:  # ChatML's, BERT's tokens,
                if role not in special and hf.token_to_id(tok) is not None:     # when the vocabulary has them
                    special[role] = tok
        template = conf.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{path.parent / 'tokenizer_config.json'} is corrupt: its chat_template is "
                                  f"{type(template).__name__}, not a Jinja template string")
        kind = conf.get("chatforge_kind")
        return cls(hf, special, template, kind=kind if isinstance(kind, str) else "bpe")


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: Optional[int] = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train a `char` or `bpe` tokenizer on an iterable of texts."""
    if kind == "char":
        return Tokenizer.train_char(texts)
    if kind == "bpe":
        if vocab_size is None:
            raise ConfigError("a BPE tokenizer needs --vocab-size (e.g. 8192)")
        return Tokenizer.train_bpe(texts, vocab_size, show_progress=show_progress)
    raise ConfigError(f"tokenizer must be 'char' or 'bpe', got {kind!r}")


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    seen = False
    for t in texts:
        if t:
            seen = True
            yield t
    if not seen:
        raise DataError("no text to train the tokenizer on: the input is empty")


__all__ = ["Tokenizer", "train_tokenizer", "SPECIAL_TOKENS", "BERT_SPECIAL_TOKENS", "ChatforgeError"]
