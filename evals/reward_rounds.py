"""The verifier's further training rounds, as run: their questions and their training mixes.

``evals/specs/reward_rounds.json`` records each round the shipped verifier went through after
``evals/train_reward.sh``'s first training (D, L, M; docs/measurements.md, "The verifier
trained on three more rounds of the generator's mistakes"): the SQuAD questions whose
generator candidates it trained on, the adapter that answered them, and its training mix in
order (``gen:KEY`` those candidates, ``syn:KEY`` a synthetic group, ``rt:KEY`` a red-team
group). ``evals/train_reward.sh`` (stage ``rounds``) uses
this script to rebuild them:

    python evals/reward_rounds.py questions --round D --squad2 DIR --out WORK  # D-qa/more.json
    python evals/reward_rounds.py mix --round D --work WORK                    # D-mix.jsonl
    python evals/reward_rounds.py held-out --which combine --squad2 DIR --out WORK  # combine-q.json
    python evals/reward_rounds.py held-out --which test --squad2 DIR --out WORK     # test-q.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

SPEC = Path(__file__).parent / "specs" / "reward_rounds.json"
# where each part of a round's questions comes from, and the generator data file it becomes
PARTS = {"qa": "qa.json", "more": "more-train.json"}
# the synthetic and red-team files of evals/train_reward.sh the mixes sample (by group key)
SYNTHETIC = ("syn-qa-train.jsonl", "syn-more-train-mix.jsonl")
REDTEAM = ("redteam-qa-train.jsonl",)


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    return json.loads(path.read_text())


def round_spec(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for r in spec["rounds"]:
        if r["name"] == name:
            return r
    names = [r["name"] for r in spec["rounds"]]
    raise SystemExit(f"no round {name!r} in the spec; rounds: {names}")


def subset(squad: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """The SQuAD file with only the questions ``ids`` (paragraphs and articles without any of
    them dropped); every id must be there."""
    wanted = set(ids)
    out = {**squad, "data": []}
    found = 0
    for article in squad["data"]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = [q for q in p["qas"] if q["id"] in wanted]
            found += len(qas)
            if qas:
                paragraphs.append({**p, "qas": qas})
        if paragraphs:
            out["data"].append({**article, "paragraphs": paragraphs})
    if found != len(wanted):
        raise SystemExit(f"{len(wanted) - found} of {len(wanted)} questions are not in the data")
    return out


def group_key(row: dict[str, Any]) -> str:
    return str(row.get("qid") if row.get("kind") == "question" else row.get("group"))


def kind_of(row: dict[str, Any]) -> str:
    """gen (a generator candidate or its question marker), syn or rt."""
    source = str(row.get("source") or "generator")
    if row.get("kind") == "question" or source == "generator":
        return "gen"
    return {"synthetic": "syn", "redteam": "rt"}[source.split(":", 1)[0]]


def groups(paths: list[Path]) -> dict[str, list[str]]:
    """``kind:key`` -> its lines, in file order, over ``paths``."""
    out: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[f"{kind_of(row)}:{group_key(row)}"].append(line)
    return out


def build_mix(items: list[str], found: dict[str, list[str]]) -> list[str]:
    """The mix's lines: each item's group in the spec's order; every item must be found."""
    missing = [i for i in items if i not in found]
    if missing:
        raise SystemExit(f"{len(missing)} groups of the mix are missing, e.g. {missing[:3]}; "
                         "run the round's data first")
    return [line for item in items for line in found[item]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=SPEC)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("questions", help="write ROUND-qa.json / ROUND-more.json into --out")
    q.add_argument("--round", required=True)
    q.add_argument("--squad2", type=Path, required=True, help="the folder of qa.json")
    q.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("mix", help="write WORK/ROUND-mix.jsonl from the round's candidates "
                       "(WORK/ROUND-gen-*.jsonl) and the synthetic and red-team files")
    m.add_argument("--round", required=True)
    m.add_argument("--work", type=Path, required=True)
    c = sub.add_parser("held-out", help="write combine-q.json (the combination's questions) or "
                       "test-q.json (the questions the rounds were judged on) into --out")
    c.add_argument("--which", choices=("combine", "test"), required=True)
    c.add_argument("--squad2", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    if args.command == "questions":
        r = round_spec(spec, args.round)
        args.out.mkdir(parents=True, exist_ok=True)
        for part, ids in r["questions"].items():
            squad = json.loads((args.squad2 / PARTS[part]).read_text())
            (args.out / f"{r['name']}-{part}.json").write_text(json.dumps(subset(squad, ids)))
            print(f"{r['name']}-{part}.json: {len(ids)} questions")
    elif args.command == "mix":
        r = round_spec(spec, args.round)
        sources = [args.work / f"{r['name']}-gen-{part}.jsonl" for part in r["questions"]]
        sources += [args.work / name for name in (*SYNTHETIC, *REDTEAM)]
        lines = build_mix(r["mix"], groups(sources))
        (args.work / f"{r['name']}-mix.jsonl").write_text("".join(f"{x}\n" for x in lines))
        print(f"{r['name']}-mix.jsonl: {len(r['mix'])} groups, {len(lines)} lines")
    else:
        squad = json.loads((args.squad2 / PARTS["more"]).read_text())
        ids = spec[f"{args.which}_questions"]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.which}-q.json").write_text(json.dumps(subset(squad, ids)))
        print(f"{args.which}-q.json: {len(ids)} questions")


if __name__ == "__main__":
    main()
