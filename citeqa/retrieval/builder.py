"""Building an index: sources -> documents -> passages -> BM25 + dense -> an index directory.

The directory is written beside ``out`` and swapped in atomically (see store.py), so a failed
or killed build leaves the previous index in place.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from citeqa.config import RetrievalConfig
from citeqa.errors import EmptyCorpusError
from citeqa.retrieval.bm25 import BM25Index
from citeqa.retrieval.chunk import passage_spans
from citeqa.retrieval.dense import DenseIndex, DenseSpec
from citeqa.retrieval.embed import Embedder, load_embedder
from citeqa.retrieval.store import check_documents, check_replaceable, save_index
from citeqa.text import is_blank, tokenize
from citeqa.types import Document

if TYPE_CHECKING:
    from citeqa.ingest import Skipped
    from citeqa.ingest.sources import Sources

# What index build reads, for error messages (see citeqa/ingest/sources.py).
SUPPORTED = "text, markdown, HTML, JSON/JSONL or SQuAD JSON"


def no_documents(n_sources: int, skipped: Sequence[Skipped]) -> EmptyCorpusError:
    """The error for sources of which none produced a document, with the first reasons."""
    reasons = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:5])
    return EmptyCorpusError(
        f"no documents: none of the {n_sources} sources produced one"
        + (f" ({reasons})" if reasons else "")
        + f"; pass {SUPPORTED} files, folders holding them, or http(s) URLs"
    )


log = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    documents: int  # documents indexed (after dropping duplicate doc ids)
    passages: int
    skipped: list[Skipped] = field(default_factory=list)  # sources that produced no document
    seconds: float = 0.0  # wall time of the whole build
    out: Path = Path()
    shards: int = 0  # sharded builds (citeqa.distributed): shards merged
    shards_reused: int = 0  # ... of which a previous, interrupted run had finished
    # the sources of each group of documents indexed with one text (``twins``)
    twins: list[tuple[str, ...]] = field(default_factory=list)


def dense_spec_for(cfg: RetrievalConfig, spec: DenseSpec | None = None) -> DenseSpec:
    """The dense index to build: ``spec`` when given, else the RetrievalConfig's kind."""
    return spec if spec is not None else DenseSpec(kind=cfg.faiss_index, hnsw_m=cfg.hnsw_m)


def indexed_text(title: str, passage: str) -> str:
    """What BM25 and the embedder see for a passage: its document title, then its text."""
    return f"{title}\n{passage}" if title else passage


def build_index(
    sources: Sources,
    out: Path,
    cfg: RetrievalConfig,
    *,
    allow_private_urls: bool = False,
    progress: bool = True,
    dense_spec: DenseSpec | None = None,
    only_if_missing: bool = False,
) -> BuildSummary:
    """Load ``sources`` (files, folders, URLs) and build an index at ``out``.

    Sources that cannot be read are skipped and listed in the summary; EmptyCorpusError when
    none yields a document. ``dense_spec``: the dense index's kind and parameters (default:
    ``cfg.faiss_index``). ``only_if_missing``: see ``store.publish``.
    """
    from citeqa.ingest import Fetcher, FetchPolicy, load_sources
    from citeqa.ingest.sources import as_sources

    t0 = time.perf_counter()
    sources = as_sources(sources)
    check_replaceable(Path(out))  # before hours of loading and embedding, not at the swap
    fetcher = Fetcher(FetchPolicy(allow_private=allow_private_urls))
    loaded = load_sources(sources, fetcher=fetcher, progress=progress)
    if not loaded.documents:
        raise no_documents(len(sources), loaded.skipped)
    summary = build_index_from_documents(
        loaded.documents, out, cfg, skipped=loaded.skipped, progress=progress,
        dense_spec=dense_spec, only_if_missing=only_if_missing,
    )
    summary.seconds = time.perf_counter() - t0
    return summary


def build_index_from_documents(
    documents: Sequence[Document],
    out: Path,
    cfg: RetrievalConfig,
    *,
    skipped: Sequence[Skipped] = (),
    progress: bool = True,
    embedder: Embedder | None = None,
    dense_spec: DenseSpec | None = None,
    only_if_missing: bool = False,
) -> BuildSummary:
    """Chunk, index and atomically write ``documents`` to ``out`` (less blank ones and second
    ones of an id, each skipped with a warning).

    ``embedder`` overrides ``cfg.embedder`` (tests pass fakes); it is unused when
    ``cfg.dense`` is False. ``only_if_missing``: see ``store.publish``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_replaceable(out)
    documents = list(documents)  # (read twice)
    check_documents(documents)
    if not documents:
        raise EmptyCorpusError(
            f"no documents to index; pass {SUPPORTED} files, folders holding them, or http(s) URLs"
        )
    docs = _indexable(documents)
    spans, passage_doc = [], []
    chunking = tqdm(docs, desc="chunking", unit="doc", disable=not progress, file=sys.stderr)
    for row, doc in enumerate(chunking):
        for span in passage_spans(doc, cfg.chunk):
            spans.append(span)
            passage_doc.append(row)
    if not spans:
        raise EmptyCorpusError(
            f"the {len(documents)} documents hold no text to index; check that the sources are "
            "not empty or whitespace only"
        )
    texts = [
        indexed_text(docs[row].title, docs[row].text[s:e])
        for (s, e), row in zip(spans, passage_doc, strict=True)
    ]
    log.info("indexing %d documents as %d passages", len(docs), len(spans))
    words = tqdm(texts, desc="BM25", unit="passage", disable=not progress, file=sys.stderr)
    bm25 = BM25Index.build(
        (tokenize(t) for t in words), k1=cfg.bm25_k1, b=cfg.bm25_b, epsilon=cfg.bm25_epsilon
    )
    dense, embedding = None, None
    if cfg.dense:
        embedder = embedder or load_embedder(cfg.embedder, cpu_dtype=cfg.cpu_dtype)
        vectors = embedder.embed(texts, batch_size=cfg.embed_batch_size, progress=progress)
        spec = dense_spec_for(cfg, dense_spec).resolved(len(vectors))
        if spec.kind != "flat":  # the graph or the cells take a while (minutes at a million)
            log.info("building the %s dense index over %d vectors ...", spec.kind, len(vectors))
        dense = DenseIndex.build(vectors, spec=dense_spec_for(cfg, dense_spec))
        embedding = embedding_record(embedder, cfg)
    log.info("writing the index to %s", out)
    save_index(
        out,
        documents=docs,
        spans=np.asarray(spans, dtype=np.int64),
        passage_doc=np.asarray(passage_doc, dtype=np.int64),
        bm25=bm25,
        dense=dense,
        embedding=embedding,
        cfg=cfg,
        only_if_missing=only_if_missing,
    )
    return BuildSummary(
        documents=len(docs),
        passages=len(spans),
        skipped=list(skipped),
        seconds=time.perf_counter() - t0,
        out=out,
        twins=twins(docs),
    )


def embedding_record(embedder: Embedder, cfg: RetrievalConfig) -> dict[str, Any]:
    """The manifest's ``embedding``: what a query embedder must match."""
    return {"model_id": embedder.model_id, "dim": embedder.dim, "name": cfg.embedder,
            "dtype": getattr(embedder, "dtype", "fp32")}


def twins(documents: Sequence[Document]) -> list[tuple[str, ...]]:
    """The sources of each group of ``documents`` that share one text (the first one's first),
    in the order their first ones come: a file copied, a page under two URLs, records repeated.
    All are indexed (a search shows one copy of a passage: ``HybridRetriever``)."""
    groups: dict[str, list[str]] = {}
    for d in documents:
        if d.text.strip():
            groups.setdefault(d.text, []).append(d.source)
    return [tuple(sources) for sources in groups.values() if len(sources) > 1]


def _indexable(documents: Sequence[Document]) -> list[Document]:
    """``documents`` less blank ones (whitespace or invisible characters only, as a file of
    them is skipped when sources are read and ``index add`` refuses one) and second ones of
    an id, each skipped with a warning."""
    seen: set[str] = set()
    out = []
    for d in documents:
        if d.doc_id in seen:
            log.warning("skipping a second document with id %s (%s)", d.doc_id, d.source)
            continue
        if is_blank(d.text):
            log.warning("skipping document %s (%s): it has no text", d.doc_id, d.source)
            continue
        seen.add(d.doc_id)
        out.append(d)
    return out
