"""Tests that kill mutants of the evaluation metrics, the report's aggregation and the
threshold calibration which the other tests let survive (a mutation-testing review).

Each test pins one hand-worked number that a plausible slip would silently change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from citeqa.evals import metrics as M
from citeqa.evals.report import judge, summarize
from citeqa.reward.calibrate import binomial_cdf, calibrate_threshold
from citeqa.types import Document

DOC = Document("d", "Harvard", "h.txt", "Harvard University was founded in 1636 in Cambridge.")
DOCS = {"d": DOC}
QUOTE = {"text": DOC.text, "doc_id": "d", "title": "Harvard", "source": "h.txt",
         "start": 0, "end": len(DOC.text)}


def _cand(answer: str, score: float, quote: dict | None = QUOTE) -> dict:
    return {"answer": answer, "quote": quote, "score": score, "uncertainty": None,
            "logprob": -2.0, "mean_logprob": -0.5, "retrieval_score": 0.1}


def _record(qid: str, golds: list[str], answer: str | None, cands: list[dict], *,
            rank: int | None = None, context: bool = False, reason: str | None = None) -> dict:
    best = cands[0] if cands else None
    rec = {
        "id": qid, "gold_answers": golds, "question": "q?", "declined": answer is None,
        "answer": answer, "quote": best["quote"] if answer is not None and best else None,
        "score": best["score"] if best else None, "candidates": cands,
        "timings_ms": {"total_ms": 10.0}, "gold_rank": rank, "has_context": context,
    }
    if reason is not None:
        rec["reason"] = reason
    return rec


def _summary(records: list[dict]) -> dict:
    return summarize([judge(r, DOCS.__getitem__) for r in records], threshold=0.5)


# --- metrics.py ------------------------------------------------------------------------------


def test_recall_at_k_counts_a_repeated_gold_id_once() -> None:
    # golds {a, c} (a listed twice): a is in the top 2, c is not -> 1/2, not 1/3
    assert M.recall_at_k([["a", "b"]], [["a", "a", "c"]], 2) == pytest.approx(0.5)


def test_paired_bootstrap_resamples_every_question() -> None:
    # two questions: a ranks the right one first (AURC 0.25), b the wrong one (AURC 0.75).
    # A resample holding both questions gives -0.5, one holding only one of them 0 (both
    # signals alike): half of the resamples (probability 2/4) hold both.
    d = M.paired_bootstrap_aurc([1.0, 0.0], [0.0, 1.0], [True, False], n=2000)
    assert d.diff == pytest.approx(-0.5)
    assert d.share_a_lower == pytest.approx(0.5, abs=0.05)
    assert d.low == pytest.approx(-0.5) and d.high == pytest.approx(0.0)


def test_paired_bootstrap_interval_is_the_2_5th_to_97_5th_percentile() -> None:
    rng = np.random.default_rng(3)
    n = 30
    correct = rng.random(n) < 0.5
    a = correct + 1.2 * rng.random(n)
    b = rng.random(n)
    # an independent bootstrap of the same statistic (another seed, more resamples)
    ref_rng = np.random.default_rng(12345)
    ref = []
    for _ in range(10_000):
        idx = ref_rng.integers(0, n, n)
        ref.append(M.aurc(a[idx], correct[idx]) - M.aurc(b[idx], correct[idx]))
    p2_5, p5, p95, p97_5 = np.percentile(ref, [2.5, 5, 95, 97.5])
    d = M.paired_bootstrap_aurc(a, b, correct)
    # within half the gap to the next-wider or next-narrower percentile (Monte Carlo noise is
    # about a fifth of it): a 90 % interval, or 99 %, lands outside
    assert abs(d.low - p2_5) < 0.5 * (p5 - p2_5)
    assert abs(d.high - p97_5) < 0.5 * (p97_5 - p95)


# --- calibrate.py ----------------------------------------------------------------------------


def test_binomial_cdf_is_a_probability_even_where_rounding_sums_past_one() -> None:
    # P(Bin(6, 0.001) <= 5) = 1 - 1e-18: the summed masses round to 1 + 2**-52 unclamped
    assert binomial_cdf(5, 6, 0.001) <= 1.0
    assert float(binomial_cdf(5, 6, 0.001)) == pytest.approx(1.0)
    ks = np.arange(300)
    assert (binomial_cdf(ks, 300, 0.01) <= 1.0).all()


def test_calibration_coverage_counts_questions_with_no_verified_quote() -> None:
    # target 0.5, delta 0.1: m0 = 4 (0.5**4 <= 0.1). Four right answers and one -inf
    # (never answerable): threshold 1.0 answers 4 of the 5 questions -> coverage 0.8
    cal = calibrate_threshold([4.0, 3.0, 2.0, 1.0, -math.inf], [True] * 4 + [False],
                              target_accuracy=0.5, delta=0.1)
    assert cal.threshold == 1.0 and cal.n_answered == 4 and cal.n == 5
    assert cal.coverage == pytest.approx(0.8)
    assert cal.accuracy == 1.0


# --- report.py -------------------------------------------------------------------------------


def test_a_refused_unanswerable_question_counts_as_declined() -> None:
    m = _summary([
        _record("1", [], None, [], reason="refused: the question is empty"),
        _record("2", [], "1636", [_cand("1636", 0.9)]),
    ])
    assert m["refused"] == 1
    assert m["unanswerable_declined"] == pytest.approx(1 / 2)


def test_no_answer_accuracy_is_squad_noans_exact_an_answer_that_normalizes_away_counts() -> None:
    # SQuAD 2.0's NoAns exact: "The" normalizes to "", which is right on an unanswerable question
    m = _summary([
        _record("1", [], "The", [_cand("The", 0.9)]),
        _record("2", [], "1636", [_cand("1636", 0.9)]),
    ])
    assert m["squad"]["no_ans_accuracy"] == pytest.approx(1 / 2)
    assert m["unanswerable_declined"] == 0.0


def test_has_answer_f1_is_over_answerable_questions_only() -> None:
    # answerable: F1("1636 Cambridge", "1636") = 2/3; the unanswerable one (declined, F1 1)
    # counts in the overall F1 only
    m = _summary([
        _record("1", ["1636"], "1636 Cambridge", [_cand("1636 Cambridge", 0.9)]),
        _record("2", [], None, [_cand("1636", 0.1)]),
    ])
    assert m["squad"]["has_ans_f1"] == pytest.approx(2 / 3)
    assert m["squad"]["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["squad"]["has_ans_exact"] == 0.0


def test_retrieval_recall_is_over_answerable_questions_with_a_known_paragraph() -> None:
    m = _summary([
        _record("1", ["1636"], "1636", [_cand("1636", 0.9)], rank=1, context=True),
        _record("2", [], None, [_cand("1636", 0.1)], rank=None, context=True),
    ])
    assert m["retrieval"]["questions"] == 1
    assert m["retrieval"]["recall@1"] == 1.0 and m["retrieval"]["mrr"] == 1.0


def test_a_score_of_exactly_zero_is_a_probability_for_ece() -> None:
    j = judge(_record("1", ["1636"], None, [_cand("Cambridge", 0.0)]), DOCS.__getitem__)
    assert j.probability == 0.0
    m = _summary([_record("1", ["1636"], None, [_cand("Cambridge", 0.0)]),
                  _record("2", ["1636"], None, [_cand("1636", 1.0)])])
    assert m["calibration"]["questions"] == 2
    assert m["calibration"]["ece"] == pytest.approx(0.0)  # 0.0 wrong, 1.0 right


def test_any_candidate_right_needs_a_verified_quote() -> None:
    # the second candidate's words are right but it has no quote: it could never be given
    rec = _record("1", ["1636"], None, [_cand("Cambridge", 0.5), _cand("1636", 0.4, quote=None)])
    j = judge(rec, DOCS.__getitem__)
    assert not j.any_correct and not j.best_correct
    assert _summary([rec])["candidates"]["any_right"] == 0.0


def test_accuracy_counts_a_refused_answerable_question_as_wrong() -> None:
    m = _summary([
        _record("1", ["1636"], None, [], reason="refused: the question is too long"),
        _record("2", ["1636"], "1636", [_cand("1636", 0.9)]),
    ])
    assert m["accuracy"] == pytest.approx(1 / 2)
    assert m["at_threshold"]["coverage"] == pytest.approx(1 / 2)


def test_best_candidate_right_is_over_answerable_questions_only() -> None:
    # the unanswerable question's best candidate is never right (only a decline is): it must
    # not pull the answerable questions' share down
    m = _summary([
        _record("1", ["1636"], "1636", [_cand("1636", 0.9)]),
        _record("2", [], None, [_cand("1636", 0.1)]),
    ])
    assert m["candidates"]["best_right"] == 1.0 and m["candidates"]["any_right"] == 1.0
    assert m["always_answer_accuracy"] == pytest.approx(1 / 2)


def test_the_oracle_ranks_the_best_candidates_would_be_correctness() -> None:
    # question 1 was declined at the threshold but its best candidate is right; question 2's
    # is wrong. The oracle answers 1 first: risks 0 then 1/2 -> AURC 0.25 (ranking by the
    # correctness at the threshold, no question right, would answer 2 first: 0.75)
    m = _summary([
        _record("1", ["1636"], None, [_cand("1636", 0.2)]),
        _record("2", ["1636"], None, [_cand("Cambridge", 0.9)]),
    ])
    assert m["oracle"]["aurc"] == pytest.approx(0.25)
    assert m["selective"]["rm"]["aurc"] == pytest.approx(0.75)
    assert m["oracle"]["coverage_at_accuracy"]["90%"] == pytest.approx(0.5)


# --- text.py (SQuAD normalisation) -----------------------------------------------------------


def test_an_article_between_non_ascii_punctuation_leaves_a_space_as_the_official_script() -> None:
    # the official remove_articles substitutes " ": "1914–the–1918" (en dashes are kept) is
    # the two tokens "1914–" and "–1918", so F1 against "1914–" is 2/3, not 0
    from citeqa.text import normalize_answer

    assert normalize_answer("1914–the–1918") == "1914– –1918"
    assert M.f1("1914–the–1918", ["1914–"]) == pytest.approx(2 / 3)
