"""Tokens in and out: POST /tokenize, POST /detokenize, and POST /v1/inspect (why each reply token).

/v1/inspect explains a finished assistant reply token by token: how likely the model found each
token, its top alternatives, and the earlier tokens it attended to most. The web page's inspect
view calls it; the forward pass runs on the scheduler's thread, between decode steps.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest

from chatforge.engine.stream import IncrementalDecoder
from chatforge.errors import ChatforgeError
from chatforge.server.errors import APIError
from chatforge.server.openai_api import ChatMessage, StrictBody, chat_messages
from chatforge.server.service import get_service, parse_body

router = APIRouter()


class TokenizeRequest(StrictBody):
    model: Optional[str] = None
    text: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictBody):
    model: Optional[str] = None
    tokens: list[int]


class InspectRequest(StrictBody):
    model: Optional[str] = None
    messages: list[ChatMessage]  # the conversation the reply answered
    reply: str  # the assistant reply to explain
    top_k: int = 5  # alternatives per token
    top_attn: int = 5  # most-attended earlier tokens per token


@router.post("/tokenize")
async def tokenize(request: HTTPRequest) -> dict[str, Any]:
    """Token ids of `text`, or of `messages` rendered with the chat template (what the model would read)."""
    body = await parse_body(request, TokenizeRequest)
    service = get_service(request)
    service.check_model(body.model)
    if (body.text is None) == (body.messages is None):
        raise APIError(400, "give either text or messages", param="text")
    if body.text is not None:
        if len(body.text) > service.config.max_message_chars:
            raise APIError(400, f"text is longer than this server's limit of {service.config.max_message_chars} "
                                "characters", param="text")
        ids = service.tokenizer.encode(body.text)
    else:
        ids = service.chat.format.encode(chat_messages(body.messages, service), body.add_generation_prompt)
    return {"model": service.name, "tokens": ids, "count": len(ids), "max_model_len": service.context,
            "token_strs": [service.tokenizer.id_to_token(i) for i in ids]}


@router.post("/detokenize")
async def detokenize(request: HTTPRequest) -> dict[str, Any]:
    body = await parse_body(request, DetokenizeRequest)
    service = get_service(request)
    service.check_model(body.model)
    vocab = service.tokenizer.vocab_size
    bad = next((i for i in body.tokens if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    return {"model": service.name, "text": service.tokenizer.decode(body.tokens)}


@router.post("/v1/inspect")
async def inspect(request: HTTPRequest) -> dict[str, Any]:
    """Per reply token: {token, text, id, prob, rank, alternatives: [{token, id, prob}],
    attended: [{index, token, weight}]}.

    `index` counts positions in the prompt followed by the reply; `tokens` labels every one of them
    and `prompt_tokens` says where the reply starts.
    """
    from chatforge.explain.tokens import inspect_reply

    body = await parse_body(request, InspectRequest)
    service = get_service(request)
    service.check_model(body.model)
    if not 1 <= body.top_k <= 20 or not 1 <= body.top_attn <= 20:
        raise APIError(400, "top_k and top_attn must be between 1 and 20", param="top_k")
    if len(body.reply) > service.config.max_message_chars:
        raise APIError(400, "reply is longer than this server's message limit", param="reply")
    messages = chat_messages(body.messages, service)
    tok = service.tokenizer
    reply_ids = tok.encode(body.reply)
    if not reply_ids:
        raise APIError(400, "reply is empty: there is nothing to inspect", param="reply")
    if len(reply_ids) >= service.context:
        raise APIError(400, f"the reply is {len(reply_ids)} tokens, as long as the model's whole context",
                       param="reply", code="context_length_exceeded")
    kept, dropped = service.chat.format.fit(messages, service.context - len(reply_ids))
    prompt_ids = service.chat.format.encode(kept)
    model = service.engine.model

    def run() -> list[dict[str, Any]]:
        return inspect_reply(model, tok, prompt_ids, reply_ids, top_k=body.top_k, top_attn=body.top_attn)

    try:
        steps = await asyncio.wrap_future(service.scheduler.call(run))
    except ChatforgeError as e:
        raise APIError(400, str(e), param="messages") from None
    from chatforge.explain.common import token_labels

    for step, text in zip(steps, reply_pieces(tok, reply_ids)):
        step["text"] = text
    return {"model": service.name, "prompt_tokens": len(prompt_ids), "dropped_messages": dropped,
            "tokens": token_labels(tok, prompt_ids + reply_ids), "reply": steps}


def reply_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds, as a stream shows it: a character spread over several tokens goes to its last."""
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces[-1] += decoder.flush()
    return pieces

