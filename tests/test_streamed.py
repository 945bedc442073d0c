"""Streamed chat completions (citeqa/generation/streamed.py): server-sent events put together
as the unstreamed body, and the watch that ends a stream early, against a real socket (a stream
whose engine is gone, one whose asker left, one merely slow)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.errors import EngineError, EngineUnavailableError
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.remote import RemoteBackend
from citeqa.generation.streamed import (
    ABANDONED,
    Watch,
    Watched,
    assembled,
    events,
    sse_lines,
)
from citeqa.retry import Backoff

MSGS = ({"role": "user", "content": "q?"},)
FAST = Backoff(retries=2, base_s=0.01, max_s=0.05)


def chunk(i: int, content: str | None = None, lps: list[float] | None = None,
          finish: str | None = None, *, ascii: bool = True) -> str:
    c: dict = {"index": i, "delta": {} if content is None else {"content": content},
               "finish_reason": finish}
    if lps is not None:
        c["logprobs"] = {"content": [{"token": "t", "logprob": lp} for lp in lps]}
    return "data: " + json.dumps({"choices": [c]}, ensure_ascii=ascii) + "\n\n"


def sse(*parts: str) -> bytes:
    return "".join(parts).encode()


def test_events_follow_the_server_sent_events_rules():
    lines = [": a comment", "event: message", "data: one", "", "data:two", "data:  three", "",
             "", "id: 4", "data: a", "data: b", ""]
    assert list(events(lines)) == ["one", "two\n three", "a\nb"]
    # data the lines end in without a blank line is a stream cut off: dropped, unless [DONE]
    assert list(events(["data: one", "", 'data: {"choices": [{"delta": {"cont'])) == ["one"]
    assert list(events(["data: one", "", "data: [DONE]"])) == ["one", "[DONE]"]


def test_chunks_add_up_to_the_unstreamed_body():
    body, complete = assembled([
        json.dumps({"choices": [{"index": 1, "delta": {"role": "assistant"}}]}),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "Ans"},
                                 "logprobs": {"content": [{"logprob": -1.0}]}},
                                {"index": 1, "delta": {"content": "Other"},
                                 "logprobs": {"content": [{"logprob": -2.0}]}}]}),
        json.dumps({"choices": [{"index": 0, "delta": {"content": "wer"},
                                 "logprobs": {"content": [{"logprob": -0.5}]},
                                 "finish_reason": "stop"}]}),
        json.dumps({"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]}),
        "[DONE]", "ignored after the end"])
    assert complete
    assert body == {"choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Answer"},
         "logprobs": {"content": [{"logprob": -1.0}, {"logprob": -0.5}]}},
        {"index": 1, "finish_reason": "length", "message": {"role": "assistant",
                                                             "content": "Other"},
         "logprobs": {"content": [{"logprob": -2.0}]}}]}


def test_a_stream_is_complete_once_every_choice_has_finished():
    """vLLM stopping (SIGTERM) ended its streams with [DONE] and no finish reason: taken as
    complete, each candidate was an empty answer, and the question a 200 decline, not a 503."""
    no_logprobs = json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    assert assembled([no_logprobs]) == ({"choices": [
        {"index": 0, "finish_reason": None, "message": {"role": "assistant", "content": "x"},
         "logprobs": None}]}, False)
    assert assembled([no_logprobs, "[DONE]"]) == assembled([no_logprobs])  # cut, not finished
    finished = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert assembled([finished])[1] and assembled([no_logprobs, finished, "[DONE]"])[1]
    assert assembled([]) == ({"choices": []}, False) == assembled(["[DONE]"])
    err = {"message": "grammar failed", "code": 400}
    assert assembled([no_logprobs, json.dumps({"error": err}), "[DONE]"]) == ({"error": err}, True)


@pytest.mark.parametrize("data", ["{not json", "[1]", '{"choices": [{"index": "0"}]}',
                                  '{"choices": [{"delta": {"content": 3}}]}',
                                  '{"choices": [{"logprobs": {"content": 1}}]}'])
def test_a_chunk_of_another_shape_is_refused(data):
    with pytest.raises((ValueError, TypeError)):
        assembled([data])


def mocked(content: bytes, status: int = 200) -> RemoteBackend:
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(
        status, content=content, headers={"content-type": "text/event-stream"})))
    return RemoteBackend("http://gen", "m", client=client, backoff=FAST, timeout_s=2)


def test_a_streamed_answer_is_the_unstreamed_one():
    b = mocked(sse(chunk(0, "Answer: a", [-1.0, -0.5]), chunk(0, "\nQuote", [-0.25], "stop"),
                   "data: [DONE]\n\n"))
    [[c]] = b.generate([GenerationRequest(messages=MSGS)])
    assert (c.text, c.logprob, c.n_tokens) == ("Answer: a\nQuote", -1.75, 3)


def test_event_stream_lines_break_where_the_standard_says_only():
    """vLLM sends U+2028, U+2029 and U+0085 raw in its JSON data lines; httpx's iter_lines
    broke lines there too (as str.splitlines does): a quote across one was a 502."""
    assert list(sse_lines(["a\nb\n\n"])) == ["a", "b", ""]
    assert list(sse_lines(["a\r", "\nb\r\n", "\r\n"])) == ["a", "b", ""]  # a CRLF split
    assert list(sse_lines(["x\ry\rz"])) == ["x", "y", "z"]
    assert list(sse_lines(["", "a\u2028b\x85", "c\u2029d\x0b\x1ce\n", "tail"])) == [
        "a\u2028b\x85c\u2029d\x0b\x1ce", "tail"]
    assert list(sse_lines(["x\r"])) == ["x"] and list(sse_lines([])) == []
    text = "The quux value is 17.\u2028 line sep \x85 next.\u2029 end"
    b = mocked(sse(chunk(0, text[:30], [-1.0], ascii=False),  # (raw, as vLLM sends them)
                   chunk(0, text[30:], [-0.5], "stop", ascii=False), "data: [DONE]\n\n"))
    [[c]] = b.generate([GenerationRequest(messages=MSGS)])
    assert (c.text, c.logprob) == (text, -1.5)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=["a", "\u00e9", "\r", "\n", "\u2028", "\x85", " "], max_size=40),
       st.lists(st.integers(0, 40), max_size=8))
def test_event_stream_lines_are_the_same_however_the_text_is_cut(text: str,
                                                                 cuts: list[int]) -> None:
    """Cut anywhere (a CRLF across two chunks, empty chunks), the lines are the whole text's:
    split at CRLF, CR or LF, a last line ended or not."""
    import re

    bounds = sorted(min(c, len(text)) for c in cuts)
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    whole = re.split(r"\r\n|\r|\n", text)
    assert list(sse_lines(chunks)) == (whole[:-1] if whole[-1] == "" else whole)


def test_streamed_failures_are_the_engines_errors():
    error = 'data: {"error": {"message": "the grammar is bad", "code": 400}}\n\n'
    with pytest.raises(EngineError, match="answered 400: the grammar is bad"):
        mocked(sse(chunk(0, "a"), error)).generate([GenerationRequest(messages=MSGS)])
    with pytest.raises(EngineError, match="unexpected stream event"):
        mocked(b"data: {oops\n\n").generate([GenerationRequest(messages=MSGS)])
    # a stream cut before its end is a broken connection: tried again, then unavailable (not
    # "cannot be reached": it was, and answered in part)
    for cut in (sse(chunk(0, "a")), sse(chunk(0, "a"), 'data: {"choices": [{"delta": {"co'),
                sse(chunk(0, ""), "data: [DONE]\n\n")):
        with pytest.raises(EngineUnavailableError, match="broke off its answer"):
            mocked(cut).generate([GenerationRequest(messages=MSGS)])


class Engine:
    """A real socket: a stream that sends one chunk, then nothing until ``release``; /health
    answers ``health``; ``left`` is set once the client went away mid-stream."""

    def __init__(self) -> None:
        self.health = 200
        self.health_s = 0.0  # how long /health takes to answer
        self.peers: set[int] = set()  # the client ports calls came from (one per connection)
        self.release = threading.Event()
        self.left = threading.Event()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(engine.health_s)
                self.send_response(engine.health)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine.peers.add(self.client_address[1])
                if body["messages"][0]["content"] == "quick":  # a whole answer, kept alive
                    sent = sse(chunk(0, "Answer: a", [-1.0], "stop"), "data: [DONE]\n\n")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(len(sent)))
                    self.end_headers()
                    self.wfile.write(sent)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(sse(chunk(0, "Answer: a", [-1.0])))
                self.wfile.flush()
                while not engine.release.wait(0.05):
                    try:  # (a client gone shows as a write that fails)
                        self.wfile.write(b": waiting\n")
                        self.wfile.flush()
                    except OSError:
                        engine.left.set()
                        return
                self.wfile.write(sse(chunk(0, "\nQuote", [-1.0], "stop"), "data: [DONE]\n\n"))
                self.close_connection = True

        Handler.protocol_version = "HTTP/1.1"  # (keep-alive: a connection may carry calls)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def engine() -> Iterator[Engine]:
    e = Engine()
    thread = threading.Thread(target=e.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield e
    finally:
        e.release.set()
        e.server.shutdown()
        e.server.server_close()


def test_a_stream_whose_engine_is_gone_ends_within_seconds_not_at_its_timeout():
    """vLLM stopped by a signal to its process group held its requests, unanswered, until
    citeqa's timeout (120 s)."""
    with engine() as e:
        b = RemoteBackend(e.url, "m", timeout_s=30, stall_s=0.3, backoff=FAST)
        e.health = 503
        t0 = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="stopped while answering"):
            b.generate([GenerationRequest(messages=MSGS)])
        assert time.monotonic() - t0 < 5


def test_a_slow_stream_from_a_healthy_engine_is_waited_for():
    """Comments keep this stream's socket busy but are no word from the model: the watch asks
    /health, which says the engine is up, so the call goes on to its end."""
    with engine() as e:
        b = RemoteBackend(e.url, "m", timeout_s=30, stall_s=0.3, backoff=FAST)
        threading.Timer(1.5, e.release.set).start()
        [[c]] = b.generate([GenerationRequest(messages=MSGS)])
        assert (c.text, c.n_tokens) == ("Answer: a\nQuote", 2)


def test_a_stream_nobody_waits_for_is_ended_and_the_engine_sees_its_client_leave():
    with engine() as e:
        b = RemoteBackend(e.url, "m", timeout_s=30, backoff=FAST)
        left = threading.Event()
        threading.Timer(0.5, left.set).start()
        t0 = time.monotonic()
        [[c]] = b.generate([GenerationRequest(messages=MSGS, abandoned=left.is_set)])
        assert (c.text, c.n_tokens) == ("", 0)
        assert time.monotonic() - t0 < 3
        assert e.left.wait(3)


def test_a_closed_backend_ends_its_calls_in_flight_and_their_threads():
    """Ctrl-C (`ask`, `eval`, `redteam`) closed nothing: the pools' threads, each in a call to
    an engine that did not answer, held the process until the request timeout (~2 min)."""
    with engine() as e:
        b = RemoteBackend(e.url, "m", timeout_s=60, stall_s=30, backoff=FAST)
        done = threading.Event()
        caller = threading.Thread(target=lambda: (b.generate([GenerationRequest(messages=MSGS)]),
                                                  done.set()), daemon=True)
        caller.start()
        time.sleep(0.5)  # the call is in flight
        t0 = time.monotonic()
        b.close()
        assert done.wait(5) and time.monotonic() - t0 < 3
        assert e.left.wait(3)  # the engine saw its client leave (it stops generating)
        b._pool.shutdown(wait=True)  # no thread is left in a call
        b._continue.shutdown(wait=True)
        assert time.monotonic() - t0 < 5


def test_a_stream_over_is_never_shut_its_connection_may_carry_another_call():
    """The watch looks at a list of streams taken a moment before: one read to its end (its
    connection back in the pool, perhaps already another call's) must not be shut then."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        watched = Watched(mine, lambda: True)
        watched.over()
        watched.end(ABANDONED)
        assert watched.reason is None
        theirs.sendall(b"x")
        assert mine.recv(1) == b"x"  # still open
        live = Watched(mine, lambda: True)
        live.end(ABANDONED)
        assert live.reason == ABANDONED and mine.recv(1) == b""  # shut: the read ends


def test_the_watch_outlives_a_callback_that_fails():
    asked = []

    def engine_gone() -> bool:
        asked.append(1)
        raise RuntimeError("a bad probe")

    watch = Watch(engine_gone, every_s=0.02, stall_s=0.05)
    flaky = iter([RuntimeError("a bad gone()")])

    def gone() -> bool:
        for e in flaky:
            raise e
        return len(asked) >= 2  # the watch went on after both failures

    response = httpx.Response(200)
    with watch.watching(response, gone) as watched:
        deadline = time.monotonic() + 3
        while watched.reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
    assert watched.reason == ABANDONED and len(asked) >= 2


def test_a_connection_carries_call_after_call():
    """Left unread after [DONE], the body's end kept each connection from the pool: every
    completion opened a new one (a TLS handshake each, over https)."""
    with engine() as e:
        b = RemoteBackend(e.url, "m", timeout_s=30, backoff=FAST)
        quick = ({"role": "user", "content": "quick"},)
        for _ in range(3):
            [[c]] = b.generate([GenerationRequest(messages=quick)])
            assert c.text == "Answer: a"
        assert len(e.peers) == 1


def test_an_abandoned_stream_does_not_wait_for_a_slow_health_answer():
    """One thread both asked /health (up to 2 s) and looked for abandoned streams: a call given
    up on while the engine was being asked ran on until its answer came."""
    with engine() as e:
        e.health_s = 2.0
        b = RemoteBackend(e.url, "m", timeout_s=30, stall_s=0.3, backoff=FAST)
        stalled = threading.Thread(target=b.generate, args=([GenerationRequest(messages=MSGS)],))
        stalled.start()
        time.sleep(0.9)  # the engine is being asked about it now
        left = threading.Event()
        threading.Timer(0.3, left.set).start()  # once its call is out (stalled too)
        t0 = time.monotonic()
        [[c]] = b.generate([GenerationRequest(messages=MSGS, abandoned=left.is_set)])
        assert c.text == "" and time.monotonic() - t0 < 0.3 + 0.9
        e.release.set()
        stalled.join(10)
