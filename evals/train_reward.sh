#!/usr/bin/env bash
# Train the verifier reward model from scratch: data (generator candidates, synthetic pairs,
# red-team unanswerables), training, calibration, publication. Every stage resumes or skips
# what is done, so a rerun after an interruption continues.
#
#   evals/train_reward.sh                          # all stages
#   STAGES="train calibrate" evals/train_reward.sh
#
# 1. index:     an index of the TRAIN articles of qa.json plus distractors.json (558 paragraphs
#               whose questions are more-train.json), so that no calibration or evaluation
#               paragraph is seen in training;
# 2. data:      - the served generator's candidates (3 a question, each quoting another
#                 retrieved passage) for $GEN_Q questions of the train articles and
#                 more-train.json (adversarial unanswerables included), labelled by the
#                 correctness rule;
#               - synthetic pairs for $SYN_Q SQuAD 1.1 questions (../shared/data/squad1-train,
#                 never an evaluation article) and every question of the train articles and
#                 of the more-train articles not held out (below);
#               - red-team unanswerables made from every SQuAD 1.1 question (>= 30k), of
#                 which the training sees a sample ($RT_Q groups);
#               - calibration candidates: the generator on the CALIBRATION articles, with the
#                 evaluation index, as served;
# 3. pretrain:  `citeqa train reward` (MiniLM cross-encoder + reader head + 3 heads) on
#               $PRE_GROUPS groups of the synthetic pairs and red-team unanswerables, bf16 where
#               the CPU's matrix units pay;
#    mix:       the generator's candidates of the train articles and of half the more-train
#               articles (by title), plus $MIX_SYN synthetic and $MIX_RT red-team groups; the
#               other more-train articles (`citeqa.evals.squad.held_out_articles`) are held out:
#               only the combination sees them (their candidates: heldout.jsonl);
#    train:     the pretrained verifier trained further on the mix (`--base` a verifier);
#    answerability: `citeqa train answerability` into rm/answerability: the train articles'
#               and the mix's more-train articles' questions (adversarial unanswerables
#               included) with their own paragraphs, plus $RT_VARIANTS red-team variants
#               beside their original questions;
#    combine:   `citeqa train reward-combine` on the held-out candidates: how the verifier's
#               score combines with the generator's log-probabilities and the retrieval score;
#    rounds:    the further training the shipped verifier went through since, as recorded in
#               evals/specs/reward_rounds.json (evals/reward_rounds.py): per round (D, L, M),
#               the generator's candidates (3 a question) for that round's questions, answered
#               by the adapter of that time (a git revision, else the shipped one), then one
#               epoch on that round's mix from the round before (D from $WORK/rm); then the
#               answerability reader copied in and the combination refit on the candidates of
#               880 questions of the held-out articles, into $WORK/rm-rounds, which the later
#               stages calibrate and publish (set RM=$WORK/rm-rounds to do so in a later call);
# 4. calibrate: Learn-then-Test, the highest of CAL_TARGETS (40-60 %) whose threshold answers
#               CAL_MIN_COVERAGE (25 %) of the calibration questions, each at delta 0.1/5;
# 5. publish:   into citeqa/reward/weights (bf16 encoder + heads + calibration.json).
set -euo pipefail
case "${1:-}" in  # its header is its help (what a run does, and how it resumes)
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${CITEQA_SHARED_DATA:-$ROOT/../shared/data}"
SQUAD2="$SHARED/squad2"
SQUAD1_GZ="$SHARED/squad1-train/train-v1.1.json.gz"
WORK="${WORK:-$ROOT/.cache/reward}"
EVAL_INDEX="${EVAL_INDEX:-$ROOT/.cache/squad-eval-index}"
SQUAD1_JSON="${SQUAD1_JSON:-$ROOT/.cache/squad1-train.json}"
SQUAD1_INDEX="${SQUAD1_INDEX:-$ROOT/.cache/squad1-index}"
PY="${PYTHON:-python}"
THREADS="${THREADS:-2}"
GEN_Q="${GEN_Q:-700}"       # train-article questions the generator answers for training data
GEN_MORE="${GEN_MORE:-600}"  # ... and more-train questions (adversarial unanswerables)
SYN_Q="${SYN_Q:-12000}"     # SQuAD 1.1 questions made into synthetic pairs
RT_Q="${RT_Q:-15000}"       # red-team groups in the training mix
CAL_TARGETS="${CAL_TARGETS:-0.4,0.45,0.5,0.55,0.6}"  # calibrate: the targets to choose among
CAL_MIN_COVERAGE="${CAL_MIN_COVERAGE:-0.25}"           # ... the share their threshold must answer
CAL_N="${CAL_N:-1}"         # candidates per calibration question: as served (GenerationConfig)
PRE_GROUPS="${PRE_GROUPS:-5000}"  # synthetic + red-team groups of the pretraining
MIX_SYN="${MIX_SYN:-1500}"  # synthetic groups in the mix
MIX_RT="${MIX_RT:-1000}"    # red-team groups in the mix
RT_VARIANTS="${RT_VARIANTS:-2000}"  # red-team variants the answerability reader sees
STAGES="${STAGES:-index data pretrain mix train answerability combine rounds calibrate publish}"
RM="${RM:-$WORK/rm}"        # what calibrate and publish take (rounds: $WORK/rm-rounds)
cd "$ROOT"
mkdir -p "$WORK"
CITEQA=("$PY" -c 'from citeqa.cli import main; main()')

for f in "$SQUAD2/qa.json" "$SQUAD2/distractors.json" "$SQUAD2/more-train.json" "$SQUAD1_GZ"; do
  [ -f "$f" ] || { echo "error: $f not found (set CITEQA_SHARED_DATA)" >&2; exit 2; }
done

if [[ " $STAGES " == *" index "* ]]; then
  [ -f "$SQUAD1_JSON" ] || "$PY" -c 'import gzip, shutil, sys; shutil.copyfileobj(gzip.open(sys.argv[1], "rb"), open(sys.argv[2], "wb"))' "$SQUAD1_GZ" "$SQUAD1_JSON"
  [ -f "$SQUAD1_INDEX/manifest.json" ] || "${CITEQA[@]}" index build "$SQUAD1_JSON" --out "$SQUAD1_INDEX"
  "$PY" - "$SQUAD2/qa.json" "$WORK/qa-train.json" <<'PY'
import json, sys
from citeqa.evals.squad import articles_for_split
data = json.load(open(sys.argv[1]))
train = set(articles_for_split("train"))
data["data"] = [a for a in data["data"] if a["title"] in train]
json.dump(data, open(sys.argv[2], "w"))
PY
  # more-train.json without the articles held out for the combination: no training step but
  # the combination sees those articles (synthetic pairs included)
  "$PY" - "$SQUAD2/more-train.json" "$WORK/more-train-mix.json" <<'PY'
import json, sys
from citeqa.evals.squad import held_out_articles
data = json.load(open(sys.argv[1]))
held = held_out_articles(a["title"] for a in data["data"])
data["data"] = [a for a in data["data"] if a["title"] not in held]
json.dump(data, open(sys.argv[2], "w"))
print(f"held out for the combination: {len(held)} more-train articles")
PY
  [ -f "$WORK/train-index/manifest.json" ] || "${CITEQA[@]}" index build "$WORK/qa-train.json" \
    "$SQUAD2/distractors.json" --out "$WORK/train-index"
fi

if [[ " $STAGES " == *" data "* ]]; then
  RD=("${CITEQA[@]}" train reward-data --threads "$THREADS")
  "${RD[@]}" --from generator --dataset "$WORK/qa-train.json" --index "$WORK/train-index" \
    --limit "$GEN_Q" --n-candidates 3 --out "$WORK/gen-qa-train.jsonl"
  "${RD[@]}" --from generator --dataset "$SQUAD2/more-train.json" --index "$WORK/train-index" \
    --limit "$GEN_MORE" --n-candidates 3 --out "$WORK/gen-more-train.jsonl"
  [ -f "$WORK/syn-squad1.jsonl" ] || "${RD[@]}" --from synthetic --dataset "$SQUAD1_JSON" \
    --index "$SQUAD1_INDEX" --limit "$SYN_Q" --out "$WORK/syn-squad1.jsonl"
  [ -f "$WORK/syn-qa-train.jsonl" ] || "${RD[@]}" --from synthetic \
    --dataset "$WORK/qa-train.json" --index "$WORK/train-index" --out "$WORK/syn-qa-train.jsonl"
  [ -f "$WORK/syn-more-train-mix.jsonl" ] || "${RD[@]}" --from synthetic \
    --dataset "$WORK/more-train-mix.json" --index "$WORK/train-index" \
    --out "$WORK/syn-more-train-mix.jsonl"
  [ -f "$WORK/redteam-squad1.jsonl" ] || "${RD[@]}" --from redteam --dataset "$SQUAD1_JSON" \
    --out "$WORK/redteam-squad1.jsonl"
  "${RD[@]}" --from generator --dataset "$SQUAD2/qa.json" --split calibration \
    --index "$EVAL_INDEX" --n-candidates "$CAL_N" --out "$WORK/cal.jsonl"
  # a sample of the red-team groups (all of them would outweigh the rest of the mix)
  "$PY" - "$WORK/redteam-squad1.jsonl" "$WORK/redteam-sample.jsonl" "$RT_Q" <<'PY'
import random, sys
lines = open(sys.argv[1]).read().splitlines()
random.Random(0).shuffle(lines)
open(sys.argv[2], "w").write("\n".join(lines[: int(sys.argv[3])]) + "\n")
PY
fi

if [[ " $STAGES " == *" pretrain "* ]]; then
  "${CITEQA[@]}" train reward --out "$WORK/rm-pre" --threads "$THREADS" --epochs 1 --batch 32 \
    --limit "$PRE_GROUPS" --data "$WORK/syn-squad1.jsonl" --data "$WORK/syn-qa-train.jsonl" \
    --data "$WORK/syn-more-train-mix.jsonl" --data "$WORK/redteam-sample.jsonl"
fi

if [[ " $STAGES " == *" mix "* ]]; then
  "$PY" - "$WORK" "$MIX_SYN" "$MIX_RT" "$SQUAD2/more-train.json" <<'PY'
import json, random, sys
from collections import defaultdict
from pathlib import Path
from citeqa.evals.squad import held_out_articles
work, n_syn, n_rt = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def groups(name):  # lines by question (candidates and their marker), in file order
    out = defaultdict(list)
    for line in (work / name).read_text().splitlines():
        r = json.loads(line)
        out[str(r.get("qid") if r.get("kind") == "question" else r.get("group"))].append(line)
    return out
more = groups("gen-more-train.jsonl")
article = {q: json.loads(ls[-1]).get("article", "") for q, ls in more.items()}
squad = json.loads(Path(sys.argv[4]).read_text())
held = held_out_articles(a["title"] for a in squad["data"])  # as more-train-mix.json
rng = random.Random(0)
syn = {}
for name in ("syn-squad1.jsonl", "syn-qa-train.jsonl", "syn-more-train-mix.jsonl"):
    syn.update(groups(name))
rt = groups("redteam-sample.jsonl")
picked = [*groups("gen-qa-train.jsonl").values(),
          *(ls for q, ls in more.items() if article[q] not in held),
          *(syn[k] for k in rng.sample(sorted(syn), min(n_syn, len(syn)))),
          *(rt[k] for k in random.Random(1).sample(sorted(rt), min(n_rt, len(rt))))]
(work / "mix.jsonl").write_text("".join(line + "\n" for ls in picked for line in ls))
(work / "heldout.jsonl").write_text("".join(line + "\n" for q, ls in more.items()
                                            if article[q] in held for line in ls))
print(f"mix: {len(picked)} groups; held out: {len(held)} more-train articles")
PY
fi

if [[ " $STAGES " == *" train "* ]]; then
  "${CITEQA[@]}" train reward --out "$WORK/rm" --base "$WORK/rm-pre" --threads "$THREADS" \
    --epochs 1 --batch 32 --data "$WORK/mix.jsonl"
fi

if [[ " $STAGES " == *" answerability "* ]]; then
  "${CITEQA[@]}" train answerability --out "$WORK/rm/answerability" --threads "$THREADS" \
    --squad "$WORK/qa-train.json" --squad "$WORK/more-train-mix.json" \
    --redteam "$WORK/redteam-squad1.jsonl.variants.jsonl" --redteam-variants "$RT_VARIANTS"
fi

if [[ " $STAGES " == *" combine "* ]]; then
  "${CITEQA[@]}" train reward-combine --data "$WORK/heldout.jsonl" --reward "$WORK/rm"
fi

if [[ " $STAGES " == *" rounds "* ]]; then
  RD=("${CITEQA[@]}" train reward-data --threads "$THREADS")
  RR=("$PY" "$ROOT/evals/reward_rounds.py")
  [ -f "$WORK/redteam-qa-train.jsonl" ] || "${RD[@]}" --from redteam \
    --dataset "$WORK/qa-train.json" --out "$WORK/redteam-qa-train.jsonl"
  base="$WORK/rm"
  while read -r name revision; do
    adapter=""  # the shipped adapter
    if [ "$revision" != "None" ]; then
      adapter="$WORK/adapter-$revision"
      [ -f "$adapter/citeqa/generation/weights/adapter.json" ] || {
        mkdir -p "$adapter" && git -C "$ROOT" archive "$revision" citeqa/generation/weights | tar -x -C "$adapter"; }
      adapter="$adapter/citeqa/generation/weights"
    fi
    "${RR[@]}" questions --round "$name" --squad2 "$SQUAD2" --out "$WORK"
    for part in qa more; do
      [ -f "$WORK/$name-$part.json" ] || continue
      CITEQA_ADAPTER="$adapter" "${RD[@]}" --from generator --dataset "$WORK/$name-$part.json" \
        --index "$WORK/train-index" --n-candidates 3 --out "$WORK/$name-gen-$part.jsonl"
    done
    "${RR[@]}" mix --round "$name" --work "$WORK"
    "${CITEQA[@]}" train reward --out "$WORK/rm-$name" --base "$base" --threads "$THREADS" \
      --epochs 1 --batch 32 --data "$WORK/$name-mix.jsonl"  # a rerun resumes
    base="$WORK/rm-$name"
  done < <("$PY" -c 'import json, sys
for r in json.load(open(sys.argv[1]))["rounds"]: print(r["name"], r["adapter_revision"])' \
    "$ROOT/evals/specs/reward_rounds.json")
  rm -rf "$WORK/rm-rounds"
  cp -r "$base" "$WORK/rm-rounds" && rm -f "$WORK/rm-rounds/progress.json"
  cp -r "$WORK/rm/answerability" "$WORK/rm-rounds/"
  "${RR[@]}" held-out --which combine --squad2 "$SQUAD2" --out "$WORK"
  "${RD[@]}" --from generator --dataset "$WORK/combine-q.json" --index "$WORK/train-index" \
    --n-candidates 3 --out "$WORK/combine.jsonl"
  "${CITEQA[@]}" train reward-combine --data "$WORK/combine.jsonl" --reward "$WORK/rm-rounds"
  RM="$WORK/rm-rounds"
fi

if [[ " $STAGES " == *" calibrate "* ]]; then
  "${CITEQA[@]}" calibrate --data "$WORK/cal.jsonl" --reward "$RM" \
    --targets "$CAL_TARGETS" --min-coverage "$CAL_MIN_COVERAGE" --delta 0.1
fi

if [[ " $STAGES " == *" publish "* ]]; then
  DEST="$ROOT/citeqa/reward/weights"
  "$PY" - "$RM" "$DEST" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
card = (dst / "MODEL_CARD.md").read_text() if (dst / "MODEL_CARD.md").is_file() else None
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("progress.json"))
if card is not None and not (dst / "MODEL_CARD.md").exists():
    (dst / "MODEL_CARD.md").write_text(card)
print(f"published {src} -> {dst}; update its MODEL_CARD.md")
PY
fi
