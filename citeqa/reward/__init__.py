"""citeqa.reward: the reward model that scores (question, answer, quote), reranks candidates and
declines below a calibrated threshold.

    RewardInput -> features (MiniLM products + scalars) -> RewardEnsemble (K heads)
    -> score = mean sigmoid, uncertainty = spread -> threshold from calibrate_threshold (LTT)
"""

from citeqa.reward.calibrate import Calibration, calibrate_threshold
from citeqa.reward.data import Labelled, Pair, RewardData, load_reward_data
from citeqa.reward.features import FeatureSpec, RewardInput, featurize
from citeqa.reward.model import RewardEnsemble, load_model, save_model
from citeqa.reward.scorer import RewardScorer, load_scorer
from citeqa.reward.train import TrainConfig, train_reward

__all__ = [
    "Calibration",
    "FeatureSpec",
    "Labelled",
    "Pair",
    "RewardData",
    "RewardEnsemble",
    "RewardInput",
    "RewardScorer",
    "TrainConfig",
    "calibrate_threshold",
    "featurize",
    "load_model",
    "load_reward_data",
    "load_scorer",
    "save_model",
    "train_reward",
]
