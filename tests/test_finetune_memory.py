"""Fine-tuning sized to its data: rows as long as the longest conversation (not the model's whole
context), the loss's logits only where the loss counts, and a step's memory estimated before the
first step, checked against what a real step takes and refused when it will not fit."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.chat.template import CHATML_TEMPLATE
from chatforge.config import ModelConfig, TrainConfig
from chatforge.errors import ConfigError
from chatforge.formats.checkpoint import save_checkpoint
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train import objectives
from chatforge.train.distributed import Dist
from chatforge.train.finetune import DEFAULT_BLOCK_LIMIT, finetune_chat
from chatforge.train.objectives import IGNORE_INDEX, lm_loss, selected_lm_loss, selected_lm_sums

CONTEXT = 8192  # a long configured context, like SmolLM2's
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"messages": [{"role": "user", "content": say(3, 20)}, {"role": "assistant", "content": say(10, 60)}]}
            for _ in range(n)]


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> Path:
    """A tiny-width chat model whose configured context is 8,192 tokens."""
    tok = Tokenizer.train_char(["".join(WORDS) + " ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!"])
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size, block_size=CONTEXT, n_embd=32,
                                           pos_encoding="rope"))
    return save_checkpoint(tmp_path_factory.mktemp("models") / "long", model, tok)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(20)))
    return path


def config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out), max_steps=1, batch_size=4, eval_interval=1, eval_iters=1,
                                 log_interval=1, warmup_steps=0, progress=False, device="cpu"), **kw})


def longest_tokens(path: Path, model_dir: Path) -> int:
    from chatforge.chat.template import ChatFormat
    from chatforge.data.chats import encode_chats, read_chat_jsonl

    tok = Tokenizer.load(model_dir)
    return max(len(ids) for ids, _ in encode_chats(read_chat_jsonl([path]), ChatFormat.for_tokenizer(tok)))


def test_rows_are_as_long_as_the_longest_conversation(long_context_model, chats, tmp_path, one_thread):
    result = finetune_chat([str(chats)], str(long_context_model), config(tmp_path / "run"))
    longest = longest_tokens(chats, long_context_model)
    data = result["data"]
    assert data["block_size"] == longest - 1 < 600  # a row of block_size + 1 tokens holds the longest one
    assert data["train"]["truncated"] == data["val"]["truncated"] == 0
    assert DEFAULT_BLOCK_LIMIT < CONTEXT  # without data this short, rows would still stop at 2,048


def test_block_size_says_exactly_how_long_rows_are(long_context_model, chats, tmp_path, monkeypatch):
    import chatforge.train.finetune as finetune

    monkeypatch.setattr(finetune, "run_training", lambda config, *, start, **kw: start(tmp_path, Dist()))
    finetune_chat([str(chats)], str(long_context_model), config(tmp_path), block_size=300)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["block_size"] == 300


def test_rows_stop_at_the_default_limit_for_long_conversations(long_context_model, tmp_path, one_thread):
    path = tmp_path / "long.jsonl"
    rng = random.Random(1)
    long_reply = " ".join(rng.choice(WORDS) for _ in range(700))  # about 3,500 tokens of characters
    path.write_text("".join(json.dumps({"prompt": f"tell me {i}", "completion": long_reply}) + "\n"
                            for i in range(3)))
    result = finetune_chat([str(path)], str(long_context_model), config(tmp_path / "run", batch_size=1))
    assert result["data"]["block_size"] == DEFAULT_BLOCK_LIMIT
    assert result["data"]["train"]["truncated"] == 2  # cut to the row, each still with reply tokens to learn


def test_the_loss_over_selected_positions_equals_the_full_logits_loss(monkeypatch):
    """Chunked, checkpointed and on the labelled positions only, the loss and its gradients are the
    same as the plain loss over full (B, T, V) logits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=300, pos_encoding="rope"))
    ids = torch.randint(0, 300, (3, 40))
    labels = torch.randint(0, 300, (3, 40)).masked_fill(torch.rand(3, 40) < 0.6, IGNORE_INDEX)
    monkeypatch.setattr(objectives, "LOSS_CHUNK_LOGITS", 1)  # 64 positions a chunk: several chunks here

    full = lm_loss(model(ids), labels)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = selected_lm_loss(model, model(ids, logits="none"), labels)
    chunked.backward()
    assert torch.allclose(chunked, full, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-6), name
    with torch.no_grad():
        sums = selected_lm_sums(model, model(ids, logits="none"), labels)
    assert sums["count"] == int((labels != IGNORE_INDEX).sum())
    assert sums["loss_sum"] / sums["count"] == pytest.approx(float(full.detach()), rel=1e-5)


MEASURE = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from chatforge.config import TrainConfig
from chatforge.formats.checkpoint import read_checkpoint
from chatforge.train.finetune import finetune_chat
from chatforge.train import trainer as trainer_module
from chatforge.train.memory import check_step_memory

out, found = Path(sys.argv[1]), {}
original = trainer_module.Trainer.train_step


class Measured(Exception):  # raised after the first step: evaluation, checkpoints, plots are not measured
    pass

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

def measured_step(self):  # the first step of the real run, its resident peak above what was there before
    if not found:
        found["estimate"] = check_step_memory(self.model, self.objective, self.config, self.device)["total"]
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to what is resident now
        original(self)
        found["peak"] = status("VmHWM") - before
        found["block_size"] = self.objective.splits["train"].block_size
        raise Measured
    return original(self)

trainer_module.Trainer.train_step = measured_step
cfg = TrainConfig(out_dir=str(out), max_steps=1, batch_size=8, eval_interval=1, eval_iters=1, warmup_steps=0,
                  progress=False, device="cpu", precision="fp32")
try:
    finetune_chat([sys.argv[2]], sys.argv[3], cfg, merge_lora=False)
except Measured:
    print(json.dumps(found))
"""


def test_a_steps_peak_memory_is_within_2x_of_its_estimate(chats, tmp_path):
    """A real fine-tuning step, in a fresh process: its resident peak (VmHWM, reset just before the
    step) against the estimate made before it. The model is wide in vocabulary and thin in width, as
    chat models are, so the output head and its loss are a large part of the step."""
    tok = Tokenizer.train_char(["".join(WORDS) + " ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!"])
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=16384, block_size=CONTEXT, n_embd=64, n_head=4,
                                           pos_encoding="rope"))
    base = save_checkpoint(tmp_path / "base", model, tok)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(40, seed=1)))
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "run"), str(data), str(base)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["block_size"] < 1000  # rows sized to the data, not to the 8,192-token context
    assert found["estimate"] / 2 <= found["peak"] <= 2 * found["estimate"], found


def test_a_step_that_does_not_fit_is_refused_before_it_starts(long_context_model, chats, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_MEMORY_LIMIT", "2MB")
    with pytest.raises(ConfigError, match=r"one training step needs about .* but only 2 MB is available; "
                                          r"lower --batch-size, --block-size .*--grad-accum"):
        finetune_chat([str(chats)], str(long_context_model), config(tmp_path / "run"))
    assert not (tmp_path / "run" / "last").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.setenv("CHATFORGE_MEMORY_LIMIT", "4GB")  # the same run fits a sane limit
    assert finetune_chat([str(chats)], str(long_context_model), config(tmp_path / "run2"))["step"] == 1
