"""Training records: metrics.jsonl (one JSON object per logged step) and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatforge.figures import pyplot, save_figure
from chatforge.utils import atomic_write_text


class MetricsLog:
    """Appends one JSON line per record to `path`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
        return rows

    def truncate_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run writes them again."""
        if self.path.is_file():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "", metric: str | None = None) -> None:
    """Train and validation loss against step (and, beside them, the validation `metric`), as a PNG."""
    plt = pyplot()
    rows = MetricsLog(metrics_path).read()
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    scores = [(r["step"], r[metric]) for r in rows if metric and r.get(metric) is not None]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if scores:
        side = axes[0][1]
        side.plot(*zip(*scores), "o-", color="tab:green", markersize=3)
        side.set_xlabel("step")
        side.set_ylabel(f"validation {metric}")
        side.grid(alpha=0.3)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
