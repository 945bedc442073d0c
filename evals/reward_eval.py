"""Reward-model evaluation on SQuAD 2.0 (split by article): does the reward model rank and
decline better than the generator's own likelihood or the retrieval score?

Trains the reward-model variants on the train-split data, picks the shipped one by AURC on the
calibration split (never on eval), calibrates its threshold there (Learn-then-Test), and
measures on the eval split: AURC and accuracy at fixed coverages for every scorer, the
calibrated threshold's coverage and accuracy, declines of unanswerable questions, whether the
ensemble spread helps (mean - c * std), and best-of-N against greedy where the eval data has
both. Writes evals/results/reward_eval.json and (with --ship) the chosen model to --out.

    python evals/reward_eval.py --train T.jsonl --cal C.jsonl --eval E.jsonl \
        [--ship --out citeqa/reward/weights] [--target auto|0.6]

Data come from `citeqa train reward-data` (one file per split).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.evals.metrics import (  # noqa: E402
    accuracy_at_coverage,
    answered_accuracy_and_coverage,
    aurc,
    expected_calibration_error,
    paired_bootstrap_aurc,
)
from citeqa.retrieval.embed import load_embedder  # noqa: E402
from citeqa.reward.calibrate import calibrate_threshold  # noqa: E402
from citeqa.reward.data import Labelled, group_by_question, load_reward_data  # noqa: E402
from citeqa.reward.features import FeatureSpec, effective_rank, featurize  # noqa: E402
from citeqa.reward.model import save_model  # noqa: E402
from citeqa.reward.scorer import best_per_question, write_calibration  # noqa: E402
from citeqa.reward.train import TrainConfig, train_reward  # noqa: E402

COVERAGES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
VARIANTS = {  # name -> (embeddings, hidden units, soft F1 labels)
    "rm_mlp_emb": (True, 32, False),
    "rm_logistic_scalars": (False, 0, False),
    "rm_mlp_emb_f1": (True, 32, True),
    "rm_logistic_emb_f1": (True, 0, True),
    "rm_logistic_scalars_f1": (False, 0, True),
}
RESAMPLES = 2000  # bootstrap resamples for the AURC differences
BASELINES = ("generator_mean_logprob", "generator_total_logprob", "retrieval_rank")
TARGETS = tuple(round(0.9 - 0.05 * i, 2) for i in range(17))  # 0.9, 0.85, ..., 0.1


def per_question(groups: list[list[Labelled]], scores: list[float]) -> tuple[np.ndarray, ...]:
    """(best score, correct, answerable) per question for candidate ``scores`` in group order."""
    it = iter(scores)
    scored = [[(next(it), x.input.quote_valid, bool(x.label)) for x in g] for g in groups]
    best, correct = best_per_question(scored)
    answerable = np.array([g[0].answerable for g in groups])
    return best, correct, answerable


def ranked(best: np.ndarray) -> np.ndarray:
    """Best scores with never-answered questions (-inf) ranked last."""
    return np.where(np.isfinite(best), best, -1e9)


def curve(best: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    finite = ranked(best)
    out = {"aurc": aurc(finite, correct)}
    for c in COVERAGES:
        out[f"acc@{c:.1f}"] = accuracy_at_coverage(finite, correct, c)
    return out


class CachedEmbedder:
    """Wraps an embedder so each distinct text is embedded once across all variants."""

    def __init__(self, inner) -> None:
        self.inner, self.dim, self.model_id = inner, inner.dim, inner.model_id
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts, *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t, row in zip(new, self.inner.embed(new, batch_size=batch_size), strict=True):
                self.cache[t] = row
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.dim))


def clean(obj: object) -> object:
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return clean(obj.item())
    return obj


CARD = """# citeqa default reward model

Scores a cited answer (question, answer, verbatim quote) with the probability that the answer
is correct and supported; the pipeline reranks candidates by it and declines below the
calibrated threshold in `calibration.json`.

## What it is
- Variant `{variant}`: an ensemble of {members} heads ({head}) over {features}.
  Score = mean member probability, uncertainty = their standard deviation.
- Embedder: {embedder_line}
- Files: `model.safetensors` (weights and feature standardisation), `config.json` (feature spec,
  training metrics, the generator the data came from), `calibration.json` (threshold and the
  per-question calibration scores, so `threshold_for(target)` can recalibrate). No pickle.

## The generator it judges
{generators}
The features include the generator's log-probabilities, so a different generator (or prompt;
see `prompt_sha256`) needs new data and retraining.

## Data
SQuAD 2.0 (Rajpurkar et al. 2016, 2018; CC BY-SA 4.0), the 11-article subset in
`../shared/data/squad2`, retrieved against all 988 paragraphs (the articles plus 570
distractor paragraphs). Split by article, never by question: train = Normans,
Computational_complexity_theory, Huguenot, Steam_engine, 1973_oil_crisis; calibration =
European_Union_law, Packet_switching; eval = Harvard_University, Scottish_Parliament,
Imperialism, French_and_Indian_War. A candidate is correct when
`citeqa.evals.metrics.is_correct` says so (token F1 >= 0.5 against a gold answer and a verified
quote; every answer to an unanswerable question is wrong).

- train: {train_l} labelled candidates ({train_pos:.1%} correct; one greedy answer per
  question), {train_p} pairs
- calibration: {cal_q} questions; eval: {eval_q} questions

## Metrics (eval split, best candidate per question; lower AURC is better)
| scorer | AURC (cal) | AURC (eval) | acc@0.3 | acc@0.5 | acc@1.0 |
| --- | --- | --- | --- | --- | --- |
{table}

Calibrated threshold (Learn-then-Test, target accuracy {target}, delta {delta}; target
{target_chosen}): {threshold}.
On calibration it answers {cal_cov} of questions at accuracy {cal_acc}; on eval it answers
{ev_cov} at accuracy {ev_acc}, declines {unans} of unanswerable questions and answers
{ans_ok} of answerable questions correctly.

Verdict: {verdict}
{best_of_n}
## Reproduce
```
citeqa index build ../shared/data/squad2/qa.json ../shared/data/squad2/distractors.json \\
    --out .cache/squad-eval-index
Q="--dataset ../shared/data/squad2/qa.json --index .cache/squad-eval-index -n 1"
citeqa train reward-data $Q --split train --limit 300 --out train.jsonl
citeqa train reward-data $Q --split calibration --limit 250 --out cal.jsonl
citeqa train reward-data $Q --split eval --limit 150 --out eval.jsonl
citeqa train reward-data $Q --split eval --limit 40 -n 4 --greedy --out eval_n4.jsonl
python evals/reward_eval.py --train train.jsonl --cal cal.jsonl --eval eval.jsonl \\
    --best-of-n eval_n4.jsonl --ship
```
(`citeqa train reward --data train.jsonl --out DIR` and `citeqa calibrate --data cal.jsonl
--reward DIR --target T` do the same steps one at a time.)

## Limitations
- Small: trained on a few hundred candidates from one 135M generator on a busy CPU; the
  numbers above have wide confidence intervals (see the question counts).
- The guarantee of the threshold holds only for questions drawn like the calibration questions
  (SQuAD-style, these articles' kind of text); the target was chosen by looking at the
  calibration data, which weakens it slightly.
- When two generator fingerprints are listed above, the prompt changed while the data were
  being built: the training data mix both prompt versions (the newer one is the
  calibration/eval generator; see each split's `generators` in config.json/calibration.json).
- English only; judges only the answer/quote pair, not whether the quote is the best evidence.
"""


def verdict(results: dict) -> str:
    """Honest sentences: does the shipped model beat each baseline on eval AURC, beyond noise?"""
    sc = results["scorers"]
    chosen = results["chosen"]["variant"]
    mine = sc[chosen]["eval_split"]["aurc"]
    parts = []
    for name, d in results["aurc_vs_baselines"].items():
        lo, hi = d["ci95"]
        word = ("beats" if hi < 0 else "loses to" if lo > 0
                else "is better than" if d["diff"] < 0 else "is not better than")
        sure = "" if hi < 0 or lo > 0 else " (not significant: the interval includes 0)"
        parts.append(f"it {word} {name} ({sc[name]['eval_split']['aurc']:.3f}; difference "
                     f"{d['diff']:+.3f}, 95% bootstrap interval [{lo:+.3f}, {hi:+.3f}], RM lower "
                     f"in {d['share_rm_lower']:.0%} of resamples){sure}")
    acc = results["chosen"]["eval"]["accuracy_at_full_coverage"]
    return (f"eval AURC {mine:.3f}; " + "; ".join(parts)
            + f". At full coverage {acc:.1%} of eval questions are answered correctly, so the "
            "AURC of a signal that ranks at random is about {:.3f}.".format(1 - acc))


def best_of_n_text(results: dict) -> str:
    b = results.get("best_of_n")
    if not b:
        return ""
    n = b["n"]
    ms = b.get("generate_ms_median", {})
    return (f"\nBest-of-{n} (reward-model choice) vs greedy on {b['questions']} eval questions: "
            f"AURC {b[f'best_of_{n}']['aurc']:.3f} vs {b['greedy']['aurc']:.3f}, accuracy at full "
            f"coverage {b[f'best_of_{n}']['acc@1.0']:.3f} vs {b['greedy']['acc@1.0']:.3f} "
            f"(any of the {n} correct: {b[f'oracle_any_correct_of_{n}']:.3f}); median generation "
            f"{ms.get(str(n), float('nan')) / 1000:.1f} s vs {ms.get('1', float('nan')) / 1000:.1f}"
            " s per question on a shared 2-core CPU.\n")


def model_card(results: dict, extra: dict, members: int, spec: FeatureSpec) -> str:
    ch = results["chosen"]
    rows = []
    for name, r in results["scorers"].items():
        e = r["eval_split"]
        rows.append(f"| {name} | {r['calibration_split']['aurc']:.3f} | {e['aurc']:.3f} | "
                    f"{e['acc@0.3']:.3f} | {e['acc@0.5']:.3f} | {e['acc@1.0']:.3f} |")
    gens = "\n".join(f"- `{json.dumps(g, sort_keys=True)}`" for g in extra["generators"])

    def pct(x: object) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
            else f"{x:.1%}"

    d = results["data"]
    return CARD.format(
        variant=ch["variant"], members=members,
        head="logistic" if "logistic" in ch["variant"] else "one-hidden-layer MLP",
        features="MiniLM embedding products and scalar features" if spec.embeddings
        else "scalar features only",
        embedder_line=f"`{extra['embedder_id']}` (packaged, local files only)." if spec.embeddings
        else "none (this variant uses scalar features only; no embedding is computed).",
        generators=gens, verdict=verdict(results), best_of_n=best_of_n_text(results),
        train_q=d["train"]["questions"], train_l=d["train"]["labelled"],
        train_pos=d["train"]["positive_rate"], train_p=d["train"]["pairs"],
        cal_q=d["calibration"]["questions"], eval_q=d["eval"]["questions"],
        table="\n".join(rows), target=ch["target_accuracy"], delta=ch["delta"],
        target_chosen=ch["target_chosen"],
        threshold="none (declines everything)" if ch["threshold"] is None
        else f"{ch['threshold']:.4f}",
        cal_cov=pct(ch["calibration"]["coverage"]), cal_acc=pct(ch["calibration"]["accuracy"]),
        ev_cov=pct(ch["eval"]["coverage"]), ev_acc=pct(ch["eval"]["answered_accuracy"]),
        unans=pct(ch["eval"]["unanswerable_declined"]),
        ans_ok=pct(ch["eval"]["answerable_answered_correctly"]),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=Path, nargs="+", required=True)
    ap.add_argument("--cal", type=Path, nargs="+", required=True)
    ap.add_argument("--eval", type=Path, nargs="+", required=True)
    ap.add_argument("--best-of-n", type=Path, nargs="*", default=[],
                    help="eval-split data with n>1 samples and a greedy run per question")
    ap.add_argument("--embedder", default="minilm", choices=["minilm", "hash"])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--target", default="auto", help="target accuracy, or auto: the highest "
                    "of a fixed list whose certified threshold answers at least --min-coverage "
                    "of the calibration questions")
    ap.add_argument("--min-coverage", type=float, default=0.25,
                    help="with --target auto: a default that declines nearly everything is "
                    "certified but useless; require answering at least this share")
    ap.add_argument("--ship", action="store_true", help="write the chosen model to --out")
    ap.add_argument("--out", type=Path, default=ROOT / "citeqa" / "reward" / "weights")
    ap.add_argument("--results", type=Path,
                    default=ROOT / "evals" / "results" / "reward_eval.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    train, cal, ev = (load_reward_data(p) for p in (args.train, args.cal, args.eval))
    emb = CachedEmbedder(load_embedder(args.embedder))
    cal_n = max(x.n for x in cal.labelled)
    cal_groups = group_by_question(cal.labelled, cal_n)
    ev_n = 1 if any(x.n == 1 for x in ev.labelled) else max(x.n for x in ev.labelled)
    ev_groups = group_by_question(ev.labelled, ev_n)  # greedy: what the pipeline serves

    def inputs(groups: list[list[Labelled]]) -> list:
        return [x.input for g in groups for x in g]

    results: dict = {
        "data": {
            "train": {"files": [str(p) for p in args.train], "labelled": len(train.labelled),
                      "pairs": len(train.pairs), "questions": len(train.questions),
                      "positive_rate": float(np.mean([x.label for x in train.labelled]))},
            "calibration": {"files": [str(p) for p in args.cal], "questions": len(cal_groups),
                            "n_candidates": cal_n},
            "eval": {"files": [str(p) for p in args.eval], "questions": len(ev_groups),
                     "n_candidates": ev_n},
            "generators": train.generators,
        },
        "scorers": {},
    }

    # --- baselines: the generator's likelihood and the retrieval score ---------------------
    def baseline(groups: list[list[Labelled]], name: str) -> list[float]:
        xs = inputs(groups)
        if name == "generator_mean_logprob":
            return [x.logprob / max(x.n_tokens, 1) for x in xs]
        if name == "generator_total_logprob":
            return [x.logprob for x in xs]
        return [-effective_rank(x.retrieval_score, 60) for x in xs]

    scores_cal: dict[str, list[float]] = {}
    scores_ev: dict[str, list[float]] = {}
    spreads_ev: dict[str, list[float]] = {}
    for name in BASELINES:
        scores_cal[name] = baseline(cal_groups, name)
        scores_ev[name] = baseline(ev_groups, name)

    # --- reward-model variants -------------------------------------------------------------
    models = {}
    for name, (embeddings, hidden, soft) in VARIANTS.items():
        spec = FeatureSpec(embedder=args.embedder, embedding_dim=emb.dim, embeddings=embeddings)
        cfg = TrainConfig(members=args.members, hidden=hidden, epochs=args.epochs,
                          soft_labels=soft)
        t0 = time.perf_counter()
        model, metrics = train_reward(train, spec, emb if embeddings else None, cfg)
        train_s = time.perf_counter() - t0
        models[name] = (model, spec, cfg, metrics)
        for groups, store in ((cal_groups, scores_cal), (ev_groups, scores_ev)):
            x = torch.from_numpy(featurize(inputs(groups), spec, emb if embeddings else None))
            mean, std = model.predict(x)
            store[name] = mean.tolist()
            if store is scores_ev:
                spreads_ev[name] = std.tolist()
        results["scorers"].setdefault(name, {})["train"] = {**metrics, "seconds": train_s}
        print(f"trained {name} in {train_s:.1f} s: loss {metrics.get('loss_last')}")

    for name in scores_ev:
        c_best, c_correct, _ = per_question(cal_groups, scores_cal[name])
        e_best, e_correct, _ = per_question(ev_groups, scores_ev[name])
        entry = results["scorers"].setdefault(name, {})
        entry["calibration_split"] = curve(c_best, c_correct)
        entry["eval_split"] = curve(e_best, e_correct)

    # --- choose on calibration, calibrate, ship --------------------------------------------
    chosen = min(VARIANTS, key=lambda n: results["scorers"][n]["calibration_split"]["aurc"])
    model, spec, cfg, metrics = models[chosen]
    c_best, c_correct, c_answerable = per_question(cal_groups, scores_cal[chosen])
    min_answered = max(1, math.ceil(0.05 * len(cal_groups)))
    if args.target == "auto":
        def useful(t: float) -> bool:
            r = calibrate_threshold(c_best, c_correct, target_accuracy=t, delta=args.delta,
                                    min_answered=min_answered)
            return math.isfinite(r.threshold) and r.coverage >= args.min_coverage

        target = next((t for t in TARGETS if useful(t)), TARGETS[-1])
    else:
        target = float(args.target)
    cal_result = calibrate_threshold(
        c_best, c_correct, target_accuracy=target, delta=args.delta, min_answered=min_answered
    )
    threshold = cal_result.threshold

    e_best, e_correct, e_answerable = per_question(ev_groups, scores_ev[chosen])
    # Is the chosen model's AURC lead over each baseline more than resampling noise?
    results["aurc_vs_baselines"] = {}
    for name in BASELINES:
        b_best, _, _ = per_question(ev_groups, scores_ev[name])
        d = paired_bootstrap_aurc(ranked(e_best), ranked(b_best), e_correct, n=RESAMPLES)
        results["aurc_vs_baselines"][name] = {
            "diff": d.diff, "ci95": [d.low, d.high], "share_rm_lower": d.share_a_lower,
            "questions": len(ev_groups), "resamples": RESAMPLES}
    acc, cov = answered_accuracy_and_coverage(e_best, e_correct, threshold)
    answered = e_best >= threshold
    finite_probs = np.clip(np.where(np.isfinite(e_best), e_best, 0.0), 0, 1)
    results["chosen"] = {
        "variant": chosen,
        "chosen_by": "lowest AURC on the calibration split",
        "target_accuracy": target,
        "target_chosen": "auto: highest of a fixed list whose certified threshold answers at "
                         f"least {args.min_coverage:.0%} of calibration questions"
                         if args.target == "auto" else "given",
        "delta": args.delta,
        "threshold": threshold if math.isfinite(threshold) else None,
        "calibration": {"coverage": cal_result.coverage, "accuracy": cal_result.accuracy,
                        "n": cal_result.n, "answerable_share": float(c_answerable.mean()),
                        "accuracy_at_full_coverage": float(c_correct.mean())},
        "eval": {
            "coverage": cov,
            "answered_accuracy": acc,
            "accuracy_at_full_coverage": float(e_correct.mean()),
            "unanswerable_declined": float((~answered[~e_answerable]).mean())
            if (~e_answerable).any() else None,
            "answerable_answered_correctly": float((answered & e_correct)[e_answerable].mean())
            if e_answerable.any() else None,
            "answerable_share": float(e_answerable.mean()),
            "ece": expected_calibration_error(finite_probs, e_correct),
        },
    }

    # --- does the ensemble spread help the decline decision? -------------------------------
    spread = {}
    for c in (0.0, 0.5, 1.0, 2.0):
        adjusted = [m - c * s for m, s in zip(scores_ev[chosen], spreads_ev[chosen], strict=True)]
        b, corr, _ = per_question(ev_groups, adjusted)
        spread[f"mean-{c}*std"] = curve(b, corr)["aurc"]
    results["ensemble_spread_aurc"] = spread

    # --- best-of-N against greedy -----------------------------------------------------------
    if args.best_of_n:
        bon = load_reward_data(args.best_of_n)
        big = max(x.n for x in bon.labelled)
        by_q_n = {g[0].qid: g for g in group_by_question(bon.labelled, big)}
        by_q_1 = {g[0].qid: g for g in group_by_question(bon.labelled, 1)}
        common = [q for q in by_q_n if q in by_q_1]
        groups_n = [by_q_n[q] for q in common]
        groups_1 = [by_q_1[q] for q in common]
        first = [g[:1] for g in groups_n]  # one sampled candidate: N=1 at temperature
        out: dict = {"n": big, "questions": len(common)}
        for label, groups in ((f"best_of_{big}", groups_n), ("greedy", groups_1),
                              ("one_sample", first)):
            x = torch.from_numpy(featurize(inputs(groups), spec, emb if spec.embeddings else None))
            b, corr, _ = per_question(groups, model.predict(x)[0].tolist())
            out[label] = curve(b, corr)
        out[f"oracle_any_correct_of_{big}"] = float(np.mean([any(x.label for x in g)
                                                             for g in groups_n]))
        ms = {k: [q["generate_ms"][k] for q in bon.questions if k in q.get("generate_ms", {})]
              for k in (str(big), "1")}
        out["generate_ms_median"] = {k: float(np.median(v)) for k, v in ms.items() if v}
        results["best_of_n"] = out

    # --- ship -------------------------------------------------------------------------------
    if args.ship:
        tmp = args.out.with_name(args.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {
            "embedder_id": emb.model_id,
            "uncertainty_penalty": 0.0,
            "generators": train.generators,
            "data": [str(p) for p in args.train],
            "metrics": metrics,
            "variant": chosen,
        }
        save_model(tmp, model, spec, extra)
        write_calibration(
            tmp, c_best, c_correct, cal_result, min_answered=min_answered,
            extra={"data": [str(p) for p in args.cal], "n_candidates": cal_n,
                   "answerable_share": float(c_answerable.mean()),
                   "oracle_accuracy": float(c_correct.mean()), "generators": cal.generators},
        )
        (tmp / "MODEL_CARD.md").write_text(model_card(results, extra, args.members, spec))
        shutil.rmtree(args.out, ignore_errors=True)
        tmp.rename(args.out)
        print(f"shipped {chosen} to {args.out}")

    results["seconds"] = time.perf_counter() - t_start
    results["machine"] = platform.platform()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(clean(results), indent=2) + "\n")

    print(f"\n{'scorer':26}{'cal AURC':>10}{'eval AURC':>10}" +
          "".join(f"{'acc@' + format(c, '.1f'):>9}" for c in COVERAGES))
    for name, r in results["scorers"].items():
        e = r["eval_split"]
        print(f"{name:26}{r['calibration_split']['aurc']:10.3f}{e['aurc']:10.3f}" +
              "".join(f"{e[f'acc@{c:.1f}']:9.3f}" for c in COVERAGES))
    print(json.dumps(results["chosen"], indent=2, default=float))
    print("ensemble spread AURC:", spread)
    if "best_of_n" in results:
        print("best of N:", json.dumps(clean(results["best_of_n"]), indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
