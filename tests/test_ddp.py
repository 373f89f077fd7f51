"""DDP on CPU: `torchrun --nproc_per_node 2` equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from chatforge.formats.checkpoint import read_model as load_model

SCRIPT = """
import json, os, sys
from chatforge import ModelConfig, TrainConfig
from chatforge.train.pretrain import pretrain
data, out_dir = sys.argv[1], sys.argv[2]
result = pretrain([data], ModelConfig.preset("test", block_size=32, dropout=0.0),
                  TrainConfig(out_dir=out_dir, max_steps=12, batch_size=4, grad_accum=4, lr=3e-3, warmup_steps=2,
                              eval_interval=6, eval_iters=4, log_interval=3, progress=False, precision="fp32"))
if os.environ.get("RANK", "0") == "0":  # one line only: two ranks' prints interleave on the shared stdout
    print("RESULT " + json.dumps(result), flush=True)
"""
CORPUS = "".join(f"row {i}: a rose by any other name would smell as sweet ({i % 17})\n" for i in range(1500))


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, proc.stdout[-2000:]
    return results[0]


def test_two_process_ddp_matches_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    data, script = tmp_path / "corpus.txt", tmp_path / "train.py"
    data.write_text(CORPUS)
    script.write_text(SCRIPT)
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(data), str(tmp_path / "ddp")])
    single = run([sys.executable, str(script), str(data), str(tmp_path / "single")])
    assert ddp["step"] == single["step"] == 12
    assert ddp["val_loss"] < 5.0  # it learned something (from ln(vocab) = 5.7)
    for key in ("train_loss", "val_loss", "best_val_loss"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-4), key
    a, b = load_model(tmp_path / "ddp" / "last"), load_model(tmp_path / "single" / "last")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
    # only rank 0 wrote the log: one record per logged step
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
