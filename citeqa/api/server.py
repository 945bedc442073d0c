"""The service under uvicorn, with a stop that keeps to the shutdown grace.

Told to stop (SIGTERM, Ctrl-C), uvicorn closes its sockets, waits for the requests in flight up
to ``timeout_graceful_shutdown``, cancels those left with a bare 500 of its own, and only then
runs the app's shutdown. Here the app's shutdown grace (``app.begin_shutdown``) begins as soon
as the server is told to stop: after ``shutdown_grace_s`` what is still queued is cancelled and
the running answers stop at their next step, each request answered with the service's 503
``shutting_down``; uvicorn's own timeout comes ``MARGIN_S`` later, for those responses to go
out.

Also the accept loop's faults, when file descriptors run out: ``EventLoop`` (one retry a
second, not a busy core), ``AcceptErrors`` (one report every ``REPORT_EVERY_S``), and the open
files' soft limit raised at start (``raise_open_files_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from citeqa.api.app import begin_shutdown

MARGIN_S = 5  # uvicorn's timeout after the grace: the 503s of the requests in flight go out
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message (EMFILE, ENOMEM)
REPORT_EVERY_S = 10.0
MAX_OPEN_FILES = 65536  # the soft limit raised to (at most the hard one)

log = logging.getLogger(__name__)


def uvicorn_grace_s(shutdown_grace_s: float) -> int:
    """uvicorn's ``timeout_graceful_shutdown`` for the service's grace (whole seconds)."""
    return max(1, math.ceil(shutdown_grace_s)) + MARGIN_S


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Accepts:
    """A listening socket whose ``accept`` says nothing is waiting once one failed for want of
    resources, until the loop's next turn (``EventLoop``)."""

    def __init__(self, sock: Any) -> None:
        self.raw, self.failed = sock, False

    def accept(self) -> Any:
        if self.failed:
            raise BlockingIOError(errno.EAGAIN, "stopped after a failed accept")
        try:
            return self.raw.accept()
        except OSError as e:
            self.failed = e.errno in _OUT_OF_RESOURCES
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class EventLoop(asyncio.SelectorEventLoop):
    """asyncio's event loop, less a fault of Python 3.11's: where an accept fails for want of
    file descriptors (or memory) its accept loop goes on for all its ``backlog`` (2048) tries,
    each scheduling another retry a second later, so a server out of file descriptors kept a
    core busy (14 s of CPU in 20 s, 227,000 tries in 10 s). Here the first such failure ends
    the turn's tries, and one retry comes a second later, as asyncio means it to."""

    def _accept_connection(self, protocol_factory: Any, sock: Any, *args: Any,
                           **kwargs: Any) -> None:
        super()._accept_connection(  # type: ignore[misc]
            protocol_factory, _Accepts(getattr(sock, "raw", sock)), *args, **kwargs)


def loop_factory() -> asyncio.AbstractEventLoop:
    """The service's event loop (uvicorn's ``loop``): uvloop where it is installed (it has no
    such fault), else ``EventLoop``."""
    try:
        import uvloop
    except ImportError:
        return EventLoop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


class AcceptErrors:
    """An event loop's exception handler that reports failed accepts once per ``every_s``, with
    their count, and hands anything else to the loop's default handler. Python 3.11's accept
    loop reports one for each of its ``backlog`` (2048) tries every second once file
    descriptors run out: with ``ulimit -n 64`` and 100 idle clients, 96,000 tracebacks, 40 MB
    of log and a busy core in 22 s."""

    def __init__(self, every_s: float = REPORT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.last: float | None = None
        self.unreported = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        self.unreported += 1
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        log.error("cannot accept connections (%s; %d tries since the last report): the "
                  "process is out of file descriptors or memory; clients wait or are refused "
                  "until connections close; raise `ulimit -n` (now %s) or put a proxy that "
                  "limits connections in front (docs/deploy.md)", context.get("exception"),
                  self.unreported, open_files_limit())
        self.unreported = 0


def open_files_limit() -> str:
    """The process's soft limit on open files, as text ("unknown" where none can be read)."""
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"


def raise_open_files_limit(most: int = MAX_OPEN_FILES) -> None:
    """Raise the soft limit on open files towards the hard one (``most`` at the most): each
    connection takes one, and a soft 1024 (a common default) is a few hundred idle clients
    away from refusing every new one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = most if hard == resource.RLIM_INFINITY else min(most, hard)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError) as e:  # no such limits here; or not allowed
        log.debug("could not raise the open files limit: %s", e)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: FastAPI) -> None:
        super().__init__(config)
        self.service = service

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_shutdown(self.service.state.citeqa)  # the grace starts now, not after uvicorn's
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, but a SIGTERM the drain answered is not sent again once it is done (for a
        program that embeds uvicorn's own handler): the process ended by it, status 143 to a
        shell or a supervisor, after a clean stop; it exits 0, as after Ctrl-C."""
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [sig for sig in captured if sig != signal.SIGTERM]


def run(service: FastAPI, *, host: str, port: int, http: Any) -> None:
    """Serve ``service`` (``create_app``'s) until told to stop; exit 3 when it never started
    (as ``uvicorn.run``: the port taken, say)."""
    raise_open_files_limit()
    grace = service.state.citeqa.settings.shutdown_grace_s
    config = uvicorn.Config(service, host=host, port=port, log_level="info", http=http,
                            timeout_graceful_shutdown=uvicorn_grace_s(grace),
                            loop=f"{__name__}:loop_factory")
    server = _Server(config, service)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
