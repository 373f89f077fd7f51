"""The batching scheduler: one thread owns the model and decodes every active request together.

HTTP handlers submit engine Requests and get Jobs back; the thread admits waiting jobs into the
running DecodeState with `join()` (continuous batching: a newcomer never waits for the batch to
end), steps the batch one token at a time, and hands each job its text through a callback. A
bounded queue refuses work at once (QueueFullError, HTTP 429) instead of letting latency grow
without limit, and a cancelled job (its client went away) leaves the batch at the next step.

Everything that touches the model, including `call()`ed work such as token inspection, runs on
this one thread, so forward passes never compete for the CPU or race on the model.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Optional

from chatforge.engine import DecodeState, Engine, Request
from chatforge.engine.kv_cache import KVCache
from chatforge.errors import ChatforgeError
from chatforge.server.metrics import Metrics

log = logging.getLogger("chatforge.server")

# a job's events: ("text", piece) as text becomes safe to show, then ("end", "") once
EventCallback = Callable[["Job", str, str], None]


class QueueFullError(ChatforgeError):
    """Every batch slot and queue place is taken: try again shortly (HTTP 429)."""


class Job:
    """One request's way through the scheduler. `outcome` is its finish reason, "cancelled" or "error"."""

    def __init__(self, request: Request, on_event: EventCallback) -> None:
        self.request = request
        self.on_event = on_event
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.counted = 0  # completion tokens already in the metrics (a speculative step gives several)
        self.cancelled = False
        self.outcome: Optional[str] = None
        self.error: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def _emit(self, kind: str, text: str = "") -> None:
        try:
            self.on_event(self, kind, text)
        except Exception:  # a consumer that has gone (its event loop closed) must not stop the batch
            log.debug("dropped an event for a finished consumer", exc_info=True)


class Scheduler:
    """Continuous batching over one Engine, on a thread of its own."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64,
                 metrics: Optional[Metrics] = None) -> None:
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # id(request) -> job, the requests in self._state
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._state: Optional[DecodeState] = None
        self._stopping = False
        self._flush_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="chatforge-scheduler", daemon=True)
        self.metrics.bind(lambda: self.queue_depth, lambda: self.active)

    # --- called from the HTTP side ---------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def add_flush_hook(self, flush: Callable[[], None]) -> None:
        """Call `flush()` whenever a burst of events is out (after each step, cancellation or failure):
        consumers may batch the events they receive until then."""
        self._flush_hooks.append(flush)

    def _flush(self) -> None:
        for flush in self._flush_hooks:
            flush()

    def submit(self, requests: list[Request], on_event: EventCallback) -> list[Job]:
        """Queue these requests (all or none) and return their jobs; QueueFullError when there is no room."""
        jobs = [Job(r, on_event) for r in requests]
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            in_flight = len(self._waiting) + len(self._active)
            if in_flight + len(jobs) > self.max_batch + self.max_queue:
                self.metrics.rejected.inc(len(jobs))
                raise QueueFullError(f"the server is busy: {len(self._active)} generations running and "
                                     f"{len(self._waiting)} waiting (the limit is --max-batch {self.max_batch} "
                                     f"+ --max-queue {self.max_queue}); retry shortly")
            self._waiting.extend(jobs)
            self._cond.notify()
        for job in jobs:
            self.metrics.prompt_tokens.inc(len(job.request.prompt_ids))
        return jobs

    def cancel(self, job: Job) -> None:
        """Stop a job (its client disconnected): a waiting job ends now, a running one at the next step."""
        with self._cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job)
            self._cond.notify()
        self._flush()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the model's thread between two decode steps; its result comes back in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is waiting or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the model's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._calls or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._shut_down()
                    self._flush()
                    return
                calls, self._calls = self._calls, []
                admitted = self._admit()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # delivered to the caller, who turns it into a response
                        future.set_exception(e)
            try:
                self._step(admitted)
            except Exception as e:  # a bug or out of memory: fail this batch, keep serving the next
                log.exception("the decode step failed; ending the %d generations in the batch", len(self._active))
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            self._flush()

    def _admit(self) -> list[Job]:
        """Move waiting jobs into free batch slots (called with the lock held)."""
        admitted = []
        while self._waiting and len(self._active) < self.max_batch:
            job = self._waiting.popleft()
            self._active[id(job.request)] = job
            admitted.append(job)
        return admitted

    def _step(self, admitted: list[Job]) -> None:
        """Prefill the newcomers into the running batch, then decode one token for every row."""
        if admitted:
            newcomer = DecodeState(self.engine, [j.request for j in admitted])
            self.metrics.batch_size.observe(len(admitted))
            if self._state is None or self._state.done:
                self._state = newcomer
                self._dispatch(newcomer.step())
            else:
                self._dispatch(self._state.join(newcomer))
            self._flush()  # the newcomers' first tokens go out now, not a decoding step of the whole batch later
        state = self._state
        if state is None or state.done:
            return
        for request in state.requests:  # cancelled rows finish (and leave the batch) at this step
            if self._active[id(request)].cancelled:
                request.cancel()
        self.metrics.batch_size.observe(len(state.requests))
        self._dispatch(state.step())

    def _dispatch(self, out: list[tuple[Request, str]]) -> None:
        """Hand each row's new text to its job; end the jobs whose request finished."""
        now = time.perf_counter()
        finished = False
        for request, piece in out:
            job = self._active[id(request)]
            self._record_token(job, now)
            if piece and not job.cancelled:
                job._emit("text", piece)
            if request.done:
                with self._cond:
                    del self._active[id(request)]
                    self._finish(job)
                finished = True
        if finished and self._state is not None:
            if self._state.done:
                self._state = None  # free the KV cache
            elif self._state.cache is not None:
                trim_cache(self._state.cache)

    def _record_token(self, job: Job, now: float) -> None:
        m = self.metrics
        m.completion_tokens.inc(job.request.completion_tokens - job.counted)
        job.counted = job.request.completion_tokens
        if job.first_token_at is None:
            job.first_token_at = now
            m.ttft.observe(now - job.submitted)
        else:
            m.itl.observe(now - job.last_token_at)
        job.last_token_at = now

    def _finish(self, job: Job, error: Optional[str] = None) -> None:
        if error is not None:
            job.outcome, job.error = "error", error
        elif job.cancelled:
            job.outcome = "cancelled"
        else:
            job.outcome = job.request.finish_reason
        self.metrics.generations.inc(finish_reason=job.outcome)
        job._emit("end")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            jobs = list(self._active.values())
            self._active.clear()
            self._state = None
            for job in jobs:
                self._finish(job, error=message)

    def _shut_down(self) -> None:
        """End every job as cancelled (called with the lock held)."""
        jobs = list(self._waiting) + list(self._active.values())
        self._waiting.clear()
        self._active.clear()
        self._state = None
        for job in jobs:
            job.cancelled = True
            self._finish(job)
        for _, future in self._calls:
            future.cancel()
        self._calls = []


def trim_cache(cache: KVCache, slack: int = 64) -> None:
    """Drop the cache slots no row can attend to any more, once there are at least `slack` of them.

    Rows join a running batch right-aligned, so a batch that never empties would keep growing
    its cache (and the attention work of every step) with slots that only old, finished rows
    used. Trimming copies the cache, so it waits until enough leading slots are dead.
    """
    if cache.length <= slack:
        return
    first = cache.dead_prefix()
    if first >= slack:
        cache.trim(first)
