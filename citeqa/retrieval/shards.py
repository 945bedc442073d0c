"""A shard: one slice of the corpus that a build worker reads, chunks, counts and embeds.

A sharded build (citeqa.distributed) cuts the documents of each source item (a file or URL)
into blocks of about ``shard_chars`` characters, in order. Each block becomes a directory of
plain data (no pickle)::

    <work>/shards/<key>/
      shard.json        format, key, counts, embedding record | null, skipped sources
      documents.jsonl   the block's documents, in order
      passages.npy      int64 [n, 2]: (start, end) into the passage's document text
      passage_doc.npy   int64 [n]: the passage's row in documents.jsonl
      terms.json        the block's vocabulary, in order of first occurrence
      term_indptr.npy, term_ids.npy, term_counts.npy, doc_len.npy: its BM25 term counts
                        (bm25.TermCounts)
      vectors.npy       float32 [n, dim]: passage embeddings (absent without a dense part)

Two steps make a shard, so that the cheap one runs on CPU tasks and the expensive one on the
embedding actors (GPUs where there are some): ``stage_item`` reads an item and, per block,
writes everything but the vectors into ``<work>/staging/``; ``finish_shard`` embeds the staged
passages, adds ``vectors.npy`` and ``shard.json`` and renames the directory into ``shards/``.

The key is a hash of the block's content and of every setting that shapes the shard's files
(chunking, embedder, dense on/off), so a shard under its key is exactly the one the block
would give: a rerun after a kill finds the finished shards and embeds only the rest, while an
edited source or setting gets a new key. A shard is renamed into place whole, so one that exists
is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.atomic import fsync_path, full_disk_named
from citeqa.config import RetrievalConfig
from citeqa.errors import ConfigError, IndexError_
from citeqa.retrieval.bm25 import TermCounts, count_terms
from citeqa.retrieval.builder import embedding_record, indexed_text
from citeqa.retrieval.chunk import passage_spans
from citeqa.retrieval.embed import Embedder
from citeqa.retrieval.store import read_documents, test_pause, write_documents
from citeqa.text import TOKENIZER, tokenize
from citeqa.types import Document

log = logging.getLogger(__name__)

SHARD_FORMAT = 4  # bump when the files or their meaning change: old shards are then re-made
# (2: Markdown chunked as such, less its passages of markup alone; 3: of markup and headings
# alone, and its front matter; 4: a byte-order mark starts no passage, and front matter after
# one is in none)
SHARD_CHARS = 2_000_000  # ~2,500 passages: a minute of CPU embedding, a second on a GPU
SHARD_JSON = "shard.json"
MARKER = "citeqa-build.json"  # in the work directory: proves workers see the same directory
_COUNT_ARRAYS = ("term_indptr", "term_ids", "term_counts", "doc_len")


@dataclass(frozen=True)
class ShardJob:
    """What every worker of one build needs: plain data, sent to Ray workers as it is."""

    cfg: RetrievalConfig
    work: str  # the work directory; on a cluster, a path every node sees (shared storage)
    shard_chars: int = SHARD_CHARS  # a block closes once its documents hold this many chars
    allow_private_urls: bool = False  # the fetcher may reach private addresses
    token: str = ""  # the build's id, written in the work directory's marker
    keep_freed_memory: bool = True  # the driver's CITEQA_KEEP_FREED_MEMORY, for CPU embedders
    cwd: str = ""  # the driver's working directory: where relative source paths are

    @property
    def shards(self) -> Path:
        return Path(self.work) / "shards"

    @property
    def staging(self) -> Path:
        return Path(self.work) / "staging"


@dataclass(frozen=True)
class Staged:
    """A block after ``stage_item``: its shard is finished already (``staging`` empty) or
    waits in ``staging`` for its vectors."""

    item: int  # the source item's position in the build's plan
    block: int  # the block's position within its item
    key: str
    staging: str = ""


@dataclass(frozen=True)
class ShardResult:
    """A finished shard, as the executor reports it to the merge."""

    item: int
    block: int
    key: str
    passages: int
    embedded: bool  # embedded in this run (False: a previous run had finished it)


@dataclass
class Block:
    """Documents of one item, in order, and the item's unreadable parts met among them."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}
    chars: int = 0


@dataclass
class Shard:
    """A shard read back for the merge."""

    key: str
    documents: list[Document]
    skipped: list[dict[str, str]]
    spans: np.ndarray  # int64 [n, 2]
    passage_doc: np.ndarray  # int64 [n], rows of ``documents``
    counts: TermCounts
    vectors: np.ndarray | None  # float32 [n, dim]
    embedding: dict[str, Any] | None


# -- pure parts ---------------------------------------------------------------------------------


def blocks(entries: Iterable[Any], shard_chars: int) -> Iterator[Block]:
    """Cut an item's documents (and Skipped entries) into blocks of about ``shard_chars``
    characters, in order; an item with no document still gives one (empty) block, which
    carries its skipped entries to the merge."""
    block = Block()
    emitted = False
    for entry in entries:
        if isinstance(entry, Document):
            block.documents.append(entry)
            block.chars += len(entry.text)
            if block.chars >= shard_chars:
                yield block
                emitted, block = True, Block()
        else:  # a Skipped
            block.skipped.append({"source": entry.source, "reason": entry.reason})
    if block.documents or block.skipped or not emitted:
        yield block


def shard_key(block: Block, cfg: RetrievalConfig, item_source: str) -> str:
    """The content hash naming a block's shard (see the module docstring)."""
    h = hashlib.sha256()
    settings = {"format": SHARD_FORMAT, "tokenizer": TOKENIZER, "chunk": asdict(cfg.chunk),
                "dense": cfg.dense,
                "embedder": cfg.embedder if cfg.dense else None,
                "cpu_dtype": cfg.cpu_dtype if cfg.dense else None, "item": item_source}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for d in block.documents:
        h.update(json.dumps([d.doc_id, d.title, d.source, d.text], ensure_ascii=False).encode())
        h.update(b"\n")
    h.update(json.dumps(block.skipped, sort_keys=True).encode())
    return h.hexdigest()[:32]


def chunk_block(documents: list[Document], cfg: RetrievalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Passage spans int64 [n, 2] and their document rows int64 [n], as the local build makes
    them (``builder.build_index_from_documents``)."""
    spans: list[tuple[int, int]] = []
    rows: list[int] = []
    for row, doc in enumerate(documents):
        for span in passage_spans(doc, cfg.chunk):
            spans.append(span)
            rows.append(row)
    return (np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(rows, dtype=np.int64))


def passage_texts(documents: list[Document], spans: np.ndarray, rows: np.ndarray) -> list[str]:
    """What BM25 and the embedder see for each passage (``builder.indexed_text``)."""
    return [indexed_text(documents[r].title, documents[r].text[s:e])
            for (s, e), r in zip(spans.tolist(), rows.tolist(), strict=True)]


# -- files --------------------------------------------------------------------------------------


def write_marker(job: ShardJob) -> None:
    """Create the work directory and its marker (the build's token)."""
    Path(job.work).mkdir(parents=True, exist_ok=True)
    (Path(job.work) / MARKER).write_text(json.dumps({"token": job.token}), encoding="utf-8")


def check_marker(job: ShardJob) -> None:
    """Fail clearly when a worker does not see the driver's work directory (a cluster whose
    nodes do not share the storage it is on)."""
    try:
        token = json.loads((Path(job.work) / MARKER).read_text(encoding="utf-8")).get("token")
    except (OSError, ValueError):
        token = None
    if token != job.token:
        raise ConfigError(
            f"a build worker on {os.uname().nodename} does not see the work directory "
            f"{job.work}; on a cluster, pass --work-dir on storage every node mounts at the "
            "same path (NFS, a shared volume)"
        )


def is_finished(job: ShardJob, key: str) -> bool:
    return (job.shards / key / SHARD_JSON).is_file()


def stage_item(item_index: int, entries: Iterable[Any], item_source: str,
               job: ShardJob) -> Iterator[Staged]:
    """Cut one item's entries (``ingest.load_item``) into blocks; write each block whose shard
    is not finished into a staging directory, all but its vectors."""
    check_marker(job)
    for b, block in enumerate(blocks(entries, job.shard_chars)):
        key = shard_key(block, job.cfg, item_source)
        if is_finished(job, key):
            yield Staged(item_index, b, key)
            continue
        staging = job.staging / f"{key}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        spans, rows = chunk_block(block.documents, job.cfg)
        counts = count_terms(tokenize(t) for t in passage_texts(block.documents, spans, rows))
        with full_disk_named(staging):
            _write_staged(staging, block, spans, rows, counts)
        yield Staged(item_index, b, key, str(staging))


def _write_staged(directory: Path, block: Block, spans: np.ndarray, rows: np.ndarray,
                  counts: TermCounts) -> None:
    write_documents(directory / "documents.jsonl", block.documents)
    np.save(directory / "passages.npy", spans)
    np.save(directory / "passage_doc.npy", rows)
    (directory / "terms.json").write_text(json.dumps(counts.vocab, ensure_ascii=False),
                                          encoding="utf-8")
    for name, array in zip(_COUNT_ARRAYS, (counts.indptr, counts.terms, counts.counts,
                                           counts.doc_len), strict=True):
        np.save(directory / f"{name}.npy", array)
    (directory / "skipped.json").write_text(json.dumps(block.skipped, ensure_ascii=False),
                                            encoding="utf-8")


def finish_shard(staged: Staged, job: ShardJob, embedder: Embedder | None, *,
                 progress: bool = False) -> ShardResult:
    """Embed a staged block's passages and move it into ``shards/`` (a finished shard is
    passed through). ``embedder`` may be None when the build has no dense part;
    ``progress``: a bar of the passages embedded (a default shard takes minutes on a CPU)."""
    final = job.shards / staged.key
    if not staged.staging:
        meta = json.loads((final / SHARD_JSON).read_text(encoding="utf-8"))
        return ShardResult(staged.item, staged.block, staged.key, meta["passages"], False)
    directory = Path(staged.staging)
    documents = read_documents(directory / "documents.jsonl")
    spans, rows = np.load(directory / "passages.npy"), np.load(directory / "passage_doc.npy")
    embedding = None
    if job.cfg.dense:
        if embedder is None:
            raise ConfigError("this build has a dense part: finishing a shard needs an embedder")
        texts = passage_texts(documents, spans, rows)
        vectors = embedder.embed(texts, batch_size=job.cfg.embed_batch_size,
                                 progress=progress)  # [n, dim]
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), embedder.dim)
        with full_disk_named(directory):
            np.save(directory / "vectors.npy", vectors)
        embedding = embedding_record(embedder, job.cfg)
    meta = {"format": SHARD_FORMAT, "key": staged.key, "documents": len(documents),
            "passages": int(len(spans)), "embedding": embedding}
    (directory / SHARD_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for path in [*directory.iterdir(), directory]:  # on disk before it is called finished:
        fsync_path(path)  # a power cut must not leave a finished name on truncated files
    job.shards.mkdir(parents=True, exist_ok=True)
    try:
        directory.rename(final)
    except OSError:  # a retried task finished this shard first: its copy is as good
        if not is_finished(job, staged.key):
            raise
        shutil.rmtree(directory, ignore_errors=True)
    fsync_path(job.shards)
    test_pause("shard_written")
    return ShardResult(staged.item, staged.block, staged.key, int(len(spans)), True)


def read_shard(directory: Path) -> Shard:
    """Read a finished shard; IndexError_ (saying to delete it) when it is damaged."""
    try:
        meta = json.loads((directory / SHARD_JSON).read_text(encoding="utf-8"))
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"shard format {meta.get('format')!r}, expected {SHARD_FORMAT}")
        documents = read_documents(directory / "documents.jsonl")
        spans = np.load(directory / "passages.npy")
        rows = np.load(directory / "passage_doc.npy")
        arrays = {name: np.load(directory / f"{name}.npy") for name in _COUNT_ARRAYS}
        counts = TermCounts(json.loads((directory / "terms.json").read_text(encoding="utf-8")),
                            arrays["doc_len"], arrays["term_indptr"], arrays["term_ids"],
                            arrays["term_counts"])
        vectors = (np.load(directory / "vectors.npy") if (directory / "vectors.npy").is_file()
                   else None)
        skipped = json.loads((directory / "skipped.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise IndexError_(f"shard {directory} is damaged ({e})") from e
    n = len(spans)
    if (meta["passages"] != n or len(rows) != n or len(counts.doc_len) != n
            or (vectors is not None and len(vectors) != n)):
        raise IndexError_(f"shard {directory} is inconsistent (its files disagree on the "
                          "passage count)")
    return Shard(meta["key"], documents, skipped, spans, rows, counts, vectors,
                 meta.get("embedding"))

