"""The FastAPI application: ``create_app(settings)`` wires routes, limits, errors and lifespan.

Models and index load in the lifespan, in a background thread, so ``/healthz`` answers at once
and ``/readyz`` is 503 until the pipeline is loaded (and again while shutting down, which a
probe rarely sees: uvicorn stops taking connections before the lifespan ends). Every
``index_reload_s`` the service looks whether another writer changed its index on disk, and then
serves that one (``Pipeline.reload_index``); after a failed load, it loads again once the
index's files change (a damaged index rebuilt), without a restart. Generation
runs on one worker thread behind a bounded queue (``batching.Batcher``); the event loop only
awaits futures.

Authentication: when ``settings.api_keys`` or ``settings.read_api_keys`` is set, every ``/v1/*``
route needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, and the routes that change
the index (POST and DELETE ``/v1/documents``) a key of ``api_keys`` (a read key gets 403).
The page (``/``, ``/documents``, ``/document``), ``/healthz``, ``/readyz``, ``/metrics`` and
``/openapi.json`` stay open (they reveal no corpus content: the page fetches it from ``/v1``
with the key typed into it). The
Swagger and ReDoc pages are off: they load scripts from a CDN, which the page's CSP forbids.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

import citeqa
from citeqa.api.batching import Batcher, BatchStats
from citeqa.api.deps import (
    PipelineLike,
    ServiceState,
    parse_api_keys,
    require_api_key,
    require_api_key_on_v1,
    require_change_key,
    with_api_key_security,
)
from citeqa.api.errors import install_error_handlers
from citeqa.api.metrics import MetricsMiddleware
from citeqa.api.middleware import (
    AbsoluteFormMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    SecurityHeadersMiddleware,
    UnexpectedErrorMiddleware,
    host_name,
    page_csp,
)
from citeqa.api.routes import make_run_batch, ops_router, v1_router
from citeqa.atomic import files_stamp
from citeqa.config import Settings
from citeqa.errors import CiteqaError
from citeqa.ingest import Fetcher, FetchPolicy
from citeqa.types import Answer, AskArgs

logger = logging.getLogger(__name__)

PipelineFactory = Callable[[Settings], PipelineLike]
STATIC_DIR = Path(__file__).parent / "static"


def default_pipeline_factory(settings: Settings) -> PipelineLike:
    """The real pipeline, imported only when the service starts loading, warmed up with one
    question (``Pipeline.warm_up``); a warm-up that fails is logged and the service serves."""
    from citeqa.pipeline import Pipeline  # heavy: torch, transformers, faiss

    pipeline = Pipeline.from_settings(settings)
    try:
        seconds = pipeline.warm_up()
    except CiteqaError as exc:  # e.g. a remote engine's hiccup: each request reports its own
        logger.warning("the warm-up question failed, serving anyway: %s", exc)
    else:
        logger.info("warm-up question answered in %.1f s", seconds)
    return pipeline


# -- lifecycle --------------------------------------------------------------------------------


def _load(state: ServiceState, factory: PipelineFactory) -> None:
    """Build the pipeline and the batcher (in a background thread), then mark ready."""
    try:
        pipeline = factory(state.settings)
        settings = state.settings

        def on_batch(stats: BatchStats) -> None:
            state.metrics.observe_batch(stats.size, stats.skipped)

        batcher: Batcher[AskArgs, Answer] = Batcher(
            make_run_batch(pipeline),
            max_batch=settings.batch_size,
            window_ms=settings.window_ms,
            max_queue=settings.max_queue,
            on_batch=on_batch,
        )
    except BaseException as exc:  # a SystemExit in a library too: else "loading" forever
        if isinstance(exc, CiteqaError):  # written for users: the message says what to do
            logger.error("loading the pipeline failed: %s", exc)
        else:
            logger.exception("loading the pipeline failed")
        stamp = files_stamp(Path(state.settings.index))  # a rewrite of it: load again
        with state.lock:
            state.phase = "failed" if state.phase == "loading" else state.phase
            state.load_error = str(exc) if isinstance(exc, CiteqaError) else (
                f"{type(exc).__name__}; see the server log"
            )
            state.failed_stamp = stamp
        return
    with state.lock:
        if state.phase != "loading":  # shut down while we were loading
            batcher.close(timeout=0)
            _close(pipeline)
            return
        state.pipeline, state.batcher = pipeline, batcher
        state.metrics.watch_queue(lambda: batcher.depth)
        state.phase = "ready"
    logger.info("pipeline loaded; ready")


async def _watch_index(state: ServiceState, factory: PipelineFactory) -> None:
    """Every ``index_reload_s``, serve the index on disk if another writer changed it
    (``Pipeline.reload_index``), on the updates' thread: never beside a document change. After
    a failed load, load again once the index's files change (a damaged index rebuilt)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(state.settings.index_reload_s)
        with state.lock:
            pipeline, updater = state.pipeline, state.updater
            ready = state.phase == "ready"
            failed = state.phase == "failed" and state.failed_stamp is not None
        if failed:
            await _load_again_if_rewritten(state, factory)
            continue
        reload = getattr(pipeline, "reload_index", None)  # fakes in tests need not have one
        if not ready or updater is None or not callable(reload):
            continue
        try:
            await loop.run_in_executor(updater, reload)
        except CiteqaError as exc:  # the index served stays; said once per index on disk
            logger.error("the index on disk changed but cannot be served; still serving the "
                         "one loaded: %s", exc)
        except Exception:  # a bug or the file system: say so, and look again next time
            with state.lock:
                if state.phase == "shutting_down":  # the updater refuses work: done
                    return
            logger.exception("looking for a changed index failed")


async def _load_again_if_rewritten(state: ServiceState, factory: PipelineFactory) -> None:
    """After a failed load: once the index's files are not those it failed on, load again."""
    stamp = await asyncio.to_thread(files_stamp, Path(state.settings.index))
    with state.lock:
        if state.phase != "failed" or stamp == state.failed_stamp:
            return
        state.phase, state.load_error, state.failed_stamp = "loading", None, None
    logger.info("the index %s changed since loading failed; loading again",
                state.settings.index)
    threading.Thread(target=_load, args=(state, factory), name="citeqa-loader",
                     daemon=True).start()


def begin_shutdown(state: ServiceState) -> threading.Thread:
    """Mark not-ready and give queued and running batches ``shutdown_grace_s`` to finish; then
    cancel what is still queued (answers and document updates not begun: their requests get a
    503) and stop the running answers at their next step (``state.stopped``). Runs on a thread
    of its own, returned (and begun once: a second call returns the first's). The server calls
    it as soon as it is told to stop, so that requests in flight get those 503s within the
    grace, not the server's own 500s after it."""
    with state.lock:
        if state.stopping is None:
            state.phase = "shutting_down"
            state.stopping = threading.Thread(target=_grace, args=(state,),
                                              name="citeqa-shutdown", daemon=True)
            state.stopping.start()
        return state.stopping


def _grace(state: ServiceState) -> None:
    batcher, updater = state.batcher, state.updater
    state.batches_done = batcher is None or batcher.close(timeout=state.settings.shutdown_grace_s)
    state.stopped.set()
    if updater is not None:  # one running is finished: it is never abandoned half-way
        updater.shutdown(wait=False, cancel_futures=True)


def _shutdown(state: ServiceState) -> None:
    """Begin the shutdown (if the server has not) and wait for its grace, then stop the
    workers (a document update in progress is finished: it is never abandoned half-way)."""
    begin_shutdown(state).join()
    with state.lock:
        updater = state.updater
    if updater is not None:
        updater.shutdown(wait=True, cancel_futures=True)
    if state.pipeline is not None and state.batches_done:  # never under a batch still running
        _close(state.pipeline)
    logger.info("service stopped")


def _close(pipeline: PipelineLike) -> None:
    """Release what the pipeline holds open (a remote engine's connections and threads)."""
    close = getattr(pipeline, "close", None)  # fakes in tests need not have one
    if callable(close):
        close()


# -- the app ----------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    pipeline_factory: PipelineFactory | None = None,
    *,
    fetcher: Fetcher | None = None,
) -> FastAPI:
    """The citeqa REST service.

    settings: service settings (index, preset, api_keys, limits, batching, ...).
    pipeline_factory: builds the pipeline at startup; default ``Pipeline.from_settings``.
    fetcher: fetches URLs posted to /v1/documents; default a ``Fetcher`` allowing private
        addresses only when ``settings.allow_private_urls`` (tests pass one with a mock network).
    """
    state = ServiceState(
        settings=settings,
        api_keys=parse_api_keys(settings.api_keys),
        read_keys=parse_api_keys(settings.read_api_keys),
        fetcher=fetcher or Fetcher(FetchPolicy(allow_private=settings.allow_private_urls)),
    )
    factory = pipeline_factory or default_pipeline_factory
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.updater = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citeqa-updates")
        loader = threading.Thread(target=_load, args=(state, factory), name="citeqa-loader",
                                  daemon=True)
        loader.start()
        watcher = (asyncio.create_task(_watch_index(state, factory))
                   if settings.index_reload_s > 0 else None)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(_shutdown, state)

    app = FastAPI(
        title="citeqa",
        version=citeqa.__version__,
        description="Cited question answering: answers with verified verbatim quotes.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.citeqa = state
    install_error_handlers(app, authenticate=require_api_key_on_v1,
                           retry_after_s=settings.retry_after_s)
    # add_middleware puts each new one outermost: unexpected errors, host check, body limit,
    # metrics, headers, absolute-form targets.
    app.add_middleware(UnexpectedErrorMiddleware)
    hosts = frozenset(host_name(h) for h in settings.allowed_hosts.split(",") if h.strip())
    if hosts and "*" not in hosts:
        app.add_middleware(HostCheckMiddleware, allowed=hosts)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       idle_s=settings.client_timeout_s)
    routers = [v1_router(require_api_key, require_change_key), ops_router(page, page_csp(page))]
    app.add_middleware(MetricsMiddleware, metrics=state.metrics,
                       routes=[r for router in routers for r in router.routes])
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(AbsoluteFormMiddleware)
    for router in routers:
        app.include_router(router)
    if state.keys_required:
        plain = app.openapi

        def openapi() -> dict[str, Any]:
            return with_api_key_security(plain())  # plain() builds app.openapi_schema once

        app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["STATIC_DIR", "create_app", "default_pipeline_factory"]
