#!/usr/bin/env bash
# Fine-tune the generator to cite (LoRA), then compare base vs fine-tuned on the EVAL articles.
#
#   evals/train_generator.sh            # all three stages
#   STAGES="data train" evals/train_generator.sh
#
# 1. data:  demonstrations from answerable questions of the TRAIN articles of SQuAD 2.0
#           (retrieved passages + gold paragraph, first gold answer, verbatim quote sentence);
# 2. train: LoRA (r=16 on attention + MLP) on SmolLM2-135M-Instruct; CUDA bf16 when available,
#           else CPU fp32 (about 5-10 s per example per epoch on 2 CPU threads: prefer a GPU);
# 3. eval:  evals/generation_quality.py on the EVAL articles, base then fine-tuned.
# Outputs under $OUT (default .cache/generator-sft); the adapter dir holds adapter.safetensors,
# adapter.json, training_log.json and MODEL_CARD.md (fill in its placeholders after stage 3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${CITEQA_SHARED_DATA:-$ROOT/../shared/data}/squad2"
INDEX="${INDEX:-$ROOT/.cache/squad-eval-index}"
OUT="${OUT:-$ROOT/.cache/generator-sft}"
PY="${PYTHON:-python}"
N="${N:-480}"                 # demonstrations
THREADS="${THREADS:-2}"
EVAL_LIMIT="${EVAL_LIMIT:-200}"
STAGES="${STAGES:-data train eval}"
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

# `citeqa train ...` once the lead registers the app; the module runs the same commands.
TRAIN=("$PY" -m citeqa.training.cli)

if [[ " $STAGES " == *" data "* ]]; then
  "${TRAIN[@]}" generator-data --dataset "$DATA/qa.json" --index "$INDEX" --split train \
    --limit "$N" --seed 0 --out "$OUT/demos-train.jsonl"
fi

if [[ " $STAGES " == *" train "* ]]; then
  "${TRAIN[@]}" generator --data "$OUT/demos-train.jsonl" --out "$OUT/adapter" \
    --epochs 2 --batch-size 8 --lr 5e-4 --rank 16 --alpha 32 --targets all \
    --threads "$THREADS" --seed 0
fi

if [[ " $STAGES " == *" eval "* ]]; then
  "$PY" evals/generation_quality.py --split eval --limit "$EVAL_LIMIT" --threads "$THREADS" \
    --modes constrained --out "$OUT/quality-base.json"
  if grep -q -- "--adapter" evals/generation_quality.py; then
    "$PY" evals/generation_quality.py --split eval --limit "$EVAL_LIMIT" --threads "$THREADS" \
      --modes constrained --adapter "$OUT/adapter" --out "$OUT/quality-sft.json"
  else
    echo "evals/generation_quality.py has no --adapter option yet: add one that sets" \
      "GenerationConfig(adapter=DIR) (applied in HFBackend.load), then rerun STAGES=eval" >&2
    exit 3
  fi
  echo "compare $OUT/quality-base.json with $OUT/quality-sft.json, then complete" \
    "$OUT/adapter/MODEL_CARD.md"
fi
