"""How citeqa's commands log: INFO lines (DEBUG with ``--verbose``) on stderr, and libraries
that narrate their own start quiet unless asked.

FAISS logs at import which of its builds it loads; on a CPU its wheel has no AVX2 build for,
that is four INFO lines, a ``ModuleNotFoundError`` among them, on every command that touches
an index. transformers draws a "Loading weights" progress bar for every model it reads, four
per ``citeqa ask`` (generator, embedder, verifier, answerability reader), each done in well
under a second. Neither says anything a user can act on, so both show only with ``--verbose``:
model loads from local files run inside ``quiet_weight_loading()``. Long work keeps its bars
(the one-time GGUF conversion, index builds, training).

No log line holds a URL's password: httpx logs every request's URL at INFO, and a
``CITEQA_GENERATOR_URL`` may carry ``user:password@`` (every question's engine calls logged it).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from citeqa.text import without_userinfo

QUIET_UNLESS_VERBOSE = ("faiss.loader",)

_verbose = False
_quiet_depth = 0  # quiet_weight_loading blocks now open, in any thread
_quiet_lock = threading.Lock()
_bars_were_on = True


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr as ``LEVEL name: message``; see the module docstring."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in QUIET_UNLESS_VERBOSE:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, NoPasswords) for f in handler.filters):
            handler.addFilter(NoPasswords())


class NoPasswords(logging.Filter):
    """A record's message with each URL's ``user:password@`` part left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as e:  # noqa: BLE001 - args that do not fit: said in its place,
            # without a URL's password (logging's own report printed message and args as
            # they were: in a list, a mapping's keys, an exception's repr)
            try:
                shown = (f"a log record that cannot be formatted ({type(e).__name__}: {e}): "
                         f"message {record.msg!r}, args {record.args!r}")
            except Exception:  # noqa: BLE001 - a repr that fails
                shown = f"a log record that cannot be formatted ({type(e).__name__})"
            record.msg, record.args = without_userinfo(shown), ()
            return True
        if "@" in message and (shown := without_userinfo(message)) != message:
            record.msg, record.args = shown, ()
        return True


def verbose() -> bool:
    """Whether the command runs with ``--verbose``."""
    return _verbose


@contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """transformers' progress bars off inside the block (unless ``--verbose``), restored after
    the last open block ends. Blocks may nest and overlap across threads."""
    global _quiet_depth, _bars_were_on
    if _verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        if _quiet_depth == 0:
            _bars_were_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _bars_were_on:
                hf_logging.enable_progress_bar()


LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _NoLoadReport(logging.Filter):
    """Holds back transformers' weight-load report logged by one thread."""

    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or "LOAD REPORT" not in str(record.msg):
            return True
        self.held.append(record)
        return False


@contextmanager
def without_load_report() -> Iterator[None]:
    """transformers' table of missing, unexpected and mismatched weights not logged by this
    thread inside the block (unless ``--verbose``): for a caller that checks them itself and
    says what is wrong in its own error (the table printed first, then the error). Where the
    block raises, the table is logged after all: transformers' own errors (weights it could
    not convert) say only "see the report above"."""
    if _verbose:
        yield
        return
    logger = logging.getLogger(LOAD_REPORT_LOGGER)
    held = _NoLoadReport(threading.get_ident())
    logger.addFilter(held)
    try:
        yield
    except BaseException:
        logger.removeFilter(held)
        for record in held.held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(held)


class Heartbeat:
    """For long work with no progress bar (stderr is no terminal: a log file, a container), a
    line at INFO at most every ``every_s`` seconds: "embedding: 640 of 6602 passages (21/s)"
    (a build of a book was silent for 4.5 minutes). Off (``on=False``) where a bar shows."""

    def __init__(self, logger: logging.Logger, what: str, total: int, unit: str, *,
                 on: bool = True, every_s: float = 30.0) -> None:
        self.logger, self.what, self.total, self.unit = logger, what, total, unit
        self.on, self.every_s = on, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.on and now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self.logger.info("%s: %d of %d %s (%.0f/s)", self.what, self.done, self.total,
                             self.unit, self.done / max(now - self.start, 1e-9))
