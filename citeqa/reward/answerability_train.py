"""Training the answerability reader (answerability.py): binary cross-entropy on labelled
passage views (``citeqa.training.answerability_data``), one shuffled pass by default.

The encoder computes in bf16 autocast where the CPU's matrix units pay; weights and optimizer
state stay fp32. The reader is saved every ``save_every`` steps and at the end with the step
it reached (in config.json); a rerun of the same training continues from that step (the
optimizer's moments start afresh), another is refused, as the verifier's training does
(train.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from citeqa.reward.answerability import MAX_TOKENS, Answerability, encode, save_answerability
from citeqa.reward.train import run_training

if TYPE_CHECKING:  # (a type only: the data builder reads datasets, evals and red-team code)
    from citeqa.training.answerability_data import Labelled


@dataclass(frozen=True)
class AnswerabilityConfig:
    epochs: float = 1.0  # passes over the examples (fractions allowed)
    batch: int = 32  # examples per optimizer step
    lr: float = 5e-5  # AdamW learning rate of the encoder
    head_lr: float = 1e-3  # ... of the linear head
    warmup_steps: int = 30  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    max_tokens: int = MAX_TOKENS  # tokens an example is cut to
    save_every: int = 100  # steps between checkpoints
    seed: int = 0
    cpu_dtype: str = "auto"  # bf16 autocast where it pays (citeqa.compute)


def plan(examples: Sequence[Labelled], cfg: AnswerabilityConfig) -> list[list[Labelled]]:
    """The batches of the whole run: each epoch a fresh seeded shuffle, cut to ``epochs``."""
    out: list[list[Labelled]] = []
    for epoch in range(math.ceil(cfg.epochs)):
        order = list(examples)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        out += [order[i:i + cfg.batch] for i in range(0, len(order), cfg.batch)]
    return out[:max(1, int(len(out) * cfg.epochs / math.ceil(cfg.epochs)))]


def train_answerability(model: Answerability, tokenizer: Any, examples: Sequence[Labelled],
                        cfg: AnswerabilityConfig, *, out: Path | None = None,
                        extra: dict[str, Any] | None = None, progress: bool = True
                        ) -> dict[str, Any]:
    """Train ``model`` in place; with ``out``, save and resume there. Returns the record."""
    if not examples or len({ex.label for ex in examples}) < 2:
        raise ValueError(f"training needs both labels, got {len(examples)} examples")

    def loss_of(step: int, batch: list[Labelled]) -> tuple[torch.Tensor, None]:
        inputs = encode(tokenizer, [ex.judged for ex in batch], cfg.max_tokens)
        labels = torch.tensor([float(ex.label) for ex in batch])
        return F.binary_cross_entropy_with_logits(model(inputs).float(), labels), None

    return run_training(model, plan(examples, cfg), loss_of, cfg,
                        save=lambda d, meta: save_answerability(d, model, tokenizer, meta,
                                                                max_tokens=cfg.max_tokens),
                        desc="training answerability", out=out, extra=extra, progress=progress)
