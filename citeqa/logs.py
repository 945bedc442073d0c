"""How citeqa's commands log: INFO lines (DEBUG with ``--verbose``) on stderr, and libraries
that narrate their own start quiet unless asked.

FAISS logs at import which of its builds it loads; on a CPU its wheel has no AVX2 build for,
that is four INFO lines, a ``ModuleNotFoundError`` among them, on every command that touches
an index. They say nothing a user can act on, so they show only with ``--verbose``.
"""

from __future__ import annotations

import logging
import sys

QUIET_UNLESS_VERBOSE = ("faiss.loader",)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr as ``LEVEL name: message``; see the module docstring."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in QUIET_UNLESS_VERBOSE:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
