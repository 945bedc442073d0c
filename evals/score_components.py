"""Where a served score comes from: each input's share of the reward model's combination for the
best candidate of every answerable question of an evaluation run, right ones against wrong ones.

    python evals/score_components.py RUN_DIR INDEX_DIR [RM_DIR]

RUN_DIR is a `citeqa eval` run (its predictions.jsonl), INDEX_DIR the index it searched (the
verifier reads the passage around each quote), RM_DIR the reward model (default: the shipped
one; it must have a combine.json). A candidate is right by the correctness rule's F1 >= 0.5.
Each input's share is its weight times its standardised value (logits; the score is the
sigmoid of their sum plus the bias). The figures behind docs/measurements.md's paragraph on
the embedded docs' questions:

    python evals/score_components.py evals/results/corpus-questions index/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from citeqa.evals.metrics import f1  # noqa: E402
from citeqa.retrieval.store import Index  # noqa: E402
from citeqa.reward.combine import Signals, features  # noqa: E402
from citeqa.reward.scorer import DEFAULT_DIR, VerifierScorer, judged  # noqa: E402
from citeqa.types import Candidate  # noqa: E402


def main(run: Path, index_dir: Path, rm_dir: Path) -> None:
    index = Index.load(index_dir)
    scorer = VerifierScorer(rm_dir)
    combiner = scorer.combiner
    if combiner is None:
        raise SystemExit(f"{rm_dir} has no combine.json: its score is the verifier's alone")
    print("inputs:", ", ".join(combiner.inputs), f"| bias {combiner.bias:+.2f} | threshold "
          f"{scorer.threshold:.3f}")
    shares: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for line in (run / "predictions.jsonl").open():
        p = json.loads(line)
        if not p["gold_answers"] or not p["candidates"] or not p["candidates"][0]["quote"]:
            continue
        c = Candidate.from_json(p["candidates"][0])
        item = judged(p["question"], c, index.documents.__getitem__)
        verifier, _ = scorer.predict([item])
        reader = scorer.answerability.logits([item]) if scorer.answerability else None
        x = features(verifier, [Signals.of_candidate(c)], reader)
        share = combiner.shares(x)[0]  # a NaN input counts as its mean (0), as in the score
        right = f1(c.answer, p["gold_answers"]) >= 0.5
        shares[right].append(share)
        print(f"{'right' if right else 'wrong'} {float(combiner(x)[0]):.3f} "
              + " ".join(f"{v:+.2f}" for v in share) + f"  {p['question'][:60]!r} -> {c.answer!r}")
    for right in (True, False):
        if shares[right]:
            mean = np.mean(shares[right], axis=0)
            print(f"mean share, {len(shares[right])} {'right' if right else 'wrong'}: "
                  + " ".join(f"{v:+.2f}" for v in mean) + f"  (sum {mean.sum():+.2f})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]),
         Path(sys.argv[3]) if len(sys.argv) == 4 else DEFAULT_DIR)
