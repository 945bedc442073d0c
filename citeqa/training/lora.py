"""LoRA in plain torch: low-rank trainable updates beside frozen ``nn.Linear`` layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight ``W``
[out, in] gets a trainable update ``alpha / r * B @ A`` with ``A`` [r, in] (Kaiming-uniform, as
in the paper's reference code) and ``B`` [out, r] (zeros, so training starts at the base model).
Only A and B are trained and saved (``citeqa/generation/adapter.py`` holds the file format and
merges them into the weights for serving).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Projections of a Llama-architecture decoder layer (SmolLM2): attention, then MLP.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of each update
    alpha: float = 16.0  # updates are scaled by alpha / r
    targets: tuple[str, ...] = ATTENTION  # Linear layers whose name ends with one of these
    # Only blocks ``layers.<i>`` with i >= first_layer are adapted: a backward pass then stops
    # there (nothing below trains), which on a CPU saves most of the training time below it.
    first_layer: int = 0


class LoRALinear(nn.Module):
    """``base(x) + alpha / r * x @ A.T @ B.T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        self.scale = alpha / r
        device = base.weight.device
        # LoRA parameters stay float32 even on a bfloat16 base: small updates need the precision.
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        update = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # [..., out]
        return self.base(x) + (self.scale * update).to(x.dtype)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def target_names(model: nn.Module, targets: Sequence[str], first_layer: int = 0) -> list[str]:
    """Names of the ``nn.Linear`` modules whose last name part is in ``targets`` (and, with
    ``first_layer``, inside a block ``layers.<i>`` with i >= it), in model order."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        m = _LAYER.search(name)
        if first_layer and (m is None or int(m.group(1)) < first_layer):
            continue
        out.append(name)
    return out


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> dict[str, LoRALinear]:
    """Freeze every parameter of ``model`` and wrap the target Linears; name -> wrapper.

    Raises ValueError when no module matches ``cfg.targets``.
    """
    names = target_names(model, cfg.targets, cfg.first_layer)
    if not names:
        raise ValueError(f"no nn.Linear named like {list(cfg.targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoRALinear(getattr(parent, child), cfg.r, cfg.alpha)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def lora_tensors(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``.lora_B`` tensors of the wrappers, as ``save_adapter`` wants."""
    out: dict[str, torch.Tensor] = {}
    for name, w in wrapped.items():
        out[f"{name}.lora_A"] = w.lora_A.detach()
        out[f"{name}.lora_B"] = w.lora_B.detach()
    return out


def lora_parameters(wrapped: dict[str, LoRALinear]) -> list[nn.Parameter]:
    """The trainable parameters: every A and B."""
    return [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
