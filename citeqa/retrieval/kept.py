"""Embeddings kept on disk while a command embeds, so that running it again after a crash, a
Ctrl-C or another writer's change embeds only the passages it had not embedded yet.

``KeptEmbedder(embedder, directory)`` is an ``Embedder``: it looks each text up among the
parts kept in ``directory`` by the hash of the embedder's identity (model id, dimension,
requested CPU dtype) and the text, and embeds only the texts it does not find, ``PART`` at a
time, writing each part (``<key>.npz``: the vectors and their texts' hashes, no pickle)
before embedding the next. A part is written under a temporary name and renamed, so one under
its key is whole; one that cannot be read is embedded again. Keeping is best effort: a part
that cannot be written costs its rerun the embedding, never an error.

``citeqa index add`` keeps its parts in ``kept_dir(index)``, ``.NAME.add`` beside the index,
holding a shared lock on it while it runs. Once its change is in it removes the directory
(``discard``) unless another add holds the lock, in which case it removes only the parts it
wrote; an add that finds nothing left to add and a rebuild (``index build``) remove it too.

The vectors of a part are those its embedder gave when it was made: with ``auto``, the dtype
the CPU was measured to favour in that run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
from tqdm.auto import tqdm

from citeqa.atomic import atomic_path
from citeqa.retrieval.embed import Embedder

log = logging.getLogger(__name__)

PART = 256  # passages per kept part: ~8 s of CPU embedding in fp32, the most a crash loses
LOCK = ".lock"  # held shared by each add using the directory, exclusively to remove it
HASH_BYTES = 16
LOCK_TRIES = 5  # times a lock is taken again after a discard unlinked its file meanwhile


def kept_dir(index: Path) -> Path:
    """Where ``citeqa index add`` keeps its embeddings until its change is in: ``.NAME.add``
    beside the index's real folder (a link to it followed, as the index swap follows it)."""
    real = Path(index).resolve()
    return real.parent / f".{real.name}.add"


def text_hash(identity: str, text: str) -> bytes:
    """The key of one text's vector by the embedder named by ``identity``."""
    data = f"{identity}\0{text}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).digest()[:HASH_BYTES]


def _is_whole_part(path: Path) -> bool:
    return path.suffix == ".npz" and not path.name.startswith(".")


def _is_part(path: Path) -> bool:
    """Whether ``path`` is a file this module writes (a part, or a part being written)."""
    return _is_whole_part(path) or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _parts(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(directory).iterdir() if _is_whole_part(p))
    except OSError:  # no directory (nothing kept), or not a directory
        return []


def _load(path: Path, *, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A part's hashes (uint8 [n, HASH_BYTES]) and, when ``vectors``, its vectors (float32
    [n, dim]); None when it is not a whole part (it is then embedded again)."""
    try:
        # never a pickle: allow_pickle is False; an .npy (not an archive) has no ``with``
        with np.load(path) as part:
            hashes = part["hashes"]
            rows = part["vectors"] if vectors else None
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        log.warning("embeddings kept in %s are unreadable (%s): embedding them again", path, e)
        return None
    if (hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != HASH_BYTES
            or (rows is not None and (rows.dtype != np.float32 or rows.ndim != 2
                                      or len(hashes) != len(rows)))):
        log.warning("embeddings kept in %s are not a part (shapes %s, %s): embedding them "
                    "again", path, hashes.shape, None if rows is None else rows.shape)
        return None
    return hashes, rows


def kept_passages(directory: Path) -> int:
    """How many passages' embeddings ``directory`` keeps in whole parts (0 when none)."""
    return sum(len(part[0]) for path in _parts(directory)
               if (part := _load(path, vectors=False)) is not None)


def discard(directory: Path, mine: Iterable[str] = ()) -> None:
    """Remove what is kept in ``directory`` (the work it was for is in place, or void): all of
    it when no other add holds its lock, else only the parts named ``mine``. Only this
    module's files are removed (a folder of that name holding others stays)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    mine = set(mine)
    with _locked(directory, exclusive=True) as alone:
        for path in directory.iterdir():
            if (alone and _is_part(path)) or path.name in mine:
                with contextlib.suppress(OSError):
                    path.unlink()
        if alone:  # one that opens it meanwhile finds it gone once it holds it, and retries
            with contextlib.suppress(OSError):
                (directory / LOCK).unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()  # when empty


@contextlib.contextmanager
def _locked(directory: Path, *, exclusive: bool):  # type: ignore[no-untyped-def]
    """Hold ``directory``'s lock, shared (waiting for it) or exclusive (not waiting); yields
    whether it is held: False when another holds it (exclusive), or when it cannot be taken (no
    directory). Where there is no flock (off POSIX, some network file systems) each holder is
    taken to be alone. A lock file a discard unlinked while this one waited for it is not the
    lock any more: it is taken again on the file at the path."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = directory / LOCK
    for _ in range(LOCK_TRIES):
        try:
            if not exclusive:
                directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
            except BlockingIOError:
                yield False
                return
            except OSError as e:  # a file system without flock: unguarded
                log.debug("cannot lock %s (%s)", path, e)
                yield True
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)
    yield False


class KeptEmbedder:
    """``embedder``, keeping what it embeds in ``directory`` (see the module's docstring). Use
    it as a context manager: it holds the directory's shared lock meanwhile."""

    def __init__(self, embedder: Embedder, directory: Path, *, part: int | None = None,
                 written: list[str] | None = None) -> None:
        part = PART if part is None else part
        if part < 1:
            raise ValueError(f"part must be at least 1, got {part}")
        self.embedder = embedder
        self.directory = Path(directory)
        self.part = part
        self.model_id = embedder.model_id
        self.dim = embedder.dim
        self.identity = f"{self.model_id}\0{self.dim}\0{getattr(embedder, 'cpu_dtype', '')}"
        self.reused = 0  # passages whose embeddings an earlier run kept
        # the parts this command wrote (shared by its attempts: a retry after another
        # writer's change reads its first attempt's parts, which were not kept from before)
        self.written = written if written is not None else []
        self._lock: contextlib.ExitStack | None = None

    def __enter__(self) -> KeptEmbedder:
        self._lock = contextlib.ExitStack()  # the shared lock makes the directory
        self._lock.enter_context(_locked(self.directory, exclusive=False))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def embed(self, texts: Sequence[str], *, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        hashes = [text_hash(self.identity, t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows: dict[bytes, list[int]] = {}
        for i, h in enumerate(hashes):
            rows.setdefault(h, []).append(i)
        found = self._look_up(rows, out)
        missing = [h for h in rows if h not in found]  # each distinct text once, in order
        done = len(texts) - sum(len(rows[h]) for h in missing)
        with tqdm(total=len(texts), initial=done, desc="embedding", unit="passage",
                  disable=not progress, file=sys.stderr) as bar:
            if self.reused:
                bar.set_postfix(kept=self.reused)
            for start in range(0, len(missing), self.part):
                chunk = missing[start:start + self.part]
                vectors = np.asarray(self.embedder.embed([texts[rows[h][0]] for h in chunk],
                                                         batch_size=batch_size),
                                     dtype=np.float32).reshape(len(chunk), self.dim)
                for h, vector in zip(chunk, vectors, strict=True):
                    out[rows[h]] = vector
                self._write(np.frombuffer(b"".join(chunk), np.uint8)
                            .reshape(len(chunk), HASH_BYTES), vectors)
                bar.update(sum(len(rows[h]) for h in chunk))
        return out

    def _look_up(self, rows: dict[bytes, list[int]], out: np.ndarray) -> set[bytes]:
        """Fill ``out``'s rows of the hashes the kept parts hold; return those hashes. A part's
        vectors are read only when it holds one of them."""
        found: set[bytes] = set()
        for path in _parts(self.directory):
            listed = _load(path, vectors=False)
            if listed is None:
                continue
            raw = listed[0].tobytes()  # row j's hash: raw[j * HASH_BYTES:(j + 1) * HASH_BYTES]
            wanted = {j: h for j in range(len(listed[0]))
                      if (h := raw[j * HASH_BYTES:(j + 1) * HASH_BYTES]) in rows
                      and h not in found}
            if not wanted or (part := _load(path)) is None:
                continue
            vectors = part[1]  # a part's name is its hashes' digest: the rows read above
            assert vectors is not None
            if vectors.shape[1] != self.dim:
                continue
            for j, h in wanted.items():
                if h not in found:  # a text twice in one part
                    out[rows[h]] = vectors[j]
                    found.add(h)
                    if path.name not in self.written:  # not this run's own, from a retry
                        self.reused += len(rows[h])
        return found

    def _write(self, hashes: np.ndarray, vectors: np.ndarray) -> None:
        name = hashlib.sha256(hashes.tobytes()).hexdigest()[:32] + ".npz"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # a discard may have removed it
            with atomic_path(self.directory / name) as tmp, tmp.open("wb") as f:
                np.savez(f, hashes=hashes, vectors=vectors)
            self.written.append(name)
        except OSError as e:  # a full or read-only disk: the work goes on, unkept
            log.warning("could not keep embeddings in %s (%s); a rerun embeds them again",
                        self.directory, e)

    def discard(self) -> None:
        """Remove what is kept once this add's change is in (``discard``): all of it, or
        only the parts this one wrote while another add uses the directory."""
        self.__exit__(None, None, None)  # its own shared lock would keep it from being alone
        discard(self.directory, mine=self.written)
