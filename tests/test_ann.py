"""Approximate dense search: the IVF index, its spec in the manifest, and old indexes."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import ConfigError, IndexError_
from citeqa.retrieval import HashEmbedder, HybridRetriever, Index, build_index_from_documents
from citeqa.retrieval.dense import (
    AUTO_ANN_MIN_PASSAGES,
    DenseIndex,
    DenseSpec,
    ivf_nlist,
    max_nlist,
)
from citeqa.retrieval.updates import add_documents, remove_documents
from citeqa.types import Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=80))
WORDS = [f"w{i}" for i in range(400)]


def clustered(n: int, dim: int = 32, centres: int = 20, seed: int = 0) -> np.ndarray:
    """float32 [n, dim] unit vectors around ``centres`` directions: data with neighbours, as
    real embeddings have (uniform random vectors have none, and no ANN index helps there)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def docs(n: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document(f"d{i}", f"T{i}", f"s{i}.txt",
                     ". ".join(" ".join(rng.choice(WORDS, 6)) for _ in range(4)) + ".")
            for i in range(n)]


# -- the spec: pure rules -----------------------------------------------------------------------


def test_nlist_rule() -> None:
    assert ivf_nlist(1_000_000) == 1024  # sqrt(N) = 1000 -> the nearest power of two
    assert ivf_nlist(200_000) == 512 and ivf_nlist(1) == 1 and ivf_nlist(0) == 1
    assert max_nlist(10_000) == 256 and max_nlist(5) == 1


def test_resolved_spec() -> None:
    auto = DenseSpec(kind="auto")
    assert auto.resolved(AUTO_ANN_MIN_PASSAGES - 1).kind == "flat"
    big = auto.resolved(AUTO_ANN_MIN_PASSAGES)
    assert big.kind == "hnsw" and big.nlist is None
    assert DenseSpec(kind="ivf").resolved(1_000_000).nlist == 1024
    assert DenseSpec(kind="ivf", nlist=4096).resolved(100_000).nlist == 2564  # 39 a cell
    assert DenseSpec(kind="ivf", nlist=8).resolved(10_000).nlist == 8  # as asked
    assert DenseSpec(kind="flat", nlist=8).resolved(10).nlist is None
    assert DenseSpec.from_json({**DenseSpec().to_json(), "from_the_future": 1}) == DenseSpec()


@pytest.mark.parametrize("bad", [{"kind": "annoy"}, {"nprobe": 0}, {"nlist": 0},
                                 {"hnsw_m": 0}, {"ef_search": 2**31 - 1}, {"hnsw_m": 1025},
                                 {"nlist": 2**24 + 1}, {"ef_construction": 1.5},
                                 {"nprobe": True}, {"train_per_list": "64"}])
def test_bad_spec_says_what(bad: dict) -> None:
    """A manifest's search breadth of 2**31 failed every search on a bad_alloc."""
    with pytest.raises(ConfigError, match="kind|must be a whole number from 1 to"):
        DenseSpec(**bad)


def test_the_largest_spec_numbers_are_taken() -> None:
    assert DenseSpec(kind="hnsw", hnsw_m=1024, ef_search=2**16, ef_construction=2**16,
                     nprobe=2**24, nlist=2**24, train_per_list=2**16).ef_search == 2**16


def test_the_settings_bound_hnsw_m_as_the_dense_index_does() -> None:
    """An hnsw_m over the dense index's bound passed the settings and failed the build, even
    a flat or BM25-only one."""
    from citeqa.config import RetrievalConfig

    assert RetrievalConfig(hnsw_m=1024).hnsw_m == 1024
    with pytest.raises(ConfigError, match="hnsw_m=1025"):
        RetrievalConfig(hnsw_m=1025)


# -- the IVF index ------------------------------------------------------------------------------


def recall_at_10(index: DenseIndex, exact: DenseIndex, queries: np.ndarray) -> float:
    truth, _ = exact.search(queries, 10)  # ids (search returns ids, scores)
    found, _ = index.search(queries, 10)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth,
                                                                      strict=True)]))


def test_ivf_recall_against_flat() -> None:
    x, q = clustered(4000), clustered(200, seed=1)
    flat = DenseIndex.build(x)
    ivf = DenseIndex.build(x, spec=DenseSpec(kind="ivf", nprobe=8))
    assert ivf.spec.nlist == 64 and ivf.index.nprobe == 8  # ivf_nlist(4000): sqrt -> 64
    assert recall_at_10(ivf, flat, q) >= 0.95
    ivf.index.nprobe = 1
    assert recall_at_10(ivf, flat, q) < 0.95  # the measure can fail: one cell is not enough
    ivf.index.nprobe = ivf.spec.nlist  # every cell scanned: exact
    np.testing.assert_allclose(ivf.search(q, 10)[1], flat.search(q, 10)[1], atol=1e-5)
    assert recall_at_10(ivf, flat, q) == 1.0


def test_hnsw_recall_against_flat() -> None:
    x, q = clustered(4000), clustered(200, seed=1)
    hnsw = DenseIndex.build(x, spec=DenseSpec(kind="hnsw", ef_search=256))
    assert hnsw.index.hnsw.efSearch == 256
    assert recall_at_10(hnsw, DenseIndex.build(x), q) >= 0.95
    hnsw.index.hnsw.efSearch = 10
    assert recall_at_10(hnsw, DenseIndex.build(x), q) < 0.95  # near-ties need breadth


def test_ivf_is_deterministic_and_keeps_vectors() -> None:
    x = clustered(1000)
    a = DenseIndex.build(x, spec=DenseSpec(kind="ivf", nlist=16))
    b = DenseIndex.build(x, spec=DenseSpec(kind="ivf", nlist=16))
    np.testing.assert_array_equal(a.index.quantizer.reconstruct_n(0, 16),
                                  b.index.quantizer.reconstruct_n(0, 16))
    np.testing.assert_array_equal(a.vectors(), x)  # row order, exactly


def test_hnsw_grown_after_each_reload_draws_new_levels(tmp_path: Path) -> None:
    """FAISS does not save HNSW's level generator: a reloaded index added its next node at the
    same level every time (one passage added after each restart never varied)."""
    x = clustered(40, dim=16)
    index = DenseIndex.build(x[:20], spec=DenseSpec(kind="hnsw", hnsw_m=4))
    path = tmp_path / "d.faiss"
    for i in range(20, 40):  # save, reload, add one
        index.save(path)
        index = DenseIndex.load(path, index.spec).extended(x[i:i + 1])
    levels = faiss.vector_to_array(index.index.hnsw.levels)[20:]
    assert len(set(levels.tolist())) > 1, levels
    np.testing.assert_array_equal(index.vectors(), x)


def test_rebuilt_ivf_keeps_its_centroids() -> None:
    x = clustered(1000)
    ivf = DenseIndex.build(x, spec=DenseSpec(kind="ivf", nlist=16, nprobe=4))
    again = ivf.rebuilt(x[:500])
    assert again.size == 500 and again.spec == ivf.spec and again.index.nprobe == 4
    np.testing.assert_array_equal(again.index.quantizer.reconstruct_n(0, 16),
                                  ivf.index.quantizer.reconstruct_n(0, 16))


# -- in an index directory ----------------------------------------------------------------------


@pytest.fixture()
def ivf_index(tmp_path: Path) -> Path:
    out = tmp_path / "idx"
    build_index_from_documents(docs(60), out, CFG, progress=False,
                               dense_spec=DenseSpec(kind="ivf", nlist=2, nprobe=1))
    return out


def test_manifest_records_the_spec_and_load_applies_it(ivf_index: Path) -> None:
    m = json.loads((ivf_index / "manifest.json").read_text())
    assert m["dense_index"]["kind"] == "ivf" and m["dense_index"]["nlist"] == 2
    assert m["settings"]["faiss_index"] == "ivf"  # the kind built, not the default asked
    index = Index.load(ivf_index)
    assert index.dense is not None and index.dense.spec.kind == "ivf"
    assert index.dense.index.nprobe == 1
    hits = HybridRetriever.open(ivf_index).search("w1 w2 w3", 5)
    assert len(hits) == 5


def test_ivf_padding_never_becomes_a_hit(ivf_index: Path) -> None:
    """nprobe 1 of 2 cells scans about half the passages: FAISS pads the rest of a deep search
    with id -1, which as a passage id is the last passage (with a score of -3.4e38)."""
    retriever = HybridRetriever.open(ivf_index)
    n = len(retriever.index.passages)
    hits = retriever.search("w1 w2 w3", n, mode="dense")
    assert 0 < len(hits) < n  # some of the search was padding
    ids = [h.passage.passage_id for h in hits]
    assert len(set(ids)) == len(ids)
    assert all(h.dense is not None and -1.0001 <= h.dense <= 1.0001 for h in hits)


def test_hybrid_fuses_each_retrievers_top_candidates_per_retriever(ivf_index: Path) -> None:
    """The fusion depth: each retriever's best ``candidates_per_retriever`` (not ``k``) are
    fused (a depth of k changes the top 5 on this index)."""
    from dataclasses import replace

    from citeqa.retrieval.fusion import rrf

    base = HybridRetriever.open(ivf_index)
    shallow = HybridRetriever(base.index, replace(base.cfg, candidates_per_retriever=2))
    deep = HybridRetriever(base.index, replace(base.cfg, candidates_per_retriever=40))
    for query in ("w1 w2 w3", "w7 w11", "w5 w20 w33"):
        for r in (shallow, deep):
            depth = max(5, r.cfg.candidates_per_retriever)
            bm25 = [h.passage.passage_id for h in r.search(query, depth, mode="bm25")]
            dense = [h.passage.passage_id for h in r.search(query, depth, mode="dense")]
            fused = rrf([bm25, dense], k=r.cfg.rrf_k, weights=[r.cfg.rrf_bm25_weight, 1.0])
            assert [h.passage.passage_id for h in r.search(query, 5)] == [
                d for d, _ in fused[:5]], (query, r.cfg.candidates_per_retriever)


def test_nprobe_edited_in_the_manifest_applies(ivf_index: Path) -> None:
    """nprobe is a query-time setting: a changed manifest value needs no rebuild."""
    m = json.loads((ivf_index / "manifest.json").read_text())
    m["dense_index"]["nprobe"] = 2
    (ivf_index / "manifest.json").write_text(json.dumps(m))
    index = Index.load(ivf_index)
    assert index.dense is not None and index.dense.index.nprobe == 2


def test_an_index_without_dense_index_still_loads(tmp_path: Path) -> None:
    """Indexes written before the spec existed: flat and HNSW are described from FAISS."""
    for kind in ("flat", "hnsw"):
        out = tmp_path / kind
        build_index_from_documents(docs(10), out, CFG, progress=False,
                                   dense_spec=DenseSpec(kind=kind))  # type: ignore[arg-type]
        m = json.loads((out / "manifest.json").read_text())
        del m["dense_index"]
        m["settings"]["faiss_index"] = kind
        (out / "manifest.json").write_text(json.dumps(m))
        index = Index.load(out)
        assert index.dense is not None and index.dense.spec.kind == kind
        if kind == "hnsw":
            assert index.dense.index.hnsw.efSearch >= 128


def test_a_bad_dense_index_entry_says_rebuild(ivf_index: Path) -> None:
    m = json.loads((ivf_index / "manifest.json").read_text())
    m["dense_index"]["kind"] = "annoy"
    (ivf_index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="bad dense_index.*rebuild"):
        Index.load(ivf_index)


def test_updates_keep_the_ivf_kind(ivf_index: Path) -> None:
    index = Index.load(ivf_index)
    assert index.dense is not None
    new = Document("new", "New", "n.txt", "w1 w2 w3 w4.")
    added = add_documents(index, [new], ivf_index, embedder=HashEmbedder()).index
    assert added.dense is not None and added.dense.spec == index.dense.spec
    reloaded = Index.load(ivf_index).dense
    assert reloaded is not None and reloaded.spec.kind == "ivf"
    removed = remove_documents(added, ["d0"], ivf_index).index
    assert removed.dense is not None
    kept = [p.passage_id for p in added.passages if p.doc_id != "d0"]
    np.testing.assert_array_equal(removed.dense.vectors(), added.dense.vectors()[kept])


# -- HNSW deletions: rows marked removed, the graph kept ------------------------------------------


def test_hnsw_without_marks_rows_and_searches_skip_them() -> None:
    """Removing passages from HNSW builds no graph: it shares the old one, and its searches
    return the surviving passages under their new ids (those after a removed one move up)."""
    x, q = clustered(2000), clustered(100, seed=1)
    hnsw = DenseIndex.build(x, spec=DenseSpec(kind="hnsw", ef_search=256))
    gone = np.random.default_rng(2).choice(2000, 200, replace=False)
    keep = np.setdiff1d(np.arange(2000), gone)
    less = hnsw.without(gone)
    assert less.index is hnsw.index and len(less.removed) == 200 and less.size == 1800
    assert hnsw.size == 2000 and not len(hnsw.removed)  # the old one searches on as before
    np.testing.assert_array_equal(less.vectors(), x[keep])
    assert recall_at_10(less, DenseIndex.build(x[keep]), q) >= 0.95
    # a kept passage is its own nearest neighbour, under its new id
    own, _ = less.search(x[keep[[0, 500, 1799]]], 1)
    assert own[:, 0].tolist() == [0, 500, 1799]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_equal_scores_rank_the_lower_id_first(kind: str) -> None:
    """As BM25 and the fusion rank ties: FAISS's heap gave the higher id first (a passage's
    duplicate, indexed after it, came before it)."""
    x = np.zeros((21, 4), dtype=np.float32)
    x[:20, 0] = 1.0  # twenty equal vectors (FAISS gave 18, 17, 16, ... first)
    x[20, 1] = 1.0
    index = DenseIndex.build(x, spec=DenseSpec(kind=kind))
    if kind == "hnsw":
        index = index.without(np.array([1]))  # searched through its skip list, ids moved up
    ids, scores = index.search(np.array([[1.0, 0, 0, 0]], dtype=np.float32), 21)
    n = index.size
    assert ids[0].tolist() == list(range(n)) and scores[0, 0] == scores[0, n - 2]
    assert scores[0, -1] < scores[0, 0]


def test_hnsw_removals_add_up_and_extensions_follow() -> None:
    x, extra = clustered(400, dim=16), clustered(10, dim=16, seed=3)
    hnsw = DenseIndex.build(x, spec=DenseSpec(kind="hnsw", hnsw_m=8))
    once = hnsw.without(np.arange(0, 20))  # passages 0..19 go; 20.. become 0..
    twice = once.without(np.arange(0, 20))  # what were 20..39
    assert twice.index is hnsw.index and twice.removed.tolist() == list(range(40))
    np.testing.assert_array_equal(twice.vectors(), x[40:])
    grown = twice.extended(extra)
    assert grown.size == 370 and grown.removed.tolist() == list(range(40))
    np.testing.assert_array_equal(grown.vectors(), np.concatenate([x[40:], extra]))
    own, _ = grown.search(extra, 1)
    assert own[:, 0].tolist() == list(range(360, 370))


def test_hnsw_builds_again_past_the_removed_share() -> None:
    """More than MAX_REMOVED_FRACTION of the rows removed: the graph is built again of the
    rest, and nothing stays marked."""
    from citeqa.retrieval.dense import MAX_REMOVED_FRACTION

    x = clustered(400, dim=16)
    hnsw = DenseIndex.build(x, spec=DenseSpec(kind="hnsw", hnsw_m=8))
    at_limit = int(MAX_REMOVED_FRACTION * 400)
    assert hnsw.without(np.arange(at_limit)).index is hnsw.index
    over = hnsw.without(np.arange(at_limit)).without(np.arange(1))
    assert over.index is not hnsw.index and not len(over.removed)
    assert over.index.ntotal == over.size == 400 - at_limit - 1
    np.testing.assert_array_equal(over.vectors(), x[at_limit + 1:])
    assert over.spec == hnsw.spec


def test_flat_without_is_refilled() -> None:
    x = clustered(100, dim=16)
    flat = DenseIndex.build(x)
    less = flat.without(np.array([3, 7]))
    assert not len(less.removed) and less.index.ntotal == 98
    np.testing.assert_array_equal(less.vectors(), np.delete(x, [3, 7], axis=0))
    with pytest.raises(ValueError, match="outside"):
        flat.without(np.array([100]))


@pytest.mark.parametrize("rows", [[3, 1], [1, 1], [-1], [400], [[1, 2]], [0.5]])
def test_bad_removed_rows_say_rebuild(rows: list) -> None:
    index = DenseIndex.build(clustered(400, dim=16), spec=DenseSpec(kind="hnsw", hnsw_m=8))
    with pytest.raises(IndexError_, match="removed rows"):
        DenseIndex(index.index, index.spec, np.asarray(rows))


def test_removed_rows_in_an_index_directory(tmp_path: Path) -> None:
    """A deletion from an HNSW index writes its removed rows beside the graph (checksummed in
    the manifest); the reloaded index skips them, and an edited file says rebuild."""
    out = tmp_path / "idx"
    build_index_from_documents(docs(60), out, CFG, progress=False,
                               dense_spec=DenseSpec(kind="hnsw", hnsw_m=8))
    index = Index.load(out)
    assert index.dense is not None
    gone = [p.passage_id for p in index.passages if p.doc_id == "d3"]
    less = remove_documents(index, ["d3"], out).index
    assert less.dense is not None and less.dense.removed.tolist() == gone
    m = json.loads((out / "manifest.json").read_text())
    assert "dense_removed.npy" in m["files"]
    assert m["format_version"] == 2  # a citeqa reading version 1 only says so, not "corrupt"
    again = Index.load(out)
    assert again.dense is not None and again.dense.removed.tolist() == gone
    retriever = HybridRetriever.open(out)
    for hit in retriever.search(docs(60)[3].text, 20, mode="dense"):
        assert hit.passage.doc_id != "d3"
        assert hit.dense == pytest.approx(float(
            again.dense.vectors()[hit.passage.passage_id] @ retriever.embedder.embed(
                [docs(60)[3].text])[0]), abs=1e-4)
    # added after the deletion, found under its own id
    new = Document("new", "New", "n.txt", "zz1 zz2 zz3 zz4.")
    grown = add_documents(again, [new], out, embedder=HashEmbedder()).index
    assert grown.dense is not None and grown.dense.removed.tolist() == gone
    top = HybridRetriever.open(out).search("zz1 zz2 zz3 zz4", 1, mode="dense")[0]
    assert top.passage.doc_id == "new"
    # a file the manifest does not list is not the index's
    fresh = tmp_path / "fresh"
    build_index_from_documents(docs(60), fresh, CFG, progress=False,
                               dense_spec=DenseSpec(kind="hnsw", hnsw_m=8))
    assert json.loads((fresh / "manifest.json").read_text())["format_version"] == 1
    np.save(fresh / "dense_removed.npy", np.array([0, 1]))
    loaded = Index.load(fresh).dense
    assert loaded is not None and not len(loaded.removed)
    np.save(out / "dense_removed.npy", np.array([10**6]))  # out of range, checksum fixed
    m = json.loads((out / "manifest.json").read_text())
    from citeqa.retrieval.store import sha256_file
    m["files"]["dense_removed.npy"] = sha256_file(out / "dense_removed.npy")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="removed rows.*rebuild"):
        Index.load(out)


def test_bench_removed_measures_both_graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/bench_removed.py on a small corpus: a figure per share and kind of query."""
    import runpy
    import sys

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_removed.py", "--vectors", "3000", "--centres", "60",
                                      "--queries", "10", "--shares", "0.05", "0.1",
                                      "--out", str(out)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_removed.py"),
                   run_name="__main__")
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["removed_share"] <= 0.1
        assert all(0.5 <= row[f"{w}_{g}_r{k}"] <= 1 for w in ("near_removed", "near_kept")
                   for g in ("marked", "fresh") for k in (10, 100))
    assert "removed (whole clusters)" in capsys.readouterr().out


def test_bench_removed_on_a_squad_file_removes_whole_articles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--squad: the vectors are a SQuAD file's paragraphs (an article is a document) and the
    queries its questions (here through the hash embedder: no weights in a unit test)."""
    import gzip
    import runpy
    import sys

    import citeqa.retrieval.embed as embed
    from citeqa.retrieval import HashEmbedder

    words = "river bridge castle stone water forest king queen battle city harbour".split()
    rng = np.random.default_rng(1)
    data = [{"title": f"A{a}", "paragraphs": [
        {"context": " ".join(rng.choice(words, 40)) + f" article {a} paragraph {p}",
         "qas": [{"question": f"What of article {a} and {' '.join(rng.choice(words, 3))}?"}
                 for _ in range(2)]} for p in range(30)]} for a in range(40)]
    squad = tmp_path / "train.json.gz"
    with gzip.open(squad, "wt", encoding="utf-8") as f:
        json.dump({"data": data}, f)
    monkeypatch.setattr(embed, "load_embedder", lambda *a, **k: HashEmbedder())
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bench_removed.py", "--squad", str(squad), "--articles",
                                      "30", "--queries", "10", "--shares", "0.1",
                                      "--out", str(out)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_removed.py"),
                   run_name="__main__")
    written = json.loads(out.read_text())
    assert written["vectors"] == 30 * 30 and written["centres"] == 30
    row, = written["results"]
    assert row["removed_share"] == pytest.approx(0.1)  # three whole articles of thirty
    assert all(0 <= row[f"{w}_{g}_r{k}"] <= 1 for w in ("near_removed", "near_kept")
               for g in ("marked", "fresh") for k in (10, 100))
    assert "removed (whole articles)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ïdx é", "idx\udce9"])  # the second: a byte no UTF-8 holds
def test_a_dense_index_saves_and_loads_at_any_path_the_file_system_takes(
        tmp_path: Path, name: str) -> None:
    """FAISS opened a path by its UTF-8 bytes: a name with a byte that is no UTF-8 was a
    TypeError's traceback, and under a Latin-1 locale every accented folder name failed."""
    import os

    x = clustered(30, dim=8)
    index = DenseIndex.build(x)
    folder = tmp_path / name
    folder.mkdir()
    index.save(folder / "dense.faiss")
    assert os.fsencode(folder).endswith(os.fsencode(name))
    np.testing.assert_array_equal(DenseIndex.load(folder / "dense.faiss").vectors(), x)
    (folder / "cut.faiss").write_bytes((folder / "dense.faiss").read_bytes()[:100])
    with pytest.raises(IndexError_, match="cannot read the dense index"):
        DenseIndex.load(folder / "cut.faiss")
    with pytest.raises(IndexError_, match="cannot read the dense index"):
        DenseIndex.load(folder / "gone.faiss")
