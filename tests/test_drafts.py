"""Prompt-lookup drafts and the shared-prefix length: pure functions of token ids."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from citeqa.generation.drafts import (
    MAX_DRAFTS,
    best_draft,
    common_prefix_length,
    prompt_lookup_drafts,
)

PROMPT = np.array([5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 4, 0])


def test_longest_suffix_first_then_latest_occurrence_first():
    # [4, 6, 7] is nowhere; [6, 7] at 1 and 6; [7] at 2 and 7 (same drafts: not repeated)
    assert list(prompt_lookup_drafts(PROMPT, [4, 6, 7], 3)) == [[2, 3, 6], [8, 9, 1]]
    # [2, 3, 6] at 8; then [3, 6] (same start); then [6] at 6 and 1
    assert list(prompt_lookup_drafts(PROMPT, [2, 3, 6], 2)) == [[4, 0], [7, 2], [7, 8]]


def test_drafts_stop_before_a_stop_token_and_skip_positions_already_drafted():
    drafts = list(prompt_lookup_drafts(PROMPT, [6, 7], 5, stop=frozenset({3})))
    assert drafts[0] == [2]  # 2, then the stop token 3
    starts = [d[0] for d in drafts if d]
    assert len(starts) == len(set(starts))


def test_no_occurrence_no_draft():
    assert list(prompt_lookup_drafts(PROMPT, [42], 4)) == []
    assert list(prompt_lookup_drafts(PROMPT, [], 4)) == []


def test_a_prompt_no_longer_than_the_suffix_and_a_match_at_its_end_draft_nothing() -> None:
    """(a window as long as the prompt less its last token raised; a match ending the prompt
    has no token after it: an empty draft, first of all, crowded out the real ones)"""
    assert list(prompt_lookup_drafts(np.array([5, 6]), [5, 6], 4)) == []
    assert list(prompt_lookup_drafts(np.array([1, 2, 3, 1, 2]), [1, 2], 3)) == [[3, 1, 2]]


def test_suffixes_up_to_three_tokens_are_looked_up() -> None:
    """MAX_NGRAM is 3: a three-token match earlier in the prompt outranks a later two-token
    one, and a four-token match ranks no higher than a later three-token one."""
    prompt = np.array([1, 2, 3, 40, 9, 2, 3, 50, 0])  # [1, 2, 3] at 0; [2, 3] again at 5
    assert next(prompt_lookup_drafts(prompt, [1, 2, 3], 1)) == [40]
    prompt = np.array([7, 1, 2, 3, 40, 9, 1, 2, 3, 50, 0])  # [7, 1, 2, 3] at 0; [1, 2, 3] at 6
    assert next(prompt_lookup_drafts(prompt, [7, 1, 2, 3], 1)) == [50]


def test_at_most_max_drafts_candidates():
    prompt = np.array([1, 2] * (MAX_DRAFTS + 5) + [3])
    assert len(list(prompt_lookup_drafts(prompt, [1], 2))) == MAX_DRAFTS


def test_best_draft_without_grammar_is_the_first_candidate():
    assert best_draft(iter([[1, 2], [3, 4, 5]]), 4, None) == [1, 2]
    assert best_draft(iter([]), 4, None) == []


def test_best_draft_takes_the_candidate_the_grammar_accepts_furthest():
    allowed = [9, 8, 7, 6]  # the only continuation the "grammar" accepts

    def valid_prefix(draft):
        n = 0
        while n < len(draft) and n < len(allowed) and draft[n] == allowed[n]:
            n += 1
        return n

    assert best_draft(iter([[1, 2, 3], [9, 8, 1], [9, 8, 7, 6], [9]]), 4, valid_prefix) == [
        9, 8, 7, 6,
    ]
    assert best_draft(iter([[1], [2]]), 4, valid_prefix) == []
    # of drafts the grammar accepts as far, the first (the better-ranked) is kept
    assert best_draft(iter([[1, 2], [3, 4], [5]]), 4, len) == [1, 2]


def test_best_draft_stops_looking_once_a_draft_fills_the_room():
    seen = []

    def candidates():
        for d in ([1, 2], [3, 4], [5, 6]):
            seen.append(d)
            yield d

    assert best_draft(candidates(), 2, lambda d: len(d)) == [1, 2]
    assert seen == [[1, 2]]


@given(st.lists(st.integers(0, 3), max_size=8), st.lists(st.integers(0, 3), max_size=8))
def test_common_prefix_length(a, b):
    n = common_prefix_length(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]
