"""Merging shards into one index: what makes a sharded build equal to a local build.

Shards are read in plan order (source item, then block), which is the order the local build
reads documents in; a document whose id an earlier one took is dropped with its passages, as
``load_sources`` drops it; BM25 is built from the shards' term counts concatenated
(``bm25.concat_counts``), which gives the arrays a one-pass count of the same passages gives;
the vectors are stacked in passage order and indexed as the dense spec says. The result goes
through the same ``save_index`` (and atomic swap) as a local build.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from citeqa.config import RetrievalConfig
from citeqa.errors import EmptyCorpusError, IndexError_
from citeqa.ingest import Kept, Skipped
from citeqa.retrieval.bm25 import BM25Index, TermCounts, concat_counts
from citeqa.retrieval.builder import no_documents
from citeqa.retrieval.dense import DenseIndex, DenseSpec
from citeqa.retrieval.shards import Shard
from citeqa.retrieval.store import save_index
from citeqa.types import Document

log = logging.getLogger(__name__)


@dataclass
class Merged:
    """The shards of a build, stitched into the parts of one index."""

    documents: list[Document] = field(default_factory=list)
    spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [N, 2]
    passage_doc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N]
    counts: TermCounts | None = None
    vectors: np.ndarray | None = None  # float32 [N, dim]
    embedding: dict[str, Any] | None = None
    skipped: list[Skipped] = field(default_factory=list)


def merge_shards(shards: Iterable[Shard], *, dense: bool,
                 urls: Iterable[str | None] | None = None) -> Merged:
    """Stitch ``shards`` (in plan order) together; ``dense``: the build embeds passages, so
    every shard must carry vectors from one embedder. ``urls``: per shard, the URL its item was
    fetched from (None: a file), so that two URLs leading to one page give one document, as
    ``load_sources`` keeps it."""
    merged = Merged()
    kept = Kept()  # as load_sources keeps them
    spans, rows, counts, vectors = [], [], [], []
    for shard, url in zip(shards, urls if urls is not None else repeat(None), strict=False):
        merged.skipped.extend(Skipped(s["source"], s["reason"]) for s in shard.skipped)
        new_row = np.full(len(shard.documents), -1, dtype=np.int64)
        for r, doc in enumerate(shard.documents):
            if (skip := kept.skip(doc, url)) is not None:
                merged.skipped.append(skip)
                continue
            new_row[r] = len(merged.documents)
            merged.documents.append(doc)
        global_rows = new_row[shard.passage_doc]
        keep = np.flatnonzero(global_rows >= 0)
        spans.append(shard.spans[keep])
        rows.append(global_rows[keep])
        counts.append(shard.counts if len(keep) == len(global_rows)
                      else shard.counts.select(keep))
        if dense and len(shard.spans):
            merged.embedding = _same_embedding(merged.embedding, shard)
            assert shard.vectors is not None
            vectors.append(shard.vectors[keep])
    merged.spans = np.concatenate(spans) if spans else merged.spans
    merged.passage_doc = np.concatenate(rows) if rows else merged.passage_doc
    merged.counts = concat_counts(counts)
    if dense and vectors:
        merged.vectors = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
    return merged


def _same_embedding(seen: dict[str, Any] | None, shard: Shard) -> dict[str, Any]:
    emb = shard.embedding
    if shard.vectors is None or emb is None:
        raise IndexError_(f"shard {shard.key} has no vectors but the build has a dense part; "
                          "delete the build's work directory and rebuild")
    if seen is not None and (emb["model_id"], emb["dim"]) != (seen["model_id"], seen["dim"]):
        raise IndexError_(f"shards were embedded by different models ({seen['model_id']} and "
                          f"{emb['model_id']}); delete the build's work directory and rebuild")
    if seen is not None and emb.get("dtype") != seen.get("dtype"):
        log.warning("shards computed in %s and %s (CPU and GPU workers); the manifest records "
                    "%s", seen.get("dtype"), emb.get("dtype"), seen.get("dtype"))
    return seen if seen is not None else emb


def write_merged(merged: Merged, out: Path, cfg: RetrievalConfig, spec: DenseSpec, *,
                 n_sources: int, progress: bool = True,
                 only_if_missing: bool = False) -> dict[str, Any]:
    """Build BM25 and the dense index from ``merged`` and swap the index in at ``out``
    (``store.save_index``, with ``only_if_missing``); EmptyCorpusError, as the local build
    raises it, when there is nothing to index. Returns the manifest."""
    if not merged.documents:
        raise no_documents(n_sources, merged.skipped)
    if not len(merged.spans):
        raise EmptyCorpusError(
            f"the {len(merged.documents)} documents hold no text to index; check that the "
            "sources are not empty or whitespace only"
        )
    assert merged.counts is not None
    with tqdm(total=2 if cfg.dense else 1, desc="merging: BM25, dense index", unit="part",
              disable=not progress) as bar:
        bm25 = BM25Index.from_counts(merged.counts, k1=cfg.bm25_k1, b=cfg.bm25_b,
                                     epsilon=cfg.bm25_epsilon)
        bar.update()
        dense = None
        if cfg.dense:
            assert merged.vectors is not None, "a dense build merged no vectors"
            dense = DenseIndex.build(merged.vectors, spec=spec)
            bar.update()
    return save_index(out, documents=merged.documents, spans=merged.spans,
                      passage_doc=merged.passage_doc, bm25=bm25, dense=dense,
                      embedding=merged.embedding if dense is not None else None, cfg=cfg,
                      only_if_missing=only_if_missing)
