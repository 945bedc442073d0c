"""Service metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms are kept in plain dicts under one lock; ``render`` turns them into text.
Labels are the route *template* (``/v1/documents/{doc_id}``), never the raw path, so a client
cannot blow up the number of series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; generation on CPU takes ~0.1 s to tens of seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32)
# Other methods are counted as "OTHER" so that clients cannot create new series at will.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def escape_label(value: str) -> str:
    """Escape a label value as the exposition format requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_labels(labels: Sequence[tuple[str, str]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels) + "}"


def format_value(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds (+Inf implied)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, non-cumulative; last = +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: Sequence[tuple[str, str]]) -> list[str]:
        out, cum = [], 0
        for b, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cum += c
            le = format_labels([*labels, ("le", format_value(b))])
            out.append(f"{name}_bucket{le} {cum}")
        out.append(f"{name}_sum{format_labels(labels)} {format_value(self.total)}")
        out.append(f"{name}_count{format_labels(labels)} {self.n}")
        return out


class Metrics:
    """The service's counters, histograms and gauges (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (route, method, status) -> count
        self.latency: dict[str, Histogram] = {}  # route -> seconds
        self.answers = 0
        self.declines = 0
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.skipped = 0  # queued requests cancelled before they ran
        self.queue_depth: Callable[[], int] = lambda: 0  # set once the batcher exists

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_answer(self, declined: bool) -> None:
        with self._lock:
            self.answers += 1
            self.declines += int(declined)

    def observe_batch(self, size: int, skipped: int) -> None:
        with self._lock:
            if size:
                self.batch_sizes.observe(size)
            self.skipped += skipped

    def render(self) -> str:
        """The exposition text: HELP and TYPE lines, then samples, ending with a newline."""
        with self._lock:
            lines = [
                "# HELP citeqa_requests_total HTTP requests by route template, method and status.",
                "# TYPE citeqa_requests_total counter",
            ]
            for (route, method, status), n in sorted(self.requests.items()):
                labels = [("route", route), ("method", method), ("status", status)]
                lines.append(f"citeqa_requests_total{format_labels(labels)} {n}")
            lines += [
                "# HELP citeqa_request_duration_seconds HTTP request latency by route template.",
                "# TYPE citeqa_request_duration_seconds histogram",
            ]
            for route, h in sorted(self.latency.items()):
                lines += h.lines("citeqa_request_duration_seconds", [("route", route)])
            lines += [
                "# HELP citeqa_answers_total Answers returned (declines included).",
                "# TYPE citeqa_answers_total counter",
                f"citeqa_answers_total {self.answers}",
                "# HELP citeqa_declines_total Answers that declined to answer.",
                "# TYPE citeqa_declines_total counter",
                f"citeqa_declines_total {self.declines}",
                "# HELP citeqa_batch_size Requests run together in one generation batch.",
                "# TYPE citeqa_batch_size histogram",
                *self.batch_sizes.lines("citeqa_batch_size", []),
                "# HELP citeqa_cancelled_total Queued requests skipped: cancelled before they ran.",
                "# TYPE citeqa_cancelled_total counter",
                f"citeqa_cancelled_total {self.skipped}",
                "# HELP citeqa_queue_depth Requests waiting for the generation worker.",
                "# TYPE citeqa_queue_depth gauge",
                f"citeqa_queue_depth {self.queue_depth()}",
            ]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before starting a response
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router stores the matched route in the (shared) scope dict.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.observe_request(route, method, status, time.perf_counter() - t0)
