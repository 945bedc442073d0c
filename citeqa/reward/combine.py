"""The verifier's judgement combined with what the generator and the retriever said.

The verifier reads text only, so that any generator can be judged. Where calibration data shows
that the generator's own confidence and the retrieval score add to it, a logistic regression
over four inputs turns them into one probability:

    verifier logit, mean token log-probability, log(1 + generated tokens), retrieval score

and a fifth where the reward-model directory holds an answerability reader
(``answerability.py``): its logit that the quoted passage answers the question at all.

It is fitted (``fit``) on generator candidates of questions the verifier never trained on, and
stored beside the verifier as ``combine.json``. A candidate without a generator signal (an
engine that returns no log-probabilities: ``n_tokens == 0``) gets the fitted mean for the
generator's inputs, so its score stays on the same scale and the calibrated threshold applies.
Pure numpy: no torch, no I/O beyond reading and writing that file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from citeqa.atomic import write_text_atomic
from citeqa.errors import ModelError
from citeqa.types import Candidate

COMBINE = "combine.json"
INPUTS = ("verifier_logit", "mean_logprob", "log_tokens", "retrieval_score")
ANSWERABILITY = "answerability_logit"  # the optional fifth input
WITH_ANSWERABILITY = (*INPUTS, ANSWERABILITY)
LOGIT_CLIP = 1e-4  # probabilities are clipped to [clip, 1 - clip] before the logit
MEAN_LOGPROB_FLOOR = -5.0


@dataclass(frozen=True)
class Signals:
    """What the pipeline knows of a candidate besides its text."""

    mean_logprob: float = 0.0
    n_tokens: int = 0  # 0: the generator gave no log-probabilities
    # the fused (RRF) score the combination was fitted on; NaN (counted as its fitted mean)
    # where one retriever alone ordered the hits and its raw score is on another scale
    retrieval_score: float = 0.0

    @classmethod
    def of(cls, d: dict[str, float]) -> Signals:
        """From a reward-data record's ``signals`` (an empty dict, as synthetic and red-team
        records have: nothing known; a record without ``retrieval_fused`` comes from a fused
        search)."""
        return cls(float(d.get("mean_logprob", 0.0)), int(d.get("n_tokens", 0)),
                   _retrieval(float(d.get("retrieval_score", math.nan)),
                              bool(d.get("retrieval_fused", True))))

    @classmethod
    def of_candidate(cls, c: Candidate) -> Signals:
        """A served candidate's signals."""
        return cls(c.mean_logprob, c.n_tokens, _retrieval(c.retrieval_score, c.retrieval_fused))


def _retrieval(score: float, fused: bool) -> float:
    return score if fused else math.nan


def features(verifier_p: Sequence[float] | np.ndarray, signals: Sequence[Signals],
             answerability: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """[N, 4] inputs (INPUTS order), [N, 5] with the answerability logits (WITH_ANSWERABILITY);
    generator inputs are NaN where the generator said nothing, the retrieval input where the
    score is not a fused one (``Signals``): the combination counts a NaN as its fitted mean."""
    p = np.clip(np.asarray(verifier_p, dtype=float), LOGIT_CLIP, 1 - LOGIT_CLIP)
    if len(signals) != len(p):  # (np.empty's rows past the signals held whatever was there)
        raise ValueError(f"{len(p)} verifier probabilities but {len(signals)} signals")
    out = np.empty((len(p), len(INPUTS) + (answerability is not None)))
    out[:, 0] = np.log(p / (1 - p))
    for i, s in enumerate(signals):
        has = s.n_tokens > 0
        out[i, 1] = max(float(s.mean_logprob), MEAN_LOGPROB_FLOOR) if has else math.nan
        out[i, 2] = math.log1p(s.n_tokens) if has else math.nan
        out[i, 3] = float(s.retrieval_score)
    if answerability is not None:
        out[:, 4] = np.asarray(answerability, dtype=float)
    return out


@dataclass(frozen=True)
class Combiner:
    """A fitted logistic regression over standardised ``inputs``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    n: int = 0  # candidates it was fitted on
    extra: dict[str, Any] | None = None  # what it was fitted on, its fit figures
    inputs: tuple[str, ...] = INPUTS  # INPUTS or WITH_ANSWERABILITY

    @property
    def uses_answerability(self) -> bool:
        return ANSWERABILITY in self.inputs

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [N] for inputs [N, len(inputs)]; a NaN generator or retrieval input
        (one that said nothing) counts as its mean, but a NaN from a model (the verifier, the
        answerability reader) is a failure: that row's probability is NaN, not a plausible
        mid-range score (the pipeline scores NaN 0 and logs it)."""
        x = np.asarray(x, dtype=float)
        p = 1.0 / (1.0 + np.exp(-(self.shares(x).sum(axis=1) + self.bias)))
        models = [self.inputs.index(n) for n in (INPUTS[0], ANSWERABILITY) if n in self.inputs]
        failed = np.isnan(x[:, models]).any(axis=1) if len(x) else np.zeros(0, bool)
        return np.where(failed, np.nan, p)

    def shares(self, x: np.ndarray) -> np.ndarray:
        """Each input's share of the logit [N, len(inputs)]: its weight times its standardised
        value, 0 for a NaN input (counted as its mean). Their sum plus ``bias`` is the logit."""
        z = (np.asarray(x, dtype=float) - np.array(self.mean)) / np.array(self.std)
        return np.where(np.isnan(z), 0.0, z) * np.array(self.weights)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("inputs")
        return {"format": 1, "inputs": list(self.inputs), **body}


def fit(x: np.ndarray, y: Sequence[int] | np.ndarray, *, l2: float = 1e-2, iters: int = 50,
        extra: dict[str, Any] | None = None) -> Combiner:
    """Fit by Newton's method with an L2 penalty on the weights (not the bias). Rows whose
    generator inputs are NaN count with those inputs at their mean."""
    x, labels = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 10 or labels.min() == labels.max():
        raise ValueError(f"fitting needs >= 10 candidates with both labels, got {len(x)} "
                         f"({int(labels.sum())} right)")
    said = ~np.isnan(x).all(axis=0)  # an input no candidate gave (a generator without
    # log-probabilities): mean 0 and std 1, which a NaN input ignores anyway (JSON has no NaN)
    mean = np.zeros(x.shape[1])
    std = np.ones(x.shape[1])
    mean[said], std[said] = np.nanmean(x[:, said], axis=0), np.nanstd(x[:, said], axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    z = np.where(np.isnan(x), 0.0, (x - mean) / std)
    a = np.c_[z, np.ones(len(z))]
    w = np.zeros(a.shape[1])
    penalty = np.diag([l2] * z.shape[1] + [0.0]) * len(z)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ w)))
        grad = a.T @ (p - labels) + penalty @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    inputs = INPUTS if x.shape[1] == len(INPUTS) else WITH_ANSWERABILITY
    return Combiner(tuple(map(float, mean)), tuple(map(float, std)),
                    tuple(map(float, w[:-1])), float(w[-1]), len(x), extra, inputs)


def write_combiner(directory: Path, combiner: Combiner) -> Path:
    """Write ``combine.json`` into a reward-model directory (atomically)."""
    path = Path(directory) / COMBINE
    write_text_atomic(path, json.dumps(combiner.to_json(), indent=1) + "\n")
    return path


def read_combiner(directory: Path) -> Combiner | None:
    """The combiner stored in a reward-model directory; None when there is none."""
    path = Path(directory) / COMBINE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        inputs = tuple(body.get("inputs") or ())
        if inputs not in (INPUTS, WITH_ANSWERABILITY):
            raise ValueError(f"inputs {list(inputs)} are neither {list(INPUTS)} nor "
                             f"{list(WITH_ANSWERABILITY)}")
        combiner = Combiner(tuple(map(float, body["mean"])), tuple(map(float, body["std"])),
                            tuple(map(float, body["weights"])), float(body["bias"]),
                            int(body.get("n", 0)), body.get("extra"), inputs)
        if not len(combiner.mean) == len(combiner.std) == len(combiner.weights) == len(inputs):
            raise ValueError("mean, std and weights need one value per input")
        numbers = (*combiner.mean, *combiner.std, *combiner.weights, combiner.bias)
        if not all(map(math.isfinite, numbers)) or min(combiner.std) <= 0:
            raise ValueError("its numbers must be finite, and every std above 0")
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise ModelError(f"{path} is corrupt ({e}); refit it with `citeqa train reward-combine "
                         f"--reward {directory} --data FILE` or delete it") from None
    return combiner
