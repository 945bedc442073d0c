"""Does the red-team question maker make questions like SQuAD 2.0's real unanswerables?

On the TRAIN articles of qa.json (never calibration or evaluation), with an index of them:
- made: variants of a seeded sample of the answerable questions (``citeqa/redteam/maker.py``);
- real: a seeded sample of the same articles' unanswerable questions, written by annotators.
Both are asked through the served pipeline, and the script prints the decline rate of each (per
kind for the made ones, with 95 % Wilson intervals) and writes a sample of both for reading.

    python evals/maker_validation.py --index .cache/reward/train-index \
        --questions ../shared/data/squad2/qa.json --n 120 --out evals/results/maker_validation
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True, help="SQuAD 2.0 qa.json")
    ap.add_argument("--n", type=int, default=120, help="questions asked of each group")
    ap.add_argument("--read", type=int, default=15, help="examples of each written out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from citeqa.config import Settings
    from citeqa.evals.squad import articles_for_split, load_questions
    from citeqa.pipeline import Pipeline
    from citeqa.redteam.corpus import Corpus
    from citeqa.redteam.maker import Seed, make_variants
    from citeqa.retrieval.store import Index
    from citeqa.types import AskArgs

    rng = random.Random(args.seed)
    items = load_questions(args.questions, articles_for_split("train"))
    answerable = [q for q in items if q.answerable and q.context.strip()]
    real = [q for q in items if not q.answerable]
    seeds = [Seed(q.question, q.context, q.answers[0], q.id) for q in answerable]
    idx = Index.load(args.index)
    corpus = Corpus.build([p.text for p in idx.passages])
    made = make_variants(rng.sample(seeds, min(len(seeds), 3 * args.n)), corpus, seed=args.seed)
    made = [v for v in made if not v.answerable]
    made = rng.sample(made, min(len(made), args.n))
    real = rng.sample(real, min(len(real), args.n))

    pipeline = Pipeline.from_settings(Settings(index=args.index))
    asked = [v.question for v in made] + [q.question for q in real]
    answers = []
    for i in range(0, len(asked), 4):
        answers.extend(pipeline.ask_many([AskArgs(q) for q in asked[i:i + 4]]))
        print(f"\r{len(answers)}/{len(asked)} asked", end="", flush=True)
    print()
    declined = [a.declined for a in answers]
    made_declined, real_declined = declined[: len(made)], declined[len(made):]

    by_kind: dict[str, list[bool]] = defaultdict(list)
    for v, d in zip(made, made_declined, strict=True):
        by_kind[v.kind].append(d)
    rows = [("real SQuAD 2.0 unanswerables", real_declined), ("made (all kinds)", made_declined)]
    rows += [(f"made: {k}", v) for k, v in sorted(by_kind.items())]
    lines = ["| questions | n | declined | 95 % interval |", "| --- | ---: | ---: | --- |"]
    figures = {}
    for name, ds in rows:
        k, n = sum(ds), len(ds)
        lo, hi = wilson(k, n)
        figures[name] = {"n": n, "declined": k / n if n else None, "ci95": [lo, hi]}
        lines.append(f"| {name} | {n} | {k / n:.1%} | {lo:.1%}–{hi:.1%} |")
    table = "\n".join(lines)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"index": str(args.index), "seed": args.seed, "threshold": pipeline.decline_threshold(),
         "figures": figures}, indent=2) + "\n")
    with (args.out / "samples.md").open("w") as f:
        f.write("# Made variants vs real unanswerables (train articles)\n\n" + table + "\n\n")
        f.write("## Made\n\n")
        for v, a in list(zip(made, answers[: len(made)], strict=True))[: args.read]:
            f.write(f"- [{v.kind}] {v.question}  \n  from: {v.original}  \n  change: {v.change}"
                    f"  \n  citeqa: {'declined' if a.declined else repr(a.answer)}\n")
        f.write("\n## Real\n\n")
        for q, a in list(zip(real, answers[len(made):], strict=True))[: args.read]:
            f.write(f"- {q.question}  \n  citeqa: {'declined' if a.declined else repr(a.answer)}\n")
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'samples.md'}")


if __name__ == "__main__":
    main()
