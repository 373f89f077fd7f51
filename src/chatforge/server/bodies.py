"""Request bodies read defensively: checked JSON before any model, tokenizer, engine or SQLite sees it.

json.loads accepts what nothing downstream can hold: `\\ud800` escapes decode to lone surrogates
(the tokenizer and SQLite refuse them), NaN and Infinity, integers of any size, and nesting deep
enough to exhaust the stack. read_json refuses each with a 400 whose `param` names the field
(`messages.0.content`, as pydantic's errors do), so every later layer can trust its input's shape.
"""
from __future__ import annotations

import json
import math
from typing import Any

from chatforge.server.errors import APIError

MAX_DEPTH = 64  # objects and arrays inside one another; a JSON schema in a request is far shallower
INT_LIMIT = 2**64  # no field is wider: seeds are 64-bit (GenerationConfig narrows each field further)


def read_json(raw: bytes, max_chars: int) -> Any:
    """The decoded body; a 400 (`invalid_json` or `invalid_value`) when it is not JSON a server can hold.
    `max_chars` bounds every string in it (the server's --max-message-chars)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte {e.start}): send JSON encoded as UTF-8",
                       code="invalid_json") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, or an integer of thousands of digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    check_value(data, max_chars)
    return data


def check_value(data: Any, max_chars: int) -> None:
    """Refuse lone surrogates, over-long strings, non-finite numbers, integers wider than 64 bits and
    nesting deeper than MAX_DEPTH, anywhere in `data` (walked without recursion)."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path, max_chars)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not -INT_LIMIT < value < INT_LIMIT:
                raise _bad(path, f"is an integer of {value.bit_length()} bits; no field here holds more than 64")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _bad(path, f"is {value}; JSON numbers here must be finite")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                child = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    _check_text(key, child, max_chars, what="the name")
                stack.append((item, child, depth + 1))


def _check_text(text: str, path: str, max_chars: int, what: str = "") -> None:
    if len(text) > max_chars:
        raise _bad(path, f"is {len(text)} characters, more than this server's limit of {max_chars} characters "
                         "(--max-message-chars)")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"{what} of " if what else ""
            raise APIError(400, f"{where}{path or 'the body'} is not valid Unicode: it holds a lone surrogate "
                                f"({text[e.start]!r} at character {e.start}); a \\u escape for a character "
                                "beyond U+FFFF must be a surrogate pair", param=path or None,
                           code="invalid_value") from None


def _bad(path: str, why: str) -> APIError:
    return APIError(400, f"{path or 'the body'} {why}", param=path or None, code="invalid_value")


def _too_deep() -> APIError:
    return APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json")
