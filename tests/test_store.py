"""The index directory: layout, manifest, verification errors, and the passage invariant."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import IndexError_
from citeqa.retrieval import Index, build_index_from_documents
from citeqa.retrieval.store import FORMAT_VERSION
from citeqa.types import Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=80))
DOCS = [
    Document("d1", "Cats", "cats.txt", "Cats sit on mats. " * 8 + "\n\nThey purr loudly."),
    Document("d2", "Dogs", "dogs.txt", "Dogs chase cats around the garden. Dogs bark."),
    Document("d3", "Empty", "empty.txt", "   \n "),
]


@pytest.fixture()
def built(tmp_path: Path) -> Path:
    out = tmp_path / "idx"
    build_index_from_documents(DOCS, out, CFG, progress=False)
    return out


def test_layout_and_manifest(built: Path) -> None:
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert names == sorted(
        ["manifest.json", "documents.jsonl", "passages.npy", "passage_doc.npy", "dense.faiss"]
        + [f"bm25/{n}.npy" for n in ("indptr", "doc_ids", "tf", "idf", "doc_len")]
        + ["bm25/vocab.json", "bm25/params.json"]
    )
    m = json.loads((built / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["embedding"] == {"model_id": "hash-bow-256", "dim": 256, "name": "hash",
                              "dtype": "fp32"}
    assert m["counts"]["documents"] == 3
    assert m["settings"]["chunk"] == {"max_chars": 80, "overlap_sentences": 0}
    assert set(m["files"]) == set(names) - {"manifest.json"}
    rows = [json.loads(line) for line in (built / "documents.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == ["d1", "d2", "d3"]
    assert np.load(built / "passages.npy").dtype == np.int64


def test_loaded_passages_reproduce_document_text(built: Path) -> None:
    index = Index.load(built)
    assert set(index.documents) == {"d1", "d2", "d3"}
    assert [p.passage_id for p in index.passages] == list(range(len(index.passages)))
    for p in index.passages:
        assert p.text == index.documents[p.doc_id].text[p.start : p.end]
        assert 0 < len(p.text) <= 80
    assert {p.doc_id for p in index.passages} == {"d1", "d2"}  # d3 is whitespace only
    assert index.dense is not None and index.dense.size == len(index.passages)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(IndexError_, match="does not exist.*citeqa index build"):
        Index.load(tmp_path / "nothing")


def test_missing_manifest(built: Path) -> None:
    (built / "manifest.json").unlink()
    with pytest.raises(IndexError_, match="no manifest"):
        Index.load(built)


def test_wrong_format_version(built: Path) -> None:
    m = json.loads((built / "manifest.json").read_text())
    m["format_version"] = 999
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="format version 999.*rebuild"):
        Index.load(built)


def test_garbled_manifest(built: Path) -> None:
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(IndexError_, match="unreadable manifest"):
        Index.load(built)


@pytest.mark.parametrize("name", ["documents.jsonl", "bm25/tf.npy", "dense.faiss"])
def test_corrupt_file_fails_checksum(built: Path, name: str) -> None:
    path = built / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexError_, match=f"{name} does not match its checksum"):
        Index.load(built)
    try:  # without checksums the damage surfaces later, if at all, but never as a crash
        Index.load(built, verify=False)
    except IndexError_:
        pass


def test_missing_file(built: Path) -> None:
    (built / "passage_doc.npy").unlink()
    with pytest.raises(IndexError_, match="missing passage_doc.npy"):
        Index.load(built)


def test_count_mismatch(built: Path) -> None:
    m = json.loads((built / "manifest.json").read_text())
    m["counts"]["passages"] += 1
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexError_, match="inconsistent"):
        Index.load(built)


_TEXT = st.lists(
    st.sampled_from(["word", "Word.", " ", "\n\n", "é", "x!", "  ", "\t", "long" * 30, "?"]),
    max_size=60,
).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=4), max_chars=st.integers(5, 120))
def test_passage_invariant_random_texts(texts: list[str], max_chars: int) -> None:
    docs = [Document(f"id{i}", f"T{i}", f"s{i}", t) for i, t in enumerate(texts)]
    cfg = RetrievalConfig(dense=False, chunk=ChunkConfig(max_chars=max_chars))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "idx"
        try:
            build_index_from_documents(docs, out, cfg, progress=False)
        except Exception as e:  # only an all-whitespace corpus may fail, and with this error
            assert type(e).__name__ == "EmptyCorpusError", e
            assert all(not t.strip() for t in texts)
            return
        index = Index.load(out)
        for p in index.passages:
            assert p.text == index.documents[p.doc_id].text[p.start : p.end]
            assert p.text.strip() == p.text and 0 < len(p.text) <= max_chars
        # every non-space character of every document is in some passage
        for d in docs:
            covered = np.zeros(len(d.text), bool)
            for p in index.passages:
                if p.doc_id == d.doc_id:
                    covered[p.start : p.end] = True
            assert all(covered[i] or c.isspace() for i, c in enumerate(d.text))
