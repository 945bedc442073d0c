"""The dynamic batcher: batch formation, failures, backpressure, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.api.batching import Batcher, BatcherClosedError, BatchStats, QueueFullError


class GatedDoubler:
    """run_batch that doubles ints, records each batch, and can be held closed by a gate."""

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.started.set()
        assert self.gate.wait(5), "test gate never opened"
        return [ValueError(f"bad {x}") if x < 0 else 2 * x for x in items]


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_results_come_back_to_their_callers() -> None:
    fn = GatedDoubler()
    b = Batcher(fn, max_batch=4, window_ms=5)
    futs = [b.submit(i) for i in range(10)]
    assert [f.result(5) for f in futs] == [2 * i for i in range(10)]
    assert all(len(batch) <= 4 for batch in fn.batches)
    assert sorted(x for batch in fn.batches for x in batch) == list(range(10))
    assert b.close()


def test_items_queued_while_busy_form_one_batch() -> None:
    fn = GatedDoubler(gated=True)
    stats: list[BatchStats] = []
    b = Batcher(fn, max_batch=3, window_ms=0, max_queue=10, on_batch=stats.append)
    first = b.submit(0)
    assert fn.started.wait(5)
    rest = [b.submit(i) for i in range(1, 6)]  # queued while the worker is busy
    fn.gate.set()
    assert [f.result(5) for f in [first, *rest]] == [0, 2, 4, 6, 8, 10]
    assert fn.batches == [[0], [1, 2, 3], [4, 5]]
    b.close()
    assert [s.size for s in stats] == [1, 3, 2]


def test_window_collects_items_arriving_soon_after_the_first() -> None:
    fn = GatedDoubler()
    b = Batcher(fn, max_batch=2, window_ms=3000)  # full at 2: it runs as the second comes
    futs = [b.submit(1)]
    time.sleep(0.05)  # well inside the window
    futs.append(b.submit(2))
    assert [f.result(5) for f in futs] == [2, 4]
    assert fn.batches == [[1, 2]]
    b.close()


def test_one_failing_item_fails_alone() -> None:
    # a full batch (max_batch) runs at once: the long window only makes sure, on a loaded
    # machine, that both items are in it
    fn = GatedDoubler()
    b = Batcher(fn, max_batch=2, window_ms=5000)
    good, bad = b.submit(3), b.submit(-1)
    assert good.result(5) == 6
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)
    assert fn.batches == [[3, -1]]  # in one batch, and the other item still answered
    b.close()


def test_a_raising_batch_fails_every_item_and_the_worker_survives() -> None:
    calls = []

    def boom(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model crashed")
        return items

    b = Batcher(boom, max_batch=2, window_ms=5000)  # a full batch runs at once
    futs = [b.submit(1), b.submit(2)]
    for f in futs:
        with pytest.raises(RuntimeError, match="model crashed"):
            f.result(5)
    assert [f.result(5) for f in [b.submit(7), b.submit(8)]] == [7, 8]  # still working
    assert calls == [[1, 2], [7, 8]]
    b.close()


def test_a_batch_that_exits_fails_its_items_and_the_worker_survives() -> None:
    """A SystemExit (or other BaseException) ended the worker thread: every later request then
    waited out its timeout while the service said it was ready."""
    calls = []

    def exits(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise SystemExit(3)
        return items

    b = Batcher(exits, max_batch=4, window_ms=50)
    with pytest.raises(RuntimeError, match=r"the batch stopped \(SystemExit\)"):
        b.submit(1).result(5)
    assert b.submit(7).result(5) == 7  # still working
    b.close()


def test_wrong_number_of_outcomes_is_an_error() -> None:
    b = Batcher(lambda items: items[:-1], max_batch=2, window_ms=50)
    futs = [b.submit(1), b.submit(2)]
    for f in futs:
        with pytest.raises(RuntimeError, match="1 outcomes for 2 items"):
            f.result(5)
    b.close()


def test_queue_full_raises_instead_of_waiting() -> None:
    fn = GatedDoubler(gated=True)
    b = Batcher(fn, max_batch=1, window_ms=0, max_queue=2)
    running = b.submit(0)
    assert fn.started.wait(5)
    queued = [b.submit(1), b.submit(2)]
    assert b.depth == 2
    with pytest.raises(QueueFullError, match="retry"):
        b.submit(3)
    fn.gate.set()
    assert [f.result(5) for f in [running, *queued]] == [0, 2, 4]
    b.close()


def test_cancelled_work_is_skipped_not_run() -> None:
    fn = GatedDoubler(gated=True)
    stats: list[BatchStats] = []
    b = Batcher(fn, max_batch=4, window_ms=0, on_batch=stats.append)
    running = b.submit(0)
    assert fn.started.wait(5)
    keep, drop = b.submit(1), b.submit(2)
    assert drop.cancel()
    assert not running.cancel()  # already running: cannot be cancelled
    fn.gate.set()
    assert running.result(5) == 0 and keep.result(5) == 2
    with pytest.raises(CancelledError):
        drop.result(0)
    b.close()
    assert 2 not in [x for batch in fn.batches for x in batch]
    assert sum(s.skipped for s in stats) == 1


def test_cancelled_work_alone_in_the_queue_is_counted_too() -> None:
    """Requests cancelled behind a running batch, with none live beside them, made no batch:
    their skips went unreported (citeqa_cancelled_total undercounted)."""
    fn = GatedDoubler(gated=True)
    stats: list[BatchStats] = []
    b = Batcher(fn, max_batch=4, window_ms=0, on_batch=stats.append)
    running = b.submit(0)
    assert fn.started.wait(5)
    assert all(f.cancel() for f in (b.submit(1), b.submit(2)))
    fn.gate.set()
    assert running.result(5) == 0
    b.close()
    assert sum(s.skipped for s in stats) == 2


def test_cancelled_work_frees_its_place_in_the_queue_and_in_the_next_batch() -> None:
    """Cancelled requests (clients gone, timed out) counted as waiting until the worker
    reached them: behind a long batch, live requests were refused 503 "already waiting" and
    the dead ones took places in the next batch."""
    fn = GatedDoubler(gated=True)
    b = Batcher(fn, max_batch=2, window_ms=0, max_queue=2)
    running = b.submit(0)
    assert fn.started.wait(5)
    dropped = [b.submit(1), b.submit(2)]
    assert all(f.cancel() for f in dropped) and b.depth == 0
    kept = [b.submit(3), b.submit(4)]
    assert b.depth == 2
    with pytest.raises(QueueFullError):
        b.submit(5)
    fn.gate.set()
    assert [f.result(5) for f in [running, *kept]] == [0, 6, 8]
    b.close()
    assert fn.batches == [[0], [3, 4]]


def test_work_submitted_while_the_batcher_closes_is_run_or_refused_never_left_waiting(
        monkeypatch) -> None:
    """submit checked the flag, then queued: a close() in between (its worker gone, its queue
    drained) left the item with nobody to run or cancel it, and its caller waited out its
    timeout."""
    fn = GatedDoubler()
    b = Batcher(fn, max_batch=1, window_ms=0)
    put = b._queue.put_nowait
    closer = threading.Thread(target=b.close)

    def close_meanwhile(entry):  # type: ignore[no-untyped-def]
        closer.start()
        closer.join(0.3)  # close() runs as far as it can before the item is queued
        put(entry)

    monkeypatch.setattr(b._queue, "put_nowait", close_meanwhile)
    fut = b.submit(7)
    closer.join(5)
    assert fut.result(5) == 14
    with pytest.raises(BatcherClosedError):
        b.submit(8)


def test_cancelling_the_asyncio_wrapper_cancels_queued_work() -> None:
    """What the app relies on: a timed-out await cancels the queued concurrent future."""
    fn = GatedDoubler(gated=True)
    b = Batcher(fn, max_batch=4, window_ms=0)
    running = b.submit(0)
    assert fn.started.wait(5)
    queued: Future[int] = b.submit(5)

    async def wait_briefly() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(queued), timeout=0.05)

    asyncio.run(wait_briefly())
    assert queued.cancelled()
    fn.gate.set()
    assert running.result(5) == 0
    b.close()
    assert fn.batches == [[0]]


def test_close_drains_queued_work_then_refuses_new_work() -> None:
    fn = GatedDoubler(gated=True)
    b = Batcher(fn, max_batch=1, window_ms=0)
    futs = [b.submit(i) for i in range(3)]
    assert fn.started.wait(5)
    closer = threading.Thread(target=b.close)
    closer.start()
    wait_until(lambda: b._closing.is_set())
    with pytest.raises(BatcherClosedError):
        b.submit(9)
    fn.gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert [f.result(0) for f in futs] == [0, 2, 4]
    assert not b._thread.is_alive()


def test_close_timeout_cancels_what_is_still_queued() -> None:
    fn = GatedDoubler(gated=True)
    b = Batcher(fn, max_batch=1, window_ms=0)
    running = b.submit(1)
    assert fn.started.wait(5)
    queued = b.submit(2)
    assert b.close(timeout=0.05) is False
    assert queued.cancelled()
    fn.gate.set()
    assert running.result(5) == 2


def test_a_broken_metrics_callback_does_not_kill_the_worker() -> None:
    def bad_callback(stats: BatchStats) -> None:
        raise ZeroDivisionError

    b = Batcher(GatedDoubler(), window_ms=0, on_batch=bad_callback)
    assert b.submit(1).result(5) == 2
    assert b.submit(2).result(5) == 4
    b.close()


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_queue": 0}, {"window_ms": -1.0}]
)
def test_bad_parameters_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Batcher(lambda items: items, **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    items=st.lists(st.integers(min_value=-3, max_value=50), max_size=30),
    max_batch=st.integers(min_value=1, max_value=6),
)
def test_batching_is_invisible_to_callers(items: list[int], max_batch: int) -> None:
    """Reference: calling the per-item function directly, one item at a time."""
    fn = GatedDoubler()
    b = Batcher(fn, max_batch=max_batch, window_ms=1, max_queue=64)
    futs = [b.submit(x) for x in items]
    for x, f in zip(items, futs, strict=True):
        if x < 0:
            assert isinstance(f.exception(5), ValueError)
        else:
            assert f.result(5) == 2 * x
    assert b.close()
    assert all(1 <= len(batch) <= max_batch for batch in fn.batches)
    assert [x for batch in fn.batches for x in batch] == items  # FIFO order kept
