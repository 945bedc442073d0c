"""Resumable fine-tuning: the LoRA tensors, AdamW's moments and the step, saved as plain data.

A checkpoint is a directory ``<out>/checkpoint`` holding

    lora.safetensors       every trained A and B (float32)
    optimizer.safetensors  AdamW's ``exp_avg`` / ``exp_avg_sq`` / ``step`` per parameter index
    state.json             the step reached, the loss history so far, and the run's key

It is written beside the old one and swapped in by renames, so a run killed while saving
leaves the previous checkpoint readable (``checkpoint.old`` is read when the swap was cut
between its two renames). The key hashes the examples and every setting that changes what a
step computes; a checkpoint made with another key is refused rather than silently mixed in.
``max_steps``, ``save_every`` and the compute format are not in the key: a run may be
extended, or resumed on another machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from citeqa.training.lora import LoRAConfig, LoRALinear

CHECKPOINT = "checkpoint"
STATE = "state.json"
LORA = "lora.safetensors"
OPTIMIZER = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # AdamW's per-parameter state


def run_key(examples: Sequence[Any], train: Any, lora: LoRAConfig, *, base: str = "") -> str:
    """A digest of the token ids, labels, settings and ``base`` model (its fingerprint) that
    decide every step's update."""
    h = hashlib.sha256()
    # numerics and bookkeeping, not the update rule: a run may resume under other values
    free = ("max_steps", "cpu_dtype", "base_bf16", "save_every", "micro_batch_size")
    settings = {k: v for k, v in asdict(train).items() if k not in free}
    h.update(json.dumps([settings, {**asdict(lora), "targets": list(lora.targets)}, base],
                        sort_keys=True).encode())
    for e in examples:
        h.update(torch.tensor(e.input_ids + e.labels, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(out: Path, wrapped: dict[str, LoRALinear], optimizer: torch.optim.Optimizer,
                    *, step: int, history: list[dict[str, float]], key: str) -> None:
    """Write the checkpoint of ``step`` into ``out/checkpoint``, replacing the previous one."""
    final = Path(out) / CHECKPOINT
    tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f"{n}.{p}": getattr(w, p).detach().contiguous() for n, w in wrapped.items()
               for p in ("lora_A", "lora_B")}, str(tmp / LORA))
    moments = {f"{i}.{m}": t.detach().reshape(-1).contiguous().float()
               for i, s in optimizer.state_dict()["state"].items()
               for m, t in s.items() if m in MOMENTS}
    save_file(moments, str(tmp / OPTIMIZER))
    (tmp / STATE).write_text(json.dumps({"step": step, "key": key, "history": history}),
                             encoding="utf-8")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, wrapped: dict[str, LoRALinear], optimizer: torch.optim.Optimizer,
                    *, key: str) -> tuple[int, list[dict[str, float]]]:
    """Restore a saved run into ``wrapped`` and ``optimizer``; (step, history), or (0, []) when
    ``out`` holds no checkpoint. Raises ValueError for one made by another run."""
    directory = _existing(Path(out))
    if directory is None:
        return 0, []
    try:
        state = json.loads((directory / STATE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / LORA))
        saved = load_file(str(directory / OPTIMIZER))
        saved_key = state["key"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"the checkpoint in {directory} is damaged ({e}); remove it to start "
                         "afresh") from None
    if saved_key != key:
        raise ValueError(
            f"{directory} was saved by a run with other data or settings; remove it (or choose "
            "another --out) to start afresh"
        )
    with torch.no_grad():
        for n, w in wrapped.items():
            w.lora_A.copy_(tensors[f"{n}.lora_A"])
            w.lora_B.copy_(tensors[f"{n}.lora_B"])
    current = optimizer.state_dict()
    params = [i for g in current["param_groups"] for i in g["params"]]
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for i, p in zip(params, (p for g in optimizer.param_groups for p in g["params"]), strict=True):
        if f"{i}.step" in saved:
            restored[i] = {"step": saved[f"{i}.step"].reshape(()),
                           "exp_avg": saved[f"{i}.exp_avg"].reshape(p.shape),
                           "exp_avg_sq": saved[f"{i}.exp_avg_sq"].reshape(p.shape)}
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})
    return int(state["step"]), list(state["history"])


def remove_checkpoint(out: Path) -> None:
    """Drop the checkpoint once the finished adapter is written."""
    for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
        shutil.rmtree(Path(out) / name, ignore_errors=True)


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint to resume (a run not finished yet)."""
    return _existing(Path(out)) is not None


def _existing(out: Path) -> Path | None:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (out / name / STATE).is_file():
            return out / name
    return None
