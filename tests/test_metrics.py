"""Tests for citeqa.evals.metrics: hand-computed cases, the official SQuAD script as a
reference, and properties of the selective-prediction and calibration metrics."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.evals.metrics import (
    accuracy_at_coverage,
    answered_accuracy_and_coverage,
    aurc,
    coverage_at_accuracy,
    exact_match,
    expected_calibration_error,
    f1,
    is_correct,
    paired_bootstrap_aurc,
    percentile,
    recall_at_k,
    reliability_bins,
    risk_coverage_curve,
)
from citeqa.text import normalize_answer

# --- reference: the official SQuAD v2.0 evaluation script, copied verbatim ------------------


def ref_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_get_tokens(s):
    if not s:
        return []
    return ref_normalize_answer(s).split()


def ref_compute_exact(a_gold, a_pred):
    return int(ref_normalize_answer(a_gold) == ref_normalize_answer(a_pred))


def ref_compute_f1(a_gold, a_pred):
    gold_toks = ref_get_tokens(a_gold)
    pred_toks = ref_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def ref_scores(golds, pred):
    gold_answers = [a for a in golds if ref_normalize_answer(a)]
    if not gold_answers:
        gold_answers = [""]
    return (
        max(ref_compute_exact(a, pred) for a in gold_answers),
        max(ref_compute_f1(a, pred) for a in gold_answers),
    )


# --- normalization and EM/F1 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),  # "The" at the start goes
        ("theater and anthem", "theater and anthem"),  # articles inside words stay
        ("a  b\t\nc", "b c"),  # whitespace runs collapse; "a" is an article
        ("An apple, an ANT.", "apple ant"),
        ("!!!", ""),  # punctuation-only
        ("1914–1918", "1914–1918"),  # en dash is not in string.punctuation
        ("rock-n-roll", "rocknroll"),  # ASCII hyphen is removed, joining the words
        ("the-end", "theend"),  # punctuation goes before articles: no word "the" left
        ("l'the", "lthe"),
    ],
)
def test_normalize_answer_quirks(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected
    assert ref_normalize_answer(raw) == expected


def test_exact_match_hand_cases() -> None:
    assert exact_match("the Denmark.", ["Denmark", "Norway"]) == 1.0
    assert exact_match("Denmark and Norway", ["Denmark", "Norway"]) == 0.0
    assert exact_match("1914-1918", ["1914–1918"]) == 0.0  # hyphen vs en dash


def test_f1_hand_cases() -> None:
    # pred "denmark norway" vs gold "denmark iceland and norway": overlap 2,
    # precision 2/2, recall 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert f1("Denmark, Norway", ["Denmark, Iceland and Norway"]) == pytest.approx(2 / 3)
    # Best over golds.
    assert f1("Rollo", ["Duke Rollo", "Rollo"]) == 1.0
    # Duplicated tokens count once per occurrence in both (Counter intersection):
    # pred "paris paris paris" vs gold "paris france": overlap min(3,1)=1,
    # precision 1/3, recall 1/2 -> F1 = 2*(1/6)/(5/6) = 0.4.
    assert f1("Paris Paris Paris", ["Paris, France"]) == pytest.approx(0.4)
    assert f1("blue", ["red"]) == 0.0


def test_no_answer_convention() -> None:
    # No gold: only an empty (or declined) prediction scores 1.
    for golds in ([], ["", "  "], ["!!!"]):
        assert exact_match(None, golds) == 1.0
        assert f1(None, golds) == 1.0
        assert exact_match("", golds) == 1.0
        assert exact_match("Paris", golds) == 0.0
        assert f1("Paris", golds) == 0.0
    # A punctuation-only prediction normalizes to empty, so it counts as a no-answer.
    assert f1("...", []) == 1.0
    # Golds that normalize to nothing are ignored when others exist.
    assert f1("", ["!!!", "Paris"]) == 0.0
    assert exact_match("paris", ["!!!", "Paris"]) == 1.0


_words = st.sampled_from(
    ["the", "a", "an", "The", "Paris", "paris", "france", "1914–1918", "x", "x,", "--", "!", " "]
)
_answer = st.lists(_words, max_size=6).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(pred=_answer, golds=st.lists(_answer, max_size=4))
def test_matches_official_script(pred: str, golds: list[str]) -> None:
    ref_em, ref_f1 = ref_scores(golds, pred)
    assert exact_match(pred, golds) == ref_em
    assert f1(pred, golds) == pytest.approx(ref_f1)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_normalize_matches_official_on_any_text(text: str) -> None:
    """The official normalisation, less CJK text's punctuation (which SQuAD never met)."""
    from citeqa.text import _cjk_punctuation

    assert normalize_answer(text) == ref_normalize_answer(
        "".join(c for c in text if not _cjk_punctuation(c)))


def test_chinese_japanese_and_korean_answers_count_by_the_character() -> None:
    """A CJK answer, written without spaces, was one token: its F1 was its exact match
    ("1420年建成" scored 0 against "1420年", as "in 1889" does not against "1889"), its corner
    brackets and full stop counted, and a gold was looked for between spaces in its quote."""
    from citeqa.evals.report import contains_gold

    assert f1("1420年建成", ["1420年"]) == pytest.approx(2 / 3)  # as f1("in 1889", ["1889"])
    assert f1("1395년에", ["1395년"]) == pytest.approx(0.8)
    assert exact_match("「東京タワー」。", ["東京タワー"]) == 1.0
    assert f1("東京タワー", ["大阪城"]) == 0.0
    assert contains_gold("北京大学创办于1898年，是中国", ["1898年"])
    assert contains_gold("경복궁은 1395년에 완공되었다", ["1395년"])
    assert contains_gold("The tower opened in 1889.", ["1889"])
    assert not contains_gold("The tower opened in 18890.", ["1889"])  # whole words still
    assert not contains_gold("创办于1898年", ["1899年"])


def test_is_correct_rule() -> None:
    golds = ["Denmark, Iceland and Norway"]
    assert is_correct("Denmark, Iceland and Norway", golds, quote_valid=True)
    assert not is_correct("Denmark, Iceland and Norway", golds, quote_valid=False)
    assert not is_correct(None, golds, quote_valid=True)  # declining an answerable question
    # F1 = 2/3 >= 0.5, but not with a higher threshold.
    assert is_correct("Denmark Norway", golds, quote_valid=True)
    assert not is_correct("Denmark Norway", golds, quote_valid=True, f1_threshold=0.7)
    # Exactly at the threshold counts.
    assert is_correct("x y", ["x y z w"], quote_valid=True)  # F1 = 2*1*0.5/1.5 = 2/3
    assert is_correct("x", ["x y z"], quote_valid=True)  # P=1, R=1/3 -> F1 = 0.5
    assert not is_correct("x", ["x y z w"], quote_valid=True)  # F1 = 0.4
    # Unanswerable: only a decline is right, whatever the quote.
    assert is_correct(None, [], quote_valid=False)
    assert not is_correct("Paris", [], quote_valid=True)
    assert not is_correct("", [], quote_valid=True)


# --- selective prediction ----------------------------------------------------------------


def test_risk_coverage_curve_hand_case() -> None:
    scores = [0.9, 0.8, 0.8, 0.1]
    correct = [True, False, True, False]
    cov, acc, thr = risk_coverage_curve(scores, correct)
    # The 0.8 tie is one block: coverage jumps from 1/4 to 3/4.
    np.testing.assert_allclose(cov, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.1])
    # AURC: the mean over both orders of the tie, (0 + 0 + 1/3 + 1/2) / 4 and
    # (0 + 1/2 + 1/3 + 1/2) / 4
    assert aurc(scores, correct) == pytest.approx((0 + (0 + 1 / 2) / 2 + 1 / 3 + 1 / 2) / 4)


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 2).map(float), st.booleans()), min_size=1,
                      max_size=7))
def test_aurc_of_ties_is_the_mean_over_every_order_of_them(pairs: list[tuple[float, bool]]
                                                            ) -> None:
    """Brute force: every permutation, ties broken by it, AURC without ties, averaged."""
    import itertools

    scores = [s for s, _ in pairs]
    correct = [c for _, c in pairs]
    orders = list(itertools.permutations(range(len(pairs))))
    total = 0.0
    for perm in orders:  # tie broken by the permutation's position: scores made distinct
        distinct = [scores[i] + perm.index(i) / (10 * len(pairs)) for i in range(len(pairs))]
        total += aurc(distinct, correct)
    assert aurc(scores, correct) == pytest.approx(total / len(orders))


def test_a_perfect_ranking_with_tied_wrong_answers_has_the_oracles_aurc() -> None:
    from citeqa.evals.metrics import oracle_scores

    correct = [True] * 6 + [False] * 4
    scores = [0.9 - 0.1 * i for i in range(6)] + [-math.inf] * 4  # no quote: all alike
    assert aurc(scores, correct) == pytest.approx(aurc(oracle_scores(correct), correct))


def test_aurc_without_ties_is_mean_selective_risk() -> None:
    scores = [5, 4, 3, 2, 1]
    correct = [True, False, True, True, False]
    risks = [0 / 1, 1 / 2, 1 / 3, 1 / 4, 2 / 5]
    assert aurc(scores, correct) == pytest.approx(sum(risks) / 5)


def test_accuracy_and_coverage_queries() -> None:
    scores = [0.9, 0.8, 0.8, 0.1]
    correct = [True, False, True, False]
    assert accuracy_at_coverage(scores, correct, 0.25) == 1.0
    assert accuracy_at_coverage(scores, correct, 0.5) == pytest.approx(2 / 3)  # tie not split
    assert accuracy_at_coverage(scores, correct, 1.0) == 0.5
    assert coverage_at_accuracy(scores, correct, 0.6) == 0.75
    assert coverage_at_accuracy(scores, correct, 0.5) == 1.0
    assert coverage_at_accuracy([0.5, 0.4], [False, False], 0.1) == 0.0
    acc, cov = answered_accuracy_and_coverage(scores, correct, 0.8)
    assert (acc, cov) == (pytest.approx(2 / 3), 0.75)
    acc, cov = answered_accuracy_and_coverage(scores, correct, 0.95)
    assert math.isnan(acc) and cov == 0.0
    with pytest.raises(ValueError):
        accuracy_at_coverage(scores, correct, 0.0)
    with pytest.raises(ValueError):
        risk_coverage_curve([0.1, 0.2], [True])


_score_lists = st.lists(
    st.tuples(st.integers(0, 5).map(float), st.booleans()), min_size=1, max_size=30
)


@settings(max_examples=200, deadline=None)
@given(pairs=_score_lists)
def test_curve_properties(pairs: list[tuple[float, bool]]) -> None:
    scores = [s for s, _ in pairs]
    correct = [c for _, c in pairs]
    cov, acc, thr = risk_coverage_curve(scores, correct)
    assert np.all(np.diff(cov) > 0) and cov[-1] == pytest.approx(1.0)
    assert np.all(np.diff(thr) < 0)
    assert acc[-1] == pytest.approx(np.mean(correct))
    # Each point agrees with answering by threshold directly.
    for t, c, a in zip(thr, cov, acc, strict=True):
        assert answered_accuracy_and_coverage(scores, correct, t) == (
            pytest.approx(a),
            pytest.approx(c),
        )
    # A perfect ranking (distinct scores, correct ones first) never has a larger AURC.
    perfect = [i + len(correct) * c for i, c in enumerate(correct)]
    assert aurc(perfect, correct) <= aurc(scores, correct) + 1e-12
    assert 0.0 <= aurc(scores, correct) <= 1.0


def test_perfect_ranking_beats_random_on_average() -> None:
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.6
    random_aurc = aurc(rng.random(200), correct)
    perfect = np.arange(200) + 200 * correct
    assert aurc(perfect, correct) < random_aurc
    # Random ranking's AURC is near the base error rate; perfect is far below it.
    assert random_aurc == pytest.approx(1 - correct.mean(), abs=0.1)


# --- calibration ---------------------------------------------------------------------------


def test_ece_hand_case() -> None:
    probs = [0.05, 0.15, 0.95, 0.95]
    correct = [False, True, True, False]
    # Bins: [0,.1): conf .05 acc 0; [.1,.2): conf .15 acc 1; [.9,1]: conf .95 acc .5
    # ECE = 1/4*.05 + 1/4*.85 + 2/4*.45 = 0.45
    assert expected_calibration_error(probs, correct) == pytest.approx(0.45)
    bins = reliability_bins(probs, correct)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9].mean_confidence == pytest.approx(0.95) and bins[9].accuracy == 0.5
    assert math.isnan(bins[3].accuracy)


def test_reliability_bin_edges() -> None:
    # Lower edges are inclusive, 1.0 falls in the last bin.
    bins = reliability_bins([0.0, 0.1, 0.5, 1.0], [True] * 4, n_bins=10)
    assert [i for i, b in enumerate(bins) if b.count] == [0, 1, 5, 9]
    # every value on an edge is in the bin whose lo it is (linspace put 0.3, 0.6, 0.7 below)
    edges = [k / 10 for k in range(10)]
    bins = reliability_bins(edges, [True] * 10, n_bins=10)
    assert all(b.count == 1 and b.mean_confidence == b.lo for b in bins)
    assert sum(b.count for b in reliability_bins([0.0, 1.0], [True, False], n_bins=1)) == 2
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])


@settings(max_examples=100, deadline=None)
@given(groups=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 3)), min_size=1, max_size=8))
def test_ece_zero_when_perfectly_calibrated(groups: list[tuple[int, int]]) -> None:
    # Each group: m copies of 4 items with confidence k/4, exactly k of the 4 correct.
    probs, correct = [], []
    for k, m in groups:
        probs += [k / 4] * (4 * m)
        correct += ([True] * k + [False] * (4 - k)) * m
    assert expected_calibration_error(probs, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_bounded() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(500)
    c = rng.random(500) < p  # calibrated in expectation
    assert expected_calibration_error(p, c) < 0.08
    assert expected_calibration_error(p, ~c) > 0.3


# --- retrieval and latency -----------------------------------------------------------------


def test_recall_at_k() -> None:
    ranked = [["p1", "p2", "p3"], ["p9", "p8", "p7"], ["p1"]]
    golds = [["p2"], ["p7", "p1"], []]
    assert recall_at_k(ranked, golds, 1) == pytest.approx((0 + 0) / 2)
    assert recall_at_k(ranked, golds, 2) == pytest.approx((1 + 0) / 2)
    assert recall_at_k(ranked, golds, 3) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError):
        recall_at_k(ranked, golds, 0)
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [[]], 1)


def test_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile(list(range(101)), 95) == 95.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_paired_bootstrap_aurc_sees_a_real_difference_and_none_between_equals() -> None:
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.4
    noise = rng.random(200)
    informed = correct + 0.8 * rng.random(200)  # mostly ranks correct answers first
    same = paired_bootstrap_aurc(noise, noise, correct, n=200)
    assert same.diff == 0.0 and same.low == 0.0 and same.high == 0.0 and same.share_a_lower == 0
    better = paired_bootstrap_aurc(informed, noise, correct, n=200)
    assert better.diff < 0 and better.low < better.diff < better.high < 0
    assert better.share_a_lower == 1.0
    worse = paired_bootstrap_aurc(noise, informed, correct, n=200)
    assert worse.diff == pytest.approx(-better.diff) and worse.low > 0
    with pytest.raises(ValueError):
        paired_bootstrap_aurc([0.1, 0.2], [0.1], [True, False])


def test_auroc_counts_correct_over_wrong_pairs_with_ties_as_half() -> None:
    from citeqa.evals.metrics import auroc

    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)
        correct = rng.random(30) < 0.4
        pos, neg = scores[correct], scores[~correct]
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert auroc(scores, correct) == pytest.approx(brute)
    assert auroc([1.0, 2.0], [True, True]) is None
    assert auroc([-np.inf, 0.5, 0.9], [False, True, True]) == 1.0


def test_oracle_scores_rank_every_correct_answer_first_without_ties() -> None:
    from citeqa.evals.metrics import oracle_scores

    correct = [False, True, False, True, True]
    s = oracle_scores(correct)
    assert len(set(s)) == 5
    pairs = list(zip(s, correct, strict=True))
    assert min(x for x, c in pairs if c) > max(x for x, c in pairs if not c)
    p = 3 / 5  # a perfect ranking's AURC is (1 - p) + p ln p, up to the discrete steps
    assert aurc(s, correct) == pytest.approx((1 - p) + p * np.log(p), abs=0.06)


def test_a_gold_that_normalizes_to_nothing_is_no_gold() -> None:
    """A gold answer of just "The" made answering "the" count as correct and declining as
    wrong."""
    assert is_correct(None, ["The"], quote_valid=False)
    assert not is_correct("the", ["The"], quote_valid=True)


def test_accuracy_at_a_coverage_a_rounding_hair_above_k_over_n_reads_as_k_over_n() -> None:
    """Coverage 0.1 + 0.2 (0.30000000000000004) over 10 questions took 4 answers, not 3."""
    s = [10 - i for i in range(10)]
    ok = [True] * 3 + [False] * 7
    assert accuracy_at_coverage(s, ok, 0.1 + 0.2) == 1.0


def test_threshold_json_of_minus_infinity_is_no_threshold() -> None:
    """A threshold of -inf (every question answered) was written as "inf" (every question
    declined)."""
    from citeqa.evals.metrics import threshold_json

    assert threshold_json(-math.inf) is None
    assert threshold_json(math.inf) == "inf"


def test_ece_weights_each_bin_by_its_share_of_questions() -> None:
    """ECE averaged bins equally (0.45) instead of by their size (0.25)."""
    assert expected_calibration_error([0.95, 0.95, 0.95, 0.15], [True] * 4) == pytest.approx(0.25)
