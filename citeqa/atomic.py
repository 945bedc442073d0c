"""Writing a file so that a crash leaves the old file or the new one, never a cut one.

    with atomic_open(path) as f: ...     # text, written to a temporary sibling
    with atomic_path(path) as tmp: ...   # any writer that takes a path (safetensors, numpy)
    write_text_atomic(path, text)

The temporary file sits in the same directory (so the rename is atomic), is flushed to disk
before it replaces ``path``, and is removed when the block fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; it replaces ``path`` when the block ends."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shared and shipped
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: Path | str) -> Iterator[TextIO]:
    """A UTF-8 text file that replaces ``path`` when the block ends."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        yield f


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
