"""A chat-completion call read as a stream (``"stream": true``): its server-sent events put
together into the one body an unstreamed call gets, while a watch may end the call early.

Streaming is what lets a call end before its engine answers it. An engine's HTTP server can stay
open while nothing behind it will ever answer: vLLM stopped by a signal to its whole process
group (Ctrl-C in its terminal) held every request in flight, unanswered, until the caller's
timeout; and a request nobody waits for any more (its asker left, or its batch failed) kept the
engine generating to its end. A stream's socket is at hand as soon as its headers arrive, so
``Watch`` can shut it: for a stream with no event for ``STALL_S`` seconds, once the engine's
``/health`` says it is gone (the stream then ends as ``ENGINE_GONE``; asked on a thread of its
own); and, within ``EVERY_S``, for a stream whose request is abandoned (``ABANDONED``: the
engine sees its client go and aborts the request). A server that answers with plain JSON
instead (one that ignores ``stream``, or a buffering proxy) is read as before.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from citeqa.retry import read_whole

logger = logging.getLogger(__name__)

STALL_S = 5.0  # a stream this long without an event has its engine's /health asked
EVERY_S = 0.5  # how often the watch looks at the streams in flight
ABANDONED = "abandoned"
ENGINE_GONE = "engine gone"
EVENT_STREAM = "text/event-stream"
DRAINED_LINES = 16  # after [DONE], lines read to the body's end (more: the connection closes)


class BadEvent(Exception):
    """A streamed chunk of another shape than a chat completion's (its error in words)."""


class StreamEnded(Exception):
    """The watch ended this call's stream (``reason``: ``ABANDONED`` or ``ENGINE_GONE``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of an event stream's text ``chunks``, broken where the standard breaks them:
    at CRLF, CR or LF alone (httpx's ``iter_lines`` breaks at U+2028, U+2029, U+0085 ... too,
    as ``str.splitlines`` does, and vLLM sends those raw inside its JSON data lines: a quote
    across one failed as a bad event). Each chunk is searched once (a line in many chunks
    costs its length)."""
    pending: list[str] = []  # the line so far, not yet ended
    after_cr = False  # the last chunk ended in a CR: an LF starting this one is its CRLF's
    for chunk in chunks:
        if after_cr and chunk.startswith("\n"):
            chunk, after_cr = chunk[1:], False
        if not chunk:
            continue
        *ended, rest = _LINE_BREAK.split(chunk)
        if ended:
            yield "".join([*pending, ended[0]])
            yield from ended[1:]
            pending = []
        if rest:
            pending.append(rest)
        after_cr = chunk.endswith("\r")
    if pending:
        yield "".join(pending)


def events(lines: Iterable[str]) -> Iterator[str]:
    """The data of each server-sent event in ``lines`` (data lines joined by line breaks; an
    event ends at a blank line); comments and other fields skipped. Data the lines end in
    without a blank line is dropped, as the standard says (a stream cut off there), unless it
    is ``[DONE]`` (a server that leaves out the last blank line)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data and "\n".join(data).strip() == "[DONE]":
        yield "[DONE]"


def assembled(event_data: Iterable[str]) -> tuple[dict[str, Any], bool]:
    """The chat-completion body that the streamed chunks ``event_data`` add up to (read up to
    ``[DONE]``), and whether the stream was complete: every choice given its finish reason
    (vLLM stopping ends its streams with ``[DONE]`` and no reason: cut, not finished); an
    error event is the body ``{"error": ...}`` at once. ValueError or TypeError for a chunk of
    another shape."""
    choices: dict[int, dict[str, Any]] = {}
    for data in event_data:
        if data.strip() == "[DONE]":
            break
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise TypeError(f"a chunk is {type(chunk).__name__}, not an object")
        if chunk.get("error") is not None:
            return {"error": chunk["error"]}, True
        for c in chunk.get("choices") or []:
            index = c.get("index", 0)
            if not isinstance(index, int):
                raise TypeError(f"a choice's index is {type(index).__name__}")
            into = choices.setdefault(index, {"index": index, "text": [], "logprobs": None,
                                              "finish_reason": None})
            content = (c.get("delta") or {}).get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError(f"a delta's content is {type(content).__name__}")
            if content:
                into["text"].append(content)
            items = (c.get("logprobs") or {}).get("content")
            if items is not None:
                if not isinstance(items, list):
                    raise TypeError(f"a chunk's logprobs are {type(items).__name__}")
                into["logprobs"] = (into["logprobs"] or []) + items
            if c.get("finish_reason") is not None:
                into["finish_reason"] = c["finish_reason"]
    complete = bool(choices) and all(c["finish_reason"] is not None for c in choices.values())
    return _body(choices), complete


def _body(choices: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {"choices": [
        {"index": c["index"], "finish_reason": c["finish_reason"],
         "message": {"role": "assistant", "content": "".join(c["text"])},
         "logprobs": None if c["logprobs"] is None else {"content": c["logprobs"]}}
        for c in sorted(choices.values(), key=lambda c: c["index"])]}


class Watched:
    """One stream in flight: when it last heard from its engine, and why the watch ended it."""

    def __init__(self, sock: socket.socket | None, gone: Callable[[], bool]) -> None:
        self._socket = sock
        self.gone = gone
        self.last = time.monotonic()
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._over = False

    def heard(self) -> None:
        self.last = time.monotonic()

    def end(self, reason: str) -> None:
        """Shut the stream's socket, so that its read ends now (the server sees its client
        leave); nothing once the stream is over (its connection may carry another call)."""
        with self._lock:
            if self._over:
                return
            self.reason = reason
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

    def over(self) -> None:
        """The stream is read (or failed): ``end`` no longer touches its socket."""
        with self._lock:
            self._over = True


class Watch:
    """The streams in flight, looked at every ``every_s`` from one thread while there are
    any; ``engine_gone()`` asks the engine (at most once every ``stall_s``, on a thread of
    its own)."""

    def __init__(self, engine_gone: Callable[[], bool], *, every_s: float = EVERY_S,
                 stall_s: float = STALL_S) -> None:
        self._engine_gone = engine_gone
        self.every_s, self.stall_s = every_s, stall_s
        self._lock = threading.Lock()
        self._streams: set[Watched] = set()
        self._thread: threading.Thread | None = None
        self._asking = False  # an engine_gone() call is under way (on a thread of its own)

    @contextmanager
    def watching(self, response: httpx.Response, gone: Callable[[], bool]) -> Iterator[Watched]:
        watched = Watched(_socket_of(response), gone)
        with self._lock:
            self._streams.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="citeqa-stream-watch",
                                                daemon=True)
                self._thread.start()
        try:
            yield watched
        finally:
            watched.over()  # (before its connection goes back to the pool)
            with self._lock:
                self._streams.discard(watched)

    def _run(self) -> None:
        asked = 0.0
        while True:
            time.sleep(self.every_s)
            with self._lock:
                if not self._streams:  # (a stream added from now on starts a new thread)
                    self._thread = None
                    return
                streams = list(self._streams)
            asked = self._look(streams, asked)

    def _look(self, streams: list[Watched], asked: float) -> float:
        """End the abandoned streams; have the engine asked about the stalled ones (on a
        thread of its own: its answer may take seconds, abandoned streams may not wait);
        when the engine was last asked."""
        for w in streams:
            try:
                if w.reason is None and w.gone():
                    w.end(ABANDONED)
            except Exception:  # (the watch must outlive a bad callback: it is the only one)
                logger.exception("the stream watch could not tell whether a call is abandoned")
        now = time.monotonic()
        stalled = [w for w in streams if w.reason is None and now - w.last >= self.stall_s]
        if stalled and now - asked >= self.stall_s and not self._asking:
            self._asking = True
            threading.Thread(target=self._ask, args=(stalled,), name="citeqa-engine-probe",
                             daemon=True).start()
            return now
        return asked

    def _ask(self, stalled: list[Watched]) -> None:
        """End the ``stalled`` streams when the engine is gone."""
        try:
            if self._engine_gone():
                for w in stalled:
                    w.end(ENGINE_GONE)
        except Exception:
            logger.exception("the stream watch could not ask whether the engine is gone")
        finally:
            self._asking = False


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:  # (a test's MockTransport)
        return None
    sock = stream.get_extra_info("socket")
    return sock if isinstance(sock, socket.socket) else None


def post_streamed(client: httpx.Client, url: str, body: dict[str, Any], deadline: float, *,
                  watch: Watch, gone: Callable[[], bool],
                  headers: dict[str, str]) -> httpx.Response:
    """POST ``body`` with ``"stream": true`` and return the response an unstreamed call would
    have had (the events put together as its JSON body; a non-stream answer, an error's
    included, read whole as it came), all by ``deadline`` like ``retry.request_by``.
    StreamEnded when the watch ended it; httpx.RemoteProtocolError for a stream cut before
    its end; BadEvent for chunks of another shape."""
    with client.stream("POST", url, json={**body, "stream": True}, headers=headers,
                       timeout=max(deadline - time.monotonic(), 1.0)) as resp:
        if resp.status_code != 200 or EVENT_STREAM not in resp.headers.get("content-type", ""):
            return read_whole(resp, deadline)
        with watch.watching(resp, gone) as watched:
            lines = _heard(sse_lines(resp.iter_text()), watched, deadline)
            try:
                data, complete = assembled(events(lines))
            except httpx.TransportError:
                if watched.reason is not None:
                    raise StreamEnded(watched.reason) from None
                raise
            except (ValueError, TypeError, AttributeError) as e:
                raise BadEvent(repr(e)) from e
            if watched.reason is not None:  # (a shut socket may read as the stream's end)
                raise StreamEnded(watched.reason)
            try:  # what follows [DONE], the body's end: read, so the connection is reused
                for _ in itertools.islice(lines, DRAINED_LINES):
                    pass
            except httpx.HTTPError:  # (the answer is whole; the connection is not reused)
                pass
        if "error" in data:  # (an engine failing mid-stream: its error's code, else a 500)
            code = data["error"].get("code") if isinstance(data["error"], dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            return httpx.Response(status, json=data, request=resp.request)
        if not complete:
            raise httpx.RemoteProtocolError("the stream ended before its last event")
        return httpx.Response(200, json=data, request=resp.request)


def _heard(lines: Iterator[str], watched: Watched, deadline: float) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):  # (a comment, a keep-alive, is no word from the model)
            watched.heard()
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the answer was still coming at the deadline")
        yield line
