"""Embeddings kept on disk while a command embeds (citeqa/retrieval/kept.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from citeqa.cli import app
from citeqa.retrieval import HashEmbedder
from citeqa.retrieval.kept import KeptEmbedder, part_key

TEXTS = [f"passage number {i} about rivers and bridges" for i in range(10)]


class Counting:
    """A hash embedder that counts the texts it embeds."""

    def __init__(self) -> None:
        self.inner = HashEmbedder()
        self.model_id, self.dim = self.inner.model_id, self.inner.dim
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str], *, batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        self.embedded.extend(texts)
        return self.inner.embed(texts, batch_size=batch_size)


def test_kept_parts_are_read_back_instead_of_embedded(tmp_path: Path) -> None:
    first = Counting()
    vectors = KeptEmbedder(first, tmp_path / "kept", part=4).embed(TEXTS)
    np.testing.assert_array_equal(vectors, HashEmbedder().embed(TEXTS))
    assert first.embedded == TEXTS and len(list((tmp_path / "kept").glob("*.npy"))) == 3
    again = KeptEmbedder(Counting(), tmp_path / "kept", part=4)
    np.testing.assert_array_equal(again.embed(TEXTS), vectors)
    assert again.embedder.embedded == [] and again.reused == 10  # type: ignore[attr-defined]
    # other texts after the same first part: only the parts that differ are embedded
    other = KeptEmbedder(Counting(), tmp_path / "kept", part=4)
    other.embed([*TEXTS[:4], "something else"])
    assert other.embedder.embedded == ["something else"]  # type: ignore[attr-defined]
    assert other.reused == 4
    other.discard()
    assert not (tmp_path / "kept").exists()


def test_a_damaged_part_is_embedded_again(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    KeptEmbedder(Counting(), tmp_path, part=4).embed(TEXTS)
    key = part_key(HashEmbedder().model_id, HashEmbedder().dim, TEXTS[4:8])
    (tmp_path / f"{key}.npy").write_bytes(b"not a numpy file")
    np.save(tmp_path / f"{part_key(HashEmbedder().model_id, HashEmbedder().dim, TEXTS[:4])}.npy",
            np.zeros((3, HashEmbedder().dim), np.float32))  # a wrong shape
    again = KeptEmbedder(Counting(), tmp_path, part=4)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(again.embed(TEXTS), HashEmbedder().embed(TEXTS))
    assert again.embedder.embedded == TEXTS[:8]  # type: ignore[attr-defined]
    assert "unreadable" in caplog.text and "shape" in caplog.text


def test_keeping_is_best_effort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the directory cannot be made: a file is in the way
    with caplog.at_level(logging.WARNING):
        vectors = KeptEmbedder(Counting(), blocked / "kept", part=4).embed(TEXTS)
    np.testing.assert_array_equal(vectors, HashEmbedder().embed(TEXTS))
    assert "could not keep embeddings" in caplog.text


def test_part_keys_tell_texts_and_models_apart() -> None:
    assert part_key("m", 8, ["ab", "c"]) != part_key("m", 8, ["a", "bc"])
    assert part_key("m", 8, ["a"]) != part_key("n", 8, ["a"]) != part_key("m", 9, ["a"])
    assert part_key("m", 8, ["a", "b"]) == part_key("m", 8, ["a", "b"])


def test_index_add_cut_short_keeps_what_it_embedded(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`citeqa index add` interrupted after its first part: run again, it embeds only the
    rest, says so, and removes what it kept once the documents are in."""
    import citeqa.retrieval.kept as kept

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river Elbe flows to the North Sea.")
    more = tmp_path / "more"
    more.mkdir()
    for i in range(5):
        (more / f"m{i}.txt").write_text(f"Bridge {i} crosses river {i} near town {i}.")

    def cli(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(app, list(args))
        return r.exit_code, r.stdout, r.stderr

    index = tmp_path / "idx"
    assert cli("index", "build", "--preset", "tiny", str(docs), "--out", str(index),
               "--no-progress")[0] == 0
    monkeypatch.setattr(kept, "PART", 2)
    embed, calls = HashEmbedder.embed, []

    def cut_short(self, texts, **kw):  # type: ignore[no-untyped-def]
        if calls:
            raise KeyboardInterrupt
        calls.append(list(texts))
        return embed(self, texts, **kw)

    monkeypatch.setattr(HashEmbedder, "embed", cut_short)
    before = (index / "manifest.json").read_text()
    code, _, err = cli("index", "add", str(more), "--index", str(index), "--no-progress")
    assert code == 130 and "run the same command again" in err
    assert (index / "manifest.json").read_text() == before
    assert len(list((tmp_path / ".idx.add").glob("*.npy"))) == 1
    monkeypatch.setattr(HashEmbedder, "embed", embed)
    code, out, err = cli("index", "add", str(more), "--index", str(index), "--no-progress")
    assert code == 0, err
    assert "added 5 documents (5 passages)" in out
    assert "the embeddings of 2 passages were kept from an interrupted run" in out
    assert not (tmp_path / ".idx.add").exists()
    code, out, _ = cli("search", "Bridge 3 crosses river 3", "--index", str(index), "--json",
                       "--mode", "dense", "-k", "1")
    assert code == 0 and "Bridge 3" in json.loads(out)[0]["text"]


def test_what_an_add_kept_goes_when_nothing_is_left_to_add_or_the_index_is_rebuilt(
        tmp_path: Path) -> None:
    """An add killed after its swap leaves its parts: its rerun (nothing left to add) removes
    them, as a rebuild does; `index info` shows them meanwhile."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river Elbe flows to the North Sea.")

    def cli(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(app, list(args))
        return r.exit_code, r.stdout, r.stderr

    index = tmp_path / "idx"
    assert cli("index", "build", "--preset", "tiny", str(docs), "--out", str(index),
               "--no-progress")[0] == 0
    for again in (["index", "add", str(docs), "--index", str(index), "--no-progress"],
                  ["index", "build", "--preset", "tiny", str(docs), "--out", str(index),
                   "--no-progress"]):
        KeptEmbedder(HashEmbedder(), tmp_path / ".idx.add", part=2).embed(TEXTS[:3])
        code, out, err = cli("index", "info", "-i", str(index), "--json")
        assert code == 0 and json.loads(out)["kept_passages"] == 3, err
        code, out, _ = cli("index", "info", "-i", str(index))
        assert "the embeddings of 3 passages an interrupted `index add` made" in out
        code, out, err = cli(*again)
        assert code == 0, err
        assert not (tmp_path / ".idx.add").exists(), again
    assert json.loads(cli("index", "info", "-i", str(index), "--json")[1])["kept_passages"] == 0
