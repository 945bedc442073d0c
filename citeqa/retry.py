"""When to try an HTTP call again and how long to wait: one policy for every client citeqa has
(``CiteqaClient`` against the service, the remote generator against its engine); and
``request_by``, one try that ends by a deadline (``read_whole`` its reading).

A call is retried on a connection that could not be made, and on 429 and 503 answers, which
say "not now" and may carry ``Retry-After`` (seconds or an HTTP date, RFC 9110 sec. 10.2.3).
The wait is that header when given, else exponential backoff with full jitter, never past the
caller's deadline. A server asking for a longer wait than ``max_s`` is not asked again sooner
than it said: the call gives up (as the page does).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date); None when
    absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²", which float() won't
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # "-0000" (RFC 5322: zone not known) or none: HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


@dataclass(frozen=True)
class Backoff:
    retries: int = 3  # tries after the first; 0 = never retry
    base_s: float = 0.5  # the first backoff's upper bound; doubles each try
    max_s: float = 30.0  # no single wait is longer than this

    def delay(self, attempt: int, retry_after: str | None = None,
              rng: random.Random | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0): what
        ``retry_after`` says when readable (which may exceed ``max_s``), else backoff."""
        told = parse_retry_after(retry_after)
        if told is not None:
            return told
        bound = min(self.base_s * 2**attempt, self.max_s)
        return (rng or random).uniform(0.0, bound)

    def wait(self, attempt: int, retry_after: str | None, deadline: float | None) -> bool:
        """Sleep before the next try and return True, or return False when no try is left, the
        server asks for a wait longer than ``max_s``, or the wait would end past ``deadline``
        (a ``time.monotonic()`` value)."""
        if attempt >= self.retries:
            return False
        pause = self.delay(attempt, retry_after)
        if pause > self.max_s:
            return False
        if deadline is not None and time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
        return True


def request_by(client: httpx.Client, method: str, url: str, deadline: float,
               **kwargs: Any) -> httpx.Response:
    """One request, its answer read whole by ``deadline`` (a ``time.monotonic()`` value),
    checked as it arrives: httpx's timeout bounds each read, so a server sending a byte at a
    time held a call for ever; one read may still take up to the time that was left (a client
    timeout of 0.3 s took 1 s: a floor meant for calls retried near their deadline).
    ``httpx.ReadTimeout`` when the answer is still coming at the deadline."""
    timeout = max(deadline - time.monotonic(), 0.01)
    with client.stream(method, url, timeout=timeout, **kwargs) as streamed:
        return read_whole(streamed, deadline)


def read_whole(streamed: httpx.Response, deadline: float) -> httpx.Response:
    """A streamed response read whole by ``deadline``, as one that is not streamed
    (``httpx.ReadTimeout`` when it is still coming at the deadline)."""
    if streamed.is_stream_consumed:  # built in memory (a test's MockTransport): read
        return streamed
    chunks = []
    for chunk in streamed.iter_raw():  # as sent: the Response below decodes it once
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the answer was still coming at the deadline")
    return httpx.Response(streamed.status_code, headers=streamed.headers,
                          content=b"".join(chunks), request=streamed.request)
