"""evals/eval_paired.py: judging best candidates and the paired bootstrap of two runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evals.eval_paired import best_holds_gold, best_right, paired

ROOT = Path(__file__).resolve().parent.parent


def record(qid: str, answer: str | None, quote: str | None, golds: list[str]) -> dict:
    candidates = [] if answer is None else [{"answer": answer, "quote": {"text": quote}}]
    return {"id": qid, "answerable": bool(golds), "gold_answers": golds, "candidates": candidates}


def test_best_right_uses_the_f1_rule() -> None:
    assert best_right(record("a", "the Eiffel Tower", "x", ["Eiffel Tower"]))
    assert not best_right(record("a", "Paris", "x", ["Eiffel Tower"]))
    assert not best_right(record("a", None, None, ["Eiffel Tower"]))


def test_holds_gold_needs_whole_words() -> None:
    assert best_holds_gold(record("a", "x", "Built in 1889, it stands.", ["1889"]))
    assert not best_holds_gold(record("a", "x", "Built in 18890.", ["1889"]))


def test_paired_interval_brackets_the_mean_difference() -> None:
    a = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    b = np.array([1, 1, 1, 1, 1, 0, 1, 0])
    mean, low, high = paired(a, b)
    assert mean == 0.25
    assert low < mean < high
    assert paired(a, a) == (0.0, 0.0, 0.0)
    # 400 questions, B right on 100 more: the bootstrap interval is close to the normal one,
    # 0.25 +- 1.96 * sqrt(0.25 * 0.75 / 400) = [0.208, 0.292]
    mean, low, high = paired(np.zeros(400), np.repeat([1.0, 0.0], [100, 300]))
    assert mean == 0.25
    assert low == pytest.approx(0.208, abs=0.006) and high == pytest.approx(0.292, abs=0.006)


def test_cli_compares_only_shared_answerable_questions(tmp_path: Path) -> None:
    run_a = [record("q1", "1889", "in 1889", ["1889"]), record("q2", "no", "no", [])]
    run_b = [record("q1", "1890", "in 1890", ["1889"]), record("q3", "1889", "1889", ["1889"])]
    paths = []
    for name, run in (("a.jsonl", run_a), ("b.jsonl", run_b)):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in run), encoding="utf-8")
        paths.append(str(path))
    with open(paths[0], "a", encoding="utf-8") as f:  # a line a crash cut short: left out
        f.write(json.dumps(record("q4", "1889", "1889", ["1889"]))[:30])
    out = subprocess.run(
        [sys.executable, "evals/eval_paired.py", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "best candidate right: 100.0 % -> 0.0 % (-100.0 points" in out
    assert "1 questions" in out


def test_cli_reads_generation_quality_runs_and_refuses_mixed_kinds(tmp_path: Path) -> None:
    def quality(rights: list[int]) -> dict:
        records = [
            {"id": f"q{i}", "right": r, "quote_has_answer": 1, "em": r, "f1": 0.5 * r}
            for i, r in enumerate(rights)
        ]
        return {"modes": {"constrained": {"records": records}}}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.jsonl"
    a.write_text(json.dumps(quality([1, 1, 0, 0])), encoding="utf-8")
    b.write_text(json.dumps(quality([1, 0, 0, 0])), encoding="utf-8")
    c.write_text("", encoding="utf-8")
    run = [sys.executable, "evals/eval_paired.py"]
    out = subprocess.run([*run, str(a), str(b)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "best candidate right: 50.0 % -> 25.0 % (-25.0 points" in out.stdout
    assert "F1: 25.0 % -> 12.5 %" in out.stdout
    mixed = subprocess.run([*run, str(a), str(c)], cwd=ROOT, capture_output=True, text=True)
    assert mixed.returncode != 0 and "same kind" in mixed.stderr


def test_quality_records_written_before_right_was_recorded_are_judged_by_the_same_rule() -> None:
    from evals.eval_paired import quality_field

    old = {"answer": "the Eiffel Tower", "golds": ["Eiffel Tower"], "verified": True}
    assert quality_field(old, "right") is True
    assert quality_field({**old, "verified": False}, "right") is False  # no verified quote
    assert quality_field({**old, "answer": "Paris"}, "right") is False
    assert quality_field({**old, "right": False}, "right") is False  # recorded: taken as is


def test_committed_generation_quality_runs_compare() -> None:
    """Files of both ages pair: the base run lacks "right", the span run has it."""
    results = ROOT / "evals" / "results"
    out = subprocess.run(
        [sys.executable, "evals/eval_paired.py", str(results / "generation_quality_base.json"),
         str(results / "generation_quality_span.json")],
        cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "best candidate right: " in out.stdout and "200 questions" in out.stdout
