"""``citeqa index add / remove / list / info``: documents changed in place, as a build of the same
documents would index them, and nothing lost when a change is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from citeqa.cli import app
from citeqa.retrieval.updates import plan_additions
from citeqa.types import Document

# -- plan_additions (pure) --------------------------------------------------------------------


def _doc(doc_id: str, text: str = "some text", **kw: str) -> Document:
    return Document(doc_id=doc_id, title=kw.get("title", doc_id), source=kw.get("source", "s"),
                    text=text)


def test_a_plan_adds_new_documents_and_leaves_identical_ones_alone() -> None:
    indexed = {"a": _doc("a"), "b": _doc("b")}
    plan = plan_additions(indexed, [_doc("a"), _doc("c"), _doc("d")])
    assert plan.new == ("c", "d") and plan.unchanged == ("a",)
    assert [d.doc_id for d in plan.update.add] == ["c", "d"] and plan.update.remove == ()
    assert plan.replaced == () and plan.conflicts == ()


@pytest.mark.parametrize("changed", [{"text": "other text"}, {"title": "T2"}, {"source": "s2"}])
def test_a_document_indexed_with_other_content_conflicts_unless_replaced(changed) -> None:
    indexed = {"a": _doc("a"), "b": _doc("b")}
    edited = _doc("a", **{"text": "some text", **changed})
    plan = plan_additions(indexed, [edited, _doc("c")])
    assert plan.conflicts == ("a",) and plan.new == ("c",) and plan.replaced == ()
    assert [d.doc_id for d in plan.update.add] == ["c"]  # the conflict is not planned
    plan = plan_additions(indexed, [edited, _doc("c")], replace=True)
    assert plan.conflicts == () and plan.replaced == ("a",) and plan.new == ("c",)
    assert plan.update.add == (edited, _doc("c")) and plan.update.remove == ("a",)


def test_a_new_document_with_an_indexed_ones_text_is_a_lookalike() -> None:
    indexed = {"a": _doc("a", title="T")}
    plan = plan_additions(indexed, [_doc("b", title="T"), _doc("c", title="U"), _doc("a")])
    assert plan.lookalikes == (("b", "a"),) and plan.new == ("b", "c")


def test_a_fetched_page_an_indexed_source_names_is_left_out() -> None:
    indexed = {"a": _doc("a", source="https://example.org/p"), "f": _doc("f", source="notes.md")}
    given = [_doc("b", source="HTTPS://Example.org:443/p#top", text="new text"),  # its page
             _doc("c", source="https://example.org/p?x=1"),  # another page
             _doc("d", source="https://example.org/p")]  # not fetched: a record naming it
    plan = plan_additions(indexed, given, fetched={"b", "c"})
    assert plan.same_page == (("b", "a"),) and plan.new == ("c", "d")
    assert [d.doc_id for d in plan.update.add] == ["c", "d"]
    assert plan_additions(indexed, given, replace=True, fetched={"b"}).same_page == (("b", "a"),)
    assert plan_additions(indexed, given).same_page == ()


def test_a_plan_with_nothing_new_is_empty() -> None:
    indexed = {"a": _doc("a")}
    plan = plan_additions(indexed, [_doc("a")], replace=True)
    assert plan.update.add == () and plan.update.remove == () and plan.unchanged == ("a",)


# -- the commands, over a tiny index (fake embedder, no weights) ------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def _files(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return folder


FIRST = {"elbe.txt": "The river Elbe flows through Dresden and Hamburg to the North Sea.",
         "basalt.txt": "Basalt is an igneous rock formed by the rapid cooling of lava."}
MORE = {"granite.txt": "Granite is an intrusive igneous rock with large quartz crystals.",
        "moon.txt": "The Moon orbits the Earth once in about twenty-seven days."}


def _build(out: Path, *sources: Path) -> None:
    code, _, err = _cli("index", "build", "--preset", "tiny", *map(str, sources),
                        "--out", str(out), "--no-progress")
    assert code == 0, err


def _hits(index: Path, query: str) -> list[tuple[str, str, float]]:
    code, out, err = _cli("search", query, "--index", str(index), "-k", "4", "--json")
    assert code == 0, err
    return [(h["doc_id"], h["text"], round(h["score"], 6)) for h in json.loads(out)]


def _manifest(index: Path) -> str:
    return (index / "manifest.json").read_text()


def test_added_documents_are_indexed_as_a_build_of_them_all_would_be(tmp_path: Path) -> None:
    first = _files(tmp_path / "first", FIRST)
    more = _files(tmp_path / "more", MORE)
    _build(tmp_path / "grown", first)
    code, out, err = _cli("index", "add", str(more), "--index", str(tmp_path / "grown"),
                          "--no-progress")
    assert code == 0, err
    assert "added 2 documents (2 passages)" in out
    _build(tmp_path / "whole", first, more)  # the same documents in the same order
    for query in ("igneous rock", "Hamburg river", "Moon orbit days", "quartz"):
        for mode in ("bm25", "dense", "hybrid"):
            grown = CliRunner().invoke(app, ["search", query, "-i", str(tmp_path / "grown"),
                                             "--mode", mode, "--json"])
            whole = CliRunner().invoke(app, ["search", query, "-i", str(tmp_path / "whole"),
                                             "--mode", mode, "--json"])
            assert grown.exit_code == whole.exit_code == 0
            assert json.loads(grown.stdout) == json.loads(whole.stdout), (query, mode)


def test_adding_again_changes_nothing_and_an_edit_needs_replace(tmp_path: Path) -> None:
    docs = _files(tmp_path / "docs", FIRST)
    index = tmp_path / "idx"
    _build(index, docs)
    before = _manifest(index)
    code, out, err = _cli("index", "add", str(docs), "-i", str(index), "--no-progress")
    assert code == 0, err
    assert "nothing to add" in out and "2 documents already indexed as given" in out
    assert _manifest(index) == before  # not even rewritten

    (docs / "basalt.txt").write_text("Basalt is a dark volcanic rock rich in magnesium.")
    code, out, err = _cli("index", "add", str(docs), "-i", str(index), "--no-progress")
    assert code == 2
    assert "with other content" in err and "basalt.txt" in err and "--replace" in err
    assert "title only" not in err  # its text changed
    assert _manifest(index) == before  # refused whole: nothing lost, nothing half-added

    code, out, err = _cli("index", "add", str(docs), "-i", str(index), "--replace",
                          "--no-progress")
    assert code == 0, err
    assert "replaced 1 document" in out and "1 document already indexed as given" in out
    texts = [t for _, t, _ in _hits(index, "basalt magnesium volcanic")]
    assert any("magnesium" in t for t in texts)
    assert not any("rapid cooling" in t for t in texts)  # the old version is gone
    code, out, _ = _cli("index", "list", "-i", str(index), "--json")
    assert json.loads(out)["total"] == 2


def test_remove_then_list_and_info(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", {**FIRST, **MORE}))
    code, out, err = _cli("index", "list", "-i", str(index), "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert listed["total"] == 4 and len(listed["documents"]) == 4
    # each as GET /v1/documents lists it (its size was "chars" here, "length" there), with
    # its passages
    assert set(listed["documents"][0]) == {"doc_id", "title", "source", "length", "passages"}
    ids = {Path(d["source"]).name: d["doc_id"] for d in listed["documents"]}

    code, out, err = _cli("index", "remove", ids["moon.txt"], ids["elbe.txt"], "-i", str(index))
    assert code == 0, err
    assert "removed 2 documents" in out and "2 documents left" in out
    assert not any(doc in (ids["moon.txt"], ids["elbe.txt"])
                   for doc, _, _ in _hits(index, "Moon Earth Elbe river Hamburg"))

    code, out, err = _cli("index", "list", "-i", str(index))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "doc_id\tpassages\ttitle\tsource"
    assert sorted(line.split("\t")[0] for line in lines[1:]) == sorted(
        [ids["basalt.txt"], ids["granite.txt"]])
    assert "2 documents, 2 passages" in err

    code, out, err = _cli("index", "info", "-i", str(index), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["documents"], info["passages"], info["checksums"]) == (2, 2, "ok")
    assert info["embedding"]["name"] == "hash" and info["bytes"] > 0
    assert info["version"] == json.loads(_cli("index", "list", "-i", str(index),
                                              "--json")[1])["version"]
    code, out, _ = _cli("index", "info", "-i", str(index))
    assert code == 0 and "documents    2" in out and "checksums    ok" in out


def test_info_counts_the_rows_an_hnsw_index_keeps_of_deleted_passages(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    many = {f"n{i}.txt": f"Note {i} is about stone number {i}." for i in range(8)}
    code, _, err = _cli("index", "build", "--preset", "tiny", "--dense-index", "hnsw",
                        str(_files(tmp_path / "docs", {**FIRST, **MORE, **many})), "--out",
                        str(index), "--no-progress")
    assert code == 0, err
    doc = json.loads(_cli("index", "list", "-i", str(index), "--json")[1])["documents"][0]
    assert _cli("index", "remove", doc["doc_id"], "-i", str(index))[0] == 0
    code, out, err = _cli("index", "info", "-i", str(index), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["passages"], info["dense_removed_rows"]) == (11, 1)  # 1 of 12: under a tenth
    code, out, _ = _cli("index", "info", "-i", str(index))
    assert "1 row of deleted passages kept, skipped" in out
    assert all(h[0] != doc["doc_id"] for h in _hits(index, "river Elbe basalt granite Moon"))


def test_removals_that_cannot_be_done_change_nothing(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", FIRST))
    before = _manifest(index)
    ids = [d["doc_id"] for d in json.loads(_cli("index", "list", "-i", str(index),
                                                "--json")[1])["documents"]]
    code, _, err = _cli("index", "remove", ids[0], "no-such-doc", "-i", str(index))
    assert code == 2 and "no-such-doc" in err and "nothing was removed" in err
    code, _, err = _cli("index", "remove", *ids, "-i", str(index))
    assert code == 2 and "at least one document" in err
    assert _manifest(index) == before
    # --missing-ok: the same command can run again (as after a crash)
    for _ in range(2):
        code, out, err = _cli("index", "remove", ids[0], "no-such-doc", "-i", str(index),
                              "--missing-ok")
        assert code == 0, err
    assert "removed 0 documents" in out and "2 not in it" in out


def test_a_change_another_writer_overtook_is_made_to_the_index_it_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer changes the index while ``index add`` works: its change is not undone;
    the add is made again on the index as the other left it (and given up when overtaken
    twice)."""
    import citeqa.retrieval.updates as updates
    from citeqa.retrieval.store import Index

    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", FIRST))
    real_plan = updates.plan_additions
    overtakes = [1]  # how many more times the other writer gets in first

    def plan_then_other_writer(*args, **kwargs):
        if overtakes[0]:
            overtakes[0] -= 1
            other = Index.load(index)
            updates.apply_update(
                other, updates.IndexUpdate(remove=(next(iter(other.documents)),)), index)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(updates, "plan_additions", plan_then_other_writer)
    code, out, err = _cli("index", "add", str(_files(tmp_path / "more", MORE)), "-i", str(index),
                          "--no-progress")
    assert code == 0, err
    assert "added 2 documents" in out
    assert len(Index.load(index).documents) == 2 - 1 + 2  # the other writer's removal stands

    overtakes[0] = 2
    before = Index.load(index)
    code, _, err = _cli("index", "add", str(_files(tmp_path / "third", {"x.txt": "Xenon."})),
                        "-i", str(index), "--no-progress")
    assert code == 2 and "changed the index" in err and "twice" in err
    assert len(Index.load(index).documents) == len(before.documents) - 2  # theirs, not ours


def test_the_same_file_named_by_another_path_is_added_with_a_warning(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """... once, also when the add is made again after another writer got in first."""
    import citeqa.retrieval.updates as updates
    from citeqa.retrieval.store import Index

    index = tmp_path / "idx"
    docs = _files(tmp_path / "docs", {**FIRST, **MORE})
    _build(index, docs)
    monkeypatch.chdir(tmp_path)
    real_apply, overtakes = updates.apply_update, [1]

    def other_writer_first(loaded, update, out, **kw):
        if overtakes[0]:
            overtakes[0] -= 1
            other = Index.load(index)
            moon = next(d.doc_id for d in other.documents.values() if "moon" in d.source)
            real_apply(other, updates.IndexUpdate(remove=(moon,)), index)
        return real_apply(loaded, update, out, **kw)

    monkeypatch.setattr(updates, "apply_update", other_writer_first)
    code, out, err = _cli("index", "add", "docs/elbe.txt", "-i", str(index), "--no-progress")
    assert code == 0, err
    assert "added 1 document" in out and overtakes == [0]
    assert err.count("warning: docs/elbe.txt holds the text of indexed document") == 1
    assert str(docs / "elbe.txt") in err and "another path" in err


def test_ids_another_writer_removed_meanwhile_count_as_removed(tmp_path: Path,
                                                               monkeypatch) -> None:
    import citeqa.retrieval.updates as updates
    from citeqa.retrieval.store import Index

    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", {**FIRST, **MORE}))
    ids = list(Index.load(index).documents)
    real_apply, overtakes = updates.apply_update, [1]

    def other_writer_first(loaded, update, out, **kw):
        if overtakes[0]:
            overtakes[0] -= 1
            real_apply(Index.load(index), updates.IndexUpdate(remove=(ids[0],)), index)
        return real_apply(loaded, update, out, **kw)

    monkeypatch.setattr(updates, "apply_update", other_writer_first)
    code, out, err = _cli("index", "remove", ids[0], ids[1], "-i", str(index))
    assert code == 0, err
    assert "removed 2 documents (1 by another writer meanwhile)" in out and "not in it" not in out
    assert set(Index.load(index).documents) == set(ids[2:])


def test_add_refuses_missing_sources_and_a_missing_index(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    code, _, err = _cli("index", "add", str(tmp_path), "-i", str(index))
    assert code == 2 and f"error: index {index} does not exist; build one with" in err
    _build(index, _files(tmp_path / "docs", FIRST))
    before = _manifest(index)
    code, _, err = _cli("index", "add", str(tmp_path / "typo.txt"), "-i", str(index))
    assert code == 2 and "no such file or folder" in err and "as it was" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _cli("index", "add", str(tmp_path / "empty"), "-i", str(index))
    assert code == 2 and "no documents" in err
    assert _manifest(index) == before


def test_info_reports_a_damaged_index(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", FIRST))
    with (index / "documents.jsonl").open("a") as f:
        f.write("\n")
    code, _, err = _cli("index", "info", "-i", str(index))
    assert code == 2 and "documents.jsonl" in err


def test_info_measures_again_an_index_swapped_while_it_was_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer's swap between the load and the size walk took files away: a traceback."""
    import citeqa.index_cli as index_cli

    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", FIRST))
    measure, calls = index_cli.index_facts, []

    def swapped_once(loaded):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file", str(index / "passages.npy"))
        return measure(loaded)

    monkeypatch.setattr(index_cli, "index_facts", swapped_once)
    code, out, _ = _cli("index", "info", "-i", str(index), "--json")
    assert code == 0 and json.loads(out)["documents"] == 2 and len(calls) == 2

    def always_swapped(loaded):  # type: ignore[no-untyped-def]
        raise FileNotFoundError(2, "No such file", str(index / "passages.npy"))

    monkeypatch.setattr(index_cli, "index_facts", always_swapped)
    code, _, err = _cli("index", "info", "-i", str(index))
    assert code == 2 and "kept changing while it was measured" in err
    assert "passages.npy went" in err and "Traceback" not in err


# -- index build --resumable: shards in this process, kept until the end ------------------------


BOOKS = {f"book{i}.txt": f"Book {i} tells of the river number {i} and of its {i} bridges."
         for i in range(6)}


def test_a_resumable_build_indexes_as_a_plain_build_and_cleans_up(tmp_path: Path) -> None:
    docs = _files(tmp_path / "docs", BOOKS)
    _build(tmp_path / "plain", docs)
    code, out, err = _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                          str(tmp_path / "res"), "--resumable", "--shard-chars", "100",
                          "--no-progress")
    assert code == 0, err
    assert "6 documents as 6 passages" in out and "6 shards" in out
    assert not (tmp_path / ".res.build").exists()  # the shards go once the index is in
    for query in ("river number 3", "bridges of book 5"):
        assert _hits(tmp_path / "res", query) == _hits(tmp_path / "plain", query)


def test_a_work_dir_with_a_users_shards_folder_is_refused_without_claiming_its_shards(
        tmp_path: Path) -> None:
    """Its error also said "the 1 shard finished so far are kept in work: run the same command
    again" of a folder of the user's called shards/."""
    docs = _files(tmp_path / "docs", BOOKS)
    (tmp_path / "work" / "shards" / "mine").mkdir(parents=True)
    code, _, err = _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                        str(tmp_path / "res"), "--resumable", "--work-dir",
                        str(tmp_path / "work"), "--no-progress")
    assert code == 2 and "holds shards, which no citeqa build left there" in err, err
    assert "finished so far" not in err and (tmp_path / "work" / "shards" / "mine").is_dir()


def test_a_full_disk_writing_the_dense_index_is_one_line_and_the_index_is_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS reports a failed write as a RuntimeError: a full disk ended `index build` and
    `index add` in a 60-line traceback (the index itself was left as it was)."""
    import faiss

    docs = _files(tmp_path / "docs", BOOKS)
    _build(tmp_path / "idx", docs)
    before = (tmp_path / "idx" / "manifest.json").read_text()

    def full(index, path):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"write error in {path}: 4051 != 128000 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full)
    more = _files(tmp_path / "more", {"extra.txt": "An extra book about the river delta."})
    for args in (("index", "build", "--preset", "tiny", str(docs), "--out",
                  str(tmp_path / "idx"), "--no-progress"),
                 ("index", "add", str(more), "--index", str(tmp_path / "idx"), "--no-progress")):
        code, _, err = _cli(*args)
        assert code == 2 and "No space left on device" in err and "Traceback" not in err, err
        assert "as it was" in err
    assert (tmp_path / "idx" / "manifest.json").read_text() == before


def test_a_full_disk_says_what_room_a_rerun_needs_and_what_kept_parts_take(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an add (or a resumable build) kept for its rerun takes room the index write needs:
    on a full disk a rerun failed the same way for ever, and the message said only "N requested
    and M written; it is as it was" (FAISS's error and numpy's carry no ENOSPC)."""
    import shutil

    import faiss

    from citeqa.retrieval.kept import kept_dir

    docs = _files(tmp_path / "docs", BOOKS)
    _build(tmp_path / "idx", docs)
    kept = kept_dir(tmp_path / "idx")
    kept.mkdir()
    (kept / "part.npz").write_bytes(b"x" * 300_000)

    def full(index, path):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"Error in faiss::write_index: write error in {path}")

    monkeypatch.setattr(faiss, "write_index", full)
    monkeypatch.setattr("citeqa.atomic.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 100, 100))
    more = _files(tmp_path / "more", {"extra.txt": "An extra book about the river delta."})
    code, _, err = _cli("index", "add", str(more), "--index", str(tmp_path / "idx"),
                        "--no-progress")
    assert code == 2 and "[Errno 28] No space left on device; it is as it was" in err, err
    assert "the disk is full: a change writes the index (" in err
    assert f"take 0.3 MB of that disk in {kept}: delete that folder to free them" in err
    # a resumable build stopped there says what its finished shards take
    code, _, err = _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                        str(tmp_path / "res"), "--resumable", "--work-dir", str(tmp_path / "w"),
                        "--shard-chars", "100", "--no-progress")
    assert code == 2 and "[Errno 28] No space left on device" in err, err
    assert f"finished so far are kept in {tmp_path / 'w'} (" in err
    assert "needs about as much room again beside them" in err


def test_a_resumable_build_cut_short_embeds_only_the_rest(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.distributed.sharded as sharded

    docs = _files(tmp_path / "docs", BOOKS)
    finish, made = sharded.finish_shard, []

    def cut_short(staged, job, embedder, **kw):  # type: ignore[no-untyped-def]
        if len(made) == 3:
            raise KeyboardInterrupt
        result = finish(staged, job, embedder, **kw)
        made.append(result.embedded)
        return result

    _build(tmp_path / "idx", _files(tmp_path / "old", FIRST))  # the index being rebuilt
    monkeypatch.setattr(sharded, "finish_shard", cut_short)
    args = ["index", "build", "--preset", "tiny", str(docs), "--out", str(tmp_path / "idx"),
            "--resumable", "--shard-chars", "100", "--no-progress"]
    code, _, err = _cli(*args)
    assert code == 130 and "the 3 shards finished so far are kept in" in err
    assert "run the same command again to reuse them" in err
    assert (tmp_path / ".idx.build").is_dir()
    code, out, err = _cli("index", "info", "-i", str(tmp_path / "idx"), "--json")
    assert code == 0 and json.loads(out)["documents"] == 2, err  # the old index, as it was
    assert json.loads(out)["kept_shards"] == 3
    assert "3 shards of an interrupted build" in _cli("index", "info", "-i",
                                                      str(tmp_path / "idx"))[1]
    monkeypatch.setattr(sharded, "finish_shard", finish)
    code, out, err = _cli(*args)
    assert code == 0, err
    assert "6 shards, 3 reused from an interrupted run" in out
    assert len(_hits(tmp_path / "idx", "river")) == 4


def test_a_plain_rebuild_forgets_an_interrupted_builds_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``index info`` went on offering the shards of a resumable build cut short after a plain
    build had replaced the index (their rerun would have replaced it again)."""
    import citeqa.distributed.sharded as sharded

    finish, made = sharded.finish_shard, []

    def at_third(staged, job, embedder, **kw):  # type: ignore[no-untyped-def]
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(1)
        return finish(staged, job, embedder, **kw)

    monkeypatch.setattr(sharded, "finish_shard", at_third)
    code, _, err = _cli("index", "build", "--preset", "tiny", str(_files(tmp_path / "b", BOOKS)),
                        "--out", str(tmp_path / "idx"), "--resumable", "--shard-chars", "100",
                        "--no-progress")
    assert code == 130 and "3 shards finished so far are kept" in err
    monkeypatch.undo()
    _build(tmp_path / "idx", _files(tmp_path / "docs", FIRST))  # a plain build, to the end
    assert not (tmp_path / ".idx.build").exists()
    code, out, _ = _cli("index", "info", "-i", str(tmp_path / "idx"), "--json")
    assert code == 0 and json.loads(out)["kept_shards"] == 0


def test_a_build_cut_short_after_its_swap_says_the_new_index_is_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the old index was removed (seconds, for a large one) said the build had
    not happened, to run it again, and left an earlier add's kept embeddings behind."""
    import citeqa.retrieval as retrieval

    _build(tmp_path / "idx", _files(tmp_path / "old", FIRST))
    kept = tmp_path / ".idx.add"
    kept.mkdir()
    np.savez(kept / "part.npz", hashes=np.zeros((1, 16), np.uint8),
             vectors=np.zeros((1, 8), np.float32))
    build = retrieval.build_index

    def swapped_then_interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        build(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval, "build_index", swapped_then_interrupted)
    docs = _files(tmp_path / "docs", {**FIRST, **MORE})
    code, _, err = _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                        str(tmp_path / "idx"), "--no-progress")
    assert code == 130 and "once the new index was in" in err and "run the same" not in err
    code, out, _ = _cli("index", "info", "-i", str(tmp_path / "idx"), "--json")
    assert json.loads(out)["documents"] == 4 and not kept.exists()


def test_a_removal_cut_short_after_its_swap_says_how_to_finish_it(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """It said to run the same command again, which then failed: the ids were gone."""
    import citeqa.retrieval.updates as updates

    _build(tmp_path / "idx", _files(tmp_path / "docs", {**FIRST, **MORE}))
    doc_id = _cli("index", "list", "-i", str(tmp_path / "idx"))[1].splitlines()[1].split("\t")[0]
    apply = updates.apply_update

    def applied_then_interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        apply(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(updates, "apply_update", applied_then_interrupted)
    code, _, err = _cli("index", "remove", doc_id, "-i", str(tmp_path / "idx"))
    assert code == 130 and "run the same command again with --missing-ok" in err
    monkeypatch.undo()
    code, out, err = _cli("index", "remove", doc_id, "-i", str(tmp_path / "idx"), "--missing-ok")
    assert code == 0 and "1 not in it" in out, err


@pytest.mark.parametrize(("option", "says"), [
    (["--work-dir", "w"], "--work-dir and --shard-chars only apply with --ray or --resumable"),
    (["--shard-chars", "10"], "only apply with --ray or --resumable"),
    (["--embedders", "2", "--resumable"], "--embedders only applies with --ray")])
def test_shard_options_need_a_sharded_build(tmp_path: Path, option: list[str],
                                            says: str) -> None:
    docs = _files(tmp_path / "docs", FIRST)
    code, _, err = _cli("index", "build", str(docs), "--out", str(tmp_path / "idx"), *option)
    assert code == 2 and says in err
    assert not (tmp_path / "idx").exists()


def test_a_resumable_build_cut_short_before_any_shard_keeps_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.distributed.sharded as sharded

    def at_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded, "finish_shard", at_once)
    code, _, err = _cli("index", "build", "--preset", "tiny", str(_files(tmp_path / "d", BOOKS)),
                        "--out", str(tmp_path / "idx"), "--resumable", "--no-progress")
    assert code == 130 and "run the same command again to build it" in err
    assert "kept" not in err and "--resumable" not in err
    assert not (tmp_path / ".idx.build").exists()


def test_a_plain_build_cut_short_points_to_resumable(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.retrieval as retrieval

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(retrieval, "build_index", interrupted)
    code, _, err = _cli("index", "build", str(_files(tmp_path / "docs", FIRST)), "--out",
                        str(tmp_path / "idx"))
    assert code == 130 and "with --resumable, a build cut short keeps what it finished" in err


def test_a_failed_plain_build_says_nothing_of_an_earlier_builds_shards(tmp_path: Path) -> None:
    (tmp_path / ".idx.build" / "shards" / "k1").mkdir(parents=True)  # a --resumable run's
    empty = _files(tmp_path / "docs", {"blank.txt": "   \n"})
    code, _, err = _cli("index", "build", "--preset", "tiny", str(empty), "--out",
                        str(tmp_path / "idx"), "--no-progress")
    assert code == 2 and "shard" not in err, err


def test_shards_wait_beside_the_folder_a_link_names(tmp_path: Path) -> None:
    from citeqa.distributed.sharded import default_work_dir

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert default_work_dir(tmp_path / "link") == tmp_path / ".real.build"
    assert default_work_dir(tmp_path / "plain") == tmp_path / ".plain.build"


def test_info_names_the_ivf_cells_probed_as_faiss_probes_them() -> None:
    """A tiny IVF index was said to have "1 cells, 128 probed"."""
    from citeqa.index_cli import _dense_line

    assert _dense_line({"kind": "ivf", "nlist": 1, "nprobe": 128}, None) == (
        "ivf (1 cell, all probed)")
    assert _dense_line({"kind": "ivf", "nlist": 256, "nprobe": 16}, None) == (
        "ivf (256 cells, 16 probed)")


def test_a_source_that_cannot_be_looked_at_is_not_called_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in a folder without x permission was "no such file or folder"."""
    import os

    from citeqa.index_cli import _there

    inside = tmp_path / "noexec" / "n.txt"

    def refuse(path: object, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(path))

    assert not _there(str(inside))
    monkeypatch.setattr(os, "lstat", refuse)
    assert _there(str(inside))


def test_a_document_whose_title_alone_changed_is_named_so(tmp_path: Path) -> None:
    """Same text, another title (a record retitled, or an index whose older citeqa titled the
    file otherwise): still refused without --replace, and the message says the text is as
    indexed."""
    record = {"id": "granite", "title": "Granite", "text": MORE["granite.txt"]}
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps(record) + "\n")
    index = tmp_path / "idx"
    _build(index, data)
    data.write_text(json.dumps({**record, "title": "Granite rock"}) + "\n")
    code, _, err = _cli("index", "add", str(data), "-i", str(index), "--no-progress")
    assert code == 2
    assert "granite (" in err and ": its title only)" in err and "--replace" in err
    assert "a title alone differs where a text is as indexed" in err
    moved = tmp_path / "moved.jsonl"  # the same record from another file: its source differs
    moved.write_text(json.dumps(record) + "\n")
    code, _, err = _cli("index", "add", str(moved), "-i", str(index), "--no-progress")
    assert code == 2 and "granite (" in err and "its title only" not in err


def test_info_reads_the_dense_index_of_a_manifest_that_did_not_record_it(tmp_path: Path
                                                                          ) -> None:
    """An index built before manifests recorded ``dense_index`` still has one: info says what
    FAISS holds, not "none (BM25 only)"."""
    index = tmp_path / "idx"
    _build(index, _files(tmp_path / "docs", FIRST))
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest.pop("dense_index")["kind"] == "flat"
    (index / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _cli("index", "info", "-i", str(index), "--json")
    assert code == 0, err
    assert json.loads(out)["dense_index"]["kind"] == "flat"
    code, out, _ = _cli("index", "info", "-i", str(index))
    assert code == 0 and "dense index  flat" in out and "BM25 only" not in out


def test_bm25_finds_chinese_and_japanese_words(tmp_path: Path) -> None:
    """Their words have no spaces between them: BM25 read a clause as one word, and found
    nothing for a question (nor for a word the passage holds)."""
    docs = _files(tmp_path / "docs", {
        "tokyo.txt": "東京は日本の首都です。東京タワーは一九五八年に完成しました。",
        "kyoto.txt": "京都には古い寺が多い。金閣寺は有名な寺である。",
        "beijing.txt": "故宫位于北京市中心。它是明清两代的皇宫。"})
    index = tmp_path / "idx"
    _build(index, docs)
    for query, holder in (("東京タワーはいつ完成しましたか", "tokyo.txt"),
                          ("金閣寺", "kyoto.txt"), ("故宫在哪里？", "beijing.txt")):
        code, out, err = _cli("search", query, "-i", str(index), "--mode", "bm25", "--json")
        assert code == 0, err
        hits = json.loads(out)
        assert hits and Path(hits[0]["source"]).name == holder, (query, hits)


def test_an_out_name_too_long_for_its_temporary_sibling_is_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A legal 245-character --out failed with "File name too long: '.iii....tmp-PID'" at the
    swap, after all the loading and embedding."""
    import citeqa.retrieval.builder as builder

    docs = _files(tmp_path / "docs", BOOKS)
    loaded: list[int] = []
    monkeypatch.setattr(builder, "build_index_from_documents",
                        lambda *a, **kw: loaded.append(1))
    for resumable in ([], ["--resumable"]):
        code, _, err = _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                            str(tmp_path / ("i" * 245)), "--no-progress", *resumable)
        assert code == 2 and "is too long for an index folder" in err, err
    assert not loaded and not (tmp_path / ("i" * 245)).exists()
    # a name whose sibling fits is taken (pids have 7 digits at most, then a token of 8), and
    # a change of an index whose name does not fit is refused before its embedding, not after
    monkeypatch.undo()
    assert _cli("index", "build", "--preset", "tiny", str(docs), "--out",
                str(tmp_path / ("j" * 231)), "--no-progress")[0] == 0
    (tmp_path / ("j" * 231)).rename(tmp_path / ("j" * 250))
    more = _files(tmp_path / "more", {"extra.txt": "An extra book about the river delta."})
    code, _, err = _cli("index", "add", str(more), "--index", str(tmp_path / ("j" * 250)),
                        "--no-progress")
    assert code == 2 and "is too long for an index folder" in err and "as it was" in err
    assert not list(tmp_path.glob(".j*"))  # nothing kept for a rerun that cannot succeed


def test_index_add_leaves_out_a_url_whose_page_the_index_holds(tmp_path: Path,
                                                                monkeypatch) -> None:
    import httpx

    import citeqa.ingest as ingest

    pages = {"/plain": "Plain Title\nThe river Elbe flows to the North Sea.",
             "/other": "Other Title\nBasalt is an igneous rock."}

    real = ingest.Fetcher

    def fetcher(policy):
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/moved":
                return httpx.Response(301, headers={"Location": "/plain#top"})
            return httpx.Response(200, headers={"Content-Type": "text/plain"},
                                  text=pages[request.url.path])
        return real(policy, transport=httpx.MockTransport(handler),
                              resolver=lambda host, port: ["93.184.216.34"])

    monkeypatch.setattr(ingest, "Fetcher", fetcher)
    index = tmp_path / "idx"
    code, _, err = _cli("index", "build", "--preset", "tiny", "https://example.org/plain",
                        "--out", str(index), "--no-progress")
    assert code == 0, err
    code, out, err = _cli("index", "add", "HTTPS://example.org/plain", "https://example.org/moved",
                          "https://example.org/other", "-i", str(index), "--no-progress")
    assert code == 0, err
    assert "added 1 document (1 passage)" in out
    held = json.loads(_cli("index", "list", "-i", str(index), "--json")[1])["documents"]
    assert sorted(d["source"] for d in held) == ["https://example.org/other",
                                                 "https://example.org/plain"]
    page = "its page (https://example.org/plain) is indexed, as document"
    assert f"skipped HTTPS://example.org/plain: {page}" in err
    assert "skipped https://example.org/moved: the same page as HTTPS" in err  # (in one run)
    assert "warning" not in err
    code, out, err = _cli("index", "add", "https://example.org/moved", "-i", str(index),
                          "--no-progress")
    assert code == 0 and "nothing to add" in out, err
    assert f"skipped https://example.org/moved: {page}" in err
    pages["/mirror"] = pages["/other"]  # another page with the same text
    code, out, err = _cli("index", "add", "https://example.org/mirror", "-i", str(index),
                          "--no-progress")
    assert code == 0 and "added 1 document" in out, err
    assert "the same page by another URL? A page's id hashes its URL as given" in err


def test_a_record_files_lines_skipped_alike_are_one_line(tmp_path: Path) -> None:
    """2,000 records naming their text "content" were 2,000 lines alike; a few are each said."""
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"content": f"c{i}"}) + "\n" for i in range(2000))
                    + '{"text": "kept"}\nnot json\n')
    few = tmp_path / "few.jsonl"
    few.write_text('{"body": "b"}\n' * 2 + '{"text": "also kept"}\n')
    code, out, err = _cli("index", "build", "--preset", "tiny", str(many), str(few), "--out",
                          str(tmp_path / "idx"), "--no-progress")
    assert code == 0 and "indexed 2 documents" in out, err
    why = ("no non-empty string 'text' field (its fields: {}); add one (or name the field that "
           "holds the text 'text')")
    lines = [line for line in err.splitlines() if line.startswith("skipped")]
    assert lines == [
        f"skipped {many}: 2,000 lines (1, 2, 3, …): {why.format('content')}",
        f"skipped {many}: line 2002: invalid JSON (Expecting value); fix or remove the line",
        f"skipped {few}: line 1: {why.format('body')}",
        f"skipped {few}: line 2: {why.format('body')}"], err


def test_a_folders_files_of_types_not_read_are_one_line_by_type(tmp_path: Path) -> None:
    """A generated site's 185 fonts, styles and scripts were 185 lines alike, after which the
    skips that matter were hard to find; they are counted by type, the others listed."""
    site = _files(tmp_path / "site", {**FIRST, "a.css": "", "b.css": "", "c.woff2": "",
                                      "LICENSE2": "x"})
    code, _, err = _cli("index", "build", "--preset", "tiny", str(site), "--out",
                        str(tmp_path / "few"), "--no-progress")  # (a few: each named)
    assert code == 0 and f"skipped {site / 'c.woff2'}: unsupported file type" in err, err
    (site / "nul.txt").write_bytes(b"a\x00b")
    for n in range(3):
        (site / f"moved{n}.html").write_text('<meta http-equiv="refresh" content="0; url=a.html">')
    code, _, err = _cli("index", "build", "--preset", "tiny", str(site), "--out",
                        str(tmp_path / "idx"), "--no-progress")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("skipped")]
    assert lines == [
        f"skipped {site / 'nul.txt'}: binary file (contains NUL bytes); give text, Markdown, "
        "HTML or JSON",
        "skipped 3 pages that only redirect to another (a meta refresh): the pages they name "
        "are indexed where they are among the sources; `citeqa -v` lists each",
        "skipped 4 files in folders, of types citeqa does not read (2 .css, 1 (no extension), "
        "1 .woff2) (name the file explicitly to read it as plain text; `citeqa index build "
        "--help` lists the types a folder's files are read by; `citeqa -v` lists each)"], err
