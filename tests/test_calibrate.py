"""Tests for citeqa.reward.calibrate: the binomial tail against brute force, the LTT walk
against a plain reference loop, edge cases, and the coverage guarantee by Monte Carlo."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import citeqa.reward.calibrate as calibrate_mod
from citeqa.reward.calibrate import (
    Calibration,
    binomial_cdf,
    calibrate_threshold,
    choose_target,
    min_testable_answered,
)

# --- binomial tail -------------------------------------------------------------------------


def brute_binomial_cdf(k: int, n: int, p: Fraction) -> Fraction:
    terms = (math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(0, min(k, n) + 1))
    return sum(terms, Fraction(0))


@pytest.mark.parametrize(
    "p", [Fraction(0), Fraction(1, 10), Fraction(1, 2), Fraction(9, 10), Fraction(1)]
)
def test_binomial_cdf_matches_brute_force(p: Fraction) -> None:
    for n in range(0, 15):
        for k in range(-1, 17):
            expected = float(brute_binomial_cdf(k, n, p)) if k >= 0 else 0.0
            assert float(binomial_cdf(k, n, float(p))) == pytest.approx(expected, abs=1e-13)


def test_binomial_cdf_far_tails_are_accurate() -> None:
    # Exact integer arithmetic for p = 1/2: P(X <= k) = sum_j C(n, j) / 2^n.
    n = 2000
    for k in (0, 5, 700, 999, 1000, 1300):
        exact = Fraction(sum(math.comb(n, j) for j in range(k + 1)), 2**n)
        got = float(binomial_cdf(k, n, 0.5))
        if exact < Fraction(1, 10**300):
            assert got < 1e-290  # below float range: underflows towards 0, never above
        else:
            assert got == pytest.approx(float(exact), rel=1e-9)
    # A p-value of the size calibration sees: 400 answered, 20 errors, alpha = 0.1.
    exact = brute_binomial_cdf(20, 400, Fraction(1, 10))
    assert float(binomial_cdf(20, 400, 0.1)) == pytest.approx(float(exact), rel=1e-9)


def test_binomial_cdf_matches_scipy_over_calibration_sizes() -> None:
    """Against a library CDF (scipy's), on the n, k and alpha that Learn-then-Test meets."""
    stats = pytest.importorskip("scipy.stats", reason="scipy is a test dependency")
    rng = np.random.default_rng(1)
    n = rng.integers(1, 3000, size=400)
    k = (n * rng.uniform(0, 0.6, size=400)).astype(int)
    for alpha in (0.05, 0.2, 0.5, 0.75):
        expected = stats.binom.cdf(k, n, alpha)
        got = binomial_cdf(k, n, alpha)
        tiny = expected < 1e-250  # scipy and we both underflow differently below that
        np.testing.assert_allclose(got[~tiny], expected[~tiny], rtol=1e-8, atol=1e-300)
        assert (got[tiny] < 1e-240).all()


def test_binomial_cdf_vectorized_and_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    n = rng.integers(0, 60, size=200)
    k = rng.integers(-2, 62, size=200)
    one_by_one = np.array([binomial_cdf(ki, ni, 0.3) for ki, ni in zip(k, n, strict=True)])
    monkeypatch.setattr(calibrate_mod, "_MAX_CELLS", 50)  # force many small chunks
    np.testing.assert_allclose(binomial_cdf(k, n, 0.3), one_by_one, rtol=1e-12, atol=0)
    assert binomial_cdf(k.reshape(20, 10), n.reshape(20, 10), 0.3).shape == (20, 10)


def test_min_testable_answered() -> None:
    # (0.9)^21 = 0.109 > 0.1, (0.9)^22 = 0.098 <= 0.1.
    assert min_testable_answered(0.1, 0.1) == 22
    assert min_testable_answered(0.5, 0.5) == 1
    for alpha, delta in [(0.05, 0.1), (0.3, 0.01), (0.2, 0.05)]:
        m = min_testable_answered(alpha, delta)
        assert (1 - alpha) ** m <= delta < (1 - alpha) ** (m - 1)


# --- the LTT walk ------------------------------------------------------------------------


def reference_ltt(scores, correct, target, delta, min_answered=1):
    """A plain loop: fixed-sequence testing over distinct scores, highest first."""
    alpha = Fraction(1) - Fraction(target)
    start = max(min_answered, min_testable_answered(1 - target, delta))
    best = math.inf
    for t in sorted(set(scores), reverse=True):
        answered = [c for s, c in zip(scores, correct, strict=True) if s >= t]
        if len(answered) < start:
            continue
        errors = answered.count(False)
        if brute_binomial_cdf(errors, len(answered), alpha) > Fraction(delta):
            break
        best = t
    return best


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=60),
    target=st.sampled_from([0.5, 0.6, 0.75]),
    delta=st.sampled_from([0.1, 0.2]),
    min_answered=st.integers(1, 10),
)
def test_walk_matches_reference(pairs, target, delta, min_answered) -> None:
    # Correct answers skew to high scores so that some thresholds pass.
    scores = [float(s) for s, _ in pairs]
    correct = [c or s >= 4 for s, c in pairs]
    cal = calibrate_threshold(
        scores, correct, target_accuracy=target, delta=delta, min_answered=min_answered
    )
    assert cal.threshold == reference_ltt(scores, correct, target, delta, min_answered)
    answered = [c for s, c in zip(scores, correct, strict=True) if s >= cal.threshold]
    assert cal.n_answered == len(answered) and cal.n == len(scores)
    assert cal.coverage == pytest.approx(len(answered) / len(scores))
    if answered:
        assert cal.accuracy == pytest.approx(sum(answered) / len(answered))
        # p <= delta < 1/2 puts the errors below the binomial median, so below n * alpha.
        assert cal.accuracy > target


def test_no_verified_quote_is_no_threshold_to_certify() -> None:
    """Questions without a verified quote score -inf (declined whatever the threshold). A walk
    that certified their block returned the threshold -inf, which calibration.json stored as
    null, read back as inf: "certifies nothing", for a target every finite threshold met."""
    scores = [0.9] * 30 + [0.5] * 30 + [-math.inf] * 5
    correct = [True] * 45 + [False] * 20
    cal = calibrate_threshold(scores, correct, target_accuracy=0.3, delta=0.1)
    assert cal.threshold == 0.5 and cal.n_answered == 60 and cal.n == 65
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))).threshold == 0.5


def test_all_correct_answers_everything() -> None:
    scores = np.linspace(0, 1, 100)
    cal = calibrate_threshold(scores, np.ones(100, bool), target_accuracy=0.9, delta=0.1)
    assert cal.threshold == 0.0 and cal.coverage == 1.0 and cal.accuracy == 1.0
    assert cal.n_answered == 100 and cal.method.startswith("learn-then-test")


def test_none_correct_declines_everything() -> None:
    cal = calibrate_threshold(np.linspace(0, 1, 100), np.zeros(100, bool), target_accuracy=0.6)
    assert cal.threshold == math.inf and cal.coverage == 0.0 and cal.n_answered == 0
    assert math.isnan(cal.accuracy)


def test_unreachable_target_declines_everything() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random(1000)
    correct = rng.random(1000) < 0.5  # 50% accuracy whatever the score
    cal = calibrate_threshold(scores, correct, target_accuracy=0.9, delta=0.1)
    assert cal.threshold == math.inf and cal.coverage == 0.0


def test_too_few_questions_to_test_declines() -> None:
    # 21 perfect answers cannot show accuracy >= 0.9 at delta 0.1 (0.9^21 > 0.1); 22 can.
    assert calibrate_threshold([0.5] * 21, [True] * 21, target_accuracy=0.9).threshold == math.inf
    assert calibrate_threshold([0.5] * 22, [True] * 22, target_accuracy=0.9).threshold == 0.5


def test_ties_are_answered_as_a_block() -> None:
    # 40 correct at 0.9, then a tie at 0.5 of 10 correct + 10 wrong: answering the tie gives
    # 50/60 = 0.83 accuracy; with target 0.9 the tie must be declined as a whole.
    scores = [0.9] * 40 + [0.5] * 20
    correct = [True] * 40 + [True] * 10 + [False] * 10
    cal = calibrate_threshold(scores, correct, target_accuracy=0.9, delta=0.1)
    assert cal.threshold == 0.9 and cal.n_answered == 40
    # A low target accepts the tie block, never a part of it.
    cal = calibrate_threshold(scores, correct, target_accuracy=0.6, delta=0.1)
    assert cal.threshold == 0.5 and cal.n_answered == 60


def test_min_answered_and_stop_at_first_failure() -> None:
    # Sorted by score: 30 correct, then 5 wrong, then 100 correct. The walk stops in the wrong
    # stretch although later thresholds would pass again (fixed sequence never resumes).
    n = 135
    scores = np.arange(n, 0, -1, dtype=float)
    correct = np.array([True] * 30 + [False] * 5 + [True] * 100)
    cal = calibrate_threshold(scores, correct, target_accuracy=0.9, delta=0.1)
    # After 30 correct + 1 wrong: P(Bin(31, .1) <= 1) = 0.17 > 0.1 -> stop; last pass is 30.
    assert float(binomial_cdf(1, 31, 0.1)) > 0.1
    assert cal.n_answered == 30 and cal.threshold == scores[29]
    # Starting later changes which hypotheses are tested: first at 40 answered, which fails.
    cal = calibrate_threshold(scores, correct, target_accuracy=0.9, delta=0.1, min_answered=40)
    assert cal.threshold == math.inf


def test_rejects_bad_arguments() -> None:
    for kwargs in (
        {"target_accuracy": 1.0},
        {"target_accuracy": 0.0},
        {"target_accuracy": 0.9, "delta": 0.0},
        {"target_accuracy": 0.9, "min_answered": 0},
    ):
        with pytest.raises(ValueError):
            calibrate_threshold([0.1, 0.2], [True, False], **kwargs)
    with pytest.raises(ValueError):
        calibrate_threshold([], [], target_accuracy=0.9)
    with pytest.raises(ValueError):
        calibrate_threshold([0.1, float("nan")], [True, True], target_accuracy=0.9)
    with pytest.raises(ValueError, match=r"\+inf"):  # it read "threshold inf, coverage 1"
        calibrate_threshold([math.inf] * 30, [True] * 30, target_accuracy=0.8)


def test_json_round_trip() -> None:
    for cal in (
        calibrate_threshold(np.linspace(0, 1, 50), np.ones(50, bool), target_accuracy=0.9),
        calibrate_threshold([0.3], [False], target_accuracy=0.9),
    ):
        data = cal.to_json()
        assert data["threshold"] is None or isinstance(data["threshold"], float)
        back = Calibration.from_json(data)
        assert back.threshold == cal.threshold and back.to_json() == data
        assert json.loads(json.dumps(data, allow_nan=False)) == data  # no Infinity/NaN


# --- the guarantee, by Monte Carlo -------------------------------------------------------

TRIALS = 300
N_CAL = 500


def _mc_slack(delta: float) -> float:
    # 3 binomial standard deviations of the violation frequency over TRIALS trials.
    return 3 * math.sqrt(delta * (1 - delta) / TRIALS)


@pytest.mark.parametrize("min_answered", [1, 25])
def test_guarantee_uniform_scores(min_answered: int) -> None:
    # s ~ U(0, 1), P(correct | s) = s, so the true answered accuracy at t is (1 + t) / 2:
    # exact, no test-set noise. Target 0.8 is reached by t >= 0.6 (coverage up to 0.4).
    rng = np.random.default_rng(12345)
    target, delta = 0.8, 0.1
    violations, coverages = 0, []
    for _ in range(TRIALS):
        s = rng.random(N_CAL)
        c = rng.random(N_CAL) < s
        t = calibrate_threshold(
            s, c, target_accuracy=target, delta=delta, min_answered=min_answered
        ).threshold
        true_accuracy = (1 + t) / 2 if t <= 1 else 1.0
        violations += true_accuracy < target
        coverages.append(1 - t if t <= 1 else 0.0)
    assert violations / TRIALS <= delta + _mc_slack(delta)
    # Not vacuous: a good part of the reachable coverage (0.4) is used on average. Starting
    # at the very top, one early error stops the walk (about 1 trial in 8 here); starting at
    # 5% coverage (min_answered=25) avoids most of those stops.
    assert np.mean(coverages) > 0.15
    assert np.mean(np.array(coverages) > 0) > (0.8 if min_answered == 1 else 0.95)


def test_guarantee_logistic_scores_with_ties() -> None:
    # Scores on a grid of 21 values (many ties), P(correct | s) = sigmoid(8 (s - 0.5)).
    rng = np.random.default_rng(777)
    grid = np.linspace(0, 1, 21)
    eta = 1 / (1 + np.exp(-8 * (grid - 0.5)))
    # True answered accuracy at grid threshold grid[i] (scores uniform over the grid).
    true_acc = np.array([eta[i:].mean() for i in range(grid.size)])
    target, delta = 0.85, 0.2
    violations, answered_any = 0, 0
    for _ in range(200):
        idx = rng.integers(0, grid.size, size=N_CAL)
        c = rng.random(N_CAL) < eta[idx]
        cal = calibrate_threshold(grid[idx], c, target_accuracy=target, delta=delta)
        if cal.threshold <= 1:
            answered_any += 1
            violations += true_acc[int(np.searchsorted(grid, cal.threshold))] < target
    assert violations / 200 <= delta + 3 * math.sqrt(delta * (1 - delta) / 200)
    assert answered_any > 150


# --- choosing the target after seeing the data ------------------------------------------------


def _uniform(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.random(n)
    return s, rng.random(n) < s  # P(correct | s) = s: answered accuracy at t is (1 + t) / 2


def test_choose_target_takes_the_highest_with_enough_coverage_at_delta_over_k() -> None:
    s, c = _uniform(800, 3)
    targets = [0.6, 0.7, 0.8, 0.9]
    got = choose_target(s, c, targets=targets, min_coverage=0.3, delta=0.1)
    each = {t: calibrate_threshold(s, c, target_accuracy=t, delta=0.1 / 4) for t in targets}
    qualifying = [t for t in targets if each[t].n_answered and each[t].coverage >= 0.3]
    assert qualifying and qualifying[-1] < 0.9  # the test means something: not every target
    assert got == each[qualifying[-1]] and got.delta == pytest.approx(0.025)
    # at delta / k the chosen target answers no more than the same target at delta would
    assert got.threshold >= calibrate_threshold(s, c, target_accuracy=got.target_accuracy,
                                                delta=0.1).threshold


def test_choose_target_counts_a_repeated_target_once() -> None:
    s, c = _uniform(300, 4)
    once = choose_target(s, c, targets=[0.6, 0.7], min_coverage=0.0, delta=0.1)
    twice = choose_target(s, c, targets=[0.6, 0.7, 0.7], min_coverage=0.0, delta=0.1)
    assert twice == once and twice.delta == pytest.approx(0.05)


def test_choose_target_falls_back_to_the_lowest_target() -> None:
    s, c = _uniform(300, 4)
    got = choose_target(s, c, targets=[0.9, 0.7], min_coverage=0.99, delta=0.1)
    assert got == calibrate_threshold(s, c, target_accuracy=0.7, delta=0.05)
    with pytest.raises(ValueError, match="targets"):
        choose_target(s, c, targets=[], min_coverage=0.2)
    with pytest.raises(ValueError, match="min_coverage"):
        choose_target(s, c, targets=[0.7], min_coverage=1.5)


def test_choose_target_keeps_the_guarantee_over_the_choice() -> None:
    # The chosen target's true answered accuracy falls short no more than delta of the time.
    rng = np.random.default_rng(2024)
    delta, violations = 0.1, 0
    targets = [0.6, 0.65, 0.7, 0.75, 0.8, 0.85]
    for _ in range(TRIALS):
        s = rng.random(N_CAL)
        c = rng.random(N_CAL) < s
        cal = choose_target(s, c, targets=targets, min_coverage=0.3, delta=delta,
                            min_answered=25)
        if cal.n_answered:
            violations += (1 + cal.threshold) / 2 < cal.target_accuracy
    assert violations / TRIALS <= delta + _mc_slack(delta)


def test_a_p_value_equal_to_delta_rejects_and_a_coverage_equal_to_the_minimum_is_enough() -> None:
    """Learn-then-Test rejects while p <= delta: 2 right of 2 at target 0.5 is p = 0.25."""
    c = calibrate_threshold([0.9, 0.8], [True, True], target_accuracy=0.5, delta=0.25)
    assert c.threshold == 0.8 and c.n_answered == 2
    assert math.isinf(calibrate_threshold([0.9, 0.8], [True, True], target_accuracy=0.5,
                                          delta=0.24).threshold)
    scores, right = np.linspace(1, 0, 200), [True] * 100 + [False] * 100
    high = calibrate_threshold(scores, right, target_accuracy=0.9, delta=0.05)
    assert 0 < high.coverage < 1
    chosen = choose_target(scores, right, targets=[0.5, 0.9], min_coverage=high.coverage,
                           delta=0.1)  # (each target at 0.1 / 2)
    assert chosen.target_accuracy == 0.9


def test_min_testable_answered_is_exact_when_delta_is_a_power_of_one_minus_alpha() -> None:
    """With delta exactly (1 - alpha)^k, one more answered question than needed was demanded
    (e.g. 2 instead of 1 for alpha=0.01, delta=0.99)."""
    assert min_testable_answered(0.01, 0.99) == 1
    assert min_testable_answered(0.5, 0.25) == 2
    bad = [(a / 100, k) for a in range(1, 100) for k in range(1, 40)
           if 0 < (1 - a / 100) ** k < 1
           and min_testable_answered(a / 100, (1 - a / 100) ** k) != k]
    assert bad == []


def test_choose_target_with_no_coverage_floor_skips_targets_that_answer_nothing() -> None:
    """With min_coverage 0, an unreachable target (threshold inf, nothing answered) was
    chosen over a lower target that answers questions."""
    rng = np.random.default_rng(0)
    s = rng.random(200)
    ok = rng.random(200) < s
    c = choose_target(s, ok, targets=[0.6, 0.999], min_coverage=0.0)
    assert c.target_accuracy == 0.6
    assert c.n_answered > 0 and math.isfinite(c.threshold)
