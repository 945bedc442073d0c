"""What the route handlers depend on: the pipeline interface, the service's limits and state, and
the ``Annotated`` dependency aliases (readiness and API-key checks) used in the routes.
"""

from __future__ import annotations

import hmac
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from fastapi import Depends, Request

from citeqa.api.batching import Batcher
from citeqa.api.errors import ApiError
from citeqa.api.metrics import Metrics
from citeqa.config import Settings
from citeqa.pipeline import AskArgs
from citeqa.types import Answer, Document, Hit


@runtime_checkable
class PipelineLike(Protocol):
    """What the service needs from ``citeqa.pipeline.Pipeline``.

    Optional extras, found with getattr: ``ask_many(list[AskArgs]) -> list[Answer]`` (batched
    generation), ``threshold_for(target_accuracy) -> float`` (calibrated reward model), and
    ``add_documents(list[Document]) -> dict[str, int]`` / ``delete_document(doc_id)`` (live
    index updates; they raise InvalidRequestError with status 404 or 409).
    """

    def ask(
        self,
        question: str,
        *,
        top_k: int | None = None,
        n_candidates: int | None = None,
        min_score: float | None = None,
    ) -> Answer: ...

    def search(self, query: str, k: int = 10) -> list[Hit]: ...

    def document(self, doc_id: str) -> Document: ...  # KeyError when unknown


@dataclass(frozen=True)
class ApiLimits:
    """Service limits; read from ``Settings`` attributes of the same name when it has them."""

    max_batch: int = 4  # requests generated together in one batch
    window_ms: float = 10.0  # how long the worker waits to fill a batch after its first request
    max_queue: int = 32  # requests waiting for the worker; more -> 503 with Retry-After
    request_timeout_s: float = 120.0  # a request waiting longer than this -> 504
    max_body_bytes: int = 64 * 1024  # larger request bodies -> 413
    retry_after_s: int = 2  # Retry-After sent with 503s
    shutdown_grace_s: float = 30.0  # how long shutdown lets queued/running batches finish
    disconnect_poll_s: float = 0.05  # how often a waiting request checks its client is still there

    @classmethod
    def from_settings(cls, settings: Any) -> ApiLimits:
        names = [f.name for f in fields(cls) if hasattr(settings, f.name)]
        return cls(**{name: getattr(settings, name) for name in names})


def parse_api_keys(raw: str) -> tuple[bytes, ...]:
    """``"k1, k2"`` -> ``(b"k1", b"k2")``; empty entries are ignored."""
    return tuple(k.strip().encode() for k in raw.split(",") if k.strip())


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
    limits: ApiLimits
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: tuple[bytes, ...] = ()
    pipeline: PipelineLike | None = None
    batcher: Batcher[AskArgs, Answer] | None = None
    updater: ThreadPoolExecutor | None = None  # runs document updates one at a time
    phase: Phase = "loading"
    load_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def not_ready_error(self) -> ApiError:
        headers = {"Retry-After": str(self.limits.retry_after_s)}
        if self.phase == "failed":
            return ApiError(503, "load_failed", f"the service failed to load: {self.load_error}")
        if self.phase == "shutting_down":
            return ApiError(503, "shutting_down", "the service is shutting down", headers=headers)
        return ApiError(503, "not_ready", "models are still loading; retry", headers=headers)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.citeqa
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def require_api_key(request: Request, state: StateDep) -> None:
    """When API keys are configured: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if not state.api_keys:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given is None or not key_matches(given, state.api_keys):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key; send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


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
    "ApiLimits",
    "AskArgs",
    "BatcherDep",
    "PipelineDep",
    "PipelineLike",
    "ServiceState",
    "StateDep",
    "key_matches",
    "parse_api_keys",
    "require_api_key",
]
