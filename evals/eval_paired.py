"""Paired comparison of two runs on the answerable questions they share.

    python evals/eval_paired.py A B

A and B are both `citeqa eval` predictions (predictions.jsonl or its .gz copy: the records the
run's metrics cover), or both
`evals/generation_quality.py` outputs (.json; their constrained mode). For an eval run the best
candidate (the first) of each answerable question is judged two ways: right (token F1 >= 0.5
against a gold answer, the project's rule) and whether its quote holds a gold answer
(`citeqa.evals.report.contains_gold`); a generation-quality run carries its own judgements
(right, quote holds a gold answer, EM, F1). Prints each rate and B - A with a paired bootstrap
95 % interval (10,000 resamples, seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from citeqa.evals import metrics as M
from citeqa.evals.compare import covered_predictions
from citeqa.evals.report import contains_gold

#: generation_quality.py record fields, by the name printed for them
QUALITY_FIELDS = {
    "best candidate right": "right",
    "quote holds a gold answer": "quote_has_answer",
    "EM": "em",
    "F1": "f1",
}


def best_right(record: dict) -> bool:
    best = (record.get("candidates") or [None])[0]
    return bool(best) and M.is_correct(
        best["answer"], record["gold_answers"], quote_valid=bool(best.get("quote"))
    )


def best_holds_gold(record: dict) -> bool:
    best = (record.get("candidates") or [None])[0]
    return bool(
        best and best.get("quote") and contains_gold(best["quote"]["text"], record["gold_answers"])
    )


def quality_field(record: dict, field: str) -> object:
    """A generation-quality record's ``field``; "right" judged by the same rule where a file
    written before the script recorded it lacks it (its answer, golds and verified quote)."""
    if field == "right" and field not in record:
        return M.is_correct(record["answer"], record["golds"], quote_valid=record["verified"])
    return record[field]


def judged(path: Path) -> dict[str, dict[str, float]]:
    """{question id: {measure: value}} for the answerable questions of one run."""
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))["modes"]["constrained"]["records"]
        return {r["id"]: {k: float(quality_field(r, f)) for k, f in QUALITY_FIELDS.items()}
                for r in records}
    # the records its metrics cover, a line cut short by a crash left out (the runner's rules)
    records = [r for r in covered_predictions(path).values() if r["answerable"]]
    return {
        r["id"]: {
            "best candidate right": float(best_right(r)),
            "quote holds a gold answer": float(best_holds_gold(r)),
        }
        for r in records
    }


def paired(a: np.ndarray, b: np.ndarray, resamples: int = 10_000) -> tuple[float, float, float]:
    diff = b.astype(float) - a.astype(float)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", type=Path, help="run A: predictions.jsonl or a quality .json")
    parser.add_argument("b", type=Path, help="run B: the same kind of file")
    args = parser.parse_args()
    if (args.a.suffix == ".json") != (args.b.suffix == ".json"):
        raise SystemExit("error: A and B must be the same kind of run (.jsonl or .json)")
    run_a, run_b = judged(args.a), judged(args.b)
    ids = sorted(set(run_a) & set(run_b))
    if not ids:
        raise SystemExit("error: the two runs share no answerable question")
    for name in run_a[ids[0]]:
        a = np.array([run_a[i][name] for i in ids])
        b = np.array([run_b[i][name] for i in ids])
        mean, low, high = paired(a, b)
        print(
            f"{name}: {100 * a.mean():.1f} % -> {100 * b.mean():.1f} % "
            f"({100 * mean:+.1f} points, 95 % [{100 * low:+.1f}, {100 * high:+.1f}]; "
            f"{len(ids)} questions)"
        )


if __name__ == "__main__":
    main()
