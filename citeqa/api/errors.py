"""One uniform JSON error body for every 4xx/5xx, and the handlers that produce it.

Every error the API returns has the body
``{"error": {"code": str, "message": str, "details": ...}}`` (``details`` is null unless said
otherwise). The handlers below cover the service's own
``ApiError``, citeqa's ``CiteqaError`` tree, FastAPI's request validation (422), Starlette's HTTP
errors (unknown route 404, 405, 413 ...) and any other exception (500, logged, no traceback in
the body).

How ``CiteqaError`` maps to HTTP (the one table; first match wins, subclasses first):

    =====================  ======  ======================  =========================================
    exception              status  code                    why
    =====================  ======  ======================  =========================================
    InvalidRequestError    .status .code                   the user's request; its own status and
                                                           code (default invalid_request)
    BadURLError            422     bad_url                 the user's URL is malformed, or its host
                                                           does not exist
    BlockedURLError        400     blocked_url             the user named a URL that is not allowed
    UnreadablePageError    422     bad_source              the user's page was fetched but cannot
                                                           be used: too large, a refused type or
                                                           encoding, unreadable HTML (no use
                                                           retrying)
    FetchError             502     fetch_failed            an upstream site (or DNS) failed
    SourceError            422     bad_source              the user's source could not be read
    IndexChangedError      409     index_changed           another writer changed the index since
                                                           this server loaded it, and the index as
                                                           it is now cannot be loaded
    IndexWriteError        507     insufficient_storage    a change to the index could not be
                                                           written for a full disk (503
                                                           index_not_writable for another cause:
                                                           a read-only file system); it is as it was
    IndexError_            503     index_unavailable       the served index is missing or corrupt
    EmptyCorpusError       503     index_unavailable       the served index is empty
    ModelError             503     model_unavailable       a model could not be loaded
    EngineUnavailableError 503     engine_unavailable      the remote generator is down or busy
    EngineError            502     engine_error            the remote generator answered an error
    OutputFormatError      500     generation_failed       the generator broke its output format
    NotSupportedError      501     not_supported           this server cannot do it (e.g. change
                                                           the documents of a non-index retriever)
    ConfigError            500     config_error            the server is misconfigured
    CiteqaError (other)    500     internal_error
    =====================  ======  ======================  =========================================

CiteqaError messages are written for users (they say what to do), so they are returned as is.
Messages of unexpected exceptions are never returned: they are logged with their traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from citeqa.errors import (
    BadURLError,
    BlockedURLError,
    CiteqaError,
    ConfigError,
    EmptyCorpusError,
    EngineError,
    EngineUnavailableError,
    FetchError,
    IndexChangedError,
    IndexError_,
    IndexWriteError,
    InvalidRequestError,
    ModelError,
    NotSupportedError,
    OutputFormatError,
    SourceError,
    UnreadablePageError,
)

logger = logging.getLogger(__name__)

# (exception type, status, code); checked in order, so subclasses come before their bases.
CITEQA_ERROR_TABLE: tuple[tuple[type[CiteqaError], int, str], ...] = (
    (BadURLError, 422, "bad_url"),
    (BlockedURLError, 400, "blocked_url"),
    (UnreadablePageError, 422, "bad_source"),
    (FetchError, 502, "fetch_failed"),
    (SourceError, 422, "bad_source"),
    (IndexChangedError, 409, "index_changed"),
    (IndexError_, 503, "index_unavailable"),
    (EmptyCorpusError, 503, "index_unavailable"),
    (ModelError, 503, "model_unavailable"),
    (EngineUnavailableError, 503, "engine_unavailable"),
    (EngineError, 502, "engine_error"),
    (OutputFormatError, 500, "generation_failed"),
    (NotSupportedError, 501, "not_supported"),
    (ConfigError, 500, "config_error"),
)

# FastAPI's 400 when a JSON body's bytes do not decode (it names no cause).
FASTAPI_BODY_UNREADABLE = "There was an error parsing the body"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # what a 405's Allow may list

# Codes for Starlette's HTTPException by status; others fall back to the reason phrase.
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error the API returns on purpose, with its status, code and optional headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


class BodyTooLargeError(StarletteHTTPException):
    """Raised while reading a request body that exceeds the limit (-> 413).

    A Starlette HTTPException so that FastAPI's body reader re-raises it instead of turning it
    into a 400.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyStalledError(StarletteHTTPException):
    """Raised when nothing more of a request body arrives in time, or (``min_rate`` given) when
    it arrives too slowly in all (-> 408, and the connection closed: the rest of the body may
    still come)."""

    def __init__(self, waited_s: float, *, min_rate: float | None = None, received: int = 0,
                 elapsed_s: float = 0.0) -> None:
        if min_rate is None:
            message = (f"the request body stopped arriving: nothing more came for {waited_s:g} s "
                       "(CITEQA_CLIENT_TIMEOUT_S); send the whole body")
        else:
            message = (f"the request body arrived too slowly: {received} bytes in "
                       f"{elapsed_s:.3g} s; past its first {waited_s:g} s "
                       f"(CITEQA_CLIENT_TIMEOUT_S) a body must arrive at {min_rate:g} bytes/s "
                       "or faster; send the whole body at once")
        super().__init__(408, message, headers={"Connection": "close"})


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than {limit} bytes, this server's limit "
            "(CITEQA_MAX_BODY_BYTES); send less")


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def map_citeqa_error(exc: CiteqaError) -> tuple[int, str]:
    """The (status, code) for a CiteqaError, following the table in the module docstring."""
    if isinstance(exc, InvalidRequestError):
        return exc.status, exc.code
    if isinstance(exc, IndexWriteError):
        return (507, "insufficient_storage") if exc.full else (503, "index_not_writable")
    for cls, status, code in CITEQA_ERROR_TABLE:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's error list, reduced to JSON-safe fields (no echo of the input, no ctx objects),
    with union tags dropped from locations (they name no field of the body)."""
    from citeqa.api.schemas import PATTERN_HELP, UNION_TAGS

    out = []
    for e in errors:
        loc = [x if isinstance(x, int | str) else str(x) for x in e.get("loc", ())
               if x not in UNION_TAGS]
        msg = str(e.get("msg", ""))
        if e.get("type") == "value_error":  # our validators' own words, without pydantic's tag
            msg = msg.removeprefix("Value error, ")
        elif e.get("type") == "string_pattern_mismatch":
            msg = PATTERN_HELP.get(str((e.get("ctx") or {}).get("pattern")), msg)
        elif e.get("type") == "json_invalid" and len(loc) == 2 and isinstance(loc[1], int):
            # FastAPI puts the character offset where the field would be: say what it is
            why = (e.get("ctx") or {}).get("error")
            msg = f"not valid JSON at character {loc[1]}" + (f" ({why})" if why else "")
            loc = loc[:1]
        out.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    return out


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _http_code(status: int) -> str:
    if status in HTTP_CODES:
        return HTTP_CODES[status]
    return _phrase(status).lower().replace(" ", "_").replace("-", "_")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError), exc
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


ENGINE_RETRY_AFTER_MAX_S = 3600  # an engine's Retry-After passed on is capped here


def _citeqa_error_handler(retry_after_s: int | None) -> Callable[[Request, Exception], Any]:
    """The handler of CiteqaError; with ``retry_after_s``, a 503 ``engine_unavailable`` (an
    engine busy, starting or restarting: worth asking again) carries ``Retry-After`` as the
    service's own 503s for now do, or the longer wait the engine itself asked for (at most
    ``ENGINE_RETRY_AFTER_MAX_S``)."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CiteqaError), exc
        status, code = map_citeqa_error(exc)
        if status >= 500:
            logger.error("pipeline error (%s): %s", type(exc).__name__, exc)
        headers = None
        if retry_after_s is not None and isinstance(exc, EngineUnavailableError):
            asked = exc.retry_after_s
            wait = retry_after_s if asked is None or math.isnan(asked) else max(
                retry_after_s, math.ceil(min(asked, ENGINE_RETRY_AFTER_MAX_S)))
            headers = {"Retry-After": str(wait)}
        return error_response(status, code, str(exc), headers=headers)

    return handle


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError), exc
    details = validation_details(exc.errors())
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    loc = first["loc"][1:] if first["loc"][:1] == ["body"] else first["loc"]
    where = ".".join(str(x) for x in loc) or "body"
    message = f"{where}: {first['msg']}"
    return error_response(422, "invalid_request", message, details)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts at the request's path, found by asking the
    routes (Starlette's own 405 names only the methods of the first route matching the path)."""
    routes = request.app.router.routes
    return sorted(m for m in HTTP_METHODS
                  if any(r.matches({**request.scope, "method": m})[0] is Match.FULL
                         for r in routes))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException), exc
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 405 and (methods := allowed_methods(request)):
        headers["Allow"] = ", ".join(methods)
    if status == 400 and exc.detail == FASTAPI_BODY_UNREADABLE:
        message = ("the body could not be read as JSON text: it must be UTF-8 (which JSON "
                   "requires), hold integers of at most 4,300 digits, and nest arrays and "
                   "objects less deeply than this")
    elif isinstance(exc.detail, str) and exc.detail != _phrase(status):
        message = exc.detail
    elif status == 404:
        message = "no such endpoint; see /openapi.json for the API"
    elif status == 405:
        message = "method not allowed on this endpoint; see /openapi.json"
    else:
        message = _phrase(status)
    return error_response(status, _http_code(status), message, None, headers)


def unexpected_error_response(method: str, path: str, exc: BaseException) -> JSONResponse:
    """Log an exception nothing handled (with its traceback; the client is told nothing of
    it) and make its 500."""
    logger.exception("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the server log")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error_response(request.method, request.url.path, exc)


# raises ApiError (401; 403 for a read key where the route changes the index) for a request it
# refuses
Authenticate = Callable[[Request], None]


def _authenticated_first(handler: Callable[[Request, Exception], Any],
                         authenticate: Authenticate) -> Callable[[Request, Exception], Any]:
    """``handler`` for an error in the request's body, answering 401 (or 403) instead where
    ``authenticate`` refuses the request: FastAPI reads the body (and fails on JSON it cannot
    parse) before any dependency runs, so without this an unauthenticated caller learned how
    its body was wrong."""

    async def handle(request: Request, exc: Exception) -> Any:
        if isinstance(exc, RequestValidationError) or (
                isinstance(exc, StarletteHTTPException) and exc.detail == FASTAPI_BODY_UNREADABLE):
            try:
                authenticate(request)
            except ApiError as refused:
                return await _api_error(request, refused)
        return await handler(request, exc)

    return handle


def install_error_handlers(app: FastAPI, authenticate: Authenticate | None = None,
                           retry_after_s: int | None = None) -> None:
    """Register every handler above on ``app``; with ``authenticate``, a request it refuses
    gets its 401 (or 403) rather than an error about its body; with ``retry_after_s``, a 503
    ``engine_unavailable`` says when to ask again."""
    validation: Callable[[Request, Exception], Any] = _validation_error
    http: Callable[[Request, Exception], Any] = _http_error
    if authenticate is not None:
        validation = _authenticated_first(validation, authenticate)
        http = _authenticated_first(http, authenticate)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(CiteqaError, _citeqa_error_handler(retry_after_s))
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, _unexpected_error)
