"""A conversation: the message list users of transformers' old `Conversation` know."""
from __future__ import annotations

import uuid
from typing import Any, Iterator, Optional, Union

from chatforge.data.chats import validate_messages


class Conversation:
    """Messages with roles system/user/assistant, plus the old transformers accessors.

    `Conversation("Hi")` starts with one user message; `Conversation(messages)` takes a
    list of {"role", "content"} dicts.
    """

    def __init__(self, messages: Union[str, list[dict[str, Any]], None] = None,
                 conversation_id: Optional[str] = None, system: Optional[str] = None):
        self.uuid = conversation_id or str(uuid.uuid4())
        self.messages: list[dict[str, str]] = []
        self.dropped_messages = 0  # oldest turns left out of the last prompt to fit the context
        if system:
            self.add_message({"role": "system", "content": system})
        if isinstance(messages, str):
            self.add_message({"role": "user", "content": messages})
        elif messages:
            for m in validate_messages(messages):
                self.add_message(m)

    def add_message(self, message: dict[str, Any]) -> None:
        self.messages.append(validate_messages([message])[0])

    def add_user_input(self, text: str) -> None:
        self.add_message({"role": "user", "content": text})

    def append_response(self, text: str) -> None:
        self.add_message({"role": "assistant", "content": text})

    @property
    def past_user_inputs(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]

    @property
    def generated_responses(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def new_user_input(self) -> Optional[str]:
        """The last user message when it has no reply yet."""
        if self.messages and self.messages[-1]["role"] == "user":
            return self.messages[-1]["content"]
        return None

    def iter_texts(self) -> Iterator[tuple[bool, str]]:
        for m in self.messages:
            if m["role"] != "system":
                yield m["role"] == "user", m["content"]

    def clear(self, keep_system: bool = True) -> None:
        self.messages = [m for m in self.messages if keep_system and m["role"] == "system"]

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.messages[i]

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self.messages)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Conversation) and (self.uuid == other.uuid or self.messages == other.messages)

    def __repr__(self) -> str:
        lines = [f"Conversation id: {self.uuid}"]
        lines += [f"{m['role']}: {m['content']}" for m in self.messages]
        return "\n".join(lines)
