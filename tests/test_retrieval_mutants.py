"""Behaviour of citeqa/retrieval/{updates,fusion,merge,kept}.py that hand mutation testing
found no test pinned: each test here fails on one mutant of that code and passes on it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import THREE_DOCS

from citeqa.config import preset
from citeqa.errors import EmptyCorpusError, IndexError_
from citeqa.retrieval import HashEmbedder, Index, build_index_from_documents, rrf
from citeqa.retrieval.bm25 import count_terms
from citeqa.retrieval.dense import DenseSpec
from citeqa.retrieval.kept import LOCK, KeptEmbedder, discard, kept_passages, text_hash
from citeqa.retrieval.merge import merge_shards, write_merged
from citeqa.retrieval.shards import Shard
from citeqa.retrieval.updates import IndexUpdate, apply_update, check_update, plan_additions
from citeqa.text import TOKENIZER, tokenize
from citeqa.types import Document

CFG = preset("tiny").retrieval


def _doc(doc_id: str, text: str = "some text", *, title: str | None = None,
         source: str = "s") -> Document:
    return Document(doc_id=doc_id, title=doc_id if title is None else title, source=source,
                    text=text)


# -- updates.plan_additions ---------------------------------------------------------------------


def test_a_fetched_page_the_index_holds_under_its_own_id_is_planned_by_its_content() -> None:
    """The same-page check is for new ids only: a page fetched again under the id it is indexed
    by is unchanged, replaced or a conflict, never "the same page as itself"."""
    url = "https://example.org/p"
    indexed = {"a": _doc("a", source=url)}
    same = plan_additions(indexed, [_doc("a", source=url)], fetched={"a"})
    assert same.unchanged == ("a",) and same.same_page == () and same.update.add == ()
    edited = _doc("a", "edited text", source=url)
    plan = plan_additions(indexed, [edited], replace=True, fetched={"a"})
    assert plan.replaced == ("a",) and plan.same_page == ()
    assert plan.update.add == (edited,) and plan.update.remove == ("a",)
    assert plan_additions(indexed, [edited], fetched={"a"}).conflicts == ("a",)


def test_a_page_indexed_twice_is_named_by_its_first_holder() -> None:
    indexed = {"a": _doc("a", source="https://example.org/p"),
               "b": _doc("b", source="https://example.org/p#later")}
    plan = plan_additions(indexed, [_doc("c", "new", source="https://example.org/p")],
                          fetched={"c"})
    assert plan.same_page == (("c", "a"),) and plan.update.add == ()


def test_a_lookalike_needs_the_title_and_the_text_of_an_indexed_document() -> None:
    indexed = {"a": _doc("a", "x", title="T")}
    plan = plan_additions(indexed, [_doc("b", "y", title="T"), _doc("c", "x", title="T"),
                                    _doc("d", "x", title="U")])
    assert plan.lookalikes == (("c", "a"),) and plan.new == ("b", "c", "d")


# -- updates.check_update / apply_update ------------------------------------------------------


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny index of THREE_DOCS (BM25 and a hash-embedded dense part); copy it to change it."""
    out = tmp_path_factory.mktemp("three") / "idx"
    build_index_from_documents(THREE_DOCS, out, CFG, progress=False)
    return out


def test_every_document_may_be_replaced_in_one_update(three: Path, tmp_path: Path) -> None:
    """Removing all documents is refused only when nothing is added in their place."""
    index = Index.load(three)
    everything = tuple(index.documents)
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    check_update(index, IndexUpdate(add=(new,), remove=everything))  # allowed
    result = apply_update(index, IndexUpdate(add=(new,), remove=everything), tmp_path / "idx",
                          embedder=HashEmbedder())
    assert list(result.index.documents) == ["moths"]
    assert list(Index.load(tmp_path / "idx").documents) == ["moths"]


def test_an_index_of_an_older_tokenizer_is_tokenized_again_whole(
        three: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored term counts of another tokenizer version are not reused: every passage is
    tokenized again, as the index's queries will be."""
    import citeqa.retrieval.updates as updates

    index = Index.load(three)
    assert index.bm25.counts is not None
    index.bm25.tokenizer = TOKENIZER - 1
    tokenized: list[str] = []
    real = updates.tokenize
    monkeypatch.setattr(updates, "tokenize", lambda t: tokenized.append(t) or real(t))
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    result = apply_update(index, IndexUpdate(add=(new,)), tmp_path / "idx",
                          embedder=HashEmbedder()).index
    assert len(tokenized) == len(result.passages) > len(index.passages)
    assert result.bm25.tokenizer == TOKENIZER


def test_an_update_keeps_the_bm25_parameters_the_index_was_built_with(tmp_path: Path) -> None:
    cfg = replace(CFG, bm25_k1=1.2, bm25_b=0.6, bm25_epsilon=0.5)
    build_index_from_documents(THREE_DOCS, tmp_path / "idx", cfg, progress=False)
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    for result in (apply_update(Index.load(tmp_path / "idx"), IndexUpdate(add=(new,)),
                                tmp_path / "idx", embedder=HashEmbedder()).index,
                   Index.load(tmp_path / "idx")):
        params = result.bm25.params
        assert (params["k1"], params["b"], params["epsilon"]) == (1.2, 0.6, 0.5)


def test_an_update_chunks_and_scores_with_the_settings_it_is_given(three: Path,
                                                                    tmp_path: Path) -> None:
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    result = apply_update(Index.load(three), IndexUpdate(add=(new,)), tmp_path / "idx",
                          embedder=HashEmbedder(), cfg=replace(CFG, bm25_k1=1.1)).index
    assert result.bm25.params["k1"] == 1.1


def test_an_index_without_stored_counts_is_tokenized_again_passage_by_passage(
        three: Path, tmp_path: Path) -> None:
    """The passages tokenized again are their spans exactly, as a fresh build's: text without
    spaces (Japanese) is cut mid-run, where one more character is one more term."""
    long = Document("z", "Tokyo", "z.txt", "東京タワーは東京の塔です" * 120)
    grown = tmp_path / "grown"
    apply_update(Index.load(three), IndexUpdate(add=(long,)), grown, embedder=HashEmbedder())
    old = Index.load(grown)
    assert sum(p.doc_id == "z" for p in old.passages) > 2
    old.bm25.counts = None  # as an index written before it stored them
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    updated = apply_update(old, IndexUpdate(add=(new,)), tmp_path / "idx",
                           embedder=HashEmbedder()).index
    build_index_from_documents([*THREE_DOCS, long, new], tmp_path / "ref", CFG, progress=False)
    ref = Index.load(tmp_path / "ref")
    assert updated.passages == ref.passages
    assert updated.bm25.vocab == ref.bm25.vocab
    for q in (tokenize("東京タワー"), tokenize("塔です東京"), ["moths"], ["the", "of"]):
        np.testing.assert_allclose(updated.bm25.scores(q), ref.bm25.scores(q), rtol=1e-12)


class _Renamed(HashEmbedder):
    """A hash embedder of ``dim`` under the name ``model_id``."""

    def __init__(self, model_id: str, dim: int = 256) -> None:
        super().__init__(dim=dim)
        self.model_id = model_id


@pytest.mark.parametrize("case", ["no embedder", "another model", "another dim",
                                  "no embedding recorded"])
def test_adding_to_a_dense_index_needs_the_embedder_it_was_built_with(
        three: Path, tmp_path: Path, case: str) -> None:
    index = Index.load(three)
    same = HashEmbedder()
    embedder = {"no embedder": None, "another model": _Renamed("other-model"),
                "another dim": _Renamed(same.model_id, dim=64)}.get(case, same)
    if case == "no embedding recorded":
        index.manifest["embedding"] = None
    new = Document("moths", "Moths", "moths.txt", "Glimmer moths fly by moonlight.")
    with pytest.raises(IndexError_, match="needs its embedder|embedded with"):
        apply_update(index, IndexUpdate(add=(new,)), tmp_path / "idx", embedder=embedder)
    assert not (tmp_path / "idx").exists()


# -- fusion.rrf ---------------------------------------------------------------------------------


def test_ids_come_back_as_python_ints_whatever_their_type_in() -> None:
    fused = rrf([np.array([3, 1], dtype=np.int64), [np.int32(1)]], k=0)
    assert [d for d, _ in fused] == [1, 3]
    assert all(type(d) is int for d, _ in fused)


def test_an_exact_tie_of_large_weighted_scores_is_still_a_tie() -> None:
    """CLOSE is relative: scores in the millions that are equal in real numbers but differ in
    their last float bits are still compared exactly."""
    for k in range(20):
        fused = rrf([[0, 1, 2], [1, 2, 0], [2, 0, 1]], k=k, weights=[1e8] * 3)
        assert [d for d, _ in fused] == [0, 1, 2], k
        assert len({s for _, s in fused}) == 1, k


# -- merge.merge_shards: every shard of a dense build carries vectors from one embedder ---------


def _shard(key: str, texts: list[str], *, dim: int = 4, vectors: bool = True,
           **embedding: Any) -> Shard:
    """A shard of one document per text, each one passage (the whole text)."""
    docs = [Document(f"{key}{i}", key, f"{key}{i}.txt", t) for i, t in enumerate(texts)]
    return Shard(key, docs, [], np.asarray([(0, len(t)) for t in texts], np.int64).reshape(-1, 2),
                 np.arange(len(texts), dtype=np.int64), count_terms(t.split() for t in texts),
                 np.ones((len(texts), dim), np.float32) if vectors else None,
                 {"model_id": "m", "dim": dim, "dtype": "fp32", **embedding})


def test_a_dense_merge_refuses_a_shard_without_vectors() -> None:
    with pytest.raises(IndexError_, match="shard b has no vectors"):
        merge_shards([_shard("a", ["x y"]), _shard("b", ["z"], vectors=False)], dense=True)


def test_a_dense_merge_takes_a_shard_without_passages_and_vectors() -> None:
    """A shard of no passages has nothing to embed (its item gave no text)."""
    empty = Shard("e", [], [{"source": "gone.txt", "reason": "not found"}],
                  np.zeros((0, 2), np.int64), np.zeros(0, np.int64), count_terms([]), None, None)
    merged = merge_shards([_shard("a", ["x y"]), empty, _shard("b", ["z"])], dense=True)
    assert merged.vectors is not None and merged.vectors.shape == (2, 4)
    assert merged.embedding == {"model_id": "m", "dim": 4, "dtype": "fp32"}
    assert [s.source for s in merged.skipped] == ["gone.txt"]


@pytest.mark.parametrize("other", [{"model_id": "n"}, {"dim": 8}])
def test_a_dense_merge_refuses_shards_of_different_embedders(other: dict[str, Any]) -> None:
    second = _shard("b", ["z"], **other)
    with pytest.raises(IndexError_, match="different models"):
        merge_shards([_shard("a", ["x y"]), second], dense=True)


def test_shards_of_different_dtypes_merge_with_a_warning_and_the_first_ones_record(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="citeqa.retrieval.merge"):
        merged = merge_shards([_shard("a", ["x y"]), _shard("b", ["z"], dtype="bf16")],
                              dense=True)
    assert merged.embedding is not None and merged.embedding["dtype"] == "fp32"
    assert "shards computed in fp32 and bf16" in caplog.text


def test_a_merge_of_blank_documents_fails_as_a_local_build(tmp_path: Path) -> None:
    blank = Shard("a", [Document("b", "B", "b.txt", " \n\n ")], [], np.zeros((0, 2), np.int64),
                  np.zeros(0, np.int64), count_terms([]), np.zeros((0, 4), np.float32),
                  {"model_id": "m", "dim": 4})
    merged = merge_shards([blank], dense=True)
    with pytest.raises(EmptyCorpusError, match="the 1 documents hold no text to index"):
        write_merged(merged, tmp_path / "idx", CFG, DenseSpec(), n_sources=1, progress=False)
    assert not (tmp_path / "idx").exists()


def test_a_bm25_only_merge_writes_no_dense_part_whatever_the_shards_carry(tmp_path: Path) -> None:
    """Vectors a shard carries (one finished by a dense build's worker) do not make a BM25-only
    build's index dense, nor its manifest name an embedder."""
    merged = merge_shards([_shard("a", ["x y", "y z"]), _shard("b", ["z w"])], dense=True)
    assert merged.vectors is not None and merged.embedding is not None
    write_merged(merged, tmp_path / "idx", replace(CFG, dense=False), DenseSpec(), n_sources=2,
                 progress=False)
    index = Index.load(tmp_path / "idx")
    assert index.dense is None and index.manifest["embedding"] is None
    assert len(index.passages) == 3


def test_a_merge_written_only_if_missing_leaves_an_index_another_build_wrote(
        three: Path, tmp_path: Path) -> None:
    import shutil

    from citeqa.errors import IndexExistsError

    shutil.copytree(three, tmp_path / "idx")
    merged = merge_shards([_shard("a", ["x y"])], dense=False)
    with pytest.raises(IndexExistsError):
        write_merged(merged, tmp_path / "idx", replace(CFG, dense=False), DenseSpec(),
                     n_sources=1, progress=False, only_if_missing=True)
    assert list(Index.load(tmp_path / "idx").documents) == [d.doc_id for d in THREE_DOCS]


# -- kept: what a folder of kept embeddings holds besides whole parts ---------------------------

TEXTS = [f"passage number {i} about rivers and bridges" for i in range(3)]


def _part(path: Path, hashes: np.ndarray, vectors: np.ndarray) -> None:
    with path.open("wb") as f:  # (np.savez would add .npz to a name without it)
        np.savez(f, hashes=hashes, vectors=vectors)


def _hashes(texts: list[str]) -> np.ndarray:
    identity = KeptEmbedder(HashEmbedder(), Path("unused")).identity
    return np.frombuffer(b"".join(text_hash(identity, t) for t in texts), np.uint8).reshape(
        len(texts), -1)


def test_a_hidden_or_unfinished_part_is_never_read_and_discard_removes_only_the_unfinished(
        tmp_path: Path) -> None:
    vectors = HashEmbedder().embed(TEXTS).astype(np.float32)
    _part(tmp_path / ".someone.npz", _hashes(TEXTS), vectors)  # not this module's: not a part
    _part(tmp_path / ".abc.npz.0123abcd.tmp", _hashes(TEXTS), vectors)  # a writer died here
    assert kept_passages(tmp_path) == 0
    embedder = KeptEmbedder(HashEmbedder(), tmp_path, part=2)
    embedder.embed(TEXTS)
    assert embedder.reused == 0 and kept_passages(tmp_path) == 3
    discard(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".someone.npz"]


@pytest.mark.parametrize("bad", ["int64", "narrow", "float64", "wide"])
def test_a_part_of_other_dtypes_or_shapes_is_embedded_again(tmp_path: Path, bad: str) -> None:
    hashes, vectors = _hashes(TEXTS), HashEmbedder().embed(TEXTS).astype(np.float32)
    if bad == "int64":
        hashes = hashes.astype(np.int64)
    elif bad == "narrow":
        hashes = np.ascontiguousarray(hashes[:, :8])
    elif bad == "float64":
        vectors = vectors.astype(np.float64)
    else:  # vectors of another width than the embedder's
        vectors = np.ones((len(TEXTS), 8), np.float32)
    _part(tmp_path / "p.npz", hashes, vectors)
    embedder = KeptEmbedder(HashEmbedder(), tmp_path)
    # (only its hashes are read to count it: fine where only its vectors are not)
    assert kept_passages(tmp_path) == (3 if bad in ("float64", "wide") else 0)
    np.testing.assert_array_equal(embedder.embed(TEXTS), HashEmbedder().embed(TEXTS))
    assert embedder.reused == 0


def test_a_discard_while_another_add_runs_leaves_it_its_lock(tmp_path: Path) -> None:
    """Not alone, a discard removes its own parts only and leaves the lock file: a later discard
    still finds the running add's lock, and leaves its parts."""
    other, mine = KeptEmbedder(HashEmbedder(), tmp_path, part=2), KeptEmbedder(
        HashEmbedder(), tmp_path, part=2)
    with other:
        other.embed(TEXTS[:2])
        with mine:
            mine.embed(TEXTS[2:])
        mine.discard()
        assert (tmp_path / LOCK).exists()
        discard(tmp_path)
        assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(other.written)
    other.discard()
    assert not tmp_path.exists()


@pytest.mark.parametrize("part", [0, -1])
def test_a_part_of_no_passages_is_refused(tmp_path: Path, part: int) -> None:
    with pytest.raises(ValueError, match="part must be at least 1"):
        KeptEmbedder(HashEmbedder(), tmp_path, part=part)


def test_reused_counts_passages_not_distinct_texts(tmp_path: Path) -> None:
    with KeptEmbedder(HashEmbedder(), tmp_path) as first:
        first.embed(TEXTS)
    again = KeptEmbedder(HashEmbedder(), tmp_path)
    texts = [*TEXTS, TEXTS[0], TEXTS[0]]
    np.testing.assert_array_equal(again.embed(texts), HashEmbedder().embed(texts))
    assert again.reused == len(texts) == 5


def test_a_discard_inside_its_own_block_lets_go_of_its_lock_first(tmp_path: Path) -> None:
    """Its own shared lock does not count as another add: alone, it removes everything."""
    with KeptEmbedder(HashEmbedder(), tmp_path / "k", part=2) as embedder:
        embedder.embed(TEXTS)
        (tmp_path / "k" / ".x.npz.0123abcd.tmp").write_bytes(b"")  # not its own, yet a part
        embedder.discard()
        assert not (tmp_path / "k").exists()



def test_where_flock_fails_a_discard_is_alone(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without flock (ENOLCK): each holder is taken to be alone."""
    import errno
    import fcntl

    KeptEmbedder(HashEmbedder(), tmp_path / "k", part=2).embed(TEXTS)
    assert kept_passages(tmp_path / "k") == 3

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    discard(tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_exact_ties_of_negative_weights_are_ties_too() -> None:
    """``CLOSE`` is relative to a score's size: of a negative score, it held no run together,
    and ties fell to rounding (13 values of k in 0-99 put these ids out of order)."""
    from citeqa.retrieval.fusion import rrf

    for k in range(100):
        assert [d for d, _ in rrf([[0, 1, 2], [1, 2, 0], [2, 0, 1]], k=k,
                                  weights=[-1.0] * 3)] == [0, 1, 2], k
