"""Service metrics for Prometheus, kept with ``prometheus_client`` in one registry per app.

Labels are the route *template* (``/v1/documents/{doc_id}``), never the raw path, and methods
outside ``METHODS`` count as "OTHER", so a client cannot blow up the number of series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4  # what Prometheus scrapes by default

# Seconds; generation on CPU takes ~0.1 s to tens of seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# No ``*_created`` series next to every counter and histogram: nothing here reads them.
prometheus_client.disable_created_metrics()


class Metrics:
    """The service's counters, histograms and gauges (thread-safe, as prometheus_client is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("citeqa_requests_total",
                                "HTTP requests by route template, method and status.",
                                ("route", "method", "status"), registry=r)
        self.latency = Histogram("citeqa_request_duration_seconds",
                                 "HTTP request latency by route template.", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.answers = Counter("citeqa_answers_total", "Answers returned (declines included).",
                               registry=r)
        self.declines = Counter("citeqa_declines_total", "Answers that declined to answer.",
                                registry=r)
        self.batch_sizes = Histogram("citeqa_batch_size",
                                     "Requests run together in one generation batch.",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.cancelled = Counter("citeqa_cancelled_total",
                                 "Queued requests skipped: cancelled before they ran.", registry=r)
        self.closed = Counter("citeqa_connections_closed_total",
                              "Connections closed by the HTTP protocol: head_timeout (a "
                              "partial head, answered 408), silent (nothing sent), unread_body "
                              "(a body answered unread kept coming), unread_response (the client "
                              "stopped reading its response), too_many_connections (its "
                              "address held CITEQA_MAX_CONNECTIONS_PER_CLIENT, answered 503).",
                              ("reason",), registry=r)
        self._queue_depth = Gauge("citeqa_queue_depth",
                                  "Requests waiting for the generation worker.", registry=r)
        self._queue_depth.set_function(lambda: 0)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue-depth gauge from ``depth()`` (set once the batcher exists)."""
        self._queue_depth.set_function(depth)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_answer(self, declined: bool) -> None:
        self.answers.inc()
        if declined:
            self.declines.inc()

    def observe_batch(self, size: int, skipped: int) -> None:
        if size:
            self.batch_sizes.observe(size)
        if skipped:
            self.cancelled.inc(skipped)

    def observe_closed(self, reason: str) -> None:
        """A connection the HTTP protocol closed (``api/protocol.py``): a slow client, or one
        over its address's cap."""
        self.closed.labels(reason).inc()

    def render(self) -> str:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")


def route_label(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The matched route's template, from the (shared) scope the router filled in: FastAPI's
    routes store themselves as ``route``; plain Starlette routes (FastAPI's own /openapi.json)
    only their ``endpoint``, so the app's route with that endpoint is looked up. A request
    refused before routing (a body over the limit, a wrong Host) is matched here against the
    app's plain routes and ``routes`` (those of its included routers, which FastAPI's
    ``app.routes`` wraps without their templates). "unmatched" when no route matches its
    path (a 404), so that made-up paths cannot grow the label set."""
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    candidates = [*getattr(scope.get("app"), "routes", ()), *routes]
    if route is None and endpoint is not None:
        route = next((r for r in candidates if getattr(r, "endpoint", None) is endpoint), None)
    if route is None and endpoint is None:
        route = next((r for r in candidates if hasattr(r, "path_format")
                      and r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path_format", None) or "unmatched"


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = tuple(routes)  # see route_label

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
            route = route_label(scope, self.routes)
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.observe_request(route, method, status, time.perf_counter() - t0)
