"""ASGI middleware of the service, and the page's CSP.

- ``BodyLimitMiddleware``: a request body's size limit (413), coding (415) and slowest rate (408);
- ``UnexpectedErrorMiddleware``: an error no route expected is the service's JSON 500;
- ``SecurityHeadersMiddleware``: the security headers of every response (``SECURITY_HEADERS``);
- ``AbsoluteFormMiddleware``: a request target in absolute form served as its path;
- ``HostCheckMiddleware``: 400 for a Host the service does not answer (DNS rebinding).

All are plain ASGI: they see every response, including the error bodies the routes never
produce (a 413 sent before the body was read).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from urllib.parse import unquote

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citeqa.api.errors import (
    BodyStalledError,
    BodyTooLargeError,
    error_response,
    too_large_message,
    unexpected_error_response,
)

API_CSP = "default-src 'none'; frame-ancestors 'none'"
# A refused body is still read (and dropped) up to these bounds before the 413 goes out: a client
# that sends its whole body before reading (urllib, requests) would otherwise see the server
# close on unread data as a connection reset instead of the 413. Past them the server closes.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_S = 5.0
# Past its first ``idle_s`` seconds a body must keep arriving at this average rate (Apache's
# mod_reqtimeout ``MinRate`` default): a client trickling a byte just inside every silence bound
# held its request (and a place in the server) for days. 64 KiB may take 30 s + 131 s.
MIN_BODY_RATE = 500  # bytes/s


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def page_csp(html: str) -> str:
    """A strict Content-Security-Policy for a self-contained page: only its own inline
    ``<script>`` and ``<style>`` blocks run (by hash), fetches go to this origin only."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    script_src = " ".join(_sha256_source(s) for s in scripts) or "'none'"
    style_src = " ".join(_sha256_source(s) for s in styles) or "'none'"
    return (
        f"default-src 'none'; script-src {script_src}; style-src {style_src}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


async def drain(receive: Receive, *, max_bytes: int = DRAIN_MAX_BYTES,
                max_s: float = DRAIN_MAX_S) -> bool:
    """Read and discard the rest of a request body, at most ``max_bytes`` within ``max_s``
    seconds; True when the body ended (the connection can then answer cleanly)."""
    read = 0
    try:
        async with asyncio.timeout(max_s):
            while read <= max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return False  # the client went away
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: from Content-Length, and counted while reading (chunked
    bodies have no Content-Length). The refused body is drained (bounded, see ``drain``) before
    the 413 is sent, so that clients which write their whole body first read the 413. A body in
    a content coding (``Content-Encoding`` other than identity) gets 415. A body
    of which nothing more arrives for ``idle_s`` while it is read gets 408 (neither uvicorn nor
    the app bounded that wait: a client that stopped mid-body held its request for ever), and so
    does one slower in all than ``idle_s`` plus a second per ``min_rate`` bytes received."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_s: float = 30.0,
                 min_rate: float = MIN_BODY_RATE) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 sec. 6.3: a message framed both ways is an error or a smuggling attempt
            # (a proxy in front may read the other framing): refused, and the connection closed
            await error_response(400, "bad_request", "a request may not have both "
                                 "Content-Length and Transfer-Encoding",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        # A client waiting for "100 Continue" has not sent its body, and one declaring more than
        # DRAIN_MAX_BYTES will not be read whole: a refusal leaves their body unread.
        drained = (headers.get(b"expect", b"").lower() != b"100-continue"
                   and (size is None or size <= DRAIN_MAX_BYTES))
        coding = b", ".join(v.strip().lower() for k, v in scope["headers"]  # (every such
                            if k == b"content-encoding" and v.strip())  # header: dict kept one)
        encoded = {c.strip() for c in coding.split(b",")} - {b"", b"identity"}
        has_body = b"transfer-encoding" in headers or declared not in (None, b"0")
        if has_body and encoded:  # FastAPI read a gzip body as broken
            # UTF-8 (400) and a "br" one that was plain text as if it were (200)
            if drained:
                await drain(receive)
            await error_response(
                415, "unsupported_media_type",
                f"the body is encoded as {coding.decode('latin-1')!r} (Content-Encoding), which "
                "this service does not decode; send it unencoded",
                headers={"Accept-Encoding": "identity"})(scope, receive, send)
            return
        if declared is not None and size is None:
            await error_response(400, "bad_request", "invalid Content-Length header")(
                scope, receive, send
            )
            return
        if size is not None and size > self.max_bytes:
            if drained:
                await drain(receive)
            await self._too_large(scope, receive, send)
            return
        seen = 0
        started = over = ended = False
        begun = asyncio.get_running_loop().time()

        async def counting_receive() -> Message:
            nonlocal seen, over, ended
            loop = asyncio.get_running_loop()
            allowed = self.idle_s + seen / self.min_rate  # in all, from the request's start
            wait = min(self.idle_s, begun + allowed - loop.time())
            try:  # once the body is read, receive() waits for the client to leave: unbounded
                async with asyncio.timeout(None if ended else max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                if seen and wait < self.idle_s:  # the rate's bound, not the silence's
                    raise BodyStalledError(self.idle_s, min_rate=self.min_rate, received=seen,
                                           elapsed_s=loop.time() - begun) from None
                raise BodyStalledError(self.idle_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                # the last part may be the one that crosses the limit (the server can deliver
                # several chunks as one message): then there is nothing left to drain, and
                # waiting for more would hold the 413 back until the drain times out
                ended = not message.get("more_body", False)
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def drain_rest() -> None:
            if not ended:
                await drain(receive, max_bytes=DRAIN_MAX_BYTES - seen)

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                if over:  # the app answers the refused body (its 413): read the rest first
                    await drain_rest()
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await drain_rest()
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, "payload_too_large", too_large_message(self.max_bytes))(
            scope, receive, send)


class UnexpectedErrorMiddleware:
    """The 500 (in the service's error shape) for an exception the app raised before it
    answered, made inside the other middlewares: Starlette's own handler answers outside them
    all, so that 500 had none of the security headers, went uncounted, and uvicorn logged the
    traceback twice. HTTP exceptions pass (their handlers, or ``BodyLimitMiddleware``, answer
    them), and so does one raised after the response started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except HTTPException:
            raise
        except Exception as exc:
            if started:
                raise
            response = unexpected_error_response(scope.get("method", ""), scope.get("path", ""),
                                                 exc)
            await response(scope, receive, send)


V1_HEADERS = ((b"cache-control", b"no-store"), (b"vary", b"Authorization, X-API-Key"))
SECURITY_HEADERS = (  # on every response (protocol.py writes its one raw response with them)
    (b"content-security-policy", API_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeadersMiddleware:
    """Adds nosniff, no-referrer, and a deny-all CSP unless the response set its own; and to
    /v1 responses (documents' text, answers) ``Cache-Control: no-store`` and a ``Vary`` on the
    key headers, so that no browser or proxy cache keeps them or hands them to another key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = V1_HEADERS if scope.get("path", "").startswith("/v1/") else ()
                for name, value in (*SECURITY_HEADERS, *extra):
                    if name not in names:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, add_headers)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # what `citeqa serve` on loopback answers


_ABSOLUTE_FORM = re.compile(rb"(?i)https?://([^/?#]*)(.*)")


class AbsoluteFormMiddleware:
    """A request whose target is in absolute form (``GET http://host:8000/healthz``, which
    RFC 9112 sec. 3.2.2 says a server must accept) is served as its path, with its authority
    as the Host: uvicorn passed the whole URL on as the path (404)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode("latin-1")
            found = _ABSOLUTE_FORM.fullmatch(raw)
            if found is not None:
                path = found.group(2) or b"/"
                authority = found.group(1).rpartition(b"@")[2]  # (no user info)
                headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
                scope = {**scope, "raw_path": path,
                         "path": unquote(path.decode("latin-1")),
                         "headers": [(b"host", authority), *headers]}
        await self.app(scope, receive, send)


def host_name(host_header: str) -> str:
    """The name of a Host header, lower case, without port or trailing dot ("[::1]:80" ->
    "[::1]")."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


PROBE_PATHS = frozenset({"/healthz", "/readyz"})
# set in a probe's scope when its Host is none the service answers to (what /readyz then
# leaves out: a failed load's cause, with the index's path, to a page rebinding its name)
FOREIGN_HOST = "citeqa.foreign_host"


class HostCheckMiddleware:
    """400 for a request whose Host header names none of ``allowed``. Against DNS rebinding: a
    web page whose name an attacker re-points at 127.0.0.1 would otherwise reach a service on
    the reader's machine (its documents included) from the reader's own browser. The probes
    (``PROBE_PATHS``) answer whatever the Host: a container's health check asks 127.0.0.1, and
    they tell a page nothing but whether the service runs (``FOREIGN_HOST`` marks such a probe:
    /readyz leaves a failed load's cause out of its answer)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                if scope.get("path") in PROBE_PATHS:
                    scope[FOREIGN_HOST] = True
                else:
                    await error_response(
                        400, "bad_host", f"this service does not answer to the host "
                        f"{raw[:100]!r}; its operator can allow it with CITEQA_ALLOWED_HOSTS"
                    )(scope, receive, send)
                    return
        await self.app(scope, receive, send)
