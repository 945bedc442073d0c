"""Prompt-lookup drafts for speculative decoding of quotes (pure functions over token ids).

A quote copies prompt text, so the tokens that followed the last generated tokens where they
occur in the prompt are a good guess at what comes next. ``prompt_lookup_drafts`` lists such
guesses, best first; ``best_draft`` keeps the one the output grammar accepts furthest. The
model then checks a draft in one forward pass (``hf.py``), so drafts change speed, never output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

MAX_NGRAM = 3  # longest suffix of the output looked up in the prompt for a draft
MAX_DRAFTS = 8  # prompt-lookup candidates checked against the grammar per draft


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prompt_lookup_drafts(prompt: np.ndarray, generated: Sequence[int], k: int,
                         stop: frozenset[int] = frozenset()) -> Iterator[list[int]]:
    """Prompt-lookup draft candidates, best first: the ``k`` prompt tokens after each
    occurrence of a suffix of ``generated``, longest suffix (<= MAX_NGRAM tokens) first and
    latest occurrence first; at most MAX_DRAFTS of them (one per prompt position), each cut
    before any ``stop`` token."""
    seen: set[int] = set()  # draft start positions already yielded
    for n in range(min(MAX_NGRAM, len(generated)), 0, -1):
        if len(prompt) <= n:
            continue
        suffix = np.asarray(generated[-n:], dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(prompt[:-1], n)
        for hit in np.flatnonzero((windows == suffix).all(axis=1))[::-1]:
            start = int(hit) + n
            if start in seen:  # a longer suffix matched here already
                continue
            seen.add(start)
            draft = [int(t) for t in prompt[start : start + k]]
            for j, t in enumerate(draft):
                if t in stop:
                    draft = draft[:j]
                    break
            yield draft
            if len(seen) == MAX_DRAFTS:
                return


def best_draft(candidates: Iterable[list[int]], room: int,
               valid_prefix: Callable[[list[int]], int] | None) -> list[int]:
    """The first of ``candidates`` with the longest prefix that ``valid_prefix`` (the grammar)
    accepts, cut to that prefix; stops looking once one fills ``room``.

    Without a grammar the first candidate wins, as in plain prompt lookup; in a free-text part
    of a grammar, so does the first that fills ``room``. Inside a quote the grammar allows only
    continuations of the quoted passage, which rules out lookalike occurrences of the last
    tokens elsewhere in the prompt (a name that is also in the question, say)."""
    if valid_prefix is None:
        return next(iter(candidates), [])
    best: list[int] = []
    for draft in candidates:
        draft = draft[: valid_prefix(draft)]
        if len(draft) > len(best):
            best = draft
        if len(best) >= room:
            break
    return best
