"""The web page's JSON API: conversations kept in SQLite, and replies streamed into them.

    GET    /api/info                                    model, context, default settings
    GET    /api/conversations                           newest first
    POST   /api/conversations                           {title?, system?, settings?}
    GET    /api/conversations/{id}                      with its messages
    PATCH  /api/conversations/{id}                      rename, system prompt, sampling settings
    DELETE /api/conversations/{id}
    POST   /api/conversations/{id}/messages             {content}: a user message
    PATCH  /api/conversations/{id}/messages/{mid}       {content}: edit a user message, drop what follows
    DELETE /api/conversations/{id}/messages/{mid}       drop a message and what follows (regenerate)
    POST   /api/conversations/{id}/reply                the assistant's reply, streamed (server-sent events)

A reply streams as `data: {"type": "start" | "delta" | "done" | "error", ...}` events. It is written
to the store as it grows (at its first text, then at least every FLUSH_SECONDS), marked `unfinished`
until it ends, so a server killed mid-reply keeps all but the last second of it, marked; a reply
the user stops (the page aborts the request) is saved as far as it got.
A conversation's sampling settings are checked by GenerationConfig when they are saved (a 400 on
`settings.<name>`), under the same API limits as the OpenAI endpoints.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter
from pydantic import ConfigDict, Field
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse

from chatforge.chat.session import CHAT_DEFAULTS
from chatforge.engine import GenerationConfig
from chatforge.server.errors import APIError, NotFoundError, error_body
from chatforge.server.openai_api import SSE_HEADERS, StrictBody, sampling_config
from chatforge.server.service import ClientGone, ModelService, Run, get_service, json_dumps, parse_body, watch_disconnect
from chatforge.server.store import Store

router = APIRouter(prefix="/api")
FLUSH_SECONDS = 1.0  # a reply being generated is written to the store at least this often


class Settings(StrictBody):
    """Sampling settings a conversation keeps (None = the server's chat default); values: see reply_config.
    A name that is not one of them is refused (a 400 on `settings.<name>`), not kept and ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # 0 = off
    max_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None


class ConversationBody(StrictBody):
    title: Optional[str] = Field(None, max_length=200)
    system: Optional[str] = None
    settings: Optional[Settings] = None


class MessageBody(StrictBody):
    content: str = Field(min_length=1)


def _store(request: HTTPRequest) -> Store:
    return request.app.state.store


def _settings(body: ConversationBody, service: Optional[ModelService]) -> Optional[dict[str, Any]]:
    """The settings to store, refused (400) unless a reply could use them; the model may still be loading."""
    if body.settings is None:
        return None
    settings = body.settings.model_dump(exclude_none=True)
    if service is not None and "max_tokens" in settings:
        service.check_max_tokens(settings["max_tokens"], "settings.max_tokens")
    reply_config(settings, service.chat.defaults if service is not None else CHAT_DEFAULTS)
    return settings


def _check_length(text: Optional[str], request: HTTPRequest, param: str) -> None:
    limit = request.app.state.config.max_message_chars
    if text is not None and len(text) > limit:
        raise APIError(400, f"{param} is {len(text)} characters, more than this server's limit of {limit}",
                       param=param)


@router.get("/info")
async def info(request: HTTPRequest) -> dict[str, Any]:
    service = get_service(request)
    d = service.chat.defaults
    return {"model": service.name, "context_length": service.context, "max_tokens_limit": service.max_tokens_cap,
            "defaults": {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k or 0,
                         "max_tokens": min(d.max_new_tokens, service.max_tokens_cap),
                         "repetition_penalty": d.repetition_penalty, "seed": None}}


@router.get("/conversations")
def list_conversations(request: HTTPRequest) -> dict[str, Any]:
    return {"data": _store(request).list_conversations()}


@router.post("/conversations", status_code=201)
async def create_conversation(request: HTTPRequest) -> JSONResponse:
    body = await parse_body(request, ConversationBody)
    _check_length(body.system, request, "system")
    settings = _settings(body, getattr(request.app.state, "service", None))
    conv = _store(request).create_conversation(body.title, body.system or "", settings)
    return JSONResponse(conv, status_code=201)


@router.get("/conversations/{cid}")
def get_conversation(request: HTTPRequest, cid: str) -> dict[str, Any]:
    return _store(request).get_conversation(cid)


@router.patch("/conversations/{cid}")
async def update_conversation(request: HTTPRequest, cid: str) -> dict[str, Any]:
    body = await parse_body(request, ConversationBody)
    _check_length(body.system, request, "system")
    settings = _settings(body, getattr(request.app.state, "service", None))
    return _store(request).update_conversation(cid, title=body.title, system=body.system, settings=settings)


@router.delete("/conversations/{cid}")
def delete_conversation(request: HTTPRequest, cid: str) -> dict[str, Any]:
    _store(request).delete_conversation(cid)
    return {"id": cid, "deleted": True}


@router.post("/conversations/{cid}/messages", status_code=201)
async def add_message(request: HTTPRequest, cid: str) -> JSONResponse:
    body = await parse_body(request, MessageBody)
    _check_length(body.content, request, "content")
    return JSONResponse(_store(request).add_message(cid, "user", body.content), status_code=201)


@router.patch("/conversations/{cid}/messages/{message_id}")
async def edit_message(request: HTTPRequest, cid: str, message_id: int) -> dict[str, Any]:
    body = await parse_body(request, MessageBody)
    _check_length(body.content, request, "content")
    return _store(request).edit_message(cid, message_id, body.content)


@router.delete("/conversations/{cid}/messages/{message_id}")
def truncate(request: HTTPRequest, cid: str, message_id: int) -> dict[str, Any]:
    return _store(request).truncate(cid, message_id)


def reply_config(settings: dict[str, Any], base: GenerationConfig,
                 max_tokens_cap: Optional[int] = None) -> GenerationConfig:
    """A conversation's settings over `base` (the chat defaults), max_tokens clipped to the server's cap.

    A value GenerationConfig refuses is a 400 on `settings.<name>`.
    """
    values = dict(settings)
    if "max_tokens" in values:
        values["max_new_tokens"] = values.pop("max_tokens")
        if max_tokens_cap is not None:
            values["max_new_tokens"] = min(values["max_new_tokens"], max_tokens_cap)
    values["top_k"] = values.get("top_k") or None  # 0 = off: the default's
    return sampling_config(base, values, prefix="settings.", names={"max_new_tokens": "max_tokens"})


@router.post("/conversations/{cid}/reply")
async def reply(request: HTTPRequest, cid: str) -> StreamingResponse:
    store, service = _store(request), get_service(request)
    conv = store.get_conversation(cid)
    history = [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
    if not history or history[-1]["role"] != "user":
        raise APIError(400, "the conversation has no user message waiting for a reply", param="messages")
    if conv["system"]:
        history.insert(0, {"role": "system", "content": conv["system"]})
    config = service.chat.config(reply_config(conv["settings"], service.chat.defaults, service.max_tokens_cap))
    prompt_ids, dropped = service.chat.prompt(history, config)
    run = Run(service.scheduler, service.requests(prompt_ids, config))
    [job] = run.jobs

    async def events() -> AsyncIterator[str]:
        draft = Draft(store, cid)
        started = time.perf_counter()

        def meta(stopped: bool) -> dict[str, Any]:
            elapsed = time.perf_counter() - started
            return {"finish_reason": "stopped" if stopped else job.outcome, "prompt_tokens": len(prompt_ids),
                    "completion_tokens": job.request.completion_tokens, "dropped_messages": dropped,
                    "tokens_per_second": round(job.request.completion_tokens / elapsed, 1) if elapsed > 0 else 0.0}

        disconnect = watch_disconnect(request)
        flusher = asyncio.ensure_future(draft.keep_written())
        try:
            yield _event({"type": "start", "prompt_tokens": len(prompt_ids), "dropped_messages": dropped})
            async for burst in run.bursts(disconnect):
                text = "".join(t for _, kind, t in burst if kind == "text")
                if text:
                    draft.grow(text)
                    yield _event({"type": "delta", "text": text})
            if job.outcome == "error":
                yield _event({"type": "error", **error_body(job.error or "generation failed", "server_error")})
                return
            message = draft.finish(meta(stopped=False), keep_empty=True)
            yield _event({"type": "done", "message": message, "finish_reason": job.outcome})
        except ClientGone:
            pass
        finally:  # stopped by the user (the page aborted the request) or cut at shutdown: keep what was said
            flusher.cancel()
            disconnect.cancel()
            run.cancel()
            if not draft.finished:
                draft.finish(meta(stopped=True))

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


class Draft:
    """A reply kept in the store while it is generated: inserted `unfinished` at its first text, rewritten
    when FLUSH_SECONDS have passed (on the next text, or by keep_written when none comes), then finished.
    A reply deleted meanwhile (its conversation, or the reply by a regenerate) is no longer written."""

    def __init__(self, store: Store, cid: str) -> None:
        self.store, self.cid = store, cid
        self.pieces: list[str] = []
        self.mid: Optional[int] = None
        self.written = 0  # pieces in the store
        self.last_write = 0.0
        self.finished = self.gone = False

    def grow(self, text: str) -> None:
        self.pieces.append(text)
        if self.mid is None or time.monotonic() - self.last_write >= FLUSH_SECONDS:
            self._write(None, unfinished=True)

    async def keep_written(self) -> None:
        """Write what came since the last write once it is FLUSH_SECONDS old, however slowly text arrives."""
        while not self.gone:
            await asyncio.sleep(FLUSH_SECONDS)
            if self.mid is not None and self.written < len(self.pieces):
                self._write(None, unfinished=True)

    def finish(self, meta: dict[str, Any], keep_empty: bool = False) -> Optional[dict[str, Any]]:
        """The whole reply with its meta, no longer unfinished (nothing is kept of an empty stopped reply)."""
        self.finished = True
        if self.mid is None and not (keep_empty or self.text):
            return None
        return self._write(meta, unfinished=False)

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    def _write(self, meta: Optional[dict[str, Any]], unfinished: bool) -> Optional[dict[str, Any]]:
        if self.gone:
            return None
        self.written, self.last_write = len(self.pieces), time.monotonic()
        try:
            if self.mid is None:
                message = self.store.add_message(self.cid, "assistant", self.text, meta, unfinished=unfinished)
                self.mid = message["id"]
                return message
            return self.store.write_reply(self.cid, self.mid, self.text, meta, unfinished=unfinished)
        except NotFoundError:
            self.gone = True
            return None


def _event(data: dict[str, Any]) -> str:
    return f"data: {json_dumps(data)}\n\n"
