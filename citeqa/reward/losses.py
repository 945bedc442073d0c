"""Reward-model training losses: a per-answer label loss and a Bradley–Terry preference loss.

GopherCite (Menick et al. 2022) trains its reward model on pairwise preferences with a
Bradley–Terry loss plus an auxiliary per-sample classification loss ("is this answer supported
and plausible"); ``combined_loss`` is that sum with weights. All losses take raw logits (reward
values before any sigmoid) and are computed in a numerically stable form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of per-answer logits against 0/1 correctness labels."""
    # logits: [N], labels: [N] (bool, int or float)
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    if logits.numel() == 0:
        raise ValueError("no examples: logits is empty")
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def bradley_terry_loss(logit_a: Tensor, logit_b: Tensor, preferred: Tensor) -> Tensor:
    """Mean of -log sigmoid(r_preferred - r_other) over pairs (Bradley–Terry likelihood).

    ``preferred`` is 0 where answer a is preferred and 1 where b is.
    """
    # logit_a, logit_b, preferred: [P]
    if not (logit_a.shape == logit_b.shape == preferred.shape):
        raise ValueError(
            f"shapes differ: logit_a {tuple(logit_a.shape)}, logit_b {tuple(logit_b.shape)}, "
            f"preferred {tuple(preferred.shape)}"
        )
    if logit_a.numel() == 0:
        raise ValueError("no pairs: logit_a is empty")
    b_wins = preferred.to(torch.bool)
    margin = torch.where(b_wins, logit_b - logit_a, logit_a - logit_b)  # [P]
    return -F.logsigmoid(margin).mean()


def combined_loss(
    *,
    pair_logits: tuple[Tensor, Tensor] | None = None,
    preferred: Tensor | None = None,
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    preference_weight: float = 1.0,
    label_weight: float = 1.0,
) -> Tensor:
    """``preference_weight * bradley_terry_loss + label_weight * label_loss`` over the parts given.

    Pass ``pair_logits=(logit_a, logit_b)`` with ``preferred`` for the preference term and/or
    ``logits`` with ``labels`` for the label term; a missing part contributes nothing.
    """
    if (pair_logits is None) != (preferred is None):
        raise ValueError("pass pair_logits and preferred together")
    if (logits is None) != (labels is None):
        raise ValueError("pass logits and labels together")
    terms: list[Tensor] = []
    if pair_logits is not None and preferred is not None:
        terms.append(preference_weight * bradley_terry_loss(*pair_logits, preferred))
    if logits is not None and labels is not None:
        terms.append(label_weight * label_loss(logits, labels))
    if not terms:
        raise ValueError("nothing to train on: pass pair_logits/preferred and/or logits/labels")
    return torch.stack(terms).sum()
