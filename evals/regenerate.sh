#!/usr/bin/env bash
# Regenerate evals/results/squad2-eval/: the default system on the EVAL articles of SQuAD 2.0.
#
#   evals/regenerate.sh [--limit N] [--force] [other `citeqa eval` options]
#
# The index (qa.json + distractors.json, one document per paragraph) is built into
# .cache/squad-eval-index when missing. The run itself lives in .cache/squad2-eval-run, so an
# interrupted regeneration resumes where it stopped; the report, metrics, run.json, figures and
# the gzipped predictions (when under 2 MB) are then copied into evals/results/squad2-eval/.
set -euo pipefail
case "${1:-}" in  # its header is its help (what a run does, and how it resumes)
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${CITEQA_SHARED_DATA:-$ROOT/../shared/data}/squad2"
INDEX="${INDEX:-$ROOT/.cache/squad-eval-index}"
RUN="${RUN:-$ROOT/.cache/squad2-eval-run}"
RESULTS="${RESULTS:-$ROOT/evals/results/squad2-eval}"
PY="${PYTHON:-python}"
cd "$ROOT"

if [ ! -f "$DATA/qa.json" ] || [ ! -f "$DATA/distractors.json" ]; then
  echo "error: SQuAD data not found in $DATA (set CITEQA_SHARED_DATA to the folder holding squad2/)" >&2
  exit 2
fi
if [ ! -f "$INDEX/manifest.json" ]; then
  "$PY" -c 'from citeqa.cli import main; main()' index build \
    "$DATA/qa.json" "$DATA/distractors.json" --out "$INDEX" --preset default
fi

"$PY" -m citeqa.evals.cli --dataset "$DATA/qa.json" --split eval --index "$INDEX" \
  --out "$RUN" --preset default "$@"

mkdir -p "$RESULTS"
cp "$RUN"/report.md "$RUN"/metrics.json "$RUN"/run.json "$RUN"/*.png "$RESULTS"/
gzip -9 -c "$RUN/predictions.jsonl" > "$RESULTS/predictions.jsonl.gz.tmp"
if [ "$(stat -c %s "$RESULTS/predictions.jsonl.gz.tmp")" -lt 2000000 ]; then
  mv "$RESULTS/predictions.jsonl.gz.tmp" "$RESULTS/predictions.jsonl.gz"
else
  rm -f "$RESULTS/predictions.jsonl.gz.tmp" "$RESULTS/predictions.jsonl.gz"
  echo "predictions are over 2 MB gzipped; kept only in $RUN" >&2
fi
echo "wrote $RESULTS"
