"""The verifier against the generator's own signals, and combinations of them, on generator
candidates that carry signals (`citeqa train reward-data --from generator`).

    python evals/reward_signals_study.py RM_DIR FIT.jsonl[,...] TEST.jsonl[,...] [THRESHOLD]

Scores every candidate with the verifier in RM_DIR alone, fits the combination
(citeqa/reward/combine.py) over several input subsets on FIT, and reports AUROC, AURC and
coverage at 80 % accuracy of each on TEST, beside the oracle, RM_DIR as served (its combine.json
and answerability reader, when it has them) and the serving reward model's score recorded with
the data (``rm_score``); then the paired bootstrap of served minus recorded AURC, and where each
of the two loses: right vs wrong among answerable questions, answerable vs unanswerable
questions, and, at THRESHOLD (default: RM_DIR's calibrated one), what share of the answers it
lets through are to unanswerable questions.
The figures behind citeqa/reward/weights/MODEL_CARD.md:

    python evals/reward_signals_study.py citeqa/reward/weights .cache/reward/heldout.jsonl \\
        .cache/reward/cal.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from citeqa.evals.metrics import (  # noqa: E402
    aurc,
    auroc,
    coverage_at_accuracy,
    oracle_scores,
    paired_bootstrap_aurc,
)
from citeqa.reward.combine import INPUTS, Signals, features, fit  # noqa: E402
from citeqa.reward.data import load_verifier_data  # noqa: E402
from citeqa.reward.scorer import VerifierScorer  # noqa: E402

SUBSETS = {
    "verifier + mean log-probability": [0, 1],
    "verifier + all generator signals": [0, 1, 2, 3],
    "generator signals, no verifier": [1, 2, 3],
}


def load(scorer: VerifierScorer, arg: str):
    data = load_verifier_data(arg.split(","))
    examples = [e for e in data.examples if e.signals]
    answerable = {str(q.get("qid")): bool(q.get("answerable")) for q in data.questions}
    signals = [Signals.of(e.signals) for e in examples]
    served, _ = scorer.judge([e.judged for e in examples], signals)
    alone, _ = scorer.predict([e.judged for e in examples])  # the verifier without combine.json
    y = np.array([e.label for e in examples])
    recorded = np.array([e.signals.get("rm_score", 0.0) for e in examples])
    a = np.array([answerable.get(e.group, bool(e.golds)) for e in examples])
    return features(alone, signals), y, alone, served, recorded, a


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    scorer = VerifierScorer(Path(sys.argv[1]))
    xf, yf, *_ = load(scorer, sys.argv[2])
    xt, yt, alone, served, recorded, answerable = load(scorer, sys.argv[3])
    print(f"fit: {len(yf)} candidates, {yf.mean():.1%} right; "
          f"test: {len(yt)} candidates, {yt.mean():.1%} right")

    def row(name: str, s) -> None:
        print(f"{name:40s} AUROC {auroc(s, yt):.3f}  AURC {aurc(s, yt):.3f}  "
              f"cov@80% {coverage_at_accuracy(s, yt, 0.8):.1%}")

    row("oracle", np.array(oracle_scores(yt)))
    row(f"{sys.argv[1]} as served", served)
    row("verifier alone", alone)
    row("recorded serving RM (rm_score)", recorded)
    row("generator mean log-probability", xt[:, 1])
    for name, cols in SUBSETS.items():
        c = fit(xf[:, cols], yf)
        row(f"fitted: {name}", c(xt[:, cols]))
        print("    weights", {INPUTS[i]: round(w, 2) for i, w in zip(cols, c.weights, strict=True)})
    d = paired_bootstrap_aurc(served, recorded, yt)
    print(f"AURC served - recorded: {d.diff:+.3f}, 95 % paired bootstrap [{d.low:+.3f}, "
          f"{d.high:+.3f}]")
    threshold = float(sys.argv[4]) if len(sys.argv) == 5 else scorer.threshold
    a, right = answerable, yt == 1
    for name, s in (("served", served), ("recorded", recorded)):
        print(f"{name:9s} right vs wrong among answerable {auroc(s[a], yt[a]):.3f}; answerable vs "
              f"unanswerable {auroc(s, a.astype(int)):.3f}; a wrong answer to an answerable "
              f"question vs an answer to an unanswerable one "
              f"{auroc(s[~right], a[~right].astype(int)):.3f}")
    if threshold is not None:
        m = served >= threshold
        print(f"served at {threshold:.3f}: answers {m.mean():.1%} of candidates, "
              f"{yt[m].mean():.1%} right; {(~a[m]).mean():.1%} of them to unanswerable "
              f"questions; declines {(~m[~a]).mean():.1%} of the answers to unanswerable ones")


if __name__ == "__main__":
    main()
