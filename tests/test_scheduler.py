"""The serving scheduler on its own thread: joining a running batch, trimming its cache, cancelling, 429."""
from __future__ import annotations

import threading

import pytest
import torch

from chatforge.engine import Engine, GenerationConfig
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.scheduler import QueueFullError, Scheduler, trim_cache

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = GenerationConfig(temperature=0, stop_token_ids=[])


@pytest.fixture(scope="module")
def engine():
    return Engine(*load(DEMO_MODEL, device="cpu"))


class Collector:
    """Texts and ends per job, with an event set once a job ends."""

    def __init__(self):
        self.texts, self.ended = {}, {}

    def __call__(self, job, kind, text):
        if kind == "text":
            self.texts[id(job)] = self.texts.get(id(job), "") + text
        else:
            self.ended.setdefault(id(job), threading.Event()).set()

    def wait(self, job, timeout=60):
        assert self.ended.setdefault(id(job), threading.Event()).wait(timeout), "job did not end"
        return self.texts.get(id(job), "")


def test_a_late_joiner_matches_its_solo_run_across_cache_trimming(engine):
    tok = engine.tokenizer
    first, late = tok.encode("Once upon a time"), tok.encode("The quick brown fox")
    solo = engine.generate(late, GREEDY.replace(max_new_tokens=120))[0].text
    scheduler = Scheduler(engine, max_batch=4, max_queue=4).start()
    seen = Collector()
    progress = threading.Event()
    lengths = []

    def on_event(job, kind, text):
        seen(job, kind, text)
        if job.request.completion_tokens >= 100:
            progress.set()
        if scheduler._state is not None and scheduler._state.cache is not None:
            lengths.append(scheduler._state.cache.length)

    try:
        [a] = scheduler.submit([engine.request(first, GREEDY.replace(max_new_tokens=140), incremental=True)], on_event)
        assert progress.wait(60)
        [b] = scheduler.submit([engine.request(late, GREEDY.replace(max_new_tokens=120), incremental=True)], on_event)
        seen.wait(a)
        assert seen.wait(b) == solo and b.outcome == "length"
        # once the first request left, the slots only it had used were cut off the cache
        assert min(lengths[lengths.index(max(lengths)):]) < max(lengths) - 64
    finally:
        scheduler.stop()


def test_cancel_and_a_full_queue(engine):
    scheduler = Scheduler(engine, max_batch=1, max_queue=1).start()
    seen = Collector()
    long = GREEDY.replace(max_new_tokens=400)
    try:
        [running] = scheduler.submit([engine.request([1, 2, 3], long, incremental=True)], seen)
        [waiting] = scheduler.submit([engine.request([1, 2, 3], long, incremental=True)], seen)
        with pytest.raises(QueueFullError, match="--max-queue"):
            scheduler.submit([engine.request([1, 2, 3], long, incremental=True)], seen)
        scheduler.cancel(waiting)
        seen.wait(waiting)
        assert waiting.outcome == "cancelled" and waiting.request.completion_tokens == 0
        scheduler.cancel(running)
        seen.wait(running)
        assert running.outcome == "cancelled" and running.request.completion_tokens < 400
        assert scheduler.active == 0 and scheduler.queue_depth == 0
        assert scheduler.metrics.generations.value(finish_reason="cancelled") == 2
        assert scheduler.call(lambda: 6 * 7).result(30) == 42  # work run on the model's thread
    finally:
        scheduler.stop()


def test_trim_cache_keeps_only_live_slots(engine):
    state = engine.start([engine.tokenizer.encode("Hello there, my old friend. " * 5)], GREEDY.replace(max_new_tokens=3))
    state.step()
    cache = state.cache
    with torch.inference_mode():  # the cache's tensors were made in inference mode
        cache.valid[:, :10] = False  # pretend the first 10 slots belonged to rows that have gone
        length, k = cache.length, cache.k[:, :, :, 10:cache.length].clone()
        trim_cache(cache, slack=4)
    assert cache.length == length - 10 and bool(cache.valid[:, :cache.length].all())
    assert (cache.k[:, :, :, :cache.length] == k).all()


def test_first_tokens_are_flushed_before_the_next_decoding_step(engine):
    """Time to first token: a newcomer's first token is handed on (flushed) straight after its prefill,
    both into an idle scheduler and into a running batch, not after the batch's next step."""
    scheduler = Scheduler(engine, max_batch=4, max_queue=4)
    seen = Collector()
    first = engine.request([1, 2, 3], GREEDY.replace(max_new_tokens=200), incremental=True)
    joiner = engine.request([4, 5, 6, 7], GREEDY.replace(max_new_tokens=8), incremental=True)
    at_flush: list[tuple[int, int]] = []  # completion tokens of the two requests at each flush (on the model's thread)
    scheduler.add_flush_hook(lambda: at_flush.append((first.completion_tokens, joiner.completion_tokens)))
    started = threading.Event()

    def on_event(job, kind, text):
        seen(job, kind, text)
        if job.request.completion_tokens >= 5:
            started.set()

    scheduler.start()
    try:
        [a] = scheduler.submit([first], on_event)
        assert started.wait(60)
        [b] = scheduler.submit([joiner], on_event)
        seen.wait(b)
        scheduler.cancel(a)
        seen.wait(a)
    finally:
        scheduler.stop()
    assert at_flush[0] == (1, 0)  # the first request alone, right after its prefill
    joined = [counts for counts in at_flush if counts[1] > 0]
    assert joined[0][1] == 1 and joined[1][1] == 2  # the joiner's first token, then one per step
    assert joined[1][0] == joined[0][0] + 1  # the running request did not step in between
