"""The feature-based reward model of earlier releases (format 1; the default until the verifier
replaced it), kept so that such directories still load (CITEQA_REWARD=DIR), as
evals/results/previous_rm/ does. Its training code went with 85b0264, and evals/reward_eval.py,
which trained and measured it and no longer ran without that code, with 1362b29 (`git show
85b0264^:evals/reward_eval.py`). Scheduled for removal with such directories."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from citeqa.retrieval.embed import Embedder, load_embedder
from citeqa.reward.features import RewardInput, featurize
from citeqa.reward.model import load_model
from citeqa.reward.scorer import Calibrated, read_calibration
from citeqa.types import Candidate


class RewardScorer(Calibrated):
    """Scores candidates with a reward-model directory (see model.py for its layout)."""

    def __init__(self, directory: Path, embedder: Embedder | None = None) -> None:
        self.directory = Path(directory)
        self.model, self.spec, self.config = load_model(self.directory)
        self.uncertainty_penalty = float(self.config.get("uncertainty_penalty", 0.0))
        self._embedder = embedder
        self._lock = threading.Lock()
        self.calibration = read_calibration(self.directory)

    @property
    def embedder(self) -> Embedder | None:
        if self.spec.embeddings and self._embedder is None:
            self._embedder = load_embedder(self.spec.embedder)
        return self._embedder

    def predict(self, inputs: Sequence[RewardInput]) -> tuple[np.ndarray, np.ndarray]:
        """(score [N], uncertainty [N]) for raw inputs; scores in [0, 1]."""
        if not inputs:
            return np.zeros(0), np.zeros(0)
        x = torch.from_numpy(featurize(inputs, self.spec, self.embedder))
        with self._lock:  # torch modules are not promised to be thread-safe
            mean, std = self.model.predict(x)
        score = (mean - self.uncertainty_penalty * std).clamp(0.0, 1.0)
        return score.numpy().astype(float), std.numpy().astype(float)

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: object = None) -> list[Candidate]:
        """The candidates in order with ``score`` and ``uncertainty`` filled in (this model
        reads no passage: ``documents`` is ignored)."""
        inputs = [RewardInput.from_candidate(question, c) for c in candidates]
        scores, spread = self.predict(inputs)
        return [
            replace(c, score=float(s), uncertainty=float(u))
            for c, s, u in zip(candidates, scores, spread, strict=True)
        ]
