"""Building indexes: summaries, empty corpora, atomic replacement, and SIGKILL mid-build."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import ConfigError, EmptyCorpusError, IndexError_
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


def test_every_step_of_a_build_shows_its_progress(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    build_index_from_documents(OLD, tmp_path / "idx", CFG, progress=True,
                               embedder=HashEmbedder(dim=16))
    out, err = capsys.readouterr()
    assert out == ""
    for step in ("chunking", "BM25", "embedding"):  # none of them silent on a large corpus
        assert f"{step}: 100%" in err, err


def test_empty_corpus_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EmptyCorpusError, match="no documents to index; pass"):
        build_index_from_documents([], tmp_path / "idx", CFG, progress=False)
    blank = [Document("b", "B", "b.txt", " \n\n "), Document("z", "Z", "z.txt", "\u200b\u00ad")]
    with pytest.raises(EmptyCorpusError, match="the 2 documents hold no text"):
        build_index_from_documents(blank, tmp_path / "idx", CFG, progress=False)
    assert not (tmp_path / "idx").exists()


def test_a_blank_document_is_skipped_as_index_add_refuses_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A document of invisible characters took a passage of them (and a blank one was listed
    with none), where a file of them is skipped and ``index add`` refuses one."""
    docs = [Document("z", "Z", "z.txt", "\u200b\u200b \n"), Document("w", "W", "w.txt", "\t "),
            Document("a", "A", "a.txt", "Alpacas hum.")]
    with caplog.at_level(logging.WARNING):
        summary = build_index_from_documents(docs, tmp_path / "idx", CFG, progress=False)
    assert (summary.documents, summary.passages) == (1, 1)
    assert list(Index.load(tmp_path / "idx").documents) == ["a"]
    assert "skipping document z (z.txt): it has no text" in caplog.text


def test_a_merged_build_of_nothing_fails_as_a_local_one(tmp_path: Path) -> None:
    from citeqa.ingest import Skipped
    from citeqa.retrieval.dense import DenseSpec
    from citeqa.retrieval.merge import Merged, write_merged

    missing = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    with pytest.raises(EmptyCorpusError) as local:
        build_index(missing, tmp_path / "idx", CFG, progress=False)
    merged = Merged(skipped=[Skipped(m, "not found") for m in missing])
    with pytest.raises(EmptyCorpusError) as rayed:
        write_merged(merged, tmp_path / "idx", CFG, DenseSpec(), n_sources=2, progress=False)
    assert "none of the 2 sources" in str(local.value) and "a.txt" in str(rayed.value)
    assert str(rayed.value).split(" (")[0] == str(local.value).split(" (")[0]
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


def test_a_build_refuses_a_non_index_before_loading_anything(tmp_path: Path) -> None:
    """The refusal came after loading and embedding every source (hours with real models)."""
    from citeqa.retrieval.builder import build_index

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(IndexError_, match="refusing to replace"):  # not "no documents"
        build_index([str(tmp_path / "nothing-here.txt")], out, CFG, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"


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


# -- sharded builds (citeqa.distributed) in this process: equal to the local build, resumable --

import json  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from citeqa.distributed import InProcessExecutor, build_index_sharded  # noqa: E402
from citeqa.retrieval.bm25 import BM25Index, concat_counts, count_terms  # noqa: E402

SHARD_CHARS = 1500  # a few documents per shard: every file makes several
TOPICS = {
    "stars": "star galaxy telescope orbit planet comet nebula light year gravity",
    "bread": "flour yeast oven dough crust bake knead loaf salt water",
    "ships": "hull sail harbour anchor mast captain tide voyage deck crew",
    "music": "chord melody rhythm violin piano tempo score choir note scale",
    "rocks": "granite basalt quartz mineral crystal magma erosion fossil layer sediment",
}


def write_corpus(directory: Path, seed: int = 0) -> list[str]:
    """A small mixed corpus and the sources naming it: JSONL files of topical documents (a
    duplicate id and a bad line among them), a text file, Markdown, and an unsupported file."""
    rng = np.random.default_rng(seed)
    common = "the a of and with from near under over while".split()
    directory.mkdir(parents=True)
    for f, name in enumerate(["a.jsonl", "b.jsonl", "c.jsonl"]):
        lines = []
        for d in range(25):
            topic = list(TOPICS)[(f * 25 + d) % len(TOPICS)]
            words = TOPICS[topic].split() + common
            sentences = [" ".join(rng.choice(words, 9)).capitalize() + "." for _ in range(5)]
            doc_id = "shared-id" if d == 7 else f"{name[0]}{d}"
            lines.append(json.dumps({"id": doc_id, "title": f"{topic} {d}",
                                     "text": " ".join(sentences)}))
        lines.insert(3, "{not json")
        (directory / name).write_text("\n".join(lines) + "\n")
    (directory / "notes.txt").write_text("Telescope notes.\n\nThe comet passed the planet. " * 4)
    (directory / "guide.md").write_text(  # its badge, a passage of markup alone: not indexed
        "[![ci](https://ci.example/b.svg)](https://ci.example)\n\n"
        "# Baking\n\nKnead the dough, then bake the loaf.\n")
    (directory / "image.bin").write_bytes(b"\x00\x01")
    return [str(directory), str(directory / "missing.txt")]


def queries_for(index: Index, n: int = 40) -> list[str]:
    """Queries drawn from the indexed passages (a few of their words each)."""
    rng = np.random.default_rng(1)
    passages = index.passages
    return [" ".join(rng.choice(passages[i].text.split(), 4))
            for i in rng.integers(0, len(passages), n)]


def assert_same_index(local: Path, other: Path, *, atol: float = 1e-6) -> None:
    """Same documents, passages and BM25 statistics; vectors equal up to ``atol``."""
    a, b = Index.load(local), Index.load(other)
    assert list(a.documents.values()) == list(b.documents.values())
    assert a.passages == b.passages
    assert a.bm25.vocab == b.bm25.vocab and a.bm25.params == b.bm25.params
    for name in ("indptr", "doc_ids", "tf", "idf", "doc_len"):
        np.testing.assert_array_equal(getattr(a.bm25, name), getattr(b.bm25, name), name)
    for key in ("counts", "embedding", "settings", "dense_index"):
        assert a.manifest[key] == b.manifest[key], key
    assert a.dense is not None and b.dense is not None
    np.testing.assert_allclose(b.dense.vectors(), a.dense.vectors(), atol=atol)


def test_sharded_build_equals_local_build(tmp_path: Path) -> None:
    sources = write_corpus(tmp_path / "src")
    local = build_index(sources, tmp_path / "local", CFG, progress=False)
    sharded = build_index_sharded(sources, tmp_path / "sharded", CFG, progress=False,
                                  executor=InProcessExecutor(), shard_chars=SHARD_CHARS)
    assert sharded.shards > 5 and sharded.shards_reused == 0
    assert (sharded.documents, sharded.passages) == (local.documents, local.passages)
    assert {(s.source, s.reason) for s in sharded.skipped} == {
        (s.source, s.reason) for s in local.skipped}
    assert any("duplicate doc_id" in s.reason for s in sharded.skipped)
    assert_same_index(tmp_path / "local", tmp_path / "sharded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "sharded", "src"]  # no work
    index = Index.load(tmp_path / "local")
    [guide] = [d.doc_id for d in index.documents.values() if d.source.endswith("guide.md")]
    assert [p.text for p in index.passages if p.doc_id == guide] == [
        "# Baking\n\nKnead the dough, then bake the loaf."]


def test_a_sharded_build_shows_each_shards_embedding(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A --resumable build showed a count of shards and nothing while one embedded: minutes
    without a word for a default shard on a CPU."""
    build_index_sharded(write_corpus(tmp_path / "src"), tmp_path / "idx", CFG, progress=True,
                        executor=InProcessExecutor(HashEmbedder(dim=16)), shard_chars=2_000)
    err = capsys.readouterr().err
    assert err.count("embedding: 100%") >= 2 and "shards:" in err, err


def test_sharded_build_leaves_other_things_in_a_given_work_dir(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    build_index_sharded(write_corpus(tmp_path / "src"), tmp_path / "idx", CFG, progress=False,
                        executor=InProcessExecutor(), work_dir=work)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_a_work_dir_holding_shards_or_staging_no_build_left_is_refused_and_kept(
        tmp_path: Path) -> None:
    """The build cleared <work>/shards and <work>/staging at its start and end whatever they
    held: a user's folders of those names were deleted, and the work dir with them."""
    sources = write_corpus(tmp_path / "src")
    for name in ("shards", "staging"):
        work = tmp_path / f"work-{name}"
        (work / name / "mine").mkdir(parents=True)
        (work / name / "mine" / "notes.txt").write_text("precious")
        with pytest.raises(ConfigError, match=f"holds {name}, which no citeqa build left"):
            build_index_sharded(sources, tmp_path / "idx", CFG, progress=False,
                                executor=InProcessExecutor(), work_dir=work)
        assert (work / name / "mine" / "notes.txt").read_text() == "precious"
    assert not (tmp_path / "idx").exists()


def test_a_work_dir_inside_a_source_folder_is_refused(tmp_path: Path) -> None:
    """A rerun read the shards an interrupted run kept there as documents: their copies of the
    corpus beat the real files (stale text), and their JSON files were 'skipped'."""
    sources = write_corpus(tmp_path / "src")
    embedder = CountingEmbedder()
    for work in (tmp_path / "src" / "build", tmp_path / "src"):
        with pytest.raises(ConfigError, match="inside the source folder"):
            build_index_sharded(sources, tmp_path / "idx", CFG, progress=False,
                                executor=InProcessExecutor(embedder), work_dir=work)
    assert embedder.embedded == 0 and not (tmp_path / "src" / "build").exists()
    # a hidden one is never read as documents (a walk leaves hidden folders out): the default
    # .OUT.build of an --out inside the source folder was refused, as "--work-dir None"
    summary = build_index_sharded(sources, tmp_path / "src" / "idx", CFG, progress=False,
                                  executor=InProcessExecutor(embedder))
    assert summary.documents == build_index(sources, tmp_path / "plain", CFG,
                                            progress=False).documents
    with pytest.raises(ConfigError, match=f"--work-dir {tmp_path / 'src' / 'build'} is inside"):
        build_index_sharded(sources, tmp_path / "idx", CFG, progress=False,
                            executor=InProcessExecutor(), work_dir=tmp_path / "src" / "build")


def test_a_work_dir_that_is_the_index_or_its_folder_is_refused(tmp_path: Path) -> None:
    """The work directory's run lock and the index's swap lock are flocks on the folder: a
    work dir that was the folder --out is in hung the build at its swap."""
    sources = write_corpus(tmp_path / "src")
    for work in (tmp_path, tmp_path / "idx"):
        with pytest.raises(ConfigError, match="give the shards a folder of their own"):
            build_index_sharded(sources, tmp_path / "idx", CFG, progress=False,
                                executor=InProcessExecutor(), work_dir=work)


def test_a_work_dir_inside_the_index_is_refused_before_any_work(tmp_path: Path) -> None:
    """The swap refused an --out holding the work dir only after every shard was embedded."""
    sources = write_corpus(tmp_path / "src")
    embedder = CountingEmbedder()
    with pytest.raises(ConfigError, match="inside --out"):
        build_index_sharded(sources, tmp_path / "idx", CFG, progress=False,
                            executor=InProcessExecutor(embedder), work_dir=tmp_path / "idx" / "w")
    assert embedder.embedded == 0 and not (tmp_path / "idx").exists()


def test_a_build_that_fails_before_any_shard_leaves_no_work_dir(tmp_path: Path) -> None:
    """A connection refused (or any failure before a shard was finished) left a hidden
    .OUT.build holding only its marker."""
    class Fails(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            raise ConfigError("could not join Ray")

    with pytest.raises(ConfigError, match="could not join Ray"):
        build_index_sharded(write_corpus(tmp_path / "src"), tmp_path / "idx", CFG,
                            progress=False, executor=Fails())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_rerun_does_not_keep_the_blocks_an_interrupted_run_staged(tmp_path: Path) -> None:
    """Each interrupted run left its staged blocks (a copy of the corpus) under new names."""
    from citeqa.distributed.sharded import default_work_dir

    staging = default_work_dir(tmp_path / "idx") / "staging"
    seen: list[list[str]] = []

    class Looks(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            seen.append(sorted(p.name for p in staging.iterdir()) if staging.exists() else [])
            return super().run(items, job, progress=progress)

    staging.mkdir(parents=True)
    (staging / "stale-block").mkdir()
    build_index_sharded(write_corpus(tmp_path / "src"), tmp_path / "idx", CFG, progress=False,
                        executor=Looks())
    assert seen == [[]]


def test_two_urls_to_one_page_make_one_document_as_in_a_plain_build() -> None:
    """merge_shards drops the second URL's copy of a page as load_sources does."""
    from citeqa.ingest import Skipped, same_page
    from citeqa.retrieval.bm25 import count_terms
    from citeqa.retrieval.merge import merge_shards
    from citeqa.retrieval.shards import Shard
    from citeqa.text import tokenize

    def shard(key: str, doc: Document) -> Shard:
        return Shard(key, [doc], [], np.asarray([[0, len(doc.text)]], dtype=np.int64),
                     np.zeros(1, dtype=np.int64), count_terms([tokenize(doc.text)]), None, None)

    page = "https://example.org/page"
    first = Document("id-old", "Page", page, "The page text.")
    second = Document("id-page", "Page", page, "The page text.")
    merged = merge_shards([shard("a", first), shard("b", second)], dense=False,
                          urls=["https://example.org/old", page])
    assert [d.doc_id for d in merged.documents] == ["id-old"]
    assert merged.skipped == [same_page(page, "https://example.org/old", page)]
    assert isinstance(merged.skipped[0], Skipped) and len(merged.spans) == 1
    # files (no URL) with one source are not pages: both kept, as load_sources keeps them
    merged = merge_shards([shard("a", first), shard("b", second)], dense=False)
    assert len(merged.documents) == 2
    # another spelling of the page's address is the same page (a fragment, the host's case)
    third = Document("id-frag", "Page", "https://EXAMPLE.org/page#top", "The page text.")
    merged = merge_shards([shard("a", first), shard("c", third)], dense=False,
                          urls=["https://example.org/old", "https://example.org/page#top"])
    assert [d.doc_id for d in merged.documents] == ["id-old"]


def test_a_staging_worker_reads_relative_paths_from_the_drivers_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster's worker starts in another folder: a relative source was skipped as missing
    and the build swapped in an index without it (exit 0)."""
    from citeqa.distributed.ray_engine import _stage_row
    from citeqa.retrieval.shards import ShardJob, read_shard, write_marker

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("Granite is an intrusive igneous rock.")
    job = ShardJob(CFG, str(tmp_path / "work"), token="t", cwd=str(tmp_path))
    write_marker(job)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the worker's own folder
    rows = _stage_row({"item": 0, "url": False, "source": "src/a.txt"}, job)
    assert [r["error"] for r in rows] == [""], rows
    assert Path.cwd() == tmp_path / "elsewhere"  # put back
    from citeqa.retrieval.shards import Staged, finish_shard

    result = finish_shard(Staged(0, rows[0]["block"], rows[0]["key"], rows[0]["staging"]), job,
                          HashEmbedder())
    doc = read_shard(job.shards / result.key).documents[0]
    assert doc.source == "src/a.txt"  # as the command line named it: ids as a plain build's
    missing = ShardJob(CFG, str(tmp_path / "work"), token="t", cwd=str(tmp_path / "gone"))
    rows = _stage_row({"item": 0, "url": False, "source": "src/a.txt"}, missing)
    assert rows[0]["error"] == "ConfigError" and "not on" in rows[0]["message"]


def test_a_workers_unexpected_failure_is_one_citeqa_error(tmp_path: Path) -> None:
    """An OSError (a full disk) or a bug in a worker ended the command in Ray's traceback."""
    from citeqa.distributed.ray_engine import _raise_row_error, _stage_row
    from citeqa.errors import CiteqaError
    from citeqa.retrieval.shards import ShardJob, write_marker

    (tmp_path / "a.txt").write_text("Basalt is a volcanic rock.")
    job = ShardJob(CFG, str(tmp_path / "work"), token="t")
    write_marker(job)
    job.staging.write_text("a file where the staging folder belongs")
    rows = _stage_row({"item": 0, "url": False, "source": str(tmp_path / "a.txt")}, job)
    assert rows[0]["error"] == "CiteqaError" and "a build worker on" in rows[0]["message"]
    with pytest.raises(CiteqaError, match="Error"):
        _raise_row_error(rows[0])


def test_the_drivers_allocator_setting_travels_with_the_job(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray's workers on other nodes do not see the driver's environment: the job carries
    CITEQA_KEEP_FREED_MEMORY to its embedding actors."""
    seen: list[bool] = []

    class Records(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            seen.append(job.keep_freed_memory)
            return super().run(items, job, progress=progress)

    sources = write_corpus(tmp_path / "src")
    for value, out in (("0", "a"), ("1", "b")):
        monkeypatch.setenv("CITEQA_KEEP_FREED_MEMORY", value)
        build_index_sharded(sources, tmp_path / out, CFG, progress=False, executor=Records())
    assert seen == [False, True]


def test_a_second_sharded_build_to_the_same_out_is_refused_while_one_runs(
        tmp_path: Path) -> None:
    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    refused: list[str] = []

    class BuildsAgainMidway(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            with pytest.raises(ConfigError, match="another index build .* another --work-dir"
                               ) as e:
                build_index_sharded(sources, out, CFG, progress=False,
                                    executor=InProcessExecutor())
            refused.append(str(e.value))
            return super().run(items, job, progress=progress)

    summary = build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                                  executor=BuildsAgainMidway())
    assert refused and summary.shards > 5 and summary.shards_reused == 0
    build_index(sources, tmp_path / "local", CFG, progress=False)
    assert_same_index(tmp_path / "local", out)  # the first build, undisturbed


class CountingEmbedder(HashEmbedder):
    """Counts the passages it embeds; raises once it has embedded ``fail_after`` batches."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.calls, self.embedded, self.fail_after = 0, 0, fail_after

    def embed(self, texts, *, batch_size=32, progress=False):  # type: ignore[override]
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.embedded += len(texts)
        return super().embed(texts, batch_size=batch_size, progress=progress)


def test_sharded_build_resumes_without_embedding_finished_shards(tmp_path: Path) -> None:
    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)
    first = CountingEmbedder(fail_after=3)
    with pytest.raises(RuntimeError, match="killed"):
        build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                            executor=InProcessExecutor(first))
    assert set(Index.load(out).documents) == {"old"}  # the previous index, untouched
    second = CountingEmbedder()
    summary = build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                                  executor=InProcessExecutor(second))
    assert summary.shards_reused == 3
    once = CountingEmbedder()  # an uninterrupted build, for the count
    build_index_sharded(sources, tmp_path / "once", CFG, progress=False,
                        shard_chars=SHARD_CHARS, executor=InProcessExecutor(once))
    assert first.calls == 3 and second.calls == once.calls - 3  # no shard embedded twice
    assert first.embedded + second.embedded == once.embedded
    build_index(sources, tmp_path / "local", CFG, progress=False)
    assert_same_index(tmp_path / "local", out)


def test_a_damaged_shard_is_deleted_so_the_rerun_makes_it_again(tmp_path: Path) -> None:
    """A finished shard whose files a failing disk truncated stopped every rerun ("delete it
    and rerun"): it is deleted with the error, and the rerun makes only it again."""
    from citeqa.distributed.sharded import default_work_dir

    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="killed"):
        build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                            executor=InProcessExecutor(CountingEmbedder(fail_after=3)))
    shards = sorted((default_work_dir(out) / "shards").iterdir())
    assert len(shards) == 3
    vectors = shards[1] / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:40])
    with pytest.raises(IndexError_, match="it was deleted: run the same command again"):
        build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                            executor=InProcessExecutor())
    assert not shards[1].exists() and not out.exists()
    summary = build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                                  executor=InProcessExecutor())
    assert summary.shards_reused == summary.shards - 1  # all but the damaged one
    build_index(sources, tmp_path / "local", CFG, progress=False)
    assert_same_index(tmp_path / "local", out)


_SHARDED_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded
    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))
    build_index_sharded([sys.argv[2]], Path(sys.argv[1]), cfg, progress=False,
                        executor=InProcessExecutor(), shard_chars=1500)
    """
)


def test_sigkill_mid_sharded_build_keeps_old_index_and_resumes(tmp_path: Path) -> None:
    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)
    env = {**os.environ, "CITEQA_TEST_PAUSE_AT": "shard_written", "CITEQA_TEST_PAUSE_S": "60"}
    child = subprocess.Popen([sys.executable, "-c", _SHARDED_CHILD, str(out), sources[0]],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        for line in child.stderr:
            if line.strip() == "citeqa-test-pause shard_written":
                break
        else:
            pytest.fail(f"the child never finished a shard (rc {child.wait()})")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert set(Index.load(out).documents) == {"old"}
    summary = build_index_sharded(sources, out, CFG, progress=False, shard_chars=SHARD_CHARS,
                                  executor=InProcessExecutor())
    assert summary.shards_reused == 1
    assert "old" not in Index.load(out).documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "src"]


def test_sharded_build_of_nothing_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EmptyCorpusError, match="none of the 1 sources"):
        build_index_sharded([str(tmp_path / "missing.txt")], tmp_path / "idx", CFG,
                            progress=False, executor=InProcessExecutor())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sharded_build_refuses_a_non_index_before_working(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(IndexError_, match="refusing to replace"):
        build_index_sharded([str(tmp_path)], tmp_path / "mine", CFG, progress=False,
                            executor=InProcessExecutor())
    assert not (tmp_path / ".mine.build").exists()


def test_a_worker_that_cannot_see_the_work_dir_says_so(tmp_path: Path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.retrieval.shards import ShardJob, check_marker, write_marker

    write_marker(ShardJob(CFG, str(tmp_path / "work"), token="driver"))
    with pytest.raises(ConfigError, match="does not see the work directory.*--work-dir"):
        check_marker(ShardJob(CFG, str(tmp_path / "work"), token="another build"))


_TOKENS = st.lists(st.lists(st.sampled_from(list("abcdefgh")), max_size=8), max_size=12)


@settings(max_examples=60, deadline=None)
@given(corpus=_TOKENS, cuts=st.lists(st.integers(0, 12), max_size=3),
       dropped=st.sets(st.integers(0, 11)))
def test_shard_term_counts_merge_to_the_one_pass_index(
    corpus: list[list[str]], cuts: list[int], dropped: set[int]
) -> None:
    """Counting passages in parts, dropping some, and concatenating gives the BM25 arrays that
    one pass over the kept passages gives (vocabulary order included)."""
    bounds = sorted({0, len(corpus), *(c for c in cuts if c <= len(corpus))})
    parts = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        keep = np.asarray([i - lo for i in range(lo, hi) if i not in dropped], dtype=np.int64)
        parts.append(count_terms(corpus[lo:hi]).select(keep))
    kept = [t for i, t in enumerate(corpus) if i not in dropped]
    merged = BM25Index.from_counts(concat_counts(parts))
    direct = BM25Index.build(kept)
    assert merged.vocab == direct.vocab and merged.params == direct.params
    for name in ("indptr", "doc_ids", "tf", "idf", "doc_len"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(direct, name), name)


def test_without_ray_the_ray_build_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.distributed import RayExecutor
    from citeqa.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        RayExecutor()
    (tmp_path / "a.txt").write_text("Some text to index.")
    result = CliRunner().invoke(app, ["index", "build", str(tmp_path / "a.txt"), "--out",
                                      str(tmp_path / "idx"), "--ray", "local"])
    assert result.exit_code == 2
    assert "pip install -e '.[ray]'" in result.output
    assert not (tmp_path / "idx").exists()


def test_ray_pool_sizes() -> None:
    from citeqa.distributed.ray_engine import RayOptions, plan_pool

    gpu = plan_pool(RayOptions(), cpus=32, gpus=4, dense=True)
    assert (gpu["actors"], gpu["device"], gpu["actor_gpus"]) == (4, "cuda", 1.0)
    cpu = plan_pool(RayOptions(cpus_per_embedder=2), cpus=16, gpus=0, dense=True)
    assert (cpu["actors"], cpu["device"], cpu["threads"], cpu["stage_tasks"]) == (8, "cpu", 2, 2)
    assert plan_pool(RayOptions(), cpus=2, gpus=0, dense=True)["actors"] == 2
    assert plan_pool(RayOptions(embedders=3), cpus=2, gpus=8, dense=False)["device"] == "cpu"
    # an actor larger than any node: refused (Ray would wait for such a node for ever)
    with pytest.raises(ConfigError, match="asks for 4 CPUs .* largest node .* has 2"):
        plan_pool(RayOptions(cpus_per_embedder=4), cpus=2, gpus=0, dense=True)
    with pytest.raises(ConfigError, match="has 2"):  # 8 CPUs in all, 2 per node
        plan_pool(RayOptions(cpus_per_embedder=4), cpus=8, gpus=0, dense=True, node_cpus=2)
    # GPUs spread one per node cannot hold a two-GPU actor: the CPUs embed
    spread = plan_pool(RayOptions(gpus_per_embedder=2, cpus_per_embedder=1), cpus=8, gpus=4,
                       dense=True, node_cpus=4, node_gpus=1)
    assert (spread["device"], spread["actor_gpus"], spread["actors"]) == ("cpu", 0.0, 8)


def test_ray_local_never_joins_a_running_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given no address, ray.init joins what RAY_ADDRESS or a running `ray start` names: --ray
    local (documented as Ray inside the command) did so."""
    import types

    from citeqa.distributed.ray_engine import RayOptions, connected

    calls: list[dict] = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, shutdown=lambda: None,
                                 init=lambda **kw: calls.append(kw))
    monkeypatch.setattr("citeqa.distributed.ray_engine.require_ray", lambda: fake)
    with connected(RayOptions("local", num_cpus=2)):
        pass
    assert calls == [{"address": "local", "num_cpus": 2, "include_dashboard": False}]


def test_ctrl_c_while_ray_starts_stops_what_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its dashboard and runtime-env agents outlived a Ctrl-C during ray.init."""
    import types

    from citeqa.distributed.ray_engine import RayOptions, connected

    shut: list[bool] = []

    def init(**_kw: object) -> None:
        raise KeyboardInterrupt

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init,
                                 shutdown=lambda: shut.append(True))
    monkeypatch.setattr("citeqa.distributed.ray_engine.require_ray", lambda: fake)
    with pytest.raises(KeyboardInterrupt), connected(RayOptions("local", num_cpus=2)):
        pass
    assert shut == [True]

    def timed_out(**_kw: object) -> None:  # a start that fails part way
        raise Exception("a node timed out starting")  # (Ray raises bare Exceptions)

    fake.init = timed_out
    with pytest.raises(ConfigError, match="could not start or join Ray"), connected(
            RayOptions("local", num_cpus=2)):
        pass
    assert shut == [True, True]


def test_a_cluster_address_where_nothing_answers_fails_at_once() -> None:
    """Ray retried a wrong HOST:PORT for many minutes before giving up."""
    import socket

    from citeqa.distributed.ray_engine import check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")  # something answers: Ray's to judge
        check_reachable(f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="nothing answers at 127.0.0.1:"):
        check_reachable(f"127.0.0.1:{port}")  # closed now: refused at once
    check_reachable("auto")  # Ray finds it, or says so
    check_reachable("nonsense")  # not HOST:PORT: Ray's own message


def test_a_cluster_address_that_never_answers_is_given_up_after_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An address that drops packets answers neither yes nor no: the wait is bounded."""
    from citeqa.distributed.ray_engine import CONNECT_S, check_reachable

    waited: list[float] = []

    def silent(address, timeout):  # type: ignore[no-untyped-def]
        waited.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr("socket.create_connection", silent)
    with pytest.raises(ConfigError, match=r"nothing answers at 10\.0\.0\.9:6379 \(timed out\)"):
        check_reachable("10.0.0.9:6379")
    assert waited == [CONNECT_S] and CONNECT_S <= 10


def test_a_document_with_the_text_of_another_is_indexed_and_said(tmp_path: Path) -> None:
    """A copied file (a text file's title is its name, so titles differ) filled two places of
    every result it was found in, and no build said so."""
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.retrieval.builder import twins

    same = "The comet passed the planet at dawn."
    docs = [Document("a", "a.txt", "d/a.txt", same), Document("b", "Other", "d/b.txt", "Else."),
            Document("c", "c.txt", "d/c.txt", same), Document("e", "E", "d/e.txt", " "),
            Document("f", "F", "d/f.txt", " "), Document("g", "G", "d/g.txt", same + " ")]
    assert twins(docs) == [("d/a.txt", "d/c.txt")]  # blank documents hold no passage
    summary = build_index_from_documents(docs, tmp_path / "idx", CFG, progress=False)
    assert summary.twins == [("d/a.txt", "d/c.txt")] and summary.documents == 4  # (less blanks)

    def said(source: Path, extra: list[str]) -> list[str]:
        out = tmp_path / f"idx-{len(list(tmp_path.iterdir()))}"
        result = CliRunner().invoke(app, ["index", "build", str(source), "--out", str(out),
                                          "--bm25-only", "--no-progress", *extra])
        assert result.exit_code == 0, result.output
        return [line for line in result.output.splitlines() if line.startswith("warning:")]

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"copy{i}.txt").write_text(same)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(7):  # seven texts, each in two files
        for copy in "ab":
            (pairs / f"{i}{copy}.txt").write_text(f"Text number {i} of the pairs.")
    records = tmp_path / "records.jsonl"  # records naming one source: two texts, twice each
    records.write_text("".join(json.dumps({"id": i, "text": text, "source": "notes.txt"}) + "\n"
                               for i, text in (("r1", "A."), ("r2", "A."), ("r3", "B."),
                                               ("r4", "B."))))
    for extra in ([], ["--resumable"]):  # a sharded build says the same
        assert said(src, extra) == [
            f"warning: 8 documents have one text ({src / 'copy0.txt'}, {src / 'copy1.txt'}, "
            f"{src / 'copy2.txt'} and 5 more); all are indexed, and a search shows one of each of "
            "their passages, but copies take room and skew BM25's word counts (leave one in "
            "and build again)"]
        assert said(pairs, extra) == [
            f"warning: {pairs / f'{i}b.txt'} has the text of {pairs / f'{i}a.txt'}; both are "
            "indexed, and a search shows one of each of their passages, but copies take room "
            "and skew BM25's word counts (leave one out and build again)" for i in range(5)] + [
            "warning: 2 more documents have the text of another, and each is indexed beside it"]
        assert said(records, extra) == [
            "warning: 2 documents of notes.txt have one text; both are indexed, and a search "
            "shows one of each of their passages, but copies take room and skew BM25's word "
            "counts (leave one out and build again)"] * 2


def test_a_sharded_build_cut_short_after_its_swap_removes_its_own_work_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C once the new index was in left a --work-dir full of finished shards (only the
    default one was removed), and nothing said so."""
    from typer.testing import CliRunner

    import citeqa.distributed
    from citeqa.cli import app
    from citeqa.retrieval.shards import MARKER

    sources = write_corpus(tmp_path / "src")
    work = tmp_path / "work"

    def swapped_then_interrupted(srcs, out, cfg, **_kw):
        (work / "shards" / "0-0").mkdir(parents=True)  # what the build had finished
        (work / MARKER).write_text("{}")
        build_index(srcs, out, cfg, progress=False)  # its swap
        raise KeyboardInterrupt

    monkeypatch.setattr(citeqa.distributed, "build_index_sharded", swapped_then_interrupted)
    result = CliRunner().invoke(app, ["index", "build", sources[0], "--out",
                                      str(tmp_path / "idx"), "--bm25-only", "--resumable",
                                      "--work-dir", str(work)])
    assert result.exit_code == 130 and "interrupted once the new index was in" in result.output
    assert not work.exists() and Index.load(tmp_path / "idx").documents


def test_a_build_refused_for_another_running_never_says_to_delete_its_shards(
        tmp_path: Path) -> None:
    """The lock's refusal went on: "the 17 shards finished so far are kept in ...: run the
    same command again to reuse them (or delete it to start over)", under a running build."""
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.distributed.sharded import default_work_dir
    from citeqa.journal import run_lock
    from citeqa.retrieval.shards import MARKER

    sources = write_corpus(tmp_path / "src")
    work = default_work_dir(tmp_path / "idx")
    (work / "shards" / "0-0").mkdir(parents=True)
    (work / MARKER).write_text("{}")
    with run_lock(work, "index build"):  # another build, running
        result = CliRunner().invoke(app, ["index", "build", sources[0], "--out",
                                          str(tmp_path / "idx"), "--bm25-only", "--resumable"])
    assert result.exit_code == 2 and "another index build is writing to" in result.output
    assert "delete" not in result.output and "shards finished" not in result.output
    assert (work / "shards" / "0-0").is_dir()


def test_a_build_cut_short_after_another_writers_swap_keeps_its_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `index add` (or a server's change) swapped in during a sharded build, then Ctrl-C:
    the build said its own new index was in, and deleted its finished shards."""
    from typer.testing import CliRunner

    import citeqa.distributed
    from citeqa.cli import app
    from citeqa.retrieval.shards import MARKER

    sources = write_corpus(tmp_path / "src")
    out, work = tmp_path / "idx", tmp_path / "work"
    build_index(sources, out, CFG, progress=False)
    build_index(sources, tmp_path / "theirs", CFG, progress=False)

    def interrupted_after_another_swap(*_a, **_kw):
        (work / "shards" / "0-0").mkdir(parents=True)  # what the build had finished
        (work / MARKER).write_text("{}")
        os.rename(out, tmp_path / "gone")  # another process's swap, with its own index
        os.rename(tmp_path / "theirs", out)
        raise KeyboardInterrupt

    monkeypatch.setattr(citeqa.distributed, "build_index_sharded",
                        interrupted_after_another_swap)
    result = CliRunner().invoke(app, ["index", "build", sources[0], "--out", str(out),
                                      "--bm25-only", "--resumable", "--work-dir", str(work)])
    assert result.exit_code == 130, result.output
    assert "once the new index was in" not in result.output
    assert f"the 1 shard finished so far is kept in {work}" in result.output
    assert (work / "shards" / "0-0").is_dir()


def test_a_ctrl_c_just_after_the_swap_is_told_as_after_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between the rename that swapped the index in and the count of swaps read as
    before it: 'run the same command again to build it', the new index already in."""
    from pathlib import Path as RealPath

    from typer.testing import CliRunner

    from citeqa.cli import app

    sources = write_corpus(tmp_path / "src")
    real = RealPath.rename

    def then_interrupted(self: RealPath, target: object) -> RealPath:
        done = real(self, target)
        if ".tmp-" in self.name:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(RealPath, "rename", then_interrupted)
    result = CliRunner().invoke(app, ["index", "build", sources[0], "--out",
                                      str(tmp_path / "idx"), "--bm25-only"])
    assert result.exit_code == 130 and "once the new index was in" in result.output, (
        result.output)
    assert "the old one" not in result.output  # there was none
    again = CliRunner().invoke(app, ["index", "build", sources[0], "--out",
                                     str(tmp_path / "idx"), "--bm25-only"])  # over one now
    assert again.exit_code == 130 and (
        "holds it (what is left of the old one goes at the next command)" in again.output), (
        again.output)


@pytest.mark.parametrize("at", ["before_the_second", "mid_swap", "after_the_first"])
def test_a_ctrl_c_between_the_two_renames_puts_the_old_index_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str) -> None:
    """A Ctrl-C after the old index was moved aside, before the new one came in, left no
    index at --out while the command said it was 'not left half-written' (the next command
    restored it; meanwhile an --if-missing build could write over it)."""
    from pathlib import Path as RealPath

    from typer.testing import CliRunner

    import citeqa.retrieval.store as store
    from citeqa.cli import app

    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    build_index(sources, out, CFG, progress=False)
    before = Index.load(out).version
    real, pause = RealPath.rename, store.test_pause

    def rename(self: RealPath, target: object) -> RealPath:
        if at == "before_the_second" and ".tmp-" in self.name:
            raise KeyboardInterrupt  # before this rename: the old index is aside
        done = real(self, target)
        if at == "after_the_first" and self.name == "idx":
            raise KeyboardInterrupt  # the old index just moved aside
        return done

    def paused(name: str) -> None:
        if at == "mid_swap" and name == "mid_swap":
            raise KeyboardInterrupt  # (where the test pause waits for a signal)
        pause(name)

    monkeypatch.setattr(RealPath, "rename", rename)
    monkeypatch.setattr(store, "test_pause", paused)
    result = CliRunner().invoke(app, ["index", "build", sources[0], "--out", str(out),
                                      "--bm25-only"])
    monkeypatch.setattr(RealPath, "rename", real)
    assert result.exit_code == 130 and "is not left half-written" in result.output
    assert (out / "manifest.json").is_file() and Index.load(out).version == before
