"""What every explanation shares: readable token labels, the check of the ids it reads (the
engine's check_prompt), one forward pass that keeps the attention weights, and picking layers.
Figures are drawn with chatforge.figures."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from chatforge.engine.prompt import check_prompt
from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer

# visible stand-ins for characters that would otherwise vanish from an axis label
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTES = _byte_level_alphabet()


def display_token(tokenizer: Tokenizer, token_id: int) -> str:
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


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """display_token of each id."""
    return [display_token(tokenizer, i) for i in ids]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def check_ids(model: torch.nn.Module, ids: Sequence[int]) -> list[int]:
    """Token ids as a plain list, refused (check_prompt) unless one forward pass of the model can read them all."""
    return check_prompt(ids, model.config, room=0, what="text")


@torch.no_grad()
def forward_with_attention(model: torch.nn.Module, ids: Sequence[int], token_type_ids: Optional[Sequence[int]] = None,
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
