"""The reward model: features, training (labels, pairs, both), save/load, scoring, calibration.

Everything here uses the hashed embedder and synthetic data, so it runs in seconds.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from citeqa.errors import ModelError, SourceError
from citeqa.evals.metrics import aurc
from citeqa.retrieval.embed import HashEmbedder
from citeqa.reward.cli import calibrate_dir, train_to_dir
from citeqa.reward.data import Labelled, Pair, RewardData, load_reward_data
from citeqa.reward.features import (
    SCALARS,
    FeatureSpec,
    RewardInput,
    effective_rank,
    featurize,
    scalar_row,
)
from citeqa.reward.model import load_model, save_model
from citeqa.reward.scorer import RewardScorer, best_per_question, load_scorer
from citeqa.reward.train import TrainConfig, fit_ensemble, train_reward
from citeqa.types import Candidate, Quote

EMB = HashEmbedder()
SPEC = FeatureSpec(embedder="hash", embedding_dim=EMB.dim)
FAST = TrainConfig(members=3, hidden=8, epochs=100, lr=1e-2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

WORDS = "river castle engine treaty harbour valley senate oxygen copper lantern".split()
NAMES = "Rollo Paris 1889 Watt Brussels Harvard Edinburgh Quebec Euler Calvin".split()


def synthetic(n_questions: int, seed: int) -> list[Labelled]:
    """Easy data: a correct answer appears in its quote, which shares the question's words and
    is generated confidently; a wrong one does neither."""
    rng = random.Random(seed)
    out = []
    for i in range(n_questions):
        topic = rng.sample(WORDS, 2)
        question = f"Which {topic[0]} is near the {topic[1]}?"
        for correct in (True, False):
            name = rng.choice(NAMES)
            if correct:
                quote = f"The {topic[0]} near the {topic[1]} is {name}, as records show."
                lp = -0.2 * rng.random()
            else:
                quote = f"Some {rng.choice(WORDS)} was built with {rng.choice(WORDS)} later."
                lp = -1.5 - rng.random()
            x = RewardInput(question, name, quote, "T", lp * 10, 10, 2 / 61, True)
            out.append(Labelled(x, int(correct), qid=f"q{seed}-{i}", n=2, sample=int(not correct)))
    return out


def pairs_of(items: list[Labelled]) -> list[Pair]:
    return [Pair(items[i].input, items[i + 1].input, 0) for i in range(0, len(items), 2)]


def test_feature_shapes_and_scalars():
    xs = [item.input for item in synthetic(3, 0)]
    feats = featurize(xs, SPEC, EMB)
    assert feats.shape == (6, 4 * EMB.dim + 3 + len(SCALARS)) == (6, SPEC.dim)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    scalars_only = FeatureSpec(embedder="hash", embedding_dim=EMB.dim, embeddings=False)
    assert featurize(xs, scalars_only, None).shape == (6, len(SCALARS))
    row = dict(zip(SCALARS, scalar_row(xs[0], SPEC), strict=True))
    assert row["answer_in_quote"] == 1.0 and row["quote_valid"] == 1.0
    assert row["mean_logprob"] == pytest.approx(xs[0].logprob / 10)
    assert row["log_retrieval_rank"] == pytest.approx(math.log1p(1.0))
    assert dict(zip(SCALARS, scalar_row(xs[1], SPEC), strict=True))["answer_in_quote"] == 0.0
    with pytest.raises(ValueError, match="embedder"):
        featurize(xs, SPEC, None)
    with pytest.raises(ValueError, match="dimensions"):
        featurize(xs, SPEC, HashEmbedder(dim=64))


def test_effective_rank_inverts_rrf():
    for r in (1, 5, 40):
        assert effective_rank(2 / (60 + r), 60) == pytest.approx(r)
    assert effective_rank(1 / 61, 60) > 60  # found by one retriever only: far down
    assert effective_rank(0.0, 60) == effective_rank(-1.0, 60) == 200.0


def test_features_do_not_depend_on_the_other_candidates():
    xs = [item.input for item in synthetic(4, 1)]
    assert np.array_equal(featurize(xs, SPEC, EMB)[:1], featurize(xs[:1], SPEC, EMB))


def _train_and_eval(data: RewardData, held_out: list[Labelled]) -> tuple[dict, float]:
    model, metrics = train_reward(data, SPEC, EMB, FAST)
    x = torch.from_numpy(featurize([h.input for h in held_out], SPEC, EMB))
    mean, _ = model.predict(x)
    return metrics, aurc(mean.numpy(), [bool(h.label) for h in held_out])


@pytest.mark.parametrize("kind", ["labels", "pairs", "both"])
def test_training_lowers_loss_and_separates_easy_data(kind):
    train, held_out = synthetic(40, 0), synthetic(20, 1)
    data = RewardData(
        labelled=train if kind != "pairs" else [],
        pairs=pairs_of(train) if kind != "labels" else [],
    )
    metrics, held_out_aurc = _train_and_eval(data, held_out)
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"], metrics
    # half the held-out answers are wrong: a random ranking has AURC about 0.5, a perfect one
    # 0.5 - 0.5 ln 2 = 0.153 (the labels themselves as scores)
    labels = [bool(h.label) for h in held_out]
    best = aurc(np.array(labels, float) + 1e-6 * np.arange(len(labels)), labels)  # no ties
    assert best == pytest.approx(0.5 - 0.5 * math.log(2), abs=0.02)
    assert held_out_aurc < best + 0.03, (held_out_aurc, best)


def test_fit_needs_some_data():
    empty = np.zeros((0, 4), np.float32)
    with pytest.raises(ValueError, match="nothing to train"):
        fit_ensemble(empty, np.zeros(0), empty, empty, np.zeros(0), FAST)


def test_ensemble_members_differ_and_spread_is_reported():
    model, _ = train_reward(RewardData(labelled=synthetic(30, 0)), SPEC, EMB, FAST)
    x = torch.from_numpy(featurize([h.input for h in synthetic(5, 2)], SPEC, EMB))
    probs = torch.sigmoid(model(x))  # [K, N]
    assert probs.shape == (3, 10)
    mean, std = model.predict(x)
    assert torch.allclose(mean, probs.mean(0)) and (std > 0).any()


def _write_jsonl(path: Path, items: list[Labelled]) -> Path:
    rows = [
        {
            "question": h.input.question, "answer": h.input.answer, "quote": h.input.quote,
            "logprob": h.input.logprob, "n_tokens": h.input.n_tokens,
            "retrieval_score": h.input.retrieval_score, "label": h.label, "qid": h.qid, "n": h.n,
        }
        for h in items
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rm")
    data = _write_jsonl(tmp / "train.jsonl", synthetic(40, 0))
    out = tmp / "model"
    train_to_dir([data], out, embedder="hash", cfg=FAST)
    return out


def test_save_load_round_trip_gives_identical_scores(model_dir, tmp_path):
    model, spec, config = load_model(model_dir)
    assert spec == SPEC and config["members"] == 3 and config["embedder_id"] == EMB.model_id
    x = torch.from_numpy(featurize([h.input for h in synthetic(5, 3)], SPEC, EMB))
    save_model(tmp_path / "again", model, spec, {"note": "copy"})
    again, _, _ = load_model(tmp_path / "again")
    assert torch.equal(model(x), again(x))
    assert (model_dir / "model.safetensors").stat().st_size < 5_000_000


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"), "corrupt"),
        (lambda d: (d / "config.json").write_text("{not json"), "corrupt"),
        (lambda d: (d / "config.json").write_text('{"format": 99}'), "format"),
        (lambda d: _set(d, "dim", 7), "columns"),
        (lambda d: _set(d, "hidden", 4), "does not match"),
    ],
)
def test_damaged_directories_give_clear_errors(model_dir, tmp_path, damage, message):
    broken = _copy(model_dir, tmp_path / "broken")
    damage(broken)
    with pytest.raises(ModelError, match=message) as e:
        RewardScorer(broken)
    assert "citeqa train reward" in str(e.value)


def _set(d: Path, key: str, value: int) -> None:
    config = json.loads((d / "config.json").read_text())
    config[key] = value
    (d / "config.json").write_text(json.dumps(config))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_scorer(str(tmp_path / "nope"))
    assert load_scorer(None) is None


def _candidate(answer: str, quote: str | None, lp: float = -2.0) -> Candidate:
    q = Quote(quote, "d", "T", "s", 0, len(quote)) if quote else None
    return Candidate(answer, q, logprob=lp, n_tokens=10, retrieval_score=2 / 61)


def test_scorer_fills_score_and_uncertainty_in_unit_interval(model_dir):
    scorer = RewardScorer(model_dir)
    cands = [
        _candidate("Paris", "The river near the castle is Paris, as records show.", -1.0),
        _candidate("Rollo", "Some senate was built with copper later.", -20.0),
        _candidate("", None, -30.0),
    ]
    out = scorer.score("Which river is near the castle?", cands)
    assert [c.answer for c in out] == [c.answer for c in cands]
    for c in out:
        assert 0.0 <= c.score <= 1.0 and 0.0 <= c.uncertainty <= 1.0
    assert out[0].score > out[1].score
    assert scorer.score("q?", []) == []
    assert scorer.threshold is None  # not calibrated yet


def test_calibration_round_trip_and_monotone_threshold_for(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "cal")
    rng = random.Random(5)
    items = synthetic(60, 7)
    # flip some labels so that the achievable accuracy is not trivially 1
    items = [Labelled(h.input, h.label if rng.random() > 0.2 else 1 - h.label, h.qid, n=h.n)
             for h in items]
    cal_data = _write_jsonl(tmp_path / "cal.jsonl", items)
    summary = calibrate_dir([cal_data], d, target=0.7, delta=0.1)
    assert summary["n"] == 60 and summary["target_accuracy"] == 0.7
    scorer = RewardScorer(d)
    body = json.loads((d / "calibration.json").read_text())
    assert len(body["scores"]) == len(body["correct"]) == 60
    thr = scorer.threshold
    assert thr == (math.inf if summary["threshold"] is None else summary["threshold"])
    assert scorer.threshold_for(0.7) >= thr  # the envelope never answers more
    targets = [0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95]
    values = [scorer.threshold_for(t) for t in targets]
    assert values == sorted(values), values
    assert scorer.threshold_for(0.99) == math.inf  # 60 questions cannot certify 99%


def test_threshold_for_needs_calibration(model_dir):
    with pytest.raises(ModelError, match="citeqa calibrate"):
        RewardScorer(model_dir).threshold_for(0.8)


def test_corrupt_calibration_is_a_clear_error(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "badcal")
    (d / "calibration.json").write_text('{"scores": [1]}')
    with pytest.raises(ModelError, match="rerun `citeqa calibrate"):
        RewardScorer(d)


def test_best_per_question_follows_the_pipeline_choice():
    groups = [
        [(0.9, False, True), (0.4, True, False), (0.6, True, True)],  # best verified: 0.6
        [(0.8, False, True)],  # nothing verified: always declined
    ]
    scores, correct = best_per_question(groups)
    assert scores.tolist() == [0.6, -math.inf] and correct.tolist() == [True, False]


def test_reward_data_lines_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"question": "Q?", "answer": "A", "quote": "A is so.", "label": 1}) + "\n\n"
        + json.dumps({"question": "Q?", "a": {"answer": "A", "quote": "x"},
                      "b": {"answer": "B", "quote": "y"}, "preferred": "b"}) + "\n"
    )
    data = load_reward_data(path)
    assert len(data.labelled) == 1 and data.labelled[0].input.n_tokens == 0
    assert len(data.pairs) == 1 and data.pairs[0].preferred == 1
    path.write_text('{"question": "Q?", "answer": "A", "quote": "x", "label": 3}\n')
    with pytest.raises(SourceError, match=r"d\.jsonl:1: bad reward-data line"):
        load_reward_data(path)
    with pytest.raises(SourceError, match="citeqa train reward-data"):
        load_reward_data(tmp_path / "missing.jsonl")


def test_soft_labels_are_read_from_golds_and_used(tmp_path):
    path = tmp_path / "soft.jsonl"
    rows = [
        {"question": "Q?", "answer": "the old red barn", "quote": "x y z", "label": 0,
         "golds": ["red barn"]},
        {"question": "Q?", "answer": "red barn", "quote": "x", "label": 1, "golds": ["red barn"],
         "quote_valid": False},
        {"question": "Q?", "answer": "no", "quote": "x", "label": 0, "golds": []},
        {"question": "Q?", "answer": "no", "quote": "x", "label": 0, "f1": 0.25},
        {"question": "Q?", "answer": "no", "quote": "x", "label": 0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    soft = [h.soft for h in load_reward_data(path).labelled]
    assert soft == [pytest.approx(0.8), 0.0, 0.0, 0.25, None]  # "old red barn": P 2/3, R 1
    # graded targets: a half-right answer is learned as half right
    items = [Labelled(h.input, 0, soft=0.5) for h in synthetic(20, 0) if h.label]
    cfg = TrainConfig(members=1, hidden=0, epochs=200, lr=5e-2, soft_labels=True)
    model, _ = train_reward(RewardData(labelled=items), SPEC, EMB, cfg)
    x = torch.from_numpy(featurize([h.input for h in items], SPEC, EMB))
    assert model.predict(x)[0].mean().item() == pytest.approx(0.5, abs=0.1)
