"""Writing a file (or a directory) so that a crash leaves the old one or the new one, never a
cut one.

    with atomic_open(path) as f: ...     # text, written to a temporary sibling
    with atomic_path(path) as tmp: ...   # any writer that takes a path (safetensors, numpy)
    write_text_atomic(path, text)
    tmp = fresh_tmp_dir(out); ...; replace_dir(tmp, out)   # a directory (a model's weights)
    files_stamp(out)                     # what a directory's files are now (to see a rewrite)

The temporary file sits in the same directory as the file it replaces (so the rename is
atomic), is flushed to disk before it does, and is removed when the block fails. The file keeps
its mode (a new one gets the umask's, as any write would); a symbolic link is written through.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)


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
    if mode is None:  # (a writer that puts its own file there, as safetensors' does, 0600,
        mode = stat.S_IMODE(tmp.stat().st_mode)  # does not narrow it: adapters were unreadable)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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


@contextmanager
def flocked(path: Path, *, flags: int = os.O_RDONLY,
            busy: Callable[[], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a folder, or a lock file opened with ``flags``)
    for the block: released when the process ends, however it ends, so a crash never leaves a
    stale lock. While another process holds it: wait, or raise ``busy()`` when given. Where
    the file system has no flock (some NFS setups), or off POSIX, the block runs unguarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, flags, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if busy is None else fcntl.LOCK_NB))
        except BlockingIOError:
            if busy is None:
                raise
            raise busy() from None
        except OSError as e:
            log.warning("cannot lock %s (%s); not guarded against a second writer", path, e)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- directories ------------------------------------------------------------------------------
# A directory is written whole into ``.<name>.tmp-<pid>-<token>`` beside it, then swapped in:
# ``out`` renamed to ``.<name>.old-<pid>`` (an index's: ``-<token>`` too), the temporary
# directory to ``out``, the backup removed. The pid in the names says whether their writer
# still runs, so what a killed writer left (hundreds of MB of weights, or the only copy of
# ``out`` between the two renames) is removed or restored by the next writer or reader. A
# temporary directory is also held under a ``flock`` by its writer while it writes
# (``claim_tmp_dir``): no lock held means no writer, whatever its pid says (after a container's
# restart a pid names another process, or the reader itself). The index (retrieval/store.py)
# adds a lock and its own recovery.

_claims: dict[str, int] = {}  # temporary directory -> the descriptor holding its flock


def claim_tmp_dir(tmp: Path) -> None:
    """Hold an exclusive ``flock`` on the (new) temporary directory ``tmp`` while this process
    writes it, until ``release_tmp_dir``. Where the file system has no flock, nothing is held."""
    release_tmp_dir(tmp)  # a claim of an earlier attempt at this path
    try:
        import fcntl

        fd = os.open(tmp, os.O_RDONLY)
    except (ImportError, OSError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _claims[str(tmp)] = fd


def release_tmp_dir(tmp: Path) -> None:
    """Let go of ``claim_tmp_dir``'s lock on ``tmp`` (renamed or removed since, or not)."""
    fd = _claims.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def discard_tmp_dir(tmp: Path) -> None:
    """Remove a temporary directory that was not swapped in (a failed write), and its claim."""
    release_tmp_dir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _claimed(sibling: Path) -> bool | None:
    """Whether a live writer holds ``sibling``'s ``flock`` (True), none does (False), or this
    cannot be told (None: no flock here, an unreadable directory)."""
    try:
        import fcntl

        fd = os.open(sibling, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


# Room left on a file system that a write without an errno failed on, under which it failed for
# want of room: numpy's "N requested and M written" and FAISS's write error carry no ENOSPC.
FULL_BELOW_BYTES = 1 << 20


def disk_full(e: OSError) -> bool:
    """Whether ``e`` says the file system is out of room (full, or over a quota)."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def full_disk_named(where: Path) -> Iterator[None]:
    """Writes to ``where``'s file system: an OSError without an errno raised while that file
    system has almost no room left (``FULL_BELOW_BYTES``) becomes ENOSPC, so that callers tell
    a full disk (REST: 507) from a read-only or broken one. Use it inside the block that cleans
    up after a failed write: once the partial files are gone, the room is back."""
    try:
        yield
    except OSError as e:
        if e.errno is not None:
            raise
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            raise e from None
        if free >= FULL_BELOW_BYTES:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e


def file_above(path: Path) -> Path | None:
    """The nearest of ``path``'s parents that exists and is not a folder (so ``path`` cannot be
    made), or None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def fsync_path(path: Path) -> None:
    """Flush a directory's entries (or a file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A writer's part of its siblings' names: its pid, then a token of its own. Two containers
# sharing a volume (replicas) both write as pid 1: each took the other's temporary directory,
# being written right then, for debris of its own and deleted it (201s lost, once the index).
WRITER_TOKEN_CHARS = 8
_WRITER_TOKEN = secrets.token_hex(WRITER_TOKEN_CHARS // 2)
# (older names: the pid alone)
_SIBLING_RE = re.compile(rf"\.(tmp|old)-(\d+)(?:-([0-9a-f]{{{WRITER_TOKEN_CHARS}}}))?$")


def writer_name() -> str:
    """``PID-TOKEN``: this process's part of the sibling directories it writes."""
    return f"{os.getpid()}-{_WRITER_TOKEN}"


def tmp_dir_for(out: Path) -> Path:
    """This process's temporary sibling of ``out`` (not created)."""
    return out.parent / f".{out.name}.tmp-{writer_name()}"


def siblings(out: Path, kind: str) -> list[Path]:
    """``out``'s ``.tmp-<pid>-<token>`` (``kind`` "tmp") or ``.old-<pid>[-<token>]`` ("old")
    siblings."""
    return sorted(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def writer_alive(sibling: Path, *, writing: bool) -> bool:
    """Whether the process that made a ``.tmp-<pid>``/``.old-<pid>`` sibling still runs (then it
    may be between its renames right now, and its siblings must be left alone). A writer about to
    write (``writing``) calls its own siblings dead: they are left from a failed earlier attempt,
    as one process never writes one directory twice at once. A temporary directory is alive while
    its writer's ``flock`` is held (``claim_tmp_dir``), and dead once none is and it is older
    than ``CLAIM_GRACE_S`` (its writer takes the lock just after making it), whatever process its
    pid now names; where the lock cannot be told, it is alive while a process of that pid runs."""
    m = _SIBLING_RE.search(sibling.name)
    if m is None:
        return False
    kind, pid, token = m.group(1), int(m.group(2)), m.group(3)
    # this process's own: its pid, and its token (another process of that pid number, in
    # another pid namespace, has another); a backup of the pid alone (``replace_dir``'s). A
    # temporary directory of the pid alone is an older citeqa's, never this process's: whether
    # its writer runs is its lock's to say (an older replica's, writing now, was deleted)
    own = pid == os.getpid() and (token == _WRITER_TOKEN or (token is None and kind == "old"))
    if own and writing:
        return False
    if kind == "tmp":
        held = _claimed(sibling)
        if held:
            return True
        if held is False and not _just_made(sibling):
            return False
    return own or _pid_alive(pid)


CLAIM_GRACE_S = 10.0  # a new temporary directory's writer has surely locked it by then


def _just_made(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < CLAIM_GRACE_S
    except OSError:
        return False


def _rmtree(path: Path, errors: list[BaseException]) -> None:
    """``shutil.rmtree(path)``, going on past what it cannot remove, with the errors in
    ``errors`` (``onexc`` from Python 3.12: ``onerror`` is deprecated there)."""
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, exc: errors.append(exc))
    else:
        shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(info[1]))


def remove_stale_siblings(out: Path, *, writing: bool, backups_free: bool = False) -> None:
    """Delete the temporary and backup directories of writers that died. ``backups_free``: the
    caller holds the lock every swap holds across its renames, and ``out`` is whole, so no
    ``.old`` backup is needed by anyone, whatever process its pid names now (a restarted
    container's pid 1 is the dead writer's pid too)."""
    backups = siblings(out, "old")
    for stale in [*siblings(out, "tmp"), *backups]:
        if not (backups_free and stale in backups) and writer_alive(stale, writing=writing):
            continue  # another writer is using it right now
        errors: list[BaseException] = []
        _rmtree(stale, errors)
        if not stale.exists():
            log.info("removed stale %s", stale)
        elif not (errors and getattr(errors[0], "errno", None) == errno.EROFS):
            # (on a read-only file system nothing is to be done: not said at every command)
            log.warning("could not remove %s, a copy an interrupted writer left (%s); remove "
                        "it by hand", stale, errors[0] if errors else "it stays")


@contextmanager
def flocked_if_free(path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` taken only if free now: True while held; False when
    another process holds it or the file system cannot lock (nothing is then guarded)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process (BlockingIOError), or no flock here
            yield False
            return
        yield True
    finally:
        os.close(fd)


def fresh_tmp_dir(out: Path, mode: int = 0o755) -> Path:
    """Restore ``out`` if a killed writer left it mid-swap, clear dead writers' debris, and
    return a new, empty temporary directory beside ``out`` to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    remove_stale_siblings(out, writing=True)
    return new_tmp_dir(out, mode)


def new_tmp_dir(out: Path, mode: int | None = None) -> Path:
    """This process's temporary sibling of ``out``, made new and empty (with ``mode``: exactly
    that mode; else the umask's), and claimed (``claim_tmp_dir``) for its writer."""
    tmp = tmp_dir_for(out)
    discard_tmp_dir(tmp)
    if mode is None:
        tmp.mkdir()
    else:
        tmp.mkdir(mode=mode)
        os.chmod(tmp, mode)  # mkdir's mode passes through the umask
    claim_tmp_dir(tmp)
    return tmp


def owner_and_mode(folder: Path) -> tuple[int, int, int] | None:
    """(uid, gid, mode) of the folder at ``folder``; None where there is none."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) if stat.S_ISDIR(st.st_mode) else None


def give_owner_and_mode(tmp: Path, owner_mode: tuple[int, int, int]) -> None:
    """Give the folder ``tmp`` and everything in it the owner and mode of the folder it
    replaces (``owner_and_mode``): its folders that mode, its files that mode without execute
    bits; its owner as far as this process may (root: both; another user: the group, where it
    is one of that group's). Where the group cannot be given, the mode is widened, never
    narrowed below what the umask gave (a group's members would lose what they could read).
    A change made under another umask, or by root, to a service's folder otherwise left files
    that service could not read or replace."""
    uid, gid, mode = owner_mode
    root = getattr(os, "geteuid", lambda: -1)() == 0
    for path in [tmp, *tmp.rglob("*")]:
        wanted = mode if path.is_dir() else mode & 0o666
        try:
            os.chown(path, uid if root else -1, gid)
            owned = True
        except (OSError, AttributeError):  # (AttributeError: no chown off POSIX)
            owned = False
        os.chmod(path, wanted if owned else wanted | stat.S_IMODE(path.stat().st_mode))


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap the complete directory ``tmp`` in at ``out`` (see above); ``recover_dir`` undoes a
    crash between the two renames."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    release_tmp_dir(tmp)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(out: Path) -> Path:
    """When ``out`` is missing because its writer died between the two renames of
    ``replace_dir``, rename the backup it left back to ``out``. Returns ``out``."""
    out = Path(out)
    if out.exists():
        return out
    # (its own pid's backup too: one process never writes one directory twice at once, so a
    # backup of this pid with ``out`` missing was left by a dead writer: a restarted container's
    # pid 1 is that writer's pid)
    dead = [p for p in siblings(out, "old") if not writer_alive(p, writing=True)]
    if dead:
        backup = max(dead, key=lambda p: p.stat().st_mtime)
        log.warning("restoring %s from %s (a write was interrupted mid-swap)", out, backup)
        try:
            os.rename(backup, out)
        except OSError as e:  # another process restored it first, or a read-only file system
            log.warning("could not restore %s: %s", out, e)
    return out


def files_stamp(out: Path) -> tuple[Any, ...]:
    """What the files at ``out`` are now, cheaply: each one's path, inode, size and change
    times (a copy landing file by file, or a repair, changes it, also one that keeps the old
    modification time; the manifest alone may not)."""
    stamp = []
    with suppress(OSError):
        for path in sorted(Path(out).rglob("*")):
            with suppress(OSError):
                st = path.stat()
                stamp.append((str(path.relative_to(out)), st.st_ino, st.st_size,
                              st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamp)
