"""The routes: ``/v1`` (answers, search, documents) and the operational ones (health, readiness,
metrics, the page). Handlers only validate, call the pipeline (off the event loop) and return a
schema; questions go through the batcher, document changes through the single update thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from citeqa.api.batching import Batcher, BatcherClosedError, QueueFullError
from citeqa.api.deps import (
    BatcherDep,
    PipelineDep,
    PipelineLike,
    ServiceState,
    StateDep,
    may_change,
)
from citeqa.api.errors import ApiError
from citeqa.api.metrics import CONTENT_TYPE
from citeqa.api.middleware import FOREIGN_HOST
from citeqa.api.schemas import (
    DOC_ID_PATH_PATTERN,
    MAX_DOCUMENTS_PAGE,
    AnswerOut,
    AnswerRequest,
    DocumentAddedOut,
    DocumentIn,
    DocumentListOut,
    DocumentOut,
    ErrorOut,
    ReadyOut,
    SearchOut,
    SearchRequest,
    StatusOut,
    TextDocumentIn,
    UrlDocumentIn,
)
from citeqa.config import MAX_DOCUMENT_CHARS
from citeqa.errors import EngineUnavailableError, InvalidRequestError, NotSupportedError
from citeqa.ingest import Fetcher, doc_id_for, is_made_id, page_key
from citeqa.ingest.title import title_of_source
from citeqa.text import is_blank
from citeqa.types import Answer, AskArgs, Document

logger = logging.getLogger(__name__)


def _headers(**described: str) -> dict[str, Any]:
    """OpenAPI response headers (strings) by name (``Retry_After`` for "Retry-After")."""
    return {"headers": {name.replace("_", "-"): {"description": text, "schema": {"type": "string"}}
                        for name, text in described.items()}}


# the headers of a 503 a client may retry (not_ready, overloaded, engine_unavailable)
RETRY_AFTER = _headers(Retry_After="seconds to wait before asking again (not_ready, overloaded, "
                       "engine_unavailable; absent on load_failed)")
# 400: a body that is not UTF-8 JSON, or nested too deep to parse; 413: over the body limit;
# 415: a body in a content coding (on any route, before routing: BodyLimitMiddleware).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{s: {"model": ErrorOut} for s in (400, 404, 413, 415, 422, 500, 504)},
    401: {"model": ErrorOut, **_headers(WWW_Authenticate="Bearer")},
    503: {"model": ErrorOut, **RETRY_AFTER},
}
# POSTs: a body not JSON (415), one that stopped arriving (408)
BODY_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorOut} for s in (408, 415)}
# 501: a pipeline whose retriever cannot list its documents (a remote one)
LIST_ERRORS: dict[int | str, dict[str, Any]] = {501: {"model": ErrorOut}}
ANSWER_ERRORS: dict[int | str, dict[str, Any]] = {**BODY_ERRORS, 502: {"model": ErrorOut}}
# The routes that change the index: 403 for a key that may only read.
DOCUMENT_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 403, 409, 501, 502, 507)
}
# Any route, before routing: a Host the server does not accept (400), a body over the limit
# (413) or in a content coding (415).
REFUSED_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorOut} for s in (400, 413, 415)}


class AnyPathConvertor(Convertor[str]):
    """Starlette's ``path`` convertor, newlines included: with its ``.*`` an id ending in a
    newline lost it in route matching (``$`` matches before a final newline), so a request for
    ``one%0A`` reached document ``one``, and an id holding one found no route at all. Now the
    whole id reaches ``DocId``'s check, which refuses control characters (422). An empty id
    does not match, so ``/v1/documents/`` is redirected to the list, as ``/v1/answer/`` is."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_path", AnyPathConvertor())
DocId = Annotated[str, Path(min_length=1, max_length=256, pattern=DOC_ID_PATH_PATTERN)]
Offset = Annotated[int, Query(ge=0, description="documents to skip (index order)")]
Limit = Annotated[int, Query(ge=1, le=MAX_DOCUMENTS_PAGE, description="documents to return")]
# The pages that the one static page file serves (its script picks the view by path).
PAGE_PATHS = ("/", "/documents", "/document")


def require_json(request: Request) -> None:
    """415 for a body not declared as JSON: FastAPI would read it as text (or, undeclared, as
    bytes) and blame the body's type, though the fault is the header."""
    declared = request.headers.get("content-type", "")
    kind = declared.split(";", 1)[0].strip().lower()
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")
                                      and kind != "application/+json"):  # a suffix needs a name
        return
    if not kind and request.headers.get("content-length", "0") == "0" and (
            "transfer-encoding" not in request.headers):
        return  # no body at all: validation says what the body must hold
    said = f"is declared as {kind!r}" if kind else "has no content-type"
    raise ApiError(415, "unsupported_media_type",
                   f"the body {said}; send JSON with the header content-type: application/json")


JsonBody = [Depends(require_json)]


def make_run_batch(pipeline: PipelineLike) -> Callable[[list[AskArgs]], list[Answer | Exception]]:
    """The worker's batch function: ``ask_many`` over the batch; if that fails on a batch of
    several, each item is retried alone so that one bad request does not fail the others, but
    for an engine that cannot take them now (EngineUnavailableError: every item gets its error,
    not another call each to an engine that asked to be left alone)."""

    def run(items: list[AskArgs]) -> list[Answer | Exception]:
        try:
            return list(pipeline.ask_many(items))
        except EngineUnavailableError as exc:
            if len(items) == 1:
                raise
            return [exc] * len(items)
        except Exception:
            if len(items) == 1:
                raise
        logger.warning("ask_many failed on a batch of %d; retrying one by one", len(items))
        out: list[Answer | Exception] = []
        for a in items:
            try:
                out.extend(pipeline.ask_many([a]))
            except Exception as exc:  # noqa: BLE001 - delivered to that request's caller
                out.append(exc)
        return out

    return run


def text_document(body: TextDocumentIn) -> Document:
    """The Document for a posted text; doc_id and title default to a hash and a title from the
    text, by the rules of the format its ``source`` names (``title_of_source``)."""
    _check_chosen_id(body.doc_id)
    source = body.source or ""
    doc_id = body.doc_id or doc_id_for(f"{source}\n{body.title or ''}\n{body.text}")
    title = body.title if body.title is not None else title_of_source(body.text, doc_id, source)
    return Document(doc_id=doc_id, title=title, source=source, text=body.text)


def _check_chosen_id(doc_id: str | None, made: str | None = None) -> None:
    """Refuse a chosen ``doc_id`` of the form citeqa's own ids take, but the one citeqa would
    make itself (``made``): it could claim a URL's id before that URL is added, and be taken
    for that page."""
    if doc_id is not None and doc_id != made and is_made_id(doc_id):
        raise InvalidRequestError(
            f"doc_id {doc_id!r} has the form of the ids citeqa makes (16 hex digits): choose "
            "another, or leave it out to get one")


def url_document(body: UrlDocumentIn, fetcher: Fetcher) -> Document:
    """Fetch ``body.url`` under the fetcher's address rules (SSRF-safe) into a Document."""
    _check_chosen_id(body.doc_id, doc_id_for(body.url))
    page = fetcher.fetch(body.url)
    if is_blank(page.text):
        raise InvalidRequestError(f"{body.url} has no text to index; send its text instead")
    if (why := page.only_redirects()) is not None:
        raise InvalidRequestError(f"{body.url}: {why}")
    if len(page.text) > MAX_DOCUMENT_CHARS:  # as a posted text's: one document, one answer path
        raise InvalidRequestError(
            f"{body.url} has {len(page.text):,} characters of text, over the "
            f"{MAX_DOCUMENT_CHARS:,} a document may hold; split it and send the parts as "
            "texts, or index it with `citeqa index build`")
    return Document(doc_id=body.doc_id or doc_id_for(body.url), title=page.title,
                    source=page.final_url, text=page.text)


LIST_PAGE = 1000  # documents read at a time when looking for a page's (page_holder)


def page_holder(pipeline: PipelineLike, source: str) -> str | None:
    """The id of an indexed document from the page ``source`` (a fetched page's final URL), or
    None (also where the pipeline cannot list its documents). Sources are compared as pages
    (``page_key``: a fragment, the case of the host or a default port names no other page)."""
    key = page_key(source)
    offset = 0
    while True:
        try:
            docs, total = pipeline.list_documents(offset, LIST_PAGE)
        except NotSupportedError:
            return None
        for doc in docs:
            if doc.source and page_key(doc.source) == key:
                return doc.doc_id
        offset += len(docs)
        if not docs or offset >= total:
            return None


def add_page(pipeline: PipelineLike, doc: Document) -> dict[str, int]:
    """Index a fetched page whose id was made from its URL (on the update thread, so that no
    other change comes between the check and the add): 409 when an indexed document's source
    names the same page under another id already (another spelling of its URL, by the host's
    case, a fragment or a redirect, made another id, and the page went in twice)."""
    holder = page_holder(pipeline, doc.source)
    if holder is not None and holder != doc.doc_id:
        raise ApiError(409, "conflict", f"a document from this page ({page_key(doc.source)}) "
                       f"is already indexed, as document {holder!r}; nothing was added")
    return pipeline.add_documents([doc])


def check_update_room(state: ServiceState) -> None:
    """503 when the service cannot take another document update now (not ready, or
    ``max_pending_updates`` waiting or running)."""
    if state.updater is None:
        raise state.not_ready_error()
    if state.pending_updates >= state.settings.max_pending_updates:
        raise state.overloaded_error(f"{state.pending_updates} document updates are waiting or "
                                     "running; retry later")


async def run_update(state: ServiceState, fn: Callable[..., Any], *args: Any,
                     request: Request | None = None) -> Any:
    """Run ``fn(*args)`` on the single update thread (off the event loop, one at a time). At most
    ``max_pending_updates`` wait or run at once (more: 503, as a full question queue is): each
    may rebuild a large index. One whose client (``request``) leaves before it starts is
    dropped: nothing changes, and no one waits for it."""
    check_update_room(state)
    updater, settings = state.updater, state.settings
    assert updater is not None
    try:
        fut = updater.submit(fn, *args)
    except RuntimeError:  # shut down
        raise state.not_ready_error() from None
    state.pending_updates += 1
    afut = asyncio.wrap_future(fut)
    try:
        while not afut.done():
            await asyncio.wait({afut}, timeout=settings.disconnect_poll_s)
            if (request is not None and not afut.done() and not fut.running()
                    and await request.is_disconnected() and fut.cancel()):
                logger.info("client disconnected; its queued document update is dropped")
                raise ApiError(499, "client_closed_request", "the client closed the connection")
    except BaseException:  # cancelled, or its request failed (its body over the limit...):
        fut.cancel()  # its update too, if not started: no change after an error response
        raise
    finally:
        state.pending_updates -= 1
    if afut.cancelled():  # shutdown dropped the queued update before it ran: nothing changed
        raise state.not_ready_error()
    return afut.result()


async def await_answer(request: Request, state: ServiceState, batcher: Batcher[AskArgs, Answer],
                       args: AskArgs) -> Answer:
    """Queue ``args`` for the worker and wait for its answer, giving up on timeout or when the
    client disconnects: queued work is then skipped, and work already running stops generating
    at its next decoding step (``AskArgs.abandoned``)."""
    settings = state.settings
    gone = threading.Event()
    try:
        cfut = batcher.submit(replace(
            args, abandoned=lambda: gone.is_set() or state.stopped.is_set()))
    except QueueFullError as exc:
        raise state.overloaded_error(str(exc)) from None
    except BatcherClosedError:
        raise state.not_ready_error() from None
    afut = asyncio.wrap_future(cfut)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ApiError(504, "timeout", f"no answer within {settings.request_timeout_s:g} "
                               "s; try again later or ask with fewer candidates")
            done, _ = await asyncio.wait({afut},
                                         timeout=min(settings.disconnect_poll_s, remaining))
            # shutdown gave up on queued work, or its grace is over: the batch stops too, and
            # what a stopped row gave is no answer (it read as a decline)
            if (done and afut.cancelled()) or state.stopped.is_set():
                raise state.not_ready_error()
            if done:
                return afut.result()
            if await request.is_disconnected():
                logger.info("client disconnected; cancelling its queued request")
                raise ApiError(499, "client_closed_request", "the client closed the connection")
    finally:
        if not afut.done():
            gone.set()  # the batch it runs in, if any, stops generating its candidates
            if not cfut.cancel():  # skipped by the worker if it has not started it
                logger.info("its answer was being generated: stopping at the next step")
            afut.cancel()


def v1_router(require_key: Callable[..., None],
              require_change: Callable[..., None]) -> APIRouter:
    """Everything under ``/v1`` (behind ``require_key``; the routes that change the index
    behind ``require_change`` too)."""
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES)
    changes = [Depends(require_change)]

    # exclude_unset: ``passages`` is left out of the body unless the request asked for it.
    @v1.post("/answer", response_model=AnswerOut, response_model_exclude_unset=True,
             dependencies=JsonBody, responses=ANSWER_ERRORS)
    async def answer(body: AnswerRequest, request: Request, state: StateDep,
                     pipeline: PipelineDep, batcher: BatcherDep) -> dict[str, Any]:
        """Answer a question with a verified quote, or decline."""
        args = AskArgs(body.question, top_k=body.top_k, n_candidates=body.n_candidates,
                       min_score=body.min_score, target_accuracy=body.target_accuracy,
                       answer_mode=body.answer_mode)
        args = await run_in_threadpool(pipeline.check, args)  # bad input fails before queueing
        result = await await_answer(request, state, batcher, args)
        state.metrics.observe_answer(result.declined)
        return result.to_json(with_passages=body.with_passages)

    @v1.post("/search", response_model=SearchOut, dependencies=JsonBody, responses=BODY_ERRORS)
    async def search(body: SearchRequest, state: StateDep,
                     pipeline: PipelineDep) -> dict[str, Any]:
        """Retrieve passages (with character offsets into their documents)."""
        with state.admitted("searches", state.settings.max_searches):
            hits = await run_in_threadpool(pipeline.search, body.query, body.k)
        return {"hits": [h.to_json() for h in hits]}

    @v1.get("/documents", response_model=DocumentListOut, responses=LIST_ERRORS)
    async def documents(request: Request, state: StateDep, pipeline: PipelineDep,
                        offset: Offset = 0, limit: Limit = 20) -> dict[str, Any]:
        """The indexed documents, a page at a time, in index order (title, source, length),
        and whether this request's key may add and delete them."""
        docs, total = await run_in_threadpool(pipeline.list_documents, offset, limit)
        return {"documents": [{"doc_id": d.doc_id, "title": d.title, "source": d.source,
                               "length": len(d.text)} for d in docs],
                "total": total, "offset": offset, "limit": limit,
                "can_change": may_change(request, state)}

    @v1.get("/documents/{doc_id:any_path}", response_model=DocumentOut)
    async def document(doc_id: DocId, pipeline: PipelineDep) -> dict[str, Any]:
        """A source document's full text (quotes' offsets index into it)."""
        try:
            doc = await run_in_threadpool(pipeline.document, doc_id)
        except KeyError:
            raise ApiError(404, "document_not_found", f"no document with id {doc_id!r}") from None
        return {"doc_id": doc.doc_id, "title": doc.title, "source": doc.source, "text": doc.text}

    for path, read, model in (("/documents", documents, DocumentListOut),  # HEAD where GET is
                              ("/documents/{doc_id:any_path}", document, DocumentOut)):
        v1.add_api_route(path, read, methods=["HEAD"], response_model=model,
                         include_in_schema=False)

    @v1.post("/documents", response_model=DocumentAddedOut, status_code=201,
             dependencies=[*changes, *JsonBody],
             responses={**DOCUMENT_ERRORS, **BODY_ERRORS,
                        201: _headers(Location="/v1/documents/{doc_id}, where it is read")})
    async def add_document(body: DocumentIn, request: Request, state: StateDep,
                           pipeline: PipelineDep, response: Response) -> dict[str, Any]:
        """Index a document (its text, or a public http(s) URL to fetch): searchable on return,
        persisted atomically; ``Location`` names it. 409 when its doc_id is already indexed."""
        if isinstance(body, UrlDocumentIn):
            assert state.fetcher is not None, "create_app sets the fetcher"
            check_update_room(state)  # before the fetch: it would be refused after it anyway
            # the thread runs to its end (the fetch's deadline) before this returns
            with state.admitted("URL fetches", state.settings.max_fetches):
                doc = await run_in_threadpool(url_document, body, state.fetcher)
        else:
            doc = text_document(body)
        try:
            if isinstance(body, UrlDocumentIn) and body.doc_id is None:
                counts = await run_update(state, add_page, pipeline, doc, request=request)
            else:
                counts = await run_update(state, pipeline.add_documents, [doc], request=request)
        except InvalidRequestError as exc:
            if exc.code != "conflict" or body.doc_id is not None:
                raise
            what = "this URL" if isinstance(body, UrlDocumentIn) else (
                "this text (with the same title and source)")
            raise ApiError(409, "conflict", f"{what} is already indexed, as document "
                           f"{doc.doc_id!r}; nothing was added") from None
        response.headers["Location"] = "/v1/documents/" + quote(doc.doc_id, safe="/:")
        return {"doc_id": doc.doc_id, "title": doc.title, "source": doc.source,
                "passages": counts[doc.doc_id]}

    @v1.delete("/documents/{doc_id:any_path}", status_code=204, response_class=Response,
               dependencies=changes, responses={**DOCUMENT_ERRORS, 408: {"model": ErrorOut}})
    async def delete_document(doc_id: DocId, request: Request, state: StateDep,
                              pipeline: PipelineDep) -> Response:
        """Remove a document from the index (at once, persisted atomically)."""
        await request.body()  # a body over the limit is refused (413) before anything queues
        await run_update(state, pipeline.delete_document, doc_id, request=request)
        return Response(status_code=204)

    return v1


def ops_router(page: str, csp: str) -> APIRouter:
    """Health, readiness, metrics and the page (``page`` served with its ``csp``)."""
    ops = APIRouter(responses=REFUSED_ERRORS)

    @ops.get("/healthz", response_model=StatusOut)
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @ops.get("/readyz", response_model=ReadyOut, responses={503: {"model": ErrorOut,
                                                                  **RETRY_AFTER}})
    async def readyz(state: StateDep, request: Request) -> dict[str, Any]:
        """Readiness: 200 once models are loaded and warmed up; 503 while loading, after a
        failed load, and while shutting down."""
        if state.phase != "ready":
            raise state.not_ready_error(open_route=True,
                                        foreign=request.scope.get(FOREIGN_HOST, False))
        # a pipeline written before index_version existed has none
        return {"status": "ready",
                "index_version": getattr(state.pipeline, "index_version", None)}

    for path, probe, shape in (("/healthz", healthz, StatusOut), ("/readyz", readyz, ReadyOut)):
        # uptime monitors use HEAD; its Content-Length is GET's (the model shapes the body)
        ops.add_api_route(path, probe, methods=["HEAD"], response_model=shape,
                          include_in_schema=False)

    @ops.get("/metrics", response_class=PlainTextResponse)
    async def metrics(state: StateDep) -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @ops.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """No icon (browsers ask for one; a 404 would be logged as a page error)."""
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    ops.add_api_route("/metrics", metrics, methods=["HEAD"], response_class=PlainTextResponse,
                      include_in_schema=False)
    ops.add_api_route("/favicon.ico", favicon, methods=["HEAD"], include_in_schema=False)

    async def index() -> HTMLResponse:
        """The page: ask (``/``), the document list (``/documents``) and one document with a
        quote highlighted (``/document?id=...&start=...&end=...``); it holds no corpus content,
        which it fetches from /v1 with the key typed into it."""
        return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                           "Cache-Control": "no-cache"})

    for path in PAGE_PATHS:
        ops.add_api_route(path, index, methods=["GET", "HEAD"], response_class=HTMLResponse,
                          include_in_schema=False)

    return ops
