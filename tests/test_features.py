"""The scalar features of the earlier feature reward model (citeqa/reward/features.py), which
``load_scorer`` still serves through ``reward/legacy.py`` (a format-1 directory): each input's
value pinned, so that a change to one is seen."""

from __future__ import annotations

import math

import numpy as np
import pytest

from citeqa.reward.features import (
    MAX_RANK,
    SCALARS,
    FeatureSpec,
    RewardInput,
    effective_rank,
    scalar_row,
)


def test_an_rrf_score_reads_back_as_the_rank_both_retrievers_agreeing_give() -> None:
    for rank in (1, 5, 37):
        assert effective_rank(2 / (60 + rank), 60) == pytest.approx(rank)
    assert effective_rank(1.0, 60) == 1.0  # above any rank's score: the first
    assert effective_rank(0.0, 60) == MAX_RANK == effective_rank(-1.0, 60)
    assert effective_rank(1e-9, 60) == MAX_RANK  # far down: clipped


def test_each_scalar_feature_is_what_its_name_says() -> None:
    x = RewardInput(question="When did the tower open?", answer="in 1889",
                    quote="The tower opened in 1889 to the public.", logprob=-6.0, n_tokens=3,
                    retrieval_score=2 / (10 + 4), quote_valid=True)
    row = dict(zip(SCALARS, scalar_row(x, FeatureSpec(rrf_k=10)).tolist(), strict=True))
    expected = {
        "mean_logprob": -2.0, "logprob": -0.6, "log_n_tokens": math.log1p(3),
        "log_retrieval_rank": math.log1p(4), "answer_in_quote": 1.0,
        "log_answer_words": math.log1p(2), "log_quote_chars": math.log1p(len(x.quote)),
        "quote_valid": 1.0, "answer_empty": 0.0,
    }
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, abs=1e-6), name
    assert 0.0 < row["question_quote_overlap"] <= 1.0
    empty = scalar_row(RewardInput("q?", " ", "", quote_valid=False), FeatureSpec())
    named = dict(zip(SCALARS, empty.tolist(), strict=True))
    assert (named["answer_empty"], named["quote_valid"], named["answer_in_quote"]) == (1, 0, 0)
    assert named["log_retrieval_rank"] == pytest.approx(math.log1p(MAX_RANK))
    with pytest.raises(ValueError, match="unknown scalar features"):
        scalar_row(x, FeatureSpec(scalars=("no_such",)))
    assert scalar_row(x, FeatureSpec()).dtype == np.float32
