"""The loaded model as the HTTP layer sees it, and the bridge from the scheduler thread to asyncio.

ModelService holds the engine, the chat format and the scheduler; Run is one HTTP request's
jobs, whose events arrive in the event loop; parse_body turns a request body into a checked
pydantic model or an OpenAI-shaped 400.
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import weakref
from typing import Any, AsyncIterator, Optional, Sequence, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HTTPRequest

from chatforge.chat.session import ChatModel
from chatforge.engine import Engine, GenerationConfig, Request
from chatforge.engine.generation import derived_seed
from chatforge.server.bodies import read_json
from chatforge.server.settings import ServeConfig
from chatforge.server.errors import APIError, NotFoundError
from chatforge.server.metrics import Metrics
from chatforge.server.scheduler import Job, Scheduler

M = TypeVar("M", bound=BaseModel)


class ModelService:
    """One model served: its names, context, chat formatting and batching scheduler."""

    def __init__(self, model, tokenizer, config: ServeConfig, metrics: Metrics, name: str):
        self.engine = Engine(model, tokenizer, speculative=config.speculation)
        self.tokenizer = tokenizer
        self.chat = ChatModel(self.engine)
        self.config = config
        self.name = name
        self.aliases = {name, config.model or name}
        self.context = self.engine.context
        self.created = int(time.time())
        self.scheduler = Scheduler(self.engine, config.max_batch, config.max_queue, metrics).start()

    @property
    def max_tokens_cap(self) -> int:
        """The largest max_tokens a request may ask for: the context less one prompt token, or the flag."""
        cap = self.context - 1
        return min(cap, self.config.max_tokens) if self.config.max_tokens else cap

    def check_model(self, requested: Optional[str]) -> None:
        if requested is not None and requested not in self.aliases:
            raise NotFoundError(f"the model {requested!r} does not exist here; this server serves {self.name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def check_max_tokens(self, value: Optional[int], param: str = "max_tokens") -> None:
        if value is None:
            return
        if value > self.max_tokens_cap:
            why = (f"the model's context is {self.context} tokens" if self.max_tokens_cap == self.context - 1
                   else f"this server allows at most {self.max_tokens_cap} (--max-tokens)")
            raise APIError(400, f"{param} is {value}, but {why}; ask for at most {self.max_tokens_cap}",
                           param=param, code="context_length_exceeded")

    def requests(self, prompt_ids: Sequence[int], config: GenerationConfig, n: int = 1) -> list[Request]:
        """n engine requests for one prompt; with a seed, choice i samples with seed + i (distinct, reproducible;
        wrapped to 64 bits, so a seed near the limit still gives n seeds)."""
        out = []
        for i in range(n):
            cfg = config if config.seed is None or i == 0 else config.replace(seed=derived_seed(config.seed, i))
            out.append(self.engine.request(prompt_ids, cfg, incremental=True))
        return out

    def stop(self) -> None:
        self.scheduler.stop()


def get_service(request: HTTPRequest) -> ModelService:
    """The app's loaded model; 503 while it is still loading (or failed to)."""
    state = request.app.state
    service = getattr(state, "service", None)
    if service is not None:
        return service
    failed = getattr(state, "load_error", None)
    message = (f"the model failed to load: {failed}" if failed is not None
               else "the model is still loading; retry shortly (GET /health answers 200 once it is ready)")
    raise APIError(503, message, type="service_unavailable", code="model_loading", headers={"Retry-After": "1"})


class ClientGone(Exception):
    """The client closed the connection while its reply was being generated."""


class Mailbox:
    """Events from the scheduler thread into one event loop, delivered once per decode step.

    Waking a loop from another thread costs a system call; a step of 16 sequences would otherwise
    pay 16 of them. `post` only collects; the scheduler calls `flush` when a step's events are out.
    """

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._armed = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, scheduler: Scheduler) -> "Mailbox":
        """The loop's mailbox, flushed by `scheduler` after each step."""
        if loop not in cls._by_loop:
            cls._by_loop[loop] = box = cls(loop)
            scheduler.add_flush_hook(box.flush)
        return cls._by_loop[loop]

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Put `item` on `queue` at the next flush (from any thread)."""
        self._items.append((queue, item))

    def flush(self) -> None:
        """Wake the loop to deliver what was posted (one wake-up, however many items)."""
        with self._lock:
            if self._armed or not self._items:
                return
            self._armed = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to read
            self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            self._armed = False
        while self._items:
            queue, item = self._items.popleft()
            queue.put_nowait(item)


class Run:
    """The jobs of one HTTP request, with their events delivered into this event loop."""

    def __init__(self, scheduler: Scheduler, requests: list[Request]):
        mailbox = Mailbox.of(asyncio.get_running_loop(), scheduler)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._scheduler = scheduler

        # per job that records logprobs: how many records it had at each of its events, so a stream can send
        # each chunk the records of its own tokens (the scheduler runs ahead of the event loop)
        self._marks: dict[int, collections.deque[int]] = collections.defaultdict(collections.deque)

        def deliver(job: Job, kind: str, text: str) -> None:  # on the scheduler thread
            if job.request.logprobs is not None:
                self._marks[id(job)].append(len(job.request.logprobs))
            mailbox.post(self._queue, (job, kind, text))

        self.jobs = scheduler.submit(requests, deliver)
        self._index = {id(j): i for i, j in enumerate(self.jobs)}

    def logprob_mark(self, index: int) -> Optional[int]:
        """How many logprob records choice `index` had when its event now being handled was sent (call once per
        event, in order); None when it records none."""
        marks = self._marks.get(id(self.jobs[index]))
        return marks.popleft() if marks else None

    async def bursts(self, disconnect: Optional[asyncio.Future] = None
                     ) -> AsyncIterator[list[tuple[int, str, str]]]:
        """Lists of (choice index, "text" | "end", text): every event that is ready, until all jobs have ended.

        A consumer that writes one response chunk per burst makes fewer, larger writes when it falls
        behind. ClientGone if `disconnect` fires first.
        """
        remaining = len(self.jobs)
        while remaining:
            if disconnect is None:
                first = await self._queue.get()
            else:
                get = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone()
                first = get.result()
            burst = [first]
            while not self._queue.empty():
                burst.append(self._queue.get_nowait())
            remaining -= sum(kind == "end" for _, kind, _ in burst)
            yield [(self._index[id(job)], kind, text) for job, kind, text in burst]

    async def events(self, disconnect: Optional[asyncio.Future] = None) -> AsyncIterator[tuple[int, str, str]]:
        """The events of `bursts`, one at a time."""
        async for burst in self.bursts(disconnect):
            for event in burst:
                yield event

    def cancel(self) -> None:
        """Stop every job that is still going (idempotent)."""
        for job in self.jobs:
            self._scheduler.cancel(job)

    def failure(self) -> Optional[str]:
        return next((j.error for j in self.jobs if j.outcome == "error"), None)


def watch_disconnect(request: HTTPRequest) -> asyncio.Task:
    """A task that finishes when the client disconnects. Start it only after the body has been read."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


async def parse_body(request: HTTPRequest, model: type[M]) -> M:
    """The JSON body checked against `model`; malformed JSON and wrong fields are a 400 naming the field."""
    raw = await request.body()
    data = read_json(raw, request.app.state.config.max_message_chars) if raw.strip() else None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p)) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None


def _is_type_tag(part: Any) -> bool:
    """pydantic names the member of a Union it tried (`str`, `list[int]`) in an error's location: not a field."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"}
                                      or part.startswith("function-"))


def json_dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
