"""Training the answerability reader (answerability.py): binary cross-entropy on labelled
passage views (``citeqa.training.answerability_data``), one shuffled pass by default.

The encoder computes in bf16 autocast where the CPU's matrix units pay; weights and optimizer
state stay fp32. The reader is saved every ``save_every`` steps and at the end with
``progress.json``; a rerun continues from the saved step (the optimizer's moments start afresh),
as the verifier's training does (train.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from citeqa.compute import training_autocast
from citeqa.reward.answerability import MAX_TOKENS, Answerability, encode, save_answerability
from citeqa.reward.train import (
    encoder_optimizer,
    lr_scale,
    resume_step,
    take_step,
    training_record,
    write_progress,
)
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
    torch.manual_seed(cfg.seed)
    batches = plan(examples, cfg)
    total, done = len(batches), resume_step(out)
    optimizer = encoder_optimizer(model, cfg.lr, cfg.head_lr, cfg.weight_decay)
    base = [g["lr"] for g in optimizer.param_groups]
    device = next(model.parameters()).device.type
    model.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc="training answerability", disable=not progress)
    for step in range(done, total):
        batch = batches[step]
        inputs = encode(tokenizer, [ex.judged for ex in batch], cfg.max_tokens)
        labels = torch.tensor([float(ex.label) for ex in batch])
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * lr_scale(step, total, cfg.warmup_steps)
        with training_autocast(device, cfg.cpu_dtype):
            logits = model(inputs)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        take_step(model, optimizer, loss, step, history, bar, t0)
        if out is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == total):
            model.eval()
            record = training_record(cfg, history, step + 1, total, device, extra)
            save_answerability(out, model, tokenizer, {"training": record})
            write_progress(out, step + 1, total)
            model.train()
    bar.close()
    model.eval()
    return training_record(cfg, history, total, total, device, extra)
