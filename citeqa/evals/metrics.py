"""Evaluation metrics as pure functions: SQuAD answer scoring, selective prediction, calibration,
retrieval recall and latency percentiles.

Answer scoring follows the official SQuAD v2.0 evaluation script (``evaluate-v2.0.py``) exactly
for text without CJK characters or CJK punctuation (which SQuAD's data holds in none of its gold
answers here; for those, MLQA's mixed segmentation: ``citeqa.text.answer_tokens``): the
same normalization (``citeqa.text.normalize_answer``), exact match, token F1 with ``Counter``
overlap, the maximum over gold answers, and its no-answer convention (golds that normalize to
nothing are dropped; a question left with no gold answer is scored against ``""``, so only an empty
prediction scores 1).

Selective-prediction metrics take per-question ``scores`` (higher = more confident) and
``correct`` (whether the answer would be right if it were given). The system answers the
top-scored questions first; questions with equal scores are answered or declined together as one
block (a threshold cannot split a tie), so every curve has one point per distinct score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from citeqa.reward.calibrate import scores_and_correct, tie_block_ends
from citeqa.text import answer_f1, normalize_answer

# --- SQuAD answer scoring ----------------------------------------------------------------


def _exact_one(pred: str, gold: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def _scorable_golds(golds: Sequence[str]) -> list[str]:
    # The official script drops golds that normalize to "" and falls back to [""].
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def exact_match(pred: str | None, golds: Sequence[str]) -> float:
    """1.0 if ``pred`` equals some gold after normalization, else 0.0 (None means declined)."""
    pred = pred or ""
    return max(_exact_one(pred, g) for g in _scorable_golds(golds))


def f1(pred: str | None, golds: Sequence[str]) -> float:
    """The best token F1 of ``pred`` against the golds (None means declined)."""
    pred = pred or ""
    return max(answer_f1(pred, g) for g in _scorable_golds(golds))


# A prediction's decline ``reason`` when citeqa refused to ask its question (empty, too long),
# or its generator failed on it (an engine error).
REFUSED = "refused: "


def threshold_json(threshold: float | None) -> float | str | None:
    """A decline threshold as run files record it: a number, None (no threshold: every
    question answered) or "inf" (one that no score reaches: every question declined, as
    under CITEQA_DECLINE_UNCERTIFIED), since JSON has no infinity."""
    if threshold is None or math.isfinite(threshold):
        return threshold
    return "inf" if threshold > 0 else None


def is_correct(
    answer: str | None,
    golds: Sequence[str],
    *,
    quote_valid: bool,
    f1_threshold: float = 0.5,
) -> bool:
    """The project's correctness rule for one question.

    Answerable (some gold normalizes to a non-empty string): correct iff an answer was given,
    its F1 against the golds is at least ``f1_threshold`` and its quote is verbatim.
    Unanswerable (no such gold): only a decline (``answer is None``) is correct.
    """
    answerable = any(normalize_answer(g) for g in golds)
    if not answerable:
        return answer is None
    if answer is None or not quote_valid:
        return False
    return f1(answer, golds) >= f1_threshold


# --- selective prediction -----------------------------------------------------------------


def risk_coverage_curve(
    scores: ArrayLike, correct: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage and answered accuracy for every threshold "answer iff score >= t".

    Returns ``(coverage, accuracy, thresholds)``, one entry per distinct score, thresholds in
    decreasing order (so coverage strictly increases and ends at 1.0). Tied scores form one
    block: they are answered together, so the curve has no point inside a tie.
    """
    s, c = scores_and_correct(scores, correct)
    order = np.argsort(-s, kind="stable")
    s_sorted, c_sorted = s[order], c[order]
    cum_correct = np.cumsum(c_sorted)
    block_end = tie_block_ends(s_sorted)
    answered = block_end + 1
    coverage = answered / s.size
    accuracy = cum_correct[block_end] / answered
    return coverage, accuracy, s_sorted[block_end]


def aurc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk–coverage curve (risk = 1 - answered accuracy); lower is better:
    the mean of the selective risk over the n coverages 1/n, 2/n, ..., 1 (Geifman et al. 2019).

    Answers scored alike have no order of their own, so a tie block counts at its expected
    risk over every order of its members (after j of a block of m holding r right answers,
    the expected right count is those before the block plus j * r / m). A ranking is then not
    charged for the order of answers it could not tell apart when they are all alike (a block
    of wrong answers, e.g. every -inf: no verified quote), and a perfect ranking with such
    ties has the oracle's AURC (``oracle_scores``), so an excess over it is the ranking's own.
    """
    s, c = scores_and_correct(scores, correct)
    order = np.argsort(-s, kind="stable")
    s_sorted, c_sorted = s[order], c[order].astype(float)
    starts = np.flatnonzero(np.append(True, s_sorted[1:] != s_sorted[:-1]))  # each tie block's
    sizes = np.diff(np.append(starts, s.size))
    right = np.add.reduceat(c_sorted, starts)  # right answers in each block
    block = np.repeat(np.arange(starts.size), sizes)  # [n]: the block of each position
    place = np.arange(s.size) - starts[block] + 1  # 1..m within its block
    expected_right = (np.cumsum(right) - right)[block] + place * right[block] / sizes[block]
    return float(np.mean(1.0 - expected_right / np.arange(1, s.size + 1)))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` of a metric on the same questions, with a bootstrap interval."""

    diff: float  # on the full sample
    low: float  # 2.5th percentile of the resampled differences
    high: float  # 97.5th percentile
    share_a_lower: float  # share of resamples in which a's value is below b's


def paired_bootstrap_aurc(
    scores_a: ArrayLike, scores_b: ArrayLike, correct: ArrayLike, *, n: int = 2000, seed: int = 0
) -> PairedDifference:
    """AURC(a) - AURC(b) of two decline signals on the same questions (negative: a is better),
    with a 95 % percentile interval from ``n`` resamples of the questions (paired: both signals
    see the same resample)."""
    a, ok = scores_and_correct(scores_a, correct)
    b, _ = scores_and_correct(scores_b, correct)
    if a.shape != b.shape:
        raise ValueError(f"scores_a {a.shape} and scores_b {b.shape} differ")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, a.size, a.size)
        diffs[i] = aurc(a[idx], ok[idx]) - aurc(b[idx], ok[idx])
    return PairedDifference(
        diff=aurc(a, ok) - aurc(b, ok),
        low=float(np.percentile(diffs, 2.5)),
        high=float(np.percentile(diffs, 97.5)),
        share_a_lower=float(np.mean(diffs < 0)),
    )


def oracle_scores(correct: ArrayLike) -> list[float]:
    """Scores of a perfect ranking: every correct answer above every wrong one, and no two
    alike (a tie would be answered or declined as a block, which no real ranking forces)."""
    ok = np.asarray(correct, dtype=bool)
    return (ok * ok.size + np.arange(ok.size)).astype(float).tolist()


def auroc(scores: ArrayLike, correct: ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` separating correct from incorrect answers: the
    probability that a random correct one outscores a random incorrect one (ties count half;
    Mann-Whitney). None when either class is empty."""
    s, ok = scores_and_correct(scores, correct)
    pos, neg = s[ok], s[~ok]
    if not pos.size or not neg.size:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(order.size)
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < values.size:  # average ranks over ties
        j = i
        while j + 1 < values.size and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2)
                 / (pos.size * neg.size))


def accuracy_at_coverage(scores: ArrayLike, correct: ArrayLike, coverage: float) -> float:
    """Answered accuracy at the smallest curve point whose coverage is at least ``coverage``.

    Ties are not split, so the answered fraction can exceed ``coverage`` by one tie block.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    cov, acc, _ = risk_coverage_curve(scores, correct)
    idx = int(np.searchsorted(cov, coverage - 1e-12, side="left"))
    return float(acc[min(idx, acc.size - 1)])


def coverage_at_accuracy(scores: ArrayLike, correct: ArrayLike, target: float) -> float:
    """The largest coverage whose answered accuracy is at least ``target`` (0.0 if none)."""
    cov, acc, _ = risk_coverage_curve(scores, correct)
    ok = acc >= target
    return float(cov[ok].max()) if ok.any() else 0.0


def answered_accuracy_and_coverage(
    scores: ArrayLike, correct: ArrayLike, threshold: float
) -> tuple[float, float]:
    """``(accuracy, coverage)`` when answering iff ``score >= threshold``.

    Accuracy is NaN when nothing is answered (coverage 0.0).
    """
    s, c = scores_and_correct(scores, correct)
    answered = s >= threshold
    n_answered = int(answered.sum())
    accuracy = float(c[answered].mean()) if n_answered else float("nan")
    return accuracy, n_answered / s.size


# --- calibration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin of a reliability diagram."""

    lo: float  # lower edge, inclusive
    hi: float  # upper edge, exclusive (inclusive for the last bin, so 1.0 is counted)
    mean_confidence: float  # mean predicted probability in the bin; NaN when empty
    accuracy: float  # fraction correct in the bin; NaN when empty
    count: int


def _bin_index(probs: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.arange(n_bins + 1) / n_bins  # the bins' lo/hi exactly (linspace's 0.3 is above)
    return np.searchsorted(edges[1:-1], probs, side="right")  # [N] in 0..n_bins-1


def _as_probs_correct(
    probs: ArrayLike, correct: ArrayLike, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    p, c = scores_and_correct(probs, correct)
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probs must lie in [0, 1]; pass probabilities, not raw scores or logits")
    return p, c


def reliability_bins(
    probs: ArrayLike, correct: ArrayLike, n_bins: int = 10
) -> list[ReliabilityBin]:
    """Per-bin mean confidence, accuracy and count over ``n_bins`` equal-width bins of [0, 1]."""
    p, c = _as_probs_correct(probs, correct, n_bins)
    idx = _bin_index(p, n_bins)
    out = []
    for b in range(n_bins):
        in_bin = idx == b
        count = int(in_bin.sum())
        out.append(
            ReliabilityBin(
                lo=b / n_bins,
                hi=(b + 1) / n_bins,
                mean_confidence=float(p[in_bin].mean()) if count else float("nan"),
                accuracy=float(c[in_bin].mean()) if count else float("nan"),
                count=count,
            )
        )
    return out


def expected_calibration_error(probs: ArrayLike, correct: ArrayLike, n_bins: int = 10) -> float:
    """ECE: the bin-size-weighted mean of |accuracy - mean confidence| over equal-width bins."""
    bins = reliability_bins(probs, correct, n_bins)
    total = sum(b.count for b in bins)
    return float(
        sum(b.count / total * abs(b.accuracy - b.mean_confidence) for b in bins if b.count)
    )


# --- retrieval and latency -----------------------------------------------------------------


def recall_at_k(
    ranked_ids_per_query: Sequence[Sequence[object]],
    gold_ids_per_query: Sequence[Sequence[object]],
    k: int,
) -> float:
    """Mean over queries of the fraction of gold ids found in the top ``k`` ranked ids.

    Queries with no gold id are skipped. With one gold id per query (SQuAD: the question's
    paragraph) this is the hit rate: the fraction of queries whose gold is in the top k.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(ranked_ids_per_query) != len(gold_ids_per_query):
        raise ValueError(
            f"{len(ranked_ids_per_query)} rankings but {len(gold_ids_per_query)} gold lists"
        )
    recalls = []
    for ranked, golds in zip(ranked_ids_per_query, gold_ids_per_query, strict=True):
        gold_set = set(golds)
        if gold_set:
            recalls.append(len(gold_set.intersection(ranked[:k])) / len(gold_set))
    if not recalls:
        raise ValueError("no query has a gold id; recall is undefined")
    return float(np.mean(recalls))


def percentile(values: ArrayLike, q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation), e.g. ``q=95`` for p95 latency."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        raise ValueError("no values to take a percentile of")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return float(np.percentile(v, q))
