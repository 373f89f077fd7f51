"""Replies to conversations: template + context budget + engine, shared by every chat interface.

The pipeline, the REPL and the server all ask this module for a reply, so a conversation
is rendered, trimmed to fit and stopped the same way everywhere, and starts from the same
sampling settings (CHAT_DEFAULTS).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from chatforge.engine import Engine, Generation, GenerationConfig
from chatforge.chat.conversation import Conversation
from chatforge.chat.template import ChatFormat

# What every chat interface (REPL, pipeline, server, web page) samples with unless told otherwise.
# Shared: derive from it with .replace(...), never change it in place.
CHAT_DEFAULTS = GenerationConfig(max_new_tokens=256, temperature=0.7, top_p=0.95)


@dataclass
class Reply:
    """A streamed reply: iterate for text pieces; afterwards `.generation`, `.text` and timing."""

    pieces: Iterator[str]
    prompt_tokens: int
    dropped_messages: int
    generation: Optional[Generation] = None
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0

    def __iter__(self) -> Iterator[str]:
        yield from self.pieces

    @property
    def tokens_per_second(self) -> float:
        n = self.generation.completion_tokens if self.generation else 0
        return n / self.elapsed if self.elapsed > 0 else 0.0


class ChatModel:
    """An engine plus its chat format: turns conversations into replies."""

    def __init__(self, engine: Engine, defaults: Optional[GenerationConfig] = None) -> None:
        self.engine = engine
        self.format = ChatFormat.for_tokenizer(engine.tokenizer)
        self.defaults = defaults or CHAT_DEFAULTS

    def config(self, base: Optional[GenerationConfig] = None, **overrides: Any) -> GenerationConfig:
        """`base` (default: this model's chat defaults) with the overrides that are not None, plus the
        chat format's turn-boundary stop strings."""
        cfg = (base or self.defaults).replace(**{k: v for k, v in overrides.items() if v is not None})
        if self.format.stop:  # the fallback template ends a reply where the next turn would start
            cfg = cfg.replace(stop=list(dict.fromkeys([*cfg.stop, *self.format.stop])))
        return cfg

    def prompt(self, messages: Sequence[dict], config: GenerationConfig,
               tools: Optional[list[dict]] = None) -> tuple[list[int], int]:
        """Token ids of the conversation with the generation prompt, oldest turns dropped to leave room.
        `tools`: OpenAI's function list, for a template that renders tools itself (chat/tools.py)."""
        context = self.engine.context
        reserve = min(config.max_new_tokens, context // 2)
        kept, dropped = self.format.fit(messages, context - reserve, tools)
        return self.format.encode(kept, tools=tools), dropped

    def stream(self, conversation: Conversation, config: Optional[GenerationConfig] = None,
               **overrides: Any) -> Reply:
        """Stream the assistant's next reply; it is appended to the conversation when the stream ends."""
        cfg = self.config(config, **overrides)
        ids, dropped = self.prompt(conversation.messages, cfg)
        conversation.dropped_messages = dropped
        text_stream = self.engine.stream(ids, cfg)
        reply = Reply(iter(()), len(ids), dropped)

        def pieces() -> Iterator[str]:
            out = []
            try:
                for piece in text_stream:
                    out.append(piece)
                    yield piece
                reply.generation = text_stream.result
            finally:  # also when the caller stops early (Ctrl-C, a closed connection): keep what was said
                reply.elapsed = time.perf_counter() - reply.started
                conversation.append_response("".join(out).strip())

        reply.pieces = pieces()
        return reply

    def reply(self, conversations: Sequence[Conversation], config: Optional[GenerationConfig] = None,
              **overrides: Any) -> list[Generation]:
        """Generate the next reply of several conversations in one batch and append each."""
        cfg = self.config(config, **overrides)
        prompts = []
        for conv in conversations:
            ids, conv.dropped_messages = self.prompt(conv.messages, cfg)
            prompts.append(ids)
        results = self.engine.generate(prompts, cfg)
        for conv, gen in zip(conversations, results):
            conv.append_response(gen.text.strip())
        return results
