"""Hybrid retrieval over a loaded index: BM25 and dense rankings fused by reciprocal rank.

Implements the ``Retriever`` protocol of citeqa/retrieval/base.py. Each retriever contributes
its best ``cfg.candidates_per_retriever`` passages to the fusion; a passage no query term
matches is never a BM25 hit.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import ConfigError, IndexError_, InvalidRequestError
from citeqa.retrieval.embed import Embedder, load_embedder
from citeqa.retrieval.fusion import rrf
from citeqa.retrieval.store import Index
from citeqa.text import tokenize
from citeqa.types import Document, Hit

log = logging.getLogger(__name__)

MODES = ("hybrid", "bm25", "dense")
_FUSION_MODE = {"rrf": "hybrid", "bm25": "bm25", "dense": "dense"}
# a passage's copies are looked up across the index (``_copies``) where its rarest term is in
# at most COPIES_POSTINGS passages and at most COPIES_READ hold all its terms
COPIES_POSTINGS = 1 << 14
COPIES_READ = 256


def config_from_manifest(settings: dict[str, Any]) -> RetrievalConfig:
    """The RetrievalConfig recorded in a manifest (unknown keys from newer versions dropped)."""
    known = {f.name for f in fields(RetrievalConfig)}
    values = {k: v for k, v in settings.items() if k in known}
    chunk_known = {f.name for f in fields(ChunkConfig)}
    try:
        chunk = values.get("chunk") or {}
        if not isinstance(chunk, dict):
            raise ConfigError(f"chunk is {chunk!r}, not an object")
        values["chunk"] = ChunkConfig(**{k: v for k, v in chunk.items() if k in chunk_known})
        return RetrievalConfig(**values)
    except (ConfigError, TypeError) as e:
        raise IndexError_(f"the index's recorded settings are not valid ({e}); rebuild the "
                          "index") from None


class HybridRetriever:
    """BM25 + dense retrieval with reciprocal-rank fusion over one index."""

    def __init__(
        self, index: Index, cfg: RetrievalConfig, embedder: Embedder | None = None
    ) -> None:
        self.index = index
        self.cfg = cfg
        self._embedder = embedder
        self._loading = threading.Lock()  # concurrent first searches load it once
        emb = index.manifest.get("embedding")
        if embedder is not None and index.dense is not None and emb is not None:
            _check_embedder(embedder, emb)

    @classmethod
    def open(cls, directory: Path, cfg: RetrievalConfig | None = None) -> HybridRetriever:
        """Load the index at ``directory``; ``cfg`` None means the settings it was built with."""
        index = Index.load(Path(directory))
        if cfg is not None and index.dense is not None:
            check_embedder_name(index, cfg, directory)
        return cls(index, cfg or config_from_manifest(index.manifest["settings"]))

    def with_index(self, index: Index) -> HybridRetriever:
        """A retriever over ``index`` (an updated copy of this one's, or the index its directory
        holds now) with the same settings and the same, already loaded, query embedder;
        IndexError_ when ``index`` was embedded with another model than that one."""
        if index.dense is not None and self.cfg.dense:
            check_embedder_name(index, self.cfg, index.directory)
        return HybridRetriever(index, self.cfg, self._embedder)  # checks a loaded embedder

    @property
    def embedder(self) -> Embedder:
        with self._loading:
            if self._embedder is None:
                emb = self.index.manifest.get("embedding") or {}
                embedder = load_embedder(emb.get("name", self.cfg.embedder),
                                         cpu_dtype=self.cfg.cpu_dtype)
                _check_embedder(embedder, emb)
                self._embedder = embedder
            return self._embedder

    def search(self, query: str, k: int = 10, *, mode: str | None = None) -> list[Hit]:
        """Best-first hits for ``query``: ``mode`` "hybrid" | "bm25" | "dense".

        ``mode`` None follows ``cfg.fusion`` ("rrf" is hybrid). An index without a dense part
        serves hybrid requests from BM25 alone.
        """
        mode = mode or _FUSION_MODE[self.cfg.fusion]
        if mode not in MODES:
            raise InvalidRequestError(f"unknown search mode {mode!r}; use one of {list(MODES)}")
        if k < 1:
            raise InvalidRequestError(f"k must be at least 1, got {k}")
        has_dense = self.index.dense is not None and self.cfg.dense
        if mode == "dense" and not has_dense:
            raise ConfigError(
                "this index has no dense part (built with dense=False or disabled in the "
                "settings); search with mode 'bm25' or rebuild without --bm25-only"
            )
        if mode == "hybrid" and not has_dense:
            mode = "bm25"
        # (a copy of a better hit is passed over, and the next one takes its place: one
        # retriever reads twice k, the fusion each one's candidates_per_retriever as before;
        # deeper while copies leave fewer than k and more is there: a footer on every page)
        depth = 2 * k if mode != "hybrid" else max(k, self.cfg.candidates_per_retriever)
        vector = self.embedder.embed([query]) if mode in ("dense", "hybrid") else None
        while True:
            bm25 = self._bm25(query, depth) if mode in ("bm25", "hybrid") else {}
            dense = self._dense(vector, depth) if vector is not None else {}
            if mode == "bm25":
                ranked = list(bm25.items())
            elif mode == "dense":
                ranked = list(dense.items())
            else:
                ranked = rrf([list(bm25), list(dense)], k=self.cfg.rrf_k,
                             weights=[self.cfg.rrf_bm25_weight, 1.0])
            chosen = self._distinct(ranked, k)
            if len(chosen) == k or (len(bm25) < depth and len(dense) < depth):
                break
            depth *= 4
        return [self._hit(pid, score, bm25.get(pid), dense.get(pid), fused=mode == "hybrid")
                for pid, score in chosen]

    def _distinct(self, ranked: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        """The first ``k`` of ``ranked`` whose passage's text (its words, spacing aside) is no
        better one's: a book's print.html repeats every chapter, and its copies took half the
        hits, and of the passages a question's generator was shown. Of copies, the one in the
        shortest document of the index takes the best one's place (a chapter, not the whole
        book: the more exact citation, and its title names the chapter), whatever ``k``; of a
        passage whose words are too common to look up (``_copies``), of those ranked."""
        seen: set[str] = set()
        out: list[tuple[int, float]] = []
        for pid, score in ranked:
            words = self._words(pid)
            if words in seen:
                continue
            if len(out) == k:
                break
            seen.add(words)
            copies = self._copies(pid, words)
            if copies is None:
                copies = [p for p, _ in ranked if self._words(p) == words]
            shown = min(copies, key=lambda p: (self._doc_chars(p), p != pid, p))
            out.append((shown, score))
        return out

    def _words(self, pid: int) -> str:
        return " ".join(self.index.passages[pid].text.split())

    def _copies(self, pid: int, words: str) -> list[int] | None:
        """The passages of the index whose words are ``words`` (``pid``'s), ``pid`` among them:
        those of the passages holding all of its terms (BM25's postings, rarest first) whose
        text has those words. A copy's title may differ, and with it its rank: a copy ranked
        past the k-th hit, or past what was read, is found all the same. None when its rarest
        term is in more than ``COPIES_POSTINGS`` passages, or more than ``COPIES_READ`` hold
        all its terms: reading them cost seconds a search at a million passages ("The cat
        sat.")."""
        bm25 = self.index.bm25
        terms = np.fromiter({i for t in tokenize(words, bm25.tokenizer)
                             if (i := bm25.term_ids.get(t)) is not None}, dtype=np.int64)
        if not len(terms):  # no term to look it up by: punctuation alone
            return [pid]
        starts, ends = bm25.indptr[terms], bm25.indptr[terms + 1]
        order = np.argsort(ends - starts, kind="stable")  # rarest first
        if ends[order[0]] - starts[order[0]] > COPIES_POSTINGS:
            return None
        rows = bm25.doc_ids[starts[order[0]]:ends[order[0]]]  # ascending, as every posting
        for t in order[1:]:
            if len(rows) <= 64:  # few enough to read their words
                break
            postings = bm25.doc_ids[starts[t]:ends[t]]
            at = np.minimum(np.searchsorted(postings, rows), len(postings) - 1)
            rows = rows[postings[at] == rows]
        if len(rows) > COPIES_READ:
            return None
        found = [int(r) for r in rows if self._words(int(r)) == words]
        return found if pid in found else [pid, *found]

    def _doc_chars(self, pid: int) -> int:
        return len(self.index.documents[self.index.passages[pid].doc_id].text)

    def document(self, doc_id: str) -> Document:
        """The full document ``doc_id``; KeyError when the index does not hold it."""
        return self.index.documents[doc_id]

    @property
    def index_version(self) -> str:
        return self.index.version

    def list_documents(self, offset: int, limit: int) -> tuple[list[Document], int]:
        """A page of the indexed documents and their total count (``Index.list_documents``)."""
        return self.index.list_documents(offset, limit)

    def _bm25(self, query: str, depth: int) -> dict[int, float]:
        """passage id -> BM25 score, best first; only passages some query term matches."""
        bm25 = self.index.bm25
        ids, scores = bm25.search(tokenize(query, bm25.tokenizer), depth)
        return dict(zip(ids.tolist(), scores.tolist(), strict=True))

    def _dense(self, vector: np.ndarray, depth: int) -> dict[int, float]:
        """passage id -> cosine similarity to the query's ``vector`` ([1, dim]), best first."""
        assert self.index.dense is not None
        ids, scores = self.index.dense.search(vector, depth)
        return {i: s for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True) if i >= 0}

    def _hit(self, pid: int, score: float, bm25: float | None, dense: float | None, *,
             fused: bool) -> Hit:
        passage = self.index.passages[pid]
        doc = self.index.documents[passage.doc_id]
        return Hit(
            passage=passage,
            title=doc.title,
            source=doc.source,
            score=float(score),
            bm25=bm25,
            dense=dense,
            fused=fused,
        )


def check_embedder_name(index: Index, cfg: RetrievalConfig, directory: Path | None) -> None:
    """IndexError_ when ``index`` (with a dense part) was embedded by another embedder than
    ``cfg`` names: its queries would be embedded by a model its vectors never met."""
    built = config_from_manifest(index.manifest["settings"])
    if cfg.embedder == built.embedder:
        return
    from citeqa.config import PRESETS

    fits = [name for name, c in PRESETS.items() if c.retrieval.embedder == built.embedder]
    hint = (f"use --preset {fits[0]} (or CITEQA_PRESET={fits[0]}), or rebuild the index with "
            "the preset you use" if fits else "rebuild the index or use matching settings")
    raise IndexError_(f"index {directory} was built with the {built.embedder!r} embedder but "
                      f"the settings ask for {cfg.embedder!r}; {hint}")


def _check_embedder(embedder: Embedder, emb: dict[str, Any]) -> None:
    if (embedder.model_id, embedder.dim) != (emb.get("model_id"), emb.get("dim")):
        raise IndexError_(
            f"the index was embedded with {emb.get('model_id')} (dim {emb.get('dim')}) but the "
            f"query embedder is {embedder.model_id} (dim {embedder.dim}); rebuild the index or "
            "use the same embedder"
        )
