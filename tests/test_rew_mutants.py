"""Mutation round on the scoring side of the reward model: calibrate.py (the Learn-then-Test
threshold, choose_target), scorer.py (calibration.json, threshold_for, the served score),
verifier.py (the network, quotes kept in view), the feature model of earlier releases
(features.py, model.py, legacy.py), answerability.py and lean_encoder.py. Each test pins a
behaviour that a hand-made mutant (a flipped comparison, a dropped check, a wrong constant)
changed without any other test failing. Pure functions, fakes, a tiny random encoder and a tiny
feature ensemble only: fast."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from citeqa.errors import ModelError
from citeqa.retrieval.embed import HashEmbedder
from citeqa.reward.features import (
    SCALARS,
    FeatureSpec,
    RewardInput,
    embedding_block,
    featurize,
    scalar_row,
)
from citeqa.reward.model import RewardEnsemble, load_model, save_model
from citeqa.types import Candidate, Quote

# --- features.py ------------------------------------------------------------------------------


def _named(x: RewardInput) -> dict[str, float]:
    return dict(zip(SCALARS, scalar_row(x, FeatureSpec()).tolist(), strict=True))


def test_a_mean_log_probability_below_minus_ten_is_clipped_there() -> None:
    row = _named(RewardInput("q?", "a", "a b", logprob=-60.0, n_tokens=3))
    assert row["mean_logprob"] == -10.0
    assert row["logprob"] == pytest.approx(-6.0)


def test_no_generated_tokens_count_as_log1p_zero() -> None:
    assert _named(RewardInput("q?", "a", "a b", n_tokens=0))["log_n_tokens"] == 0.0


def test_answer_question_overlap_is_the_answers_share_found_in_the_question() -> None:
    """Of the answer's two content terms one is in the question (1/2); of the question's four
    terms one is in the answer (1/4): the arguments are not interchangeable."""
    x = RewardInput("Which river crosses the old capital city?", "Danube river", "quote")
    assert _named(x)["answer_question_overlap"] == pytest.approx(0.5)


def test_a_candidate_of_a_single_retriever_or_without_a_quote_reads_as_such() -> None:
    quote = Quote("Rollo swore fealty.", "d", "T", "t.txt", 0, 19)
    single = RewardInput.from_candidate("q?", Candidate("Rollo", quote, retrieval_score=0.9,
                                                        retrieval_fused=False))
    assert single.retrieval_score == 0.0  # a raw score is not on RRF's scale: lowest rank
    fused = RewardInput.from_candidate("q?", Candidate("Rollo", quote, retrieval_score=0.03))
    assert (fused.retrieval_score, fused.quote_valid, fused.title) == (0.03, True, "T")
    bare = RewardInput.from_candidate("q?", Candidate("Rollo", None))
    assert (bare.quote, bare.quote_valid) == ("", False)


def test_the_embedding_block_reads_no_quote_as_an_empty_text_and_distances_as_absolute() -> None:
    emb = HashEmbedder(16)
    items = [RewardInput("When did it open?", "in 1889", "", title="Tower"),
             RewardInput("When did it open?", "in 1889", "It opened in 1889.", title="Tower")]
    block = embedding_block(items, emb)
    q, a = emb.embed(["When did it open?"])[0], emb.embed(["in 1889"])[0]
    s = emb.embed(["Tower: It opened in 1889."])[0]
    d = 16
    assert np.allclose(block[0, d:2 * d], 0.0)  # q * s with s the embedding of "" (zeros)
    assert np.allclose(block[0, 3 * d:4 * d], np.abs(q))
    assert np.allclose(block[1, :d], q * a)
    assert np.allclose(block[1, 3 * d:4 * d], np.abs(q - s))
    assert (block[:, 3 * d:4 * d] >= 0).all()
    assert np.allclose(block[1, 4 * d:], [q @ a, q @ s, a @ s], atol=1e-6)


def test_featurize_refuses_an_embedder_of_another_width() -> None:
    spec = FeatureSpec(embedder="hash", embedding_dim=256)
    with pytest.raises(ValueError, match="256"):
        featurize([RewardInput("q?", "a", "a")], spec, HashEmbedder(16))
    assert featurize([RewardInput("q?", "a", "a")], spec, HashEmbedder()).shape == (1, spec.dim)


# --- model.py and legacy.py: the feature ensemble served through load_scorer ------------------


SCALAR_SPEC = FeatureSpec(embeddings=False)


def _ensemble(hidden: int, members: int = 3) -> RewardEnsemble:
    torch.manual_seed(0)
    m = RewardEnsemble(SCALAR_SPEC.dim, members, hidden)
    with torch.no_grad():
        m.mean.copy_(torch.linspace(-1, 1, SCALAR_SPEC.dim))
        m.std.copy_(torch.linspace(0.5, 3, SCALAR_SPEC.dim))
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m.eval()


def _by_hand(m: RewardEnsemble, x: torch.Tensor) -> torch.Tensor:
    """Members' logits [K, N], written out: standardise, then each member's head."""
    z = (x - m.mean) / m.std
    out = []
    for k in range(m.members):
        h = z @ m.w1[k] + m.b1[k]
        out.append(h[:, 0] if not m.hidden else torch.relu(h) @ m.w2[k] + m.b2[k])
    return torch.stack(out)


@pytest.mark.parametrize("hidden", [0, 4])
def test_the_ensemble_standardises_its_features_and_runs_each_member(hidden: int) -> None:
    m = _ensemble(hidden)
    x = torch.randn(5, SCALAR_SPEC.dim) * 3
    logits = m(x)
    assert torch.allclose(logits, _by_hand(m, x), atol=1e-5)
    assert (logits < 0).any()  # (a logistic member is linear: no ReLU on its one output)
    mean, std = m.predict(x)
    p = torch.sigmoid(logits)
    assert torch.allclose(mean, p.mean(0)) and torch.allclose(std, p.std(0, unbiased=False))


def test_an_ensemble_needs_a_member() -> None:
    with pytest.raises(ValueError, match="members=0"):
        RewardEnsemble(3, 0, 0)


def _saved(tmp_path: Path, hidden: int = 0, **extra: object) -> Path:
    out = tmp_path / "frm"
    save_model(out, _ensemble(hidden), SCALAR_SPEC, dict(extra))
    return out


def test_a_saved_ensemble_loads_back_and_a_mismatched_one_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path, hidden=4)
    model, spec, _ = load_model(d)
    x = torch.randn(4, spec.dim)
    assert torch.allclose(model(x), _ensemble(4)(x))
    config = json.loads((d / "config.json").read_text())
    bad = dict(config, features={**config["features"], "scalars": ["logprob", "no_such"]},
               dim=2)
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="unknown scalar features"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(dict(config, dim=config["dim"] + 1)))
    with pytest.raises(ModelError, match="columns"):
        load_model(d)
    # weights of another shape (a logistic model's beside a config saying hidden 4)
    (d / "config.json").write_text(json.dumps(config))
    save_model(tmp_path / "logistic", _ensemble(0), SCALAR_SPEC, {})
    (d / "model.safetensors").write_bytes((tmp_path / "logistic" / "model.safetensors")
                                          .read_bytes())
    with pytest.raises(ModelError, match="does not match"):
        load_model(d)
    # weights of the right shapes but one missing: not a head left at its random start
    from safetensors.torch import load_file, save_file

    save_model(tmp_path / "frm2", _ensemble(4), SCALAR_SPEC, {})
    tensors = load_file(str(tmp_path / "frm2" / "model.safetensors"))
    del tensors["b2"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match="does not match"):
        load_model(d)


CANDIDATES = [
    Candidate("in 1889", Quote("The tower opened in 1889.", "d", "Tower", "t.txt", 0, 25),
              logprob=-2.0, n_tokens=4, retrieval_score=2 / 61),
    Candidate("Paris", Quote("It stands in Paris.", "d", "Tower", "t.txt", 26, 45),
              logprob=-9.0, n_tokens=2, retrieval_score=2 / 70),
    Candidate("", None, logprob=-30.0, n_tokens=12),
]


def _expected(d: Path, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    model, spec, _ = load_model(d)
    x = featurize([RewardInput.from_candidate("When did the tower open?", c) for c in CANDIDATES],
                  spec, None)
    mean, std = model.predict(torch.from_numpy(x))
    return (mean - penalty * std).clamp(0, 1).numpy(), std.numpy()


@pytest.mark.parametrize("penalty", [None, 0.5, 40.0])
def test_a_feature_model_scores_its_mean_less_the_penalised_spread_within_0_and_1(
        tmp_path: Path, penalty: float | None) -> None:
    """Served through ``load_scorer`` (a format-1 directory): score = mean - penalty * std,
    clipped to [0, 1]; no penalty in the config means none; it loads no embedder when its
    features take none."""
    from citeqa.reward.scorer import load_scorer

    d = _saved(tmp_path, hidden=4, **({} if penalty is None else {"uncertainty_penalty": penalty}))
    scorer = load_scorer(str(d))
    scored = scorer.score("When did the tower open?", CANDIDATES)
    want, spread = _expected(d, penalty or 0.0)
    assert [c.score for c in scored] == pytest.approx(want.tolist(), abs=1e-6)
    assert [c.uncertainty for c in scored] == pytest.approx(spread.tolist(), abs=1e-6)
    assert all(0.0 <= c.score <= 1.0 for c in scored)
    if penalty == 40.0:
        assert min(c.score for c in scored) == 0.0  # clipped, not negative
    assert scorer.embedder is None
    assert scorer.score("q?", []) == []


def test_a_feature_model_reads_its_calibration(tmp_path: Path) -> None:
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import load_scorer, write_calibration

    d = _saved(tmp_path)
    scores = np.linspace(0.05, 0.95, 40)
    correct = scores > 0.3
    cal = calibrate_threshold(scores, correct, target_accuracy=0.8, delta=0.2)
    write_calibration(d, scores, correct, cal, min_answered=1, extra={})
    scorer = load_scorer(str(d))
    assert scorer.threshold == cal.threshold < math.inf


# --- calibrate.py -----------------------------------------------------------------------------


def test_a_stored_calibration_keeps_its_method_name() -> None:
    from citeqa.reward.calibrate import Calibration

    cal = Calibration(0.5, 0.8, 0.1, 0.5, 0.9, 10, 5, method="some other method")
    assert Calibration.from_json(cal.to_json()).method == "some other method"


# --- scorer.py: threshold_for, the grid, calibration.json --------------------------------------


def _calibrated(scores, correct, *, delta: float = 0.1, min_answered: int = 1):
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import Calibrated, CalibrationRecord

    cal = calibrate_threshold(scores, correct, target_accuracy=0.8, delta=delta,
                              min_answered=min_answered)
    out = Calibrated()
    out.directory = Path("fake")
    out.calibration = CalibrationRecord(cal, tuple(scores), tuple(correct), min_answered, {})
    return out


def test_threshold_for_reads_the_grid_point_at_or_above_the_target(monkeypatch) -> None:
    """0.07 / 0.01 is 7.000000000000001 in floats: still the seventh grid point, not the
    eighth; 0.99 is the last point (not inf); 0 is no target."""
    from citeqa.reward import scorer

    table = tuple(float(k) for k in range(scorer.GRID_POINTS))  # grid point k + 1 -> k
    monkeypatch.setattr(scorer, "_grid_thresholds", lambda *a: table)
    x = _calibrated([0.9, 0.1], [True, False])
    assert [x.threshold_for(t) for t in (0.07, 0.14, 0.28, 0.56)] == [6.0, 13.0, 27.0, 55.0]
    assert x.threshold_for(0.0701) == 7.0 and x.threshold_for(0.005) == 0.0
    assert x.threshold_for(0.99) == 98.0 and x.threshold_for(0.991) == math.inf
    for bad in (0.0, 1.0, -0.5, math.nan):
        with pytest.raises(ValueError, match="target accuracy"):
            x.threshold_for(bad)


def test_the_monotone_envelope_starts_at_050_itself(monkeypatch) -> None:
    """A target of exactly 0.50 whose own walk certified nothing takes the lowest threshold of
    a higher target (it is in the envelope); 0.49 keeps its own."""
    from citeqa.reward import scorer
    from citeqa.reward.calibrate import Calibration

    own = {0.49: 0.7, 0.5: math.inf, 0.51: 0.4, 0.52: 0.6}

    def fake(scores, correct, *, target_accuracy, delta, min_answered):
        t = own.get(target_accuracy, math.inf)
        return Calibration(t, target_accuracy, delta, 0.0, math.nan, 1, 0)

    monkeypatch.setattr(scorer, "calibrate_threshold", fake)
    table = scorer._grid_thresholds.__wrapped__((0.5,), (True,), 0.1, 1)
    assert table[48] == 0.7  # 0.49: its own
    assert table[49] == 0.4  # 0.50: 0.51's, lower than its own inf
    assert table[50] == 0.4 and table[51] == 0.6


def _write(d: Path, **changes: object) -> None:
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import write_calibration

    scores = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2] * 3
    correct = [True] * 18 + [False, True] * 6
    cal = calibrate_threshold(scores, correct, target_accuracy=0.8, delta=0.2)
    write_calibration(d, scores, correct, cal, min_answered=2, extra={})
    body = json.loads((d / "calibration.json").read_text())
    body.update(changes)
    (d / "calibration.json").write_text(json.dumps(body))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"scores": [1e999] + [0.5] * 29}, "NaN or inf"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 1.0}, "delta"),
    ({"target_accuracy": 1.0}, "target_accuracy"),
    ({"min_answered": 0}, "min_answered"),
    ({"correct": [1] * 30}, "true or false"),
    ({"correct": [True] * 29}, "30 scores but 29 labels"),
    ({"threshold": 0.1}, "outside the scores' range"),
])
def test_each_corruption_of_calibration_json_is_named(tmp_path: Path, changes, needle) -> None:
    from citeqa.reward.scorer import read_calibration

    _write(tmp_path, **changes)
    with pytest.raises(ModelError, match=needle.replace("'", ".")):
        read_calibration(tmp_path)


def test_a_threshold_at_the_lowest_or_highest_score_reads_back(tmp_path: Path) -> None:
    from citeqa.reward.scorer import read_calibration

    for t in (0.2, 0.95):
        _write(tmp_path, threshold=t)
        assert read_calibration(tmp_path).calibration.threshold == t


def test_calibration_json_is_strict_json_with_null_for_no_quote(tmp_path: Path) -> None:
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import read_calibration, write_calibration

    scores, correct = [0.9, 0.8, -math.inf] * 10, [True, True, False] * 10
    cal = calibrate_threshold(scores, correct, target_accuracy=0.6, delta=0.2)
    write_calibration(tmp_path, scores, correct, cal, min_answered=1, extra={})

    def refuse(name: str) -> float:
        raise ValueError(f"not JSON: {name}")

    body = json.loads((tmp_path / "calibration.json").read_text(), parse_constant=refuse)
    assert body["scores"][2] is None
    assert read_calibration(tmp_path).scores[2] == -math.inf


def test_best_per_question_skips_nan_scores_and_a_question_without_a_quote_is_wrong() -> None:
    from citeqa.reward.scorer import best_per_question

    scores, correct = best_per_question([
        [(math.nan, True, False), (0.4, True, True)],
        [(0.9, False, True), (math.nan, True, True)],
    ])
    assert scores[0] == 0.4 and correct[0]
    assert scores[1] == -math.inf and not correct[1]


# --- verifier.py: the network ----------------------------------------------------------------


PASSAGE = ("The Normans gave their name to Normandy, a region in France. Their leader Rollo swore "
           "fealty to King Charles III. The Norman dynasty shaped medieval Europe.")


def _items():
    from citeqa.reward.verifier import Judged

    quote = "Their leader Rollo swore fealty to King Charles III."
    return [Judged("Who led the Normans?", "Rollo", quote, "Normans", "The Normans gave.", ""),
            Judged("Who led the Normans, and whom did he swear fealty to in the end?",
                   "Napoleon", quote, "Normans", PASSAGE, PASSAGE)]


def test_the_verifier_reads_cls_the_answers_span_and_no_answer_through_each_head(
        tiny_encoder, tokenizer) -> None:
    """Written out by hand: an answer the quote does not hold gives its heads no span score
    (0, not the [CLS] score), the no-answer score is log P(start at [CLS]) + log P(end at
    [CLS]), and padding is out of both the start and the end distributions."""
    import torch.nn.functional as F

    from citeqa.reward.verifier import Verifier, encode

    model = Verifier(tiny_encoder(len(tokenizer)), members=3, hidden=8).eval()
    batch = encode(tokenizer, _items())
    assert batch.answer_tokens[0, 0] > 0 and batch.answer_tokens[1].tolist() == [0, 0]
    assert (batch.attention_mask[0] == 0).any()  # the first row is padded
    with torch.no_grad():
        logits, start, end = model(batch)
        hidden = model.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               token_type_ids=batch.token_type_ids).last_hidden_state
    pad = batch.attention_mask == 0
    assert (start[pad] == -1e4).all() and (end[pad] == -1e4).all()
    log_s, log_e = F.log_softmax(start, -1), F.log_softmax(end, -1)
    w1, b1, w2, b2 = (p.detach() for p in (model.w1, model.b1, model.w2, model.b2))
    for n in range(2):
        first, last = batch.answer_tokens[n].tolist()
        span = (log_s[n, first] + log_e[n, last]) if first else torch.tensor(0.0)
        null = log_s[n, 0] + log_e[n, 0]
        f = torch.cat([hidden[n, 0], span[None], null[None]])
        for k in range(3):
            h = torch.relu(f @ w1[k] + b1[k])
            assert float(logits[k, n]) == pytest.approx(float(h @ w2[k] + b2[k]), abs=1e-4)
    mean, std = model.predict(batch)
    p = torch.sigmoid(logits)
    assert torch.allclose(std, p.std(0, unbiased=False))  # the members' population spread
    with pytest.raises(ValueError, match="at least one member"):
        Verifier(tiny_encoder(len(tokenizer)), members=0)


# --- answerability.py ------------------------------------------------------------------------


def test_the_reader_is_a_linear_head_on_the_cls_state(tiny_encoder, tokenizer) -> None:
    from citeqa.reward.answerability import Answerability, encode

    model = Answerability(tiny_encoder(len(tokenizer))).eval()
    inputs = encode(tokenizer, _items())
    with torch.no_grad():
        cls = model.encoder(**inputs).last_hidden_state[:, 0]
        assert torch.allclose(model(inputs), model.head(cls)[:, 0], atol=1e-6)


def test_the_readers_view_is_cut_only_as_far_as_the_question_and_quote_need(tokenizer) -> None:
    """The answer is never shown to the reader, so it takes no room from the passage before
    the quote: a long answer leaves the view as long as a short one does."""
    from citeqa.reward.answerability import encode
    from citeqa.reward.verifier import Judged

    quote = "Their leader Rollo swore fealty to King Charles III."
    lengths = []
    for answer in ("Rollo", "Rollo, the leader of the Normans who swore fealty to King "
                            "Charles III of West Francia in the year nine hundred and eleven"):
        x = Judged("Who led the Normans?", answer, quote, "Normans", PASSAGE * 6, "")
        inputs = encode(tokenizer, [x], max_tokens=96)
        lengths.append(int(inputs["attention_mask"][0].sum()))
    assert lengths[0] == lengths[1] >= 90


# --- lean_encoder.py -------------------------------------------------------------------------


def test_an_encoder_without_layers_or_off_the_cpu_keeps_transformers_forward() -> None:
    from transformers import BertConfig, BertModel

    from citeqa.lean_encoder import LeanEncoder, use_lean_encoder

    sizes = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                 max_position_embeddings=32)
    empty = BertModel(BertConfig(num_hidden_layers=0, **sizes)).eval()
    assert not LeanEncoder.supports(empty) and use_lean_encoder(empty) is empty
    with torch.device("meta"):
        elsewhere = BertModel(BertConfig(num_hidden_layers=1, **sizes)).eval()
    assert not LeanEncoder.supports(elsewhere)


# --- scorer.py: what a scorer reads of its directory ------------------------------------------


def test_the_verifier_alone_reads_neither_combination_nor_calibration(
        tiny_encoder, tokenizer, tmp_path: Path) -> None:
    """``combined=False`` (what `citeqa train reward-combine` loads) ignores combine.json and
    the calibration made on the combined scores; with both, no candidates are no scores."""
    from citeqa.reward.checkpoint import save_verifier
    from citeqa.reward.combine import fit, write_combiner
    from citeqa.reward.scorer import VerifierScorer
    from citeqa.reward.verifier import Verifier

    rm = tmp_path / "rm"
    save_verifier(rm, Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    write_combiner(rm, fit(x, (x[:, 0] > 0).astype(int)))
    _write(rm)
    both = VerifierScorer(rm, cpu_dtype="fp32")
    assert both.combiner is not None and both.calibration is not None
    scores, spread = both.judge([], [])
    assert scores.shape == spread.shape == (0,)
    alone = VerifierScorer(rm, cpu_dtype="fp32", combined=False)
    assert alone.combiner is None and alone.calibration is None
    uncalibrated = VerifierScorer(rm, cpu_dtype="fp32", calibrated=False)
    assert uncalibrated.combiner is not None and uncalibrated.calibration is None
