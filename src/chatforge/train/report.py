"""Training diagnostics: one self-contained HTML page per run (`chatforge report RUN_DIR`).

Reads the trainer's metrics.jsonl (and train_config.json) and writes RUN_DIR/report.html with the
loss curves, learning rate, gradient norm and throughput as embedded PNGs, a summary table,
and a verdict on overfitting:

    Overfitting is flagged when the validation loss stays more than `tolerance` (2%) above its
    running minimum for `patience` (3) consecutive evaluations while the (smoothed) training
    loss is below what it was at that minimum. It began at the step of that minimum: the
    weights from there (best/) are the ones to keep.

The relative margin ignores evaluation noise; needing several evaluations in a row ignores one
unlucky batch; requiring training loss to keep falling tells overfitting (the model memorises)
from instability (both losses rise).
"""
from __future__ import annotations

import html
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from chatforge.errors import ChatforgeError
from chatforge.utils import atomic_write_bytes, atomic_write_text
from chatforge.train.metrics import MetricsLog
from chatforge.figures import figure_png, png_data_uri, pyplot

# fields the trainer writes on every log line; anything else numeric on evaluation rows is a metric
LOG_FIELDS = ("step", "train_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s", "val_loss")


@dataclass
class Overfitting:
    began_step: int  # the evaluation with the lowest validation loss before it rose
    first_rise_step: int  # the first evaluation above the margin
    detected_step: int  # the evaluation that completed `patience` in a row
    best_val_loss: float
    val_loss_at_detection: float
    train_loss_at_best: float  # smoothed
    train_loss_at_detection: float

    def sentence(self, tolerance: float, patience: int) -> str:
        rise = 100 * (self.val_loss_at_detection / self.best_val_loss - 1)
        return (f"It began at step {self.began_step}: validation loss reached its minimum "
                f"{self.best_val_loss:.4f} there, then stayed more than {100 * tolerance:g}% above it for "
                f"{patience} evaluations in a row (from step {self.first_rise_step}; {rise:+.1f}% at step "
                f"{self.detected_step}) while training loss kept falling ({self.train_loss_at_best:.4f} → "
                f"{self.train_loss_at_detection:.4f}).")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ChatforgeError(f"no metrics.jsonl in {run_dir}: point at a training run's output directory "
                             "(the --out-dir of `chatforge pretrain` / `finetune`)")
    try:
        records = MetricsLog(path).read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"cannot read {path} ({e})") from None
    rows = sorted((r for r in records if isinstance(r, dict) and _finite(r.get("step"))), key=lambda r: r["step"])
    if not rows:
        raise ChatforgeError(f"{path} has no records yet; train for at least one log interval first")
    return rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], float(r[key])) for r in rows if _finite(r.get(key))]


def smoothed_train(rows: list[dict[str, Any]], window: int = 3) -> dict[int, float]:
    """Training loss at each logged step, as the median of the last `window` log lines (spikes ignored)."""
    train = _series(rows, "train_loss")
    return {step: statistics.median(v for _, v in train[max(0, i - window + 1): i + 1])
            for i, (step, _) in enumerate(train)}


def detect_overfitting(rows: list[dict[str, Any]], tolerance: float = 0.02, patience: int = 3,
                       window: int = 3) -> Optional[Overfitting]:
    """The first stretch of `patience` evaluations with validation loss above (1 + tolerance) times its
    running minimum while smoothed training loss is below its value at that minimum; None if none."""
    if tolerance < 0 or patience < 1:
        raise ChatforgeError("the overfitting rule needs tolerance >= 0 and patience >= 1")
    train = smoothed_train(rows, window)
    evals = [(s, v) for s, v in _series(rows, "val_loss")]
    best_step, best_val, streak = None, math.inf, []
    for step, val in evals:
        if val < best_val:
            best_step, best_val, streak = step, val, []
            continue
        at_best, now = _train_at(train, best_step), _train_at(train, step)
        falling = at_best is not None and now is not None and now < at_best
        if val > best_val * (1 + tolerance) and falling:
            streak.append((step, val))
            if len(streak) >= patience:
                return Overfitting(int(best_step), int(streak[0][0]), int(step), best_val, val, at_best, now)
        else:
            streak = []
    return None


def _train_at(train: dict[int, float], step) -> Optional[float]:
    """Smoothed training loss at `step`, or at the last logged step before it."""
    earlier = [s for s in train if s <= step]
    return train[max(earlier)] if earlier else None


# --- figures --------------------------------------------------------------------------------------------

def _plot(series: dict[str, list[tuple[float, float]]], ylabel: str, title: str, *, log_y: bool = False,
          marks: Optional[dict[str, float]] = None, hline: Optional[tuple[float, str]] = None) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, points in series.items():
        if points:
            style = "o-" if len(points) < 60 and name.startswith("val") else "-"
            ax.plot(*zip(*points), style, label=name, markersize=3, linewidth=1.2)
    for label, step in (marks or {}).items():
        ax.axvline(step, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="tab:red", fontsize=8)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
    if log_y and all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len([s for s in series.values() if s]) > 1 or hline is not None:
        ax.legend(fontsize=8)
    return figure_png(fig, dpi=100)


def _figures(rows, overfit: Optional[Overfitting], config: dict[str, Any]) -> list[tuple[str, bytes]]:
    marks = {f"overfitting from step {overfit.began_step}": overfit.began_step} if overfit else None
    figs = [("Loss", _plot({"train": _series(rows, "train_loss"), "validation": _series(rows, "val_loss")},
                           "loss", "training and validation loss", marks=marks))]
    if _series(rows, "lr"):
        figs.append(("Learning rate", _plot({"lr": _series(rows, "lr")}, "learning rate", "learning-rate schedule")))
    if _series(rows, "grad_norm"):
        clip = config.get("grad_clip")
        figs.append(("Gradient norm", _plot({"grad norm": _series(rows, "grad_norm")}, "global L2 norm",
                                            "gradient norm (before clipping)", log_y=True,
                                            hline=(clip, f"clip at {clip:g}") if _finite(clip) and clip > 0 else None)))
    if _series(rows, "tokens_per_s"):
        figs.append(("Throughput", _plot({"tokens/s": _series(rows, "tokens_per_s")}, "tokens / s",
                                         "training throughput")))
    for key in _eval_metrics(rows):
        figs.append((key, _plot({f"val {key}": _series(rows, key)}, key, f"validation {key}")))
    return figs


def _eval_metrics(rows) -> list[str]:
    keys = []
    for r in rows:
        for k, v in r.items():
            if k not in LOG_FIELDS and k not in keys and _finite(v):
                keys.append(k)
    return keys


# --- the page ---------------------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]], overfit: Optional[Overfitting]) -> dict[str, Any]:
    last = rows[-1]
    val = _series(rows, "val_loss")
    speed = [v for _, v in _series(rows, "tokens_per_s")]
    best = min(val, key=lambda sv: sv[1]) if val else None
    return {
        "steps": int(last["step"]),
        "tokens": last.get("tokens"),
        "elapsed_s": last.get("elapsed_s"),
        "final_train_loss": next((v for _, v in reversed(_series(rows, "train_loss"))), None),
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": best[1] if best else None,
        "best_val_step": int(best[0]) if best else None,
        "median_tokens_per_s": statistics.median(speed) if speed else None,
        "overfitting": asdict(overfit) if overfit else None,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return html.escape(str(value))


def _table(pairs) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs) + \
        "</table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{padding:3px 12px;border-bottom:1px solid #ddd;text-align:left}
th{font-weight:600;color:#555}.verdict{padding:0.8em 1em;border-radius:6px;margin:1em 0}
.bad{background:#fdecea;border-left:5px solid #d93025}.good{background:#e6f4ea;border-left:5px solid #188038}
img{max-width:100%;display:block;margin:0.5em 0 1.5em}.muted{color:#777;font-size:0.9em}"""


def render_report(rows: list[dict[str, Any]], config: dict[str, Any], title: str = "training run", *,
                  tolerance: float = 0.02, patience: int = 3) -> tuple[str, dict[str, Any], list[tuple[str, bytes]]]:
    """(HTML page, summary dict, [(figure name, PNG bytes)]) for these metrics records and train config."""
    overfit = detect_overfitting(rows, tolerance, patience)
    summary = summarize(rows, overfit)
    if overfit:
        verdict = (f'<div class="verdict bad"><b>Overfitting detected.</b> {html.escape(overfit.sentence(tolerance, patience))} '
                   f"Keep the weights from step {overfit.began_step} (the run's <code>best/</code> checkpoint), and "
                   "for the next run add data, raise dropout or weight decay, or stop earlier "
                   "(<code>--patience</code>).</div>")
    elif summary["best_val_loss"] is None:
        verdict = '<div class="verdict good">No validation loss was logged, so overfitting cannot be judged.</div>'
    else:
        verdict = (f'<div class="verdict good">No overfitting detected (rule: validation loss more than '
                   f"{100 * tolerance:g}% above its minimum for {patience} evaluations in a row while training "
                   "loss falls).</div>")
    rows_table = [("steps", summary["steps"]), ("tokens seen", summary["tokens"]),
                  ("elapsed (s)", summary["elapsed_s"]), ("final train loss", summary["final_train_loss"]),
                  ("final validation loss", summary["final_val_loss"]),
                  ("best validation loss", summary["best_val_loss"]), ("at step", summary["best_val_step"]),
                  ("median tokens/s", summary["median_tokens_per_s"])]
    figures = _figures(rows, overfit, config)
    images = "".join(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='{png_data_uri(png)}'>"
                     for name, png in figures)
    config_html = f"<h2>Training config</h2>{_table(sorted(config.items()))}" if config else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} – chatforge report"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='muted'>chatforge training report, written {time.strftime('%Y-%m-%d %H:%M')}</p>"
            f"{verdict}<h2>Summary</h2>{_table(rows_table)}<h2>Curves</h2>{images}{config_html}</body></html>")
    return page, summary, figures


def write_report(run_dir: str | Path, out: Optional[str | Path] = None, *, tolerance: float = 0.02,
                 patience: int = 3, png_dir: Optional[str | Path] = None) -> tuple[Path, dict[str, Any]]:
    """Write RUN_DIR/report.html (or `out`) from the run's metrics.jsonl and train_config.json, and with
    png_dir every figure as a PNG there too (loss.png, learning_rate.png, ...); returns the page's path
    and the summary (see summarize)."""
    rows = read_metrics(run_dir)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent  # a metrics file was named
    config: dict[str, Any] = {}
    config_path = run_dir / "train_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{config_path} is not valid JSON ({e})") from None
    page, summary, figures = render_report(rows, config, title=run_dir.resolve().name, tolerance=tolerance,
                                           patience=patience)
    out = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(out, page)
    for name, png in figures if png_dir is not None else ():
        atomic_write_bytes(Path(png_dir) / (name.lower().replace(" ", "_").replace("/", "_") + ".png"), png)
    return out, summary
