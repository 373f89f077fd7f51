"""Input attribution: how much each input token pushed one decision (a classifier's label, or the
next words of a language model), shown as coloured tokens.

    a = attribute_text(classifier, tok, "WINNER!! Claim your free prize now")   # the predicted label
    a = attribute_text(lm, tok, "The capital of France is", target=" Paris")   # a chosen continuation
    Path("why.html").write_text(a.html_page()); a.save_png("why.png")

Two methods:
- "grad_x_input": the gradient of the decision's log-probability with respect to each token embedding,
  dotted with that embedding (signed: red pushed towards the decision, blue against it);
- "rollout": attention rollout (Abnar & Zuidema, 2020): each layer's heads-averaged attention, plus the
  identity for the residual path, multiplied through the layers; the row of the position the decision
  is read from says how much of each input token flowed there (unsigned).
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from chatforge.errors import ChatforgeError
from chatforge.explain.common import check_ids, display_token, forward_with_attention, model_device
from chatforge.figures import pyplot, save_figure

METHODS = ("grad_x_input", "rollout")
Target = Union[int, str, None]
_RED, _BLUE = (220, 38, 38), (37, 99, 235)


@dataclass
class Attribution:
    ids: list[int]
    pieces: list[str]  # each token's own text (for the coloured HTML)
    labels: list[str]  # each token as a readable label (␣ for spaces)
    scores: list[float]
    target: str  # the label or continuation explained
    prob: float  # the model's probability of it
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "prob": self.prob, "method": self.method,
                "tokens": [{"token": t, "id": i, "score": s} for t, i, s in zip(self.labels, self.ids, self.scores)]}

    def _strength(self, score: float) -> float:
        return abs(score) / (max(abs(s) for s in self.scores) or 1.0)

    def html(self) -> str:
        """The text as <span>s shaded by score (red +, blue -); hovering one shows its score."""
        spans = [f'<span style="background:rgba{(*(_RED if s >= 0 else _BLUE), round(self._strength(s), 3))}" '
                 f'title="{html.escape(label)}: {s:+.4f}">{html.escape(piece)}</span>'
                 for piece, label, s in zip(self.pieces, self.labels, self.scores)]
        return '<div style="white-space:pre-wrap;font-family:monospace;line-height:1.8">' + "".join(spans) + "</div>"

    def html_page(self) -> str:
        return (f"<!doctype html><meta charset='utf-8'><title>attribution</title>"
                f"<body style='font-family:sans-serif;max-width:900px;margin:2em auto'>"
                f"<h3>Why &ldquo;{html.escape(self.target)}&rdquo; (p = {self.prob:.3g})</h3>"
                f"<p>{html.escape(self.method)}: red tokens pushed towards it, blue against it.</p>"
                f"{self.html()}</body>")

    def save_png(self, path: str | Path) -> Path:
        """A bar per token, the token labels shaded like the HTML."""
        plt = pyplot()
        n = len(self.scores)
        fig, ax = plt.subplots(figsize=(min(2.0 + 0.32 * n, 40.0), 3.6))
        ax.bar(range(n), self.scores, color=["tab:red" if s >= 0 else "tab:blue" for s in self.scores])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(n), self.labels, rotation=90, fontsize=9)
        for label, s in zip(ax.get_xticklabels(), self.scores):
            rgb = [c / 255 for c in (_RED if s >= 0 else _BLUE)]
            label.set_bbox(dict(facecolor=(*rgb, self._strength(s)), edgecolor="none", pad=1.5))
        ax.set_title(f"{self.method} for “{self.target}” (p = {self.prob:.3g})", fontsize=10)
        ax.set_ylabel("attribution")
        return save_figure(fig, path)


# --- the decision being explained ------------------------------------------------------------------

LogProb = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _is_classifier(model) -> bool:
    return model.config.task == "classify"


def _label_names(model) -> list[str]:
    return model.config.labels or [str(i) for i in range(model.config.num_labels)]


def _class_logprobs(model, x: torch.Tensor, types: Optional[torch.Tensor]) -> torch.Tensor:
    return model(x, token_type_ids=types, logits="classify")[0].float().log_softmax(-1)


def _next_logprobs(model, tokenizer, x: torch.Tensor) -> torch.Tensor:
    """(T, V) next-token log-probabilities over the tokens the tokenizer can produce."""
    logits = model(x)[0].float()
    vocab = min(tokenizer.vocab_size, logits.shape[-1])
    logits = torch.cat([logits[:, :vocab], torch.full_like(logits[:, vocab:], float("-inf"))], dim=-1)
    return logits.log_softmax(-1)


def decision(model, tokenizer, ids: list[int], target: Target, types: Optional[torch.Tensor] = None
             ) -> tuple[str, float, LogProb]:
    """(name, probability, f) of the decision to explain; f(ids (1, T), token types) is its log-probability.

    Classifier: a label (name or index; None = the predicted one). Language model: the next token (an id;
    None = the most likely) or a continuation (text), whose log-probability sums over its tokens.
    """
    device = model_device(model)
    x = torch.tensor([ids], device=device)
    if _is_classifier(model):
        names = _label_names(model)
        if target is None:
            with torch.no_grad():
                index = int(_class_logprobs(model, x, types).argmax())
        elif isinstance(target, str):
            if target not in names:
                raise ChatforgeError(f"unknown label {target!r}; this classifier's labels are: {', '.join(names)}")
            index = names.index(target)
        elif 0 <= target < len(names):
            index = target
        else:
            raise ChatforgeError(f"label {target} is out of range (0..{len(names) - 1})")

        def f(x: torch.Tensor, types: Optional[torch.Tensor]) -> torch.Tensor:
            return _class_logprobs(model, x, types)[index]

        name = names[index]
    else:
        if isinstance(target, str):
            cont = tokenizer.encode(target)
            if not cont:
                raise ChatforgeError("the target text is empty; name the next token or words to explain")
        elif target is None:
            with torch.no_grad():
                cont = [int(_next_logprobs(model, tokenizer, x)[-1].argmax())]
        else:
            cont = [int(target)]
        check_ids(model, ids + cont[:-1])
        cont_t = torch.tensor(cont, device=device)

        def f(x: torch.Tensor, types: Optional[torch.Tensor]) -> torch.Tensor:
            logp = _next_logprobs(model, tokenizer, torch.cat([x, cont_t[None, :-1]], dim=1))[x.shape[1] - 1:]
            return logp.gather(-1, cont_t[:, None]).sum()

        name = tokenizer.decode(cont)
    with torch.no_grad():
        prob = float(f(x, types).exp())
    return name, prob, f


# --- the two methods -------------------------------------------------------------------------------------

def grad_x_input(model, ids: Sequence[int], f: LogProb, types: Optional[torch.Tensor] = None) -> list[float]:
    """Per token: (gradient of f with respect to its embedding) · (its embedding)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, out):  # make the embedding output a leaf we can take the gradient at
        leaf = out.detach().float().requires_grad_(True)
        captured.append(leaf)
        return leaf.to(out.dtype)

    handle = model.wte.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(f(torch.tensor([list(ids)], device=model_device(model)), types),
                                          captured[0])
    finally:
        handle.remove()
        model.train(was_training)
    # f may run the model on a longer sequence (a continuation): keep the input's positions
    return (grad[0] * captured[0][0].detach()).sum(-1)[: len(ids)].cpu().tolist()


def attention_rollout(attn: list[torch.Tensor]) -> torch.Tensor:
    """(T, T) rollout: row i = how much of each input token reaches position i through all the layers."""
    eye = torch.eye(attn[0].shape[-1])
    rollout = eye
    for layer in attn:
        a = 0.5 * layer.mean(0) + 0.5 * eye  # the residual connection carries half
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout


def _read_row(model, rollout: torch.Tensor) -> torch.Tensor:
    """The rollout row of the vector the decision is read from: the first token for [CLS] pooling,
    the mean of all rows for mean pooling, else the last position."""
    pooling = model.config.pooling if _is_classifier(model) else "last"
    if pooling == "cls":
        return rollout[0]
    return rollout.mean(0) if pooling == "mean" else rollout[-1]


def input_attribution(model, tokenizer, ids: Sequence[int], *, target: Target = None, method: str = "grad_x_input",
                      token_type_ids: Optional[Sequence[int]] = None) -> Attribution:
    """Attribution of one decision (see `decision` for `target`) to the input tokens `ids`."""
    if method not in METHODS:
        raise ChatforgeError(f"unknown attribution method {method!r}; choose {' or '.join(METHODS)}")
    ids = check_ids(model, ids)
    types = None if token_type_ids is None else torch.tensor([list(token_type_ids)], device=model_device(model))
    name, prob, f = decision(model, tokenizer, ids, target, types)
    if method == "grad_x_input":
        scores = grad_x_input(model, ids, f, types)
    else:
        _, attn = forward_with_attention(model, ids, token_type_ids, logits="none")
        scores = _read_row(model, attention_rollout(attn)).tolist()
    return Attribution(ids, [tokenizer.decode([i]) for i in ids], [display_token(tokenizer, i) for i in ids],
                       [float(s) for s in scores], name, prob, method)


def attribute_text(model, tokenizer, text: str, *, target: Target = None, method: str = "grad_x_input",
                   text_pair: Optional[str] = None) -> Attribution:
    """input_attribution for text, laid out the way the model reads it ([CLS] ... [SEP] for encoder
    classifiers, a final end-of-text token for decoder classifiers, the bare text for language models)."""
    if _is_classifier(model):
        from chatforge.data.tables import encode_examples

        [(ids, types)] = encode_examples(tokenizer, model.config, [text], None if text_pair is None else [text_pair],
                                         model.config.block_size)
        return input_attribution(model, tokenizer, ids, target=target, method=method, token_type_ids=types)
    return input_attribution(model, tokenizer, tokenizer.encode(text), target=target, method=method)
