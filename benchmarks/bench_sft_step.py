"""Seconds per LoRA training step of the default generator, three ways, in one run.

    python benchmarks/bench_sft_step.py --data .cache/generator-sft/demos-train.jsonl [--steps 4]

Steps of ``evals/train_generator.sh``'s recipe (LoRA r=16 on all layers, batch 8, micro-batch
4, bf16 autocast where the CPU pays) are trained through ``train_lora`` on a fresh copy of the
base model each way, over the first ``8 x --steps`` demonstrations of ``--data`` in the
recipe's seed-0 order of those (not of the whole file, as the recipe draws: the batches, and so
their lengths, are not the recipe's first ones):

1. micro-batches in the order drawn (the recipe of the shipped adapter);
2. micro-batches grouped by length (``sft.micro_batches``, the default now: same gradient,
   less padding);
3. grouped, with the frozen base weights in bf16 (``--base-bf16``).

The first step of each is a warm-up and not counted. Prints s/step, the ratios to way 1 and
the projected hours for the 625 steps of 5,000 demonstrations (#13's target: 2 h); writes
--out (default .cache/bench/bench_sft_step.json; the committed run is
evals/results/bench_sft_step.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import citeqa.training.sft as sft  # noqa: E402
from benchmarks._args import at_least  # noqa: E402
from citeqa.config import Settings, preset  # noqa: E402
from citeqa.generation.models import load_model  # noqa: E402
from citeqa.training.cli import TARGETS  # noqa: E402
from citeqa.training.demos import read_demos  # noqa: E402
from citeqa.training.lora import LoRAConfig  # noqa: E402

# a scratch file by default: the committed figures in evals/results/ change only when --out
# names them
OUT = ROOT / ".cache" / "bench" / "bench_sft_step.json"


def in_given_order(batch, size):
    return [list(batch[i : i + size]) for i in range(0, len(batch), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="demonstrations JSONL")
    ap.add_argument("--steps", type=at_least(2), default=4,
                    help="steps a way, the first a warm-up (so at least 2)")
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from citeqa.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    gen = preset("default").generation
    cfg = sft.TrainConfig(lr=5e-4, batch_size=8, micro_batch_size=4, max_steps=args.steps)
    lora = LoRAConfig(r=16, alpha=32, targets=TARGETS["all"])
    demos = read_demos(args.data)[: 8 * args.steps]
    grouped = sft.micro_batches
    ways = {"given order": (cfg, in_given_order), "grouped by length": (cfg, grouped),
            "grouped, bf16 base": (replace(cfg, base_bf16=True), grouped)}
    figures: dict[str, float] = {}
    for name, (way_cfg, split) in ways.items():
        model, tokenizer, model_id = load_model(gen.model, Settings().cache_dir)  # type: ignore[call-arg]
        examples, _ = sft.render_examples(demos, tokenizer, gen, max_tokens=way_cfg.max_tokens)
        sft.micro_batches = split
        try:
            _, log = sft.train_lora(model, examples, sft.padding_id(tokenizer), way_cfg, lora,
                                    progress=False)
        finally:
            sft.micro_batches = grouped
        seconds = [s["seconds"] for s in log.steps]
        figures[name] = (seconds[-1] - seconds[0]) / (len(seconds) - 1)
        print(f"{name:20s} {figures[name]:6.2f} s/step   loss of step 1 {log.steps[0]['loss']:.4f}",
              flush=True)
    base = figures["given order"]
    ratios = {k: base / v for k, v in figures.items()}
    hours = {k: v * 625 / 3600 for k, v in figures.items()}
    for k in figures:
        print(f"{k:20s} {ratios[k]:.2f}x   5,000 demonstrations (625 steps): {hours[k]:.2f} h")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "model": model_id,
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "timed_steps": args.steps - 1, "seconds_per_step": figures,
        "speedup_vs_given_order": ratios, "hours_for_625_steps": hours}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
