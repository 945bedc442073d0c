"""The reward model against its baselines, on the candidates of one `citeqa eval` run.

    python evals/reward_compare.py RUN_DIR [--reward DIR] [--out FILE.json]

For every question of the run, the best candidate (the one the pipeline ranked first) is scored
by: the shipped reward model (``Answer.score`` as recorded), the generator's mean token
log-probability, the retrieval score of the quoted passage, the PREVIOUS shipped reward model
(5 logistic heads on 11 scalar features, the weights kept in evals/results/previous_rm and
re-implemented here, so that it needs none of its old code), and the oracle (a perfect ranking
of the same candidates). Reported for each: AURC, AUROC (right vs wrong best candidates),
coverage at 80 % answered accuracy, and the reward model's AURC minus each other's with a 95 %
paired bootstrap interval. Run it on a run with one candidate a question, so that every scorer
judges exactly the same answers.

``--reward DIR`` also scores the same candidates with a reward-model directory that is not (yet)
the shipped one, e.g. a verifier fresh from ``citeqa train reward``, with the documents of the
run's index as context; it is then the model the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.evals.compare import covered_predictions  # noqa: E402
from citeqa.evals.metrics import (  # noqa: E402
    aurc,
    auroc,
    coverage_at_accuracy,
    is_correct,
    oracle_scores,
    paired_bootstrap_aurc,
)
from citeqa.text import normalize_answer, term_share  # noqa: E402

PREVIOUS = ROOT / "evals" / "results" / "previous_rm"


def previous_rm(question: str, c: dict) -> float:
    """The previous shipped reward model's score of a candidate record (its 11 scalars)."""
    from safetensors.numpy import load_file

    w = _weights(load_file)
    lp, mean = float(c.get("logprob") or 0.0), float(c.get("mean_logprob") or 0.0)
    n = round(lp / mean) if mean else 0
    quote = (c.get("quote") or {}).get("text", "")
    answer, score = c["answer"], float(c.get("retrieval_score") or 0.0)
    rank = 200.0 if score <= 0 else min(max(2.0 / score - 60, 1.0), 200.0)
    na, nq = normalize_answer(answer), normalize_answer(quote)
    x = np.array([
        min(max(lp / max(n, 1), -10.0), 0.0), min(max(lp / 10.0, -10.0), 0.0),
        math.log1p(max(n, 0)), math.log1p(rank), float(bool(na) and na in nq),
        term_share(question, quote), term_share(answer, question),
        math.log1p(len(answer.split())), math.log1p(len(quote)), 1.0,
        float(not answer.strip()),
    ], dtype=np.float32)
    z = (x - w["mean"]) / w["std"]
    logits = np.einsum("d,kd->k", z, w["w1"][:, :, 0]) + w["b1"][:, 0]
    return float(np.mean(1 / (1 + np.exp(-logits))))


_CACHE: dict[str, dict[str, np.ndarray]] = {}


def _weights(load_file) -> dict[str, np.ndarray]:
    if not _CACHE:
        _CACHE.update(load_file(str(PREVIOUS / "model.safetensors")))
    return _CACHE


def candidate_scorer(run: Path, reward: Path):
    """score(question, best candidate record) with the reward model in ``reward``."""
    from citeqa.retrieval.store import Index
    from citeqa.reward.scorer import load_scorer
    from citeqa.types import Candidate

    index = json.loads((run / "run.json").read_text())["index"]
    docs = Index.load(Path(index)).documents
    scorer = load_scorer(str(reward))

    def score(question: str, c: dict) -> float:
        return float(scorer.score(question, [Candidate.from_json(c)], docs.__getitem__)[0].score)

    return score


def compare(run: Path, reward: Path | None = None) -> dict:
    records = list(covered_predictions(run).values())
    neg = -math.inf
    scores: dict[str, list[float]] = {k: [] for k in ("reward model", "generator likelihood",
                                                      "retrieval score", "previous RM")}
    right = []
    for r in records:
        best = (r.get("candidates") or [None])[0]
        ok = best is not None and best.get("quote") is not None
        right.append(ok and is_correct(best["answer"], r["gold_answers"], quote_valid=True))
        scores["reward model"].append(  # null: the reward model failed on it (NaN)
            float(best["score"]) if ok and best.get("score") is not None else neg)
        scores["generator likelihood"].append(float(best["mean_logprob"]) if ok else neg)
        scores["retrieval score"].append(float(best["retrieval_score"]) if ok else neg)
        scores["previous RM"].append(previous_rm(r["question"], best) if ok else neg)
    if reward is not None:  # the model under test becomes "reward model"; the run's is "shipped"
        score = candidate_scorer(run, reward)
        scores["shipped RM"] = scores.pop("reward model")
        scores["reward model"] = [score(r["question"], r["candidates"][0]) if s > neg else neg
                                  for r, s in zip(records, scores["generator likelihood"],
                                                  strict=True)]
    scores["oracle"] = oracle_scores(right)
    out = {"run": str(run), "questions": len(records), "best_right": float(np.mean(right)),
           "scorers": {}, "reward_model_minus": {}}
    for name, s in scores.items():
        out["scorers"][name] = {"aurc": aurc(s, right), "auroc": auroc(s, right),
                                "coverage_at_80": coverage_at_accuracy(s, right, 0.8)}
    for name in [n for n in scores if n not in ("reward model", "oracle")]:
        d = paired_bootstrap_aurc(scores["reward model"], scores[name], right)
        out["reward_model_minus"][name] = {"diff": d.diff, "low": d.low, "high": d.high,
                                           "beyond_noise": d.high < 0 or d.low > 0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--reward", type=Path, help="a reward-model directory to judge instead of "
                    "the run's own scores")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = compare(args.run, args.reward)
    print(f"{result['questions']} questions, best candidate right {result['best_right']:.1%}")
    print(f"{'scorer':<22}{'AURC':>8}{'AUROC':>8}{'cov@80%':>9}")
    for name, s in result["scorers"].items():
        au = "   n/a" if s["auroc"] is None else f"{s['auroc']:8.3f}"
        print(f"{name:<22}{s['aurc']:8.3f}{au}{s['coverage_at_80']:9.1%}")
    for name, d in result["reward_model_minus"].items():
        print(f"RM - {name}: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
              + (" beyond noise" if d["beyond_noise"] else ""))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
