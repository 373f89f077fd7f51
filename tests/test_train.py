"""The Trainer and pretrain(): learning, schedule, weight decay, early stopping, files, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from chatforge.formats.checkpoint import load_trainer_state, read_checkpoint as load_checkpoint
from chatforge.config import ModelConfig, TrainConfig
from chatforge.errors import CheckpointError, ConfigError, DataError
from chatforge.model import Transformer
from chatforge.train.distributed import Dist
from chatforge.train.objectives import Objective
from chatforge.train.pretrain import pretrain
from chatforge.train.schedule import lr_at
from chatforge.train.trainer import Trainer, make_optimizer, param_groups

CORPUS = "".join(f"{w} sat on the mat and the {w} was happy.\n" for w in ("cat", "dog", "bird", "fox") * 150)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("test", block_size=32, **overrides)


def quick(out_dir, **overrides) -> TrainConfig:
    fields = dict(out_dir=str(out_dir), max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=20,
                  eval_iters=4, log_interval=10, progress=False, precision="fp32")
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_loss_falls_and_run_files_are_written(tmp_path, corpus):
    out = tmp_path / "run"
    result = pretrain([str(corpus)], tiny(), quick(out))
    assert result["step"] == 60 and result["out_dir"] == str(out) and not result["stopped_early"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(rows[0])
    assert {"val_loss", "ppl"} <= set(rows[1])
    assert rows[-1]["val_loss"] == pytest.approx(result["val_loss"])
    assert result["val_loss"] < math.log(256) - 2.5  # from ~ln(vocab) to well below it
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 2
    assert result["best_val_loss"] <= result["val_loss"]
    assert math.exp(result["val_loss"]) == pytest.approx(result["ppl"])
    for name in ("loss.png", "train_config.json", "tokenizer.json", "data/meta.json", "best/model.safetensors",
                 "last/trainer_state.json"):
        assert (out / name).is_file(), name
    model, tok = load_checkpoint(out / "best")
    assert model.config.vocab_size % 64 == 0 and 0 <= model.config.vocab_size - tok.vocab_size < 64  # padded
    assert load_trainer_state(out / "last")["step"] == 60
    assert TrainConfig.from_dict(json.loads((out / "train_config.json").read_text())).max_steps == 60


def test_init_from_and_reused_tokenizer(tmp_path, corpus):
    first = tmp_path / "first"
    pretrain([str(corpus)], tiny(), quick(first, max_steps=20))
    second = pretrain([str(corpus)], tiny(n_layer=1), quick(tmp_path / "second", max_steps=20),
                      init_from=str(first / "last"))
    model, _ = load_checkpoint(second["out_dir"] + "/last")
    assert model.config.n_layer == 2  # the checkpoint's shape, not the one passed
    third = pretrain([str(corpus)], tiny(), quick(tmp_path / "third", max_steps=20), tokenizer=str(first))
    assert (tmp_path / "third" / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    assert third["step"] == 20


def test_schedule_warmup_cosine_to_min_lr():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises...
    assert 0 < lrs[0] < 2e-4 and lrs[10] == pytest.approx(1e-3)  # ...to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only falls
    assert lrs[-1] == pytest.approx(1e-4)  # to min_lr at the last step
    mid = 10 + (99 - 10) // 2
    assert lrs[mid] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * (mid - 10) / 89)) * 9e-4)
    linear = TrainConfig(max_steps=100, warmup_steps=0, lr=1e-3, schedule="linear")
    assert lr_at(0, linear) == pytest.approx(1e-3) and lr_at(99, linear) == pytest.approx(1e-4)  # min_lr = lr/10
    assert lr_at(50, linear) == pytest.approx(1e-3 - 50 / 99 * 9e-4)
    constant = TrainConfig(max_steps=100, warmup_steps=0, schedule="constant")
    assert {lr_at(s, constant) for s in range(100)} == {constant.lr}


def test_weight_decay_only_on_matrices():
    model = Transformer(tiny())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in decay["params"]} == matrices and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once
    opt = make_optimizer(model, TrainConfig(weight_decay=0.05), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


class FlatLoss(Objective):
    """A validation loss that never improves: early stopping must end the run."""

    def sample(self, split, n, generator):
        return torch.randint(10, (n,), generator=generator)

    def collate(self, split, items):
        return {"input_ids": items[:, None].repeat(1, 4)}

    def loss(self, model, batch):
        return model(batch["input_ids"]).float().mean() * 0 + 1.0


def test_early_stopping_after_patience_evaluations(tmp_path):
    cfg = quick(tmp_path / "run", max_steps=100, eval_interval=2, patience=2, log_interval=1)
    result = Trainer(Transformer(tiny()), FlatLoss(), cfg).fit()
    # eval at step 2 sets the best; steps 4 and 6 do not improve -> stop after the second
    assert result["stopped_early"] and result["step"] == 6
    assert result["best_val_loss"] == result["val_loss"] == 1.0
    state = load_trainer_state(tmp_path / "run" / "last")
    assert state["step"] == 6 and state["bad_evals"] == 2
    no_patience = Trainer(Transformer(tiny()), FlatLoss(), quick(tmp_path / "run2", max_steps=8, eval_interval=2)).fit()
    assert not no_patience["stopped_early"] and no_patience["step"] == 8


def test_bad_data_paths_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pretrain([str(tmp_path / "missing.txt")], tiny(), quick(tmp_path / "run"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        pretrain([str(tmp_path / "empty.txt")], tiny(), quick(tmp_path / "run"))
    (tmp_path / "short.txt").write_text("too short for a block of 32 tokens\n" * 3)
    with pytest.raises(DataError, match="block-size"):
        pretrain([str(tmp_path / "short.txt")], tiny(), quick(tmp_path / "run2"))


def test_impossible_hyperparameters_raise_config_error(tmp_path, corpus):
    for bad in (dict(batch_size=0), dict(lr=-1.0), dict(min_lr=1.0), dict(schedule="exp"), dict(precision="fp8")):
        with pytest.raises(ConfigError):
            quick(tmp_path, **bad)
    with pytest.raises(ConfigError, match="n_head"):
        tiny(n_head=3)
    with pytest.raises(ConfigError, match="multiple of 2"):
        Trainer(Transformer(tiny()), FlatLoss(), quick(tmp_path, grad_accum=3), dist=Dist(world_size=2))
    with pytest.raises(ConfigError, match="val_fraction"):
        pretrain([str(corpus)], tiny(), quick(tmp_path / "run"), val_fraction=1.5)
    with pytest.raises(ConfigError, match="tokenizer"):
        pretrain([str(corpus)], tiny(), quick(tmp_path / "run"), tokenizer="wordpiece")
    with pytest.raises(ConfigError, match="vocab-size"):
        pretrain([str(corpus)], tiny(), quick(tmp_path / "run"), tokenizer="bpe")


def test_resume_and_restart_mistakes(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain([], tiny(), quick(tmp_path / "none"), resume=True)
    pretrain([str(corpus)], tiny(), quick(tmp_path / "run", max_steps=4, eval_interval=2))
    with pytest.raises(ConfigError, match="--resume"):  # would overwrite a run
        pretrain([str(corpus)], tiny(), quick(tmp_path / "run", max_steps=4))
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (tmp_path / "run" / "last" / name).unlink()
    with pytest.raises(CheckpointError, match="no trainer state"):
        pretrain([], tiny(), quick(tmp_path / "run"), resume=True)
    with pytest.raises(ConfigError, match="one of them"):
        pretrain([], tiny(), quick(tmp_path / "run"), resume=True, init_from=str(tmp_path / "run" / "best"))
