"""citeqa.reward: the reward model that judges (question, answer, quote), reranks candidates and
declines below a calibrated threshold.

    candidate + the passage around its quote -> verifier.Verifier (a fine-tuned cross-encoder
    with a reader head and K verifier heads) -> score = mean probability, uncertainty = spread
    -> [combine.Combiner: with the generator's log-probabilities and the retrieval score, when
    the directory holds combine.json] -> threshold from calibrate.calibrate_threshold
    (Learn-then-Test) -> answer or decline
"""

from citeqa.reward.calibrate import Calibration, calibrate_threshold
from citeqa.reward.checkpoint import load_verifier, save_verifier
from citeqa.reward.data import Example, VerifierData, load_verifier_data
from citeqa.reward.scorer import VerifierScorer, load_scorer
from citeqa.reward.train import TrainConfig, train_verifier
from citeqa.reward.verifier import Judged, Verifier

__all__ = [
    "Calibration",
    "Example",
    "Judged",
    "TrainConfig",
    "Verifier",
    "VerifierData",
    "VerifierScorer",
    "calibrate_threshold",
    "load_scorer",
    "load_verifier",
    "load_verifier_data",
    "save_verifier",
    "train_verifier",
]
