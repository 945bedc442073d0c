"""The evaluation report: judge each prediction, aggregate the metrics, write metrics.json,
report.md and the figures.

Judging and aggregation are pure functions over prediction records (the lines of
predictions.jsonl) and a document lookup (to check quotes against the index); the metric
functions themselves live in citeqa/evals/metrics.py. Every number is defined in the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from citeqa.atomic import write_text_atomic
from citeqa.evals import metrics as M
from citeqa.text import answer_tokens
from citeqa.types import Document

COVERAGES = (1.0, 0.8, 0.67, 0.5)  # fixed coverages for answered accuracy
TARGET_ACCURACIES = (0.8, 0.9)  # answered accuracies for "coverage at accuracy"
RECALL_KS = (1, 3, 5, 10, 20)
ECE_BINS = 10
SCORERS = {  # curve name -> label in the report and figures
    "rm": "RM score (Answer.score)",
    "likelihood": "generator likelihood (mean token logprob)",
    "retrieval": "retrieval score (fused)",
}
FIGURES = {
    "accuracy_coverage": "accuracy_coverage.png",
    "reliability": "reliability.png",
    "recall": "retrieval_recall.png",
}


@dataclass(frozen=True)
class Judged:
    """One prediction, judged."""

    id: str
    answerable: bool
    declined: bool
    exact: float  # SQuAD EM of the given answer ("" when declined)
    f1: float  # SQuAD F1 of the given answer
    correct: bool  # the correctness rule on what was returned at the configured threshold
    quote_valid: bool | None  # answered: quote verbatim at its offsets; None when declined
    quote_has_gold: bool | None  # answered and answerable: quote contains a gold answer
    best_correct: bool  # would the best candidate be correct if it were given
    supported: bool | None  # answered: the answer stands verbatim in its quote; None declined
    any_correct: bool  # some candidate (verified quote) would be correct: best-of-N's ceiling
    candidates: int  # how many candidates were generated
    scores: dict[str, float]  # curve name -> best candidate's score (-inf: nothing verifiable)
    probability: float | None  # RM score in [0, 1] of a verifiable best candidate, for ECE
    gold_rank: int | None  # rank of the gold paragraph in retrieval, None = not in the top
    has_context: bool  # the gold paragraph is known (gold_rank is meaningful)
    latency_ms: float | None
    refused: bool = False  # refused (empty, too long) or its generator failed: a decline


# --- judging ----------------------------------------------------------------------------------


def quote_is_valid(quote: dict[str, Any] | None, document: Callable[[str], Document]) -> bool:
    """Whether a quote's text is its document's text at its offsets, in the index."""
    if not quote:
        return False
    try:
        doc = document(quote["doc_id"])
    except KeyError:
        return False
    return doc.text[quote["start"] : quote["end"]] == quote["text"]


def contains_gold(quote_text: str, golds: Sequence[str]) -> bool:
    """Whether a normalized gold answer occurs as whole tokens in the normalized quote
    (``answer_tokens``: words, and each CJK character; a gold was looked for between spaces,
    so never found in Chinese or Japanese text)."""
    q = answer_tokens(M.normalize_answer(quote_text))
    for gold in golds:
        g = answer_tokens(M.normalize_answer(gold))
        if g and any(q[i:i + len(g)] == g for i in range(len(q) - len(g) + 1)):
            return True
    return False


def judge(record: dict[str, Any], document: Callable[[str], Document]) -> Judged:
    """Judge one predictions.jsonl record (see the report's definitions)."""
    golds = record["gold_answers"]
    declined = bool(record["declined"])
    given = None if declined else record["answer"]
    quote_valid = None if declined else quote_is_valid(record["quote"], document)
    candidates = record.get("candidates") or []
    best: dict[str, Any] = candidates[0] if candidates else {}
    best_verifiable = best.get("quote") is not None
    best_valid = best_verifiable and quote_is_valid(best["quote"], document)
    best_answer = best["answer"] if best_verifiable else None
    neg = -math.inf
    rm = best.get("score") if best_verifiable else None
    scores = {
        "rm": float(rm) if rm is not None else neg,
        "likelihood": float(best["mean_logprob"]) if best_verifiable else neg,
        "retrieval": float(best["retrieval_score"]) if best_verifiable else neg,
    }
    latency = (record.get("timings_ms") or {}).get("total_ms")
    answerable = any(M.normalize_answer(g) for g in golds)
    return Judged(
        id=str(record["id"]),
        answerable=answerable,
        declined=declined,
        exact=M.exact_match(given, golds),
        f1=M.f1(given, golds),
        correct=M.is_correct(given, golds, quote_valid=bool(quote_valid)),
        quote_valid=quote_valid,
        quote_has_gold=(
            None if declined or not answerable else contains_gold(record["quote"]["text"], golds)
        ),
        best_correct=best_answer is not None
        and M.is_correct(best_answer, golds, quote_valid=best_valid),
        # records written before answers carried offsets say nothing: unknown, not "no"
        supported=(None if declined or "answer_start" not in record
                   else record["answer_start"] is not None),
        any_correct=any(c.get("quote") is not None
                        and M.is_correct(c["answer"], golds, quote_valid=True)
                        for c in candidates),
        candidates=len(candidates),
        scores=scores,
        probability=float(rm) if rm is not None and 0.0 <= rm <= 1.0 else None,
        gold_rank=record.get("gold_rank"),
        has_context=bool(record.get("has_context")),
        latency_ms=float(latency) if latency is not None else None,
        refused=declined and str(record.get("reason") or "").startswith(M.REFUSED),
    )


# --- aggregation -----------------------------------------------------------------------------


def _mean(values: Sequence[float | bool]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def selective(scores: Sequence[float], correct: Sequence[bool]) -> dict[str, Any]:
    """AURC, AUROC, answered accuracy at fixed coverages, coverage at target accuracies, the
    curve."""
    cov, acc, _ = M.risk_coverage_curve(scores, correct)
    return {
        "aurc": M.aurc(scores, correct),
        "auroc": M.auroc(scores, correct),
        "accuracy_at_coverage": {
            f"{c:.0%}": M.accuracy_at_coverage(scores, correct, c) for c in COVERAGES
        },
        "coverage_at_accuracy": {
            f"{a:.0%}": M.coverage_at_accuracy(scores, correct, a) for a in TARGET_ACCURACIES
        },
        "curve": {"coverage": cov.tolist(), "accuracy": acc.tolist()},
    }


def summarize(judged: Sequence[Judged], threshold: float | str | None) -> dict[str, Any]:
    """All metrics of a run as a JSON-ready dict (None where a metric is undefined)."""
    if not judged:
        raise ValueError("no predictions to summarize")
    n = len(judged)
    ans = [j for j in judged if j.answerable]
    unans = [j for j in judged if not j.answerable]
    given = [j for j in judged if not j.declined]
    best_correct = [j.best_correct for j in judged]
    out: dict[str, Any] = {
        "questions": n,
        "answerable": len(ans),
        "unanswerable": len(unans),
        "refused": sum(j.refused for j in judged),  # not asked: counted as declines
        "threshold": threshold,
        "squad": {
            "exact": _mean([j.exact for j in judged]),
            "f1": _mean([j.f1 for j in judged]),
            "has_ans_exact": _mean([j.exact for j in ans]),
            "has_ans_f1": _mean([j.f1 for j in ans]),
            "no_ans_accuracy": _mean([j.exact for j in unans]),
        },
        "accuracy": _mean([j.correct for j in judged]),
        "at_threshold": {
            "answered_accuracy": _mean([j.correct for j in given]),
            "coverage": len(given) / n,
            "answered": len(given),
        },
        "unanswerable_declined": _mean([j.declined for j in unans]),
        "quotes": {
            "valid": _mean([bool(j.quote_valid) for j in given]),
            "contains_gold": _mean(
                [bool(j.quote_has_gold) for j in given if j.quote_has_gold is not None]
            ),
        },
        "always_answer_accuracy": _mean(best_correct),
        "candidates": {  # over answerable questions: the best candidate, any candidate
            "per_question": _mean([j.candidates for j in judged]),
            "best_right": _mean([j.best_correct for j in ans]),
            "any_right": _mean([j.any_correct for j in ans]),
        },
        "selective": {
            name: selective([j.scores[name] for j in judged], best_correct) for name in SCORERS
        },
        # a perfect ranking of the same best candidates: the best any decline signal can do
        "oracle": selective(M.oracle_scores(best_correct), best_correct),
        "rm_vs": {  # AURC(RM) - AURC(other), with a 95 % paired bootstrap interval
            name: asdict(M.paired_bootstrap_aurc([j.scores["rm"] for j in judged],
                                                 [j.scores[name] for j in judged], best_correct))
            for name in SCORERS if name != "rm"
        },
    }
    out["quotes"]["supported"] = _mean([bool(j.supported) for j in given
                                        if j.supported is not None])
    scored = [j for j in judged if j.probability is not None]
    if scored:
        probs = [j.probability for j in scored if j.probability is not None]
        corr = [j.best_correct for j in scored]
        bins = M.reliability_bins(probs, corr, ECE_BINS)
        out["calibration"] = {
            "ece": M.expected_calibration_error(probs, corr, ECE_BINS),
            "questions": len(scored),
            "bins": [
                {
                    "lo": b.lo,
                    "hi": b.hi,
                    "mean_confidence": _finite(b.mean_confidence),
                    "accuracy": _finite(b.accuracy),
                    "count": b.count,
                }
                for b in bins
            ],
        }
    else:
        out["calibration"] = {"ece": None, "questions": 0, "bins": []}
    with_context = [j for j in ans if j.has_context]
    out["retrieval"] = {
        "questions": len(with_context),
        **{
            f"recall@{k}": _mean(
                [j.gold_rank is not None and j.gold_rank <= k for j in with_context]
            )
            for k in RECALL_KS
        },
        "mrr": _mean([1.0 / j.gold_rank if j.gold_rank else 0.0 for j in with_context]),
    }
    lat = [j.latency_ms for j in judged if j.latency_ms is not None]
    out["latency_ms"] = {
        "p50": M.percentile(lat, 50) if lat else None,
        "p95": M.percentile(lat, 95) if lat else None,
        "questions": len(lat),
    }
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# --- report.md ---------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: float | str | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else x if isinstance(x, str) else format(x, fmt)


DEFINITIONS = """\
## Definitions

- **Correctness rule** (`citeqa.evals.metrics.is_correct`): an answerable question is answered
  correctly when an answer is given, its SQuAD F1 against the gold answers is at least 0.5 and
  its quote is verbatim in the index document at its offsets; for an unanswerable question only
  a decline is correct.
- **SQuAD EM / F1**: the official SQuAD 2.0 normalization (lowercase, no punctuation, no
  a/an/the, collapsed whitespace) and its no-answer convention: a decline is the empty
  prediction, which scores 1 on an unanswerable question and 0 on an answerable one. Mean over
  all questions; "has-answer" over answerable ones; "no-answer accuracy" is the official
  NoAns exact: over unanswerable questions, the share whose prediction is empty after
  normalisation (a decline, or an answer such as "The").
- **Accuracy**: the correctness rule over all questions, declines included.
- **Answered accuracy / coverage at the threshold**: among the questions the system answered at
  its configured threshold, the share correct; coverage is the share answered.
- **Selective curves**: each question's *would-be correctness* is that of its best candidate
  (the first one, best first) as if it were given, even when the system declined it at the
  threshold, so the curves span coverage 0..100 %. A question with no candidate whose quote
  verified can never be answered: it gets score -inf and counts as wrong. Questions are answered
  best score first, ties together. Scorers: the RM score (`Answer.score`), the generator
  likelihood (best candidate's mean token log-probability) and the retrieval score (best
  candidate's fused retrieval score); always-answer is the flat accuracy at 100 % coverage.
- **AURC**: area under the risk–coverage curve (risk = 1 - answered accuracy); lower is better.
- **Accuracy at coverage c**: answered accuracy at the smallest curve point covering at least c.
  **Coverage at accuracy a**: the largest coverage whose answered accuracy is at least a.
- **Quote validity**: share of given answers whose quote text equals the index document's text
  at the quote's offsets. **Quote contains gold**: share of given answers to answerable questions
  whose normalized quote contains a normalized gold answer as whole words.
- **ECE**: expected calibration error of the RM score against would-be correctness over
  10 equal-width bins, on questions whose best candidate verified and has a score in [0, 1].
- **Retrieval recall@k**: over answerable questions whose gold paragraph is known (SQuAD
  context), the share for which one of the top k retrieved passages (searching 20) comes from
  the gold paragraph: the passage's document text equals the context, or the passage text lies
  inside the context, or the context inside the passage. MRR uses the rank of the first such
  passage (0 beyond 20).
- **Latency**: p50 / p95 of the pipeline's `timings_ms.total_ms` (retrieve + generate + score)
  per question; measured on whatever machine ran the evaluation.
"""


def render_markdown(m: dict[str, Any], run: dict[str, Any]) -> str:
    """The report.md text for metrics ``m`` of the run described by ``run`` (run.json)."""
    ident = run["identity"]
    pipe = run["pipeline"]
    manifest = run.get("index_manifest", {})
    emb = manifest.get("embedding") or {}
    scorer = pipe["scorer"]
    lines = [
        "# citeqa evaluation report",
        "",
        f"- date: {run.get('updated', 'unknown')} (started {run.get('started', 'unknown')})",
        f"- git revision: `{run.get('git_revision', 'unknown')}`",
        f"- dataset: `{run['dataset']}` (sha256 `{ident['dataset_sha256']}`), split: "
        f"{ident['split'] or 'all'}; {m['questions']} questions ({m['answerable']} answerable, "
        f"{m['unanswerable']} unanswerable)"
        + (f"; **{m['refused']} refused** by citeqa (empty or too long) or failed by its "
           "generator: counted as declines"
           if m.get("refused") else ""),
        f"- preset: `{ident['preset']}`, n_candidates: {ident['n_candidates'] or 'preset'}, "
        f"min_score: {_num(ident['min_score'])}, threshold in effect: {_num(m['threshold'])}"
        + (f" ({pipe['calibration_note']})" if pipe.get("calibration_note") else ""),
        f"- generator: `{pipe['generator_model_id']}`",
        f"- score (`Answer.score`) produced by: **{scorer}**"
        + (f" — {pipe['scorer_note']}" if pipe.get("scorer_note") else ""),
        f"- index: `{run['index']}`, format version {manifest.get('format_version', '?')}, "
        f"built {manifest.get('created', '?')}, counts {manifest.get('counts', {})}, embedding "
        f"`{emb.get('model_id', 'none (BM25 only)')}` (dim {emb.get('dim', '-')}), manifest "
        f"sha256 `{ident['index_manifest_sha256']}`",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| SQuAD EM (all) | {_pct(m['squad']['exact'])} |",
        f"| SQuAD F1 (all) | {_pct(m['squad']['f1'])} |",
        f"| SQuAD EM / F1 (has-answer) | {_pct(m['squad']['has_ans_exact'])} / "
        f"{_pct(m['squad']['has_ans_f1'])} |",
        f"| accuracy (correctness rule, all questions) | {_pct(m['accuracy'])} |",
        f"| answered accuracy at threshold | {_pct(m['at_threshold']['answered_accuracy'])} |",
        f"| coverage at threshold | {_pct(m['at_threshold']['coverage'])} |",
        f"| unanswerable declined | {_pct(m['unanswerable_declined'])} |",
        f"| answerable: best candidate right / any candidate right "
        f"({_num((m.get('candidates') or {}).get('per_question'), '.1f')} a question) | "
        f"{_pct((m.get('candidates') or {}).get('best_right'))} / "
        f"{_pct((m.get('candidates') or {}).get('any_right'))} |",
        f"| quote validity (given answers) | {_pct(m['quotes']['valid'])} |",
        f"| quote contains gold (given answers) | {_pct(m['quotes']['contains_gold'])} |",
        f"| answer supported: its words stand in its quote (given answers) | "
        f"{_pct(m['quotes'].get('supported'))} |",
        f"| ECE of the score ({m['calibration']['questions']} questions) | "
        f"{_num(m['calibration']['ece'])} |",
        f"| latency p50 / p95 | {_num(m['latency_ms']['p50'], '.0f')} ms / "
        f"{_num(m['latency_ms']['p95'], '.0f')} ms |",
        "",
        "### Selective answering (would-be correctness of the best candidate)",
        "",
        "| scorer | AURC | AUROC | "
        + " | ".join(f"acc @ {c:.0%} cov" for c in COVERAGES)
        + " | "
        + " | ".join(f"cov @ {a:.0%} acc" for a in TARGET_ACCURACIES)
        + " |",
        "|---" * (3 + len(COVERAGES) + len(TARGET_ACCURACIES)) + "|",
    ]
    rows = [*((SCORERS[k], m["selective"][k]) for k in SCORERS)]
    if "oracle" in m:
        rows.append(("oracle (a perfect ranking of the same candidates)", m["oracle"]))
    for label, s in rows:
        lines.append(
            f"| {label} | {_num(s['aurc'])} | {_num(s.get('auroc'))} | "
            + " | ".join(_pct(v) for v in s["accuracy_at_coverage"].values())
            + " | "
            + " | ".join(_pct(v) for v in s["coverage_at_accuracy"].values())
            + " |"
        )
    always = m["always_answer_accuracy"]
    dashes = ["–"] * (len(COVERAGES) - 1 + len(TARGET_ACCURACIES))
    row = [
        "always answer",
        _num(None if always is None else 1 - always),
        "–",
        _pct(always),
        *dashes,
    ]
    lines.append("| " + " | ".join(row) + " |")
    for name, d in (m.get("rm_vs") or {}).items():
        lines.append(f"\nAURC(RM) - AURC({SCORERS[name]}) = {d['diff']:+.3f}, 95 % paired "
                     f"bootstrap interval [{d['low']:+.3f}, {d['high']:+.3f}]"
                     + (" (RM better beyond noise)" if d["high"] < 0 else ""))
    r = m["retrieval"]
    lines += [
        "",
        f"### Retrieval ({r['questions']} answerable questions with a known gold paragraph)",
        "",
        "| " + " | ".join(f"recall@{k}" for k in RECALL_KS) + " | MRR |",
        "|---" * (len(RECALL_KS) + 1) + "|",
        "| " + " | ".join(_pct(r[f"recall@{k}"]) for k in RECALL_KS) + f" | {_num(r['mrr'])} |",
        "",
        "## Figures",
        "",
        f"![accuracy–coverage]({FIGURES['accuracy_coverage']})",
        "",
        f"![reliability diagram]({FIGURES['reliability']})",
        "",
        f"![retrieval recall@k]({FIGURES['recall']})",
        "",
        DEFINITIONS,
    ]
    return "\n".join(lines)


# --- writing ---------------------------------------------------------------------------------


def write_outputs(
    out: Path,
    records: Sequence[dict[str, Any]],
    run: dict[str, Any],
    document: Callable[[str], Document],
) -> dict[str, Any]:
    """Judge ``records``, write metrics.json, report.md and the figures into ``out``."""
    from citeqa.evals import plots

    out = Path(out)
    judged = [judge(r, document) for r in records]
    m = summarize(judged, run["pipeline"]["threshold"])
    # which of predictions.jsonl these metrics cover (a rerun with --limit or --sample covers
    # fewer than the file holds): eval compare compares those; written with them, at once
    m["question_ids"] = [j.id for j in judged]
    # a report of an earlier run must not sit beside these metrics if this stops before its own
    (out / "report.md").unlink(missing_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(m, indent=2, allow_nan=False) + "\n")
    label = f"{run['identity']['preset']} · {m['questions']} questions"
    plots.accuracy_coverage(
        {SCORERS[k]: m["selective"][k]["curve"] for k in SCORERS},
        m["always_answer_accuracy"],
        out / FIGURES["accuracy_coverage"],
        title=f"Accuracy–coverage ({label})",
    )
    plots.reliability(
        m["calibration"]["bins"],
        out / FIGURES["reliability"],
        title=f"Reliability of the score: {run['pipeline']['scorer']}",
    )
    plots.recall_at_k(
        {k: m["retrieval"][f"recall@{k}"] for k in RECALL_KS},
        out / FIGURES["recall"],
        title=f"Retrieval recall@k ({m['retrieval']['questions']} questions)",
    )
    write_text_atomic(out / "report.md", render_markdown(m, run))
    return m


