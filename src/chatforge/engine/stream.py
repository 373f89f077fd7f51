"""Token ids in, text that is safe to show out.

Two things make streaming harder than decoding once at the end:

* a character can take several tokens (byte-level BPE, or the `<0xE4><0xB8><0xAD>` byte
  fallback tokens of the char tokenizer), and half of it decodes to U+FFFD;
* a stop string can take several tokens, and once a piece of text is shown it cannot be
  taken back.

So text goes through two holding stages: IncrementalDecoder releases only whole
characters, StopStrings releases only text that can no longer become part of a stop
string. `generate()` builds its text with the same TextTracker as `stream()`, so the
streamed pieces always add up to the non-streamed text.
"""
from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"  # what a decoder makes of an unfinished UTF-8 sequence


class IncrementalDecoder:
    """Decodes a short window of recent tokens and releases only what the newest tokens added.

    The window starts at the previous release, so tokenizers whose decoding depends on the
    token before (SentencePiece's leading spaces) come out right; while the window ends in
    U+FFFD the character is unfinished and everything is held. Works with any tokenizer
    that has a `decode(ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first token of the decoding window
        self._read = 0  # tokens before this one have been released
        self._released = ""  # decoded text of ids[_start:_read]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self._start:])
        if text.endswith(REPLACEMENT):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """At the end: whatever is held, unfinished characters included (as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        return self._release(self._decode(self.ids[self._start:]))

    def _release(self, text: str) -> str:
        piece = text[len(self._released):]
        self._start, self._read = self._read, len(self.ids)
        self._released = self._decode(self.ids[self._start:self._read])
        return piece


class StopStrings:
    """Holds back text that could still turn into a stop string; says when one is complete."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text now safe to show, whether a stop string was completed).

        On a stop the text before it is returned and the stop string and anything after
        it are dropped.
        """
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = len(self.pending) - self._partial_length()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial_length(self) -> int:
        """Length of the longest end of the pending text that some stop string starts with."""
        for n in range(min(len(self.pending), self._longest - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end: held text was not a stop string after all."""
        out, self.pending = self.pending, ""
        return out


class TextTracker:
    """One request's text: whole characters only, stop strings held back and cut off."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = False):
        self._decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
        self._stops = StopStrings(stop)
        self._parts: list[str] = []
        self.stopped = False  # a stop string was completed

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to show."""
        if self.stopped:
            return ""
        piece, self.stopped = self._stops.push(self._decoder.push(token_id))
        self._parts.append(piece)
        return piece

    def finish(self) -> str:
        """No more tokens: release everything still held (unless it completes a stop string)."""
        if self.stopped:
            return ""
        piece, self.stopped = self._stops.push(self._decoder.flush())
        if not self.stopped:
            piece += self._stops.flush()
        self._parts.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._parts)
