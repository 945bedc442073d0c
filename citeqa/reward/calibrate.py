"""The decline threshold, chosen on calibration data with a distribution-free guarantee.

Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test: Calibrating
Predictive Algorithms to Achieve Risk Control"), with fixed-sequence testing:

1. Candidate thresholds are the distinct calibration scores, from the highest down (answer iff
   ``score >= t``; a threshold answers a tie block as a whole).
2. For each t, the null hypothesis H_t: "the answered error rate at t exceeds alpha = 1 - target".
   Given the n_t calibration questions answered at t, their errors are Binomial(n_t, R(t)), so
   the exact binomial tail p_t = P(Binomial(n_t, alpha) <= errors_t) is a valid p-value.
   (The Hoeffding–Bentkus p-value of LTT bounds this same tail from above, so the exact tail is
   never worse and is what we use.)
3. Walk down the sequence while p_t <= delta and keep the last rejected t. Fixed-sequence
   testing controls the family-wise error rate at delta without any multiplicity correction.

Thresholds answering fewer than m0 questions, where (1 - alpha)^m0 <= delta, cannot be rejected
whatever their errors (p_t >= (1 - alpha)^n_t); the walk starts at the first threshold that
answers at least max(m0, min_answered) questions instead of stopping there at once.

Power: the walk never resumes after a failure, so one early error among the top-scored few
stops it near zero coverage. Choosing ``min_answered`` before seeing the data (about 5% of the
calibration set) avoids most such stops; in the uniform-score Monte Carlo of
tests/test_calibrate.py it raised the share of non-empty thresholds from 0.87 to 0.98.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

METHOD = "learn-then-test (fixed sequence, exact binomial tail)"
_MAX_CELLS = 1 << 22  # bound on the [rows, k+1] log-pmf block computed at once


@dataclass(frozen=True)
class Calibration:
    """A calibrated decline threshold and what it achieved on the calibration set."""

    threshold: float  # answer iff score >= threshold; inf when no threshold qualifies
    target_accuracy: float  # the answered accuracy the threshold guarantees (1 - alpha)
    delta: float  # P(true answered accuracy < target) <= delta over calibration draws
    coverage: float  # fraction of calibration questions answered at the threshold
    accuracy: float  # answered accuracy on the calibration set; NaN when none answered
    n: int  # calibration questions
    n_answered: int  # calibration questions answered at the threshold
    method: str = METHOD

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: an infinite threshold and a NaN accuracy become None."""
        out = asdict(self)
        out["threshold"] = None if math.isinf(self.threshold) else self.threshold
        out["accuracy"] = None if math.isnan(self.accuracy) else self.accuracy
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_json`; other keys of ``data`` are ignored (calibration.json holds
        more). KeyError or TypeError when a field is missing or not a number."""
        values = {f.name: data[f.name] for f in dataclass_fields(cls) if f.name != "method"}
        threshold, accuracy = values["threshold"], values["accuracy"]
        values["threshold"] = math.inf if threshold is None else float(threshold)
        values["accuracy"] = math.nan if accuracy is None else float(accuracy)
        for name in ("target_accuracy", "delta", "coverage"):
            values[name] = float(values[name])
        values["n"], values["n_answered"] = int(values["n"]), int(values["n_answered"])
        return cls(**values, method=data.get("method", METHOD))


def scores_and_correct(scores: ArrayLike, correct: ArrayLike, what: str = "questions"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` as floats and ``correct`` as booleans, flat; ValueError where they differ in
    length, are empty (no ``what``), or a score is NaN. Shared with the eval's metrics: the
    threshold certified here and the curves reported there read scores alike."""
    s = np.asarray(scores, dtype=float).reshape(-1)
    c = np.asarray(correct, dtype=bool).reshape(-1)
    if s.shape != c.shape:
        raise ValueError(f"scores and correct differ in length: {s.size} vs {c.size}")
    if s.size == 0:
        raise ValueError(f"no {what}: scores and correct are empty")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN; give every one of the {what} a finite or "
                         "infinite score")
    return s, c


def tie_block_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """The last index of each block of tied scores in ``sorted_scores`` (decreasing): where
    the next score differs, or the end. "Answer iff score >= t" answers a block as a whole."""
    return np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))


def binomial_cdf(k: ArrayLike, n: ArrayLike, p: float) -> np.ndarray:
    """P(Binomial(n, p) <= k), elementwise over broadcast ``k`` and ``n``, exact to rounding.

    Sums the probability mass in log space (log-sum-exp over ``lgamma`` log-binomials), so it
    stays accurate for tails far below the smallest float's square root.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if (n_arr < 0).any():
        raise ValueError("n must be non-negative")
    flat_k, flat_n = k_arr.reshape(-1), n_arr.reshape(-1)
    out = np.where(flat_k >= flat_n, 1.0, 0.0)  # k >= n: all mass; k < 0: none
    inner = np.flatnonzero((flat_k >= 0) & (flat_k < flat_n))
    if inner.size and p in (0.0, 1.0):
        out[inner] = 1.0 if p == 0.0 else 0.0  # all mass at 0 (p=0) or at n > k (p=1)
    elif inner.size:
        n_max = int(flat_n[inner].max())
        log_fact = np.array([math.lgamma(m + 1.0) for m in range(n_max + 1)])
        log_p, log_q = math.log(p), math.log1p(-p)
        rows = max(1, _MAX_CELLS // (int(flat_k[inner].max()) + 1))
        for lo in range(0, inner.size, rows):
            idx = inner[lo : lo + rows]
            kk, nn = flat_k[idx], flat_n[idx]  # [R]
            j = np.arange(int(kk.max()) + 1)  # [J]
            valid = j[None, :] <= kk[:, None]  # [R, J]; kk < nn, so j <= n too
            n_minus_j = np.where(valid, nn[:, None] - j[None, :], 0)
            log_pmf = (
                log_fact[nn][:, None]
                - log_fact[j][None, :]
                - log_fact[n_minus_j]
                + j[None, :] * log_p
                + n_minus_j * log_q
            )
            log_pmf = np.where(valid, log_pmf, -np.inf)
            peak = log_pmf.max(axis=1, keepdims=True)  # finite: j = 0 is always valid
            lse = peak[:, 0] + np.log(np.exp(log_pmf - peak).sum(axis=1))
            out[idx] = np.minimum(np.exp(lse), 1.0)
    return out.reshape(k_arr.shape)


def min_testable_answered(alpha: float, delta: float) -> int:
    """The fewest answered questions m0 with (1 - alpha)^m0 <= delta (a zero-error p-value).

    With fewer answered, even zero errors cannot reject "error rate > alpha" at level delta.
    """
    m = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while m > 1 and (1 - alpha) ** (m - 1) <= delta:  # guard against rounding in the log ratio
        m -= 1
    while (1 - alpha) ** m > delta:
        m += 1
    return m


def calibrate_threshold(
    scores: ArrayLike,
    correct: ArrayLike,
    *,
    target_accuracy: float,
    delta: float = 0.1,
    min_answered: int = 1,
) -> Calibration:
    """The lowest score threshold whose answered accuracy is at least ``target_accuracy``
    with probability at least 1 - ``delta``.

    Guarantee (LTT, Theorem 1 with fixed-sequence testing): if the calibration questions and the
    future questions are i.i.d. (exchangeable) draws from one distribution, then over the draw
    of the calibration set, P(P(correct | score >= threshold) < target_accuracy) <= delta. The
    statement is about the population answered accuracy at the returned threshold, not the
    accuracy on any finite test set, which fluctuates around it. Each p-value conditions on the
    number answered, and the candidate thresholds are the calibration scores themselves (the
    usual practice for selective classification; the Monte-Carlo tests check the guarantee).
    When no threshold passes, the threshold is ``inf`` (decline everything), which trivially
    keeps the guarantee.

    Args:
        scores: per calibration question, the reward score of the answer it would give
            (higher = more confident).
        correct: per calibration question, whether that answer is correct
            (by the evaluation's correctness rule).
        target_accuracy: the answered accuracy to guarantee, in (0, 1).
        delta: the allowed probability that the guarantee fails, in (0, 1).
        min_answered: start testing only at thresholds answering at least this many questions
            (fix it in advance, e.g. 5% of the calibration set; see the module docstring).
    """
    if not 0.0 < target_accuracy < 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1), got {target_accuracy}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if min_answered < 1:
        raise ValueError(f"min_answered must be at least 1, got {min_answered}")
    s, c = scores_and_correct(scores, correct, "calibration questions")
    if np.isposinf(s).any():  # "answer iff score >= inf" would be stored as "certifies nothing"
        raise ValueError("scores contain +inf; scores are finite (or -inf: never answered)")

    alpha = 1.0 - target_accuracy
    order = np.argsort(-s, kind="stable")
    s_sorted, errors = s[order], np.cumsum(~c[order])
    block_end = tie_block_ends(s_sorted)  # [T]
    # -inf (a question with no verified quote, declined whatever the threshold) is no
    # threshold to test: "answer iff score >= -inf" would read as "certifies nothing" (inf)
    # once stored, as both are infinite
    block_end = block_end[s_sorted[block_end] > -np.inf]
    n_answered = block_end + 1  # [T] answered at each candidate threshold, increasing
    n_errors = errors[block_end]  # [T]

    first = int(np.searchsorted(n_answered, max(min_answered, min_testable_answered(alpha, delta))))
    p_values = binomial_cdf(n_errors[first:], n_answered[first:], alpha)
    failed = np.flatnonzero(p_values > delta)
    n_rejected = int(failed[0]) if failed.size else p_values.size  # fixed sequence: stop at fail
    if n_rejected == 0:
        return Calibration(
            threshold=math.inf,
            target_accuracy=target_accuracy,
            delta=delta,
            coverage=0.0,
            accuracy=math.nan,
            n=int(s.size),
            n_answered=0,
        )
    last = first + n_rejected - 1
    answered = int(n_answered[last])
    return Calibration(
        threshold=float(s_sorted[block_end[last]]),
        target_accuracy=target_accuracy,
        delta=delta,
        coverage=answered / s.size,
        accuracy=1.0 - int(n_errors[last]) / answered,
        n=int(s.size),
        n_answered=answered,
    )


def choose_target(
    scores: ArrayLike,
    correct: ArrayLike,
    *,
    targets: list[float],
    min_coverage: float,
    delta: float = 0.1,
    min_answered: int = 1,
) -> Calibration:
    """The highest of ``targets`` whose threshold answers at least ``min_coverage`` of the
    calibration questions, each target tested at ``delta / k`` (k: the distinct targets).

    The target is picked after seeing the calibration data, so each test alone at ``delta``
    would not do: the chosen target's guarantee could fail whenever any target's does. Testing
    each at ``delta / k`` keeps that union, and so the chosen target's guarantee, at ``delta``
    (Bonferroni). The result records the per-target level as its ``delta``. When no target
    answers ``min_coverage``, the lowest target's calibration is returned as it is.
    """
    if not targets:
        raise ValueError("targets is empty: give at least one answered accuracy to test")
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}")
    level = delta / len(set(targets))  # the targets tested (a repeated one is one test)
    results = [
        calibrate_threshold(
            scores, correct, target_accuracy=t, delta=level, min_answered=min_answered
        )
        for t in sorted(set(targets))
    ]
    enough = [c for c in results if c.n_answered > 0 and c.coverage >= min_coverage]
    return enough[-1] if enough else results[0]
