"""Live index updates: add or remove documents, producing a new index directory.

``apply_update(index, update, out, embedder)`` is the whole story: the surviving passages keep
their text and their dense vectors, new documents are chunked with the settings the index was
built with and only their passages are embedded and tokenized. An index that only grows has
the new vectors added to a copy of its dense index; after a removal an HNSW index marks the
removed passages' rows (its graph is built again only once a tenth of its rows are removed:
``DenseIndex.without``), and a flat or IVF index is refilled with the surviving vectors (read
back from FAISS with ``reconstruct_n``) in the same kind and parameters (IVF keeps its trained
centroids). BM25 is derived again from the term counts the index stores (every passage is tokenized
again only for an index written before it stored them). Then every file is written beside
``out`` and swapped in with the same atomic swap as ``citeqa index build`` (see
store.py). It returns the new in-memory ``Index``; the caller swaps its retriever. A failure or
a kill at any point leaves a complete index on disk (the old one, or the new one once swapped
in).

Updates must not run concurrently on the same ``out``: the caller serialises them (the service
runs them on one thread).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.config import RetrievalConfig
from citeqa.errors import IndexError_, InvalidRequestError
from citeqa.ingest import page_key
from citeqa.retrieval.bm25 import BM25Index, concat_counts, count_terms
from citeqa.retrieval.builder import indexed_text
from citeqa.retrieval.chunk import passage_spans
from citeqa.retrieval.embed import Embedder
from citeqa.retrieval.retriever import config_from_manifest
from citeqa.retrieval.store import Index, is_copy_of, passages_of, save_index
from citeqa.text import TOKENIZER, is_blank, tokenize
from citeqa.types import Document

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexUpdate:
    """Documents to add (appended, in order) and doc ids to remove."""

    add: tuple[Document, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpdateResult:
    """The new index and how many passages each added document became."""

    index: Index
    added_passages: dict[str, int]  # doc_id -> passages, for each added document


@dataclass(frozen=True)
class AddPlan:
    """What adding documents to an index does to each (``plan_additions``)."""

    update: IndexUpdate  # the new documents, and changed ones replacing their indexed versions
    new: tuple[str, ...] = ()  # doc ids the index does not hold
    replaced: tuple[str, ...] = ()  # ... that it holds with other content (replace=True)
    unchanged: tuple[str, ...] = ()  # ... that it holds exactly so: left alone
    conflicts: tuple[str, ...] = ()  # ... that it holds with other content (replace=False)
    # (new doc id, indexed doc id) of a new document whose title and text an indexed one has
    # under another id: the same file named by another path (a file's id hashes its path)?
    lookalikes: tuple[tuple[str, str], ...] = ()
    # (new doc id, indexed doc id) of a fetched page an indexed document's source names under
    # another id (another spelling of its URL, a fragment, a redirect): left out, as a build
    # and the service leave a page's second URL out
    same_page: tuple[tuple[str, str], ...] = ()


def plan_additions(indexed: Mapping[str, Document], documents: Sequence[Document], *,
                   replace: bool = False, fetched: Collection[str] = ()) -> AddPlan:
    """How to add ``documents`` to an index holding ``indexed`` (doc id -> document): a
    document the index holds exactly as given is left alone (so adding the same sources again,
    as after a crash, changes nothing); one it holds with other content (an edited file) is
    replaced when ``replace``, else a conflict and nothing is planned for it. A new document
    whose id is in ``fetched`` (a page fetched from a URL) is left out where an indexed
    document's source is the same page (``page_key``)."""
    new, replaced, unchanged, conflicts, add = [], [], [], [], []
    lookalikes: list[tuple[str, str]] = []
    same_page: list[tuple[str, str]] = []
    by_content: dict[tuple[str, str], str] | None = None  # built at the first new document
    by_page: dict[str, str] | None = None  # ... at the first new fetched page
    for doc in documents:
        old = indexed.get(doc.doc_id)
        if old is None and doc.doc_id in fetched:
            if by_page is None:  # (the first document from a page, as the service finds)
                by_page = {}
                for d in indexed.values():
                    by_page.setdefault(page_key(d.source), d.doc_id)
            if (holder := by_page.get(page_key(doc.source))) is not None:
                same_page.append((doc.doc_id, holder))
                continue
        if old is None:
            new.append(doc.doc_id)
            if by_content is None:
                by_content = {(d.title, d.text): d.doc_id for d in indexed.values()}
            if (twin := by_content.get((doc.title, doc.text))) is not None:
                lookalikes.append((doc.doc_id, twin))
        elif old == doc:
            unchanged.append(doc.doc_id)
            continue
        elif replace:
            replaced.append(doc.doc_id)
        else:
            conflicts.append(doc.doc_id)
            continue
        add.append(doc)
    return AddPlan(IndexUpdate(add=tuple(add), remove=tuple(replaced)), tuple(new),
                   tuple(replaced), tuple(unchanged), tuple(conflicts), tuple(lookalikes),
                   tuple(same_page))


def check_update(index: Index, update: IndexUpdate) -> None:
    """Refuse an update that names unknown, duplicate or all documents (InvalidRequestError
    with the HTTP status the API returns: 404 unknown, 409 conflict, 422 empty text)."""
    for doc_id in update.remove:
        if doc_id not in index.documents:
            raise InvalidRequestError(f"no document with id {doc_id!r}", status=404,
                                      code="document_not_found")
    seen: set[str] = set()
    for doc in update.add:
        if doc.doc_id in seen:
            raise InvalidRequestError(
                f"two documents to add have the id {doc.doc_id!r}; give each its own doc_id",
                status=409,
                code="conflict",
            )
        if doc.doc_id in index.documents and doc.doc_id not in update.remove:
            raise InvalidRequestError(
                f"a document with id {doc.doc_id!r} already exists; delete it first or choose "
                "another doc_id",
                status=409,
                code="conflict",
            )
        seen.add(doc.doc_id)
        if is_blank(doc.text):  # whitespace or invisible characters only
            raise InvalidRequestError(f"document {doc.doc_id!r} has no text; send some text")
    if not update.add and len(set(update.remove)) >= len(index.documents):
        raise InvalidRequestError(
            "an index needs at least one document; add another before deleting the last one",
            status=409,
            code="conflict",
        )


def _updated_bm25(old: BM25Index, keep_ids: np.ndarray, new_texts: Sequence[str],
                  docs: Sequence[Document], spans: Sequence[tuple[int, int]],
                  passage_doc: Sequence[int], cfg: RetrievalConfig) -> BM25Index:
    """The BM25 index of the kept passages ``keep_ids`` of ``old`` followed by the passages
    ``new_texts``: from ``old``'s stored term counts when it has them (and was tokenized as
    today), tokenizing only the new passages; else by tokenizing every passage (``spans`` of
    ``docs`` by ``passage_doc``), which also brings an older tokenizer's index up to date."""
    params: dict[str, Any] = {"k1": cfg.bm25_k1, "b": cfg.bm25_b, "epsilon": cfg.bm25_epsilon}
    if old.counts is not None and old.tokenizer == TOKENIZER:
        added = count_terms(tokenize(t) for t in new_texts)
        return BM25Index.from_counts(concat_counts([old.counts_of(keep_ids), added]), **params)
    texts = (indexed_text(docs[row].title, docs[row].text[s:e])
             for (s, e), row in zip(spans, passage_doc, strict=True))
    return BM25Index.build((tokenize(t) for t in texts), **params)


def apply_update(
    index: Index,
    update: IndexUpdate,
    out: Path,
    *,
    embedder: Embedder | None = None,
    cfg: RetrievalConfig | None = None,
    progress: bool = False,
) -> UpdateResult:
    """Write ``index`` with ``update`` applied to ``out`` (atomically) and return it loaded.

    embedder: embeds the new passages; required when the index has a dense part and documents
        are added. It must be the one the index was built with (checked against the manifest).
    cfg: chunking and BM25 settings; default the ones recorded in the index's manifest (new
        documents must be chunked like the old ones).
    progress: show a bar while the new passages are embedded.
    """
    check_update(index, update)
    cfg = cfg or config_from_manifest(index.manifest["settings"])
    removed = set(update.remove)
    old_docs = [d for d in index.documents.values() if d.doc_id not in removed]
    docs = [*old_docs, *update.add]
    row_of = {d.doc_id: row for row, d in enumerate(docs)}

    # Surviving passages, in their old order (passage ids are renumbered densely).
    kept = [p for p in index.passages if p.doc_id not in removed]
    keep_ids = np.asarray([p.passage_id for p in kept], dtype=np.int64)
    spans = [(p.start, p.end) for p in kept]
    passage_doc = [row_of[p.doc_id] for p in kept]
    added_passages: dict[str, int] = {}
    new_texts: list[str] = []
    for doc in update.add:
        doc_spans = passage_spans(doc, cfg.chunk)
        if not doc_spans:
            raise InvalidRequestError(f"document {doc.doc_id!r} has no text to index")
        added_passages[doc.doc_id] = len(doc_spans)
        spans.extend(doc_spans)
        passage_doc.extend([row_of[doc.doc_id]] * len(doc_spans))
        new_texts.extend(indexed_text(doc.title, doc.text[s:e]) for s, e in doc_spans)

    bm25 = _updated_bm25(index.bm25, keep_ids, new_texts, docs, spans, passage_doc, cfg)
    dense, embedding = None, index.manifest.get("embedding")
    if index.dense is not None:
        vectors = np.zeros((0, index.dense.dim), np.float32)
        if new_texts:
            if embedder is None:
                raise IndexError_(
                    "this index has a dense part: adding documents needs its embedder"
                )
            if embedding is None or (embedder.model_id, embedder.dim) != (
                embedding.get("model_id"), embedding.get("dim")
            ):
                emb = embedding or {}
                raise IndexError_(
                    f"the index was embedded with {emb.get('model_id')} (dim {emb.get('dim')}), "
                    f"not {embedder.model_id} (dim {embedder.dim}); add documents with the same "
                    "embedder or rebuild the index"
                )
            fresh = embedder.embed(new_texts, batch_size=cfg.embed_batch_size,
                                   progress=progress)  # [new, dim]
            vectors = fresh.astype(np.float32)
        # same kind and parameters (IVF: centroids); the survivors' rows are not built again
        # (an HNSW graph of a million vectors takes many minutes to build), the new ones added
        dense = index.dense.without(np.setdiff1d(np.arange(len(index.passages)), keep_ids))
        if len(vectors):
            dense = dense.extended(vectors)

    spans_arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    passage_doc_arr = np.asarray(passage_doc, dtype=np.int64)
    out = Path(out)
    manifest = save_index(
        out,
        # an update of the index it loaded: refused if another writer changed it meanwhile
        expect=index.manifest if index.directory is not None
        and is_copy_of(index.directory, out) else None,
        documents=docs,
        spans=spans_arr,
        passage_doc=passage_doc_arr,
        bm25=bm25,
        dense=dense,
        embedding=embedding if dense is not None else None,
        cfg=cfg,
    )
    log.info("index %s updated: +%d -%d documents, %d passages", out, len(update.add),
             len(removed), len(spans))
    new_index = Index(
        documents={d.doc_id: d for d in docs},
        passages=passages_of(docs, spans, passage_doc),
        manifest=manifest,
        bm25=bm25,
        dense=dense,
        directory=out,
    )
    return UpdateResult(new_index, added_passages)


def add_documents(
    index: Index, documents: Sequence[Document], out: Path, *, embedder: Embedder | None = None
) -> UpdateResult:
    """``apply_update`` adding ``documents``."""
    return apply_update(index, IndexUpdate(add=tuple(documents)), out, embedder=embedder)


def remove_documents(index: Index, doc_ids: Sequence[str], out: Path) -> UpdateResult:
    """``apply_update`` removing ``doc_ids``."""
    return apply_update(index, IndexUpdate(remove=tuple(doc_ids)), out)
