"""Append-only JSON-lines files that a run resumes from after a crash: the eval's
predictions.jsonl, the red team's results.jsonl.

    records = resume(path, what="prediction record", remedy="pass --force to start over")
    with path.open("a", encoding="utf-8") as f:
        append_record(f, row)   # durable before the next question is asked

A run directory's ``run.json`` holds the run's identity (what it asked, with what); resuming
into it with another identity is refused (``check_identity``) rather than mixing two runs.

One process writes a run directory at a time (``run_lock``): two appending to one journal
would each ask every question and count it twice.

A last line cut short by a crash (no newline, or not a JSON record) is dropped and its work
redone; a bad line before the last is not a crash's doing, so it stops the run (ConfigError
naming ``remedy``) rather than silently dropping what follows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, TextIO

from citeqa.atomic import flocked
from citeqa.errors import BusyError, ConfigError

log = logging.getLogger(__name__)


def read_records(path: Path, *, what: str, remedy: str, key: str = "id",
                 ) -> tuple[list[dict[str, Any]], int]:
    """The complete records of ``path`` (JSON objects holding ``key``) and the byte length they
    span; a file that does not exist holds none."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    return records_in(path.read_bytes(), path, what=what, remedy=remedy, key=key)


def records_in(data: bytes, path: Path, *, what: str, remedy: str, key: str = "id",
               ) -> tuple[list[dict[str, Any]], int]:
    """``read_records`` of ``data``, the bytes of ``path`` (which messages name)."""
    *lines, tail = data.split(b"\n")  # tail: bytes after the last newline
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)  # blanks skipped
    records: list[dict[str, Any]] = []
    good = 0
    for i, raw in enumerate(lines):
        if raw.strip():
            try:
                row = json.loads(raw)
            except ValueError:
                row = None
            if not isinstance(row, dict) or key not in row:
                if i == last and not tail.strip():
                    log.warning("%s: dropping a damaged last line; its work is redone", path)
                    return records, good
                raise ConfigError(f"{path}:{i + 1} is not a {what} and is not the last line; "
                                  f"{remedy}")
            records.append(row)
        good += len(raw) + 1
    if tail.strip():
        log.warning("%s: dropping a truncated last line; its work is redone", path)
    return records, good


def resume(path: Path, *, what: str, remedy: str, key: str = "id") -> list[dict[str, Any]]:
    """``read_records``, then cut the file to the records it returns, so that appending
    continues after the last complete one."""
    records, good = read_records(path, what=what, remedy=remedy, key=key)
    if Path(path).is_file() and good < Path(path).stat().st_size:
        with Path(path).open("r+b") as f:
            f.truncate(good)
    return records


def check_identity(run_json: Path, records: Path, ident: dict[str, Any], *, remedy: str,
                   outputs: Collection[str] = ()) -> None:
    """Raise ConfigError when ``run_json`` records another ``identity`` than ``ident`` (the keys
    of ``ident`` are compared: one the stored identity lacks counts as None there), when
    ``records`` exists without it (nothing says what made them), or when the run's folder holds
    a file of the run's ``outputs`` but no ``run_json`` (a folder of the user's: the run would
    write over its report.md; a log or anything else beside a run is left alone). A run that
    recorded no complete record yet has nothing to mix: it may start again with another
    identity."""
    out = run_json.parent
    if not run_json.is_file():
        if has_records(records):
            raise ConfigError(f"{out} has {records.name} but no {run_json.name}, so it cannot "
                              f"be resumed safely; {remedy}")
        if mine := sorted(name for name in outputs if (out / name).exists()):
            raise ConfigError(f"{out} holds {', '.join(mine)} but no {run_json.name}: this run "
                              "would write over them; choose another folder (or move them)")
        return
    if not has_records(records):
        return
    try:
        stored = json.loads(run_json.read_text(encoding="utf-8"))["identity"]
        if not isinstance(stored, dict):
            raise TypeError("its identity is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{run_json} is unreadable ({e}); {remedy}") from e
    diff = {k: (stored.get(k), v) for k, v in ident.items() if stored.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{out} holds a run made with other settings or data ({what}); "
                          f"{remedy}")


def has_records(records: Path) -> bool:
    """Whether ``records`` holds a complete (newline-ended) line."""
    if not records.is_file():
        return False
    with records.open("rb") as f:
        return any(line.endswith(b"\n") and line.strip() for line in f)


def append_record(f: TextIO, row: dict[str, Any]) -> None:
    """Append one JSON line and make it durable before moving on."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


@contextlib.contextmanager
def run_lock(out: Path, command: str, *, instead: str = "choose another --out") -> Iterator[None]:
    """Hold ``out`` (a run directory, created when missing) for this process; ConfigError at once
    when another process holds it (saying to wait, or ``instead``). An exclusive ``flock`` on the
    folder: released when the process ends, however it ends, so a crash never leaves a stale
    lock. A folder made here and still empty when the run fails is removed again."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(out, os.O_RDONLY, out, command, instead):
            yield
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: nothing the run wrote is lost
        raise


@contextlib.contextmanager
def file_lock(out: Path, command: str) -> Iterator[None]:
    """``run_lock`` for an output file that is replaced whole while it is written (so it cannot
    be its own lock): the lock is ``.<name>.lock`` beside it, left in place (removing it would
    let a second writer lock a new file while the first still holds the old one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, out, command,
                    "choose another --out"):
        yield


@contextlib.contextmanager
def _exclusive(path: Path, flags: int, out: Path, command: str, instead: str) -> Iterator[None]:
    def busy() -> BusyError:
        return BusyError(f"another {command} is writing to {out} right now; wait for it to "
                         f"finish, or {instead}")

    with flocked(path, flags=flags, busy=busy):
        yield
