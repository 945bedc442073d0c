"""Training the reward ensemble: full-batch AdamW on Bradley–Terry pairs plus per-answer labels
(``losses.combined_loss``), each member on its own bootstrap resample.

The data are small (hundreds to a few thousand rows), so all K members train together in one
loop: the stacked logits [K, N] are gathered at each member's resampled row indices and the
flattened result goes through the shared losses, which is the mean of the members' losses.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from citeqa.retrieval.embed import Embedder
from citeqa.reward.data import RewardData
from citeqa.reward.features import FeatureSpec, featurize
from citeqa.reward.losses import combined_loss
from citeqa.reward.model import RewardEnsemble

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    members: int = 5  # ensemble size K
    hidden: int = 32  # hidden units per member; 0 = logistic regression
    epochs: int = 300  # full-batch optimisation steps
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    bootstrap: bool = True  # each member sees a bootstrap resample (else all rows, own seed)
    preference_weight: float = 1.0  # weight of the Bradley–Terry term
    label_weight: float = 1.0  # weight of the per-answer label term
    soft_labels: bool = False  # train the label term on F1 targets where the data have them
    seed: int = 0


def _resample(n: int, members: int, bootstrap: bool, gen: torch.Generator) -> torch.Tensor:
    """Row indices per member: [K, n] (bootstrap draws, or every row in order)."""
    if not bootstrap:
        return torch.arange(n).expand(members, n)
    return torch.randint(0, n, (members, n), generator=gen)


def fit_ensemble(
    x: np.ndarray,
    labels: np.ndarray,
    x_a: np.ndarray,
    x_b: np.ndarray,
    preferred: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = False,
) -> tuple[RewardEnsemble, list[float]]:
    """Fit an ensemble on feature rows: labelled ``x`` [N, D] with ``labels`` [N], and pairs
    ``x_a``, ``x_b`` [P, D] with ``preferred`` [P] (0 = a). Either part may be empty.

    Returns the model and the loss at every step.
    """
    n, p = len(x), len(x_a)
    if n == 0 and p == 0:
        raise ValueError("nothing to train on: no labelled rows and no pairs")
    dim = (x if n else x_a).shape[1]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RewardEnsemble(dim, cfg.members, cfg.hidden)
    all_rows = np.concatenate([r for r in (x, x_a, x_b) if len(r)], axis=0)
    model.set_standardisation(torch.from_numpy(all_rows).float())

    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(labels).float()
    at, bt = torch.from_numpy(x_a).float(), torch.from_numpy(x_b).float()
    pt = torch.from_numpy(preferred).long()
    members = torch.arange(cfg.members)[:, None]  # [K, 1]
    rows = _resample(n, cfg.members, cfg.bootstrap, gen) if n else None  # [K, N]
    pairs = _resample(p, cfg.members, cfg.bootstrap, gen) if p else None  # [K, P]

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[float] = []
    for _ in tqdm(range(cfg.epochs), desc="training reward model", disable=not progress):
        opt.zero_grad()
        kw: dict[str, Any] = {
            "preference_weight": cfg.preference_weight,
            "label_weight": cfg.label_weight,
        }
        if rows is not None:
            logits = model(xt)  # [K, N]
            kw["logits"] = logits[members, rows].reshape(-1)  # [K*N]
            kw["labels"] = yt[rows].reshape(-1)
        if pairs is not None:
            la, lb = model(at), model(bt)  # [K, P] each
            kw["pair_logits"] = (la[members, pairs].reshape(-1), lb[members, pairs].reshape(-1))
            kw["preferred"] = pt[pairs].reshape(-1)
        loss = combined_loss(**kw)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return model.eval(), history


def train_reward(
    data: RewardData,
    spec: FeatureSpec,
    embedder: Embedder | None,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[RewardEnsemble, dict[str, Any]]:
    """Featurise ``data`` and fit the ensemble; returns the model and training metrics."""
    cfg = cfg or TrainConfig()
    inputs = (
        [item.input for item in data.labelled]
        + [pair.a for pair in data.pairs]
        + [pair.b for pair in data.pairs]
    )
    feats = featurize(inputs, spec, embedder)
    n, p = len(data.labelled), len(data.pairs)
    x, x_a, x_b = feats[:n], feats[n : n + p], feats[n + p :]
    targets = [
        item.soft if cfg.soft_labels and item.soft is not None else item.label
        for item in data.labelled
    ]
    labels = np.array(targets, dtype=np.float32)
    preferred = np.array([pair.preferred for pair in data.pairs], dtype=np.int64)
    model, history = fit_ensemble(x, labels, x_a, x_b, preferred, cfg, progress=progress)

    hard = np.array([item.label for item in data.labelled], dtype=bool)
    metrics: dict[str, Any] = {
        "labelled": n,
        "pairs": p,
        "positive_rate": float(hard.mean()) if n else None,
        "loss_first": history[0],
        "loss_last": history[-1],
        "train": asdict(cfg),
    }
    if p:
        mean_a, _ = model.predict(torch.from_numpy(x_a))
        mean_b, _ = model.predict(torch.from_numpy(x_b))
        wins = np.where(preferred == 0, mean_a > mean_b, mean_b > mean_a)
        metrics["train_pair_accuracy"] = float(wins.mean())
    logger.info("trained reward model: %s", metrics)
    return model, metrics
