"""Token-level explanations: for each token, how likely it was, what else the model considered,
what it looked at, and (logit lens) what each layer would already have predicted.

    g = explain_generation(model, tok, "Once upon a", max_new_tokens=10)   # generate through the engine, explained
    print(g.table())
    rows = inspect_reply(model, tok, prompt_ids, reply_ids)               # explain a finished reply (JSON-ready)
    lens = logit_lens(model, tok, tok.encode("The capital of France is"))
    print(lens.table()); lens.save_png("lens.png")

Probabilities are the model's own next-token distribution (softmax of the logits at temperature 1),
whatever sampling settings chose the token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.explain.common import (average_attention, check_ids, display_token, forward_with_attention,
                                    model_device, token_labels)
from chatforge.figures import pyplot, save_figure

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer

def next_token_probs(logits: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """Softmax over the tokens the tokenizer can produce (a model's vocabulary may be padded past it)."""
    logits = logits.float().clone()
    logits[..., min(tokenizer.vocab_size, logits.shape[-1]):] = float("-inf")
    return logits.softmax(-1)


def describe_token(tokenizer: Tokenizer, probs: torch.Tensor, attn_row: torch.Tensor, context: Sequence[int],
                   token: int, top_k: int = 5, top_attn: int = 5) -> dict[str, Any]:
    """One chosen token as a JSON-ready dict: see inspect_reply for the fields.

    probs: (V,) the distribution it was chosen from; attn_row: (len(context),) how much the predicting
    position attended to each token of `context` (everything before the chosen token).
    """
    alt_p, alt_i = probs.topk(min(top_k, probs.shape[-1]))
    att_w, att_i = attn_row[: len(context)].topk(min(top_attn, len(context)))
    return {
        "token": display_token(tokenizer, token),
        "text": tokenizer.decode([int(token)]),
        "id": int(token),
        "position": len(context),
        "prob": float(probs[token]),
        "rank": int((probs > probs[token]).sum()) + 1,
        "alternatives": [{"token": display_token(tokenizer, int(i)), "id": int(i), "prob": float(p)}
                         for p, i in zip(alt_p, alt_i)],
        "attended": [{"index": int(i), "token": display_token(tokenizer, context[int(i)]), "weight": float(w)}
                     for w, i in zip(att_w, att_i)],
    }


# --- a finished reply (the server's inspect endpoint) ------------------------------------------------

def inspect_reply(model: torch.nn.Module, tokenizer: Tokenizer, prompt_ids: Sequence[int], reply_ids: Sequence[int],
                  *, top_k: int = 5, top_attn: int = 5, attn_layers: str | int = "last") -> list[dict[str, Any]]:
    """Explain each token of a reply that followed `prompt_ids`, from one forward pass over both.

    Returns one JSON-serialisable dict per reply token:
        token         display label (spaces as ␣, newlines as ↵)      text   the token's own text
        id            token id                                         position  its index in prompt + reply
        prob          the model's probability of it (temperature 1)    rank   1 = it was the most likely token
        alternatives  [{token, id, prob}] the top_k most likely tokens at that point (the chosen one included)
        attended      [{index, token, weight}] the top_attn earlier tokens the predicting position attended to
                      most; index counts positions in prompt + reply (index >= len(prompt_ids): a reply token)
    attn_layers: "last" (mean over the last layer's heads), "all" (mean over every layer's) or a layer number.
    """
    prompt_ids, reply_ids = [int(i) for i in prompt_ids], [int(i) for i in reply_ids]
    if not prompt_ids:
        raise ChatforgeError("inspect needs at least one prompt token: the first reply token is predicted from it")
    if not reply_ids:
        return []
    ids = check_ids(model, prompt_ids + reply_ids)
    logits, attn = forward_with_attention(model, ids[:-1])  # the last token predicts nothing in the reply
    weights = average_attention(attn, attn_layers)
    probs = next_token_probs(logits, tokenizer)
    out = []
    for j, token in enumerate(reply_ids):
        pos = len(prompt_ids) - 1 + j  # the position whose output predicts reply token j
        out.append(describe_token(tokenizer, probs[pos], weights[pos], ids[: pos + 1], token, top_k, top_attn))
    return out


# --- a generation, explained ---------------------------------------------------------------------------

@dataclass
class ExplainedGeneration:
    """An engine generation with one describe_token() dict per generated token (a final stop token
    included, marked "stop": True); token_ids and text are exactly what Engine.generate returns."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    steps: list[dict[str, Any]]
    trace: list = field(default_factory=list, repr=False)  # the engine's StepTrace per step

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "steps": self.steps}

    def table(self, top_k: int = 3) -> str:
        """One line per generated token: probability, the runners-up, the most-attended earlier tokens."""
        lines = [f"{'#':>3}  {'token':<14}{'prob':>7}  {'alternatives':<44}attended"]
        for n, s in enumerate(self.steps):
            alts = ", ".join(f"{a['token']} {a['prob']:.2f}" for a in s["alternatives"][:top_k])
            att = ", ".join(f"{a['token']}@{a['index']} {a['weight']:.2f}" for a in s["attended"][:top_k])
            name = s["token"] + (" (stop)" if s.get("stop") else "")
            lines.append(f"{n:>3}  {name:<14}{s['prob']:>7.3f}  {alts:<44}{att}")
        return "\n".join(lines)

    def attention_maps(self) -> list[torch.Tensor]:
        """Per layer (H, N, N) attention over the prompt and every generated token fed back (all but the
        last), assembled from the engine's trace: the same maps one forward pass over them would give."""
        n = len(self.prompt_ids) + len(self.trace) - 1
        maps = []
        for layer in range(len(self.trace[0].attention)):
            full = torch.zeros(self.trace[0].attention[layer].shape[0], n, n)
            q = 0
            for step in self.trace:  # (H, rows this step fed, keys so far)
                rows = step.attention[layer]
                full[:, q: q + rows.shape[1], : rows.shape[2]] = rows
                q += rows.shape[1]
            maps.append(full)
        return maps


def explain_generation(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[int],
                       max_new_tokens: int = 20, *, alternatives: int = 5, top_attn: int = 5,
                       attn_layers: str | int = "last", **sampling: Any) -> ExplainedGeneration:
    """Generate through the engine with trace=True and describe every new token.

    sampling: GenerationConfig fields (temperature defaults to 0, greedy; seed, top_k, stop, ...).
    The tokens are the ones Engine.generate gives for the same settings; only the attention is
    computed explicitly (the slower path), so keep explanations to short texts.
    """
    from chatforge.engine import Engine, GenerationConfig

    engine = Engine(model, tokenizer)
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    config = GenerationConfig(**{"temperature": 0.0, **sampling, "max_new_tokens": max_new_tokens})
    [gen] = engine.generate(prompt_ids, config, trace=True)
    context = list(prompt_ids)
    steps = []
    for step in gen.trace:
        attn_row = average_attention([a[:, -1:] for a in step.attention], attn_layers)[0]
        described = describe_token(tokenizer, next_token_probs(step.logits, tokenizer), attn_row, context,
                                    step.token, alternatives, top_attn)
        if len(steps) == len(gen.token_ids):  # the one step past token_ids chose a stop token
            described["stop"] = True
        steps.append(described)
        context.append(step.token)
    return ExplainedGeneration(prompt_ids, gen.token_ids, gen.text, gen.finish_reason, steps, gen.trace)


# --- logit lens ---------------------------------------------------------------------------------------

@torch.no_grad()
def residual_stream(model: torch.nn.Module, ids: Sequence[int]) -> list[torch.Tensor]:
    """The (T, C) residual stream of one sequence before the first block and after each block
    (n_layer + 1 tensors), read with forward hooks: the model itself is unchanged."""
    ids = check_ids(model, ids)
    states: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda mod, args: states.append(args[0][0].detach()))]
    hooks += [b.register_forward_hook(lambda mod, args, out: states.append(out[0].detach())) for b in model.blocks]
    try:
        model.eval()
        model(torch.tensor([ids], device=model_device(model)), logits="none")
    finally:
        for h in hooks:
            h.remove()
    return states


@dataclass
class LogitLens:
    """What each layer's residual stream predicts when read by the final norm and output head."""

    ids: list[int]
    tokens: list[str]  # display labels of the input tokens
    layers: list[str]  # "embed", "layer 0", ..., "layer L-1" (the last is the model's own prediction)
    top_ids: np.ndarray  # (layers, T, k) most likely next tokens
    top_tokens: list[list[list[str]]]  # their labels, [layer][position][rank]
    top_probs: np.ndarray  # (layers, T, k)

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "tokens": self.tokens, "layers": self.layers, "top_ids": self.top_ids.tolist(),
                "top_tokens": self.top_tokens, "top_probs": self.top_probs.round(5).tolist()}

    def table(self, max_positions: int = 12) -> str:
        """Top-1 prediction and its probability, a row per layer (last layer first), a column per position."""
        cols = range(max(0, len(self.tokens) - max_positions), len(self.tokens))
        width = 12
        head = f"{'':<9}" + "".join(f"{self.tokens[c][:width - 1]:<{width}}" for c in cols)
        lines = [head, "-" * len(head)]
        for li in reversed(range(len(self.layers))):
            cells = [f"{self.top_tokens[li][c][0][:6]} {self.top_probs[li, c, 0]:.2f}" for c in cols]
            lines.append(f"{self.layers[li]:<9}" + "".join(f"{cell:<{width}}" for cell in cells))
        return "\n".join(lines)

    def save_png(self, path: str | Path, max_positions: int = 24) -> Path:
        return save_figure(plot_logit_lens(self, max_positions), path)


def logit_lens(model: torch.nn.Module, tokenizer: Tokenizer, ids: Sequence[int], top_k: int = 5) -> LogitLens:
    """Apply the final norm and output head to the residual stream after every layer (nostalgebraist's
    logit lens): where in the depth the model's prediction for each next token forms."""
    if model.config.task != "lm":
        raise ChatforgeError("the logit lens reads next-token predictions; this model is a classifier")
    ids = check_ids(model, ids)
    k = min(top_k, model.config.vocab_size)
    top_ids, top_probs = [], []
    with torch.no_grad():
        for h in residual_stream(model, ids):
            p, i = next_token_probs(model.lm_logits(model.norm_f(h)), tokenizer).cpu().topk(k, dim=-1)
            top_ids.append(i.numpy())
            top_probs.append(p.numpy())
    ids_arr = np.stack(top_ids)
    layers = ["embed"] + [f"layer {i}" for i in range(model.config.n_layer)]
    labels = [[[display_token(tokenizer, int(t)) for t in row] for row in layer] for layer in ids_arr]
    return LogitLens(ids, token_labels(tokenizer, ids), layers, ids_arr, labels, np.stack(top_probs))


def plot_logit_lens(lens: LogitLens, max_positions: int = 24) -> Any:
    """A layer-by-position grid: each cell names the top-1 prediction, coloured by its probability;
    an orange box marks cells whose prediction is the token that really comes next."""
    plt = pyplot()
    T = len(lens.tokens)
    cols = list(range(max(0, T - max_positions), T))
    L = len(lens.layers)
    probs = lens.top_probs[:, cols, 0]
    fig, ax = plt.subplots(figsize=(2.0 + 0.95 * len(cols), 1.2 + 0.42 * L))
    im = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for r in range(L):
        for j, c in enumerate(cols):
            ax.text(j, r, lens.top_tokens[r][c][0][:8], ha="center", va="center", fontsize=8,
                    color="white" if probs[r, j] > 0.55 else "black")
            if c + 1 < T and int(lens.top_ids[r, c, 0]) == lens.ids[c + 1]:
                ax.add_patch(plt.Rectangle((j - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="tab:orange", lw=1.6))
    ax.set_yticks(range(L), lens.layers, fontsize=9)
    ax.set_xticks(range(len(cols)), [lens.tokens[c] for c in cols], rotation=90, fontsize=9)
    ax.set_xlabel("input token (each column predicts the token after it)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(len(cols)), [lens.tokens[c + 1] if c + 1 < T else "" for c in cols], rotation=90, fontsize=9)
    top.set_xlabel("actual next token")
    ax.set_title("logit lens: top-1 prediction after each layer (orange box = the actual next token)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="probability of the top-1 token")
    return fig
