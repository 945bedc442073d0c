"""citeqa.reward: the reward model that judges (question, answer, quote), reranks candidates and
declines below a calibrated threshold.

    candidate + the passage around its quote -> verifier.Verifier (a fine-tuned cross-encoder
    with a reader head and K verifier heads) -> score = mean probability, uncertainty = spread
    -> [combine.Combiner: with the generator's log-probabilities and the retrieval score, when
    the directory holds combine.json] -> threshold from calibrate.calibrate_threshold
    (Learn-then-Test) -> answer or decline
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from citeqa.lazy import lazy_dir, lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see; at run time, the lazy import below
    from citeqa.reward.calibrate import Calibration, calibrate_threshold
    from citeqa.reward.checkpoint import load_verifier, save_verifier
    from citeqa.reward.data import Example, VerifierData, load_verifier_data
    from citeqa.reward.scorer import VerifierScorer, load_scorer
    from citeqa.reward.train import TrainConfig, train_verifier
    from citeqa.reward.verifier import Judged, Verifier

# Re-exported lazily (PEP 562): importing a submodule, such as the CLI's commands, must not load
# torch through this package's own import.
_HOMES = {
    "Calibration": "calibrate",
    "calibrate_threshold": "calibrate",
    "load_verifier": "checkpoint",
    "save_verifier": "checkpoint",
    "Example": "data",
    "VerifierData": "data",
    "load_verifier_data": "data",
    "VerifierScorer": "scorer",
    "load_scorer": "scorer",
    "TrainConfig": "train",
    "train_verifier": "train",
    "Judged": "verifier",
    "Verifier": "verifier",
}

__all__ = [  # a literal list: type checkers read no other (checked: tests/test_package.py)
    "Calibration", "Example", "Judged", "TrainConfig", "Verifier", "VerifierData",
    "VerifierScorer", "calibrate_threshold", "load_scorer", "load_verifier", "load_verifier_data",
    "save_verifier", "train_verifier",
]
__getattr__ = lazy_exports(__name__, _HOMES)
__dir__ = lazy_dir(__name__, _HOMES)
