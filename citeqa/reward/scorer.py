"""The reward scorer the pipeline uses: a trained verifier (verifier.py) with its calibrated
decline threshold, and ``load_scorer`` which resolves a reward-model name to one.

``VerifierScorer.score`` fills ``Candidate.score`` (the mean of the ensemble members'
probabilities that the answer is right and supported by its quote) and ``Candidate.uncertainty``
(their spread: the verifier's, on the verifier's own probability scale, also where
``combine.json`` makes the served score a combination of it with other signals), reading each
candidate with the passage around its quote. ``threshold`` is the
Learn-then-Test threshold stored in ``calibration.json``; ``threshold_for(target)`` recalibrates
from the per-question (score, correct) pairs kept there, so a request may ask for its own
target accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from citeqa.atomic import write_text_atomic
from citeqa.compute import compiled, to_serving_dtype
from citeqa.errors import ModelError
from citeqa.lean_encoder import use_lean_encoder
from citeqa.reward.answerability import SUBDIR, AnswerabilityReader
from citeqa.reward.calibrate import METHOD, Calibration, calibrate_threshold
from citeqa.reward.checkpoint import (
    RETRAIN,
    check_finished,
    load_verifier,
    max_tokens_of,
    read_config_json,
)
from citeqa.reward.combine import Signals, features, read_combiner
from citeqa.reward.verifier import MAX_TOKENS, Judged, around, encode
from citeqa.types import Candidate, Document

logger = logging.getLogger(__name__)

CALIBRATION = "calibration.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "weights"  # the shipped reward model
TARGET_GRID = 0.01  # threshold_for is made monotone over targets on this grid
GRID_POINTS = 99  # its targets below 1: 0.01 ... 0.99
SCORE_BATCH = 16  # candidates encoded together
# What ``VerifierScorer.compile`` scores to build its kernels: lengths that differ, so that the
# compiled graphs take the sequence length as a variable.
WARM_UP_ITEMS = tuple(
    Judged("When was the bridge finished?", "in 1890", f"The bridge was finished in 1890{more}.",
           "Bridge", "It spans the river. " * n, " It is still in use." * n)
    for n, more in ((1, ""), (4, " after seven years of work"), (9, " by two companies")))


def judged(question: str, c: Candidate, documents: Callable[[str], Document] | None) -> Judged:
    """How the verifier reads a candidate: with the passage around its quote."""
    if c.quote is None:
        return Judged(question, c.answer, "")
    before = after = ""
    if documents is not None:
        try:
            text = documents(c.quote.doc_id).text
        except KeyError:
            text = ""
        if text:
            before, after = around(text, c.quote.start, c.quote.end)
    return Judged(question, c.answer, c.quote.text, c.quote.title, before, after)


class Calibrated:
    """The decline thresholds of a reward model with ``directory`` and ``calibration`` (the
    record read from its calibration.json, or None)."""

    directory: Path
    calibration: CalibrationRecord | None

    @property
    def threshold(self) -> float | None:
        """The calibrated decline threshold (None when the model was never calibrated)."""
        if self.calibration is None:
            return None
        return self.calibration.calibration.threshold

    def threshold_for(self, target_accuracy: float) -> float:
        """The decline threshold guaranteeing ``target_accuracy`` (with the stored delta).

        Raises ModelError when the model was never calibrated, ValueError for a target
        outside (0, 1). The thresholds of the 0.01 grid's 99 targets are searched once per
        calibration (``_grid_thresholds``; monotone from 0.50 up: asking for more accuracy
        never answers more questions); a target off the grid takes the next grid point's
        threshold, which certifies it too (0.8123 gets 0.82's), and one above 0.99 gets inf:
        nothing here certifies it. So requests with ever new targets cost a lookup each.
        """
        target = float(target_accuracy)
        if not 0.0 < target < 1.0:  # NaN included
            raise ValueError(f"target accuracy must be in (0, 1), got {target_accuracy}")
        if self.calibration is None:
            raise ModelError(
                f"{self.directory} has no {CALIBRATION}; run `citeqa calibrate --reward "
                f"{self.directory} --data FILE` first"
            )
        # the grid point at or above the target (the first one for a target below it)
        k = max(1, math.ceil(round(target / TARGET_GRID, 6)))
        if k > GRID_POINTS:
            return math.inf
        cal = self.calibration
        with _GRID_LOCK:
            table = _grid_thresholds(cal.scores, cal.correct, cal.calibration.delta,
                                     cal.min_answered)
        return table[k - 1]


class VerifierScorer(Calibrated):
    """Scores candidates with a verifier directory (checkpoint.py has its layout)."""

    def __init__(self, directory: Path, *, cpu_dtype: str = "auto", lean: bool = True,
                 combined: bool = True, calibrated: bool = True) -> None:
        """``lean``: run the cross-encoders with ``LeanEncoder`` where it supports them (a BERT
        encoder on the CPU, in bf16 or fp32: lean_encoder.py), else with transformers'
        forward. ``combined=False``: the verifier alone, its combine.json and calibration.json
        not read (what `citeqa train reward-combine` refits and removes, however broken or
        stale they are). ``calibrated=False``: calibration.json not read (what `citeqa
        calibrate` writes anew, however broken it is)."""
        self.directory = Path(directory)
        self.model, self.tokenizer, self.config = load_verifier(self.directory)
        check_finished(self.directory, self.config, command="citeqa train reward")
        self.max_tokens = max_tokens_of(self.directory, self.config, self.model.encoder,
                                        MAX_TOKENS, RETRAIN)
        self.dtype = to_serving_dtype(self.model.encoder, cpu_dtype)
        self.model.encoder = use_lean_encoder(self.model.encoder, lean)
        self._lock = threading.Lock()  # torch modules are not promised to be thread-safe
        self.calibration = read_calibration(self.directory) if combined and calibrated else None
        self.combiner = read_combiner(self.directory) if combined else None  # when fitted
        self.answerability = None
        if self.combiner is not None and self.combiner.uses_answerability:
            if not (self.directory / SUBDIR).is_dir():
                raise ModelError(f"{self.directory / 'combine.json'} combines an answerability "
                                 f"reader, but {self.directory / SUBDIR} is missing; train it "
                                 "with `citeqa train answerability` or refit the combination")
            self.answerability = AnswerabilityReader(self.directory / SUBDIR,
                                                     cpu_dtype=cpu_dtype, lean=lean)
        self.name = f"verifier ({self.config.get('base', 'cross-encoder')}, {self.dtype})" + (
            " + generator signals" if self.combiner is not None else "") + (
            " + answerability" if self.answerability is not None else "")

    def compile(self) -> float:
        """Compile the cross-encoders (``compute.compiled``) and build their kernels now, by
        scoring made-up candidates one and three at a time, so that no user waits for it; where
        that fails (no C++ compiler, an operation inductor cannot lower) put the eager encoders
        back and log why. Returns the seconds it took."""
        t0 = time.perf_counter()
        models = [self.model] + ([self.answerability.model] if self.answerability else [])
        eager = [m.encoder for m in models]
        try:
            for m in models:  # transformers' forward: LeanEncoder's shapes depend on the data
                m.encoder = compiled(getattr(m.encoder, "wrapped", m.encoder))
            for items in (WARM_UP_ITEMS[:1], WARM_UP_ITEMS):
                self.predict(items)
                if self.answerability is not None:
                    self.answerability.logits(items)
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: serve eagerly
            for m, encoder in zip(models, eager, strict=True):
                m.encoder = encoder
            logger.warning("compiling the reward model failed; it scores eagerly: %s", exc)
        else:
            self.name += ", compiled"
        return time.perf_counter() - t0

    def predict(self, items: Sequence[Judged]) -> tuple[np.ndarray, np.ndarray]:
        """(score [N], uncertainty [N]) in [0, 1]; an item without a quote scores 0."""
        scores, spread = np.zeros(len(items)), np.zeros(len(items))
        rows = [i for i, x in enumerate(items) if x.quote]
        for at in range(0, len(rows), SCORE_BATCH):
            chunk = rows[at : at + SCORE_BATCH]
            batch = encode(self.tokenizer, [items[i] for i in chunk], max_tokens=self.max_tokens)
            with self._lock, torch.inference_mode():
                mean, std = self.model.predict(batch)
            scores[chunk], spread[chunk] = mean.float().numpy(), std.float().numpy()
        return scores, spread

    def judge(self, items: Sequence[Judged], signals: Sequence[Signals]
              ) -> tuple[np.ndarray, np.ndarray]:
        """(score, uncertainty) as served: the verifier's, combined with each candidate's
        generator and retrieval signals where ``combine.json`` says how (combine.py)."""
        scores, spread = self.predict(items)
        if self.combiner is not None and len(items):
            quoted = np.array([bool(x.quote) for x in items])
            answerability = None
            if self.answerability is not None:
                answerability = np.zeros(len(items))
                rows = np.flatnonzero(quoted)
                answerability[rows] = self.answerability.logits([items[i] for i in rows.tolist()])
            combined = self.combiner(features(scores, signals, answerability))
            scores = np.where(quoted, combined, 0.0)
        return scores, spread

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: Callable[[str], Document] | None = None) -> list[Candidate]:
        """The candidates in order with ``score`` and ``uncertainty`` filled in."""
        t0 = time.perf_counter()
        scores, spread = self.judge(
            [judged(question, c, documents) for c in candidates],
            [Signals.of_candidate(c) for c in candidates])
        logger.debug("scored %d candidates in %.1f ms", len(candidates),
                     (time.perf_counter() - t0) * 1000)
        return [replace(c, score=float(s), uncertainty=float(u))
                for c, s, u in zip(candidates, scores, spread, strict=True)]


_GRID_LOCK = threading.Lock()  # one search per calibration, however many requests wait for it


@lru_cache(maxsize=8)
def _grid_thresholds(
    scores: tuple[float, ...],
    correct: tuple[bool, ...],
    delta: float,
    min_answered: int,
) -> tuple[float, ...]:
    """The threshold of every grid target k * TARGET_GRID below 1 (one Learn-then-Test search
    each, ~0.9 s in all for the shipped 794 answers on 2 cores): from 0.50 up, monotone, so
    that asking for more accuracy never answers more questions; below 0.50, each target's own.

    The monotone envelope: each target from 0.50 up takes the lowest threshold certified for it
    or for any higher target (one certified for a higher accuracy certifies its own too), inf
    where none is. Every value is so certified for its target; a running maximum of the
    targets' own thresholds was monotone too but could hand a target a threshold certified only
    for a lower one (a walk ending early above a block of tied scores: 4 answers, "certified"
    for 0.9 with p = 0.66); and a walk that fails at its start (it starts at the fewest
    answers that can pass) leaves its target the threshold of a higher one."""
    out: list[float] = []
    for k in range(1, GRID_POINTS + 1):
        target = round(k * TARGET_GRID, 6)
        out.append(calibrate_threshold(scores, correct, target_accuracy=target, delta=delta,
                                       min_answered=min_answered).threshold)
    lowest = math.inf  # the lowest threshold certified for this target or a higher one
    for i in range(len(out) - 1, -1, -1):
        if round((i + 1) * TARGET_GRID, 6) < 0.5:
            break
        lowest = out[i] = min(lowest, out[i])
    return tuple(out)


# --- calibration.json ---------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_calibration(
    directory: Path,
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    calibration: Calibration,
    *,
    min_answered: int,
    extra: dict[str, Any],
) -> Path:
    """Write calibration.json: the result plus every per-question (score, correct) pair.

    A question whose best candidate had no verified quote is always declined; its score is
    stored as null (minus infinity).
    """
    body = {
        "format": 1,
        "method": METHOD,
        **calibration.to_json(),
        "min_answered": min_answered,
        **extra,
        "scores": [_finite_or_none(float(s)) for s in scores],
        "correct": [bool(c) for c in correct],
    }
    path = Path(directory) / CALIBRATION
    write_text_atomic(path, json.dumps(body, indent=1) + "\n")
    return path


@dataclass(frozen=True)
class CalibrationRecord:
    """A reward model's calibration.json, parsed."""

    calibration: Calibration  # the stored Learn-then-Test result
    scores: tuple[float, ...]  # per calibration question: the best candidate's score
    correct: tuple[bool, ...]  # per calibration question: was that answer correct
    min_answered: int  # the smallest answered set a threshold may certify
    body: dict[str, Any]  # the whole file, for reports


def read_calibration(directory: Path) -> CalibrationRecord | None:
    """The parsed calibration.json of a reward-model directory (None when there is none)."""
    path = Path(directory) / CALIBRATION
    if not path.is_file():
        logger.warning("%s has no %s: no decline threshold; run `citeqa calibrate`", directory,
                       CALIBRATION)
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        scores = [-math.inf if s is None else float(s) for s in body["scores"]]
        if not all(isinstance(c, bool) for c in body["correct"]):
            raise ValueError("a label in 'correct' is not true or false")
        correct = list(body["correct"])
        calibration = Calibration.from_json(body)
        min_answered = int(body["min_answered"])
        # what every later threshold search needs, checked here: a bad file is the server's
        # fault, not a 400 for each request that names a target
        if any(math.isnan(s) or s == math.inf for s in scores):
            raise ValueError("a score is NaN or inf")
        if not 0.0 < calibration.delta < 1.0 or not 0.0 < calibration.target_accuracy < 1.0:
            raise ValueError("delta and target_accuracy must be between 0 and 1")
        if min_answered < 1 or not scores:
            raise ValueError("min_answered must be at least 1, and scores not empty")
        finite = [s for s in scores if s > -math.inf]
        t = calibration.threshold  # one of the scores, or inf (none certified)
        if t != math.inf and not (finite and min(finite) <= t <= max(finite)):
            raise ValueError(f"the threshold {t} lies outside the scores' range "
                             f"(null would mean none certified)")
    except (ValueError, KeyError, TypeError, OverflowError) as e:  # (int(1e400))
        raise ModelError(
            f"{path} is corrupt ({e!r}); rerun `citeqa calibrate --reward {directory} --data FILE`"
        ) from None
    if len(scores) != len(correct):
        raise ModelError(f"{path} is corrupt: {len(scores)} scores but {len(correct)} labels")
    return CalibrationRecord(calibration, tuple(scores), tuple(correct), min_answered, body)


def load_scorer(name: str | None, *, cpu_dtype: str = "auto", compile: bool = False) -> Any:
    """The scorer called ``name``: "default" (the shipped weights in citeqa/reward/weights),
    a reward-model directory, or None (no reward model). Nothing is ever downloaded. With
    ``compile``, a verifier's encoders are compiled and warmed up before it is returned
    (``VerifierScorer.compile``)."""
    if name is None:
        return None
    directory = DEFAULT_DIR if name == "default" else Path(name)
    if name == "default" and not (directory / "config.json").is_file():
        raise ModelError(
            f"the default reward model is missing from {directory}; reinstall citeqa, or set "
            "the reward model to a directory from `citeqa train reward` (or none)"
        )
    config = read_config_json(directory)  # which kind of reward model: format 1 or a verifier
    if config.get("format") == 1:  # the feature-based model of earlier releases
        from citeqa.reward.legacy import RewardScorer

        if compile:
            logger.warning("%s is a feature-based reward model: nothing to compile", directory)
        return RewardScorer(directory)
    scorer = VerifierScorer(directory, cpu_dtype=cpu_dtype)
    if compile:
        logger.info("compiling the reward model (about a minute on 2 cores)")
        seconds = scorer.compile()
        logger.info("reward model ready: %s, in %.1f s", scorer.name, seconds)
    return scorer


def best_per_question(
    groups: Sequence[Sequence[tuple[float, bool, bool]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Per question, the (score, correct) of the candidate the pipeline would answer with.

    Each group holds one question's candidates as ``(score, quote_valid, correct)``. The
    pipeline answers with the best-scored verified candidate, leaving NaN-scored ones out
    (``pipeline._no_nan_scores``); with none verified it always declines, so that question's
    score is minus infinity (never answered).
    """
    scores, correct = [], []
    for group in groups:
        valid = [(s, c) for s, v, c in group if v and not math.isnan(s)]
        if valid:
            s, c = max(valid, key=lambda sc: sc[0])
            scores.append(s)
            correct.append(c)
        else:
            scores.append(-math.inf)
            correct.append(False)
    return np.array(scores, dtype=float), np.array(correct, dtype=bool)
