"""Reciprocal rank fusion against a direct transcription of its definition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citeqa.retrieval import rrf


def test_known_values() -> None:
    fused = rrf([[1, 2, 3], [3, 1, 5]], k=60)
    assert [d for d, _ in fused] == [1, 3, 2, 5]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[3][1] == pytest.approx(1 / 63)


def test_ties_break_by_best_rank_then_id() -> None:
    # 7 and 4 both rank first once: equal scores and best rank, so the lower id wins
    assert [d for d, _ in rrf([[7, 9], [4, 8]])] == [4, 7, 8, 9]
    # the order does not depend on the order of the lists
    assert rrf([[7, 9], [4, 8]]) == rrf([[4, 8], [7, 9]])
    # with weights, equal scores can come from different ranks: 9 (1/1, rank 1) and 4 (2/2,
    # rank 2) tie, and the better best rank wins over the lower id
    assert [d for d, _ in rrf([[9], [5, 4]], k=0, weights=[1, 2])] == [5, 9, 4]
    # an id in several lists is judged by its best rank there, not its last: 9 (1/1 + 1/4, best
    # rank 1, last rank 4) and 5 (2.5/2, rank 2) tie at exactly 1.25
    assert [d for d, _ in rrf([[9], [1, 2, 3, 9], [0, 5]], k=0, weights=[1, 1, 2.5])][:3] == [
        0, 9, 5]


def test_duplicates_within_a_list_count_once() -> None:
    assert rrf([[1, 1, 2]]) == rrf([[1, 2]])[:1] + [(2, pytest.approx(1 / 63))]


def test_empty_inputs() -> None:
    assert rrf([]) == []
    assert rrf([[], []]) == []


def test_negative_k_rejected() -> None:
    with pytest.raises(ValueError):
        rrf([[1]], k=-1)


@given(
    rankings=st.lists(
        st.lists(st.integers(0, 30), unique=True, max_size=15), min_size=1, max_size=4
    ),
    k=st.integers(0, 100),
)
def test_matches_definition(rankings: list[list[int]], k: int) -> None:
    expected: dict[int, float] = {}
    for ranking in rankings:
        for rank, d in enumerate(ranking):
            expected[d] = expected.get(d, 0.0) + 1.0 / (k + rank + 1)
    fused = rrf(rankings, k=k)
    assert {d for d, _ in fused} == set(expected)
    for d, s in fused:
        assert s == pytest.approx(expected[d])
    scores = [s for _, s in fused]
    assert scores == sorted(scores, reverse=True)


def test_weighted_rrf_matches_definition_and_can_reorder() -> None:
    fused = dict(rrf([[1, 2], [2, 1]], k=10, weights=[2.0, 1.0]))
    assert fused[1] == pytest.approx(2 / 11 + 1 / 12)
    assert fused[2] == pytest.approx(2 / 12 + 1 / 11)
    assert [d for d, _ in rrf([[1, 2], [2, 1]], k=10, weights=[2.0, 1.0])] == [1, 2]
    assert [d for d, _ in rrf([[1, 2], [2, 1]], k=10, weights=[1.0, 2.0])] == [2, 1]


def test_weighted_rrf_needs_one_weight_per_list() -> None:
    with pytest.raises(ValueError, match="weights"):
        rrf([[1], [2]], weights=[1.0])


def test_an_exact_tie_is_broken_by_the_documented_rule_not_by_rounding() -> None:
    """Ranks {1, 2, 3} in three lists are the same sum for every id, but the float sums
    differed in their last bit (k=74: [1, 0, 2]), so rounding ordered them."""
    for k in range(100):
        fused = rrf([[0, 1, 2], [1, 2, 0], [2, 0, 1]], k=k)
        assert [d for d, _ in fused] == [0, 1, 2], k
        assert len({s for _, s in fused}) == 1, k
    # the service's weights: 1.5/(10+1) + 1/(10+23) == 1.5/(10+5) + 1/(10+5) == 1/6 exactly;
    # the better best rank (1) goes first
    bm25 = [1000, 7, 8, 9, 1002]
    dense = [100, 101, 102, 103, 1002, *range(104, 121), 1000]  # 1002 5th, 1000 23rd
    fused = dict(rrf([bm25, dense], k=10, weights=[1.5, 1.0]))
    assert fused[1000] == fused[1002] == pytest.approx(1 / 6)
    order = [d for d, _ in rrf([bm25, dense], k=10, weights=[1.5, 1.0])]
    assert order.index(1000) < order.index(1002)
