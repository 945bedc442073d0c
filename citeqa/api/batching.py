"""A dynamic batcher: one worker thread fed by a bounded queue.

The event loop submits work and awaits a future; it never blocks on the model. The worker takes
the first queued item, then keeps collecting items for up to ``window_ms`` (or until it has
``max_batch``) and runs them together with one call of ``run_batch``. Work whose future was
cancelled before the worker picked it up (a client that went away, a request that timed out)
is skipped, never run, and no longer counts as waiting: neither against ``max_queue`` nor in a
batch's ``max_batch`` places.

``run_batch`` returns one outcome per item, in order: a result, or an ``Exception`` instance for
an item that failed alone. If ``run_batch`` itself raises, every item of the batch fails with it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """The queue holds ``max_queue`` items already: the caller should retry later."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and accepts no new work."""


@dataclass(frozen=True)
class BatchStats:
    """What the worker reports after each batch (for metrics)."""

    size: int  # items actually run (cancelled ones excluded)
    skipped: int  # items skipped because their future was cancelled
    seconds: float  # wall time of the run_batch call


class Batcher(Generic[T, R]):
    """Runs ``run_batch`` on batches of submitted items in a single worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | Exception]],
        *,
        max_batch: int = 4,
        window_ms: float = 10.0,
        max_queue: int = 32,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "citeqa-batcher",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, window_ms >= 0; got "
                f"{max_batch=}, {max_queue=}, {window_ms=}"
            )
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        # unbounded: max_queue bounds the live items in it (_waiting), not the cancelled ones
        self._queue: queue.Queue[tuple[T, Future[R]]] = queue.Queue()
        self._waiting: set[Future[R]] = set()  # queued, neither cancelled nor picked up yet
        self._lock = threading.Lock()  # submit's check and put against close's flag
        self._closing = threading.Event()
        self._busy = threading.Event()  # set while a batch is running
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------

    def submit(self, item: T) -> Future[R]:
        """Queue one item; raises QueueFullError or BatcherClosedError instead of waiting."""
        fut: Future[R] = Future()
        with self._lock:  # once close() has set the flag, nothing more enters the queue
            if self._closing.is_set():
                raise BatcherClosedError("the service is shutting down; retry on another "
                                         "instance")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{self.max_queue} requests are already waiting; retry in a moment")
            self._waiting.add(fut)
            self._queue.put_nowait((item, fut))
        fut.add_done_callback(self._not_waiting)  # a cancelled item frees its place at once
        return fut

    def _not_waiting(self, fut: Future[R]) -> None:
        with self._lock:
            self._waiting.discard(fut)

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not counting the batch being run or cancelled items)."""
        with self._lock:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting work, let queued and running batches finish, stop the worker.

        Returns True when the worker stopped within ``timeout``; work still queued after that
        is cancelled so that nobody waits on it forever.
        """
        with self._lock:
            self._closing.set()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if not stopped:
            logger.warning("batcher worker still busy after %.1fs; cancelling queued work", timeout)
        while True:
            try:
                _, fut = self._queue.get_nowait()
            except queue.Empty:
                break
            fut.cancel()
        return stopped

    # -- the worker's side -------------------------------------------------------------------

    def _take(self, timeout: float | None) -> tuple[tuple[T, Future[R]] | None, int]:
        """The next live item (marked running: it can no longer be cancelled) and how many
        cancelled ones were passed over; no item when none came within ``timeout`` (0: none
        waits now)."""
        skipped = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item, fut = (self._queue.get(timeout=remaining) if remaining != 0
                             else self._queue.get_nowait())
            except queue.Empty:
                return None, skipped
            with self._lock:
                self._waiting.discard(fut)
            # set_running_or_notify_cancel: False when cancelled; afterwards cancel() fails.
            if fut.set_running_or_notify_cancel():
                return (item, fut), skipped
            skipped += 1

    def _collect(self) -> tuple[list[tuple[T, Future[R]]], int]:
        """Block for a first live item, then gather more until max_batch or the window closes;
        also how many cancelled items were passed over. No items: only cancelled ones were
        found, or (none found either) closing and drained."""
        while True:
            first, skipped = self._take(0.05)
            if first is not None:
                break
            if skipped or (self._closing.is_set() and self._queue.empty()):
                return [], skipped
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            more, passed = self._take(max(0.0, deadline - time.monotonic()))
            skipped += passed
            if more is None:
                break
            batch.append(more)
        return batch, skipped

    def _loop(self) -> None:
        while True:
            live, skipped = self._collect()
            if not live:
                if skipped:
                    self._report(BatchStats(0, skipped, 0.0))
                    continue
                return  # closing and the queue is drained
            self._busy.set()
            t0 = time.perf_counter()
            try:
                outcomes = list(self._run_batch([item for item, _ in live]))
                if len(outcomes) != len(live):
                    raise RuntimeError(
                        f"run_batch returned {len(outcomes)} outcomes for {len(live)} items"
                    )
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                outcomes = [exc] * len(live)
            except BaseException as exc:  # SystemExit from a library: the worker goes on (had
                # it ended, every later request would wait out its timeout as "ready")
                logger.exception("a batch stopped with %s", type(exc).__name__)
                outcomes = [RuntimeError(f"the batch stopped ({type(exc).__name__})")] * len(live)
            finally:
                self._busy.clear()
            seconds = time.perf_counter() - t0
            for (_, fut), outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
            self._report(BatchStats(len(live), skipped, seconds))

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:  # a metrics bug must not kill the worker
            logger.exception("on_batch callback failed")
