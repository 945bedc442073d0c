"""Training the verifier: the label loss, the preference loss and the reader loss, together.

Batches are whole groups (one question's candidates), so that every (right, wrong) pair of a
question can enter the Bradley-Terry term (GopherCite's preference loss). For each of the K
members:

    loss_k = BCE(logit_k, label) * bootstrap weight_k + bt_weight * BT(pairs of the group)
    loss   = mean_k(loss_k) + reader_weight * CE(start, gold start) + CE(end, gold end)

Bootstrap weights (Poisson(1) per example and member) make the members differ beyond their
seeds: an ensemble whose spread means something (Lakshminarayanan et al. 2017). The reader
learns where in the passage the gold answer is ([CLS] when nowhere), on every example.

The encoder computes in bf16 autocast where the CPU's matrix units pay (``citeqa.compute``);
weights and optimizer state stay fp32. Training saves the verifier every ``save_every`` steps
and at the end (``checkpoint.save_verifier``), with the step reached and the run's key in its
config.json; a rerun of the same training continues from that step (the optimizer's moments
start afresh), another is refused.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from citeqa.atomic import recover_dir
from citeqa.compute import cpu_dtype, training_autocast
from citeqa.errors import ConfigError
from citeqa.reward.data import Example
from citeqa.reward.losses import bradley_terry_loss
from citeqa.reward.verifier import Batch, Verifier, encode

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0  # passes over the groups (fractions allowed)
    batch_examples: int = 32  # examples per optimizer step (whole groups, up to this many)
    lr: float = 3e-5  # AdamW learning rate of the encoder
    head_lr: float = 1e-3  # ... of the reader and the verifier heads
    warmup_steps: int = 100  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    bt_weight: float = 1.0  # weight of the preference (Bradley-Terry) term
    reader_weight: float = 0.5  # weight of the reader's start/end loss
    max_tokens: int = 192  # tokens a candidate is cut to
    members: int = 3  # verifier heads (the ensemble)
    hidden: int = 128  # hidden units of each head
    save_every: int = 200  # steps between checkpoints
    seed: int = 0
    cpu_dtype: str = "auto"  # bf16 autocast where it pays (citeqa.compute)


def batches(groups: Sequence[Sequence[Example]], size: int, rng: random.Random,
            ) -> list[list[Example]]:
    """Groups shuffled, then packed into batches of at most ``size`` examples (a group larger
    than ``size`` is cut)."""
    order = list(range(len(groups)))
    rng.shuffle(order)
    out: list[list[Example]] = []
    current: list[Example] = []
    for i in order:
        group = list(groups[i])[:size]
        if len(current) + len(group) > size:
            out.append(current)
            current = []
        current.extend(group)
    if current:
        out.append(current)
    return out


def pair_indices(examples: Sequence[Example]) -> tuple[list[int], list[int]]:
    """(right, wrong) example positions of every pair within the same group (a candidate
    without one is its question's, as ``VerifierData.groups`` has it: candidates of two
    ungrouped questions were paired across them)."""
    by_group: dict[str, tuple[list[int], list[int]]] = {}
    for i, ex in enumerate(examples):
        right, wrong = by_group.setdefault(ex.group or ex.judged.question, ([], []))
        (right if ex.label else wrong).append(i)
    a, b = [], []
    for right, wrong in by_group.values():
        for r in right:
            for w in wrong:
                a.append(r)
                b.append(w)
    return a, b


def step_loss(model: Verifier, batch: Batch, examples: Sequence[Example], cfg: TrainConfig,
              weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts; ``weights`` [K, N] bootstrap weights."""
    logits, start, end = model(batch)  # [K, N], [N, S], [N, S]
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="none")
    label_loss = (bce * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [K]
    loss = label_loss.mean()
    parts = {"label": float(label_loss.mean().detach())}
    a, b = pair_indices(examples)
    if a:
        bt = torch.stack([bradley_terry_loss(k[a], k[b], torch.zeros(len(a))) for k in logits])
        loss = loss + cfg.bt_weight * bt.mean()
        parts["preference"] = float(bt.mean().detach())
    assert batch.gold_tokens is not None
    gold = batch.gold_tokens
    reader = F.cross_entropy(start, gold[:, 0]) + F.cross_entropy(end, gold[:, 1])
    loss = loss + cfg.reader_weight * reader
    parts["reader"] = float(reader.detach())
    return loss, parts


def train_verifier(model: Verifier, tokenizer: Any, groups: Sequence[Sequence[Example]],
                   cfg: TrainConfig, *, out: Path | None = None, extra: dict[str, Any] | None
                   = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place on ``groups``; with ``out``, save and resume there. Returns the
    training record (losses, steps, seconds)."""
    from citeqa.reward.checkpoint import save_verifier

    cut = [len(g) for g in groups if len(g) > cfg.batch_examples]
    if cut:
        logger.warning("%d question groups hold more candidates than --batch %d: only their "
                       "first %d are trained on; raise --batch to %d to train on all",
                       len(cut), cfg.batch_examples, cfg.batch_examples, max(cut))
    plan = [b for epoch in range(math.ceil(cfg.epochs)) for b in batches(groups,
            cfg.batch_examples, random.Random(f"{cfg.seed}:{epoch}"))]
    plan = plan[:max(1, int(len(plan) * cfg.epochs / math.ceil(cfg.epochs)))]

    def loss_of(step: int, examples: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = encode(tokenizer, [ex.judged for ex in examples],
                       golds=[ex.golds for ex in examples], max_tokens=cfg.max_tokens)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        weights = torch.poisson(torch.ones(cfg.members, len(examples)), generator=gen)
        return step_loss(model, batch, examples, cfg, weights)

    return run_training(model, plan, loss_of, cfg,
                        save=lambda d, meta: save_verifier(d, model, tokenizer, meta,
                                                          max_tokens=cfg.max_tokens),
                        desc="training verifier", out=out, extra=extra, progress=progress)


def run_training(model: torch.nn.Module, plan: Sequence[Any],
                 loss_of: Callable[[int, Any], tuple[torch.Tensor, dict[str, float] | None]],
                 cfg: Any, *, save: Callable[[Path, dict[str, Any]], None], desc: str,
                 out: Path | None = None, extra: dict[str, Any] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """The loop every encoder trains with: step ``i`` takes ``loss_of(i, plan[i])`` (under bf16
    autocast where the CPU pays for it), AdamW (``encoder_optimizer``) with warm-up and linear
    decay, the gradient norm clipped to 1, a progress bar. With ``out``, every
    ``cfg.save_every`` steps and at the end ``save(out, {"training": record, "progress": ...})``
    writes the model with the step it reached and what run it is (``run_key``: settings, plan
    length, data), all in one swap, so a rerun of the same training resumes there (and another
    is refused). ``cfg`` has seed, lr, head_lr, weight_decay, warmup_steps, save_every and
    cpu_dtype. Returns the training record."""
    torch.manual_seed(cfg.seed)
    key = run_key(cfg, len(plan), extra)
    total, done = len(plan), resume_step(out, key)
    earlier = saved_training(out) if done else None  # the runs before this one, in sum
    if done == total and earlier is not None:  # finished already: nothing to train
        logger.info("%s holds this training, finished (%d steps): nothing to train", out, total)
        return {**earlier, "seconds_this_run": 0.0}
    optimizer = encoder_optimizer(model, cfg.lr, cfg.head_lr, cfg.weight_decay)
    base = [g["lr"] for g in optimizer.param_groups]
    device = next(model.parameters()).device.type
    model.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc=desc, disable=not progress)
    for step in range(done, total):
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * lr_scale(step, total, cfg.warmup_steps)
        with training_autocast(device, cfg.cpu_dtype):
            loss, parts = loss_of(step, plan[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **(parts or {}),
                        "seconds": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if out is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == total):
            model.eval()
            save(out, {"training": training_record(cfg, history, step + 1, total, device, extra,
                                                   earlier),
                       "progress": {"step": step + 1, "run": key}})
            (Path(out) / PROGRESS).unlink(missing_ok=True)  # an older citeqa's record of it
            model.train()
    bar.close()
    model.eval()
    return training_record(cfg, history, total, total, device, extra, earlier)


def encoder_optimizer(model: torch.nn.Module, lr: float, head_lr: float, weight_decay: float
                      ) -> torch.optim.Optimizer:
    """AdamW with one learning rate for ``model.encoder`` and another for everything else."""
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    return torch.optim.AdamW([{"params": list(model.encoder.parameters()), "lr": lr},
                              {"params": heads, "lr": head_lr}], weight_decay=weight_decay)


def lr_scale(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of ``step``: linear warm-up, then linear decay to 0."""
    return min((step + 1) / max(warmup, 1), max(0.0, (total - step) / max(total - warmup, 1)))


def training_record(cfg: Any, history: Sequence[dict[str, float]], step: int, total: int,
                    device: str, extra: dict[str, Any] | None,
                    earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a training did up to ``step``: this run's ``history`` joined to the record of the
    runs it resumed (``earlier``), so that a resumed training reports its first step's loss and
    its time per step over every step, not only this run's."""
    earlier = earlier or {}
    losses = [*earlier.get("last_losses", []), *(h["loss"] for h in history)][-50:]
    seconds = history[-1]["seconds"] if history else 0.0
    trained = len(history) + int(earlier.get("steps_timed", 0))
    seconds_all = seconds + float(earlier.get("seconds_all_runs", 0.0))
    first = earlier.get("loss_first", history[0]["loss"] if history else None)
    return {
        "config": asdict(cfg),
        "compute": cpu_dtype(cfg.cpu_dtype) if device == "cpu" else device,
        "steps": step,
        "total_steps": total,
        "seconds_this_run": seconds,
        "seconds_all_runs": seconds_all,
        "steps_timed": trained,
        "seconds_per_step": seconds_all / trained if trained else None,
        "loss_first": first,
        "loss_last50": sum(losses) / len(losses) if losses else None,
        "last_losses": losses,
        **(extra or {}),
    }


def _saved(out: Path | None, key: str) -> dict[str, Any] | None:
    """``key`` of the config.json a training saved in ``out`` (recovered first: a save killed
    between its two renames), when it is an object; else None."""
    if out is None:
        return None
    try:
        config = recover_dir(Path(out)) / "config.json"
        value = json.loads(config.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def saved_training(out: Path | None) -> dict[str, Any] | None:
    """The training record ``out``'s config.json holds (None when none)."""
    return _saved(out, "training")


def run_key(cfg: Any, total: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What makes two trainings the same run (as JSON reads it back): the settings but how often
    they save, the plan's length, and ``extra`` (data files and counts, base model)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    return json.loads(json.dumps({"config": settings, "total_steps": total,
                                  "extra": extra or {}}))


def saved_progress(out: Path | None) -> dict[str, Any] | None:
    """The step an interrupted (or finished) training saved in ``out``, with its run key:
    ``config.json``'s "progress" (an older citeqa's ``progress.json``: its step, no key);
    None when ``out`` holds none."""
    if out is None:
        return None
    progress = _saved(out, "progress")
    if progress is not None:
        return progress
    try:
        path = recover_dir(Path(out)) / PROGRESS
        return {"step": int(json.loads(path.read_text(encoding="utf-8"))["step"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_step(out: Path | None, key: dict[str, Any]) -> int:
    """The step to resume at in ``out`` (0: none saved); ConfigError when ``out`` holds
    another training (other settings or data): resuming would continue its plan with this
    one's, and a finished one would be reported as trained on data it never saw."""
    progress = saved_progress(out)
    if progress is None:
        return 0
    if "run" in progress and progress["run"] != key:
        was, now = progress["run"], key
        diff = [k for k in now if was.get(k) != now[k]]
        detail = "; ".join(
            f"{k}: " + ", ".join(f"{n} was {was.get(k, {}).get(n)!r}, now {v!r}"
                                 for n, v in now[k].items() if was.get(k, {}).get(n) != v)
            if isinstance(now[k], dict) else f"{k}: was {was.get(k)!r}, now {now[k]!r}"
            for k in diff)
        raise ConfigError(f"{out} holds a training with other settings or data ({detail}); "
                          "choose another --out, or delete it to start over")
    return int(progress["step"])
