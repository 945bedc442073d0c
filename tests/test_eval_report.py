"""The evaluation report: judging records, aggregating metrics, report.md, the PNG figures.

The metric functions are tested in test_metrics.py; these tests check how records are judged
and aggregated, against hand-worked numbers and against the metric functions themselves.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from citeqa.evals import metrics as M
from citeqa.evals.report import (
    FIGURES,
    contains_gold,
    judge,
    quote_is_valid,
    render_markdown,
    summarize,
    write_outputs,
)
from citeqa.types import Document

DOC = Document("d", "Harvard", "h.txt", "Harvard University was founded in 1636 in Cambridge.")
DOCS = {"d": DOC}


def _quote(start: int, end: int, text: str | None = None) -> dict[str, Any]:
    return {
        "text": DOC.text[start:end] if text is None else text,
        "doc_id": "d",
        "title": "Harvard",
        "source": "h.txt",
        "start": start,
        "end": end,
    }


GOOD_QUOTE = _quote(0, len(DOC.text))


def _cand(
    answer: str, score: float, quote: dict | None = GOOD_QUOTE, lp: float = -0.5, rs: float = 0.1
) -> dict[str, Any]:
    return {
        "answer": answer,
        "quote": quote,
        "score": score,
        "uncertainty": None,
        "logprob": lp * 4,
        "mean_logprob": lp,
        "retrieval_score": rs,
    }


def _record(
    qid: str,
    golds: list[str],
    answer: str | None,
    cands: list[dict],
    *,
    rank: int | None = 1,
    context: bool = True,
    ms: float = 10.0,
) -> dict[str, Any]:
    best = cands[0] if cands else None
    return {
        "id": qid,
        "gold_answers": golds,
        "question": "q?",
        "declined": answer is None,
        "answer": answer,
        "quote": best["quote"] if answer is not None and best else None,
        "score": best["score"] if best else None,
        "candidates": cands,
        "timings_ms": {"total_ms": ms},
        "gold_rank": rank,
        "has_context": context,
    }


def test_quote_validity_and_gold_containment() -> None:
    assert quote_is_valid(GOOD_QUOTE, DOCS.__getitem__)
    assert not quote_is_valid(_quote(1, 10, text="Harvard U"), DOCS.__getitem__)  # offsets off
    assert not quote_is_valid({**GOOD_QUOTE, "doc_id": "gone"}, DOCS.__getitem__)
    assert not quote_is_valid(None, DOCS.__getitem__)
    assert contains_gold("It was founded in 1636.", ["1636"])
    assert contains_gold("Founded by THE Puritans", ["the puritans"])
    assert not contains_gold("founded in 16360", ["1636"])  # whole words only
    assert not contains_gold("anything", [""])


def test_judge_cases() -> None:
    doc = DOCS.__getitem__
    right = judge(_record("a", ["1636"], "1636", [_cand("1636", 0.9)]), doc)
    assert right.correct and right.best_correct and right.exact == 1.0 and right.quote_valid
    assert right.scores == {"rm": 0.9, "likelihood": -0.5, "retrieval": 0.1}
    assert right.probability == 0.9 and right.quote_has_gold

    # right words, but the quote is not verbatim at its offsets: not correct
    bad_quote = _quote(0, 7, text="Harvarx")
    forged = judge(_record("b", ["1636"], "1636", [_cand("1636", 0.9, bad_quote)]), doc)
    assert forged.quote_valid is False and not forged.correct and not forged.best_correct
    assert forged.f1 == 1.0  # SQuAD F1 looks only at the answer text

    # declined at the threshold, but the best candidate would have been right
    declined = judge(_record("c", ["1636"], None, [_cand("1636", 0.2)]), doc)
    assert not declined.correct and declined.best_correct and declined.f1 == 0.0
    assert declined.quote_valid is None and declined.quote_has_gold is None

    # unanswerable: declining is right (SQuAD 2.0: empty prediction scores 1), answering wrong
    unans = judge(_record("d", [], None, [_cand("1636", 0.4)]), doc)
    assert unans.correct and unans.exact == 1.0 and unans.f1 == 1.0 and not unans.best_correct
    answered_unans = judge(_record("e", [], "1636", [_cand("1636", 0.4)]), doc)
    assert not answered_unans.correct and answered_unans.exact == 0.0
    # a gold that normalises to nothing makes the question unanswerable: no quote is judged
    # against it (it was, and always failed, pulling "quote contains gold" down)
    the = judge(_record("h", ["the"], "1636", [_cand("1636", 0.4)]), doc)
    assert not the.answerable and the.quote_has_gold is None

    # nothing verifiable: can never be answered, score -inf for every scorer
    none = judge(_record("f", ["1636"], None, [_cand("x", 0.99, quote=None)]), doc)
    assert all(s == -math.inf for s in none.scores.values())
    assert none.probability is None and not none.best_correct
    empty = judge(_record("g", ["1636"], None, [], rank=None), doc)
    assert empty.scores["rm"] == -math.inf and empty.gold_rank is None


def _records() -> list[dict[str, Any]]:
    return [
        _record("1", ["1636"], "1636", [_cand("1636", 0.9, lp=-0.1, rs=0.5)], rank=1, ms=10),
        _record(
            "2", ["1636"], "Cambridge", [_cand("Cambridge", 0.8, lp=-0.2, rs=0.1)], rank=3, ms=20
        ),
        _record("3", ["1636"], None, [_cand("1636", 0.3, lp=-0.9, rs=0.4)], rank=None, ms=30),
        _record(
            "4", [], None, [_cand("Harvard", 0.2, lp=-0.3, rs=0.2)], rank=None, context=False, ms=40
        ),
        _record(
            "5",
            [],
            "Harvard",
            [_cand("Harvard", 0.7, lp=-0.4, rs=0.3)],
            rank=None,
            context=False,
            ms=50,
        ),
        _record("6", ["1636"], None, [], rank=7, ms=60),
    ]


def test_summarize_by_hand() -> None:
    judged = [judge(r, DOCS.__getitem__) for r in _records()]
    m = summarize(judged, threshold=0.5)
    assert (m["questions"], m["answerable"], m["unanswerable"]) == (6, 4, 2)
    assert m["threshold"] == 0.5
    # returned at threshold: 1 right, 2 wrong (F1 0), 3 declined answerable, 4 declined
    # unanswerable (right), 5 answered unanswerable (wrong), 6 declined
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["at_threshold"]["coverage"] == pytest.approx(3 / 6)
    assert m["at_threshold"]["answered_accuracy"] == pytest.approx(1 / 3)
    assert m["unanswerable_declined"] == pytest.approx(1 / 2)
    assert m["squad"]["exact"] == pytest.approx(2 / 6)  # 1 and 4
    assert m["squad"]["has_ans_exact"] == pytest.approx(1 / 4)
    assert m["squad"]["no_ans_accuracy"] == pytest.approx(1 / 2)
    assert m["quotes"]["valid"] == 1.0
    assert m["quotes"]["contains_gold"] == pytest.approx(2 / 2)  # 1 and 2 (answerable, given)
    # would-be correct: 1 yes, 2 no, 3 yes, 4 no, 5 no, 6 no
    assert m["always_answer_accuracy"] == pytest.approx(2 / 6)
    best = [True, False, True, False, False, False]
    rm = [0.9, 0.8, 0.3, 0.2, 0.7, -math.inf]
    sel = m["selective"]["rm"]
    assert sel["aurc"] == pytest.approx(M.aurc(rm, best))
    cov, acc, _ = M.risk_coverage_curve(rm, best)
    assert sel["curve"] == {"coverage": cov.tolist(), "accuracy": acc.tolist()}
    assert sel["accuracy_at_coverage"]["50%"] == pytest.approx(1 / 3)  # 0.9 ok, 0.8, 0.7 wrong
    assert sel["accuracy_at_coverage"]["100%"] == pytest.approx(2 / 6)
    assert sel["coverage_at_accuracy"]["90%"] == pytest.approx(1 / 6)
    lik = [-0.1, -0.2, -0.9, -0.3, -0.4, -math.inf]
    assert m["selective"]["likelihood"]["aurc"] == pytest.approx(M.aurc(lik, best))
    ret = [0.5, 0.1, 0.4, 0.2, 0.3, -math.inf]
    assert m["selective"]["retrieval"]["aurc"] == pytest.approx(M.aurc(ret, best))
    # ECE over the five questions whose best candidate verified
    assert m["calibration"]["questions"] == 5
    assert m["calibration"]["ece"] == pytest.approx(M.expected_calibration_error(rm[:5], best[:5]))
    assert sum(b["count"] for b in m["calibration"]["bins"]) == 5
    # retrieval: answerable questions with a context: ranks 1, 3, None, 7
    r = m["retrieval"]
    assert r["questions"] == 4
    assert (r["recall@1"], r["recall@3"], r["recall@5"], r["recall@10"]) == (0.25, 0.5, 0.5, 0.75)
    assert r["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 7) / 4)
    lat = [10, 20, 30, 40, 50, 60]
    assert m["latency_ms"]["p50"] == pytest.approx(np.percentile(lat, 50))
    assert m["latency_ms"]["p95"] == pytest.approx(np.percentile(lat, 95))


def test_summarize_all_declined_and_no_context() -> None:
    rows = [_record(str(i), ["1636"], None, [], rank=None, context=False) for i in range(3)]
    m = summarize([judge(r, DOCS.__getitem__) for r in rows], threshold=None)
    assert m["at_threshold"]["answered_accuracy"] is None
    assert m["at_threshold"]["coverage"] == 0.0
    assert m["calibration"]["ece"] is None
    assert m["retrieval"]["recall@5"] is None and m["unanswerable_declined"] is None
    with pytest.raises(ValueError):
        summarize([], threshold=None)


RUN = {
    "identity": {
        "dataset_sha256": "ab" * 32,
        "index_manifest_sha256": "cd" * 32,
        "preset": "tiny",
        "split": "eval",
        "min_score": None,
        "n_candidates": None,
    },
    "dataset": "qa.json",
    "index": "idx",
    "index_manifest": {
        "format_version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "embedding": {"model_id": "hash-bow-256", "dim": 256},
        "counts": {"documents": 3, "passages": 4},
    },
    "pipeline": {
        "generator_model_id": "extractive",
        "scorer": "generator confidence (stand-in)",
        "scorer_note": "a stand-in",
        "threshold": 0.5,
        "config": {},
    },
    "git_revision": "0123abcd",
    "started": "2025-01-02T00:00:00+00:00",
    "updated": "2025-01-02T00:05:00+00:00",
}


def test_report_contents() -> None:
    m = summarize([judge(r, DOCS.__getitem__) for r in _records()], threshold=0.5)
    text = render_markdown(m, RUN)
    for needle in (
        "generator confidence (stand-in)",
        "extractive",
        "ab" * 32,
        "0123abcd",
        "format version 1",
        "hash-bow-256",
        "2025-01-02T00:05:00",
        "split: eval",
        "AURC",
        "recall@5",
        "ECE",
        "p50",
        "Correctness rule",
        "would-be correctness",
        "quote validity",
        "always answer",
        FIGURES["accuracy_coverage"],
    ):
        assert needle in text, needle
    assert "33.3 %" in text  # accuracy (all) and answered accuracy


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_outputs_figures(tmp_path: Path) -> None:
    m = write_outputs(tmp_path, _records(), RUN, DOCS.__getitem__)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report.md").is_file()
    assert m["questions"] == 6
    for name in FIGURES.values():
        w, h = _png_size(tmp_path / name)
        assert 400 <= w <= 2000 and 300 <= h <= 2000, (name, w, h)
        assert (tmp_path / name).stat().st_size > 5000  # not a blank canvas


def test_the_accuracy_coverage_figure_reads_as_the_table(tmp_path: Path, monkeypatch) -> None:
    """Steps drawn "post" held each point's accuracy to the right: scores [1, 1, 0, 0] with the
    first two right drew 1.0 at 80 % coverage, where the table (and any threshold) gives 0.5."""
    from matplotlib.axes import Axes

    from citeqa.evals import plots

    drawn: list[tuple[list[float], list[float], str]] = []
    real = Axes.step

    def step(self, x, y, *args, where="pre", **kw):  # type: ignore[no-untyped-def]
        drawn.append((list(x), list(y), where))
        return real(self, x, y, *args, where=where, **kw)

    monkeypatch.setattr(Axes, "step", step)
    cov, acc, _ = M.risk_coverage_curve(np.array([1.0, 1.0, 0.0, 0.0]),
                                        np.array([True, True, False, False]))
    plots.accuracy_coverage({"rm": {"coverage": cov.tolist(), "accuracy": acc.tolist()}}, None,
                            tmp_path / "ac.png")
    [(x, y, where)] = drawn

    def shown_at(c: float) -> float:  # a step plot's value at c, as matplotlib draws it
        if where == "pre":
            return y[next(i for i, xi in enumerate(x) if xi >= c)]
        return y[max(i for i, xi in enumerate(x) if xi <= c)]

    for c in (0.3, 0.5, 0.8, 1.0):
        assert shown_at(c) == M.accuracy_at_coverage(
            np.array([1.0, 1.0, 0.0, 0.0]), np.array([True, True, False, False]), c), c


def test_an_interrupted_write_leaves_no_report_of_an_earlier_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from citeqa.evals import plots

    write_outputs(tmp_path, _records(), RUN, DOCS.__getitem__)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(plots, "reliability", crash)
    with pytest.raises(OSError):
        write_outputs(tmp_path, _records()[:3], RUN, DOCS.__getitem__)
    assert not (tmp_path / "report.md").exists()  # not the 6-question report beside 3's metrics
    assert '"questions": 3' in (tmp_path / "metrics.json").read_text()


def test_supported_is_unknown_for_records_without_answer_offsets() -> None:
    doc = DOCS.__getitem__
    old = judge(_record("a", ["1636"], "1636", [_cand("1636", 0.9)]), doc)  # no answer_start key
    assert old.supported is None
    inside = judge({**_record("b", ["1636"], "1636", [_cand("1636", 0.9)]),
                    "answer_start": 34, "answer_end": 38}, doc)
    assert inside.supported is True
    outside = judge({**_record("c", ["1636"], "1636", [_cand("1636", 0.9)]),
                     "answer_start": None, "answer_end": None}, doc)
    assert outside.supported is False
