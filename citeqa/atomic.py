"""Writing a file so that a crash leaves the old file or the new one, never a cut one.

    with atomic_open(path) as f: ...     # text, written to a temporary sibling
    with atomic_path(path) as tmp: ...   # any writer that takes a path (safetensors, numpy)
    write_text_atomic(path, text)

The temporary file sits in the same directory as the file it replaces (so the rename is
atomic), is flushed to disk before it does, and is removed when the block fails. The file keeps
its mode (a new one gets the umask's, as any write would); a symbolic link is written through.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; it replaces ``path`` when the block ends."""
    given = path
    path = Path(os.path.realpath(path))  # through a symbolic link, to the file it names
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {given}: no directory {path.parent}")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    # A new file gets the umask's mode, as a plain write would; a replacement stays private
    # until it takes the old file's mode, so its content is never more readable than that.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 if mode is None else 0o600))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
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
