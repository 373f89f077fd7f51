"""Figures for people to look at: matplotlib without a display, PNGs written atomically or embedded
as base64 in self-contained HTML. Training plots its loss curve, explain its heatmaps, report its page."""
from __future__ import annotations

import base64
import io
from pathlib import Path

from chatforge.utils import atomic_write_bytes

# fonts with Chinese, Japanese and Korean glyphs, used for token labels when one is installed
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei",
             "PingFang SC", "Heiti SC", "SimHei")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), falling back to a CJK font if one exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    plt.rcParams["font.family"] = ["DejaVu Sans", *(f for f in CJK_FONTS if f in installed)]
    return plt


def figure_png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as a PNG atomically (a crash never leaves half an image); returns the path."""
    path = Path(path)
    atomic_write_bytes(path, figure_png(fig, dpi))
    return path


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
