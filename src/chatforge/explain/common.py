"""What every explanation shares: readable token labels, one forward pass that keeps the
attention weights, (figures: chatforge.figures)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from chatforge.errors import ChatforgeError

# visible stand-ins for characters that would otherwise vanish from an axis label
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTES = _byte_level_alphabet()


def display_token(tokenizer, token_id: int) -> str:
    """One token as a short readable label: spaces as ␣, newlines as ↵, tabs as ⇥.

    A byte-level token that holds only part of a UTF-8 character (which decodes to U+FFFD) shows
    its bytes instead, e.g. ␣\xe6, so every token keeps a distinct, honest label.
    """
    text = tokenizer.decode([int(token_id)])
    if not text or "\ufffd" in text:
        piece = tokenizer.id_to_token(int(token_id)) or f"<{int(token_id)}>"
        if all(ch in _BYTES for ch in piece):
            piece = bytes(_BYTES[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
        text = piece
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    return [display_token(tokenizer, i) for i in ids]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_ids(model, ids: Sequence[int]) -> list[int]:
    """Token ids as a plain list, refused with a clear message when the model cannot read them."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ChatforgeError("the text is empty: there is nothing to explain")
    if len(ids) > model.config.block_size:
        raise ChatforgeError(f"the text is {len(ids)} tokens but the model's context is {model.config.block_size}; "
                             "shorten it")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise ChatforgeError(f"token id {bad[0]} is outside the model's vocabulary (0..{model.config.vocab_size - 1})")
    return ids


@torch.no_grad()
def forward_with_attention(model, ids: Sequence[int], token_type_ids: Optional[Sequence[int]] = None,
                           logits: str = "all") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output of one sequence, [per-layer (H, T, T) fp32 attention weights]) on the CPU.

    The model's explicit attention path runs only here, never in the engine's normal generation.
    """
    model.eval()
    ids = check_ids(model, ids)
    device = model_device(model)
    x = torch.tensor([ids], device=device)
    types = None if token_type_ids is None else torch.tensor([list(token_type_ids)], device=device)
    out, attn = model(x, token_type_ids=types, logits=logits, return_attention=True)
    return out[0].float().cpu(), [a[0].float().cpu() for a in attn]


def average_attention(attn: list[torch.Tensor], layers: str | int = "last") -> torch.Tensor:
    """(T, S) attention averaged over heads: of the last layer, of one layer, or of all layers."""
    if layers == "all":
        return torch.stack([a.mean(0) for a in attn]).mean(0)
    if layers == "last":
        return attn[-1].mean(0)
    return attn[pick_layer(len(attn), layers)].mean(0)


def pick_layer(n_layer: int, layer: Optional[int]) -> int:
    """A layer index (negative counts from the end; None = the last layer), or a clear error."""
    if layer is None:
        return n_layer - 1
    if not -n_layer <= layer < n_layer:
        raise ChatforgeError(f"layer {layer} does not exist: the model has {n_layer} layers (0..{n_layer - 1})")
    return layer % n_layer
