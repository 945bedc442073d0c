"""The index directory: its on-disk format, its manifest, and how it is swapped in atomically.

Layout (plain data only, never pickle)::

    out/
      manifest.json      format_version, created, embedding {model_id, dim} | null, counts,
                         settings (dataclasses.asdict of the RetrievalConfig used), and the
                         sha256 of every other file
      documents.jsonl    one {"doc_id", "title", "source", "text"} per line, in row order
      passages.npy       int64 [N, 2]: (start, end) character offsets into the document text
      passage_doc.npy    int64 [N]: the documents.jsonl row of each passage
      bm25/              see citeqa/retrieval/bm25.py
      dense.faiss        FAISS index, row i = passage i (absent when built with dense=False)

Atomic rebuild: everything is written to ``.<name>.tmp-<pid>`` beside ``out`` and fsynced; then
``out`` (if any) is renamed to ``.<name>.old-<pid>``, the temporary directory to ``out``, and the
old one deleted. At every instant a complete index sits at ``out`` or, between the two renames,
at the ``.old`` sibling: ``Index.load`` falls back to it, and the next build restores it and
removes stale temporary directories.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.config import RetrievalConfig
from citeqa.errors import IndexError_
from citeqa.retrieval.bm25 import BM25Index
from citeqa.retrieval.dense import DenseIndex
from citeqa.types import Document, Passage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
PASSAGES = "passages.npy"
PASSAGE_DOC = "passage_doc.npy"
BM25_DIR = "bm25"
DENSE = "dense.faiss"

# Test-only hook: when CITEQA_TEST_PAUSE_AT names a stage ("before_swap" or "mid_swap"), the
# build writes "citeqa-test-pause <stage>" to stderr and sleeps CITEQA_TEST_PAUSE_S seconds there,
# so a test can SIGKILL it at that exact point.
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with (directory / DOCUMENTS).open("w", encoding="utf-8") as f:
        for d in documents:
            row = {"doc_id": d.doc_id, "title": d.title, "source": d.source, "text": d.text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    np.save(directory / PASSAGES, np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    np.save(directory / PASSAGE_DOC, np.asarray(passage_doc, dtype=np.int64))
    bm25.save(directory / BM25_DIR)
    if dense is not None:
        dense.save(directory / DENSE)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "embedding": embedding,
        "counts": {
            "documents": len(documents),
            "passages": int(len(spans)),
            "vocabulary": len(bm25.vocab),
        },
        "settings": asdict(cfg),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for p in [*files, directory / MANIFEST]:
        _fsync_path(p)
    _fsync_path(directory / BM25_DIR)
    _fsync_path(directory)
    return manifest


# --- atomic swap -----------------------------------------------------------------------------


def tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


def _backup(out: Path) -> Path | None:
    """The newest complete ``.old`` sibling left by a swap that was interrupted, if any."""
    done = [p for p in _siblings(out, "old") if (p / MANIFEST).is_file()]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(out: Path) -> Path:
    """Before a build: restore an interrupted swap, clear stale siblings; return a fresh tmp dir.

    Refuses to go on when ``out`` exists but is not an index (it would be replaced).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() and (old := _backup(out)) is not None:
        log.warning("restoring %s from %s (an earlier rebuild was interrupted)", out, old)
        old.rename(out)
    if out.exists() and not (out.is_dir() and (out / MANIFEST).is_file() or _is_empty_dir(out)):
        raise IndexError_(
            f"refusing to replace {out}: it exists and is not a citeqa index directory; "
            "choose another output path or remove it"
        )
    for stale in [*_siblings(out, "tmp"), *_siblings(out, "old")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another build is writing it right now
        log.info("removing stale %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def publish(tmp: Path, out: Path) -> None:
    """Swap the complete ``tmp`` index in at ``out`` (see the module docstring)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
        test_pause("mid_swap")
    tmp.rename(out)
    _fsync_path(out.parent)
    if old.exists():
        shutil.rmtree(old)


def save_index(out: Path, **parts: Any) -> dict[str, Any]:
    """Write an index (``write_index``'s keyword arguments) beside ``out`` and swap it in.

    Whatever happens before the swap (an error, Ctrl-C), the index at ``out`` stays the previous
    one and the temporary directory is removed. Returns the manifest.
    """
    tmp = prepare(out)
    try:
        manifest = write_index(tmp, **parts)
        test_pause("before_swap")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --- reading ---------------------------------------------------------------------------------


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

        Raises IndexError_ saying what is wrong and to rebuild. When ``directory`` is missing
        because a rebuild was interrupted mid-swap, the previous index is loaded instead.
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            old = _backup(directory) if not directory.exists() else None
            if old is None:
                what = "has no manifest.json" if directory.exists() else "does not exist"
                raise IndexError_(
                    f"index {directory} {what}; build one with `citeqa index build SOURCES "
                    f"--out {directory}`"
                )
            log.warning("index %s is mid-rebuild; loading the previous one from %s", directory, old)
            directory = old
        manifest = _read_manifest(directory)
        if verify:
            _verify_files(directory, manifest)
        try:
            documents = _read_documents(directory / DOCUMENTS)
            spans = np.load(directory / PASSAGES)
            passage_doc = np.load(directory / PASSAGE_DOC)
        except (OSError, ValueError, KeyError, TypeError) as e:  # UnicodeError is a ValueError
            raise IndexError_(f"index {directory} is unreadable ({e!r}); rebuild it") from e
        bm25 = BM25Index.load(directory / BM25_DIR)
        dense = DenseIndex.load(directory / DENSE) if (directory / DENSE).is_file() else None
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
        if bad or spans.ndim != 2 or (len(passage_doc) and passage_doc.max() >= len(documents)):
            raise IndexError_(
                f"index {directory} is inconsistent (manifest counts {counts}, found {found}); "
                "rebuild it"
            )
        emb = manifest.get("embedding")
        if dense is not None and (emb is None or emb.get("dim") != dense.dim):
            raise IndexError_(
                f"index {directory}: the dense index does not match the manifest; rebuild it"
            )
        passages = [
            Passage(
                passage_id=i,
                doc_id=documents[row].doc_id,
                start=int(start),
                end=int(end),
                text=documents[row].text[start:end],
            )
            for i, ((start, end), row) in enumerate(
                zip(spans.tolist(), passage_doc.tolist(), strict=True)
            )
        ]
        return cls(
            documents={d.doc_id: d for d in documents},
            passages=passages,
            manifest=manifest,
            bm25=bm25,
            dense=dense,
            directory=directory,
        )


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise IndexError_(f"index {directory}: unreadable manifest.json ({e}); rebuild it") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise IndexError_(
            f"index {directory} has format version {version!r}, this citeqa reads version "
            f"{FORMAT_VERSION}; rebuild it with `citeqa index build`"
        )
    for key in ("counts", "settings", "files"):
        if key not in manifest:
            raise IndexError_(f"index {directory}: manifest.json lacks {key!r}; rebuild it")
    return manifest


def _verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise IndexError_(f"index {directory} is missing {name}; rebuild it")
        if sha256_file(path) != digest:
            raise IndexError_(
                f"index {directory}: {name} does not match its checksum (corrupt or edited); "
                "rebuild it"
            )


def _read_documents(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.append(Document(row["doc_id"], row["title"], row["source"], row["text"]))
    return docs
