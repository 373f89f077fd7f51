"""Prometheus text-format metrics, written by hand: counters, gauges and histograms with labels.

Small enough not to need prometheus_client; every metric is thread-safe because the scheduler
thread and the HTTP event loop both update them.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Optional, Sequence

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (from a callback), or set directly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Optional[Callable[[], float]] = None):
        super().__init__(name, help)
        self._read, self._value = read, 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def _samples(self) -> list[str]:
        return [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[LabelValues, list] = {}  # key -> [bucket counts..., sum, count]
        if not labels:  # shown (as zeros) before the first observation
            self._data[()] = [0] * len(self.buckets) + [0.0, 0]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            row = self._data.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                row[i] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            row = self._data.get(self._key(labels))
            return row[-1] if row else 0

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        lines = []
        for key, row in items:
            cumulative = 0
            for bound, n in zip(self.buckets, row):
                cumulative += n
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {row[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(row[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {row[-1]}")
        return lines


class Metrics:
    """Everything /metrics shows. Gauges that mirror live state read it through callbacks set later."""

    def __init__(self) -> None:
        self.requests = Counter("chatforge_requests_total", "HTTP requests answered, by route and status code",
                                ("route", "status"))
        self.request_seconds = Histogram("chatforge_request_duration_seconds",
                                         "time from request to the end of the response, by route",
                                         LATENCY_BUCKETS, ("route",))
        self.prompt_tokens = Counter("chatforge_prompt_tokens_total", "prompt tokens of admitted generations")
        self.completion_tokens = Counter("chatforge_completion_tokens_total", "tokens generated")
        self.generations = Counter("chatforge_generations_total",
                                   "finished generations, by finish reason (stop, length, cancelled, error)",
                                   ("finish_reason",))
        self.rejected = Counter("chatforge_rejected_total", "generations refused with 429 because the queue was full")
        self.ttft = Histogram("chatforge_time_to_first_token_seconds",
                              "from admission to the first generated token", LATENCY_BUCKETS)
        self.itl = Histogram("chatforge_inter_token_latency_seconds", "time between two tokens of one generation",
                             TOKEN_GAP_BUCKETS)
        self.batch_size = Histogram("chatforge_batch_size", "sequences in each forward pass of the scheduler",
                                    BATCH_BUCKETS)
        self.queue_depth = Gauge("chatforge_queue_depth", "generations waiting for a batch slot")
        self.active = Gauge("chatforge_active_sequences", "generations in the running decode batch")
        self.model_loaded = Gauge("chatforge_model_loaded", "1 once the model is loaded and serving")

    def bind(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        """Read the scheduler's live numbers at scrape time."""
        self.queue_depth._read, self.active._read = queue_depth, active

    def render(self) -> str:
        metrics = [self.requests, self.request_seconds, self.prompt_tokens, self.completion_tokens, self.generations,
                   self.rejected, self.ttft, self.itl, self.batch_size, self.queue_depth, self.active,
                   self.model_loaded]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
