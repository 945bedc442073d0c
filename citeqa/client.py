"""A small typed client for the citeqa REST service (sync, over httpx).

    with CiteqaClient("http://127.0.0.1:8000", api_key="...") as client:
        answer = client.answer("Who founded the Normans?")

Responses come back as ``citeqa.types`` objects (a page of documents as ``DocumentList``, an
added document as the service's JSON). A call the service turns away for now (503
overloaded or still loading, 429) or that cannot connect is retried with backoff, honouring
``Retry-After`` (``citeqa.retry``); a 503 ``load_failed`` (a service that failed to load, which
waiting will not change) is not. A call that changes the index (add, delete) is sent again
only after the service's own "nothing done, not now" codes (``NOTHING_DONE_CODES``), not after
another 503 or 429 (a proxy's may come after the change was made). Every failure raises
``CiteqaAPIError``:
an error response carries the service's uniform ``{"error": {code, message, details}}``; a
response that is not JSON, or no response at all (status 0), gets a code of its own. An
argument no call could send (text with a lone surrogate, a NaN score, a url with a title)
raises ValueError, naming it, before anything is sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from citeqa.errors import CiteqaError
from citeqa.retry import RETRY_STATUSES, Backoff, request_by
from citeqa.types import Answer, Candidate, Document, Hit, Quote

T = TypeVar("T")

# 503 codes that say "not ever", not "not now": raised at once, not retried.
FINAL_CODES = frozenset({"load_failed"})
# The service's codes for a call it turned away before doing anything: the only 503s and 429s
# after which a call that changes the index is sent again (a proxy's 503 may come after the
# service made the change: sent again, an add would be a 409 and a delete a 404).
NOTHING_DONE_CODES = frozenset({"not_ready", "overloaded", "shutting_down"})


@dataclass(frozen=True)
class Readiness:
    """What /readyz says (``CiteqaClient.readiness``)."""

    ready: bool
    index_version: str | None = None  # when ready: the index answers come from now
    reason: str | None = None  # when not: not_ready, shutting_down or unreachable


class CiteqaAPIError(CiteqaError):
    """The service answered with an error (or could not be reached: ``status == 0``)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its four fields when pickled (a process pool's worker raised one, and
        the pool broke: rebuilt from its text alone, it could not be made)."""
        return type(self), (self.status, self.code, self.message, self.details), self.__dict__


@dataclass(frozen=True)
class DocumentInfo:
    """One row of the document list: a document without its text."""

    doc_id: str
    title: str
    source: str
    length: int  # characters of text


@dataclass(frozen=True)
class DocumentList:
    """One page of ``GET /v1/documents``."""

    documents: list[DocumentInfo]
    total: int  # documents in the index
    offset: int
    limit: int
    can_change: bool | None = None  # whether this key may add and delete them (None: not said)


def answer_from_json(d: dict[str, Any]) -> Answer:
    """Inverse of ``Answer.to_json`` (a candidate's ``raw`` is not sent, so it comes back empty)."""
    return Answer(
        question=d["question"],
        declined=d["declined"],
        answer=d.get("answer"),
        quote=Quote.from_json(d.get("quote")),
        score=d.get("score"),
        uncertainty=d.get("uncertainty"),
        reason=d.get("reason"),
        candidates=[Candidate.from_json(c) for c in d.get("candidates", [])],
        timings_ms=d.get("timings_ms", {}),
        passages=[Hit.from_json(h) for h in d.get("passages") or []],
        answer_start=d.get("answer_start"),
        answer_end=d.get("answer_end"),
        index_version=d.get("index_version"),
    )


def document_list_from_json(d: dict[str, Any]) -> DocumentList:
    """The body of ``GET /v1/documents`` as a ``DocumentList``."""
    docs = [DocumentInfo(x["doc_id"], x["title"], x["source"], int(x["length"]))
            for x in d["documents"]]
    can_change = d.get("can_change")
    return DocumentList(docs, int(d["total"]), int(d["offset"]), int(d["limit"]),
                        None if can_change is None else bool(can_change))


hit_from_json = Hit.from_json  # the inverse of Hit.to_json, under the name clients import


def _document_path(doc_id: str) -> str:
    """The route of one document. "", "." and ".." are no document's id, and a URL would
    read them as a path (the list of documents, or the routes above it)."""
    if doc_id in ("", ".", ".."):
        raise ValueError(f"{doc_id!r} is not a document id")
    return "/v1/documents/" + quote(_sendable("doc_id", doc_id), safe="")


# What httpx refuses to send (a header with a line break, a URL of another scheme): nothing
# was sent, and sending it again cannot help
NOT_SENT = (httpx.LocalProtocolError, httpx.UnsupportedProtocol)


def _not_sent(exc: Exception) -> CiteqaAPIError:
    return CiteqaAPIError(0, "request_error", f"the call could not be sent (nothing was): {exc}")


def _sendable(name: str, value: T) -> T:
    """``value``, checked that JSON and UTF-8 can carry it: ValueError naming ``name`` for a
    string with a lone surrogate (half of a UTF-16 pair: UnicodeEncodeError's traceback) or a
    number that is NaN or infinite (json's "Out of range float values")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} holds a lone surrogate (U+{ord(value[e.start]):04X} at "
                             f"{e.start}), which UTF-8 cannot carry") from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} is {value}; give a finite number")
    return value


def _parsed(parse: Callable[[dict[str, Any]], T], data: dict[str, Any]) -> T:
    """``parse(data)``; a body of another shape is the service's fault: bad_response."""
    try:
        return parse(data)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CiteqaAPIError(200, "bad_response", f"unexpected body ({type(e).__name__}: "
                             f"{e})") from None


class CiteqaClient:
    """Talks to one citeqa service.

    base_url: where the service is, e.g. ``http://127.0.0.1:8000`` (ValueError without an
        http or https scheme and a host).
    api_key: sent as ``Authorization: Bearer <key>`` when given.
    transport: an httpx transport (``httpx.MockTransport`` in tests); default: the network.
    timeout: seconds a call may take, its retries included; answers on CPU can take a while.
    backoff: how often and how long to wait before retrying a call turned away for now.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 120.0,
        backoff: Backoff | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url {base_url!r} is not an http:// or https:// URL with a "
                             "host (e.g. http://127.0.0.1:8000)")
        self.backoff = backoff or Backoff()
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, transport=transport, timeout=timeout
        )

    def __enter__(self) -> CiteqaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- endpoints ---------------------------------------------------------------------------

    def answer(
        self,
        question: str,
        *,
        top_k: int | None = None,
        n_candidates: int | None = None,
        min_score: float | None = None,
        target_accuracy: float | None = None,
        answer_mode: str | None = None,
        with_passages: bool = False,
    ) -> Answer:
        """Ask a question; the answer may be a decline (``answer.declined``). With
        ``with_passages``, ``answer.passages`` holds what retrieval found (else it is empty)."""
        body: dict[str, Any] = {"question": _sendable("question", question)}
        if with_passages:
            body["with_passages"] = True
        for name, value in (
            ("top_k", top_k),
            ("n_candidates", n_candidates),
            ("min_score", min_score),
            ("target_accuracy", target_accuracy),
            ("answer_mode", answer_mode),
        ):
            if value is not None:
                body[name] = _sendable(name, value)
        return _parsed(answer_from_json, self._json("POST", "/v1/answer", json=body))

    def search(self, query: str, k: int = 10) -> list[Hit]:
        data = self._json("POST", "/v1/search", json={"query": _sendable("query", query), "k": k})
        return _parsed(lambda d: [hit_from_json(h) for h in d["hits"]], data)

    def document(self, doc_id: str) -> Document:
        d = self._json("GET", _document_path(doc_id))
        return _parsed(lambda d: Document(d["doc_id"], d["title"], d["source"], d["text"]), d)

    def list_documents(self, offset: int = 0, limit: int = 20) -> DocumentList:
        """One page of the indexed documents (index order); ``limit`` at most 100."""
        data = self._json("GET", "/v1/documents", params={"offset": offset, "limit": limit})
        return _parsed(document_list_from_json, data)

    def add_document(
        self,
        text: str | None = None,
        *,
        url: str | None = None,
        title: str | None = None,
        doc_id: str | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Index a document (its ``text``, or a ``url`` the service fetches); returns
        ``{doc_id, title, source, passages}``. 409 (CiteqaAPIError) when doc_id exists, or
        (without a doc_id) when the same URL, or the same text with the same title and source,
        is indexed already under the id the service makes of them (the same text under another
        title or doc_id is another document)."""
        if (text is None) == (url is None):
            raise ValueError("give text or url, not both" if text is not None else
                             "give the document's text or a url to fetch")
        if url is not None and (title is not None or source is not None):  # (the service's 422)
            raise ValueError("title and source go with text; a fetched page's are its own "
                             "(its title, and the url)")
        body: dict[str, Any] = ({"text": _sendable("text", text)} if text is not None
                                else {"url": _sendable("url", url)})
        for name, value in (("title", title), ("doc_id", doc_id), ("source", source)):
            if value is not None:
                body[name] = _sendable(name, value)
        return self._json("POST", "/v1/documents", json=body, resend_codes=NOTHING_DONE_CODES)

    def delete_document(self, doc_id: str) -> None:
        """Remove a document from the index (CiteqaAPIError: 404 when unknown; 409 for the
        last document, or when another writer changed the index since the service loaded it)."""
        resp = self._send("DELETE", _document_path(doc_id), resend_codes=NOTHING_DONE_CODES)
        if not resp.is_success:
            raise self._error(resp)

    def health(self) -> bool:
        """True when the process answers /healthz; False when nothing answers (one try).
        A probe that cannot be sent (a header with a line break) is a ``request_error``."""
        try:
            resp = self._probe("/healthz")
        except httpx.TransportError:
            return False
        if not resp.is_success:
            raise self._error(resp)
        return True

    def readiness(self) -> Readiness:
        """/readyz, once (no retries: it is a probe): ready, with the version of the index
        answers come from now (an answer's ``index_version``); or not yet, with why (loading,
        shutting down, or ``unreachable``: no connection, as while the server starts or stops).
        A service that failed to load raises ``CiteqaAPIError`` (``load_failed``: waiting will
        not change it), as does a probe that cannot be sent (``request_error``)."""
        try:
            resp = self._probe("/readyz")
        except httpx.TransportError:
            return Readiness(False, reason="unreachable")
        if resp.is_success:
            try:
                body = resp.json() if resp.content else {}
            except ValueError:  # a 200 page from something else (a proxy's): not the service
                raise CiteqaAPIError(resp.status_code, "bad_response",
                                     f"/readyz answered 200 without JSON: "
                                     f"{resp.text[:200]!r}") from None
            version = body.get("index_version") if isinstance(body, dict) else None
            return Readiness(True, index_version=version if isinstance(version, str) else None)
        err = self._error(resp)
        if resp.status_code == 503 and err.code not in FINAL_CODES:
            return Readiness(False, reason=err.code)
        raise err

    def ready(self) -> bool:
        """``readiness().ready``: False while loading, shutting down or unreachable; raises for
        a service that failed to load."""
        return self.readiness().ready

    # -- plumbing ----------------------------------------------------------------------------

    def _probe(self, path: str) -> httpx.Response:
        """One GET within ``self.timeout``; a body that cannot be decoded is bad_response."""
        try:
            return request_by(self._http, "GET", path, time.monotonic() + self.timeout)
        except httpx.DecodingError as exc:
            raise CiteqaAPIError(0, "bad_response", f"a body that cannot be decoded: {exc}"
                                 ) from exc
        except NOT_SENT as exc:  # no answer will ever come: not "unreachable" (a poll's end)
            raise _not_sent(exc) from exc

    def _send(self, method: str, path: str, *, retry_statuses: frozenset[int] = RETRY_STATUSES,
              resend_codes: frozenset[str] | None = None, **kwargs: Any) -> httpx.Response:
        """One call, retried (``self.backoff``) while it cannot connect or the answer's status
        is in ``retry_statuses`` (and its code not in ``FINAL_CODES``; with ``resend_codes``,
        among them), within ``self.timeout`` in all."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                resp = request_by(self._http, method, path, deadline, **kwargs)
            except httpx.DecodingError as exc:  # e.g. a body that says gzip and is not
                raise CiteqaAPIError(0, "bad_response", f"a body that cannot be decoded: {exc}"
                                     ) from exc
            except httpx.ConnectError as exc:  # nothing was sent: safe to send again
                if self.backoff.wait(attempt, None, deadline):
                    attempt += 1
                    continue
                raise CiteqaAPIError(0, "connection_error",
                                     f"cannot reach the service: {exc}") from exc
            except httpx.TimeoutException as exc:
                raise CiteqaAPIError(0, "timeout", f"no response in time: {exc}") from exc
            except NOT_SENT as exc:
                raise _not_sent(exc) from exc
            except httpx.TransportError as exc:  # sent, and the connection broke
                raise CiteqaAPIError(0, "connection_error",
                                     f"the connection broke before the service answered "
                                     f"(what the call asked may or may not be done): {exc}"
                                     ) from exc
            code = self._error(resp).code if resp.status_code in retry_statuses else ""
            if (resp.status_code not in retry_statuses
                    or code in FINAL_CODES
                    or (resend_codes is not None and code not in resend_codes)
                    or not self.backoff.wait(attempt, resp.headers.get("retry-after"), deadline)):
                return resp
            attempt += 1

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self._send(method, path, **kwargs)
        if resp.is_success:
            try:
                data = resp.json()
            except ValueError:
                raise CiteqaAPIError(resp.status_code, "bad_response", "not JSON") from None
            if not isinstance(data, dict):
                raise CiteqaAPIError(resp.status_code, "bad_response", "not a JSON object")
            return data
        raise self._error(resp)

    @staticmethod
    def _error(resp: httpx.Response) -> CiteqaAPIError:
        try:
            err = resp.json()["error"]
            return CiteqaAPIError(
                resp.status_code, str(err["code"]), str(err["message"]), err.get("details")
            )
        except (ValueError, KeyError, TypeError):
            text = resp.text[:200].strip() or resp.reason_phrase
            if resp.is_redirect:  # (followed, a redirected POST turns into a GET)
                text += (f" (to {resp.headers['location']}: the client follows no redirects; "
                         "give that address as base_url)")
            return CiteqaAPIError(resp.status_code, "http_error", text)
