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


@pytest.fixture
def char_tokenizer():
    from chatforge.tokenizer import Tokenizer

    return Tokenizer.train_char(["Hello world! The quick brown fox jumps over the lazy dog.\n0123456789,;:?'"])


def run_cli(*args: str, cwd=None, timeout=300, input=None):
    """Run the real `chatforge` command in a subprocess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, input=input)
