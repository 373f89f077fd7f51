"""Chat templates: messages -> the exact text (and tokens) a model was trained to read.

Templates are Jinja strings stored with the tokenizer (Hugging Face's `chat_template`
convention, with `add_generation_prompt`). chatforge's own models use ChatML; a base
model without a template gets the plain-text FALLBACK_TEMPLATE below.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatforge.data.chats import validate_messages
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer

# stands in for message i while locating message text in a rendered template (private-use characters)
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For base models that were never taught a chat format: a transcript they can continue.
# The reply ends where the model starts a new "User:" line.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
FALLBACK_STOPS = ["\nUser:", "\nAssistant:"]


_TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # what tool calling adds to a message (chat/tools.py)


def _checked(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """validate_messages, keeping what tool calling adds for templates that render it: role "tool" and
    the keys tool_calls, tool_call_id and name."""
    if not any(m.get("role") == "tool" or any(k in m for k in _TOOL_KEYS) for m in messages if isinstance(m, dict)):
        return validate_messages(messages)
    plain = validate_messages([{**m, "role": "user"} if m.get("role") == "tool" else m for m in messages])
    return [{**p, **{k: m[k] for k in _TOOL_KEYS if m.get(k) is not None}, "role": m["role"]}
            for p, m in zip(plain, messages)]


def _raise(message: str) -> None:
    raise ChatforgeError(f"chat template: {message}")


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatforgeError(f"the chat template is not valid Jinja: {e}") from None


@dataclass
class ChatFormat:
    """A tokenizer's way of writing conversations: template, stop strings and end-of-turn ids."""

    tokenizer: Tokenizer
    template: str
    stop: list[str]
    is_fallback: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> "ChatFormat":
        if tokenizer.chat_template:
            return cls(tokenizer, tokenizer.chat_template, [])
        return cls(tokenizer, FALLBACK_TEMPLATE, list(FALLBACK_STOPS), is_fallback=True)

    @property
    def renders_tools(self) -> bool:
        """Whether the template writes tool definitions and calls itself (it reads the `tools` variable)."""
        return re.search(r"\btools\b", self.template) is not None

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.token_id(r) for r in ("im_end", "eos")]
        return [i for i in ids if i is not None]

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Optional[list[dict]] = None) -> str:
        """The conversation as text; `tools` (OpenAI's function list) for a template that renders_tools."""
        tok = self.tokenizer
        messages = _checked(messages) if messages else []
        extra = {"tools": tools} if tools else {}
        try:
            return _compile(self.template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tok.special.get("bos", ""), eos_token=tok.special.get("eos", ""), **extra)
        except TemplateError as e:
            raise ChatforgeError(f"the chat template failed to render: {e}") from None

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Optional[list[dict]] = None) -> list[int]:
        """Token ids of the rendered conversation; template specials are parsed, message text is not.

        So a message that types "<|im_end|>" cannot forge an end of turn. Each message's text is
        located by rendering again with a unique marker in its place (searching for the content
        itself would find a short message such as "user" inside the template's own text).
        """
        messages = _checked(messages) if messages else []
        text = self.render(messages, add_generation_prompt, tools)
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        parts = _MARK_RE.split(self.render(marked, add_generation_prompt, tools))  # text, index, text, index, ...
        if "".join(messages[int(p)]["content"] if k % 2 else p for k, p in enumerate(parts)) != text:
            return self.tokenizer.encode(text, allow_special=True)  # a template that rewrites content
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids += self.tokenizer.encode(messages[int(part)]["content"])
            elif part:
                ids += self.tokenizer.encode(part, allow_special=True)
        return ids

    def fit(self, messages: Sequence[dict[str, Any]], budget: int,
            tools: Optional[list[dict]] = None) -> tuple[list[dict[str, str]], int]:
        """Drop the oldest turns (never the system prompt nor the last message) until the prompt fits.

        Returns the messages kept and how many were dropped; callers must report a non-zero count.
        """
        kept = _checked(messages)
        dropped = 0
        while len(self.encode(kept, tools=tools)) > budget:
            first = 1 if kept[0]["role"] == "system" else 0
            if len(kept) - first <= 1:
                n = len(self.encode(kept, tools=tools))
                raise ChatforgeError(f"the last message alone is {n} tokens, more than the {budget} tokens "
                                     "of context available; shorten it")
            del kept[first]
            dropped += 1
            # keep the conversation starting on a user turn
            while len(kept) - first > 1 and kept[first]["role"] == "assistant":
                del kept[first]
                dropped += 1
        return kept, dropped

    def encode_for_training(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Token ids and a loss mask that is 1 exactly on assistant tokens and their end-of-turn.

        Each assistant reply's span is found by rendering the conversation up to the reply
        (with the generation prompt) and up to its end, so any template works.
        """
        messages = validate_messages(messages)
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.encode(messages[:i], add_generation_prompt=True)
            full = self.encode(messages[: i + 1], add_generation_prompt=False)
            if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                raise ChatforgeError("the chat template does not render conversations incrementally; "
                                     "it cannot be used for chat fine-tuning")
            mask += [0] * (len(prefix) - len(ids))
            reply = full[len(prefix):]
            # the reply's tokens up to and including its end-of-turn are learned; what the
            # template writes after it (e.g. a newline) is not
            end = len(reply)
            stops = set(self.stop_token_ids)
            for j, t in enumerate(reply):
                if t in stops:
                    end = j + 1
                    break
            mask += [1] * end + [0] * (len(reply) - end)
            ids = full
        if not ids:
            raise ChatforgeError("the conversation has no assistant message to learn from")
        return ids, mask

