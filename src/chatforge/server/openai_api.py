"""OpenAI's API: /v1/chat/completions, /v1/completions and /v1/models, streamed or not.

Requests are checked field by field (a 400 names the field), turned into GenerationConfigs and
handed to the scheduler; replies come back as OpenAI's objects, or as server-sent events of
`chat.completion.chunk` / `text_completion` ending with `data: [DONE]`. When a conversation is
too long for the context, the oldest turns are dropped and the response says how many
(`X-Chatforge-Dropped-Messages` header, `dropped_messages` field): never silently.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse

from chatforge.engine import GenerationConfig
from chatforge.server.errors import APIError, sse_error
from chatforge.server.service import ClientGone, ModelService, Run, get_service, json_dumps, parse_body, watch_disconnect

router = APIRouter()

DROPPED_HEADER = "X-Chatforge-Dropped-Messages"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- request bodies ------------------------------------------------------------------------------------

class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are ignored, as OpenAI's SDKs add some


class ContentPart(StrictBody):
    type: str
    text: Optional[str] = None


class ChatMessage(StrictBody):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(StrictBody):
    include_usage: bool = False


class SamplingFields(StrictBody):
    """The generation fields both completion endpoints share (OpenAI's, plus top_k and repetition_penalty)."""

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    max_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    logit_bias: Optional[dict[str, float]] = None
    ignore_eos: bool = False  # chatforge (and vLLM): the end-of-turn token does not end the reply; for benchmarks


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# --- checks shared by both endpoints -----------------------------------------------------------------

def _unsupported(body: SamplingFields) -> None:
    """Refuse features we do not have rather than ignore them and answer something else."""
    checks = {
        "logprobs": body.logprobs not in (None, False, 0),
        "logit_bias": bool(body.logit_bias),
        "frequency_penalty": body.frequency_penalty not in (None, 0),
        "presence_penalty": body.presence_penalty not in (None, 0),
        "tools": bool(getattr(body, "tools", None)),
        "response_format": (getattr(body, "response_format", None) or {}).get("type", "text") != "text",
        "suffix": getattr(body, "suffix", None) is not None,
        "best_of": getattr(body, "best_of", None) not in (None, 1),
    }
    for param, bad in checks.items():
        if bad:
            hint = " (use repetition_penalty)" if param.endswith("_penalty") else ""
            raise APIError(400, f"{param} is not supported by chatforge{hint}", param=param, code="unsupported")


def _stops(stop: Union[str, list[str], None]) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
    return stops


def generation_config(body: SamplingFields, service: ModelService, max_tokens: Optional[int],
                      default_max_tokens: int) -> GenerationConfig:
    """The engine's settings for a request; each out-of-range field is a 400 that names it."""
    limits = service.config
    if not 1 <= body.n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n}", param="n")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise APIError(400, "temperature must be between 0 and 2", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise APIError(400, "top_p must be in (0, 1]", param="top_p")
    if body.top_k is not None and body.top_k < 0:
        raise APIError(400, "top_k must be >= 0 (0 = off)", param="top_k")
    if body.repetition_penalty is not None and body.repetition_penalty <= 0:
        raise APIError(400, "repetition_penalty must be > 0 (1 = off)", param="repetition_penalty")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    service.check_max_tokens(max_tokens)
    values = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
              "repetition_penalty": body.repetition_penalty, "seed": body.seed}
    cfg = service.chat.defaults.replace(  # unset fields: the model's chat defaults (temperature 0.7, top_p 0.95)
        max_new_tokens=max_tokens or min(default_max_tokens, service.max_tokens_cap), stop=_stops(body.stop),
        **{k: v for k, v in values.items() if v is not None})
    if body.ignore_eos:
        cfg = cfg.replace(stop_token_ids=[])
    return service.chat.config(cfg)  # adds the fallback template's turn-boundary stops


def chat_messages(messages: list[ChatMessage], service: ModelService) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts within the server's limits; `developer` is a system message."""
    limits = service.config
    if not messages:
        raise APIError(400, "messages is empty: send at least one message", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages is more than this server's limit of {limits.max_messages} "
                            "(--max-messages)", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, f"messages.{i}.content: only text parts are supported",
                               param=f"messages.{i}.content")
            content = "".join(p.text for p in content)
        if content is None:
            content = ""
        if len(content) > limits.max_message_chars:
            raise APIError(400, f"messages.{i} is {len(content)} characters, more than this server's limit of "
                                f"{limits.max_message_chars} (--max-message-chars)", param=f"messages.{i}.content")
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages.{i}.role {m.role!r} is not supported; use system, user or assistant",
                           param=f"messages.{i}.role")
        out.append({"role": role, "content": content})
    return out


def _usage(prompt_tokens: int, run: Run) -> dict[str, int]:
    completion = sum(j.request.completion_tokens for j in run.jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


# --- one shape for both endpoints: collect, or stream ----------------------------------------------------

class Reply:
    """How one endpoint writes its objects; chat and text completions differ only here."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, dropped: int, prefix: str = ""):
        self.kind, self.model, self.prompt_tokens, self.dropped = kind, model, prompt_tokens, dropped
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prefix = prefix  # echo=True: the prompt before each completion

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: Optional[str]) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": self.prefix + text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: Optional[str], finish_reason: Optional[str],
                     first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


def _finish_reason(outcome: Optional[str]) -> str:
    return "length" if outcome == "length" else "stop"


async def collect(request: HTTPRequest, run: Run, reply: Reply) -> JSONResponse:
    """Wait for every choice (cancelling them if the client leaves) and answer one completion object."""
    texts = [[] for _ in run.jobs]
    disconnect = watch_disconnect(request)
    try:
        async for index, kind, text in run.events(disconnect):
            if kind == "text":
                texts[index].append(text)
    except ClientGone:
        return JSONResponse({}, status_code=499)  # nobody is listening; the status only shows in logs
    finally:
        disconnect.cancel()
        run.cancel()
    failure = run.failure()
    if failure:
        raise RuntimeError(failure)
    body = reply.head(reply.object)
    body["choices"] = [reply.choice(i, "".join(t), _finish_reason(j.outcome))
                       for i, (t, j) in enumerate(zip(texts, run.jobs))]
    body["usage"] = _usage(reply.prompt_tokens, run)
    body["dropped_messages"] = reply.dropped
    return JSONResponse(body, headers={DROPPED_HEADER: str(reply.dropped)})


def stream(request: HTTPRequest, run: Run, reply: Reply, include_usage: bool) -> StreamingResponse:
    """Server-sent events: a first chunk per choice (with the role), text chunks, a finish chunk per choice,
    the usage chunk when asked for, then `data: [DONE]`. A client that disconnects cancels the run."""

    def event(choices: list[dict], **extra: Any) -> str:
        body = reply.head(reply.chunk_object)
        body["choices"] = choices
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json_dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        disconnect = watch_disconnect(request)
        try:
            first = [reply.chunk_choice(i, None if reply.kind == "chat" else "", None, first=True)
                     for i in range(len(run.jobs))]
            yield event(first, dropped_messages=reply.dropped)
            async for burst in run.bursts(disconnect):  # one write per burst of ready events
                out = []
                for index, kind, text in burst:
                    if kind == "text":
                        out.append(event([reply.chunk_choice(index, text, None)]))
                    elif run.jobs[index].outcome != "error":
                        out.append(event([reply.chunk_choice(index, None, _finish_reason(run.jobs[index].outcome))]))
                yield "".join(out)
            failure = run.failure()
            if failure:
                yield sse_error(RuntimeError(failure))
            elif include_usage:
                usage = reply.head(reply.chunk_object)
                usage.update(choices=[], usage=_usage(reply.prompt_tokens, run))
                yield f"data: {json_dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            disconnect.cancel()
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, DROPPED_HEADER: str(reply.dropped)})


async def respond(request: HTTPRequest, body: SamplingFields, service: ModelService, prompts: list[list[int]],
                  config: GenerationConfig, reply: Reply) -> Any:
    requests = [r for ids in prompts for r in service.requests(ids, config, body.n)]
    run = Run(service.scheduler, requests)  # QueueFullError (429) before any byte is sent
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream(request, run, reply, include_usage)
    return await collect(request, run, reply)


# --- endpoints -----------------------------------------------------------------------------------------------

async def _accept(request: HTTPRequest, model: type[SamplingFields]) -> tuple[Any, ModelService]:
    """The checked body and the model it asks for; refused early when it names another model or a feature
    chatforge does not have."""
    body = await parse_body(request, model)
    service = get_service(request)
    service.check_model(body.model)
    _unsupported(body)
    return body, service


@router.post("/v1/chat/completions")
async def chat_completions(request: HTTPRequest) -> Any:
    body, service = await _accept(request, ChatCompletionRequest)
    messages = chat_messages(body.messages, service)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_completion_tokens is not None:
        service.check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
    config = generation_config(body, service, max_tokens, service.config.default_max_tokens)
    prompt_ids, dropped = service.chat.prompt(messages, config)
    reply = Reply("chat", service.name, len(prompt_ids), dropped)
    return await respond(request, body, service, [prompt_ids], config, reply)


@router.post("/v1/completions")
async def completions(request: HTTPRequest) -> Any:
    body, service = await _accept(request, CompletionRequest)
    prompts = _prompt_ids(body.prompt, service)
    if body.echo and len(prompts) > 1:
        raise APIError(400, "echo is supported for one prompt at a time", param="echo")
    config = generation_config(body, service, body.max_tokens, 16)  # OpenAI's default for completions
    prefix = service.tokenizer.decode(prompts[0]) if body.echo else ""
    reply = Reply("text", service.name, sum(len(p) for p in prompts), 0, prefix)
    return await respond(request, body, service, prompts, config, reply)


def _prompt_ids(prompt: Any, service: ModelService) -> list[list[int]]:
    """A completions prompt (text, texts, token ids or lists of them) as lists of token ids."""
    tok, limit = service.tokenizer, service.config.max_message_chars
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if any(len(t) > limit for t in texts):
            raise APIError(400, f"the prompt is longer than this server's limit of {limit} characters "
                                "(--max-message-chars)", param="prompt")
        prompts = [tok.encode(t) for t in texts]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or len(prompts) > service.config.max_n:
        raise APIError(400, f"give between 1 and {service.config.max_n} prompts", param="prompt")
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    vocab = service.engine.model.config.vocab_size
    out = []
    for ids in prompts:
        if not ids and start is not None:  # an empty prompt starts a fresh document
            ids = [start]
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        if len(ids) >= service.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the model's context is {service.context}; "
                                "shorten it", param="prompt", code="context_length_exceeded")
        out.append(ids)
    return out


def model_card(service: ModelService) -> dict[str, Any]:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "chatforge",
            "context_length": service.context}


@router.get("/v1/models")
async def list_models(request: HTTPRequest) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(get_service(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: HTTPRequest, model_id: str) -> dict[str, Any]:
    service = get_service(request)
    service.check_model(model_id)
    return model_card(service)

