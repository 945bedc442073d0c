#!/usr/bin/env bash
# Fine-tune the generator to cite (LoRA), then compare base vs fine-tuned on the EVAL articles.
#
#   evals/train_generator.sh            # data, train, publish, eval
#   STAGES="data train" evals/train_generator.sh
#
# 1. data:    demonstrations from answerable questions of the TRAIN articles of SQuAD 2.0
#             (retrieved passages + gold paragraph, first gold answer, verbatim quote sentence);
# 2. train:   LoRA (r=16 on attention + MLP) on SmolLM2-135M-Instruct, one epoch of 480
#             examples in 60 steps of 8; CUDA bf16 when available, else CPU fp32 (about 22 s a
#             step on 2 CPU threads: 22 minutes);
# 3. publish: a bfloat16 copy into citeqa/generation/weights, the default generator's adapter
#             (GenerationConfig.adapter = "packaged"); its MODEL_CARD.md is written by hand;
# 4. eval:    evals/generation_quality.py on the EVAL articles, base (--adapter none) then
#             fine-tuned (--adapter packaged).
# Outputs under $OUT (default .cache/generator-sft).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${CITEQA_SHARED_DATA:-$ROOT/../shared/data}/squad2"
INDEX="${INDEX:-$ROOT/.cache/squad-eval-index}"
OUT="${OUT:-$ROOT/.cache/generator-sft}"
PY="${PYTHON:-python}"
N="${N:-480}"                 # demonstrations
THREADS="${THREADS:-2}"
EVAL_LIMIT="${EVAL_LIMIT:-200}"
STAGES="${STAGES:-data train publish eval}"
cd "$ROOT"

if [ ! -f "$DATA/qa.json" ]; then
  echo "error: SQuAD data not found in $DATA (set CITEQA_SHARED_DATA)" >&2
  exit 2
fi
if [ ! -f "$INDEX/manifest.json" ]; then
  "$PY" -c 'from citeqa.cli import main; main()' index build \
    "$DATA/qa.json" "$DATA/distractors.json" --out "$INDEX" --preset default
fi
mkdir -p "$OUT"

TRAIN=("$PY" -m citeqa.training.cli)  # = `citeqa train`

if [[ " $STAGES " == *" data "* ]]; then
  "${TRAIN[@]}" generator-data --dataset "$DATA/qa.json" --index "$INDEX" --split train \
    --limit "$N" --seed 0 --out "$OUT/demos-train.jsonl"
fi

if [[ " $STAGES " == *" train "* ]]; then
  "${TRAIN[@]}" generator --data "$OUT/demos-train.jsonl" --out "$OUT/adapter" \
    --epochs 1 --batch-size 8 --micro-batch-size 4 --lr 5e-4 --rank 16 --alpha 32 --targets all \
    --threads "$THREADS" --seed 0
fi

if [[ " $STAGES " == *" publish "* ]]; then
  "$PY" - "$OUT/adapter" "$ROOT/citeqa/generation/weights" <<'PY'
import shutil, sys
from pathlib import Path

import torch

from citeqa.generation.adapter import load_adapter, save_adapter

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
cfg, tensors = load_adapter(src)
save_adapter(dst, tensors, cfg, dtype=torch.bfloat16)
shutil.copy(src / "training_log.json", dst / "training_log.json")
print(f"published {src} -> {dst} (bfloat16)")
PY
fi

if [[ " $STAGES " == *" eval "* ]]; then
  for adapter in none packaged; do
    "$PY" evals/generation_quality.py --split eval --limit "$EVAL_LIMIT" --threads "$THREADS" \
      --modes constrained --adapter "$adapter" --out "$OUT/quality-$adapter.json"
  done
  echo "compare $OUT/quality-none.json with $OUT/quality-packaged.json, then update" \
    "citeqa/generation/weights/MODEL_CARD.md"
fi
