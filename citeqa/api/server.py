"""The service under uvicorn, with a stop that keeps to the shutdown grace.

Told to stop (SIGTERM, Ctrl-C), uvicorn closes its sockets, waits for the requests in flight up
to ``timeout_graceful_shutdown``, cancels those left with a bare 500 of its own, and only then
runs the app's shutdown. Here the app's shutdown grace (``app.begin_shutdown``) begins as soon
as the server is told to stop: after ``shutdown_grace_s`` what is still queued is cancelled and
the running answers stop at their next step, each request answered with the service's 503
``shutting_down``; uvicorn's own timeout comes ``MARGIN_S`` later, for those responses to go
out.
"""

from __future__ import annotations

import math
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from citeqa.api.app import begin_shutdown

MARGIN_S = 5  # uvicorn's timeout after the grace: the 503s of the requests in flight go out


def uvicorn_grace_s(shutdown_grace_s: float) -> int:
    """uvicorn's ``timeout_graceful_shutdown`` for the service's grace (whole seconds)."""
    return max(1, math.ceil(shutdown_grace_s)) + MARGIN_S


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: FastAPI) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_shutdown(self.service.state.citeqa)  # the grace starts now, not after uvicorn's
        await super().shutdown(sockets)


def run(service: FastAPI, *, host: str, port: int, http: Any) -> None:
    """Serve ``service`` (``create_app``'s) until told to stop; exit 3 when it never started
    (as ``uvicorn.run``: the port taken, say)."""
    grace = service.state.citeqa.settings.shutdown_grace_s
    config = uvicorn.Config(service, host=host, port=port, log_level="info", http=http,
                            timeout_graceful_shutdown=uvicorn_grace_s(grace))
    server = _Server(config, service)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
