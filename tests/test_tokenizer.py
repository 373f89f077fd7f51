"""Tokenizers: lossless round trips, special tokens, files."""
from __future__ import annotations

import json

import pytest

from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

SAMPLES = [
    "Hello, world!",
    "你好，世界！我们的规格是用中文写的。",
    "emoji 👋🏽🧑‍💻🇫🇷 and combining é (e\u0301)",
    "  leading spaces, tabs\t\tand\r\nwindows newlines\n\n",
    "<|im_end|> typed by a user is just text",
    "\x00 control \u200b zero-width \U0001F600 math ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be, that is the question.\n" * 20]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(CORPUS, vocab_size=400, show_progress=False)


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_char_round_trips_any_unicode_even_unseen_characters(text):
    tok = Tokenizer.train_char(["abc de"])
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_gives_one_token_per_known_character():
    tok = Tokenizer.train_char(["hello world"])
    assert len(tok.encode("hello")) == 5
    assert len(tok.encode("€")) == 3  # unseen: three UTF-8 bytes


def test_bpe_merges_frequent_words(bpe):
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")
    assert 268 < bpe.vocab_size <= 400  # merges learned, never past the asked size


def test_special_tokens_are_reserved_first_and_only_parsed_when_allowed(bpe):
    for i, tok in enumerate(SPECIAL_TOKENS.values()):
        assert bpe.hf.token_to_id(tok) == i
    im_end = bpe.token_id("im_end")
    assert bpe.encode("<|im_end|>", allow_special=True) == [im_end]
    assert im_end not in bpe.encode("<|im_end|>")
    assert bpe.eos_id == 0 and bpe.pad_id == bpe.token_id("pad")
    assert bpe.token_id("mask") is not None and bpe.token_id("cls") is not None


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_keep_ids_and_special_roles(tmp_path, bpe, kind):
    tok = bpe if kind == "bpe" else Tokenizer.train_char(CORPUS)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok.save(tmp_path)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert conf["eos_token"] == "<|endoftext|>" and conf["chat_template"] == tok.chat_template
    again = Tokenizer.load(tmp_path)
    assert again.kind == kind
    for text in SAMPLES:
        assert again.encode(text) == tok.encode(text)
    assert again.special == tok.special and again.chat_template == tok.chat_template


def test_loads_a_hugging_face_style_config(tmp_path, bpe):
    bpe.save(tmp_path)
    conf = {"bos_token": {"content": "<|bos|>"}, "eos_token": "<|endoftext|>", "chat_template": [
        {"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = Tokenizer.load(tmp_path)
    assert tok.bos_id == 1 and tok.eos_id == 0 and tok.chat_template == "T"
    assert tok.token_id("im_end") == 4  # ChatML tokens found in the vocabulary


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least 268 tokens"):
        Tokenizer.train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(DataError, match="empty"):
        Tokenizer.train_char(["", ""])
    with pytest.raises(ConfigError, match="--vocab-size"):
        train_tokenizer("bpe", CORPUS)
    with pytest.raises(ConfigError, match="'char' or 'bpe'"):
        train_tokenizer("wordpiece", CORPUS)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
