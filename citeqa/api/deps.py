"""What the route handlers depend on: the pipeline interface, the service's state, and
the ``Annotated`` dependency aliases (readiness and API-key checks) used in the routes.
"""

from __future__ import annotations

import hmac
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, Request

from citeqa.api.batching import Batcher
from citeqa.api.errors import ApiError
from citeqa.api.metrics import Metrics
from citeqa.config import Settings, parse_api_keys
from citeqa.ingest.fetch import Fetcher
from citeqa.types import Answer, AskArgs, Document, Hit


class PipelineLike(Protocol):
    """What the service needs from ``citeqa.pipeline.Pipeline`` (tests pass fakes of it)."""

    def check(self, args: AskArgs) -> AskArgs:
        """``args`` validated and resolved (InvalidRequestError when it cannot be asked)."""
        ...

    def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
        """Answers for a batch of checked requests, in order."""
        ...

    def search(self, query: str, k: int = 10) -> list[Hit]: ...

    def document(self, doc_id: str) -> Document: ...  # KeyError when unknown

    @property
    def index_version(self) -> str | None:
        """The version of the index answered from now (None: a retriever without versions).
        Optional: a pipeline without the attribute is read as None."""
        ...

    def list_documents(self, offset: int, limit: int) -> tuple[list[Document], int]:
        """Up to ``limit`` documents from position ``offset`` in index order, and the total."""
        ...

    def add_documents(self, documents: Sequence[Document]) -> dict[str, int]:
        """Passages indexed per doc_id (InvalidRequestError 409 for a doc_id already there)."""
        ...

    def delete_document(self, doc_id: str) -> None:
        """InvalidRequestError 404 for an unknown doc_id."""
        ...


def key_matches(candidate: str, keys: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every key (no early exit on a match)."""
    given = candidate.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


Phase = Literal["loading", "ready", "failed", "shutting_down"]


@dataclass
class ServiceState:
    """The running service: its pipeline and batcher once loaded, and where it is in its life."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: tuple[bytes, ...] = ()  # may do everything under /v1
    read_keys: tuple[bytes, ...] = ()  # may do all but change the index
    pipeline: PipelineLike | None = None
    batcher: Batcher[AskArgs, Answer] | None = None
    updater: ThreadPoolExecutor | None = None  # runs document updates one at a time
    fetcher: Fetcher | None = None  # fetches URLs posted to /v1/documents
    phase: Phase = "loading"
    load_error: str | None = None
    failed_stamp: tuple[Any, ...] | None = None  # the index's files when the load failed
    lock: threading.Lock = field(default_factory=threading.Lock)
    # counted on the event loop only: document updates waiting or running; by kind, work
    # running on a thread of the pool requests share (``admitted``: URL fetches, searches)
    pending_updates: int = 0
    running: Counter[str] = field(default_factory=Counter)
    # set once a shutdown's grace is over: answers still waiting get a 503 and running ones
    # stop at their next step (``app.begin_shutdown``)
    stopped: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Thread | None = None  # the shutdown's grace, once begun
    batches_done: bool = True  # whether the batcher stopped within that grace

    @property
    def keys_required(self) -> bool:
        """Whether API keys are configured (then every /v1 request shows one)."""
        return bool(self.api_keys or self.read_keys)

    @contextmanager
    def admitted(self, work: str, limit: int) -> Iterator[None]:
        """Hold one of ``limit`` places for ``work`` while the block runs; when all are held,
        a 503 (overloaded, retry later) rather than another request queued for a thread."""
        if self.running[work] >= limit:
            raise self.overloaded_error(f"{work} are at their limit ({limit} at once); retry "
                                        "later")
        self.running[work] += 1
        try:
            yield
        finally:
            self.running[work] -= 1

    def overloaded_error(self, message: str) -> ApiError:
        """The 503 for work turned away because too much is queued or running: retry later."""
        return ApiError(503, "overloaded", message,
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def not_ready_error(self, *, open_route: bool = False, foreign: bool = False) -> ApiError:
        """The 503 for a service not (or no longer) ready. On a route that needs no key
        (``open_route``: /readyz) of a service that has keys, or asked by a Host the service
        does not answer to (``foreign``), a failed load's cause (index paths, engine addresses)
        is left to the server log."""
        headers = {"Retry-After": str(self.settings.retry_after_s)}
        if self.phase == "failed":
            cause = ("see the server log" if open_route and (self.keys_required or foreign)
                     else self.load_error)
            return ApiError(503, "load_failed", f"the service failed to load: {cause}")
        if self.phase == "shutting_down":
            return ApiError(503, "shutting_down", "the service is shutting down", headers=headers)
        waits = (" (and for the generator engine, CITEQA_GENERATOR_URL, to answer)"
                 if self.settings.generator_url else "")
        return ApiError(503, "not_ready", f"models are still loading{waits}; retry",
                        headers=headers)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.citeqa
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


API_KEY_HEADER = "X-API-Key"  # beside ``Authorization: Bearer <key>``
# The same two ways, as OpenAPI security schemes (with_api_key_security).
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
}


Access = Literal["change", "read"]


def presented_access(request: Request, state: ServiceState) -> Access | None:
    """What the request's key may do: ``change`` (a key of ``api_keys``), ``read`` (of
    ``read_keys``) or None (no key, or a wrong one). ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``: either header may hold it (a proxy may add an empty other); one
    sent twice names no key (which would count?)."""
    if any(len(request.headers.getlist(h)) > 1 for h in ("authorization", API_KEY_HEADER)):
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = [g for g in (request.headers.get(API_KEY_HEADER),
                         token.strip() if scheme.lower() == "bearer" else None) if g is not None]
    if any(key_matches(g, state.api_keys) for g in given):
        return "change"
    if any(key_matches(g, state.read_keys) for g in given):
        return "read"
    return None


def require_api_key(request: Request, state: StateDep) -> None:
    """When API keys are configured: one of them (a read key or one that may change the index),
    as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if not state.keys_required:
        return
    if presented_access(request, state) is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key; send 'Authorization: Bearer <key>' or "
            f"'{API_KEY_HEADER}: <key>', each header once",
            headers={"WWW-Authenticate": "Bearer"},
        )


def may_change(request: Request, state: ServiceState) -> bool:
    """Whether the request may change the index: any request where no keys are configured, else
    one with a key of ``api_keys``."""
    return not state.keys_required or presented_access(request, state) == "change"


def require_change_key(request: Request, state: StateDep) -> None:
    """For a route that changes the index: when API keys are configured, a key that may change
    it (one of ``api_keys``); a read key gets 403 (after ``require_api_key``'s 401 for none)."""
    if not may_change(request, state):
        require_api_key(request, state)
        how = ("changes need a key of the service's CITEQA_API_KEYS" if state.api_keys else
               "this service has read keys only: it takes no changes over HTTP")
        raise ApiError(403, "forbidden", "this API key may ask, search and read documents but "
                       f"not change the index; {how}")


def changes_index(route: object) -> bool:
    """Whether ``route`` (a request's matched route) is one that changes the index."""
    return any(getattr(d, "dependency", None) is require_change_key
               for d in getattr(route, "dependencies", ()))


def require_api_key_on_v1(request: Request) -> None:
    """``require_api_key`` (``require_change_key`` where the route changes the index) for a
    request whose route is under /v1 (the routes that need a key), for error handlers that
    answer before the route's dependencies ran."""
    route = request.scope.get("route")
    if getattr(route, "path", "").startswith("/v1/"):
        check = require_change_key if changes_index(route) else require_api_key
        check(request, get_state(request))


def with_api_key_security(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (changed in place and returned) saying that every /v1 operation needs an
    API key, in either header; idempotent."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/v1/"):
            for operation in operations.values():
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
    return schema


def get_pipeline(state: StateDep) -> PipelineLike:
    if state.phase != "ready" or state.pipeline is None:
        raise state.not_ready_error()
    return state.pipeline


def get_batcher(state: StateDep) -> Batcher[AskArgs, Answer]:
    if state.phase != "ready" or state.batcher is None:
        raise state.not_ready_error()
    return state.batcher


PipelineDep = Annotated[PipelineLike, Depends(get_pipeline)]
BatcherDep = Annotated[Batcher[AskArgs, Answer], Depends(get_batcher)]

__all__ = [
    "AskArgs",
    "BatcherDep",
    "PipelineDep",
    "PipelineLike",
    "ServiceState",
    "StateDep",
    "key_matches",
    "parse_api_keys",
    "may_change",
    "presented_access",
    "require_api_key",
    "require_api_key_on_v1",
    "require_change_key",
    "with_api_key_security",
]
