"""Log-probabilities in OpenAI's shapes, from the engine's TokenLogprob records.

Chat: `choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
Completions: `choices[].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`, where each
top_logprobs entry is a dict token -> logprob holding the k most likely tokens and the chosen one
(so up to k + 1 entries, as OpenAI says), and `echo` puts the prompt's tokens first (the first with
null). A token is its text, or `bytes:\\xNN...` when its bytes are only part of a UTF-8 character (as
OpenAI writes them); `bytes` are always the raw bytes. `text_offset` counts characters of the returned
`text` (the echoed prompt included).

Streams write a choice's records chunk by chunk: `take(upto)` returns the records since the last call.
"""
from __future__ import annotations

import codecs
from typing import Any, Optional, Sequence

from chatforge.engine import Request, TokenLogprob


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """OpenAI's (token, bytes) for a token id: its UTF-8 text, or `bytes:\\xe4\\xb8` for part of a character."""
    data = tokenizer.token_bytes(token)
    try:
        return data.decode("utf-8"), list(data)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data)


class ChoiceLogprobs:
    """One choice's logprobs, written all at once or chunk by chunk as its text streams out."""

    def __init__(self, kind: str, tokenizer, request: Request, echo: bool = False) -> None:
        self.kind, self.tokenizer, self.request = kind, tokenizer, request
        self.sent = 0  # completion records already written
        self.echo = echo and kind != "chat"  # the prompt's records come first (completions only)
        self._prompt_due = self.echo
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0  # characters of the returned text before the next record (text_offset)
        self._names: dict[int, tuple[str, list[int]]] = {}

    def take(self, upto: Optional[int] = None) -> Optional[dict[str, Any]]:
        """The records from the last call up to record `upto` (all recorded so far when None), in the
        endpoint's shape; None when there is nothing new. Chat leaves out a final stop token, as its
        content does; completions keep it (its record ends the list, as OpenAI's and vLLM's do)."""
        records = self.request.logprobs or []
        end = len(records) if upto is None else upto
        if self.kind == "chat":
            end = min(end, len(self.request.tokens))
        new = records[self.sent:end]
        self.sent = max(self.sent, end)
        prompt: Sequence[Optional[TokenLogprob]] = ()
        if self._prompt_due and self.request.prompt_logprobs is not None:  # once the prompt is prefilled
            prompt, self._prompt_due = self.request.prompt_logprobs, False
        if not new and not prompt:
            return None
        if self.kind == "chat":
            return {"content": [self._chat_record(r) for r in new], "refusal": None}
        rows = [self._completion_record(r, token) for r, token in
                zip([*prompt, *new], [*self.request.prompt_ids[:len(prompt)], *(r.token for r in new)])]
        return {key: [row[i] for row in rows] for i, key in
                enumerate(("tokens", "token_logprobs", "top_logprobs", "text_offset"))}

    def _name(self, token: int) -> tuple[str, list[int]]:
        if token not in self._names:
            self._names[token] = token_text(self.tokenizer, token)
        return self._names[token]

    def _chat_record(self, record: TokenLogprob) -> dict[str, Any]:
        text, data = self._name(record.token)
        top = [{"token": self._name(t)[0], "logprob": lp, "bytes": self._name(t)[1]} for t, lp in record.top]
        return {"token": text, "logprob": record.logprob, "bytes": data, "top_logprobs": top}

    def _completion_record(self, record: Optional[TokenLogprob], token: int) -> tuple:
        text = self._name(token)[0]
        offset = self._chars
        self._chars += len(self._decoder.decode(self.tokenizer.token_bytes(token)))
        if record is None:  # the prompt's first token: nothing before it to predict it
            return text, None, None, offset
        top = {self._name(t)[0]: lp for t, lp in record.top}
        top.setdefault(text, record.logprob)
        return text, record.logprob, top, offset
