"""Mutation-testing round on the retrieval core (bm25, chunk, store, dense, shards, builder):
boundaries and branches the other tests left open (73 mutants, 39 survived the suite, 37 killed
here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import IndexError_, InvalidRequestError
from citeqa.retrieval import HashEmbedder, Index, build_index_from_documents, store
from citeqa.retrieval.bm25 import BM25Index
from citeqa.retrieval.builder import embedding_record, indexed_text
from citeqa.retrieval.chunk import _is_rule, chunk_document
from citeqa.retrieval.dense import DenseIndex, DenseSpec, _ties_by_id, spec_of
from citeqa.retrieval.shards import (
    ShardJob,
    Staged,
    blocks,
    finish_shard,
    read_shard,
    shard_key,
    stage_item,
    write_marker,
)
from citeqa.types import MAX_DOC_ID_CHARS, Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))
DOCS = [Document("a", "A", "a.txt", "Granite is an igneous rock. It is hard."),
        Document("b", "B", "b.txt", "Basalt is a volcanic rock. It is dark.")]

# --- bm25: a saved index's checks at their boundaries -------------------------------------------


def _saved(tmp_path: Path, **params: float) -> Path:
    corpus = [["a", "b"], ["a", "c"], ["b", "c", "c"]]
    BM25Index.build(corpus, **params).save(tmp_path / "bm25")
    return tmp_path / "bm25"


def _edit_array(d: Path, name: str, edit: Any) -> None:
    a = np.load(d / f"{name}.npy")
    np.save(d / f"{name}.npy", edit(a))


def _edit_params(d: Path, **changes: Any) -> None:
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**p, **changes}))


def test_a_posting_naming_the_passage_one_past_the_last_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_array(d, "doc_ids", lambda a: np.where(a == a.max(), 3, a).astype(a.dtype))  # n_docs
    with pytest.raises(IndexError_, match="a posting names a passage outside 0..2"):
        BM25Index.load(d)


def test_a_term_counted_zero_times_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_array(d, "counts", lambda a: np.where(np.arange(len(a)) == 0, 0, a).astype(a.dtype))
    with pytest.raises(IndexError_, match="a term count is below 1"):
        BM25Index.load(d)


def test_tokenizer_version_zero_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_params(d, tokenizer=0)
    with pytest.raises(IndexError_, match="tokenizer version 0"):
        BM25Index.load(d)


@pytest.mark.parametrize("params", [{"b": 0.0}, {"k1": 0.0}, {"epsilon": 0.0}])
def test_zero_bm25_parameters_the_config_allows_load(tmp_path: Path, params: dict) -> None:
    d = _saved(tmp_path, **params)
    loaded = BM25Index.load(d)
    assert all(loaded.params[k] == v for k, v in params.items())


def test_postings_not_delimited_in_the_middle_are_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    indptr = np.load(d / "indptr.npy")
    assert len(indptr) >= 4 and indptr[0] == 0
    bad = indptr.copy()
    bad[1], bad[2] = indptr[2] + 1, indptr[1]  # ends still right, a fall in between
    np.save(d / "indptr.npy", bad)
    with pytest.raises(IndexError_, match="indptr does not delimit"):
        BM25Index.load(d)


def test_a_nan_idf_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _edit_array(d, "idf", lambda a: np.where(np.arange(len(a)) == 0, np.nan, a))
    with pytest.raises(IndexError_, match="a score part is not a finite"):
        BM25Index.load(d)


# --- chunk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("markdown", [False, True])
def test_a_marked_heading_line_stays_within_a_small_max_chars(markdown: bool) -> None:
    """A heading's line is joined into one unit only while it fits ``max_chars``: no passage
    is ever longer than that, the heading's limit (HEADING_MAX_CHARS) being larger."""
    text = ("# Step 2. Install it. Run it. Go.\n\nBody text here." if markdown else
            "Step 2. Install the tool now. Then run it.\n----------\n\nBody text here.")
    for max_chars in (12, 20, 25):
        spans = chunk_document(text, ChunkConfig(max_chars=max_chars), markdown=markdown)
        assert spans and all(e - s <= max_chars for s, e in spans), (max_chars, spans)


def test_a_full_passage_leaves_its_last_three_headings_to_the_next() -> None:
    text = ("Short intro line of prose here.\n\nAlpha\n\nBeta\n\nGamma\n\nDelta\n\nEpsilon\n\n"
            "This body sentence is long enough to need a passage of its own, as it goes on and "
            "on and on for a while yet.")
    spans = chunk_document(text, ChunkConfig(max_chars=160, overlap_sentences=0))
    assert [text[s:e].split("\n\n")[-1] for s, e in spans][0] == "Beta"  # (HEADINGS_STACKED)
    assert text[spans[1][0]:].startswith("Gamma\n\nDelta\n\nEpsilon\n\nThis body")


def test_a_fenced_block_after_a_blank_line_may_start_a_passage() -> None:
    """Only a blank line inside a fence starts no paragraph: its opening fence does."""
    text = ("Install the tool first, then run its command as shown below here.\n\n"
            "```\npip install tool\n```\n\nThat is all there is to it, really, for now and later.")
    spans = chunk_document(text, ChunkConfig(max_chars=200, overlap_sentences=0), markdown=True)
    assert [text[s:e] for s, e in spans][1].startswith("```\npip install tool")


def test_a_rule_is_three_marks_or_more() -> None:
    assert _is_rule("---") and _is_rule("  ===  ") and _is_rule("~~~~")
    assert not _is_rule("--") and not _is_rule("-=-") and not _is_rule("")


# --- store -----------------------------------------------------------------------------------


def test_an_index_whose_dense_part_keeps_removed_rows_is_written_as_format_2(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dense = DenseIndex.build(vectors, kind="hnsw", hnsw_m=4).without(np.array([3]))
    assert len(dense.removed) == 1
    docs = [Document(f"d{i}", "", "s", f"text {i}") for i in range(19)]
    bm25 = BM25Index.build([["text", str(i)] for i in range(19)])
    (tmp_path / "i").mkdir()
    manifest = store.write_index(
        tmp_path / "i", documents=docs, spans=np.array([[0, 6]] * 19),
        passage_doc=np.arange(19), bm25=bm25, dense=dense,
        embedding={"model_id": "x", "dim": 8}, cfg=CFG)
    assert manifest["format_version"] == store.FORMAT_WITH_REMOVED_ROWS
    assert "dense_removed.npy" in manifest["files"]
    (tmp_path / "j").mkdir()
    without = store.write_index(
        tmp_path / "j", documents=docs,
        spans=np.array([[0, 6]] * 19), passage_doc=np.arange(19), bm25=bm25, dense=None,
        embedding=None, cfg=CFG)
    assert without["format_version"] == store.FORMAT_VERSION


def test_a_passage_of_document_minus_one_is_misplaced() -> None:
    docs = [Document("a", "", "s", "some text"), Document("b", "", "s", "more text")]
    why = store._misplaced(docs, np.array([[0, 4], [0, 4]]), np.array([0, -1]))
    assert why is not None and "outside" in why


def test_no_passages_are_not_misplaced() -> None:
    docs = [Document("a", "", "s", "some text")]
    assert store._misplaced(docs, np.zeros((0, 2), np.int64), np.zeros(0, np.int64)) is None


def _manifest(**changes: Any) -> dict:
    return {"format_version": 1, "files": {}, "counts": {"documents": 1, "passages": 1},
            "settings": {}, "embedding": None, "dense_index": None, **changes}


@pytest.mark.parametrize("changes", [{"counts": {"documents": -1, "passages": 1}},
                                     {"counts": {"documents": 1, "passages": -2}},
                                     {"settings": None}, {"settings": []}])
def test_malformed_manifests_are_named(changes: dict) -> None:
    assert store._malformed(_manifest()) is None
    assert store._malformed(_manifest(**changes)) is not None


def test_the_newest_backup_is_the_one_restored(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    older, newer = tmp_path / ".idx.old-1-aaaa", tmp_path / ".idx.old-2-bbbb"
    for p, mtime in ((newer, 2_000_000), (older, 1_000_000)):  # the newer one made first
        p.mkdir()
        (p / store.MANIFEST).write_text("{}")
        os.utime(p, (mtime, mtime))
    assert store._backup(out) == newer


def test_a_writers_tmp_sibling_is_no_copy_of_the_index(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    out.mkdir()
    assert store.is_copy_of(tmp_path / ".idx.old-1-ab", out)
    assert not store.is_copy_of(tmp_path / ".idx.tmp-1-ab", out)


def test_a_page_of_documents_holds_limit_documents(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", "", "s", f"Document number {i}.") for i in range(5)]
    build_index_from_documents(docs, tmp_path / "idx", RetrievalConfig(dense=False),
                               progress=False)
    index = Index.load(tmp_path / "idx")
    page, total = index.list_documents(1, 2)
    assert [d.doc_id for d in page] == ["d1", "d2"] and total == 5
    assert index.list_documents(4, 0) == ([], 5)


def test_an_only_if_missing_build_writes_into_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    build_index_from_documents(DOCS, tmp_path / "idx", RetrievalConfig(dense=False),
                               progress=False, only_if_missing=True)
    assert len(Index.load(tmp_path / "idx").documents) == 2


def test_a_doc_id_of_the_longest_length_allowed_is_accepted() -> None:
    store.check_documents([Document("x" * MAX_DOC_ID_CHARS, "", "s", "t")])
    with pytest.raises(InvalidRequestError):
        store.check_documents([Document("x" * (MAX_DOC_ID_CHARS + 1), "", "s", "t")])


def test_a_lone_surrogate_in_a_document_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="its text"):
        store.check_documents([Document("a", "", "s", "bad \ud800 text")])


def test_the_manifest_records_the_dense_kind_auto_resolved_to(tmp_path: Path) -> None:
    cfg = RetrievalConfig(embedder="hash", faiss_index="hnsw", chunk=ChunkConfig(max_chars=60))
    build_index_from_documents(DOCS, tmp_path / "idx", cfg, progress=False,
                               embedder=HashEmbedder(dim=16), dense_spec=DenseSpec(kind="auto"))
    manifest = Index.load(tmp_path / "idx").manifest
    assert manifest["settings"]["faiss_index"] == "flat"


def test_a_dense_part_of_another_dimension_than_the_manifest_says_is_refused(
        tmp_path: Path) -> None:
    build_index_from_documents(DOCS, tmp_path / "idx", CFG, progress=False,
                               embedder=HashEmbedder(dim=16))
    path = tmp_path / "idx" / store.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["embedding"]["dim"] = 32
    path.write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match="does not match the manifest"):
        Index.load(tmp_path / "idx", verify=False)


def test_bm25_rows_other_than_the_passages_are_refused(tmp_path: Path) -> None:
    build_index_from_documents(DOCS, tmp_path / "idx", RetrievalConfig(dense=False),
                               progress=False)
    n = len(Index.load(tmp_path / "idx").passages)
    other = tmp_path / "idx" / "bm25"
    BM25Index.build([["x"]] * (n + 1)).save(other)  # self-consistent, one row too many
    with pytest.raises(IndexError_, match="bm25 rows"):
        Index.load(tmp_path / "idx", verify=False)


def test_settled_version_looks_again_while_none_is_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([None, None, "v1"])
    monkeypatch.setattr(store, "version_on_disk", lambda out: next(answers))
    assert store.settled_version(tmp_path, looks=3, wait_s=0) == "v1"


# --- dense -----------------------------------------------------------------------------------


def test_an_old_hnsw_index_is_searched_at_least_as_broadly_as_the_default() -> None:
    index = faiss.IndexHNSWFlat(4, 8, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 16  # FAISS's default, as an index saved before specs
    assert spec_of(index).ef_search >= 128


def test_padding_comes_after_real_hits_of_the_same_score() -> None:
    ids = np.array([[-1, 5, 2]])
    scores = np.array([[0.5, 0.5, 0.5]], dtype=np.float32)
    got, _ = _ties_by_id(ids, scores)
    assert got.tolist() == [[2, 5, -1]]


# --- shards ----------------------------------------------------------------------------------


def test_a_block_closes_when_it_reaches_shard_chars_exactly() -> None:
    docs = [Document(f"d{i}", "", "s", "x" * 10) for i in range(3)]
    assert [len(b.documents) for b in blocks(docs, 20)] == [2, 1]


def test_an_item_without_entries_still_gives_one_block() -> None:
    assert len(list(blocks([], 100))) == 1


def test_the_shard_key_depends_on_the_item_and_its_skipped_sources() -> None:
    block = next(blocks(DOCS, 10_000))
    key = shard_key(block, CFG, "item.txt")
    assert shard_key(block, CFG, "other.txt") != key
    block.skipped.append({"source": "x", "reason": "unreadable"})
    assert shard_key(block, CFG, "item.txt") != key


def test_without_a_dense_part_the_embedder_settings_do_not_change_the_key() -> None:
    block = next(blocks(DOCS, 10_000))
    a = RetrievalConfig(dense=False, embedder="hash", cpu_dtype="fp32")
    b = RetrievalConfig(dense=False, embedder="minilm", cpu_dtype="bf16")
    assert shard_key(block, a, "i") == shard_key(block, b, "i")
    dense = RetrievalConfig(embedder="hash", cpu_dtype="fp32")
    assert shard_key(block, dense, "i") != shard_key(block, RetrievalConfig(
        embedder="hash", cpu_dtype="bf16"), "i")  # another embedding: another shard


def _finished_shard(tmp_path: Path) -> Path:
    job = ShardJob(CFG, str(tmp_path / "work"), token="t")
    write_marker(job)
    staged = list(stage_item(0, DOCS, "item", job))
    result = finish_shard(staged[0], job, HashEmbedder(dim=16))
    return job.shards / result.key


def test_a_shard_of_another_format_is_damaged(tmp_path: Path) -> None:
    shard = _finished_shard(tmp_path)
    assert read_shard(shard).documents == DOCS
    meta = json.loads((shard / "shard.json").read_text())
    (shard / "shard.json").write_text(json.dumps({**meta, "format": meta["format"] - 1}))
    with pytest.raises(IndexError_, match="damaged"):
        read_shard(shard)


def test_a_shard_with_a_vector_missing_is_inconsistent(tmp_path: Path) -> None:
    shard = _finished_shard(tmp_path)
    vectors = np.load(shard / "vectors.npy")
    np.save(shard / "vectors.npy", vectors[:-1])
    with pytest.raises(IndexError_, match="inconsistent"):
        read_shard(shard)


# --- builder ---------------------------------------------------------------------------------


def test_a_passage_without_a_title_is_indexed_as_it_is() -> None:
    assert indexed_text("", "Granite.") == "Granite."
    assert indexed_text("T", "Granite.") == "T\nGranite."


def test_a_build_uses_the_configured_bm25_epsilon(tmp_path: Path) -> None:
    cfg = RetrievalConfig(dense=False, bm25_k1=1.2, bm25_b=0.5, bm25_epsilon=0.5)
    build_index_from_documents(DOCS, tmp_path / "idx", cfg, progress=False)
    params = Index.load(tmp_path / "idx").bm25.params
    assert (params["k1"], params["b"], params["epsilon"]) == (1.2, 0.5, 0.5)


def test_the_embedding_record_names_the_embedders_dtype() -> None:
    class Half(HashEmbedder):
        dtype = "bf16"

    assert embedding_record(Half(dim=8), CFG)["dtype"] == "bf16"
    assert embedding_record(HashEmbedder(dim=8), CFG)["dtype"] == getattr(
        HashEmbedder(dim=8), "dtype", "fp32")


def test_a_staged_block_is_finished_once(tmp_path: Path) -> None:
    shard = _finished_shard(tmp_path)
    job = ShardJob(CFG, str(tmp_path / "work"), token="t")
    again = list(stage_item(0, DOCS, "item", job))
    assert again == [Staged(0, 0, shard.name)]
