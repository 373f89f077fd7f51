"""What a model can read: the one check of a prompt's token ids, and what an empty prompt starts from.

Every interface that hands token ids to a model (the engine's requests, the server's completions,
the explanations' forward passes) checks them here, so a prompt is refused the same way everywhere:
empty, outside the model's vocabulary, or too long for its context.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.tokenizer import Tokenizer


class PromptTooLongError(ChatforgeError):
    """The prompt leaves no room in the model's context to generate anything."""


def check_prompt(ids: Sequence[int], config: ModelConfig, *, room: int = 1, what: str = "prompt") -> list[int]:
    """`ids` as a plain list of ints, or a ChatforgeError saying why the model cannot read them.

    room: the positions that must stay free after them (1 for generating at least one token; 0
    for a forward pass over the ids alone). `what` names the ids in the messages ("prompt", "text").
    Too long is a PromptTooLongError (the server answers it with code context_length_exceeded).
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ChatforgeError(f"the {what} is empty: give at least one token (e.g. the tokenizer's bos token)")
    vocab = config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ChatforgeError(f"{what} token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    context, n = config.block_size, len(ids)
    if n > context - room:
        why = ", leaving no room to generate" if room else ""
        raise PromptTooLongError(f"the {what} is {n} tokens but the model's context is {context} tokens{why}; "
                                 f"shorten the {what} to at most {context - room} tokens")
    return ids


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """The prompt of an empty text: the tokenizer's bos token (its eos where it has none), a fresh document."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise ChatforgeError("the prompt is empty and the tokenizer has no bos/eos token to start from; "
                             "pass some prompt text")
    return [start]
