"""Building reward-model data: ask the pipeline SQuAD questions and label what it generates.

Every candidate of every question becomes a labelled line (the evaluation's correctness rule
against the golds), every (correct, wrong) pair of one question a pair line, and a question
marker closes each question, which makes building resumable. The record format and its reader
live in ``citeqa.reward.data``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from citeqa.config import GenerationConfig
from citeqa.errors import InvalidRequestError
from citeqa.evals.metrics import f1, is_correct
from citeqa.evals.squad import QAItem
from citeqa.generation.prompt import prompt_fingerprint
from citeqa.pipeline import Pipeline
from citeqa.types import Candidate

_PAIR_KEYS = ("answer", "quote", "title", "logprob", "n_tokens", "retrieval_score",
              "quote_valid")


def generator_fingerprint(model_id: str, gen_cfg: GenerationConfig) -> dict[str, Any]:
    """Which generator made the data, independent of git: its model id, the prompt's
    fingerprint and the sampling settings."""
    return {
        "model_id": model_id,
        "prompt_sha256": prompt_fingerprint(gen_cfg)[:16],
        "temperature": gen_cfg.temperature,
        "top_k_passages": gen_cfg.top_k_passages,
        "passage_chars": gen_cfg.passage_chars,
        "constrain_quote": gen_cfg.constrain_quote,
    }


def candidate_record(item: QAItem, c: Candidate, *, sample: int, n: int) -> dict[str, Any]:
    """A labelled-candidate line for ``c`` (label from ``is_correct`` against the golds)."""
    label = is_correct(c.answer, item.answers, quote_valid=c.quote is not None)
    return {
        "kind": "candidate",
        "qid": item.id,
        "question": item.question,
        "answer": c.answer,
        "quote": c.quote.text if c.quote else "",
        "title": c.quote.title if c.quote else "",
        "logprob": c.logprob,
        "n_tokens": c.n_tokens,
        "retrieval_score": c.retrieval_score,
        "quote_valid": c.quote is not None,
        "label": int(label),
        "f1": f1(c.answer, item.answers) if c.quote is not None and item.answerable else 0.0,
        "answerable": item.answerable,
        "golds": list(item.answers),
        "sample": sample,
        "n": n,
    }


def pair_records(cands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (correct, incorrect) pair among one question's candidate lines, correct as "a"."""
    good = [c for c in cands if c["label"] == 1]
    bad = [c for c in cands if c["label"] == 0]
    return [
        {
            "kind": "pair",
            "qid": g["qid"],
            "question": g["question"],
            "a": {k: g[k] for k in _PAIR_KEYS},
            "b": {k: w[k] for k in _PAIR_KEYS},
            "preferred": "a",
        }
        for g in good
        for w in bad
    ]


def _done_qids(out: Path) -> set[str]:
    """Question ids already complete in ``out``; lines of incomplete questions are dropped."""
    if not out.is_file():
        return set()
    lines = [ln for ln in out.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for ln in lines:
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
    done = {str(r["qid"]) for r in rows if r.get("kind") == "question"}
    kept = [json.dumps(r, ensure_ascii=False) for r in rows if str(r.get("qid")) in done]
    out.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return done


@dataclass(frozen=True)
class BuildStats:
    questions: int  # questions processed now (excluding ones already in the file)
    skipped: int  # questions already complete in the file
    candidates: int
    pairs: int
    correct: int  # candidates labelled 1
    seconds: float


def build_reward_data(
    pipeline: Pipeline,
    items: Iterable[QAItem],
    out: Path,
    *,
    n: int = 4,
    greedy: bool = False,
    progress: bool = True,
) -> BuildStats:
    """Ask ``pipeline`` the ``items`` and append labelled candidates, their pairs and a question
    marker per question to ``out`` (resumable: complete questions already in ``out`` are
    skipped).

    ``n``: candidates per question; ``greedy``: also one greedy (n=1) generation per question,
    recorded with ``n: 1`` (for best-of-N versus greedy comparisons).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_qids(out)
    items = list(items)
    todo = [it for it in items if it.id not in done]
    fingerprint = generator_fingerprint(pipeline.generator.backend.model_id,
                                        pipeline.cfg.generation)
    n_cands = n_pairs = n_correct = 0
    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        for item in tqdm(todo, desc="reward data", unit="question", disable=not progress):
            lines: list[dict[str, Any]] = []
            ms: dict[str, float] = {}
            for n_run in [n, 1] if greedy and n > 1 else [n]:
                try:
                    answer = pipeline.ask(item.question, n_candidates=n_run)
                except InvalidRequestError:  # e.g. an over-long question: no candidates
                    continue
                ms[str(n_run)] = answer.timings_ms.get("generate_ms", 0.0)
                cands = [
                    candidate_record(item, c, sample=i, n=n_run)
                    for i, c in enumerate(answer.candidates)
                ]
                lines += cands
                if n_run == n:  # pairs from the main generation only
                    lines += pair_records(cands)
            for row in lines:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            marker = {
                "kind": "question",
                "qid": item.id,
                "question": item.question,
                "answerable": item.answerable,
                "golds": list(item.answers),
                "article": item.article,
                "generate_ms": ms,
                "generator": fingerprint,
            }
            f.write(json.dumps(marker, ensure_ascii=False) + "\n")
            f.flush()
            cands_only = [r for r in lines if r["kind"] == "candidate"]
            n_cands += len(cands_only)
            n_pairs += len(lines) - len(cands_only)
            n_correct += sum(r["label"] for r in cands_only)
    return BuildStats(
        questions=len(todo),
        skipped=len(items) - len(todo),
        candidates=n_cands,
        pairs=n_pairs,
        correct=n_correct,
        seconds=time.perf_counter() - t0,
    )
