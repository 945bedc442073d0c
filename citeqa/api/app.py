"""The FastAPI application: ``create_app(settings)`` wires routes, limits, errors and lifespan.

Models and index load in the lifespan, in a background thread, so ``/healthz`` answers at once
and ``/readyz`` is 503 until the pipeline is loaded (and again while shutting down). Generation
runs on one worker thread behind a bounded queue (``batching.Batcher``); the event loop only
awaits futures.

Authentication: when ``settings.api_keys`` is set, every ``/v1/*`` route needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. ``/``, ``/healthz``, ``/readyz``,
``/metrics`` and ``/openapi.json`` stay open (they reveal no corpus content). The Swagger and
ReDoc pages are off: they load scripts from a CDN, which the page's CSP forbids.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import citeqa
from citeqa.api.batching import Batcher, BatcherClosedError, BatchStats, QueueFullError
from citeqa.api.deps import (
    ApiLimits,
    AskArgs,
    BatcherDep,
    PipelineDep,
    PipelineLike,
    ServiceState,
    StateDep,
    parse_api_keys,
    require_api_key,
)
from citeqa.api.errors import ApiError, BodyTooLargeError, error_response, install_error_handlers
from citeqa.api.metrics import CONTENT_TYPE, MetricsMiddleware
from citeqa.api.schemas import (
    AnswerOut,
    AnswerRequest,
    DocumentAddedOut,
    DocumentIn,
    DocumentOut,
    ErrorOut,
    SearchOut,
    SearchRequest,
    StatusOut,
    TextDocumentIn,
    UrlDocumentIn,
)
from citeqa.config import Settings
from citeqa.errors import CiteqaError, InvalidRequestError
from citeqa.ingest import Fetcher, FetchPolicy, doc_id_for
from citeqa.ingest.html import title_from_text
from citeqa.types import Answer, Document

logger = logging.getLogger(__name__)

PipelineFactory = Callable[[Settings], PipelineLike]
STATIC_DIR = FsPath(__file__).parent / "static"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (401, 404, 413, 422, 500, 503, 504)
}
DOCUMENT_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 409, 501, 502)
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def default_pipeline_factory(settings: Settings) -> PipelineLike:
    """The real pipeline, imported only when the service starts loading."""
    from citeqa.pipeline import Pipeline  # noqa: PLC0415 - heavy, and written separately

    pipeline: PipelineLike = Pipeline.from_settings(settings)
    return pipeline


# -- pure helpers -----------------------------------------------------------------------------


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def page_csp(html: str) -> str:
    """A strict Content-Security-Policy for a self-contained page: only its own inline
    ``<script>`` and ``<style>`` blocks run (by hash), fetches go to this origin only."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    script_src = " ".join(_sha256_source(s) for s in scripts) or "'none'"
    style_src = " ".join(_sha256_source(s) for s in styles) or "'none'"
    return (
        f"default-src 'none'; script-src {script_src}; style-src {style_src}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def make_run_batch(pipeline: PipelineLike) -> Callable[[list[AskArgs]], list[Answer | Exception]]:
    """The worker's batch function: ``ask_many`` when the pipeline has it, else ``ask`` per item.

    If ``ask_many`` fails on a batch of several, each item is retried alone so that one bad
    request does not fail the others.
    """
    ask_many = getattr(pipeline, "ask_many", None)

    def ask_each(items: list[AskArgs]) -> list[Answer | Exception]:
        out: list[Answer | Exception] = []
        for a in items:
            try:
                answer = pipeline.ask(
                    a.question, top_k=a.top_k, n_candidates=a.n_candidates, min_score=a.min_score
                )
            except Exception as exc:  # noqa: BLE001 - delivered to that request's caller
                out.append(exc)
            else:
                out.append(answer)
        return out

    def run(items: list[AskArgs]) -> list[Answer | Exception]:
        if ask_many is None:
            return ask_each(items)
        try:
            return list(ask_many(items))
        except Exception:
            if len(items) == 1:
                raise
            logger.warning("ask_many failed on a batch of %d; retrying one by one", len(items))
            return ask_each(items)

    return run


def text_document(body: TextDocumentIn) -> Document:
    """The Document for a posted text; doc_id and title default to a hash and the first line."""
    source = body.source or ""
    doc_id = body.doc_id or doc_id_for(f"{source}\n{body.title or ''}\n{body.text}")
    title = body.title if body.title is not None else title_from_text(body.text, doc_id)
    return Document(doc_id=doc_id, title=title, source=source, text=body.text)


def url_document(body: UrlDocumentIn, fetcher: Fetcher) -> Document:
    """Fetch ``body.url`` under the fetcher's address rules (SSRF-safe) into a Document."""
    page = fetcher.fetch(body.url)
    if not page.text.strip():
        raise InvalidRequestError(f"{body.url} has no text to index; send its text instead")
    return Document(doc_id=body.doc_id or doc_id_for(body.url), title=page.title,
                    source=page.final_url, text=page.text)


def _update_error(exc: InvalidRequestError) -> ApiError | InvalidRequestError:
    codes = {404: "document_not_found", 409: "conflict"}
    if exc.status in codes:
        return ApiError(exc.status, codes[exc.status], str(exc))
    return exc


# -- middleware -------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: from Content-Length, and counted while reading (chunked
    bodies have no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "invalid Content-Length header")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes; send less"
        await error_response(413, "payload_too_large", message)(scope, receive, send)


class SecurityHeadersMiddleware:
    """Adds nosniff, no-referrer, and a deny-all CSP unless the response set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for name, value in (
                    (b"content-security-policy", API_CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ):
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)


# -- lifecycle --------------------------------------------------------------------------------


def _load(state: ServiceState, factory: PipelineFactory) -> None:
    """Build the pipeline and the batcher (in a background thread), then mark ready."""
    try:
        pipeline = factory(state.settings)
        lim = state.limits

        def on_batch(stats: BatchStats) -> None:
            state.metrics.observe_batch(stats.size, stats.skipped)

        batcher: Batcher[AskArgs, Answer] = Batcher(
            make_run_batch(pipeline),
            max_batch=lim.max_batch,
            window_ms=lim.window_ms,
            max_queue=lim.max_queue,
            on_batch=on_batch,
        )
    except Exception as exc:
        logger.exception("loading the pipeline failed")
        with state.lock:
            state.phase = "failed" if state.phase == "loading" else state.phase
            state.load_error = str(exc) if isinstance(exc, CiteqaError) else (
                f"{type(exc).__name__}; see the server log"
            )
        return
    with state.lock:
        if state.phase != "loading":  # shut down while we were loading
            batcher.close(timeout=0)
            return
        state.pipeline, state.batcher = pipeline, batcher
        state.metrics.queue_depth = lambda: batcher.depth
        state.phase = "ready"
    logger.info("pipeline loaded; ready")


def _shutdown(state: ServiceState) -> None:
    """Mark not-ready first, then let queued and running batches finish, then stop the workers
    (a document update in progress is finished: it is never abandoned half-way)."""
    with state.lock:
        state.phase = "shutting_down"
        batcher, updater = state.batcher, state.updater
    if batcher is not None:
        batcher.close(timeout=state.limits.shutdown_grace_s)
    if updater is not None:
        updater.shutdown(wait=True, cancel_futures=True)
    logger.info("service stopped")


async def run_update(state: ServiceState, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the single update thread (off the event loop, one at a time)."""
    updater = state.updater
    if updater is None:
        raise state.not_ready_error()
    try:
        fut = updater.submit(fn, *args)
    except RuntimeError:  # shut down
        raise state.not_ready_error() from None
    try:
        return await asyncio.wrap_future(fut)
    except InvalidRequestError as exc:
        raise _update_error(exc) from None


def _updates(pipeline: PipelineLike, name: str) -> Callable[..., Any]:
    fn = getattr(pipeline, name, None)
    if fn is None:
        raise ApiError(501, "not_supported", "this service cannot change its documents")
    return fn  # type: ignore[no-any-return]


async def await_answer(request: Request, state: ServiceState, batcher: Batcher[AskArgs, Answer],
                       args: AskArgs) -> Answer:
    """Queue ``args`` for the worker and wait for its answer, giving up (and cancelling the
    queued work) on timeout or when the client disconnects."""
    lim = state.limits
    try:
        cfut = batcher.submit(args)
    except QueueFullError as exc:
        raise ApiError(503, "overloaded", str(exc),
                       headers={"Retry-After": str(lim.retry_after_s)}) from None
    except BatcherClosedError:
        raise state.not_ready_error() from None
    afut = asyncio.wrap_future(cfut)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lim.request_timeout_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ApiError(504, "timeout", f"no answer within {lim.request_timeout_s:g} s; "
                               "try again later or ask with fewer candidates")
            done, _ = await asyncio.wait({afut}, timeout=min(lim.disconnect_poll_s, remaining))
            if done:
                if afut.cancelled():  # shutdown gave up on queued work
                    raise state.not_ready_error()
                return afut.result()
            if await request.is_disconnected():
                logger.info("client disconnected; cancelling its queued request")
                raise ApiError(499, "client_closed_request", "the client closed the connection")
    finally:
        if not afut.done():
            cfut.cancel()  # skipped by the worker if it has not started it
            afut.cancel()


# -- the app ----------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    pipeline_factory: PipelineFactory | None = None,
    *,
    limits: ApiLimits | None = None,
    fetcher: Fetcher | None = None,
) -> FastAPI:
    """The citeqa REST service.

    settings: service settings (index, preset, api_keys, allow_private_urls, ...).
    pipeline_factory: builds the pipeline at startup; default ``Pipeline.from_settings``.
    limits: batching, queue, timeout and body limits; default read from ``settings``.
    fetcher: fetches URLs posted to /v1/documents; default a ``Fetcher`` allowing private
        addresses only when ``settings.allow_private_urls`` (tests pass one with a mock network).
    """
    state = ServiceState(
        settings=settings,
        limits=limits or ApiLimits.from_settings(settings),
        api_keys=parse_api_keys(settings.api_keys),
    )
    factory = pipeline_factory or default_pipeline_factory
    fetcher = fetcher or Fetcher(FetchPolicy(allow_private=settings.allow_private_urls))
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    csp = page_csp(page)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.updater = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citeqa-updates")
        loader = threading.Thread(target=_load, args=(state, factory), name="citeqa-loader",
                                  daemon=True)
        loader.start()
        try:
            yield
        finally:
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
    install_error_handlers(app)
    # add_middleware puts each new one outermost: body limit, then metrics, then headers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(SecurityHeadersMiddleware)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)

    @v1.post("/answer", response_model=AnswerOut)
    async def answer(body: AnswerRequest, request: Request, state: StateDep,
                     pipeline: PipelineDep, batcher: BatcherDep) -> dict[str, Any]:
        """Answer a question with a verified quote, or decline."""
        min_score = body.min_score
        if body.target_accuracy is not None:
            threshold_for = getattr(pipeline, "threshold_for", None)
            if threshold_for is None:
                raise ApiError(422, "needs_calibration",
                               "target_accuracy needs a calibrated reward model, and this "
                               "service has none; use min_score instead")
            min_score = float(threshold_for(body.target_accuracy))
        args = AskArgs(body.question, top_k=body.top_k, n_candidates=body.n_candidates,
                       min_score=min_score)
        result = await await_answer(request, state, batcher, args)
        state.metrics.observe_answer(result.declined)
        return result.to_json()

    @v1.post("/search", response_model=SearchOut)
    async def search(body: SearchRequest, pipeline: PipelineDep) -> dict[str, Any]:
        """Retrieve passages (with character offsets into their documents)."""
        hits = await run_in_threadpool(pipeline.search, body.query, body.k)
        return {"hits": [h.to_json() for h in hits]}

    @v1.get("/documents/{doc_id:path}", response_model=DocumentOut)
    async def document(
        doc_id: Annotated[str, Path(min_length=1, max_length=256)], pipeline: PipelineDep
    ) -> dict[str, Any]:
        """A source document's full text (quotes' offsets index into it)."""
        try:
            doc = await run_in_threadpool(pipeline.document, doc_id)
        except KeyError:
            raise ApiError(404, "document_not_found", f"no document with id {doc_id!r}") from None
        return {"doc_id": doc.doc_id, "title": doc.title, "source": doc.source, "text": doc.text}

    @v1.post("/documents", response_model=DocumentAddedOut, status_code=201,
             responses=DOCUMENT_ERRORS)
    async def add_document(body: DocumentIn, state: StateDep,
                           pipeline: PipelineDep) -> dict[str, Any]:
        """Index a document (its text, or a public http(s) URL to fetch): searchable on return,
        persisted atomically. 409 when its doc_id is already indexed."""
        add = _updates(pipeline, "add_documents")
        if isinstance(body, UrlDocumentIn):
            doc = await run_in_threadpool(url_document, body, fetcher)
        else:
            doc = text_document(body)
        counts = await run_update(state, add, [doc])
        return {"doc_id": doc.doc_id, "title": doc.title, "source": doc.source,
                "passages": counts[doc.doc_id]}

    @v1.delete("/documents/{doc_id:path}", status_code=204, response_class=Response,
               responses=DOCUMENT_ERRORS)
    async def delete_document(
        doc_id: Annotated[str, Path(min_length=1, max_length=256)], state: StateDep,
        pipeline: PipelineDep,
    ) -> Response:
        """Remove a document from the index (at once, persisted atomically)."""
        await run_update(state, _updates(pipeline, "delete_document"), doc_id)
        return Response(status_code=204)

    app.include_router(v1)

    @app.get("/healthz", response_model=StatusOut)
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=StatusOut, responses={503: {"model": ErrorOut}})
    async def readyz(state: StateDep) -> dict[str, Any]:
        """Readiness: 200 once models are loaded; 503 while loading, after a failed load, and
        while shutting down."""
        if state.phase != "ready":
            raise state.not_ready_error()
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(state: StateDep) -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """No icon (browsers ask for one; a 404 would be logged as a page error)."""
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                           "Cache-Control": "no-cache"})

    return app


__all__ = ["create_app", "default_pipeline_factory", "make_run_batch", "page_csp"]
