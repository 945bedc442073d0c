"""The retry policy: Retry-After in both forms, exponential backoff with jitter, the deadline."""

from __future__ import annotations

import random
import socket
import time
from email.utils import formatdate

import httpx
import pytest

from citeqa.retry import Backoff, parse_retry_after, request_by


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0  # already past
    for bad in (None, "", "soon", "-3", "1.5e9", "\u00b2", "1\u0663"):  # not ASCII digits
        assert parse_retry_after(bad) is None


def test_an_http_date_without_a_known_zone_is_read_as_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    """"-0000" (zone not known, RFC 5322) or no zone at all: not the server's local time."""
    monkeypatch.setenv("TZ", "XST+5")  # local time five hours behind GMT (POSIX form: no tzdata)
    time.tzset()
    try:
        now = time.time()
        for zone in ("-0000", ""):
            told = formatdate(now + 30, usegmt=True).replace("GMT", zone).strip()
            assert parse_retry_after(told, now=now) == pytest.approx(30, abs=1), told
    finally:
        monkeypatch.undo()
        time.tzset()


def test_backoff_doubles_its_bound_and_caps_every_wait() -> None:
    b = Backoff(retries=5, base_s=1.0, max_s=5.0)
    rng = random.Random(0)
    for attempt, bound in enumerate([1, 2, 4, 5, 5]):
        waits = [b.delay(attempt, None, rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= bound and max(waits) > 0.8 * bound
    assert b.delay(0, "60") == 60.0  # what the server said (wait() gives up on it)
    assert b.delay(3, "2") == 2.0


def test_wait_gives_up_when_tries_or_time_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("citeqa.retry.time.sleep", slept.append)
    b = Backoff(retries=2)
    assert b.wait(0, "1", None) and b.wait(1, "1", None) and not b.wait(2, "1", None)
    assert slept == [1.0, 1.0]
    assert not b.wait(0, "10", time.monotonic() + 5)  # would end past the deadline
    # a server asking for longer than max_s: not asked again sooner than it said (the wait
    # was cut to max_s and the retry came early)
    assert not Backoff(retries=2, max_s=5.0).wait(0, "6", None)
    assert slept == [1.0, 1.0]


def test_an_http_date_is_read_against_the_given_now() -> None:
    """``now`` was ignored: a date 30 s after it, long past by the clock, read as no wait."""
    assert parse_retry_after(formatdate(1_000_030, usegmt=True), now=1_000_000) == 30.0


def test_backoff_waits_a_random_share_of_its_bound() -> None:
    """Full jitter: clients turned away together do not all come back at the bound together."""
    b = Backoff(retries=5, base_s=1.0, max_s=5.0)
    rng = random.Random(0)
    for attempt, bound in enumerate([1, 2, 4, 5]):
        waits = [b.delay(attempt, None, rng) for _ in range(200)]
        assert min(waits) < 0.1 * bound and max(waits) < bound


def test_a_retry_after_of_max_s_itself_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("citeqa.retry.time.sleep", slept.append)
    assert Backoff(retries=2, max_s=5.0).wait(0, "5", None)
    assert slept == [5.0]


def test_the_default_backoff_waits_up_to_30_s_as_the_readme_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README: up to 3 more tries, random waits up to 0.5 s, then 1 s, 2 s (at most 30 s); a
    server asking for more than the backoff's max_s, 30 s, is not asked again."""
    slept: list[float] = []
    monkeypatch.setattr("citeqa.retry.time.sleep", slept.append)
    assert Backoff().wait(0, "30", None) and not Backoff().wait(0, "31", None)
    assert slept == [30.0]
    assert [Backoff().wait(attempt, None, None) for attempt in range(4)] == [True] * 3 + [False]
    waits = slept[1:]
    assert len(waits) == 3 and all(w <= bound for w, bound in zip(waits, (0.5, 1, 2), strict=True))
    rng = random.Random(0)
    assert max(Backoff().delay(0, None, rng) for _ in range(200)) > 0.4  # (up to 0.5 s)


def test_a_call_past_its_deadline_fails_as_a_transport_error_not_a_value_error() -> None:
    """A retry that reached its deadline still tries once, bounded by a floor (a negative
    timeout raised ValueError, which callers handling httpx's errors let through)."""
    with socket.socket() as server, httpx.Client(trust_env=False) as client:
        server.bind(("127.0.0.1", 0))
        server.listen()  # connects, never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/"
        with pytest.raises(httpx.TransportError):
            request_by(client, "GET", url, time.monotonic() - 1)
