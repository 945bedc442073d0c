"""Mutation-testing round on the REST service (api/errors, middleware, protocol, schemas,
metrics, server, deps): error mapping, limits at their boundaries, validation messages,
metrics labels and the key checks the other tests left open. Each test kills a mutant that
the suite let survive."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from test_api import FakePipeline, assert_uniform_error, serve

from citeqa.api.app import create_app
from citeqa.api.errors import map_citeqa_error
from citeqa.config import Settings
from citeqa.errors import EngineUnavailableError, OutputFormatError, UnreadablePageError

# -- errors: the CiteqaError table ----------------------------------------------------------


def test_an_unreadable_page_is_422_bad_source_not_a_502_fetch_failure() -> None:
    """UnreadablePageError is a FetchError: without its own row it became a 502, telling the
    user to retry a page that will never be usable."""
    exc = UnreadablePageError("the page is not HTML or text")
    assert map_citeqa_error(exc) == (422, "bad_source")
    with serve(FakePipeline(fail=exc)) as c:
        r = c.post("/v1/answer", json={"question": "q"})
    assert assert_uniform_error(r, 422, "bad_source")["message"] == str(exc)


def test_a_500_pipeline_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Every 5xx from a CiteqaError is logged, 500 itself included (not only 501 and up)."""
    with caplog.at_level(logging.ERROR, logger="citeqa.api.errors"), \
            serve(FakePipeline(fail=OutputFormatError("no QUOTE line"))) as c:
        assert_uniform_error(c.post("/v1/answer", json={"question": "q"}), 500,
                             "generation_failed")
    assert "pipeline error (OutputFormatError): no QUOTE line" in caplog.text


def test_an_engines_fractional_retry_after_is_rounded_up() -> None:
    """An engine asking for 100.5 s is told to wait 101 s, never less than it asked."""
    busy = EngineUnavailableError("the generator is busy", retry_after_s=100.5)
    with serve(FakePipeline(fail=busy), retry_after_s=7) as c:
        r = c.post("/v1/answer", json={"question": "q"})
    assert_uniform_error(r, 503, "engine_unavailable")
    assert r.headers["retry-after"] == "101"


def test_unknown_routes_and_methods_say_where_the_api_is_described() -> None:
    """Starlette's bare "Not Found" / "Method Not Allowed" are replaced by a pointer to the
    schema."""
    with serve() as c:
        err = assert_uniform_error(c.get("/no/such/route"), 404, "not_found")
        assert err["message"] == "no such endpoint; see /openapi.json for the API"
        err = assert_uniform_error(c.get("/v1/answer"), 405, "method_not_allowed")
        assert err["message"] == "method not allowed on this endpoint; see /openapi.json"


def test_a_body_that_cannot_be_decoded_is_401_for_a_caller_without_a_key() -> None:
    """FastAPI's own 400 for bytes that are not UTF-8 goes through the key check first: an
    unauthenticated caller learns nothing of its body."""
    with serve(api_keys="k1") as c:
        r = c.post("/v1/answer", content=b'{"q": "\xff"}',
                   headers={"content-type": "application/json"})
        assert_uniform_error(r, 401, "unauthorized")
        r = c.post("/v1/answer", content=b'{"q": "\xff"}',
                   headers={"content-type": "application/json", "X-API-Key": "k1"})
        assert_uniform_error(r, 400, "bad_request")


# -- the body limit, driven over raw ASGI (a body that arrives in parts, with pauses) ----------


async def _exchange(app: Any, method: str, path: str, parts: list[tuple[float, bytes, bool]],
                    headers: tuple[tuple[bytes, bytes], ...] = ()
                    ) -> tuple[int, dict, bytes, int]:
    """Send a request whose body comes as ``parts`` ((delay before, bytes, more_body)); after
    the last part ``receive`` waits for ever (a client that stopped sending). The status, the
    headers and the body of the response, and how many parts were never read."""
    queue = list(parts)
    sent: list[dict] = []

    async def receive() -> dict:
        if not queue:
            await asyncio.sleep(3600)
        delay, body, more = queue.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         *headers]}
    await asyncio.wait_for(app(scope, receive, send), 20)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers_out = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers_out, body, len(queue)


def _app(**settings: Any) -> Any:
    """The real app, not started: bodies are read (and refused) before readiness matters."""
    return create_app(Settings(window_ms=1, **settings), lambda s: FakePipeline())


def test_a_stalled_body_is_408_and_closes_the_connection() -> None:
    """The rest of a stalled body may still come: the 408 must say the connection closes."""
    status, headers, body, _ = asyncio.run(_exchange(
        _app(client_timeout_s=0.2), "POST", "/v1/answer", [(0, b'{"question": ', True)]))
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert "CITEQA_CLIENT_TIMEOUT_S" in error["message"]


def _messages(*parts: tuple[bytes, bool]) -> Any:
    """A ``receive`` handing out ``parts`` ((body, more_body)) in turn."""
    queue = [{"type": "http.request", "body": b, "more_body": more} for b, more in parts]

    async def receive() -> dict:
        return queue.pop(0)

    return receive


def test_drain_reads_a_body_of_exactly_its_bound_to_its_end() -> None:
    """A chunked body of exactly ``max_bytes`` ends with an empty last part: reading it still
    lets the connection answer cleanly (True); past the bound the drain gives up."""
    from citeqa.api.middleware import drain

    assert asyncio.run(drain(_messages((b"x" * 10, True), (b"", False)), max_bytes=10))
    assert not asyncio.run(drain(_messages((b"x" * 11, True), (b"", False)), max_bytes=10))


# -- metrics ----------------------------------------------------------------------------------


def _requests_total(text: str) -> dict[tuple[str, str, str], float]:
    """citeqa_requests_total by (route, method, status), parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "citeqa_requests_total"}


def test_known_methods_are_labelled_as_themselves_and_others_as_other() -> None:
    """OPTIONS is one of METHODS (its own label); a made-up method is OTHER, so a client
    cannot grow the label set."""
    with serve() as c:
        c.request("OPTIONS", "/v1/answer")
        c.request("PROPFIND", "/v1/answer")
        c.request("BREW", "/v1/answer")
        got = _requests_total(c.get("/metrics").text)
    assert got[("/v1/answer", "OPTIONS", "405")] == 1
    assert got[("/v1/answer", "OTHER", "405")] == 2
    assert not any(method in ("PROPFIND", "BREW") for _, method, _ in got)


def test_one_skipped_request_is_counted_as_cancelled() -> None:
    from citeqa.api.metrics import Metrics

    m = Metrics()
    m.observe_batch(2, skipped=1)
    assert "citeqa_cancelled_total 1.0" in m.render()



@pytest.mark.parametrize(("over", "read"), [(0, True), (1, False)])
def test_a_refused_body_is_drained_up_to_a_declared_length_of_exactly_the_drain_bound(
        over: int, read: bool) -> None:
    """A Content-Length over the body limit is refused (413); its body is read first when it
    declares at most DRAIN_MAX_BYTES, so that the client sees the 413, not a reset."""
    from citeqa.api.middleware import DRAIN_MAX_BYTES

    declared = str(DRAIN_MAX_BYTES + over).encode()
    status, _, body, left = asyncio.run(_exchange(
        _app(), "POST", "/v1/answer", [(0, b"x" * 100, False)],
        headers=((b"content-length", declared),)))
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert left == (0 if read else 1)


# -- schemas: limits at their boundaries ------------------------------------------------------


def test_a_min_score_of_zero_is_a_threshold_that_declines_nothing() -> None:
    """min_score is a probability in [0, 1]: 0 is allowed (target_accuracy's (0, 1) is not)."""
    with serve() as c:
        assert c.post("/v1/answer", json={"question": "q", "min_score": 0}).status_code == 200
        assert c.post("/v1/answer", json={"question": "q", "min_score": 0.0}).status_code == 200


def test_with_passages_is_a_json_boolean_only() -> None:
    with serve() as c:
        for value in ("true", 1, "yes"):
            r = c.post("/v1/answer", json={"question": "q", "with_passages": value})
            assert_uniform_error(r, 422, "invalid_request")
        assert c.post("/v1/answer", json={"question": "q", "with_passages": True}).is_success


def test_search_queries_are_held_to_the_question_limit() -> None:
    from citeqa.config import MAX_QUESTION_CHARS

    with serve() as c:
        assert c.post("/v1/search", json={"query": "q" * MAX_QUESTION_CHARS}).status_code == 200
        r = c.post("/v1/search", json={"query": "q" * (MAX_QUESTION_CHARS + 1)})
        assert_uniform_error(r, 422, "invalid_request")


def test_document_fields_are_held_to_their_limits() -> None:
    from pydantic import ValidationError

    from citeqa.api.schemas import TextDocumentIn, UrlDocumentIn
    from citeqa.config import MAX_SOURCE_CHARS, MAX_TITLE_CHARS

    assert TextDocumentIn(text="t", title="x" * MAX_TITLE_CHARS).title == "x" * MAX_TITLE_CHARS
    with pytest.raises(ValidationError, match="title"):
        TextDocumentIn(text="t", title="x" * (MAX_TITLE_CHARS + 1))
    url = "https://x.org/" + "a" * (MAX_SOURCE_CHARS - len("https://x.org/"))
    assert UrlDocumentIn(url=url).url == url
    with pytest.raises(ValidationError, match="url"):
        UrlDocumentIn(url=url + "a")


def test_a_blank_title_or_source_is_read_as_none() -> None:
    """A title no one sees (spaces, U+200B) takes the default's place, as no title does."""
    from citeqa.api.schemas import TextDocumentIn

    doc = TextDocumentIn(text="t", title=" \u200b ", source="  ")
    assert doc.title is None and doc.source is None


# -- the body limit from Content-Length, and content codings -----------------------------------


def test_a_body_whose_content_length_is_exactly_the_limit_is_read() -> None:
    body = json.dumps({"question": "q"}).encode().ljust(1024)  # (JSON allows the spaces)
    with serve(max_body_bytes=1024) as c:
        r = c.post("/v1/answer", content=body, headers={"content-type": "application/json"})
        assert r.request.headers["content-length"] == "1024"
        assert r.status_code == 200, r.text
        r = c.post("/v1/answer", content=body + b" ", headers={"content-type": "application/json"})
        assert_uniform_error(r, 413, "payload_too_large")


def test_an_empty_body_in_a_content_coding_is_no_coded_body() -> None:
    """Content-Length 0 is no body: a Content-Encoding on it decodes nothing (no 415)."""
    status, _, body, _ = asyncio.run(_exchange(
        _app(), "POST", "/v1/answer", [(0, b"", False)],
        headers=((b"content-length", b"0"), (b"content-encoding", b"gzip"))))
    # it passed the middleware: the app (not started) answers it as not ready, not 415
    assert status == 503 and json.loads(body)["error"]["code"] == "not_ready"


def test_an_error_after_the_response_started_is_raised_not_answered_twice() -> None:
    """UnexpectedErrorMiddleware answers 500 only while no response has started: after, a
    second response cannot be sent, so the error goes on to the server."""
    from citeqa.api.middleware import UnexpectedErrorMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-stream")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    with pytest.raises(RuntimeError, match="mid-stream"):
        asyncio.run(UnexpectedErrorMiddleware(app)(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start"]


# -- deps: keys, and the 503s' Retry-After ------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive_and_its_token_trimmed() -> None:
    with serve(api_keys="k1") as c:
        for value in ("bearer k1", "BEARER k1", "Bearer  k1 "):
            r = c.post("/v1/answer", json={"question": "q"}, headers={"Authorization": value})
            assert r.status_code == 200, (value, r.text)


def test_503s_for_overload_and_shutdown_say_when_to_retry() -> None:
    from citeqa.api.deps import ServiceState

    state = ServiceState(Settings(retry_after_s=9))
    assert state.overloaded_error("busy").headers == {"Retry-After": "9"}
    state.phase = "shutting_down"
    err = state.not_ready_error()
    assert (err.status, err.code, err.headers) == (503, "shutting_down", {"Retry-After": "9"})
    state.phase = "failed"
    state.load_error = "no index at /srv/idx"
    err = state.not_ready_error()  # a failed load is not retried: no Retry-After
    assert (err.code, err.headers) == ("load_failed", {})
    assert err.message == "the service failed to load: no index at /srv/idx"


def test_a_coded_body_is_read_before_its_415() -> None:
    """As with a 413, the refused body is drained first, so a client writing its whole body
    before reading sees the 415 rather than a reset."""
    status, headers, _, left = asyncio.run(_exchange(
        _app(), "POST", "/v1/answer", [(0, b"\x1f\x8b...", False)],
        headers=((b"content-length", b"5"), (b"content-encoding", b"gzip"))))
    assert status == 415 and headers["accept-encoding"] == "identity"
    assert left == 0


def test_the_drain_after_a_413_counts_what_was_read_before_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DRAIN_MAX_BYTES bounds the whole body read: the drain after the limit was crossed reads
    only what is left of that bound, then the server gives up on the connection."""
    import citeqa.api.middleware as middleware

    monkeypatch.setattr(middleware, "DRAIN_MAX_BYTES", 2000)
    parts = [(0, b" " * 1100, True), (0, b" " * 600, True), (0, b" " * 600, True),
             (0, b"", False)]
    status, _, _, left = asyncio.run(_exchange(_app(max_body_bytes=1024), "POST",
                                               "/v1/answer", parts))
    assert status == 413
    assert left == 1  # 1100 + 600 + 600 is past 2000: the end was never read


def test_an_absolute_form_target_is_served_as_its_path_with_its_authority_as_host() -> None:
    from citeqa.api.middleware import AbsoluteFormMiddleware

    seen: list[dict] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    async def run(raw: bytes) -> dict:
        scope = {"type": "http", "raw_path": raw, "path": raw.decode(),
                 "headers": [(b"host", b"proxy.example"), (b"accept", b"*/*")]}
        await AbsoluteFormMiddleware(app)(scope, None, None)
        return seen[-1]

    got = asyncio.run(run(b"http://user:pw@localhost:8000"))
    assert got["path"] == "/" and got["raw_path"] == b"/"
    assert got["headers"] == [(b"host", b"localhost:8000"), (b"accept", b"*/*")]
    got = asyncio.run(run(b"HTTPS://localhost/v1/documents/a%20b"))
    assert got["path"] == "/v1/documents/a b" and got["raw_path"] == b"/v1/documents/a%20b"
    assert asyncio.run(run(b"/healthz"))["path"] == "/healthz"  # origin form: as it was


def test_a_page_without_styles_or_scripts_allows_none() -> None:
    from citeqa.api.middleware import page_csp

    csp = page_csp("<p>plain</p>")
    assert "script-src 'none';" in csp and "style-src 'none';" in csp


def test_a_content_length_that_is_not_a_number_is_400() -> None:
    """(uvicorn's h11 refuses one itself; another ASGI server may pass it on)"""
    for declared in (b"-5", b"1e3", b"ten"):
        status, _, body, _ = asyncio.run(_exchange(
            _app(), "POST", "/v1/answer", [(0, b"{}", False)],
            headers=((b"content-length", declared),)))
        error = json.loads(body)["error"]
        assert (status, error["code"]) == (400, "bad_request")
        assert error["message"] == "invalid Content-Length header"


def test_a_body_over_the_limit_read_after_the_response_started_is_raised_not_answered() -> None:
    """BodyLimitMiddleware sends its own 413 only while no response has started."""
    from citeqa.api.errors import BodyTooLargeError
    from citeqa.api.middleware import BodyLimitMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    parts = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 2
    sent: list[dict] = []

    async def receive() -> dict:
        return parts.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    with pytest.raises(BodyTooLargeError):
        asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send))
    assert [m.get("status") for m in sent] == [200]


# -- server ---------------------------------------------------------------------------------


def test_uvicorns_grace_rounds_the_services_up_to_whole_seconds() -> None:
    from citeqa.api.server import MARGIN_S, uvicorn_grace_s

    assert uvicorn_grace_s(7.2) == 8 + MARGIN_S
    assert uvicorn_grace_s(0.1) == 1 + MARGIN_S


def test_an_accept_that_failed_for_want_of_descriptors_stops_the_turns_tries() -> None:
    """Only a failure for want of resources (EMFILE ...) stops the accept loop's turn; another
    (a connection aborted before it was accepted) lets it go on."""
    import errno

    from citeqa.api.server import _Accepts

    class Sock:
        def __init__(self, code: int) -> None:
            self.code, self.tries = code, 0

        def accept(self) -> Any:
            self.tries += 1
            raise OSError(self.code, "failed")

    out = _Accepts(Sock(errno.EMFILE))
    with pytest.raises(OSError):
        out.accept()
    with pytest.raises(BlockingIOError):
        out.accept()
    assert out.raw.tries == 1 and out.failed
    other = _Accepts(Sock(errno.ECONNABORTED))
    for _ in range(2):
        with pytest.raises(OSError) as raised:
            other.accept()
        assert not isinstance(raised.value, BlockingIOError)
    assert other.raw.tries == 2 and not other.failed


# -- protocol ---------------------------------------------------------------------------------


def test_a_body_answered_unread_whose_rest_never_comes_is_closed_in_time() -> None:
    """The bound on the rest of a body the app answered without reading starts with the
    answer, not with the next byte of that body (one that never comes held the connection)."""
    import socket
    import time

    from test_reliability import echo_server

    from citeqa.api.protocol import head_timeout_protocol

    closures: list[str] = []
    with echo_server(head_timeout_protocol(0.5, closures.append)) as (_, address):
        with socket.create_connection(address, timeout=20) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            started = time.monotonic()
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() - started < 10
        assert closures == ["unread_body"]


def test_each_head_on_a_kept_alive_connection_gets_the_whole_bound() -> None:
    """The bound on a head is disarmed once the head is whole: a timer left from the first
    head cut the next one short."""
    import socket
    import time

    from test_reliability import echo_server

    from citeqa.api.protocol import head_timeout_protocol

    def response(conn: socket.socket) -> bytes:
        got = b""
        while not got.endswith(b"}"):
            got += conn.recv(65536)
        return got

    with echo_server(head_timeout_protocol(4.0)) as (_, address):
        with socket.create_connection(address, timeout=20) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(2.5)  # within the bound (1.5 s to spare)
            conn.sendall(b"Host: x\r\n\r\n")
            assert response(conn).startswith(b"HTTP/1.1 200 ")
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(2.5)  # past 4 s from the first head's start, within this one's bound
            conn.sendall(b"Host: x\r\n\r\n")
            assert response(conn).startswith(b"HTTP/1.1 200 ")


def test_no_pipeline_is_handed_out_once_the_service_is_shutting_down() -> None:
    """get_pipeline checks the phase, not only that a pipeline exists: a shutting-down
    service still holds its pipeline but takes no more searches or document reads."""
    from citeqa.api.deps import ApiError, ServiceState, get_pipeline

    state = ServiceState(Settings())
    state.pipeline = FakePipeline()
    state.phase = "ready"
    assert get_pipeline(state) is state.pipeline
    state.phase = "shutting_down"
    with pytest.raises(ApiError) as raised:
        get_pipeline(state)
    assert (raised.value.status, raised.value.code) == (503, "shutting_down")
