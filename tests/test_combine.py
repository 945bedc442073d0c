"""Combining the verifier with the generator's signals: features, the fit, missing signals,
the file round trip."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from citeqa.errors import ModelError
from citeqa.evals.metrics import auroc
from citeqa.reward.combine import (
    COMBINE,
    INPUTS,
    Signals,
    features,
    fit,
    read_combiner,
    write_combiner,
)
from citeqa.types import Candidate


def test_features_mark_a_generator_without_log_probabilities_as_missing() -> None:
    x = features([0.5, 0.9, 1.0], [Signals(-0.2, 10, 0.03), Signals(-9.0, 4, 0.01),
                                   Signals(0.0, 0, 0.02)])
    assert x.shape == (3, len(INPUTS))
    assert x[0].tolist() == pytest.approx([0.0, -0.2, math.log(11), 0.03])
    assert x[1, 0] == pytest.approx(math.log(9)) and x[1, 1] == -5.0  # floored
    assert np.isnan(x[2, 1]) and np.isnan(x[2, 2]) and np.isfinite(x[2, 0]) and x[2, 3] == 0.02
    assert Signals.of({"n_tokens": 3.0}).n_tokens == 3
    nothing = Signals.of({})  # a synthetic or red-team record: no generator, no retrieval
    assert nothing.n_tokens == 0 and math.isnan(nothing.retrieval_score)
    # a record older than ``retrieval_fused`` came from a fused search: its score counts
    assert Signals.of({"retrieval_score": 0.03}).retrieval_score == 0.03
    assert math.isnan(Signals.of({"retrieval_score": 2.7, "retrieval_fused": False})
                      .retrieval_score)


def test_a_retrieval_score_not_on_the_fused_scale_counts_as_unknown() -> None:
    """A BM25-only index orders hits by raw BM25 scores (2.7, or below 0 where a term is in
    most documents): the combination, fitted on fused (RRF) scores, must not read them as one."""
    fused = Candidate("Rollo", None, logprob=-1.0, n_tokens=5, retrieval_score=0.03)
    raw = replace(fused, retrieval_score=2.73, retrieval_fused=False)
    assert Signals.of_candidate(fused) == Signals(-0.2, 5, 0.03)
    assert math.isnan(Signals.of_candidate(raw).retrieval_score)
    assert Signals.of_candidate(raw).mean_logprob == -0.2
    assert math.isnan(Signals.of({"retrieval_score": -1.9, "retrieval_fused": 0.0}).retrieval_score)
    assert Signals.of({"retrieval_score": 0.03, "retrieval_fused": 1.0}).retrieval_score == 0.03
    x, y = synthetic(1000)
    c = fit(x, y)
    got = c(features([0.6, 0.6], [Signals.of_candidate(replace(raw, retrieval_score=s))
                                  for s in (2.73, -1.86)]))
    at_mean = c(features([0.6], [Signals(-0.2, 5, c.mean[3])]))[0]
    assert got.tolist() == pytest.approx([at_mean, at_mean])


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a known logistic model over inputs 0, 1 and 3 (2 is noise)."""
    rng = np.random.default_rng(seed)
    x = np.c_[rng.normal(0, 2, n), rng.uniform(-3, 0, n), rng.normal(3, 0.5, n),
              rng.uniform(0, 0.05, n)]
    logit = 0.8 * x[:, 0] + 1.5 * x[:, 1] + 40 * x[:, 3] + 1.0
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)


def test_fit_finds_which_inputs_matter_and_beats_each_alone() -> None:
    x, y = synthetic(4000)
    c = fit(x, y)
    w = np.array(c.weights) / np.array(c.std)  # per unit of each input
    assert w[0] == pytest.approx(0.8, rel=0.2) and w[1] == pytest.approx(1.5, rel=0.2)
    assert w[3] == pytest.approx(40, rel=0.25) and abs(w[2]) < 0.3
    xt, yt = synthetic(2000, seed=1)
    combined = auroc(c(xt), yt)
    assert all(combined > auroc(xt[:, i], yt) + 0.02 for i in (0, 1, 3))
    with pytest.raises(ValueError, match="both labels"):
        fit(x[:50], np.zeros(50))


def test_missing_generator_inputs_count_as_their_fitted_mean() -> None:
    x, y = synthetic(1000)
    x[::4, 1:3] = np.nan  # a quarter of the candidates came from an engine without logprobs
    c = fit(x, y)
    assert np.isfinite(np.array(c.mean)).all()
    # standardised by the candidates that gave them (not taken as not given at all)
    assert c.mean[1:3] == pytest.approx(tuple(np.nanmean(x[:, 1:3], axis=0)))
    assert c.std[1:3] == pytest.approx(tuple(np.nanstd(x[:, 1:3], axis=0)))
    row = np.array([[1.0, math.nan, math.nan, 0.02]])
    at_mean = np.array([[1.0, c.mean[1], c.mean[2], 0.02]])
    assert c(row)[0] == pytest.approx(c(at_mean)[0])
    assert 0 < c(row)[0] < 1
    # each input's share, as evals/score_components.py prints them: 0 for a missing one, and
    # their sum plus the bias is the score's logit
    shares = c.shares(row)
    assert shares.shape == (1, 4) and shares[0, 1] == 0.0 and shares[0, 2] == 0.0
    assert np.isfinite(shares).all()
    assert 1 / (1 + math.exp(-(shares.sum() + c.bias))) == pytest.approx(c(row)[0])
    # none of them with log-probabilities: the file is still strict JSON (it held NaN means)
    x[:, 1:3] = np.nan
    c = fit(x, y)
    assert np.isfinite(np.array(c.mean + c.std)).all() and c.weights[1:3] == (0.0, 0.0)
    json.dumps(c.to_json(), allow_nan=False)
    assert 0 < c(row)[0] < 1


def test_a_model_that_failed_gives_no_score_not_a_middling_one() -> None:
    """A NaN verifier probability counted as its fitted mean: 0.205 beside 0.049 for p=0.001."""
    x, y = synthetic(500)
    c = fit(x, y)
    rows = np.array([[math.nan, -1.0, 2.0, 0.02], [1.0, -1.0, 2.0, 0.02]])
    assert math.isnan(c(rows)[0]) and 0 < c(rows)[1] < 1
    assert c(np.empty((0, 4))).shape == (0,)
    xa = np.column_stack([x, y * 2.0 - 1.0])  # with an answerability logit
    ca = fit(xa, y)  # five columns: with answerability
    assert math.isnan(ca(np.array([[1.0, -1.0, 2.0, 0.02, math.nan]]))[0])


def test_round_trip_and_a_corrupt_file_says_what_to_do(tmp_path) -> None:
    assert read_combiner(tmp_path) is None
    x, y = synthetic(500)
    c = fit(x, y, extra={"data": ["a.jsonl"]})
    write_combiner(tmp_path, c)
    again = read_combiner(tmp_path)
    assert again == c and np.allclose(again(x), c(x))
    body = json.loads((tmp_path / COMBINE).read_text())
    body["inputs"] = ["something", "else"]
    (tmp_path / COMBINE).write_text(json.dumps(body))
    with pytest.raises(ModelError, match="reward-combine"):
        read_combiner(tmp_path)
    # numbers fit() never writes: a NaN weight declined every question, a std of 0 answered
    # every one (a score of 1.0)
    good = c.to_json()
    for bad in ({"weights": [float("nan")] + list(good["weights"][1:])},
                {"std": [0.0] + list(good["std"][1:])}, {"bias": float("inf")}):
        (tmp_path / COMBINE).write_text(json.dumps({**good, **bad}))
        with pytest.raises(ModelError, match="must be finite"):
            read_combiner(tmp_path)
    for short in (["mean"], ["std"], ["weights"], ["mean", "std", "weights"]):  # one fewer
        (tmp_path / COMBINE).write_text(json.dumps({**good, **{k: good[k][:-1] for k in short}}))
        with pytest.raises(ModelError, match="one value per input"):
            read_combiner(tmp_path)
    (tmp_path / COMBINE).write_text(json.dumps({**good, "n": 1}).replace('"n": 1', '"n": 1e400'))
    with pytest.raises(ModelError, match="combine.json is corrupt"):  # (an OverflowError)
        read_combiner(tmp_path)
    (tmp_path / COMBINE).write_text("{not json")
    with pytest.raises(ModelError, match="combine.json is corrupt"):
        read_combiner(tmp_path)


def test_fit_needs_ten_candidates_of_both_labels() -> None:
    x, y = synthetic(200)
    both = np.r_[np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 0)[:5]]
    assert fit(x[both], y[both]).n == 10
    with pytest.raises(ValueError, match="got 9"):
        fit(x[both[1:]], y[both[1:]])
    with pytest.raises(ValueError, match="both labels"):
        fit(x[y == 1][:20], y[y == 1][:20])


def test_the_bias_is_not_pulled_toward_one_half() -> None:
    """Only the weights are penalised: with an intercept free, a logistic fit's mean
    probability is the share of right labels, whatever the penalty."""
    rng = np.random.default_rng(3)
    x = np.c_[rng.normal(0, 1, 400), rng.normal(0, 1, 400), rng.normal(0, 1, 400),
              rng.normal(0, 1, 400)]
    y = (rng.random(400) < 0.9).astype(int)  # noise: nothing but the base rate to learn
    for l2 in (1e-2, 1.0, 100.0):
        assert fit(x, y, l2=l2)(x).mean() == pytest.approx(y.mean(), abs=1e-3)
