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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from citeqa.api.errors import error_body
from citeqa.api.middleware import SECURITY_HEADERS


def head_too_slow_response(timeout_s: float) -> bytes:
    """The raw 408 sent to a connection whose request head did not arrive in time."""
    body = json.dumps(error_body(
        "request_timeout", f"the request's head (its request line and headers) did not arrive "
        f"within {timeout_s:g} s (CITEQA_CLIENT_TIMEOUT_S)")).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"content-length", b"%d" % len(body)), *SECURITY_HEADERS]
    return (b"HTTP/1.1 408 Request Timeout\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            + b"\r\n" + body)


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's ``H11Protocol`` with a bound on the wait for each request's head (see the
    module docstring); ``head_timeout_protocol`` makes one with its bound."""

    timeout_s = 30.0
    # told why each connection it closes was closed: head_timeout, silent or unread_body
    on_close: Callable[[str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # some bytes of the awaited head arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends anything is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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
            self._disarm()
        else:
            self._arm()

    def on_response_complete(self) -> None:
        self._head_started = False  # a kept-alive connection waits under uvicorn's keep-alive
        super().on_response_complete()  # bound until the next head's first byte
        if self._awaited() == "leftover":
            self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
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
        if self.on_close is not None:
            self.on_close(reason)


def head_timeout_protocol(timeout_s: float, on_close: Callable[[str], None] | None = None,
                          ) -> type[HeadTimeoutProtocol]:
    """``HeadTimeoutProtocol`` bounding each head's wait at ``timeout_s`` (uvicorn's ``http``);
    ``on_close(reason)`` hears of each connection it closes (the service's metrics)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,),
                {"timeout_s": timeout_s, "on_close": staticmethod(on_close) if on_close else None})


__all__ = ["HeadTimeoutProtocol", "head_timeout_protocol", "head_too_slow_response"]
