"""The HTTP protocol `citeqa serve` runs: uvicorn's h11 protocol with a bound on the wait for a
request's head (its request line and headers).

uvicorn bounds nothing before a request's head is complete: a connection that sends nothing,
or sends its headers a byte at a time ("slowloris"), is held open for ever, and enough of them
hold every place the server has. Here each head must arrive within ``timeout_s`` of the
connection (or, on a kept-alive connection, of the head's first byte); then a partial head is
answered 408 in the service's error shape and the connection closed (one that sent nothing is
closed silently). Bodies the app reads are bounded by ``middleware.BodyLimitMiddleware`` (the
same setting, ``CITEQA_CLIENT_TIMEOUT_S``, as time without a byte); the rest of a body the app
answered without reading (a probe, a 404) must end within the same time of the answer, or the
connection is closed (uvicorn's keep-alive bound stopped at its first byte).

A response the client stops reading (its data backed up past the transport's high-water mark
and not drained below the low one for ``timeout_s``) ends the connection: uvicorn waits on
such a client for ever, holding the connection and its file descriptor.

It also caps the connections one client address holds open at once (``max_per_client``;
uvicorn caps none): past it a new connection is answered 503 and closed, so that one client
cannot hold every file descriptor the process has.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from citeqa.api.errors import error_body
from citeqa.api.middleware import SECURITY_HEADERS


def _error_parts(code: str, message: str, extra: tuple[tuple[bytes, bytes], ...] = (),
                 ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of an error response in the service's error shape that closes the
    connection."""
    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"content-length", b"%d" % len(body)), *extra, *SECURITY_HEADERS]
    return headers, body


def _raw_error(status: bytes, code: str, message: str,
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A whole HTTP/1.1 error response (``_error_parts``), as bytes."""
    headers, body = _error_parts(code, message, extra)
    return (b"HTTP/1.1 " + status + b"\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n" + body)


def head_too_slow_response(timeout_s: float) -> bytes:
    """The raw 408 sent to a connection whose request head did not arrive in time."""
    return _raw_error(b"408 Request Timeout", "request_timeout",
                      f"the request's head (its request line and headers) did not arrive "
                      f"within {timeout_s:g} s (CITEQA_CLIENT_TIMEOUT_S)")


def too_many_connections_response(limit: int, retry_after_s: int) -> bytes:
    """The raw 503 sent to a connection over its client address's cap, asking for a retry
    after ``retry_after_s`` as the service's other 503s do (CITEQA_RETRY_AFTER_S)."""
    return _raw_error(b"503 Service Unavailable", "overloaded",
                      f"this address holds {limit} connections to the service already "
                      "(CITEQA_MAX_CONNECTIONS_PER_CLIENT); reuse or close one, then retry",
                      ((b"retry-after", b"%d" % retry_after_s),))


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's ``H11Protocol`` with a bound on the wait for each request's head (see the
    module docstring); ``head_timeout_protocol`` makes one with its bound."""

    timeout_s = 30.0
    # told why each connection it closes was closed: head_timeout, silent, unread_body,
    # unread_response or too_many_connections
    on_close: Callable[[str], None] | None = None
    max_per_client = 0  # connections one client address may hold open at once; 0 = no cap
    retry_after_s = 2  # the Retry-After of the 503 past that cap (CITEQA_RETRY_AFTER_S)
    open_by_client: Counter[str] = Counter()  # a server's own (head_timeout_protocol)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wait_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # some bytes of the awaited head arrived
        self._counted: str | None = None  # the client address this connection counts for
        self._write_timer: asyncio.TimerHandle | None = None  # while writing is paused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else None  # None: a Unix socket
        if address is not None and self.max_per_client:
            if self.open_by_client[address] >= self.max_per_client:
                self.logger.info("refusing a connection from %s: it holds %d already", address,
                                 self.max_per_client)
                transport.write(too_many_connections_response(self.max_per_client,
                                                            self.retry_after_s))
                transport.close()
                self._closed("too_many_connections")
                return
            self.open_by_client[address] += 1
            self._counted = address
        self._arm_wait()  # a connection that never sends anything is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_wait()
        self._disarm_write()
        if self._counted is not None:
            self.open_by_client[self._counted] -= 1
            if not self.open_by_client[self._counted]:
                del self.open_by_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """The 400 for bytes that are not an HTTP/1.1 request, in the service's error shape
        with its headers (uvicorn's was plain text, without them)."""
        headers, body = _error_parts(
            "bad_request", "the request is not valid HTTP/1.1 (its request line or headers, "
            "or a chunk's framing, could not be read)")
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _awaited(self) -> str | None:
        """What the connection waits for from its client that no other bound covers: "head"
        (no complete request yet), "leftover" (the rest of a body the app answered without
        reading: uvicorn's keep-alive bound stops at its first byte), or None."""
        if self.transport.is_closing():
            return None
        if self.conn.their_state is h11.IDLE:
            return "head"
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
            return "leftover"
        return None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        awaited = self._awaited()
        if awaited == "head":
            self._head_started = True  # part of a head: no request yet
        if awaited is None:
            self._disarm_wait()
        else:
            self._arm_wait()

    def on_response_complete(self) -> None:
        self._head_started = False  # a kept-alive connection waits under uvicorn's keep-alive
        super().on_response_complete()  # bound until the next head's first byte
        if self._awaited() == "leftover":
            self._arm_wait()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.timeout_s, self._response_unread)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_write()

    def _response_unread(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        self.logger.info("closing a connection whose client read none of its response for %g s",
                         self.timeout_s)
        self.transport.abort()  # (close() would wait for the backed-up data to go)
        self._closed("unread_response")

    def _arm_wait(self) -> None:
        """Bound the wait for what ``_awaited`` says the client owes, unless already bound."""
        if self._wait_timer is None:
            self._wait_timer = self.loop.call_later(self.timeout_s, self._client_too_slow)

    def _disarm_wait(self) -> None:
        _cancel(self._wait_timer)
        self._wait_timer = None

    def _disarm_write(self) -> None:
        _cancel(self._write_timer)
        self._write_timer = None

    def _client_too_slow(self) -> None:
        self._wait_timer = None
        awaited = self._awaited()
        if awaited is None:
            return
        if awaited == "head" and self._head_started:
            self.logger.info("closing a connection whose request head took over %g s",
                             self.timeout_s)
            self.transport.write(head_too_slow_response(self.timeout_s))
            reason = "head_timeout"
        else:
            reason = "silent" if awaited == "head" else "unread_body"
        self.transport.close()
        self._closed(reason)

    def _closed(self, reason: str) -> None:
        """Tell ``on_close`` (the service's metrics) of a connection closed for ``reason``."""
        if self.on_close is not None:
            self.on_close(reason)


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    """Cancel ``timer`` (None: none is set)."""
    if timer is not None:
        timer.cancel()


def head_timeout_protocol(timeout_s: float, on_close: Callable[[str], None] | None = None,
                          max_per_client: int = 0,
                          retry_after_s: int = 2) -> type[HeadTimeoutProtocol]:
    """``HeadTimeoutProtocol`` bounding each head's wait at ``timeout_s`` (uvicorn's ``http``)
    and each client address's open connections at ``max_per_client`` (0: no cap; the 503
    past it asks for a retry after ``retry_after_s``);
    ``on_close(reason)`` hears of each connection it closes (the service's metrics)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,),
                {"timeout_s": timeout_s, "on_close": staticmethod(on_close) if on_close else None,
                 "max_per_client": max_per_client, "retry_after_s": retry_after_s,
                 "open_by_client": Counter()})


__all__ = ["HeadTimeoutProtocol", "head_timeout_protocol", "head_too_slow_response",
           "too_many_connections_response"]
