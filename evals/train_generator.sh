#!/usr/bin/env bash
# Fine-tune the generator to cite in span mode (LoRA), then compare it with the base model and
# the previous adapter on the EVAL articles.
#
#   evals/train_generator.sh            # data, train, publish, eval
#   STAGES="data train" evals/train_generator.sh
#
# 1. data:    demonstrations from the SQuAD 1.1 training set (../shared/data/squad1-train: 442
#             articles, none of them an evaluation article), over an index of its 18,896
#             paragraphs: 1-5 retrieved passages (the gold paragraph put among them when
#             retrieval missed it), the first gold answer, the sentence holding it as the
#             quote, verified verbatim;
# 2. train:   LoRA (r=16 on attention + MLP of all 30 blocks) on SmolLM2-135M-Instruct, the
#             first $STEPS steps of 8 examples (1,600 of the $N demonstrations by default), in
#             bf16 autocast where the CPU's matrix units make it pay (~17 s a step on 2 cores
#             of a Zen 5 EPYC: about an hour; resumable). Adapting only the top 9 blocks
#             (twice as fast) lost 25 points of right answers on the calibration articles;
#             this recipe gained 5 (docs/measurements.md, "Retraining on SQuAD 1.1"). To train an adapter
#             further on the next demonstrations of the same order, set INIT_ADAPTER (e.g.
#             citeqa/generation/weights) and START_STEP (the steps it was trained for, 200)
#             and STEPS to where it should stop, with another OUT and DEMOS pointing at the
#             first run's demonstrations (.cache/generator-sft/demos-train.jsonl);
# 3. publish: a bfloat16 copy into citeqa/generation/weights, the default generator's adapter
#             (GenerationConfig.adapter = "packaged"); its MODEL_CARD.md is written by hand;
# 4. eval:    evals/generation_quality.py on the EVAL articles: the base model, the adapter it
#             replaces (kept in $OUT/previous, free mode, the format it was trained on) and the
#             new one (span mode).
# Outputs under $OUT (default .cache/generator-sft).
set -euo pipefail
case "${1:-}" in  # its header is its help (what a run does, and how it resumes)
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${CITEQA_SHARED_DATA:-$ROOT/../shared/data}"
SQUAD1="$SHARED/squad1-train/train-v1.1.json.gz"
EVAL_INDEX="${EVAL_INDEX:-$ROOT/.cache/squad-eval-index}"
TRAIN_JSON="${TRAIN_JSON:-$ROOT/.cache/squad1-train.json}"
TRAIN_INDEX="${TRAIN_INDEX:-$ROOT/.cache/squad1-index}"
OUT="${OUT:-$ROOT/.cache/generator-sft}"
DEMOS="${DEMOS:-$OUT/demos-train.jsonl}"  # the data stage writes them; train reads them
PY="${PYTHON:-python}"
N="${N:-5000}"                # demonstrations built
STEPS="${STEPS:-200}"         # training steps of 8 (the shipped adapter: 200, then 350 from it)
THREADS="${THREADS:-2}"
EVAL_LIMIT="${EVAL_LIMIT:-200}"
STAGES="${STAGES:-data train publish eval}"
cd "$ROOT"

if [ ! -f "$SQUAD1" ]; then
  echo "error: SQuAD 1.1 training data not found at $SQUAD1 (set CITEQA_SHARED_DATA)" >&2
  exit 2
fi
CITEQA=("$PY" -c 'from citeqa.cli import main; main()')
mkdir -p "$OUT"

if [[ " $STAGES " == *" data "* ]]; then
  if [ ! -f "$TRAIN_JSON" ]; then
    "$PY" -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1], "rb"), open(sys.argv[2], "wb"))' \
      "$SQUAD1" "$TRAIN_JSON"
  fi
  if [ ! -f "$TRAIN_INDEX/manifest.json" ]; then
    "${CITEQA[@]}" index build "$TRAIN_JSON" --out "$TRAIN_INDEX" --preset default
  fi
  "${CITEQA[@]}" train generator-data --dataset "$TRAIN_JSON" --index "$TRAIN_INDEX" --split all \
    --limit "$N" --seed 0 --answer-mode span --out "$DEMOS"
fi

if [[ " $STAGES " == *" train "* ]]; then
  "${CITEQA[@]}" train generator --data "$DEMOS" --out "$OUT/adapter" \
    --epochs 1 --batch-size 8 --micro-batch-size 4 --lr 5e-4 --rank 16 --alpha 32 \
    --targets all --first-layer 0 --max-steps "$STEPS" --threads "$THREADS" --seed 0 \
    --answer-mode span --save-every 25 \
    ${INIT_ADAPTER:+--init-adapter "$INIT_ADAPTER" --start-step "${START_STEP:-0}"} \
    --cpu-dtype "${CPU_DTYPE:-auto}"
fi

if [[ " $STAGES " == *" publish "* ]]; then
  "$PY" - "$OUT/adapter" "$ROOT/citeqa/generation/weights" "$OUT/previous" <<'PY'
import shutil, sys
from pathlib import Path

import torch

from citeqa.generation.adapter import load_adapter, save_adapter

src, dst, previous = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
if not previous.exists():
    shutil.copytree(dst, previous)  # the adapter being replaced, for the comparison below
cfg, tensors = load_adapter(src)
save_adapter(dst, tensors, cfg, dtype=torch.bfloat16)
shutil.copy(src / "training_log.json", dst / "training_log.json")
print(f"published {src} -> {dst} (bfloat16); the previous adapter is in {previous}")
PY
fi

if [[ " $STAGES " == *" eval "* ]]; then
  QUALITY=("$PY" evals/generation_quality.py --split eval --limit "$EVAL_LIMIT"
           --threads "$THREADS" --modes constrained --index "$EVAL_INDEX")
  "${QUALITY[@]}" --adapter none --answer-mode span --out "$OUT/quality-base-span.json"
  "${QUALITY[@]}" --adapter none --answer-mode free --out "$OUT/quality-base-free.json"
  "${QUALITY[@]}" --adapter "$OUT/previous" --answer-mode free --out "$OUT/quality-previous.json"
  "${QUALITY[@]}" --adapter packaged --answer-mode span --out "$OUT/quality-new.json"
  echo "compare $OUT/quality-*.json, then update citeqa/generation/weights/MODEL_CARD.md"
fi
