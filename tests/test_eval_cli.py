"""``citeqa eval`` and ``citeqa eval compare`` through Typer, registered as the main CLI will
(``app.add_typer(eval_app, name="eval")``), with the tiny preset and an index in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from citeqa.config import preset
from citeqa.evals.cli import eval_app
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Document

app = typer.Typer()


@app.callback()
def _root() -> None:
    """A stand-in for citeqa's main app."""


app.add_typer(eval_app, name="eval")
runner = CliRunner()

DOCS = [
    Document(
        "h",
        "Harvard",
        "h.txt",
        "Harvard University was founded in 1636 in Cambridge, Massachusetts.",
    ),
    Document(
        "e",
        "Eiffel",
        "e.txt",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris. It opened in 1889.",
    ),
]
QUESTIONS = [
    {"id": "a", "question": "When was Harvard founded?", "answers": ["1636"]},
    {"id": "b", "question": "When did the Eiffel Tower open?", "answers": ["1889"]},
    {"id": "c", "question": "Who painted the Moon?", "answers": []},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    build_index_from_documents(DOCS, root / "index", preset("tiny").retrieval, progress=False)
    data = root / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root / "index", data


def _eval(index: Path, data: Path, out: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            str(data),
            "--index",
            str(index),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--no-progress",
            *extra,
        ],
    )


def test_run_then_compare(setup: tuple[Path, Path], tmp_path: Path) -> None:
    index, data = setup
    a = _eval(index, data, tmp_path / "A", "--limit", "2")
    assert a.exit_code == 0, a.output
    assert "2 questions (0 resumed, 2 asked)" in a.stdout
    b = _eval(index, data, tmp_path / "B", "--min-score", "0.99")
    assert b.exit_code == 0, b.output
    rows = (tmp_path / "B" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all(json.loads(r)["declined"] for r in rows)
    # resuming A without --limit asks only the last question
    again = _eval(index, data, tmp_path / "A")
    assert again.exit_code == 0, again.output
    assert "3 questions (2 resumed, 1 asked)" in again.stdout

    png = tmp_path / "cmp.png"
    c = runner.invoke(
        app, ["eval", "compare", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(png)]
    )
    assert c.exit_code == 0, c.output
    lines = c.stdout.splitlines()
    assert lines[0].split()[:3] == ["metric", "A", "B"]
    cov = next(line for line in lines if line.startswith("coverage @ threshold"))
    assert "100.0%" in cov and "0.0%" in cov and "-100.0 pt (worse)" in cov
    assert any(line.startswith("SQuAD F1") for line in lines)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # B declined all three, A answered all three (no threshold): every answer changed
    assert lines[-4] == ("of 3 questions in both: given answer changed 3, decline changed 3, "
                         "best candidate changed 0")
    assert lines[-2] == ("(better) / (worse) give a delta's direction, not its significance: "
                         "over 3 questions one question moves a share by 33.33 pt or more "
                         "(a share of fewer, e.g. the answered ones, by more); "
                         "evals/eval_paired.py gives paired 95 % intervals")
    assert not any(line.startswith(("warning", "note")) for line in lines)  # the same dataset
    # metrics alone (a committed run without its predictions): no made-up overlap warning
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metrics.json", "run.json"):
        (bare / name).write_bytes((tmp_path / "B" / name).read_bytes())
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(bare)])
    assert c.exit_code == 0 and c.stdout.startswith("note: a run has no predictions"), c.stdout
    assert "share only" not in c.stdout

    # a run begun and not finished is said to be one (it was told to pass a run directory)
    (bare / "metrics.json").unlink()
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(bare)])
    assert c.exit_code == 2 and "is a run that has not finished" in c.output, c.output
    (bare / "run.json").unlink()
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(bare)])
    assert c.exit_code == 2 and "pass a directory written by `citeqa eval --out`" in c.output

    other = tmp_path / "other.jsonl"  # another dataset: the deltas compare other questions
    other.write_text(json.dumps({"id": "z", "question": "Where is it?", "answers": []}) + "\n")
    assert _eval(index, other, tmp_path / "C").exit_code == 0
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(tmp_path / "C"),
                            "--out", str(png)])
    assert c.exit_code == 0 and c.stdout.startswith("warning: the two runs asked different")
    assert _eval(index, data, tmp_path / "D", "--limit", "1").exit_code == 0  # same file
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(tmp_path / "D"),
                            "--out", str(png)])
    assert c.exit_code == 0 and c.stdout.startswith(
        "warning: the runs share only 1 question (3 and 1 asked")


def test_compare_compares_the_questions_the_metrics_cover(setup: tuple[Path, Path],
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run rerun with --limit keeps every prediction but its metrics cover fewer: compare
    counted all of them ("of 3 questions in both"), with no warning."""
    index, data = setup
    assert _eval(index, data, tmp_path / "A").exit_code == 0
    assert _eval(index, data, tmp_path / "B").exit_code == 0
    assert _eval(index, data, tmp_path / "B", "--limit", "1").exit_code == 0  # metrics: 1
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(tmp_path / "B")])
    assert c.exit_code == 0, c.output
    assert c.stdout.startswith("warning: the runs share only 1 question (3 and 1 asked")
    assert "of 1 questions in both" in c.stdout
    # the ids are written with the metrics they describe: a rerun stopped before its metrics
    # leaves both as they were
    import citeqa.evals.report as report

    metrics = (tmp_path / "B" / "metrics.json").read_text()
    assert len(json.loads(metrics)["question_ids"]) == 1

    def stopped(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_outputs", stopped)
    assert _eval(index, data, tmp_path / "B").exit_code == 130
    assert (tmp_path / "B" / "metrics.json").read_text() == metrics


def test_questions_citeqa_refuses_are_counted_and_said(setup: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """An empty or over-long question became a silent decline (an unanswerable one counted as
    declined right)."""
    index, _ = setup
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in (
        {"id": "long", "question": "Why " * 300, "answers": []},
        {"id": "blank", "question": "   ", "answers": ["x"]},
        {"id": "fine", "question": "When did the tower open?", "answers": []})))
    r = _eval(index, data, tmp_path / "R")
    assert r.exit_code == 0, r.output
    assert "warning: 2 questions refused by citeqa (empty or too long)" in r.stderr
    assert json.loads((tmp_path / "R" / "metrics.json").read_text())["refused"] == 2
    assert "**2 refused** by citeqa" in (tmp_path / "R" / "report.md").read_text()


def test_compare_writes_no_file_without_out(setup: tuple[Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    index, data = setup
    for run in ("A", "B"):
        assert _eval(index, data, tmp_path / run, "--limit", "1").exit_code == 0
    monkeypatch.chdir(tmp_path)  # an overlay by default would land here
    before = sorted(p.name for p in tmp_path.iterdir())
    c = runner.invoke(app, ["eval", "compare", "A", "B"])
    assert c.exit_code == 0, c.output
    assert c.stdout.startswith("metric") and "overlay" not in c.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_delta_that_rounds_to_nothing_is_neither_better_nor_worse() -> None:
    from citeqa.evals.compare import _delta

    assert _delta(100.2, 100.1, "ms", higher_better=False) == "+0 ms"  # was "-0 ms (better)"
    assert _delta(100.0, 98.0, "ms", higher_better=False) == "-2 ms (better)"
    assert _delta(0.5, 0.5004, "pct", higher_better=True) == "+0.0 pt"
    assert _delta(0.5, 0.6, "pct", higher_better=True) == "+10.0 pt (better)"
    assert _delta(400, 100, "int", higher_better=True) == "-300"  # counts: signed, unmarked
    assert _delta(400, 400, "int", higher_better=True) == "+0"


def test_mismatch_refused_with_exit_2(setup: tuple[Path, Path], tmp_path: Path) -> None:
    index, data = setup
    assert _eval(index, data, tmp_path / "R", "--limit", "1").exit_code == 0
    r = _eval(index, data, tmp_path / "R", "--n-candidates", "2")
    assert r.exit_code == 2
    assert "n_candidates" in r.stderr and "--force" in r.stderr
    assert _eval(index, data, tmp_path / "R", "--n-candidates", "2", "--force").exit_code == 0


def test_bad_input_exits_2(setup: tuple[Path, Path], tmp_path: Path) -> None:
    index, data = setup
    r = _eval(index, tmp_path / "missing.jsonl", tmp_path / "o1")
    assert r.exit_code == 2 and "not found" in r.stderr and "Traceback" not in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n" + '{"id": "x"}\n')
    r = _eval(index, bad, tmp_path / "o2")
    assert r.exit_code == 2 and "bad.jsonl:2" in r.stderr
    r = runner.invoke(app, ["eval", "--dataset", str(data)])
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: missing --index, --out (see citeqa eval --help)")  # one line, not the help
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for extra, out, message in (((), a_file, "is a file"),
                                (("--answer-mode", "bogus"), tmp_path / "o4", "--answer-mode"),
                                (("--preset", "bogus"), tmp_path / "o5", "unknown preset")):
        r = _eval(index, data, out, *extra)
        assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output, extra
        assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()  # no run made
    r = _eval(index, data, tmp_path / "o3", "--split", "test")
    assert r.exit_code == 2 and "unknown split" in r.stderr
    r = runner.invoke(app, ["eval", "compare", str(tmp_path), str(tmp_path)])
    assert r.exit_code == 2 and "metrics.json" in r.stderr
    r = runner.invoke(app, ["eval", "compare", str(tmp_path), str(tmp_path), "--out", "t.txt"])
    assert r.exit_code == 2 and ".png" in r.stderr and "Traceback" not in r.output


def test_ctrl_c_ends_a_run_with_one_line(setup: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """It ended with status 130 and nothing said; the resumable commands now say so."""
    import citeqa.evals.runner as runner
    from citeqa.cli import app

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_eval", interrupted)
    dataset, index = setup
    r = CliRunner().invoke(app, ["eval", "--dataset", str(dataset), "--index", str(index),
                                 "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert r.exit_code == 130, r.output
    assert "interrupted: what was finished is kept; run the same command again" in r.output
    assert "Traceback" not in r.output


def test_the_module_entry_point_says_what_the_system_refuses_in_one_line(tmp_path: Path) -> None:
    """``python -m citeqa.evals.cli`` (evals/regenerate.sh's) printed tracebacks for what
    ``citeqa eval`` says in one line."""
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("")
    done = subprocess.run([sys.executable, "-m", "citeqa.evals.cli", "compare", str(afile),
                           str(afile)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: Not a directory: {afile / 'metrics.json'}"


def test_compare_refuses_damaged_run_files_in_one_line(setup: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """metrics.json holding JSON that is not metrics, and a committed predictions.jsonl.gz with
    a bad line or cut short, were tracebacks (or a bare "Aborted!") rather than errors."""
    import gzip
    import shutil

    index, data = setup
    assert _eval(index, data, tmp_path / "A").exit_code == 0
    good = (tmp_path / "A" / "predictions.jsonl").read_bytes()

    def compare_with(name: str, metrics: str | None = None, gz: bytes | None = None) -> str:
        run = tmp_path / name
        shutil.copytree(tmp_path / "A", run)
        if metrics is not None:
            (run / "metrics.json").write_text(metrics)
        if gz is not None:
            (run / "predictions.jsonl").unlink()
            (run / "predictions.jsonl.gz").write_bytes(gz)
        c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(run)])
        assert c.exit_code == 2, c.output
        return c.stderr

    assert "is not the metrics `citeqa eval` writes" in compare_with("list", metrics="[1, 2]")
    assert "is not the metrics" in compare_with("sections", metrics='{"selective": []}')
    # a value that is no number, a record without its fields: shown as n/a, never a traceback
    odd = tmp_path / "odd"
    shutil.copytree(tmp_path / "A", odd)
    metrics = json.loads((odd / "metrics.json").read_text())
    (odd / "metrics.json").write_text(json.dumps({**metrics, "questions": "x", "squad": {
        "exact": None, "f1": "y"}}))
    (odd / "predictions.jsonl").write_text("".join(
        json.dumps({"id": json.loads(line)["id"]}) + "\n" for line in good.splitlines()))
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(odd)])
    assert c.exit_code == 0, c.output
    assert "SQuAD F1" in c.stdout and "n/a" in c.stdout
    bad_line = gzip.compress(good + b"garbage\n" + good.splitlines(keepends=True)[0])
    assert "predictions.jsonl.gz:" in compare_with("badline", gz=bad_line)
    assert "is not a whole gzip file" in compare_with("cut", gz=gzip.compress(good)[:60])
    # the committed copy, whole, is read as the plain file is
    ok = tmp_path / "gz"
    shutil.copytree(tmp_path / "A", ok)
    (ok / "predictions.jsonl").unlink()
    (ok / "predictions.jsonl.gz").write_bytes(gzip.compress(good))
    c = runner.invoke(app, ["eval", "compare", str(tmp_path / "A"), str(ok)])
    assert c.exit_code == 0, c.output
    assert "of 3 questions in both: given answer changed 0," in c.stdout
