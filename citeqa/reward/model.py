"""The reward network: an ensemble of K small heads over standardised features, and its
directory format.

Each member is logistic regression (``hidden == 0``) or a one-hidden-layer MLP; all members are
stored as stacked tensors and run as one batched matmul. The reward is the mean of the members'
sigmoids, the uncertainty their standard deviation (members differ by bootstrap resample and
seed, a cheap stand-in for a posterior; Lakshminarayanan et al. 2017).

Directory (plain data, never pickle; loading checks everything and says what to do):

    model.safetensors   mean [D], std [D], w1 [K, D, H], b1 [K, H], w2 [K, H], b2 [K]
                        (logistic: w1 [K, D, 1], b1 [K, 1], no hidden layer)
    config.json         {"format": 1, "features": FeatureSpec, "members", "hidden", ...}
    calibration.json    optional, written by ``citeqa calibrate`` (see scorer.py)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from citeqa.atomic import atomic_path, write_text_atomic
from citeqa.errors import ModelError
from citeqa.reward.checkpoint import read_config
from citeqa.reward.features import SCALARS, FeatureSpec

FORMAT = 1  # bump when the directory layout changes
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RETRAIN = "retrain it with `citeqa train reward --data FILE --out DIR`"


class RewardEnsemble(nn.Module):
    """K heads on the same standardised features; ``forward`` returns logits [K, N]."""

    def __init__(self, dim: int, members: int, hidden: int) -> None:
        super().__init__()
        if dim < 1 or members < 1 or hidden < 0:
            raise ValueError(f"bad ensemble shape: dim={dim}, members={members}, hidden={hidden}")
        self.dim, self.members, self.hidden = dim, members, hidden
        out = hidden if hidden else 1
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.w1 = nn.Parameter(torch.randn(members, dim, out) / dim**0.5)  # [K, D, H]
        self.b1 = nn.Parameter(torch.zeros(members, out))  # [K, H]
        if hidden:
            self.w2 = nn.Parameter(torch.randn(members, hidden) / hidden**0.5)  # [K, H]
            self.b2 = nn.Parameter(torch.zeros(members))  # [K]

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, D] -> logits [K, N]
        z = (x - self.mean) / self.std  # [N, D]
        h = torch.einsum("nd,kdh->knh", z, self.w1) + self.b1[:, None, :]  # [K, N, H]
        if not self.hidden:
            return h[..., 0]
        return torch.einsum("knh,kh->kn", torch.relu(h), self.w2) + self.b2[:, None]

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean sigmoid [N], std of the members' sigmoids [N])."""
        p = torch.sigmoid(self(x))  # [K, N]
        return p.mean(0), p.std(0, unbiased=False)


def save_model(
    out: Path, model: RewardEnsemble, spec: FeatureSpec, extra: dict[str, Any]
) -> None:
    """Write ``model.safetensors`` + ``config.json`` into ``out`` (each file atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "features": {**asdict(spec), "scalars": list(spec.scalars)},
        "members": model.members,
        "hidden": model.hidden,
        "dim": model.dim,
        **extra,
    }
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(out / CONFIG, json.dumps(config, indent=2) + "\n")


def load_model(directory: Path) -> tuple[RewardEnsemble, FeatureSpec, dict[str, Any]]:
    """(ensemble, feature spec, config) from a directory written by ``save_model``."""
    directory = Path(directory)
    config = read_config(directory, fmt=FORMAT, kind=None, retrain=RETRAIN)
    try:
        f = dict(config["features"])
        spec = FeatureSpec(**{**f, "scalars": tuple(f["scalars"])})
        if unknown := [n for n in spec.scalars if n not in SCALARS]:
            raise ValueError(f"unknown scalar features {unknown}")
        model = RewardEnsemble(int(config["dim"]), int(config["members"]), int(config["hidden"]))
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ModelError(f"{directory / CONFIG} is incomplete ({e!r}); {RETRAIN}") from None
    if spec.dim != model.dim:
        raise ModelError(
            f"{directory / CONFIG}: features give {spec.dim} columns, the model {model.dim}; "
            f"{RETRAIN}"
        )
    path = directory / WEIGHTS
    if not path.is_file():
        raise ModelError(f"{directory} has no {WEIGHTS}; {RETRAIN}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path} is corrupt ({e}); {RETRAIN}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{path} does not match {CONFIG} ({first}); {RETRAIN}") from None
    return model.eval(), spec, config
