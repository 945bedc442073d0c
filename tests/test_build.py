"""Building indexes: summaries, empty corpora, atomic replacement, and SIGKILL mid-build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import EmptyCorpusError, IndexError_
from citeqa.retrieval import HashEmbedder, Index, build_index, build_index_from_documents
from citeqa.types import Document

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))
OLD = [Document("old", "Old", "old.txt", "The old index holds this sentence.")]
NEW = [Document("new", "New", "new.txt", "The new index holds another sentence. " * 3)]


def test_summary_counts(tmp_path: Path) -> None:
    docs = [*NEW, *OLD, NEW[0]]  # a duplicate doc id is indexed once
    summary = build_index_from_documents(docs, tmp_path / "idx", CFG, progress=False)
    assert (summary.documents, summary.passages) == (2, 4)  # 3 sentences of 37 chars + 1
    assert summary.out == tmp_path / "idx" and summary.seconds > 0 and summary.skipped == []
    assert len(Index.load(tmp_path / "idx").passages) == 4


def test_empty_corpus_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EmptyCorpusError, match="no documents to index; pass"):
        build_index_from_documents([], tmp_path / "idx", CFG, progress=False)
    blank = [Document("b", "B", "b.txt", " \n\n ")]
    with pytest.raises(EmptyCorpusError, match="hold no text"):
        build_index_from_documents(blank, tmp_path / "idx", CFG, progress=False)
    assert not (tmp_path / "idx").exists()


def test_bm25_only_build_has_no_dense_file(tmp_path: Path) -> None:
    from dataclasses import replace

    build_index_from_documents(OLD, tmp_path / "idx", replace(CFG, dense=False), progress=False)
    index = Index.load(tmp_path / "idx")
    assert index.dense is None and index.manifest["embedding"] is None


def test_hnsw_build(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = replace(CFG, faiss_index="hnsw", hnsw_m=8)
    build_index_from_documents(NEW + OLD, tmp_path / "idx", cfg, progress=False)
    assert Index.load(tmp_path / "idx").dense.size == 4


def test_rebuild_replaces_and_leaves_no_siblings(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)
    build_index_from_documents(NEW, out, CFG, progress=False)
    assert set(Index.load(out).documents) == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_refuses_to_replace_a_directory_that_is_not_an_index(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(IndexError_, match="refusing to replace"):
        build_index_from_documents(OLD, out, CFG, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failed_embedding_keeps_old_index(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)

    class Broken(HashEmbedder):
        def embed(self, texts, *, batch_size=32, progress=False):  # type: ignore[override]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_index_from_documents(NEW, out, CFG, progress=False, embedder=Broken())
    assert set(Index.load(out).documents) == {"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.retrieval import build_index_from_documents
    from citeqa.types import Document
    docs = [Document("new", "New", "new.txt", "The new index holds another sentence.")]
    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))
    build_index_from_documents(docs, Path(sys.argv[1]), cfg, progress=False)
    """
)


def _kill_build_at(stage: str, out: Path) -> None:
    """Run a build in a child process, SIGKILL it when it reports reaching ``stage``."""
    env = {**os.environ, "CITEQA_TEST_PAUSE_AT": stage, "CITEQA_TEST_PAUSE_S": "60"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        assert child.stderr is not None
        for line in child.stderr:  # blocks until the child writes its pause line
            if line.strip() == f"citeqa-test-pause {stage}":
                break
            assert time.monotonic() < deadline, "the child build never reached the pause"
        else:
            pytest.fail(f"child exited without pausing at {stage} (rc {child.wait()})")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("stage", ["before_swap", "mid_swap"])
def test_sigkill_mid_build_keeps_old_index(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)
    _kill_build_at(stage, out)
    # a debris sibling is left behind ...
    assert any(p.name.startswith(".idx.") for p in tmp_path.iterdir())
    # ... yet the old index loads (mid-swap: from the renamed-away copy) ...
    assert set(Index.load(out).documents) == {"old"}
    # ... and the next build restores/cleans up and replaces it
    build_index_from_documents(NEW, out, CFG, progress=False)
    assert set(Index.load(out).documents) == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_build_index_from_sources(tmp_path: Path) -> None:
    ingest = pytest.importorskip("citeqa.ingest")
    if not hasattr(ingest, "load_sources"):
        pytest.skip("citeqa.ingest.load_sources is not written yet")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Alpha particles are helium nuclei. " * 3)
    (tmp_path / "docs" / "b.txt").write_text("Beta decay emits electrons.")
    summary = build_index(
        [str(tmp_path / "docs"), str(tmp_path / "missing.txt")],
        tmp_path / "idx",
        CFG,
        progress=False,
    )
    assert summary.documents == 2
    assert [s.source for s in summary.skipped] == [str(tmp_path / "missing.txt")]
    texts = {d.text for d in Index.load(tmp_path / "idx").documents.values()}
    assert "Beta decay emits electrons." in texts
    with pytest.raises(EmptyCorpusError, match="none of the 1 sources"):
        build_index([str(tmp_path / "missing.txt")], tmp_path / "idx2", CFG, progress=False)
