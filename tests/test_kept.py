"""Embeddings kept on disk while a command embeds (citeqa/retrieval/kept.py)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from citeqa.cli import app
from citeqa.retrieval import HashEmbedder
from citeqa.retrieval.kept import KeptEmbedder, discard, kept_dir, kept_passages, text_hash

TEXTS = [f"passage number {i} about rivers and bridges" for i in range(10)]


class Counting:
    """A hash embedder that counts the texts it embeds."""

    def __init__(self, cpu_dtype: str = "auto") -> None:
        self.inner = HashEmbedder()
        self.model_id, self.dim = self.inner.model_id, self.inner.dim
        self.cpu_dtype = cpu_dtype
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str], *, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        self.embedded.extend(texts)
        return self.inner.embed(texts, batch_size=batch_size)


def kept(directory: Path, **kw) -> KeptEmbedder:  # type: ignore[no-untyped-def]
    return KeptEmbedder(Counting(**kw), directory, part=4)


def test_kept_passages_are_read_back_instead_of_embedded(tmp_path: Path) -> None:
    first = kept(tmp_path / "k")
    with first:
        vectors = first.embed(TEXTS)
    np.testing.assert_array_equal(vectors, HashEmbedder().embed(TEXTS))
    assert first.embedder.embedded == TEXTS and len(first.written) == 3  # type: ignore[attr-defined]
    assert first.reused == 0 and kept_passages(tmp_path / "k") == 10
    again = kept(tmp_path / "k")
    np.testing.assert_array_equal(again.embed(TEXTS), vectors)
    assert again.embedder.embedded == [] and again.reused == 10  # type: ignore[attr-defined]
    # passages looked up one by one: a new one first, some dropped, the order changed
    other = kept(tmp_path / "k")
    texts = ["something new", *TEXTS[7:], TEXTS[2], "something new"]
    np.testing.assert_array_equal(other.embed(texts), HashEmbedder().embed(texts))
    assert other.embedder.embedded == ["something new"]  # type: ignore[attr-defined]
    assert other.reused == 4
    other.discard()
    assert not (tmp_path / "k").exists()


def test_a_retry_reuses_its_own_parts_without_calling_them_kept(tmp_path: Path) -> None:
    """The second attempt after another writer's change reads what the first one embedded;
    those were not kept from an interrupted run."""
    written: list[str] = []
    with KeptEmbedder(Counting(), tmp_path, part=4, written=written) as one:
        one.embed(TEXTS)
    assert len(written) == 3
    with KeptEmbedder(Counting(), tmp_path, part=4, written=written) as retry:
        retry.embed(TEXTS)
    assert retry.embedder.embedded == [] and retry.reused == 0  # type: ignore[attr-defined]
    retry.discard()
    assert not tmp_path.exists() or not list(tmp_path.glob("*.npz"))


def test_the_requested_dtype_and_the_model_are_part_of_the_key(tmp_path: Path) -> None:
    kept(tmp_path).embed(TEXTS)
    fp32 = kept(tmp_path, cpu_dtype="fp32")
    fp32.embed(TEXTS)
    assert fp32.embedder.embedded == TEXTS  # type: ignore[attr-defined]
    assert text_hash("m\0" "8", "a") != text_hash("n\0" "8", "a")
    assert text_hash("m", "ab") != text_hash("ma", "b")


def test_a_damaged_part_is_embedded_again(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    first = kept(tmp_path)
    first.embed(TEXTS)
    (tmp_path / first.written[1]).write_bytes(b"not a numpy file")
    (tmp_path / first.written[0]).write_bytes(b"")  # a file system that lost the data
    with np.load(tmp_path / first.written[2]) as part:
        hashes = part["hashes"]  # its own hashes (they are looked for), too few vectors
    np.savez(tmp_path / first.written[2], hashes=hashes,
             vectors=np.zeros((len(hashes) - 1, 8), np.float32))
    again = kept(tmp_path)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(again.embed(TEXTS), HashEmbedder().embed(TEXTS))
    assert again.embedder.embedded == TEXTS  # type: ignore[attr-defined]
    assert "unreadable" in caplog.text and "not a part" in caplog.text
    assert kept_passages(tmp_path) == 10  # what it wrote again; the damaged ones not counted


def test_a_part_holding_none_of_the_texts_is_not_read_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-up read every part's vectors, those of parts it would take nothing from too."""
    import citeqa.retrieval.kept as kept_module

    first = kept(tmp_path)
    first.embed(TEXTS[:4])  # one part of four
    real_load, read_whole = kept_module._load, []

    def spy(path: Path, *, vectors: bool = True):  # type: ignore[no-untyped-def]
        if vectors:
            read_whole.append(path.name)
        return real_load(path, vectors=vectors)

    monkeypatch.setattr(kept_module, "_load", spy)
    kept(tmp_path).embed(TEXTS[4:8])
    assert read_whole == []  # only its hashes were read
    again = kept(tmp_path)
    np.testing.assert_array_equal(again.embed(TEXTS[:2]), HashEmbedder().embed(TEXTS[:2]))
    assert read_whole == first.written and again.embedder.embedded == []  # type: ignore[attr-defined]


def test_keeping_is_best_effort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the directory cannot be made: a file is in the way
    with caplog.at_level(logging.WARNING), kept(blocked / "k") as k:
        vectors = k.embed(TEXTS)
    np.testing.assert_array_equal(vectors, HashEmbedder().embed(TEXTS))
    assert "could not keep embeddings" in caplog.text


def test_discard_leaves_another_adds_parts_and_what_is_not_its_own(tmp_path: Path) -> None:
    """While another add holds the directory's lock, a finished one removes only the parts it
    wrote; alone, it removes every part, and nothing else that is in the folder."""
    other, mine = kept(tmp_path / "k"), kept(tmp_path / "k")
    with other:
        other.embed(TEXTS[:4])
        with mine:
            mine.embed(TEXTS[4:8])
        mine.discard()
        assert sorted(p.name for p in (tmp_path / "k").glob("*.npz")) == sorted(other.written)
    (tmp_path / "k" / "notes.txt").write_text("someone's")
    discard(tmp_path / "k")
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["notes.txt"]


def test_kept_dir_follows_links_and_names_dot(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert kept_dir(tmp_path / "link") == tmp_path / ".real.add"
    monkeypatch.chdir(tmp_path / "real")
    assert kept_dir(Path(".")) == tmp_path / ".real.add"


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_index_add_cut_short_keeps_what_it_embedded(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`citeqa index add` interrupted after its first part: run again, it embeds only the
    rest, says so, and removes what it kept once the documents are in."""
    import citeqa.retrieval.kept as kept_module

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river Elbe flows to the North Sea.")
    more = tmp_path / "more"
    more.mkdir()
    for i in range(5):
        (more / f"m{i}.txt").write_text(f"Bridge {i} crosses river {i} near town {i}.")
    index = tmp_path / "idx"
    assert _cli("index", "build", "--preset", "tiny", str(docs), "--out", str(index),
                "--no-progress")[0] == 0
    monkeypatch.setattr(kept_module, "PART", 2)
    embed, calls = HashEmbedder.embed, []

    def cut_short(self, texts, **kw):  # type: ignore[no-untyped-def]
        if calls:
            raise KeyboardInterrupt
        calls.append(list(texts))
        return embed(self, texts, **kw)

    monkeypatch.setattr(HashEmbedder, "embed", cut_short)
    before = (index / "manifest.json").read_text()
    code, _, err = _cli("index", "add", str(more), "--index", str(index), "--no-progress")
    assert code == 130 and "run the same command again" in err
    assert (index / "manifest.json").read_text() == before
    assert kept_passages(tmp_path / ".idx.add") == 2
    monkeypatch.setattr(HashEmbedder, "embed", embed)
    code, out, err = _cli("index", "add", str(more), "--index", str(index), "--no-progress")
    assert code == 0, err
    assert "added 5 documents (5 passages)" in out
    assert "the embeddings of 2 passages were kept from an interrupted run" in out
    assert not (tmp_path / ".idx.add").exists()
    code, out, _ = _cli("search", "Bridge 3 crosses river 3", "--index", str(index), "--json",
                        "--mode", "dense", "-k", "1")
    assert code == 0 and "Bridge 3" in json.loads(out)[0]["text"]


def test_what_an_add_kept_goes_when_nothing_is_left_to_add_or_the_index_is_rebuilt(
        tmp_path: Path) -> None:
    """An add killed after its swap leaves its parts: its rerun (nothing left to add) removes
    them, as a rebuild does (through a link to the index too); `index info` shows them
    meanwhile."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river Elbe flows to the North Sea.")
    index = tmp_path / "idx"
    assert _cli("index", "build", "--preset", "tiny", str(docs), "--out", str(index),
                "--no-progress")[0] == 0
    os.symlink(index, tmp_path / "link")
    for again in (["index", "add", str(docs), "--index", str(index), "--no-progress"],
                  ["index", "build", "--preset", "tiny", str(docs), "--out",
                   str(tmp_path / "link"), "--no-progress"]):
        kept(tmp_path / ".idx.add").embed(TEXTS[:3])
        code, out, err = _cli("index", "info", "-i", str(tmp_path / "link"), "--json")
        assert code == 0 and json.loads(out)["kept_passages"] == 3, err
        code, out, _ = _cli("index", "info", "-i", str(index))
        assert "the embeddings of 3 passages an interrupted `index add` made" in out
        code, out, err = _cli(*again)
        assert code == 0, err
        assert not (tmp_path / ".idx.add").exists(), again
    assert json.loads(_cli("index", "info", "-i", str(index), "--json")[1])["kept_passages"] == 0


def test_parts_that_are_not_whole_archives_are_embedded_again(tmp_path: Path) -> None:
    with kept(tmp_path) as first:
        first.embed(TEXTS)
    cut = tmp_path / first.written[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a truncated zip
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.npy").rename(tmp_path / first.written[1])  # an .npy under a part's name
    assert kept_passages(tmp_path) == 2  # the one whole part left
    again = kept(tmp_path)
    np.testing.assert_array_equal(again.embed(TEXTS), HashEmbedder().embed(TEXTS))
    assert again.embedder.embedded == TEXTS[:8]  # type: ignore[attr-defined]


def test_a_lock_file_unlinked_while_waited_for_is_taken_again(tmp_path: Path) -> None:
    """An add that waited for the lock while a discard removed its file holds a lock nobody
    else can see: it takes the lock on the file now at the path, so that a later discard
    knows it is not alone."""
    import fcntl
    import threading
    import time

    from citeqa.retrieval.kept import LOCK, _locked

    (tmp_path / LOCK).touch()
    fd = os.open(tmp_path / LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a discard at work
    holding, done = threading.Event(), threading.Event()

    def waiting_add() -> None:
        with _locked(tmp_path, exclusive=False) as held:
            assert held
            holding.set()
            done.wait(10)

    thread = threading.Thread(target=waiting_add)
    thread.start()
    time.sleep(0.2)  # it waits for the lock
    (tmp_path / LOCK).unlink()  # the discard removes the lock file, then lets go
    os.close(fd)
    assert holding.wait(10)
    kept(tmp_path).embed(TEXTS[:4])
    discard(tmp_path)  # another add finished meanwhile: it must see it is not alone
    assert kept_passages(tmp_path) == 4
    done.set()
    thread.join()
    discard(tmp_path)
    assert not tmp_path.exists()


def test_without_flock_a_discard_removes_everything(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    kept(tmp_path).embed(TEXTS)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl -> ImportError
    discard(tmp_path)
    assert kept_passages(tmp_path) == 0


def test_bench_kept_reports_the_overhead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import runpy
    import sys

    out = tmp_path / "k.json"
    monkeypatch.setattr(sys, "argv", ["bench_kept.py", "--passages", "300", "--out", str(out)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kept.py"),
                   run_name="__main__")
    row = json.loads(out.read_text())
    assert row["passages"] == 300 and row["kept_bytes"] > 300 * HashEmbedder().dim * 4
    assert min(row["plain_s"], row["kept_s"], row["read_back_s"]) > 0
    assert "all read back" in capsys.readouterr().out
