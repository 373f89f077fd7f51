"""Exact resume: kill -9 a real training process, resume it, and match an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from chatforge.formats.checkpoint import read_model as load_model

RUNNER = """
import json, sys
from chatforge import ModelConfig, TrainConfig
from chatforge.train.pretrain import pretrain
args = json.loads(sys.argv[1])
result = pretrain([args["data"]], ModelConfig.preset("test", block_size=32, dropout=0.1),
                  TrainConfig(**args["train"]), resume=args["resume"])
print("RESULT " + json.dumps(result))
"""
CORPUS = "".join(f"line {i}: to be, or not to be, that is the question {i * 7 % 13}\n" for i in range(2000))
MAX_STEPS = 150


def launch(data, out_dir, resume=False) -> subprocess.Popen:
    train = dict(out_dir=str(out_dir), max_steps=MAX_STEPS, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=20,
                 eval_interval=50, eval_iters=4, save_interval=10, log_interval=10, progress=False,
                 precision="fp32", seed=7)
    args = json.dumps({"data": str(data), "train": train, "resume": resume})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same float sums
    return subprocess.Popen([sys.executable, "-c", RUNNER, args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def saved_step(out_dir) -> int:
    path = out_dir / "last" / "training.json"
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError):  # not there yet, or between the two renames of an atomic save
        return 0


def records(out_dir) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(CORPUS)
    full_proc = launch(data, tmp_path / "full")
    killed = launch(data, tmp_path / "killed")
    deadline = time.monotonic() + 240
    while saved_step(tmp_path / "killed") < 20:
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    at_kill = saved_step(tmp_path / "killed")
    assert 20 <= at_kill < MAX_STEPS, "the run finished before it could be killed"

    resumed = finish(launch(data, tmp_path / "killed", resume=True))
    full = finish(full_proc)
    assert resumed["step"] == full["step"] == MAX_STEPS
    for key in ("train_loss", "val_loss", "best_val_loss"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    a, b = load_model(tmp_path / "full" / "last"), load_model(tmp_path / "killed" / "last")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the same log: every step once, the same losses and learning rates (schedule continued, not restarted)
    full_rows, resumed_rows = records(tmp_path / "full"), records(tmp_path / "killed")
    assert [r["step"] for r in resumed_rows] == list(range(10, MAX_STEPS + 1, 10))
    for r, f in zip(resumed_rows, full_rows):
        assert r.keys() == f.keys()
        for key in r:
            assert r[key] == pytest.approx(f[key], rel=1e-5, abs=1e-6), (r["step"], key)
