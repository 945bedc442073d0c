"""The resumable JSON-lines journal (citeqa/journal.py): what a crash leaves is dropped and
redone, a damaged line before the last stops the run, and a run resumes only as itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from citeqa.errors import ConfigError
from citeqa.journal import append_record, check_identity, has_records, read_records, resume

WHAT = dict(what="test record", remedy="start over")


def lines(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def test_a_missing_file_holds_no_records(tmp_path: Path) -> None:
    assert read_records(tmp_path / "none.jsonl", **WHAT) == ([], 0)
    assert resume(tmp_path / "none.jsonl", **WHAT) == []
    assert not (tmp_path / "none.jsonl").exists() and not has_records(tmp_path / "none.jsonl")


def test_records_and_blank_lines_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(lines({"id": 1}) + b"\n" + lines({"id": 2, "x": "é"}))
    assert read_records(path, **WHAT) == ([{"id": 1}, {"id": 2, "x": "é"}], path.stat().st_size)


@pytest.mark.parametrize("cut", [b'{"id": 3, "x"', b'{"id": 3}', b"garbage"])
def test_a_last_line_without_its_newline_is_dropped_and_cut_off(tmp_path: Path, caplog,
                                                                 cut: bytes) -> None:
    path = tmp_path / "r.jsonl"
    whole = lines({"id": 1}, {"id": 2})
    path.write_bytes(whole + cut)
    with caplog.at_level(logging.WARNING, logger="citeqa.journal"):
        assert read_records(path, **WHAT) == ([{"id": 1}, {"id": 2}], len(whole))
    assert "truncated last line" in caplog.text
    assert resume(path, **WHAT) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == whole  # appending continues after the last complete record


@pytest.mark.parametrize("damaged", [b'{"id": 3, "x"\n', b'{"other": 3}\n', b"[1, 2]\n",
                                     b'{"id": 3}\x00\n',
                                     b'{"id": "caf\xc3\n'])  # (a character cut in two)
def test_a_damaged_last_line_with_its_newline_is_dropped_too(tmp_path: Path, caplog,
                                                              damaged: bytes) -> None:
    path = tmp_path / "r.jsonl"
    whole = lines({"id": 1})
    path.write_bytes(whole + damaged + b"\n")  # a blank line after it changes nothing
    with caplog.at_level(logging.WARNING, logger="citeqa.journal"):
        assert read_records(path, **WHAT) == ([{"id": 1}], len(whole))
    assert "damaged last line" in caplog.text
    assert resume(path, **WHAT) == [{"id": 1}] and path.read_bytes() == whole


def test_a_damaged_line_before_the_last_stops_the_run(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    before = lines({"id": 1}) + b"not json\n" + lines({"id": 3})
    path.write_bytes(before)
    for read in (read_records, resume):
        with pytest.raises(ConfigError, match=r"r\.jsonl:2 is not a test record .*start over"):
            read(path, **WHAT)
    assert path.read_bytes() == before  # nothing is dropped


def test_a_damaged_line_followed_by_a_cut_off_one_stops_the_run(tmp_path: Path) -> None:
    """A crash cuts the last line only: a damaged line with one after it, however short, is
    not the crash's, and was dropped with the lines after it."""
    path = tmp_path / "r.jsonl"
    before = lines({"id": 1}) + b'{"id": 2, "x"\n' + b'{"id": 3'
    path.write_bytes(before)
    for read in (read_records, resume):
        with pytest.raises(ConfigError, match=r"r\.jsonl:2 is not a test record .*start over"):
            read(path, **WHAT)
    assert path.read_bytes() == before  # nothing is dropped


def test_the_key_names_what_makes_a_record(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(lines({"qid": "a"}, {"qid": "b"}))
    assert read_records(path, **WHAT, key="qid")[0] == [{"qid": "a"}, {"qid": "b"}]
    with pytest.raises(ConfigError):
        read_records(path, **WHAT)  # no "id": the first line is not a record


def test_append_after_resume_continues_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(lines({"id": 1}) + b'{"id": 2')
    resume(path, **WHAT)
    with path.open("a", encoding="utf-8") as f:
        append_record(f, {"id": 2, "x": "ü"})
    assert read_records(path, **WHAT)[0] == [{"id": 1}, {"id": 2, "x": "ü"}]


def test_has_records_counts_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    for body, expected in ((b"", False), (b"\n\n", False), (b'{"id": 1}', False),
                           (lines({"id": 1}), True)):
        path.write_bytes(body)
        assert has_records(path) is expected, body


def test_identity_is_checked_once_records_exist(tmp_path: Path) -> None:
    run_json, records = tmp_path / "run.json", tmp_path / "r.jsonl"
    ident = {"model": "m1", "seed": 0}
    check_identity(run_json, records, ident, remedy="start over")  # nothing yet: fine
    records.write_bytes(lines({"id": 1}))
    with pytest.raises(ConfigError, match="no run.json"):
        check_identity(run_json, records, ident, remedy="start over")
    run_json.write_text(json.dumps({"identity": ident}))
    check_identity(run_json, records, ident, remedy="start over")
    with pytest.raises(ConfigError, match=r"model: was 'm1', now 'm2'; seed: was 0, now 1"):
        check_identity(run_json, records, {"model": "m2", "seed": 1}, remedy="start over")
    # a key the stored identity lacks counts as None there
    check_identity(run_json, records, {**ident, "new": None}, remedy="start over")
    with pytest.raises(ConfigError, match="new: was None, now 3"):
        check_identity(run_json, records, {**ident, "new": 3}, remedy="start over")
    run_json.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable.*start over"):
        check_identity(run_json, records, ident, remedy="start over")
    # a run that recorded no complete record may start again with another identity
    records.write_bytes(b'{"id": 1')
    check_identity(run_json, records, {"model": "m2"}, remedy="start over")
    # a folder that holds the run's own outputs but no run.json: the run would write over them
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "eval.log").write_text("")  # (a shell's redirection made it: left alone)
    check_identity(mine / "run.json", mine / "r.jsonl", ident, remedy="x",
                   outputs=("report.md", "a.png"))
    (mine / "report.md").write_text("")
    (mine / "a.png").write_text("")
    with pytest.raises(ConfigError, match=r"mine holds a.png, report.md but no run.json"):
        check_identity(mine / "run.json", mine / "r.jsonl", ident, remedy="x",
                       outputs=("report.md", "a.png"))


@pytest.mark.parametrize("stored", ['{"seed": 0}', '{"identity": ["m1", 0]}'])
def test_a_run_json_without_an_identity_object_is_unreadable(tmp_path: Path, stored: str) -> None:
    """No "identity", or one that is not an object: a ConfigError naming the remedy, not a
    KeyError or AttributeError from deep inside the run."""
    run_json, records = tmp_path / "run.json", tmp_path / "r.jsonl"
    run_json.write_text(stored)
    records.write_bytes(lines({"id": 1}))
    with pytest.raises(ConfigError, match=r"run\.json is unreadable .*; start over"):
        check_identity(run_json, records, {"model": "m1"}, remedy="start over")


def test_one_process_writes_a_run_directory_at_a_time(tmp_path: Path) -> None:
    from citeqa.journal import run_lock

    out = tmp_path / "run"
    with run_lock(out, "citeqa eval"):
        assert out.is_dir()
        with pytest.raises(ConfigError, match=r"another citeqa eval is writing to .*run right now"):
            with run_lock(out, "citeqa eval"):
                pass
    with run_lock(out, "citeqa eval"):  # released on leaving
        pass


def test_a_failed_run_leaves_no_empty_folder_it_made(tmp_path: Path) -> None:
    from citeqa.journal import run_lock

    for name, writes in (("empty", False), ("wrote", True)):
        with pytest.raises(ValueError), run_lock(tmp_path / name, "citeqa train generator"):
            if writes:
                (tmp_path / name / "part.json").write_text("{}")
            raise ValueError("--init-adapter nope is not an adapter")
    assert not (tmp_path / "empty").exists()  # was left behind, empty
    assert (tmp_path / "wrote" / "part.json").is_file()  # what a run wrote stays
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError), run_lock(tmp_path / "mine", "citeqa eval"):
        raise ValueError("x")
    assert (tmp_path / "mine").is_dir()  # a folder it did not make stays


def test_a_file_replaced_while_written_is_locked_beside_it(tmp_path: Path) -> None:
    from citeqa.journal import file_lock

    out = tmp_path / "data" / "rm.jsonl"
    with file_lock(out, "citeqa train reward-data"):
        out.write_text("x\n")
        out.replace(out)  # replaced whole: the lock is not on the file
        with pytest.raises(ConfigError, match="another citeqa train reward-data is writing to"):
            with file_lock(out, "citeqa train reward-data"):
                pass
        with file_lock(tmp_path / "data" / "other.jsonl", "citeqa train reward-data"):
            pass  # another file of the same folder is another run
    with file_lock(out, "citeqa train reward-data"):
        pass
    assert sorted(p.name for p in out.parent.iterdir()) == [".other.jsonl.lock", ".rm.jsonl.lock",
                                                             "rm.jsonl"]


def test_an_appended_record_is_flushed_to_disk_and_kept_readable(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Each record is fsynced before the run moves on (a power cut loses at most the question
    being asked), and written as UTF-8 text, not \\u escapes (a person reads the journal)."""
    import citeqa.journal as journal

    synced: list[int] = []
    monkeypatch.setattr(journal.os, "fsync", synced.append)
    path = tmp_path / "r.jsonl"
    with path.open("a", encoding="utf-8") as f:
        append_record(f, {"id": 1, "answer": "Zürich"})
        assert synced == [f.fileno()]
    assert path.read_text(encoding="utf-8") == '{"id": 1, "answer": "Zürich"}\n'
