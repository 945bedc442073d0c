"""An index folder whose checksums match but whose contents do not hold together (a file
edited by hand and summed again, parts of two indexes, a crafted folder): every load refuses it
with one line, before a search answers from the wrong passage or an update writes the damage
into a new index (the damaged-index review's findings)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import IndexError_
from citeqa.retrieval import HybridRetriever, Index, build_index_from_documents
from citeqa.retrieval.store import check_index, sha256_file
from citeqa.types import Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=80))
DOCS = [
    Document("d1", "Cats", "cats.txt", "Cats sit on mats. " * 8 + "\n\nThey purr loudly."),
    Document("d2", "Dogs", "dogs.txt", "Dogs chase cats around the garden. Dogs bark."),
    Document("d3", "Fish", "fish.txt", "Fish swim in the pond all day long."),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "idx"
    build_index_from_documents(DOCS, out, CFG, progress=False)
    return out


def _sealed(index: Path) -> None:
    """Sum the files again into the manifest, as one who edits an index by hand may."""
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(index / name) for name in manifest["files"]}
    (index / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(index: Path) -> None:
        manifest = json.loads((index / "manifest.json").read_text())
        change(manifest)
        (index / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _array(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(index: Path) -> None:
        np.save(index / name, change(np.load(index / name)))
        _sealed(index)
    return edit


def _json(name: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def edit(index: Path) -> None:
        (index / name).write_text(json.dumps(change(json.loads((index / name).read_text()))))
        _sealed(index)
    return edit


def _faiss(make: Callable[[np.ndarray], faiss.Index]) -> Callable[[Path], None]:
    def edit(index: Path) -> None:
        flat = faiss.read_index(str(index / "dense.faiss"))
        vectors = flat.reconstruct_n(0, flat.ntotal)
        other = make(vectors)
        faiss.write_index(other, str(index / "dense.faiss"))
        _sealed(index)
    return edit


def _l2(vectors: np.ndarray) -> faiss.Index:
    other = faiss.IndexFlatL2(vectors.shape[1])
    other.add(vectors)
    return other


def _nan_row(vectors: np.ndarray) -> faiss.Index:
    other = faiss.IndexFlatIP(vectors.shape[1])
    vectors[1] = np.nan
    other.add(vectors)
    return other


def _id_map(vectors: np.ndarray) -> faiss.Index:
    other = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    other.add_with_ids(vectors, np.arange(len(vectors))[::-1].copy())
    return other


def _ivf(change: Callable[[np.ndarray, np.ndarray], None]) -> Callable[[np.ndarray], faiss.Index]:
    """An IVF index of two cells over the vectors, each row under its own id unless ``change``
    (given the vectors and ids, in place) says otherwise."""
    def make(vectors: np.ndarray) -> faiss.Index:
        other = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], 2,
                                   faiss.METRIC_INNER_PRODUCT)
        other.cp.min_points_per_centroid = 1
        other.train(vectors)
        ids = np.arange(len(vectors), dtype=np.int64)
        change(vectors, ids)
        other.add_with_ids(vectors, ids)
        return other
    return make


def _set(what: str, row: int, value: float) -> Callable[[np.ndarray, np.ndarray], None]:
    def change(vectors: np.ndarray, ids: np.ndarray) -> None:
        (vectors if what == "vector" else ids)[row] = value
    return change


def _with(values: dict[str, object]) -> Callable[[object], object]:
    def change(params: object) -> object:
        assert isinstance(params, dict)
        return {**params, **values}
    return change


def _huge_header(index: Path) -> None:
    """passages.npy's header says 2**40 rows: read whole, numpy asked for 16 TiB first."""
    path = index / "passages.npy"
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    header = data[:header_end].decode("latin-1")
    rows = header.split("'shape': (")[1].split(",")[0]
    path.write_bytes(header.replace(f"({rows},", f"({2**40},", 1)
                     .replace(" \n", "\n", 1).ljust(header_end - 1).encode("latin-1") + b"\n"
                     + data[header_end:])
    _sealed(index)


def _unsigned_falling(index: Path) -> None:
    """Each term's postings falling, stored unsigned (their differences wrap to rises)."""
    indptr = np.load(index / "bm25/indptr.npy")
    ids = np.load(index / "bm25/doc_ids.npy")
    for a, b in zip(indptr[:-1], indptr[1:], strict=True):
        ids[a:b] = ids[a:b][::-1].copy()
    np.save(index / "bm25/doc_ids.npy", ids.astype(np.uint32))
    _sealed(index)


def _unlisted(name: str) -> Callable[[Path], None]:
    return _edit_manifest(lambda m: m["files"].pop(name))


def _documents(change: Callable[[list[dict]], None]) -> Callable[[Path], None]:
    def edit(index: Path) -> None:
        path = index / "documents.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        change(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _sealed(index)
    return edit


DAMAGES: dict[str, Callable[[Path], None]] = {
    "a document's text null": _documents(lambda rows: rows[1].update(text=None)),
    "a passage of document -1": _array("passage_doc.npy", lambda a: np.where(a == 0, -1, a)),
    "a passage past its text": _array("passages.npy", lambda a: a + [[0, 10**6]]),
    "a passage that starts before its text": _array("passages.npy", lambda a: a - [[50, 0]]),
    "a passage that ends before it starts": _array("passages.npy", lambda a: a[:, ::-1].copy()),
    "spans of three columns": _array("passages.npy", lambda a: np.hstack([a, a[:, :1]])),
    "spans as floats": _array("passages.npy", lambda a: a.astype(np.float64)),
    "spans declared 2**40 rows": _huge_header,
    "a posting of passage -1": _array("bm25/doc_ids.npy", lambda a: np.where(a == 0, -1, a)),
    "a posting past the passages": _array("bm25/doc_ids.npy", lambda a: a + 1000),
    "postings out of passage order": _array("bm25/doc_ids.npy", lambda a: a[::-1].copy()),
    "unsigned postings out of order": _unsigned_falling,
    "postings not delimited": _array("bm25/indptr.npy", lambda a: a[::-1].copy()),
    "idf shorter than the vocabulary": _array("bm25/idf.npy", lambda a: a[:-3]),
    "tf not a number": _array("bm25/tf.npy", lambda a: np.full_like(a, np.nan)),
    "a term counted -1 times": _array("bm25/counts.npy", lambda a: -a),
    "params a list": _json("bm25/params.json", lambda p: [p]),
    "params without n_docs": _json("bm25/params.json",
                                   lambda p: {k: v for k, v in p.items() if k != "n_docs"}),
    "a tokenizer from the future": _json("bm25/params.json", _with({"tokenizer": 99})),
    "k1 a string": _json("bm25/params.json", _with({"k1": "1.5"})),
    "vocab of numbers": _json("bm25/vocab.json", lambda v: list(range(len(v)))),
    "an L2 dense index": _faiss(_l2),
    "a dense index that maps ids": _faiss(_id_map),
    "a vector of NaN": _faiss(_nan_row),
    "an IVF vector of NaN": _faiss(_ivf(_set("vector", 1, np.nan))),
    "an IVF row under id 1000": _faiss(_ivf(_set("id", 1, 1000))),
    "an IVF row under id -1": _faiss(_ivf(_set("id", 0, -1))),
    "two IVF rows under one id": _faiss(_ivf(_set("id", 1, 0))),
    "two documents of one id": _documents(lambda rows: rows[1].update(doc_id=rows[0]["doc_id"])),
    "a document's title a number": _documents(lambda rows: rows[2].update(title=7)),
    "counts a string": _edit_manifest(lambda m: m.update(counts="3")),
    "counts without passages": _edit_manifest(lambda m: m["counts"].pop("passages")),
    "embedding a string": _edit_manifest(lambda m: m.update(embedding="minilm")),
    "settings a list": _edit_manifest(lambda m: m.update(settings=[])),
    "files a list": _edit_manifest(lambda m: m.update(files=list(m["files"]))),
    "format version true": _edit_manifest(lambda m: m.update(format_version=True)),
    "search breadth 2**31": _edit_manifest(lambda m: m.update(dense_index={
        **m["dense_index"], "kind": "hnsw", "ef_search": 2**31 - 1})),
    "dense.faiss not listed": _unlisted("dense.faiss"),
    "counts.npy not listed": _unlisted("bm25/counts.npy"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_is_refused_in_one_line(pristine: Path, tmp_path: Path,
                                               damage: str) -> None:
    index = tmp_path / "idx"
    shutil.copytree(pristine, index)
    Index.load(index)  # whole before
    DAMAGES[damage](index)
    with pytest.raises(IndexError_, match=r"rebuild") as caught:
        Index.load(index)
    assert "\n" not in str(caught.value)


def test_index_info_does_not_pass_a_file_its_manifest_does_not_list(pristine: Path,
                                                                    tmp_path: Path) -> None:
    """`index info` said "checksums ok" of a folder whose vectors came from another index."""
    index = tmp_path / "idx"
    shutil.copytree(pristine, index)
    check_index(index)
    _unlisted("dense.faiss")(index)
    with pytest.raises(IndexError_, match="dense.faiss, which its manifest does not list"):
        check_index(index)


def test_every_index_citeqa_writes_still_loads_and_searches(pristine: Path,
                                                            tmp_path: Path) -> None:
    """The checks pass what a build writes, with each kind of dense index."""
    for kind in ("flat", "hnsw", "ivf"):
        out = tmp_path / kind
        build_index_from_documents(DOCS * 1, out, RetrievalConfig(
            embedder="hash", chunk=ChunkConfig(max_chars=80), faiss_index=kind), progress=False)
        hits = HybridRetriever.open(out).search("dogs bark", 2)
        assert hits[0].passage.doc_id == "d2", kind


def test_an_ivf_index_of_each_row_once_in_finite_numbers_still_loads(pristine: Path,
                                                                    tmp_path: Path) -> None:
    """The IVF damages above are refused for what they change, not for being IVF."""
    index = tmp_path / "idx"
    shutil.copytree(pristine, index)
    _faiss(_ivf(lambda vectors, ids: None))(index)
    hits = HybridRetriever.open(index).search("dogs bark", 2)
    assert hits[0].passage.doc_id == "d2"


def test_postings_are_checked_in_order_within_each_term_block_by_block() -> None:
    """Against a brute-force reading, with blocks as short as one posting (a term's first
    posting may be below the one before it; within a term each must rise)."""
    from citeqa.retrieval.bm25 import _ascending_within

    rng = np.random.default_rng(0)
    for _ in range(300):
        lens = rng.integers(0, 6, rng.integers(1, 12))
        indptr = np.concatenate([[0], np.cumsum(lens)])
        ids = np.concatenate([np.sort(rng.choice(20, n, replace=False)) for n in lens] +
                             [np.zeros(0, int)]).astype(np.int32)
        if len(ids) > 1 and rng.random() < 0.5:
            i, j = rng.integers(0, len(ids), 2)
            ids[i], ids[j] = ids[j], ids[i]
        truth = all(np.all(np.diff(ids[a:b]) > 0)
                    for a, b in zip(indptr[:-1], indptr[1:], strict=True))
        for block in (1, 2, 3, 1 << 22):
            assert _ascending_within(indptr, ids, block) == truth, (indptr, ids, block)
