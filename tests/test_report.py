"""Training reports: the overfitting rule on synthetic curves, the page on a real run, `chatforge report`."""
from __future__ import annotations

import json
import math
import re

import pytest

from conftest import run_cli

from chatforge.config import ModelConfig, TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.train.report import detect_overfitting, read_metrics, write_report
from chatforge.train.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_run(path, *, turn: int, steps: int = 2000, log: int = 50, every: int = 100, val_slope: float = 2e-4,
                  train_rise: float = 0.0, spike_at: int | None = None):
    """metrics.jsonl of a run whose validation loss falls until step `turn` and then rises by `val_slope`
    per step, while training loss keeps falling (or, with train_rise, climbs after `turn` too)."""
    rows = []
    for step in range(log, steps + 1, log):
        train = 3.0 * math.exp(-step / 400) + 1.0 - 1e-4 * step + train_rise * max(0, step - turn)
        row = {"step": step, "train_loss": train + 0.01 * ((step // log) % 3 - 1), "lr": 1e-3 * min(1, step / 200),
               "grad_norm": 1.0 + 5.0 / (1 + step / 100), "tokens_per_s": 5000.0 + step % 7, "tokens": 512 * step,
               "elapsed_s": step / 10}
        if step % every == 0:
            val = 3.0 * math.exp(-min(step, turn) / 400) + 1.1 + val_slope * max(0, step - turn)
            row["val_loss"] = val + (0.5 if step == spike_at else 0.0)
            row["ppl"] = math.exp(row["val_loss"])
        rows.append(row)
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "train_config.json").write_text(json.dumps({"grad_clip": 1.0, "lr": 1e-3}))
    return path


def images(page: str) -> list[str]:
    return re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)


@pytest.mark.parametrize("turn", [600, 1100])
def test_overfitting_is_flagged_where_validation_loss_turned(tmp_path, turn):
    run = synthetic_run(tmp_path / "run", turn=turn)
    page_path, summary = write_report(run)
    over = summary["overfitting"]
    assert over["began_step"] == turn and summary["best_val_step"] == turn
    assert over["first_rise_step"] > turn and over["detected_step"] >= over["first_rise_step"] + 200
    page = page_path.read_text()
    assert page_path == run / "report.html" and "Overfitting detected" in page and f"It began at step {turn}" in page
    assert len(images(page)) == 5  # loss, learning rate, gradient norm, throughput, ppl


def test_no_false_alarms(tmp_path):
    still_learning = read_metrics(synthetic_run(tmp_path / "a", turn=10_000))
    one_bad_eval = read_metrics(synthetic_run(tmp_path / "b", turn=10_000, spike_at=1000))
    diverging = read_metrics(synthetic_run(tmp_path / "c", turn=600, train_rise=3e-3))  # both losses rise
    assert detect_overfitting(still_learning) is None
    assert detect_overfitting(one_bad_eval) is None
    assert detect_overfitting(diverging) is None
    assert detect_overfitting(one_bad_eval, patience=1) is not None  # the spike alone counts when asked to
    page = write_report(tmp_path / "a")[0].read_text()
    assert "No overfitting detected" in page


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"the {w} sat on the mat and was happy.\n" for w in ("cat", "dog", "fox") * 60))
    pretrain([str(corpus)], ModelConfig.preset("test", block_size=32),
             TrainConfig(out_dir=str(root / "run"), max_steps=24, batch_size=8, lr=3e-3, warmup_steps=2,
                         eval_interval=6, eval_iters=2, log_interval=3, progress=False, precision="fp32",
                         device="cpu"))
    return root / "run"


def test_report_of_a_real_training_run(real_run):
    rows = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    page_path, summary = write_report(real_run)
    evals = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
    assert summary["steps"] == 24 and summary["best_val_step"] == min(evals)[1]
    assert summary["final_train_loss"] == rows[-1]["train_loss"]
    assert summary["median_tokens_per_s"] > 0
    assert (summary["overfitting"] is not None) == (detect_overfitting(rows) is not None)
    page = page_path.read_text()
    assert len(images(page)) == 5 and "learning rate" in page.lower() and "Gradient norm" in page
    assert '"max_steps"' not in page and "max_steps" in page  # the train config is shown as a table


def test_cli_report(real_run, tmp_path):
    out = run_cli("report", str(real_run), "--out", str(tmp_path / "r.html"), "--png-dir", str(tmp_path / "png"))
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'r.html'}" in out.stdout and "steps 24" in out.stdout
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "gradient_norm.png", "learning_rate.png", "loss.png", "ppl.png", "throughput.png"]
    bad = run_cli("report", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("chatforge report: error: no metrics.jsonl in")


def test_bad_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n{"step": "x"}\n{"cut off": \n')
    with pytest.raises(ChatforgeError, match="has no records"):
        write_report(tmp_path)
    with pytest.raises(ChatforgeError, match="patience"):
        write_report(synthetic_run(tmp_path / "ok", turn=600), patience=0)
