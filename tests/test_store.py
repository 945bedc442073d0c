"""The index directory: layout, manifest, verification errors, and the passage invariant."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.errors import IndexError_
from citeqa.retrieval import Index, build_index_from_documents
from citeqa.retrieval.store import FORMAT_VERSION, manifest_version
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
        + [f"bm25/{n}.npy" for n in ("indptr", "doc_ids", "tf", "idf", "doc_len", "counts")]
        + ["bm25/vocab.json", "bm25/params.json"]
    )
    m = json.loads((built / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["embedding"] == {"model_id": "hash-bow-256", "dim": 256, "name": "hash",
                              "dtype": "fp32"}
    assert m["counts"]["documents"] == 2  # d3, whitespace only, skipped
    assert m["settings"]["chunk"] == {"max_chars": 80, "overlap_sentences": 0}
    assert set(m["files"]) == set(names) - {"manifest.json"}
    rows = [json.loads(line) for line in (built / "documents.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == ["d1", "d2"]
    assert np.load(built / "passages.npy").dtype == np.int64


def test_loaded_passages_reproduce_document_text(built: Path) -> None:
    index = Index.load(built)
    assert set(index.documents) == {"d1", "d2"}
    assert [p.passage_id for p in index.passages] == list(range(len(index.passages)))
    for p in index.passages:
        assert p.text == index.documents[p.doc_id].text[p.start : p.end]
        assert 0 < len(p.text) <= 80
    assert {p.doc_id for p in index.passages} == {"d1", "d2"}
    assert index.dense is not None and index.dense.size == len(index.passages)


def test_the_version_names_the_content_not_the_time_it_was_written(built: Path,
                                                                    tmp_path: Path) -> None:
    version = Index.load(built).version
    assert re.fullmatch(r"[0-9a-f]{16}", version)
    again = tmp_path / "again"  # the same documents and settings, built later
    build_index_from_documents(DOCS, again, CFG, progress=False)
    assert Index.load(again).version == version
    changed = tmp_path / "changed"  # one character of one document differs
    docs = [DOCS[0], Document("d2", "Dogs", "dogs.txt", DOCS[1].text.replace("bark", "bork")),
            DOCS[2]]
    build_index_from_documents(docs, changed, CFG, progress=False)
    assert Index.load(changed).version != version
    m = json.loads((built / "manifest.json").read_text())
    assert manifest_version({**m, "created": "1999-01-01T00:00:00+00:00"}) == version
    assert manifest_version({**m, "counts": {**m["counts"], "documents": 4}}) != version


def test_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IndexError_, match="does not exist.*citeqa index build"):
        Index.load(tmp_path / "nothing")
    monkeypatch.chdir(tmp_path)  # a relative path is relative to this folder: say which
    with pytest.raises(IndexError_, match=rf"does not exist \(in {re.escape(str(tmp_path))}\);"
                                          r".*or name another with --index"):
        Index.load(Path("index/default"))


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


def test_a_load_that_meets_another_process_swapping_reads_the_new_index(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process loading while a server swapped a change in read parts of both, or
    files gone from under it: "corrupt; rebuild it" (rebuilding would drop the documents
    added over REST)."""
    import os
    import shutil

    import citeqa.retrieval.store as store

    newer = tmp_path / "newer"
    build_index_from_documents(DOCS[1:2], newer, CFG, progress=False)
    real_load = np.load
    swapped: list[bool] = []

    def load_during_a_swap(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not swapped:  # another process publishes now, between two reads of this one
            swapped.append(True)
            os.rename(built, built.with_name(".idx.old-1"))
            os.rename(newer, built)
            shutil.rmtree(built.with_name(".idx.old-1"))
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(store.np, "load", load_during_a_swap)
    index = Index.load(built)
    assert swapped and sorted(index.documents) == ["d2"]  # the new one, whole


def test_a_load_that_a_swap_of_the_same_shape_meets_mid_read_reads_the_new_index_whole(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap between reading the manifest (and checking the files' sums) and parsing the files,
    of an index with the same counts (an edit kept to its length), failed no check: the load
    returned the new documents under the old manifest and version."""
    import os
    import shutil

    import citeqa.retrieval.store as store

    newer = tmp_path / "newer"
    edited = [Document(d.doc_id, d.title, d.source, d.text.replace("purr", "hiss"))
              for d in DOCS]
    build_index_from_documents(edited, newer, CFG, progress=False)
    manifests = {"old": json.loads((built / "manifest.json").read_text()),
                 "new": json.loads((newer / "manifest.json").read_text())}
    assert manifests["old"]["counts"] == manifests["new"]["counts"]
    real_read = store.read_documents
    swapped: list[bool] = []

    def read_during_a_swap(path):  # type: ignore[no-untyped-def]
        if not swapped:  # another process publishes now, after this one read the manifest
            swapped.append(True)
            os.rename(built, built.with_name(".idx.old-1"))
            os.rename(newer, built)
            shutil.rmtree(built.with_name(".idx.old-1"))
        return real_read(path)

    monkeypatch.setattr(store, "read_documents", read_during_a_swap)
    index = Index.load(built)
    assert swapped and "hiss" in index.documents["d1"].text
    assert index.manifest == manifests["new"]  # documents and manifest of one version

    def always_swapped(path):  # type: ignore[no-untyped-def]
        other = built.with_name(".idx.new")
        shutil.copytree(built, other)
        os.rename(built, built.with_name(".idx.old-1"))
        os.rename(other, built)
        shutil.rmtree(built.with_name(".idx.old-1"))
        return real_read(path)

    monkeypatch.setattr(store, "read_documents", always_swapped)
    tries = store.LOAD_TRIES
    with pytest.raises(IndexError_, match=f"changed {tries} times while it was read.*try again"):
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


# -- recovering after a crash in the swap window (see store.recover_index) --------------------

DEAD_PID = 2**30  # above any pid_max: no such process


def _crash_mid_swap(out: Path, pid: int = DEAD_PID) -> Path:
    """The state a writer killed between the two renames of a swap leaves behind."""
    old = out.parent / f".{out.name}.old-{pid}"
    out.rename(old)
    return old


def test_recover_restores_a_backup_left_by_a_dead_writer(built: Path) -> None:
    from citeqa.retrieval.store import recover_index

    _crash_mid_swap(built)
    (built.parent / f".{built.name}.tmp-{DEAD_PID}").mkdir()  # its unfinished new index
    assert recover_index(built) == built
    assert (built / "manifest.json").is_file()
    assert sorted(p.name for p in built.parent.iterdir()) == ["idx"]  # debris removed
    assert Index.load(built).directory == built


def test_a_load_that_restores_a_backup_reads_the_index_once(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restored inside the read, the folder was another by its end: every file was read and its
    sums checked twice, and "changed while it was read" logged."""
    import citeqa.retrieval.store as store

    reads: list[Path] = []
    real = store.Index._load_once.__func__  # type: ignore[attr-defined]

    def counted(cls, directory: Path, *, verify: bool) -> Index:  # type: ignore[no-untyped-def]
        reads.append(directory)
        return real(cls, directory, verify=verify)

    monkeypatch.setattr(store.Index, "_load_once", classmethod(counted))
    for leave_empty in (False, True):  # the folder gone, or left empty
        _crash_mid_swap(built)
        if leave_empty:
            built.mkdir()
        reads.clear()
        assert sorted(Index.load(built).documents) == ["d1", "d2"]
        assert reads == [built]


def test_a_load_failed_by_a_swap_after_another_swap_reads_again(
        built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two swaps in a row (a REST change is a swap): the folder read (B) replaced the one first
    looked at (A, deleted), then was replaced itself (C) mid-read. C may take A's freed inode
    number (ext4 gives it at once): compared with A's id, not the held B's, the failed read was
    taken for damage, "rebuild it"."""
    import os
    import shutil

    import citeqa.retrieval.store as store

    b, c = tmp_path / "b", tmp_path / "c"
    shutil.copytree(built, b)

    def swap_in(new: Path) -> None:
        os.rename(built, built.with_name(".idx.old-1"))
        os.rename(new, built)
        shutil.rmtree(built.with_name(".idx.old-1"))

    real_recover, real_read = store.recover_index, store.Index._load_once.__func__  # type: ignore[attr-defined]
    steps: list[str] = []

    def recover(directory: Path, **kw):  # type: ignore[no-untyped-def]
        if not steps:
            steps.append("b")
            swap_in(b)  # A -> B, A deleted
        return real_recover(directory, **kw)

    def read(cls, directory: Path, *, verify: bool) -> Index:  # type: ignore[no-untyped-def]
        if steps == ["b"]:
            steps.append("c")
            shutil.copytree(directory, c)  # made after A was deleted
            swap_in(c)  # B -> C mid-read
            raise IndexError_(f"index {directory}: checksum mismatch; rebuild it")
        return real_read(cls, directory, verify=verify)

    monkeypatch.setattr(store, "recover_index", recover)
    monkeypatch.setattr(store.Index, "_load_once", classmethod(read))
    assert sorted(Index.load(built).documents) == ["d1", "d2"]
    assert steps == ["b", "c"]


def test_an_index_write_holds_its_temporary_directory_only_while_it_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held (flock) while written, so that no other process takes it for a dead writer's, and
    let go once swapped in or removed: a server's every change kept a descriptor open."""
    from citeqa import atomic
    from citeqa.retrieval import store

    out = tmp_path / "idx"
    seen: list[bool] = []
    write = store.write_index

    def watched(tmp: Path, **parts: object) -> dict:
        seen.append(atomic._claimed(tmp) is True and str(tmp) in atomic._claims)
        return write(tmp, **parts)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_index", watched)
    build_index_from_documents(DOCS, out, CFG, progress=False)
    assert seen == [True] and not [c for c in atomic._claims if c.startswith(str(tmp_path))]
    monkeypatch.setattr(store, "write_index", lambda tmp, **parts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_index_from_documents(DOCS, out, CFG, progress=False)
    assert not [c for c in atomic._claims if c.startswith(str(tmp_path))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_recover_restores_over_an_empty_directory(built: Path) -> None:
    from citeqa.retrieval.store import recover_index

    _crash_mid_swap(built)
    built.mkdir()
    assert recover_index(built) == built and (built / "manifest.json").is_file()


def test_recover_waits_for_a_writer_between_its_renames(built: Path) -> None:
    """A writer between its two renames holds the swap lock: recovery waits for it and reads
    the index it swapped in (it read the backup, and a server that loaded it then could undo
    the new index with its next change), then leaves its backup alone while it runs."""
    import shutil
    import subprocess
    import sys
    import time

    from citeqa.retrieval.store import recover_index

    new = built.parent / ".idx.tmp-x"
    shutil.copytree(built, new)
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["created"] = "the new one"  # told apart by its manifest (no file hash covers it)
    (new / "manifest.json").write_text(json.dumps(manifest))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(built.parent)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.rename({str(built)!r}, {str(built.parent / '.idx.old-')!r} + str(os.getpid()))\n"
        "print('mid-swap', flush=True); time.sleep(1.0)\n"
        f"os.rename({str(new)!r}, {str(built)!r}); os.close(fd); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "mid-swap\n"
        t0 = time.monotonic()
        assert recover_index(built) == built
        assert time.monotonic() - t0 > 0.5  # it waited for the lock
        assert json.loads((built / "manifest.json").read_text())["created"] == "the new one"
        # its swap done and the lock free, the old copy is no one's (its writer's own removal
        # of it, after the lock, finds it gone)
        assert not (built.parent / f".idx.old-{holder.pid}").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_backup_left_after_a_finished_swap_goes_whatever_its_pid(built: Path) -> None:
    """A writer killed after its swap, before removing its backup, left .idx.old-<pid>: with
    its pid in use again (a restarted container's pid 1, this process here) it was kept for
    ever, a whole copy of the old index, and restored over a rebuild if the index went missing.
    While another process holds the swap lock (mid-swap), backups stay."""
    import os
    import shutil

    from helpers import flock_held_elsewhere

    from citeqa.retrieval.store import recover_index

    old = built.parent / f".idx.old-{os.getpid()}"
    shutil.copytree(built, old)
    with flock_held_elsewhere(built.parent):
        assert recover_index(built) == built and old.is_dir()  # a swap may be under way
    assert recover_index(built) == built and not old.exists()
    assert sorted(p.name for p in built.parent.iterdir()) == ["idx"]


def test_recover_restores_a_backup_whatever_its_pid(built: Path) -> None:
    """No writer holds the swap lock, so no swap is under way: a backup named with this very
    process's pid (a container's server is pid 1 again after a restart) is restored, not read
    where it lies (then dropped as this process's own debris by its next change)."""
    import os

    from citeqa.retrieval.store import recover_index

    _crash_mid_swap(built, pid=os.getpid())
    assert recover_index(built) == built and (built / "manifest.json").is_file()
    assert Index.load(built).directory == built


def test_loading_recovers_too(built: Path) -> None:
    _crash_mid_swap(built)
    assert Index.load(built).directory == built
    assert sorted(p.name for p in built.parent.iterdir()) == ["idx"]


def test_recover_refuses_what_is_not_an_index(tmp_path: Path) -> None:
    from citeqa.retrieval.store import recover_index

    with pytest.raises(IndexError_, match="does not exist; build one"):
        recover_index(tmp_path / "nowhere")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(IndexError_, match=r"is not an index \(no manifest.json\); point at an "
                       r"index directory, or build one into a new folder"):
        recover_index(mine)
    assert (mine / "notes.txt").read_text() == "precious"
    (mine / "notes.txt").unlink()
    with pytest.raises(IndexError_, match="is an empty folder; build one"):
        recover_index(mine)


def test_a_folder_with_someone_elses_manifest_is_never_replaced(tmp_path: Path) -> None:
    """A web app's folder has a manifest.json too: a build over it used to wipe it."""
    from citeqa.retrieval.store import check_replaceable, is_index_dir

    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "My PWA"}')
    (app / "index.html").write_text("<p>precious</p>")
    assert not is_index_dir(app)
    with pytest.raises(IndexError_, match="refusing to replace"):
        check_replaceable(app)
    (app / "manifest.json").write_text("{not json")  # unreadable, and no documents file
    assert not is_index_dir(app)
    (app / "documents.jsonl").write_text("")  # a damaged index: rebuilding it is allowed
    assert is_index_dir(app)
    check_replaceable(app)


def test_an_index_behind_a_symbolic_link_is_swapped_where_the_link_points(tmp_path: Path) -> None:
    """The swap renamed the link itself: the build then failed on removing it ("Cannot call
    rmtree on a symbolic link") after its index was in, and a server's change got a 500 though
    it was written, and 409s after."""
    from citeqa.retrieval.embed import HashEmbedder
    from citeqa.retrieval.updates import add_documents

    real = tmp_path / "real_v1"
    build_index_from_documents(DOCS[:1], real, CFG, progress=False)
    link = tmp_path / "idx"
    link.symlink_to(real)
    build_index_from_documents(DOCS, link, CFG, progress=False)  # a rebuild through the link
    assert link.is_symlink() and link.resolve() == real
    assert set(Index.load(link).documents) == {"d1", "d2"}
    add_documents(Index.load(link), [Document("d4", "Owls", "owls.txt", "Owls hoot at night.")],
                  link, embedder=HashEmbedder())
    assert link.is_symlink() and set(Index.load(real).documents) == {"d1", "d2", "d4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "real_v1"]  # no debris


def test_a_swap_whose_second_rename_fails_puts_the_previous_index_back(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index moved aside, then the new one cannot be moved in (an I/O error): the previous
    index is back where it was, as the error's "it is as it was" says, not missing until the
    next command restores it."""
    import errno

    from citeqa.retrieval.embed import HashEmbedder
    from citeqa.retrieval.updates import add_documents

    before = Index.load(built)
    real_rename = Path.rename

    def rename(self: Path, target: object) -> Path:
        if Path(str(target)) == built and self.name != built.name and ".old-" not in self.name:
            raise OSError(errno.EIO, "I/O error")  # the new index, moving in
        return real_rename(self, str(target))

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        add_documents(before, [Document("d4", "Owls", "owls.txt", "Owls hoot.")], built,
                      embedder=HashEmbedder())
    monkeypatch.undo()
    # (looked at before any load, which would restore a backup left aside)
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]  # nothing left aside
    assert Index.load(built).version == before.version


def test_a_change_to_an_index_whose_folder_is_gone_says_so(built: Path) -> None:
    """The folder of a loaded index deleted (or moved) under its process: a change says where
    it went, not that another writer changed it (which a retry would never get past), and
    writes nothing there."""
    import shutil

    from citeqa.errors import IndexChangedError
    from citeqa.retrieval.embed import HashEmbedder
    from citeqa.retrieval.updates import add_documents

    loaded = Index.load(built)
    shutil.rmtree(built)
    with pytest.raises(IndexChangedError, match=r"is gone from disk .* nothing was changed"):
        add_documents(loaded, [Document("d4", "Owls", "owls.txt", "Owls hoot.")], built,
                      embedder=HashEmbedder())
    assert sorted(p.name for p in built.parent.iterdir()) == []  # no debris, no new index


def test_a_change_to_an_index_read_from_its_backup_is_checked_against_the_index(
        built: Path) -> None:
    """Where a backup could not be restored (a read-only file system) it is read where it
    lies; a change made from it is still refused once another writer replaced the index."""
    from citeqa.errors import IndexChangedError
    from citeqa.retrieval.embed import HashEmbedder
    from citeqa.retrieval.store import is_copy_of
    from citeqa.retrieval.updates import add_documents

    backup = built.parent / f".{built.name}.old-{DEAD_PID}"
    import shutil

    shutil.copytree(built, backup)
    assert is_copy_of(backup, built) and is_copy_of(built, built)
    assert not is_copy_of(built.parent / "other", built)
    stale = Index.load(backup)
    build_index_from_documents(DOCS[1:], built, CFG, progress=False)  # another writer
    with pytest.raises(IndexChangedError):
        add_documents(stale, [Document("d4", "Owls", "owls.txt", "Owls hoot.")], built,
                      embedder=HashEmbedder())
    assert set(Index.load(built).documents) == {"d2"}


def test_a_change_keeps_the_owner_and_mode_of_the_index_it_replaces(
        built: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An `index add` under umask 077 (or by root) left a service's index 700/600 (or root's):
    the service could no longer read it, and polled it in silence, serving the old version."""
    import logging
    import os
    import stat

    from citeqa.retrieval import HashEmbedder
    from citeqa.retrieval.store import version_on_disk
    from citeqa.retrieval.updates import add_documents

    os.chmod(built, 0o750)
    as_root = os.geteuid() == 0
    if as_root:  # the service's own user
        for path in [built, *built.rglob("*")]:
            os.chown(path, 65534, 65534)
    old = os.umask(0o077)
    try:
        add_documents(Index.load(built), [Document("d4", "Birds", "b.txt", "Birds sing.")],
                      built, embedder=HashEmbedder())
    finally:
        os.umask(old)
    for path in [built, *built.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
        if as_root:
            assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path
    assert "d4" in Index.load(built).documents
    # a manifest this process may not read is said once, not taken for a writer mid-swap
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    caplog.set_level(logging.WARNING, logger="citeqa.retrieval.store")
    assert version_on_disk(built) is None and version_on_disk(built) is None
    assert caplog.text.count("cannot read") == 1 and "Permission denied" in caplog.text


def test_a_change_by_another_user_never_narrows_what_the_index_group_could_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied without its group (only root may give an owner), a 0750 index written by a
    member of its group became 0640 files of that member's own group: the service lost it."""
    import os
    import stat

    from citeqa.atomic import give_owner_and_mode

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "f").write_text("x")
    os.chmod(tmp / "f", 0o644)  # as the umask gave it
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    def refused(path, uid, gid):  # type: ignore[no-untyped-def]
        raise PermissionError(1, "Operation not permitted")  # not one of that group

    monkeypatch.setattr(os, "chown", refused)
    give_owner_and_mode(tmp, (1234, 1234, 0o750))
    assert stat.S_IMODE((tmp / "f").stat().st_mode) == 0o644  # widened to 0o640 | 0o644
    given: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: given.append((uid, gid)))
    give_owner_and_mode(tmp, (1234, 1234, 0o750))  # one of the group: exactly its mode
    assert stat.S_IMODE((tmp / "f").stat().st_mode) == 0o640 and given[0] == (-1, 1234)
