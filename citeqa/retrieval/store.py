"""The index directory: its on-disk format, its manifest, and how it is swapped in atomically.

Layout (plain data only, never pickle)::

    out/
      manifest.json      format_version, created, embedding {model_id, dim} | null, counts,
                         settings (dataclasses.asdict of the RetrievalConfig used),
                         dense_index (the DenseSpec: kind and its parameters; absent in indexes
                         written before it existed, which load as before), and the sha256 of
                         every other file
      documents.jsonl    one {"doc_id", "title", "source", "text"} per line, in row order
      passages.npy       int64 [N, 2]: (start, end) character offsets into the document text
      passage_doc.npy    int64 [N]: the documents.jsonl row of each passage
      bm25/              see citeqa/retrieval/bm25.py
      dense.faiss        FAISS index, row i = passage i (absent when built with dense=False)
                         except where rows are removed:
      dense_removed.npy  int64 [R], sorted: rows of dense.faiss that are removed passages (an
                         HNSW index after deletions, see dense.py; absent when there are none)

Atomic rebuild: everything is written to ``.<name>.tmp-<pid>-<token>`` beside ``out`` and
fsynced; then ``out`` (if any) is renamed to ``.<name>.old-<pid>-<token>``, the temporary
directory to ``out``, and the old one deleted (the token: replicas in two containers are both
pid 1). At every instant a complete index sits at ``out`` or, between the two renames,
at the ``.old`` sibling. After a crash, ``recover_index`` (run by ``Index.load``, so by every
command that opens an index, and by ``prepare`` before a build) renames that sibling back to
``out`` once no writer holds the swap lock (a writer mid-swap holds it; a pid in a name
cannot tell, as a restarted container's server is pid 1 again) and removes the debris of dead
writers. A symbolic link at ``out`` is followed: the index is swapped where it points.

Several writers (two builds, two servers, a server and a rebuild) take turns at the swap: it
runs under an exclusive lock on the folder holding ``out``. A writer that changes the index
it loaded (a server adding a document) says which manifest it started from, and its swap is
refused when the index on disk is no longer that one: it would silently undo the other's work.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.atomic import (
    WRITER_TOKEN_CHARS,
    discard_tmp_dir,
    file_above,
    flocked,
    flocked_if_free,
    fsync_path,
    full_disk_named,
    give_owner_and_mode,
    new_tmp_dir,
    owner_and_mode,
    release_tmp_dir,
    remove_stale_siblings,
    siblings,
    writer_name,
)
from citeqa.config import RetrievalConfig
from citeqa.errors import (
    CiteqaError,
    IndexChangedError,
    IndexError_,
    IndexExistsError,
    InvalidRequestError,
)
from citeqa.retrieval.bm25 import FILES as BM25_FILES
from citeqa.retrieval.bm25 import BM25Index
from citeqa.retrieval.dense import DenseIndex, DenseSpec
from citeqa.text import unsendable
from citeqa.types import DOC_ID_PATTERN, DOC_ID_RULE, MAX_DOC_ID_CHARS, Document, Passage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# an index whose dense part keeps removed rows (dense_removed.npy): a citeqa that reads only
# version 1 would find more dense rows than passages; it is told its format instead
FORMAT_WITH_REMOVED_ROWS = 2
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_WITH_REMOVED_ROWS)
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
PASSAGES = "passages.npy"
PASSAGE_DOC = "passage_doc.npy"
BM25_DIR = "bm25"
DENSE = "dense.faiss"
DENSE_REMOVED = "dense_removed.npy"
# every file a load reads when it is there (DENSE_REMOVED only when the manifest lists it)
READ_FILES = (DOCUMENTS, PASSAGES, PASSAGE_DOC, *(f"{BM25_DIR}/{n}" for n in BM25_FILES), DENSE)

# Test-only hook: when CITEQA_TEST_PAUSE_AT names a stage ("before_swap", "mid_swap" or
# "after_swap": the three states a swap passes through), the build writes
# "citeqa-test-pause <stage>" to stderr and sleeps CITEQA_TEST_PAUSE_S seconds there, so a test
# can SIGKILL it at that exact point.
_PAUSE_ENV, _PAUSE_S_ENV = "CITEQA_TEST_PAUSE_AT", "CITEQA_TEST_PAUSE_S"


def test_pause(stage: str) -> None:
    if os.environ.get(_PAUSE_ENV) == stage:
        sys.stderr.write(f"citeqa-test-pause {stage}\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get(_PAUSE_S_ENV, "60")))


# --- writing ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_index(
    directory: Path,
    *,
    documents: Sequence[Document],
    spans: np.ndarray,  # int64 [N, 2]
    passage_doc: np.ndarray,  # int64 [N]
    bm25: BM25Index,
    dense: DenseIndex | None,
    embedding: dict[str, Any] | None,  # {"model_id", "dim"} of the passage embeddings
    cfg: RetrievalConfig,
) -> dict[str, Any]:
    """Write a complete index into the empty ``directory``, fsync it, and return the manifest."""
    write_documents(directory / DOCUMENTS, documents)
    np.save(directory / PASSAGES, np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    np.save(directory / PASSAGE_DOC, np.asarray(passage_doc, dtype=np.int64))
    bm25.save(directory / BM25_DIR)
    if dense is not None:
        dense.save(directory / DENSE)
        if len(dense.removed):
            np.save(directory / DENSE_REMOVED, dense.removed)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_WITH_REMOVED_ROWS if dense is not None and len(dense.removed)
        else FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "embedding": embedding,
        "counts": {
            "documents": len(documents),
            "passages": int(len(spans)),
            "vocabulary": len(bm25.vocab),
        },
        # the kind actually built (a build option may choose "ivf" or resolve "auto")
        "settings": {**asdict(cfg), **({"faiss_index": dense.spec.kind} if dense else {})},
        "dense_index": dense.spec.to_json() if dense is not None else None,
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for p in [*files, directory / MANIFEST]:
        fsync_path(p)
    fsync_path(directory / BM25_DIR)
    fsync_path(directory)
    return manifest


# --- atomic swap -----------------------------------------------------------------------------


def _backup(out: Path) -> Path | None:
    """The newest complete ``.old`` sibling left by a swap that was interrupted, if any."""
    done = [p for p in siblings(out, "old") if (p / MANIFEST).is_file()]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def recover_index(out: Path, *, writing: bool = False) -> Path:
    """Bring the index at ``out`` back after a crash in the swap window; return where to read it.

    ``out`` with a manifest is the index: ``out`` is returned (and dead writers' debris removed).
    When ``out`` is missing or an empty directory and a complete ``.old`` backup sits beside it,
    a writer stopped between its two renames: one swapping right now holds the swap lock, so
    this waits for the lock and then renames a backup still there back to ``out`` (where that
    fails, a read-only file system say, the backup is returned, to be read where it is). A
    symbolic link at ``out`` is followed (``real_path``). Raises IndexError_ (saying how to
    build one) when there is no index to recover. ``writing``: the caller is about to rewrite
    ``out`` (``prepare``): its own pid's debris is dead (``atomic.writer_alive``).
    Every command that opens an index goes through here (``Index.load``), so ``serve``,
    ``search``, ``ask`` and a rebuild all see the same index after a crash.
    """
    out = real_path(Path(out))
    if not (out / MANIFEST).is_file():
        if not _missing(out) or _backup(out) is None:
            raise IndexError_(f"index {out} {how_to_build(out)}")
        # A writer between its two renames holds the swap lock: wait for it (two renames),
        # then look again. A backup still there, with the lock free, was left by a writer that
        # died mid-swap, whatever its pid says (a pid can be this process's own, after a
        # restart as a container's pid 1, or another pid namespace's).
        with writer_lock(out):
            old = _backup(out) if _missing(out) else None
            if old is not None:
                log.warning("restoring %s from %s (a rebuild was interrupted mid-swap)", out, old)
                try:
                    if out.exists():
                        out.rmdir()
                    old.rename(out)
                    fsync_path(out.parent)
                except OSError as e:  # e.g. a read-only file system: read the backup there
                    log.warning("could not restore %s (%s); reading %s", out, e, old)
                    return old
        if not (out / MANIFEST).is_file():  # the writer that held the lock left none
            raise IndexError_(f"index {out} {how_to_build(out)}")
    # with the swap lock free now, no writer is between its renames: every backup is stale
    with flocked_if_free(out.parent) as free:
        remove_stale_siblings(out, writing=writing, backups_free=free)
    return out


def _missing(out: Path) -> bool:
    """``out`` is not there, or is an empty folder: where a swap's backup may be restored."""
    return not out.exists() or _is_empty_dir(out)


def real_path(out: Path) -> Path:
    """``out``, or where it points when it is a symbolic link: an index is swapped in where
    the link points (renaming the link itself would leave the index behind it, and the link
    would no longer be one)."""
    return out.resolve() if out.is_symlink() else out


def is_copy_of(directory: Path, out: Path) -> bool:
    """Whether an index loaded from ``directory`` is the one at ``out``: the same folder, or
    its backup a swap left (read there when it could not be restored)."""
    directory, out = Path(directory).resolve(), real_path(Path(out)).resolve()
    return directory == out or (directory.parent == out.parent
                                and directory.name.startswith(f".{out.name}.old-"))


def prepare(out: Path) -> Path:
    """Before a build: restore an interrupted swap, clear stale siblings; return a fresh tmp dir.

    Refuses to go on when ``out`` exists but is not an index (it would be replaced).
    """
    out = real_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if _missing(out):
        with contextlib.suppress(IndexError_):  # nothing to restore: a first build
            recover_index(out, writing=True)
    check_replaceable(out)
    # with the swap lock free, no writer is between its renames: every backup is stale (one a
    # dead writer whose pid this process has now left, a restarted container's pid 1, too)
    with flocked_if_free(out.parent) as free:
        remove_stale_siblings(out, writing=True, backups_free=free)
    return new_tmp_dir(out)


def how_to_build(out: Path) -> str:
    """Why ``out`` is no index and what to do: a build may write where nothing is, or into an
    empty folder, but never over another folder's files."""
    if not out.exists():
        where = "" if out.is_absolute() else f" (in {Path.cwd()})"
        return (f"does not exist{where}; build one with `citeqa index build SOURCES --out "
                f"{out}`, or name another with --index")
    if _is_empty_dir(out):
        return f"is an empty folder; build one with `citeqa index build SOURCES --out {out}`"
    why = (f"its {MANIFEST} is not a citeqa index's" if (out / MANIFEST).is_file()
           else f"no {MANIFEST}")
    return (f"is not an index ({why}); point at an index directory, or build one "
            "into a new folder with `citeqa index build SOURCES --out NEW_DIR`")


def check_replaceable(out: Path) -> None:
    """Refuse (IndexError_) when ``out`` exists and is not an index a build may replace: a long
    build checks this before it starts, not only when it is about to swap."""
    out = real_path(out)
    if blocker := file_above(out):
        raise IndexError_(f"cannot write an index at {out}: {blocker} is a file, not a folder")
    if out.exists() and not (is_index_dir(out) or _is_empty_dir(out)):
        raise IndexError_(
            f"refusing to replace {out}: it exists and is not a citeqa index directory; "
            "choose another output path or remove it"
        )
    check_name_fits(out)


def _pid_digits() -> int:
    """How many digits a process id may have here (kernel.pid_max's; 7 where unknown)."""
    try:
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            return len(str(int(f.read()) - 1))
    except (OSError, ValueError):
        return 7


def check_name_fits(out: Path) -> None:
    """IndexError_ when ``out``'s name leaves no room for the siblings a write makes beside it
    (``.NAME.tmp-PID-TOKEN``, ``.NAME.old-PID-TOKEN``): that failed at the swap, after all the
    work."""
    sibling = os.fsencode(f".{out.name}.tmp-{'9' * _pid_digits()}-{'f' * WRITER_TOKEN_CHARS}")
    try:
        limit = os.pathconf(next(p for p in out.parents if p.is_dir()), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        limit = 255
    if len(sibling) > limit:
        raise IndexError_(
            f"the name {out.name!r} is too long for an index folder: a write makes "
            f".NAME.tmp-PID-TOKEN beside it, over the file system's {limit} bytes a name; choose "
            "a shorter one (or rename it)"
        )


def is_index_dir(path: Path) -> bool:
    """Whether ``path`` looks like a citeqa index (of any format version, damaged or not), as
    opposed to a folder that merely has a file named manifest.json (a web app's, say): its
    manifest is a JSON object with ``format_version``, or, unreadable, sits beside the
    documents file an index always has."""
    manifest = path / MANIFEST
    if not (path.is_dir() and manifest.is_file()):
        return False
    try:
        parsed = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (path / DOCUMENTS).is_file()
    return isinstance(parsed, dict) and "format_version" in parsed


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold the swap lock of the indexes in ``out``'s folder (an exclusive ``flock`` on the
    folder itself, so no lock file is left behind; waits while another process holds it)."""
    with flocked(out.parent):
        yield


# how many indexes this process swapped in at each (real) path: a command cut short tells by
# it whether its own swap was done (a folder changed there may be another writer's)
_SWAPS: collections.Counter[str] = collections.Counter()


def swaps_into(out: Path) -> int:
    """How many indexes this process has swapped in at ``out`` (``publish``)."""
    return _SWAPS[str(real_path(out))]


def publish(tmp: Path, out: Path, *, expect: dict[str, Any] | None = None,
            only_if_missing: bool = False) -> None:
    """Swap the complete ``tmp`` index in at ``out`` (see the module docstring), under the
    writers' lock. ``expect``: the manifest of the index ``tmp`` was made from; IndexError_ (and
    nothing changed) when ``out`` now holds another (another version: a rebuild of the same
    files writes the same index, only at another time, and undoes nothing).
    ``only_if_missing``: IndexExistsError (and nothing changed) when ``out`` holds anything but
    an empty folder now (an index another build swapped in since this one checked)."""
    out = real_path(out)
    old = out.parent / f".{out.name}.old-{writer_name()}"  # (another container's pid 1 swaps
    with writer_lock(out):  # too: its backup is its own, removed outside the lock)
        if only_if_missing and out.exists() and not _is_empty_dir(out):
            raise IndexExistsError(
                f"{out} is not empty any more (another build wrote an index there while this one "
                "ran); it was left as it is")
        if expect is not None and not out.exists():
            raise IndexChangedError(
                f"the index at {out} is gone from disk since this process loaded it (deleted or "
                "moved?), so this change has nowhere to go; nothing was changed: put the index "
                "back there (or build one with `citeqa index build`), then try again")
        if expect is not None and version_on_disk(out) != manifest_version(expect):
            raise IndexChangedError(
                f"the index at {out} changed on disk since this process loaded it (another "
                "server, a rebuild or `citeqa index add/remove` wrote it), so this change would "
                "undo that one; nothing was changed: load the index as it is now, then try "
                "again")
        new = folder_id(tmp)
        aside = False  # the previous index is moved aside (or being moved)
        try:
            if out.exists():
                aside = True
                out.rename(old)
                test_pause("mid_swap")
            tmp.rename(out)
        except BaseException:  # the previous index back in its place, as it was, as said (a
            # Ctrl-C anywhere between the renames too, the new one not in: the lock is let go
            # next, and a missing index would let an --if-missing build write over it)
            if aside and not out.exists() and old.exists():
                old.rename(out)
            raise
        finally:  # (counted when done, also where a Ctrl-C came just after the rename)
            if new is not None and folder_id(out) == new:
                _SWAPS[str(out)] += 1
        release_tmp_dir(tmp)
        fsync_path(out.parent)
    test_pause("after_swap")
    try:
        shutil.rmtree(old)
    except FileNotFoundError:
        pass
    except OSError as e:  # the new index is in: a backup left over is removed by a later write
        log.warning("could not remove the previous index %s (%s)", old, e)


_UNREADABLE_SAID: set[str] = set()  # manifests said to be unreadable (once each, not each poll)


def _manifest_or_none(out: Path) -> Any:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except PermissionError as e:  # not a writer mid-swap: said, as a server polls in silence
        if str(out) not in _UNREADABLE_SAID:
            _UNREADABLE_SAID.add(str(out))
            log.warning("cannot read %s (%s): this process cannot see changes to the index "
                        "there", out / MANIFEST, e.strerror)
        return None
    except (OSError, ValueError):
        return None


def version_on_disk(out: Path) -> str | None:
    """The version of the index at ``out`` now (``manifest_version``), read from its manifest
    alone; None when none can be read there (none built yet, or a writer mid-swap)."""
    manifest = _manifest_or_none(Path(out))
    return manifest_version(manifest) if isinstance(manifest, dict) else None


def settled_version(out: Path, *, looks: int = 10, wait_s: float = 0.01) -> str | None:
    """``version_on_disk``, looked at again (``looks`` times in all, ``wait_s`` apart) while it
    is None: a writer's swap leaves ``out`` without an index for an instant, between its two
    renames. None: none there (deleted, moved, never built)."""
    for _ in range(looks - 1):
        if (version := version_on_disk(out)) is not None:
            return version
        time.sleep(wait_s)
    return version_on_disk(out)


def save_index(out: Path, *, expect: dict[str, Any] | None = None,
               only_if_missing: bool = False, **parts: Any) -> dict[str, Any]:
    """Write an index (``write_index``'s keyword arguments) beside ``out`` and swap it in
    (``expect``, ``only_if_missing``: see ``publish``).

    Whatever happens before the swap (an error, Ctrl-C), the index at ``out`` stays the previous
    one and the temporary directory is removed. The new index takes the owner and mode of the
    folder it replaces. Returns the manifest.
    """
    was = owner_and_mode(real_path(out))
    tmp = prepare(out)
    try:
        with full_disk_named(tmp):
            manifest = write_index(tmp, **parts)
        if was is not None:
            give_owner_and_mode(tmp, was)
        test_pause("before_swap")
        publish(tmp, out, expect=expect, only_if_missing=only_if_missing)
    except BaseException:
        discard_tmp_dir(tmp)
        raise
    return manifest


# --- reading ---------------------------------------------------------------------------------


def passages_of(documents: Sequence[Document], spans: Sequence[Sequence[int]],
                passage_doc: Sequence[int]) -> list[Passage]:
    """Passage i: ``spans[i]`` = (start, end) in ``documents[passage_doc[i]]``."""
    return [
        Passage(passage_id=i, doc_id=documents[row].doc_id, start=int(start), end=int(end),
                text=documents[row].text[start:end])
        for i, ((start, end), row) in enumerate(zip(spans, passage_doc, strict=True))
    ]


@dataclass
class Index:
    """A loaded index: documents, passages (with text), the BM25 and dense indexes."""

    documents: dict[str, Document]  # doc_id -> document
    passages: list[Passage]  # passage_id == position
    manifest: dict[str, Any]
    bm25: BM25Index
    dense: DenseIndex | None
    directory: Path | None = None

    @classmethod
    def load(cls, directory: Path, *, verify: bool = True) -> Index:
        """Load and check an index directory (format version, checksums, counts).

        Raises IndexError_ saying what is wrong and to rebuild. A rebuild that was interrupted
        mid-swap is recovered first (``recover_index``). A load while another process swaps a
        new index in is tried again (``LOAD_TRIES``): one that fails (the folder is another one
        by the end, or a swap's backup stands beside it) read parts of two indexes, or files
        taken away under it, and the index is not corrupt; one that succeeds with another
        folder there by its end may hold parts of two indexes that passed every check.
        """
        directory = Path(directory)
        for attempt in range(1, LOAD_TRIES + 1):
            before = folder_id(directory)
            swapped: bool | None = None  # decided while the folder read is held: its id then
            try:  # is no other folder's (one made after it is deleted may take its number)
                at = recover_index(directory)  # (restored first: then held, and read once)
                with _held_open(at) as held:
                    try:
                        loaded = cls._load_once(at, verify=verify)
                    except (IndexError_, OSError):
                        swapped = folder_id(at) != held or bool(siblings(directory, "old"))
                        raise
                    # a swap between reading the manifest (and checking the files' sums) and
                    # parsing the files passed every check where the counts agreed: the
                    # documents of one version under another's manifest and version
                    if folder_id(at) == held:
                        return loaded
                    swapped = True
            except (IndexError_, OSError) as e:
                if swapped is None:  # recovering it failed
                    swapped = folder_id(directory) != before or bool(siblings(directory, "old"))
                if attempt == LOAD_TRIES or not swapped:
                    if isinstance(e, OSError):
                        raise IndexError_(f"index {directory} is unreadable ({e!r}); rebuild "
                                          "it") from e
                    raise
            log.info("index %s changed while it was read; reading it again", directory)
            time.sleep(0.05 * attempt)
        raise IndexError_(f"index {directory} changed {LOAD_TRIES} times while it was read "
                          "(another process is changing it); try again")

    @classmethod
    def _load_once(cls, directory: Path, *, verify: bool) -> Index:
        """The index at ``directory`` (recovered already: ``load``), read once."""
        manifest = _read_manifest(directory)
        if verify:
            _verify_files(directory, manifest)
        try:  # (mapped: a header's shape is not allocated before the file is seen to hold it)
            documents = read_documents(directory / DOCUMENTS)
            spans = np.load(directory / PASSAGES, mmap_mode="r")
            passage_doc = np.load(directory / PASSAGE_DOC, mmap_mode="r")
        except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeError is a ValueError
            raise IndexError_(f"index {directory} is unreadable ({e!r}); rebuild it") from e
        bm25 = BM25Index.load(directory / BM25_DIR)
        dense = None
        if (directory / DENSE).is_file():
            dense = DenseIndex.load(directory / DENSE, _dense_spec(directory, manifest),
                                    _removed_rows(directory, manifest))
        if (why := _misplaced(documents, spans, passage_doc)) is not None:
            raise IndexError_(f"index {directory} is inconsistent ({why}); rebuild it")
        counts = manifest["counts"]
        found = {
            "documents": len(documents),
            "passages": len(spans),
            "passage_doc rows": len(passage_doc),
            "bm25 rows": bm25.n_docs,
            **({"dense rows": dense.size} if dense is not None else {}),
        }
        bad = {
            name: n
            for name, n in found.items()
            if n != counts["documents" if name == "documents" else "passages"]
        }
        if bad:
            raise IndexError_(
                f"index {directory} is inconsistent (manifest counts {counts}, found {found}); "
                "rebuild it"
            )
        emb = manifest.get("embedding")
        if dense is not None and (emb is None or emb.get("dim") != dense.dim):
            raise IndexError_(
                f"index {directory}: the dense index does not match the manifest; rebuild it"
            )
        return cls(
            documents={d.doc_id: d for d in documents},
            passages=passages_of(documents, spans.tolist(), passage_doc.tolist()),
            manifest=manifest,
            bm25=bm25,
            dense=dense,
            directory=directory,
        )

    @property
    def version(self) -> str:
        """16 hex digits naming this index's content (``manifest_version``)."""
        return manifest_version(self.manifest)

    def list_documents(self, offset: int, limit: int) -> tuple[list[Document], int]:
        """Up to ``limit`` documents from position ``offset`` in index order (the order they
        were indexed: added documents come last), and how many there are in all, for paging."""
        assert offset >= 0 and limit >= 0, (offset, limit)
        total = len(self.documents)
        start = min(offset, total)  # islice refuses offsets past sys.maxsize
        page = itertools.islice(self.documents.values(), start, min(start + limit, total))
        return list(page), total


def _misplaced(documents: Sequence[Document], spans: np.ndarray,
               passage_doc: np.ndarray) -> str | None:
    """What puts a passage outside its document, or None: each row of ``spans`` a (start,
    end) with ``0 <= start <= end <=`` the length of the text of the document ``passage_doc``
    names. A -1 there took the last document, and an update wrote it as that one's row. Each
    document's fields are strings and no two share a doc_id (the second hid the first, whose
    passages then cited it)."""
    fields = ("doc_id", "title", "source", "text")
    if not all(isinstance(getattr(d, f), str) for d in documents for f in fields):
        return "a document's doc_id, title, source or text is not a string"
    if len({d.doc_id for d in documents}) != len(documents):
        seen = collections.Counter(d.doc_id for d in documents)
        twice = next(doc_id for doc_id, n in seen.items() if n > 1)
        return f"two documents share the id {twice!r:.80}"
    if spans.ndim != 2 or spans.shape[1:] != (2,) or spans.dtype.kind != "i":
        return f"passage spans hold {spans.dtype} of shape {spans.shape}"
    if passage_doc.ndim != 1 or passage_doc.dtype.kind != "i":
        return f"passage documents hold {passage_doc.dtype} of shape {passage_doc.shape}"
    if len(spans) != len(passage_doc) or not len(spans):
        return None  # (the counts' check says how many of each there are)
    if passage_doc.min() < 0 or passage_doc.max() >= len(documents):
        return f"a passage names a document outside 0..{len(documents) - 1}"
    ends = np.fromiter((len(d.text) for d in documents), np.int64, len(documents))[passage_doc]
    if np.any(spans[:, 0] < 0) or np.any(spans[:, 1] < spans[:, 0]) or np.any(spans[:, 1] > ends):
        return "a passage's span lies outside its document's text"
    return None


def manifest_version(manifest: dict[str, Any]) -> str:
    """The sha256 of ``manifest`` less the time it was written, in 16 hex digits: the manifest
    holds every file's checksum, the counts and the settings, so any document added, deleted or
    changed gives the index a new version, and the same files keep theirs."""
    content = {k: v for k, v in manifest.items() if k != "created"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


LOAD_TRIES = 5  # reads of an index another process keeps swapping (see Index.load)


@contextlib.contextmanager
def _held_open(directory: Path) -> Iterator[tuple[int, int] | None]:
    """``folder_id(directory)``, the folder kept open meanwhile: its inode number is not given to
    a folder made after it is deleted, so the same id at the end means the same folder."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not there (a crash mid-swap: the load restores it), or not a folder
        yield folder_id(directory)
        return
    try:
        st = os.fstat(fd)
        yield st.st_dev, st.st_ino
    finally:
        os.close(fd)


def folder_id(directory: Path) -> tuple[int, int] | None:
    """Which folder stands at ``directory`` now (device, inode): a swap puts another there."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if not is_index_dir(directory):
            raise IndexError_(f"index {directory} {how_to_build(directory)}") from e
        raise IndexError_(f"index {directory}: unreadable manifest.json ({e}); rebuild it") from e
    if not is_index_dir(directory):  # another program's manifest.json: rebuilding is refused
        raise IndexError_(f"index {directory} {how_to_build(directory)}")
    if not isinstance(manifest, dict):
        raise IndexError_(f"index {directory}: manifest.json is not an object; rebuild it")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMATS:  # (True == 1)
        raise IndexError_(
            f"index {directory} has format version {version!r}, this citeqa reads versions "
            f"{' and '.join(map(str, READABLE_FORMATS))}; rebuild it with `citeqa index build`"
        )
    for key in ("counts", "settings", "files"):
        if key not in manifest:
            raise IndexError_(f"index {directory}: manifest.json lacks {key!r}; rebuild it")
    if why := _malformed(manifest):
        raise IndexError_(f"index {directory}: manifest.json's {why}; rebuild it")
    return manifest


def _malformed(manifest: dict[str, Any]) -> str | None:
    """Which of a manifest's parts is not of the kind a load reads (a traceback followed)."""
    files, counts = manifest["files"], manifest["counts"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return "files is not an object of checksums"
    if not isinstance(counts, dict) or not all(
            isinstance(counts.get(k), int) and not isinstance(counts.get(k), bool)
            and counts[k] >= 0 for k in ("documents", "passages")):
        return "counts does not give whole numbers of documents and passages"
    for key in ("settings", "embedding", "dense_index"):
        if not isinstance(manifest.get(key), dict) and (key == "settings"
                                                         or manifest.get(key) is not None):
            return f"{key} is not an object"
    return None


def _removed_rows(directory: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The dense index's removed rows (``DENSE_REMOVED``, a file the manifest lists), None when
    it has none."""
    if DENSE_REMOVED not in manifest["files"]:
        return None
    try:
        return np.load(directory / DENSE_REMOVED)  # never a pickle: allow_pickle is False
    except (OSError, ValueError, EOFError) as e:
        raise IndexError_(f"index {directory}: {DENSE_REMOVED} is unreadable ({e!r}); "
                          "rebuild it") from e


def _dense_spec(directory: Path, manifest: dict[str, Any]) -> DenseSpec | None:
    """The manifest's ``dense_index``; None for an index written before it was recorded."""
    spec = manifest.get("dense_index")
    if spec is None:
        return None
    try:
        return DenseSpec.from_json(spec)
    except (CiteqaError, TypeError, AttributeError) as e:
        raise IndexError_(f"index {directory}: bad dense_index in manifest.json ({e}); "
                          "rebuild it") from e


def check_index(out: Path) -> None:
    """Whether the index at ``out`` would load, without loading it: its manifest is a readable
    citeqa one and every file matches its checksum (IndexError_ saying what is wrong)."""
    directory = recover_index(out)
    _verify_files(directory, _read_manifest(directory))


def _verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """IndexError_ unless every file the manifest lists is there and matches its checksum,
    and every file a load reads is listed (one that is not was read unchecked: another index's
    vectors searched as this one's)."""
    for name in READ_FILES:
        if name not in manifest["files"] and (directory / name).exists():
            raise IndexError_(f"index {directory} holds {name}, which its manifest does not list "
                              "(added by hand, or from another index); rebuild it")
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise IndexError_(f"index {directory} is missing {name}; rebuild it")
        if sha256_file(path) != digest:
            raise IndexError_(
                f"index {directory}: {name} does not match its checksum (corrupt or edited; "
                "a copy taken while a change was being written: copy it again); rebuild it"
            )


def check_documents(documents: Sequence[Document]) -> None:
    """InvalidRequestError naming the first of ``documents`` an index cannot hold as given
    (what REST's schema refuses, for documents handed over in Python): not a Document, a field
    that is not text, text that cannot be stored as UTF-8 (a lone surrogate), or a
    doc_id outside ``DOC_ID_PATTERN`` (one REST could never address)."""
    for doc in documents:
        if not isinstance(doc, Document):
            raise InvalidRequestError(f"not a citeqa.types.Document: {doc!r:.80}")
        for field in ("doc_id", "title", "source", "text"):
            value = getattr(doc, field)
            if not isinstance(value, str):
                raise InvalidRequestError(f"document {doc.doc_id!r:.80}: its {field} is a "
                                          f"{type(value).__name__}, not text")
            if (why := unsendable(value.replace("\x00", ""))) is not None:  # (JSON holds NUL)
                raise InvalidRequestError(f"document {doc.doc_id!r:.80}: its {field} {why}")
        if len(doc.doc_id) > MAX_DOC_ID_CHARS or not re.fullmatch(DOC_ID_PATTERN, doc.doc_id):
            raise InvalidRequestError(f"document id {doc.doc_id!r:.80} must be {DOC_ID_RULE}")


def write_documents(path: Path, documents: Sequence[Document]) -> None:
    """documents.jsonl: one {"doc_id", "title", "source", "text"} object per line."""
    with path.open("w", encoding="utf-8") as f:
        for d in documents:
            row = {"doc_id": d.doc_id, "title": d.title, "source": d.source, "text": d.text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_documents(path: Path) -> list[Document]:
    """The documents of a documents.jsonl file, in order."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.append(Document(row["doc_id"], row["title"], row["source"], row["text"]))
    return docs
