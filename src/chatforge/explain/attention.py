"""Attention maps: which earlier tokens each token looks at, as heatmaps with the tokens on both axes.

    explain_attention(model, tok, "The cat sat on the mat", out_png="attn.png")     # last layer, mean of heads
    explain_attention(model, tok, text, layer=0, head=2, out_png="l0h2.png")        # one head
    explain_attention(model, tok, text, layer=0, grid=True, out_png="l0_heads.png") # every head of a layer
    maps = attention_maps(model, ids)    # per layer (H, T, T): row = query, column = key; rows sum to 1
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.explain.common import forward_with_attention, pick_layer, token_labels
from chatforge.figures import pyplot, save_figure

MAX_LABELLED = 96  # beyond this many tokens only every k-th one gets a tick label


def attention_maps(model, ids: Sequence[int], token_type_ids: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Per-layer (n_head, T, T) attention weights of one sequence: row = query, column = key; rows sum to 1."""
    _, attn = forward_with_attention(model, ids, token_type_ids, logits="none")
    return attn


def select_map(attn: list[torch.Tensor], layer: Optional[int] = None, head: Optional[int] = None
               ) -> tuple[torch.Tensor, str]:
    """One (T, T) map and its title: layer None = the last; head None = the mean over heads."""
    li = pick_layer(len(attn), layer)
    weights = attn[li]
    n_head = weights.shape[0]
    if head is None:
        return weights.mean(0), f"layer {li}, mean of {n_head} heads"
    if not -n_head <= head < n_head:
        raise ChatforgeError(f"head {head} does not exist: layer {li} has {n_head} heads (0..{n_head - 1})")
    return weights[head % n_head], f"layer {li}, head {head % n_head}"


def _ticks(ax, labels: Sequence[str], x: bool = True, y: bool = True) -> None:
    step = max(1, math.ceil(len(labels) / MAX_LABELLED))
    pos = list(range(0, len(labels), step))
    shown = [labels[i] for i in pos]
    font = 9 if len(labels) <= 40 else 7
    if x:
        ax.set_xticks(pos, shown, rotation=90, fontsize=font)
    else:
        ax.set_xticks([])
    if y:
        ax.set_yticks(pos, shown, fontsize=font)
    else:
        ax.set_yticks([])


def _draw(ax, weights: torch.Tensor, causal: bool):
    data = weights.numpy().astype(np.float64)
    if causal:  # keys after the query are never seen: leave them blank rather than a misleading 0
        data = np.ma.masked_where(np.triu(np.ones_like(data, dtype=bool), k=1), data)
    return ax.imshow(data, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6),
                     interpolation="nearest", aspect="equal")


def plot_attention(weights: torch.Tensor, labels: Sequence[str], title: str = "", causal: bool = True):
    """A heatmap figure of one (T, T) attention map, queries down the side, keys along the bottom."""
    plt = pyplot()
    T = len(labels)
    side = min(4.0 + 0.26 * T, 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = _draw(ax, weights, causal)
    _ticks(ax, labels)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query (attending token)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return fig


def plot_heads(layer_weights: torch.Tensor, labels: Sequence[str], title: str = "", causal: bool = True):
    """A grid of every head of one layer ((H, T, T) weights), token labels on the outer axes."""
    plt = pyplot()
    H, T = layer_weights.shape[0], len(labels)
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    cell = min(2.5 + 0.17 * T, 12.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        _draw(ax, layer_weights[h], causal)
        _ticks(ax, labels, x=h // cols == rows - 1 or h + cols >= H, y=h % cols == 0)
        ax.set_title(f"head {h}", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_figure(attn: list[torch.Tensor], labels: Sequence[str], *, causal: bool = True,
                     layer: Optional[int] = None, head: Optional[int] = None, grid: bool = False):
    """The figure for per-layer (H, T, T) maps: one layer's head (or mean of heads), or every head as a grid."""
    if grid:
        li = pick_layer(len(attn), layer)
        return plot_heads(attn[li], labels, f"layer {li}: every head", causal)
    weights, title = select_map(attn, layer, head)
    return plot_attention(weights, labels, title, causal)


def encoder_input(model, tokenizer, text: str) -> list[int]:
    """Token ids of `text` the way the model reads it: [CLS] text [SEP] for an encoder that has them."""
    ids = tokenizer.encode(text)
    cls, sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
    if not model.config.causal and cls is not None and sep is not None:
        ids = [cls] + ids + [sep]
    return ids


def explain_attention(model, tokenizer, text: str, *, layer: Optional[int] = None, head: Optional[int] = None,
                      out_png: str | Path = "attention.png", grid: bool = False) -> Path:
    """Render the attention of `text` as a heatmap PNG (tokens on both axes); returns its path.

    layer: which layer (negative counts from the end; None = the last).
    head: one head, or None for the mean over the layer's heads.
    grid: instead, one small heatmap per head of the layer.
    """
    ids = encoder_input(model, tokenizer, text)
    fig = attention_figure(attention_maps(model, ids), token_labels(tokenizer, ids), causal=model.config.causal,
                           layer=layer, head=head, grid=grid)
    return save_figure(fig, out_png)
