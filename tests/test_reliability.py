"""Reliability findings (issue #16): oversized bodies over a real socket, bounded memory over
many requests, and settings that must not start an open server."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import THREE_DOCS, CannedPipeline, running_server
from pydantic import ValidationError

from citeqa.api.app import create_app
from citeqa.api.protocol import head_timeout_protocol
from citeqa.config import Settings, preset
from citeqa.generation.fake import KEEP_CALLS
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Answer, AskArgs

TEN_MB = 10 * 1024 * 1024


class NeverAsked(CannedPipeline):
    """A ready pipeline that must never be reached (the body limit answers first)."""

    def answer(self, args: AskArgs) -> Answer:
        raise AssertionError(f"an oversized request reached the pipeline: {args.question[:20]}")


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    app = create_app(Settings(window_ms=1), lambda s: NeverAsked())
    with running_server(app) as url:
        yield url


def _post(url: str, data: object, headers: dict[str, str]) -> urllib.error.HTTPError:
    request = urllib.request.Request(url + "/v1/answer", data=data,  # type: ignore[arg-type]
                                     headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    return info.value


def test_a_10_mb_body_is_a_413_not_a_connection_reset(server_url: str) -> None:
    """urllib sends the whole body before it reads anything: the server must read (and drop) it
    rather than close on it, or the client sees ECONNRESET instead of the 413."""
    body = b'{"question": "' + b"q" * TEN_MB + b'"}'
    for _ in range(3):  # a reset is timing-dependent: try more than once
        err = _post(server_url, body, {"Content-Type": "application/json"})
        assert err.code == 413
        assert json.loads(err.read())["error"]["code"] == "payload_too_large"


def test_a_chunked_10_mb_body_is_a_413_not_a_connection_reset(server_url: str) -> None:
    chunks = [b'{"question": "'] + [b"q" * (1 << 20)] * 10 + [b'"}']
    err = _post(server_url, iter(chunks), {"Content-Type": "application/json",
                                           "Transfer-Encoding": "chunked"})
    assert err.code == 413
    assert json.loads(err.read())["error"]["code"] == "payload_too_large"


def test_the_fake_backend_remembers_a_bounded_number_of_calls(tmp_path: Path) -> None:
    """The tiny preset's FakeBackend serves a long-running server: its record of calls must not
    grow with the number of requests."""
    build_index_from_documents(THREE_DOCS, tmp_path / "idx", preset("tiny").retrieval,
                               progress=False)
    app = create_app(Settings(preset="tiny", index=tmp_path / "idx", cache_dir=tmp_path / "c",
                              window_ms=0))
    with TestClient(app) as client:
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.01)
        backend = app.state.citeqa.pipeline.generator.backend
        for i in range(3000):
            r = client.post("/v1/answer", json={"question": f"Who founded Harvard? ({i})"})
            assert r.status_code == 200, r.text
    assert 0 < len(backend.calls) <= KEEP_CALLS == 64


@pytest.mark.parametrize("field", ["api_keys", "read_api_keys"])
@pytest.mark.parametrize("raw", [",", " , ,", " "])
def test_api_keys_that_list_no_key_are_refused(raw: str, field: str) -> None:
    """A non-empty CITEQA_API_KEYS that parses to no key would silently open the server."""
    with pytest.raises(ValidationError, match=f"CITEQA_{field.upper()}=.* lists no key"):
        Settings(**{field: raw})
    assert getattr(Settings(**{field: ""}), field) == ""
    assert getattr(Settings(**{field: " k1 ,"}), field) == " k1 ,"


@pytest.mark.parametrize("field", ["api_keys", "read_api_keys"])
@pytest.mark.parametrize("raw", ["k1,clé", "k1,has space", "tab\tkey", "ключ"])
def test_api_keys_no_client_can_send_are_refused(raw: str, field: str) -> None:
    """A UTF-8 'clé' was accepted at start but never matched (headers are read as Latin-1),
    and the Python client failed to encode it."""
    with pytest.raises(ValidationError, match="characters other than printable ASCII"):
        Settings(**{field: raw})
    assert getattr(Settings(**{field: "k1,K-2_x.y~!"}), field) == "k1,K-2_x.y~!"


def test_a_key_in_both_lists_is_refused() -> None:
    """Which did its owner mean: a key that may change the index, or one that only reads?"""
    with pytest.raises(ValidationError, match="1 key is in both CITEQA_API_KEYS and "
                                              "CITEQA_READ_API_KEYS"):
        Settings(api_keys="w1, shared", read_api_keys="shared ,r1")
    assert Settings(api_keys="w1", read_api_keys="r1").read_api_keys == "r1"


def test_a_client_waiting_for_100_continue_gets_the_413_without_sending_its_body(
        server_url: str) -> None:
    import socket

    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % TEN_MB)
        head = conn.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 "), head[:100]


class Echo(CannedPipeline):
    def answer(self, args: AskArgs) -> Answer:
        return Answer(args.question, True, None, None, 0.0, reason="canned")


@contextmanager
def echo_server(protocol: type, **settings: Any) -> Iterator[tuple[str, tuple[str, int]]]:
    """The app answering every question with an Echo, served over ``protocol``: its URL and
    (host, port)."""
    app = create_app(Settings(window_ms=1, **settings), lambda s: Echo())
    with running_server(app, http=protocol) as url:
        host, port = url.removeprefix("http://").split(":")
        yield url, (host, int(port))


def _trickle(conn: socket.socket, data: bytes, every_s: float) -> None:
    """Send ``data`` a byte at a time, ``every_s`` apart, until done or the server closes."""
    for byte in data:
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            return  # closed under it
        time.sleep(every_s)


def _raw_response(conn: socket.socket) -> bytes:
    """What the server sent until it closed the connection."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    return got


@pytest.mark.parametrize("head, part", [
    (b"Content-Length: 100\r\n", b'{"question": "q'),
    (b"Content-Length: 100\r\n", b""),  # none of it: silence, not a rate (it said so)
    (b"Transfer-Encoding: chunked\r\n", b'5\r\n{"que\r\n'),  # no last chunk
])
def test_a_body_that_stops_arriving_gets_408_and_the_connection_closed(
        head: bytes, part: bytes) -> None:
    """Nothing bounded the wait for the rest of a body: the request hung for ever."""
    with echo_server(head_timeout_protocol(0.5), client_timeout_s=0.5) as (_, address):
        with socket.create_connection(address, timeout=20) as conn:
            started = time.monotonic()
            conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n" + head + b"\r\n" + part)
            got = _raw_response(conn)
            waited = time.monotonic() - started
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        body = json.loads(got.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout", body
        assert "stopped arriving" in body["error"]["message"]
        assert 0.4 < waited < 10
        # a body that keeps coming, slowly, is read: the bound is on silence, and on the total
        # only at 500 bytes/s (MIN_BODY_RATE) past the silence bound
        with socket.create_connection(address, timeout=20) as conn:
            payload = b'{"question": "slow but steady"%s}' % (b" " * 1950)  # JSON spaces
            conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(payload))
            for i in range(0, len(payload), 500):  # 1.2 s in all, 0.3 s apart: 0.5 + 4 s allowed
                conn.sendall(payload[i:i + 500])
                time.sleep(0.3)
            got = _raw_response(conn)
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert b"slow but steady" in got


def test_a_body_that_trickles_in_below_the_minimum_rate_gets_408() -> None:
    """A client sending a byte just inside every silence bound held its request for as long as
    its body lasted (64 KiB at a byte per 29 s: three weeks)."""
    with echo_server(head_timeout_protocol(0.5), client_timeout_s=0.5) as (_, address):
        with socket.create_connection(address, timeout=20) as conn:
            started = time.monotonic()
            conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n")
            # a byte every 0.2 s: never silent 0.5 s
            _trickle(conn, b'{"question": "' + b"q" * 44, 0.2)
            got = _raw_response(conn)
            waited = time.monotonic() - started
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        message = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        assert "too slowly" in message and "500 bytes/s" in message, message
        assert 0.4 < waited < 5  # 0.5 s plus 1 s per 500 bytes, then the close


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/documents/\xff HTTP/1.1\r\nHost: x\r\n\r\n",  # a byte no request line holds
    b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_bytes_that_are_not_http_get_a_400_in_the_services_error_shape(
        request_bytes: bytes) -> None:
    """uvicorn answered them in plain text, without the security headers every other
    response has."""
    with echo_server(head_timeout_protocol(5.0)) as (_, address):
        with socket.create_connection(address, timeout=20) as conn:
            conn.sendall(request_bytes)
            got = _raw_response(conn)
    head, raw = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 "), got[:200]
    assert b"x-content-type-options: nosniff" in head and b"application/json" in head
    assert json.loads(raw)["error"]["code"] == "bad_request"


def test_one_client_address_holds_at_most_its_cap_of_connections() -> None:
    """uvicorn capped nothing: one client could open connections until the process had no file
    descriptor left for anyone (each held for the head bound, then opened again)."""
    closures: list[str] = []
    protocol = head_timeout_protocol(5.0, closures.append, max_per_client=2, retry_after_s=7)
    with echo_server(protocol) as (url, address):
        held = [socket.create_connection(address, timeout=20) for _ in range(2)]
        try:
            with socket.create_connection(address, timeout=20) as third:
                got = _raw_response(third)
            head, raw = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 7" in head.lower()
            body = json.loads(raw)
            assert body["error"]["code"] == "overloaded"
            assert "CITEQA_MAX_CONNECTIONS_PER_CLIENT" in body["error"]["message"]
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _raw_response(held[0]).startswith(b"HTTP/1.1 200 ")  # the held ones work
        finally:
            for conn in held:
                conn.close()
        for _ in range(100):  # the server hears of the closes: places are free again
            if not protocol.open_by_client:
                break
            time.sleep(0.05)
        assert not protocol.open_by_client
        with httpx.Client(base_url=url) as client:
            assert client.get("/healthz").is_success
    assert closures == ["too_many_connections"]


def test_a_client_that_stops_reading_its_responses_is_disconnected() -> None:
    """A client that sends requests and reads none of the responses: once they backed up,
    uvicorn waited for it to read for ever, holding the connection (60 such held 75 file
    descriptors past the client timeout)."""
    closures: list[str] = []
    with echo_server(head_timeout_protocol(0.6, closures.append)) as (_, address):
        with socket.socket() as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.settimeout(20)
            conn.connect(address)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)  # the page: ~37 KB each
            started = time.monotonic()
            while not closures and time.monotonic() < started + 15:
                time.sleep(0.05)
            assert closures == ["unread_response"] and 0.5 < time.monotonic() - started < 10
            try:  # the server's side is gone: what it had sent, then the end
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                pass


def test_a_request_head_that_trickles_in_or_never_comes_is_bounded() -> None:
    """uvicorn bounded no wait before a request's head was complete: a connection sending its
    headers a byte at a time (or nothing) held its place for ever."""
    closures: list[str] = []  # what the protocol said of the connections it closed
    with echo_server(head_timeout_protocol(0.6, closures.append)) as (url, address):
        with socket.create_connection(address, timeout=20) as conn:
            started = time.monotonic()
            # a byte every 0.1 s: never idle, never done
            _trickle(conn, b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nX-Slow: ", 0.1)
            got = _raw_response(conn)
            waited = time.monotonic() - started
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        head, raw = got.split(b"\r\n\r\n", 1)
        body = json.loads(raw)
        assert body["error"]["code"] == "request_timeout" and "head" in body["error"]["message"]
        assert b"x-content-type-options: nosniff" in head  # as every other response has
        assert 0.5 < waited < 10
        with socket.create_connection(address, timeout=20) as conn:  # says nothing
            started = time.monotonic()
            assert _raw_response(conn) == b""  # closed, without a word
            assert 0.5 < time.monotonic() - started < 10
        with socket.create_connection(address, timeout=20) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a whole request
            first = b""
            while not first.endswith(b"}"):  # the head, then the JSON body
                first += conn.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first[:100]
            _trickle(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", 0.1)  # then a trickle
            got = _raw_response(conn)
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]  # the next head is bounded too
        with socket.create_connection(address, timeout=20) as conn:
            # a body the app answered without reading, then trickled: uvicorn's keep-alive bound
            # stopped at its first byte, and the connection stayed open for as long as it came
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")
            answered = time.monotonic()
            closed = False
            while time.monotonic() - answered < 10 and not closed:
                time.sleep(0.2)
                try:
                    conn.sendall(b"x")
                except OSError:
                    closed = True
            if not closed:
                _raw_response(conn)  # closed by now (else the socket's 20 s timeout fails it)
            assert time.monotonic() - answered < 10
        assert closures == ["head_timeout", "silent", "head_timeout", "unread_body"]
        # a kept-alive connection quiet between requests longer than the bound is not cut:
        # uvicorn's keep-alive bound (5 s) is the one for that
        with httpx.Client(base_url=url) as client:
            assert client.post("/v1/answer", json={"question": "one"}).is_success
            time.sleep(1.0)
            assert client.post("/v1/answer", json={"question": "two"}).is_success
            assert client.get("/healthz").is_success


def test_a_coded_body_is_refused_unread_when_its_client_waits_for_100_continue(
        server_url: str) -> None:
    """The 415 read the body first: uvicorn then sent "100 Continue", asking for a body to be
    refused, and a client that sent none waited out the drain (5 s)."""
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        started = time.monotonic()
        conn.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Encoding: gzip\r\nContent-Length: 20\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        head = conn.recv(65536)
        assert time.monotonic() - started < 3
    assert head.startswith(b"HTTP/1.1 415 "), head[:100]


def test_the_soak_memory_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/soak.py's verdict: flat unless RSS grows over 10 % past the warm-up."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "soak", soak)  # its dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts the repository on the path
    spec.loader.exec_module(soak)
    warm = [(0.0, 100), (60.0, 500), (120.0, 520), (180.0, 549)]
    assert soak.memory_verdict(warm, 60.0)[:2] == (True, pytest.approx(0.098))
    flat, growth, sentence = soak.memory_verdict([*warm, (240.0, 551)], 60.0)
    assert (flat, growth) == (False, pytest.approx(0.102)) and "GROWING" in sentence
    assert soak.memory_verdict([(0.0, 100), (60.0, 500)], 60.0)[:2] == (None, None)


def test_a_body_whose_last_part_crosses_the_limit_gets_its_413_at_once() -> None:
    """The server may hand over a whole chunked body as one message: nothing is left to drain,
    and asking for more would wait for a message that never comes (before the fix: the drain's
    5 s timeout, longer than a client's read timeout)."""
    import asyncio

    from citeqa.api.middleware import BodyLimitMiddleware

    async def app(scope, receive, send):  # reads its body like a route does
        while (await receive()).get("more_body"):
            pass

    asked_after_end = []
    sent = []

    async def receive():
        if not asked_after_end:
            asked_after_end.append(False)
            return {"type": "http.request", "body": b"x" * 5000, "more_body": False}
        asked_after_end.append(True)
        await asyncio.sleep(3600)  # what a server does when the body is over: wait

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/answer", "headers": []}
    asyncio.run(asyncio.wait_for(BodyLimitMiddleware(app, 2048)(scope, receive, send), 2))
    assert sent[0]["status"] == 413 and asked_after_end == [False]


def _exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=20) as conn:
        conn.sendall(request)
        return _raw_response(conn)


def test_http_framing_edges_are_answered_as_the_rfc_says() -> None:
    """Found with raw sockets: a request framed both by Content-Length and Transfer-Encoding
    was served and its connection kept (a smuggling risk behind a proxy reading the other
    framing); an absolute-form target (``GET http://host/healthz``) was a 404; a second
    Content-Encoding header hid the first (a gzip body: a 400 blaming UTF-8); HEAD /healthz
    said another Content-Length than GET."""
    with echo_server(head_timeout_protocol(5.0), allowed_hosts="localhost") as (_, address):
        body = b'{"query":"bm25","k":1}'
        both = _exchange(address, b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Length: 5\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                         b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" % (len(body), body))
        assert both.startswith(b"HTTP/1.1 400 ") and both.count(b"HTTP/1.1 ") == 1, both[:300]
        assert b"both Content-Length and Transfer-Encoding" in both
        absolute = _exchange(address, b"GET http://localhost:1/v1/documents?limit=1 HTTP/1.1"
                             b"\r\nHost: elsewhere\r\nConnection: close\r\n\r\n")
        assert absolute.startswith(b"HTTP/1.1 200 "), absolute[:300]
        assert json.loads(absolute.split(b"\r\n\r\n", 1)[1])["limit"] == 1
        foreign = _exchange(address, b"GET http://evil.example/v1/documents HTTP/1.1\r\n"
                            b"Host: localhost\r\nConnection: close\r\n\r\n")
        assert foreign.startswith(b"HTTP/1.1 400 ") and b"bad_host" in foreign  # its authority
        gzip_twice = _exchange(address, b"POST /v1/search HTTP/1.1\r\nHost: localhost\r\n"
                               b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
                               b"Content-Encoding: identity\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert gzip_twice.startswith(b"HTTP/1.1 415 "), gzip_twice[:300]
        heads = [_exchange(address, b"%s /healthz HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n\r\n" % method).split(b"\r\n\r\n")[0].lower()
                 for method in (b"GET", b"HEAD")]
        lengths = [next(line for line in h.split(b"\r\n") if line.startswith(b"content-length"))
                   for h in heads]
        assert lengths[0] == lengths[1], lengths
