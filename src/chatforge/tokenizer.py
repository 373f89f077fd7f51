"""Tokenizers: byte-level BPE or characters, both lossless for any Unicode text.

Both kinds are Hugging Face `tokenizers` objects saved as tokenizer.json, next to a
tokenizer_config.json in the Hugging Face layout (bos/eos/pad token, chat template),
so the same class also reads tokenizers that come with Hugging Face checkpoints, and
BERT's WordPiece vocabularies (vocab.txt) built into one (`Tokenizer.wordpiece`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from chatforge.errors import ChatforgeError, CheckpointError, ConfigError, DataError
from chatforge.utils import atomic_write_text

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
                try:
                    data = json.loads(conf_path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{conf_path} is not valid JSON ({e})") from None
                conf.update(data if isinstance(data, dict) else {})
        special = conf.get("chatforge_special_tokens")
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
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(hf, special, template, kind=conf.get("chatforge_kind", "bpe"))


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
