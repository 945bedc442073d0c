"""``citeqa redteam``: ask the service questions its corpus cannot answer, and see how often it
answers anyway.

Seeds are answerable questions: the user's (SQuAD or JSONL with ``context``) or, without any,
template questions written from the indexed passages (``writer.py``). Each seed gives up to one
variant of every kind (``maker.py``); the seeds themselves and the ``paraphrase`` variants are
the answerable controls. Everything is asked through the same pipeline as users (in process),
or a running server (``--url``, ``CiteqaClient``). Results go to ``results.jsonl`` as they come,
so an interrupted run resumes; then ``summary.json``, ``report.md`` and a plot of the
false-answer rate against the decline threshold.

Reported: per kind, the share of unanswerable questions answered (the false-answer rate; lower
is better); the controls' accuracy (the correctness rule against the seed's answer); the worst
failures (the most confident answers to unanswerable questions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from citeqa.atomic import write_text_atomic
from citeqa.evals.metrics import is_correct, threshold_json
from citeqa.journal import append_record, check_identity, has_records, read_records, resume
from citeqa.redteam.maker import UNANSWERABLE_KINDS, Seed, Variant
from citeqa.types import Answer, AskArgs

log = logging.getLogger(__name__)

RESULTS, SUMMARY, REPORT, PLOT = ("results.jsonl", "summary.json", "report.md",
                                  "false_answers_vs_threshold.png")
RUN = "run.json"  # the run's identity, written before the first question (journal.py)
ORIGINAL = "original"  # the kind of a seed asked as it is (an answerable control)
THRESHOLDS = np.linspace(0.0, 1.0, 101)
WORST = 10  # failures shown in the report

Asker = Callable[[Sequence[AskArgs]], list[Answer]]


@dataclass(frozen=True)
class Probe:
    """One question to ask: a variant, or a seed as it is."""

    question: str
    kind: str
    answerable: bool
    original: str
    answer: str | None  # the seed's answer (the expected one for a control)
    change: str = ""
    answers: tuple[str, ...] = ()  # every right answer of a control; () = (answer,)

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.kind}\n{self.question}".encode()).hexdigest()[:16]


def probes(seeds: Sequence[Seed], variants: Sequence[Variant]) -> list[Probe]:
    """The seeds as asked (controls), then every variant; one probe per distinct question."""
    out = [Probe(s.question, ORIGINAL, True, s.question, s.answer, answers=s.golds)
           for s in seeds]
    out += [Probe(v.question, v.kind, v.answerable, v.original, v.answer, v.change, v.answers)
            for v in variants]
    seen: set[str] = set()
    unique = []
    for p in out:
        if p.question not in seen:
            seen.add(p.question)
            unique.append(p)
    return unique


def result_record(probe: Probe, answer: Answer) -> dict[str, Any]:
    """One results.jsonl line: the probe, what the service said, and whether that was right."""
    best = answer.candidates[0] if answer.candidates else None
    quote_valid = best is not None and best.quote is not None
    golds = list(probe.answers) or ([probe.answer] if probe.answer is not None else [])
    right = (not answer.declined and probe.answerable and bool(golds)
             and is_correct(answer.answer, golds, quote_valid=answer.quote is not None))
    return {
        "id": probe.id,
        "kind": probe.kind,
        "answerable": probe.answerable,
        "question": probe.question,
        "original": probe.original,
        "change": probe.change,
        "expected": probe.answer,
        "declined": answer.declined,
        "answer": answer.answer,
        "quote": answer.quote.text if answer.quote else None,
        "source": answer.quote.title if answer.quote else None,
        "score": answer.score,
        "reason": answer.reason,
        # what a threshold t does: the best candidate answers when it has a verified quote and
        # score >= t
        "best_score": best.score if quote_valid and best is not None else None,
        "best_answer": best.answer if best is not None else None,
        "best_right": bool(best is not None and quote_valid and probe.answerable and golds
                           and is_correct(best.answer, golds, quote_valid=True)),
        "right": bool(right),
    }


_RESULT = {"what": "red-team result", "remedy": "delete the file or choose another --out"}


def done_ids(path: Path) -> set[str]:
    """Probe ids already in a results file (a cut last line is dropped, and redone; a bad line
    before it stops the run: ``journal.resume``)."""
    return {str(r["id"]) for r in resume(path, **_RESULT)}


def start_run(out: Path, ident: dict[str, Any], system: dict[str, Any] | None) -> None:
    """Refuse to resume ``out`` when it holds results of a run with another identity (index,
    seeds, server, threshold) or, in process, another system (``system``: models and settings,
    ``evals.runner.describe_pipeline``'s): their results would mix. Else record both there."""
    from citeqa.evals.runner import check_same_system

    out.mkdir(parents=True, exist_ok=True)
    remedy = "delete that run's files or choose another --out"
    check_identity(out / RUN, out / RESULTS, ident, remedy=remedy,
                   outputs=(SUMMARY, REPORT, PLOT))
    if system is not None and has_records(out / RESULTS):
        stored = json.loads((out / RUN).read_text(encoding="utf-8")).get("pipeline")
        check_same_system(out, stored if isinstance(stored, dict) else {}, system,
                          remedy=remedy)
    write_text_atomic(out / RUN, json.dumps({"identity": ident, "pipeline": system},
                                            indent=2) + "\n")


def ask_all(probes_: Sequence[Probe], ask: Asker, out: Path, *, batch: int = 4,
            progress: bool = True) -> list[dict[str, Any]]:
    """Ask every probe not yet in ``out/results.jsonl`` (``batch`` at a time), appending as
    answers come; return all records."""
    from citeqa.errors import InvalidRequestError
    from citeqa.pipeline import asked_text

    path = out / RESULTS
    out.mkdir(parents=True, exist_ok=True)
    done = done_ids(path)
    todo, refused = [], []
    for p in probes_:
        if p.id in done:
            continue
        try:  # the service would refuse it (empty, too long): the run could never finish
            asked_text(p.question)
        except InvalidRequestError as e:
            refused.append(f"{p.id} ({e})")
        else:
            todo.append(p)
    if refused:
        log.warning("%d question%s not asked, as citeqa refuses %s: %s", len(refused),
                    "" if len(refused) == 1 else "s", "it" if len(refused) == 1 else "them",
                    "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else ""))
    with path.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="red team",
                                                     unit="question",
                                                     disable=not progress) as bar:
        for at in range(0, len(todo), batch):
            chunk = todo[at : at + batch]
            answers = ask([AskArgs(p.question) for p in chunk])
            for p, a in zip(chunk, answers, strict=True):
                append_record(f, result_record(p, a))
            bar.update(len(chunk))
    wanted = {p.id for p in probes_}
    records, _ = read_records(path, **_RESULT)
    return [r for r in records if r["id"] in wanted]


def _answered_at(records: Sequence[dict[str, Any]], t: float) -> float:
    scores = [r["best_score"] for r in records]
    return float(np.mean([s is not None and s >= t for s in scores])) if scores else float("nan")


def summarize(records: Sequence[dict[str, Any]], threshold: float | None) -> dict[str, Any]:
    """False-answer rate per kind, control accuracy, the worst failures, and the curves."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    unanswerable = [r for r in records if not r["answerable"]]
    controls = [r for r in records if r["answerable"]]
    kinds = {
        kind: {
            "questions": len(rs),
            "answered": sum(not r["declined"] for r in rs),
            "false_answer_rate": (sum(not r["declined"] for r in rs) / len(rs)
                                  if not rs[0]["answerable"] else None),
            "accuracy": (sum(r["right"] for r in rs) / len(rs) if rs[0]["answerable"] else None),
        }
        for kind, rs in sorted(by_kind.items())
    }
    worst = sorted((r for r in unanswerable if not r["declined"]),
                   key=lambda r: -(r["score"] or 0.0))[:WORST]
    curves = {
        kind: [_answered_at(by_kind[kind], t) for t in THRESHOLDS]
        for kind in UNANSWERABLE_KINDS if kind in by_kind
    }
    if controls:  # (none: no curve, rather than NaN in summary.json)
        curves["controls answered right"] = [
            float(np.mean([r["best_right"] and r["best_score"] is not None
                           and r["best_score"] >= t for r in controls]))
            for t in THRESHOLDS]
    return {
        "questions": len(records),
        "unanswerable": len(unanswerable),
        "controls": len(controls),
        "false_answer_rate": (sum(not r["declined"] for r in unanswerable) / len(unanswerable)
                              if unanswerable else None),
        "control_accuracy": (sum(r["right"] for r in controls) / len(controls)
                             if controls else None),
        "threshold": threshold_json(threshold),
        "kinds": kinds,
        "worst": [{k: r[k] for k in ("kind", "question", "original", "change", "answer",
                                      "quote", "source", "score")} for r in worst],
        "curves": {"thresholds": THRESHOLDS.tolist(), **curves},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_report(out: Path, summary: dict[str, Any], setup: dict[str, Any]) -> None:
    """summary.json, report.md and the plot."""
    from citeqa.evals import plots

    write_text_atomic(out / SUMMARY, json.dumps({"setup": setup, **summary}, indent=2,
                                                allow_nan=False) + "\n")
    curves = summary["curves"]
    xs = curves["thresholds"]
    plots.rate_vs_threshold(
        {k: (xs, v) for k, v in curves.items() if k != "thresholds"}, out / PLOT,
        title="Red team: questions answered at each decline threshold",
        ylabel="share answered (unanswerable kinds: false answers)",
        marker=summary["threshold"] if isinstance(summary["threshold"], float) else None,
    )
    lines = [
        "# citeqa red team",
        "",
        f"Index: `{setup.get('index')}`; questions: {setup.get('seeds_from')}; service: "
        f"{setup.get('service')}; threshold: {summary['threshold']}.",
        "",
        f"- {summary['unanswerable']} unanswerable questions made from {setup.get('seeds')} "
        f"seeds: **answered (wrongly) {_pct(summary['false_answer_rate'])}**",
        f"- {summary['controls']} answerable controls (the seeds, and paraphrases of them): "
        f"**answered right {_pct(summary['control_accuracy'])}**",
        "",
        "| kind | questions | answered | false-answer rate | control accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, k in summary["kinds"].items():
        lines.append(f"| {kind} | {k['questions']} | {k['answered']} | "
                     f"{_pct(k['false_answer_rate'])} | {_pct(k['accuracy'])} |")
    lines += ["", f"![false answers against the threshold]({PLOT})", "",
              "## The most confident false answers", ""]
    for r in summary["worst"]:
        lines.append(f"- **{r['kind']}** ({r['change']}): \"{r['question']}\" (from "
                     f"\"{r['original']}\") -> \"{r['answer']}\" at score "
                     f"{r['score'] if r['score'] is None else round(r['score'], 3)}, quoting "
                     f"{r['source']}: \"{r['quote']}\"")
    if not summary["worst"]:
        lines.append("- none: every unanswerable question was declined")
    write_text_atomic(out / REPORT, "\n".join(lines) + "\n")


def sample_seeds(seeds: Sequence[Seed], n: int | None, seed: int) -> list[Seed]:
    """At most ``n`` of ``seeds``, a seeded random sample kept in their order."""
    if n is None or n >= len(seeds):
        return list(seeds)
    keep = sorted(random.Random(seed).sample(range(len(seeds)), n))
    return [seeds[i] for i in keep]
