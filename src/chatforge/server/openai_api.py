"""OpenAI's API: /v1/chat/completions, /v1/completions and /v1/models, streamed or not.

pydantic checks a body's JSON shape and types; the values are checked where they are used:
GenerationConfig checks the sampling settings and the engine's check_prompt the prompts, and their
errors become a 400 naming the request's field (`param`). What is checked here are this API's own
limits: n, at most 4 stop strings, max_tokens within the server's cap, temperature at most 2.
Replies come back as OpenAI's objects, or as server-sent events of `chat.completion.chunk` /
`text_completion` ending with `data: [DONE]`. When a conversation is too long for the context, the
oldest turns are dropped and the response says how many (`X-Chatforge-Dropped-Messages` header,
`dropped_messages` field): never silently.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse

from chatforge.engine import GenerationConfig, GenerationConfigError, PromptTooLongError, Request, start_ids
from chatforge.errors import ChatforgeError
from chatforge.server.errors import APIError, sse_error
from chatforge.server.logprobs import ChoiceLogprobs
from chatforge.server.service import ClientGone, ModelService, Run, get_service, json_dumps, parse_body, watch_disconnect
from chatforge.server.structured import (AssistantToolCall, ChoiceTools, ResponseFormat, ToolChoice, ToolDef,
                                         ToolSpec, structured_config, structured_errors, tool_spec)

router = APIRouter()

DROPPED_HEADER = "X-Chatforge-Dropped-Messages"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# OpenAI's API takes temperature in [0, 2]; GenerationConfig follows Hugging Face, which sets no upper
# bound. The server keeps OpenAI's contract for its clients (the web page's settings too), so this one
# value rule is a declared limit of the API, not of the engine: the CLI and Python API still take more.
API_MAX_TEMPERATURE = 2.0
API_MAX_STOPS = 4  # OpenAI's limit on stop sequences
API_MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' logprobs (chat's top_logprobs: 20)


# --- request bodies ------------------------------------------------------------------------------------

class StrictBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # unknown fields are ignored, as OpenAI's SDKs add some


class ContentPart(StrictBody):
    type: str
    text: Optional[str] = None


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer system
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[AssistantToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # role "tool": the call this message answers


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
    logit_bias: Optional[dict[str, float]] = None  # token id (a string in JSON) -> bias in [-100, 100]
    ignore_eos: bool = False  # chatforge (and vLLM): the end-of-turn token does not end the reply; for benchmarks


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None  # 0-20, with logprobs: true
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None  # 0-5: the chosen token's and the 5 most likely tokens' log-probabilities
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# --- checks shared by both endpoints -----------------------------------------------------------------

def _unsupported(body: SamplingFields) -> None:
    """Refuse features we do not have rather than ignore them and answer something else."""
    checks = {  # what is asked for, and why chatforge does not do it
        "suffix": (getattr(body, "suffix", None) is not None,
                   "it needs a model trained for fill-in-the-middle, and chatforge's models are not"),
        "best_of": (getattr(body, "best_of", None) not in (None, 1),
                    "ask for n choices with logprobs and pick the best yourself"),
    }
    for param, (bad, why) in checks.items():
        if bad:
            raise APIError(400, f"{param} is not supported by chatforge: {why}", param=param, code="unsupported")


def sampling_config(base: GenerationConfig, values: dict[str, Any], *, prefix: str = "",
                    names: Optional[dict[str, str]] = None) -> GenerationConfig:
    """`base` with the request's sampling values (None = keep base's), checked by GenerationConfig.

    A value it refuses, or a temperature over API_MAX_TEMPERATURE, is a 400 whose param is the
    request's name for the field: prefix + (names.get(field) or field), e.g. max_new_tokens -> max_tokens.
    """
    def param(field: str) -> str:
        return prefix + (names or {}).get(field, field)

    try:
        config = base.replace(**{k: v for k, v in values.items() if v is not None})
    except GenerationConfigError as e:
        raise APIError(400, e.message(param(e.field)), param=param(e.field)) from None
    if config.temperature > API_MAX_TEMPERATURE:
        raise APIError(400, f"{param('temperature')} must be between 0 and {API_MAX_TEMPERATURE:g} (OpenAI's "
                            f"range), got {config.temperature!r}", param=param("temperature"))
    return config


def generation_config(body: SamplingFields, service: ModelService, max_tokens: Optional[int],
                      default_max_tokens: int, max_tokens_param: str = "max_tokens") -> GenerationConfig:
    """The engine's settings for a request over the model's chat defaults; a bad field is a 400 that names it."""
    limits = service.config
    if not 1 <= body.n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n}", param="n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > API_MAX_STOPS:
        raise APIError(400, f"stop must be up to {API_MAX_STOPS} strings", param="stop")
    service.check_max_tokens(max_tokens, max_tokens_param)
    values = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
              "repetition_penalty": body.repetition_penalty, "seed": body.seed, "stop": stops,
              "max_new_tokens": max_tokens if max_tokens is not None
              else min(default_max_tokens, service.max_tokens_cap),
              "stop_token_ids": [] if body.ignore_eos else None}
    scoring, names = _scoring(body)
    cfg = sampling_config(service.chat.defaults, {**values, **scoring},
                          names={"max_new_tokens": max_tokens_param, **names})
    return service.chat.config(cfg)  # adds the fallback template's turn-boundary stops


def _scoring(body: SamplingFields) -> tuple[dict[str, Any], dict[str, str]]:
    """The penalties, logit_bias and logprobs a request asks for as GenerationConfig fields, and the request's
    names for the fields it names differently. Chat: logprobs (bool) + top_logprobs (0-20); completions:
    logprobs (0-5), and with echo the prompt's too."""
    bias = None
    if body.logit_bias:
        bad = next((k for k in body.logit_bias if not k.isdecimal()), None)
        if bad is not None:
            raise APIError(400, f"logit_bias keys must be token ids (integers, as strings in JSON), got {bad!r}",
                           param="logit_bias")
        bias = {int(k): v for k, v in body.logit_bias.items()}
    values = {"frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
              "logit_bias": bias}
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs is only allowed with logprobs: true", param="top_logprobs")
        values["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
        return values, {"logprobs": "top_logprobs"}
    logprobs = getattr(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= API_MAX_COMPLETION_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {API_MAX_COMPLETION_LOGPROBS} (OpenAI's range for "
                            f"completions), got {logprobs}", param="logprobs")
    values["logprobs"] = logprobs
    values["prompt_logprobs"] = logprobs if getattr(body, "echo", False) else None
    return values, {"prompt_logprobs": "logprobs"}


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
        out.append({"role": role, "content": content, **_tool_fields(m, i)})
    return out


def _tool_fields(m: ChatMessage, i: int) -> dict[str, Any]:
    """What tool calling adds to message i: an assistant's tool_calls, a tool result's tool_call_id."""
    if m.role == "tool":
        if not m.tool_call_id:
            raise APIError(400, f"messages.{i}: a tool message needs the tool_call_id of the call it answers",
                           param=f"messages.{i}.tool_call_id")
        return {"tool_call_id": m.tool_call_id}
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, f"messages.{i}: only assistant messages have tool_calls",
                           param=f"messages.{i}.tool_calls")
        return {"tool_calls": [c.model_dump() for c in m.tool_calls]}
    return {}


def _usage(prompt_tokens: int, run: Run) -> dict[str, int]:
    completion = sum(j.request.completion_tokens for j in run.jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


# --- one shape for both endpoints: collect, or stream ----------------------------------------------------

class ResponseShape:
    """How one endpoint writes its objects; chat and text completions differ only here."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, dropped: int, prefix: str = "") -> None:
        self.kind, self.model, self.prompt_tokens, self.dropped = kind, model, prompt_tokens, dropped
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prefix = prefix  # echo=True: the prompt before each completion
        self.scoring: list[ChoiceLogprobs] = []  # per choice, when the request asked for logprobs
        self._echoed: set[int] = set()  # streamed choices whose prefix is out
        self.tools: list[ChoiceTools] = []  # per choice, when the model may call tools

    def logprobs(self, index: int, upto: Optional[int] = None) -> Optional[dict[str, Any]]:
        """Choice `index`'s logprobs not yet written, up to record `upto` (all so far when None); None if unasked."""
        return self.scoring[index].take(upto) if self.scoring else None

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: Optional[str]) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools:  # calls out of the text: message.tool_calls, finish_reason "tool_calls"
                message, finish_reason = self.tools[index].message(text, finish_reason)
            return {"index": index, "message": message,
                    "logprobs": self.logprobs(index), "finish_reason": finish_reason}
        return {"index": index, "text": self.prefix + text, "logprobs": self.logprobs(index),
                "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: Optional[str], finish_reason: Optional[str],
                     first: bool = False, logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        # echo: the prompt comes first, in the first chunk; with logprobs in the choice's first event, which
        # carries the prompt's logprobs (they exist once the prompt is prefilled)
        if self.prefix and index not in self._echoed and first != bool(self.scoring and self.scoring[index].echo):
            self._echoed.add(index)
            text = self.prefix + (text or "")
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    def tool_chunks(self, index: int, text: str, outcome: Optional[str]) -> list[dict[str, Any]]:
        """Chunk choices of choice `index` when it may call tools: the deltas its text releases (all that is
        held, then the finish reason, once `outcome` is set)."""
        tools = self.tools[index]
        chunks = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                  for delta in tools.deltas(text, final=outcome is not None)]
        if outcome is not None and outcome != "error":
            chunks.append({"index": index, "delta": {}, "logprobs": None,
                           "finish_reason": tools.finish_reason(_finish_reason(outcome))})
        return chunks

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


def _finish_reason(outcome: Optional[str]) -> str:
    return "length" if outcome == "length" else "stop"


async def collect(request: HTTPRequest, run: Run, shape: ResponseShape) -> JSONResponse:
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
    body = shape.head(shape.object)
    body["choices"] = [shape.choice(i, "".join(t), _finish_reason(j.outcome))
                       for i, (t, j) in enumerate(zip(texts, run.jobs))]
    body["usage"] = _usage(shape.prompt_tokens, run)
    body["dropped_messages"] = shape.dropped
    return JSONResponse(body, headers={DROPPED_HEADER: str(shape.dropped)})


def stream(request: HTTPRequest, run: Run, shape: ResponseShape, include_usage: bool) -> StreamingResponse:
    """Server-sent events: a first chunk per choice (with the role), text chunks, a finish chunk per choice,
    the usage chunk when asked for, then `data: [DONE]`. A client that disconnects cancels the run."""

    def event(choices: list[dict], **extra: Any) -> str:
        body = shape.head(shape.chunk_object)
        body["choices"] = choices
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json_dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        disconnect = watch_disconnect(request)
        try:
            first = [shape.chunk_choice(i, None if shape.kind == "chat" else "", None, first=True,
                                        logprobs=shape.logprobs(i, 0))  # echo: the prompt's logprobs
                     for i in range(len(run.jobs))]
            yield event(first, dropped_messages=shape.dropped)
            async for burst in run.bursts(disconnect):  # one write per burst of ready events
                out = []
                for index, kind, text in burst:
                    # the logprobs of the tokens this event's text came from (each chunk carries its own); the
                    # mark is taken at every event, so records an event does not send go with the next one
                    mark = run.logprob_mark(index) if shape.scoring else None
                    logprobs = shape.logprobs(index, mark) if shape.scoring and not shape.tools else None
                    if shape.tools:  # text becomes content and tool-call deltas as the parser releases them
                        chunks = shape.tool_chunks(index, text if kind == "text" else "",
                                                   None if kind == "text" else run.jobs[index].outcome)
                        if chunks and shape.scoring:  # the logprobs of every token since the last chunk
                            chunks[0]["logprobs"] = shape.logprobs(index, mark)
                        out += [event([c]) for c in chunks]
                    elif kind == "text":
                        out.append(event([shape.chunk_choice(index, text, None, logprobs=logprobs)]))
                    elif run.jobs[index].outcome != "error":
                        out.append(event([shape.chunk_choice(index, None, _finish_reason(run.jobs[index].outcome),
                                                             logprobs=logprobs)]))
                yield "".join(out)
            failure = run.failure()
            if failure:
                yield sse_error(RuntimeError(failure))
            elif include_usage:
                usage = shape.head(shape.chunk_object)
                usage.update(choices=[], usage=_usage(shape.prompt_tokens, run))
                yield f"data: {json_dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            disconnect.cancel()
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**SSE_HEADERS, DROPPED_HEADER: str(shape.dropped)})


async def respond(request: HTTPRequest, body: SamplingFields, service: ModelService, requests: list[Request],
                  shape: ResponseShape) -> Any:
    if requests and requests[0].config.logprobs is not None:
        shape.scoring = [ChoiceLogprobs(shape.kind, service.tokenizer, r, echo=r.config.prompt_logprobs is not None)
                         for r in requests]
    run = Run(service.scheduler, requests)  # QueueFullError (429) before any byte is sent
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream(request, run, shape, include_usage)
    return await collect(request, run, shape)


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
    if body.max_completion_tokens is not None:  # OpenAI's newer name wins
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, param = body.max_tokens, "max_tokens"
    config = generation_config(body, service, max_tokens, service.config.default_max_tokens, param)
    spec = tool_spec(body)  # tools, tool_choice, parallel_tool_calls (chat/tools.py)
    config = structured_config(body, config, spec)  # response_format or a forced call: a grammar
    messages, tools = (spec or ToolSpec.none()).prompt(messages, service.chat.format.renders_tools)
    prompt_ids, dropped = service.chat.prompt(messages, config, tools)
    # a prompt too long is a 400 on messages; a schema that cannot be compiled a 400 on response_format. A grammar
    # compiles off the event loop: the first one also reads the vocabulary (about a second for 49k tokens)
    constrained = config.json_schema is not None or config.grammar is not None
    with structured_errors():
        if constrained:
            requests = await asyncio.to_thread(service.requests, prompt_ids, config, body.n)
        else:
            requests = service.requests(prompt_ids, config, body.n)
    shape = ResponseShape("chat", service.name, len(prompt_ids), dropped)
    if spec is not None and spec.active:
        shape.tools = [ChoiceTools(spec) for _ in requests]
    return await respond(request, body, service, requests, shape)


@router.post("/v1/completions")
async def completions(request: HTTPRequest) -> Any:
    body, service = await _accept(request, CompletionRequest)
    prompts = _prompt_ids(body.prompt, service)
    if body.echo and len(prompts) > 1:
        raise APIError(400, "echo is supported for one prompt at a time", param="echo")
    config = generation_config(body, service, body.max_tokens, 16)  # OpenAI's default for completions
    try:  # the engine checks each prompt against the model's vocabulary and context
        requests = [r for ids in prompts for r in service.requests(ids, config, body.n)]
    except ChatforgeError as e:
        raise _prompt_error(e) from None
    prefix = _echo_text(body.prompt, service) if body.echo else ""
    shape = ResponseShape("text", service.name, sum(len(p) for p in prompts), 0, prefix)
    return await respond(request, body, service, requests, shape)


def _prompt_ids(prompt: Any, service: ModelService) -> list[list[int]]:
    """A completions prompt (text, texts, token ids or lists of them) as lists of token ids; an empty
    prompt starts a fresh document (start_ids). The ids themselves are checked by the engine."""
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
    try:
        return [ids or start_ids(tok) for ids in prompts]
    except ChatforgeError as e:
        raise _prompt_error(e) from None


def _echo_text(prompt: Any, service: ModelService) -> str:
    """The first prompt as the client sent it (`echo`): its text, or its ids decoded. Not the start
    token an empty prompt is given (start_ids), which the client never sent."""
    first = prompt if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt[0]
    return first if isinstance(first, str) else service.tokenizer.decode(first)


def _prompt_error(e: ChatforgeError) -> APIError:
    """The engine's refusal of a completions prompt as a 400 on `prompt` (of a setting, on that setting)."""
    if isinstance(e, GenerationConfigError):  # the engine's check of logit_bias against the vocabulary
        return APIError(400, str(e), param=e.field)
    code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
    return APIError(400, str(e), param="prompt", code=code)


def model_card(service: ModelService) -> dict[str, Any]:
    return {"id": service.name, "object": "model", "created": service.created, "owned_by": "chatforge",
            "context_length": service.context}


def embedding_card(request: HTTPRequest) -> Optional[dict[str, Any]]:
    """The card of the embedding model served beside the chat model (`--embedding-model`), if any."""
    embedder = getattr(request.app.state, "embedder", None)
    if embedder is None:
        return None
    return {"id": embedder.name, "object": "model", "created": get_service(request).created, "owned_by": "chatforge",
            "context_length": embedder.embedder.max_length, "dimensions": embedder.embedder.dimensions}


@router.get("/v1/models")
async def list_models(request: HTTPRequest) -> dict[str, Any]:
    cards = [model_card(get_service(request)), embedding_card(request)]
    return {"object": "list", "data": [c for c in cards if c is not None]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: HTTPRequest, model_id: str) -> dict[str, Any]:
    service, embedding = get_service(request), embedding_card(request)
    if embedding is not None and model_id in request.app.state.embedder.aliases:
        return embedding
    service.check_model(model_id)
    return model_card(service)

