"""Checkpoints: round trip, atomic replacement, and clear errors for bad directories."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal

import pytest
import torch

from chatforge.formats.checkpoint import (load_trainer_state, read_checkpoint as load_checkpoint, read_model as load_model,
                                          resolve, save_checkpoint)
from chatforge.utils import atomic_directory
from chatforge.config import ModelConfig
from chatforge.errors import CheckpointError
from chatforge.model import Transformer


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("test", **kw)).eval()


def test_round_trip_keeps_logits_tied_weights_and_tokenizer(tmp_path, char_tokenizer):
    model = _model(vocab_size=char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ck", model, char_tokenizer)
    loaded, tok = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    assert torch.equal(model(x), loaded(x))
    assert loaded.lm_head.weight is loaded.wte.weight
    assert tok.encode("Hello") == char_tokenizer.encode("Hello")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]


def test_load_in_bf16(tmp_path, monkeypatch):
    import chatforge.formats.safetensors

    original = _model(tie_embeddings=False)
    save_checkpoint(tmp_path / "ck", original)
    monkeypatch.setattr(chatforge.formats.safetensors, "CHUNK_BYTES", 1024)  # many slabs per tensor
    m = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    for (name, a), b in zip(original.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # converted while read, slab by slab


def test_trainer_state_round_trips_without_pickle(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 512, (1, 8))).sum().backward()
    opt.step()
    import random

    import numpy as np

    state = {"optimizer": opt.state_dict(), "step": 7, "python_rng": random.getstate(),
             "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "ck", model, trainer_state=state)
    back = load_trainer_state(tmp_path / "ck")
    assert back["step"] == 7
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])
    assert torch.equal(back["torch_rng"], state["torch_rng"])
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_a_failed_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = _model()
    save_checkpoint(tmp_path / "ck", old)
    import chatforge.formats.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    torch.manual_seed(1)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", Transformer(ModelConfig.preset("test")))
    monkeypatch.undo()
    x = torch.randint(0, 512, (1, 6))
    assert torch.equal(load_model(tmp_path / "ck")(x), old(x))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def _write_forever(path: str, ready) -> None:
    torch.manual_seed(2)
    model = Transformer(ModelConfig.preset("test", n_embd=256, n_head=4, vocab_size=4096))
    ready.set()
    while True:
        save_checkpoint(path, model)


def test_kill_during_writes_never_corrupts_the_checkpoint(tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(target, _model())
    ctx = mp.get_context("spawn")
    for _ in range(3):
        ready = ctx.Event()
        proc = ctx.Process(target=_write_forever, args=(str(target), ready))
        proc.start()
        assert ready.wait(60)
        # let it get into its write loop: wait until a temporary directory has appeared at least once
        for _ in range(2000):
            if any(p.name.startswith(".ck.tmp") for p in tmp_path.iterdir()):
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        model = load_model(target)  # either the old or a complete new one, never a torn mix
        assert model(torch.randint(0, 512, (1, 4))).shape[-1] in (512, 4096)


def test_reader_falls_back_to_the_previous_checkpoint_mid_swap(tmp_path):
    save_checkpoint(tmp_path / "ck", _model())
    os.rename(tmp_path / "ck", tmp_path / ".ck.old")  # as if killed between the two renames
    assert resolve(tmp_path / "ck") == tmp_path / ".ck.old"
    assert load_model(tmp_path / "ck").config.n_layer == 2
    save_checkpoint(tmp_path / "ck", _model())  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_atomic_directory_removes_scratch_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "x") as d:
            (d / "f").write_text("partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,fragment", [
    ("missing", "does not exist"),
    ("no_config", "has no config.json"),
    ("bad_json", "not valid JSON"),
    ("foreign", "holds a 'bert' model"),
    ("unknown_field", "unknown model config fields"),
    ("truncated", "corrupt or truncated"),
    ("no_weights", "has no model.safetensors"),
    ("wrong_shape", "has shape"),
    ("tokenizer_mismatch", "do not belong together"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, char_tokenizer, damage, fragment):
    ck = tmp_path / "ck"
    save_checkpoint(ck, _model(vocab_size=256), char_tokenizer if damage == "tokenizer_mismatch" else None)
    cfg = json.loads((ck / "config.json").read_text())
    if damage == "missing":
        ck = tmp_path / "nope"
    elif damage == "no_config":
        (ck / "config.json").unlink()
    elif damage == "bad_json":
        (ck / "config.json").write_text("{oops")
    elif damage == "foreign":
        (ck / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif damage == "unknown_field":
        (ck / "config.json").write_text(json.dumps({**cfg, "flux_capacitor": 1}))
    elif damage == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "no_weights":
        (ck / "model.safetensors").unlink()
    elif damage == "wrong_shape":
        (ck / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck) if damage == "tokenizer_mismatch" else load_model(ck)
    assert fragment in str(e.value) and "\n" not in str(e.value)
