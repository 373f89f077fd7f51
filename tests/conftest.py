"""Shared fixtures: tiny models and tokenizers made on the fly, and the shared data folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not here")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy machine extra threads only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def char_tokenizer():
    from chatforge.tokenizer import Tokenizer

    return Tokenizer.train_char(["Hello world! The quick brown fox jumps over the lazy dog.\n0123456789,;:?'"])


def run_cli(*args: str, cwd=None, timeout=300, input=None):
    """Run the real `chatforge` command in a subprocess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, input=input)


def make_chat_checkpoint(path, *, never_stop: bool = False, block_size: int = 256, seed: int = 0):
    """A tiny random chat model (ChatML template) saved at `path`.

    never_stop=True makes the output distribution independent of the input and gives the
    end-of-turn and end-of-text tokens no chance, so replies always run to max_new_tokens.
    """
    from chatforge.chat.template import CHATML_TEMPLATE
    from chatforge.formats.checkpoint import save_checkpoint
    from chatforge.config import ModelConfig
    from chatforge.model import Transformer
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["Hello, how are you? I am fine. abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("test", vocab_size=tok.vocab_size, block_size=block_size, pos_encoding="rope",
                             tie_embeddings=not never_stop)
    model = Transformer(cfg)
    if never_stop:
        with torch.no_grad():
            model.norm_f.weight.zero_()
            model.norm_f.bias.copy_(torch.randn(cfg.n_embd))
            b = model.norm_f.bias
            letters = [tok.hf.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz "]
            model.lm_head.weight.zero_()
            for i in letters:  # only plain letters are likely
                model.lm_head.weight[i] = b / b.norm() ** 2 * 15.0
    save_checkpoint(path, model, tok)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("models") / "chat")


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("models") / "chatty", never_stop=True, block_size=8192)
