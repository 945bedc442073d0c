"""Reward-model data: the JSONL record format, reading it, and building it by running the
generator on SQuAD questions.

One JSON object a line, three kinds (``kind`` may be left out; it is inferred from the keys):

    labelled candidate  {"question", "answer", "quote", "label": 0|1, ...optional}
    pair                {"question", "a": {"answer", "quote", ...}, "b": {...},
                         "preferred": "a"|"b"}
    question marker     {"kind": "question", "qid", ...}  (written by the builder; a question
                        with a marker is complete, which is what makes building resumable)

Optional candidate fields, with defaults: title "", logprob 0, n_tokens 0, retrieval_score 0,
quote_valid true; builder-only fields: qid, answerable, golds, sample, n, generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from citeqa.errors import SourceError
from citeqa.evals.metrics import f1, is_correct
from citeqa.evals.squad import QAItem
from citeqa.reward.features import RewardInput
from citeqa.types import Candidate, Hit, Passage

logger = logging.getLogger(__name__)

_INPUT_FIELDS = ("answer", "quote", "title", "logprob", "n_tokens", "retrieval_score")


@dataclass(frozen=True)
class Labelled:
    """A judged candidate: is this answer (with its quote) correct?"""

    input: RewardInput
    label: int  # 1 correct (see citeqa.evals.metrics.is_correct), 0 not
    qid: str = ""  # question id ("" when the file does not say)
    answerable: bool = True  # False for an unanswerable question (every answer is wrong)
    sample: int = 0  # position in its generation call
    n: int = 1  # samples drawn in that call (1 = greedy)
    soft: float | None = None  # graded target in [0, 1]: the answer's F1 (0 without a quote)


@dataclass(frozen=True)
class Pair:
    """Two answers to one question, one preferred."""

    a: RewardInput
    b: RewardInput
    preferred: int  # 0 = a is preferred, 1 = b


@dataclass
class RewardData:
    """Everything one JSONL file holds."""

    labelled: list[Labelled] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    questions: list[dict[str, Any]] = field(default_factory=list)  # builder markers

    @property
    def generators(self) -> list[dict[str, Any]]:
        """The distinct generator fingerprints recorded in the question markers."""
        seen = {
            json.dumps(q["generator"], sort_keys=True) for q in self.questions if "generator" in q
        }
        return [json.loads(s) for s in sorted(seen)]


# --- reading ---------------------------------------------------------------------------------


def _input(question: str, obj: dict[str, Any]) -> RewardInput:
    if not isinstance(obj.get("answer"), str) or not isinstance(obj.get("quote", ""), str):
        raise TypeError("'answer' and 'quote' must be strings")
    return RewardInput(
        question=question,
        answer=obj["answer"],
        quote=obj.get("quote") or "",
        title=str(obj.get("title") or ""),
        logprob=float(obj.get("logprob", 0.0)),
        n_tokens=int(obj.get("n_tokens", 0)),
        retrieval_score=float(obj.get("retrieval_score", 0.0)),
        quote_valid=bool(obj.get("quote_valid", True)),
    )


def _soft_label(obj: dict[str, Any]) -> float | None:
    """The record's F1 target: its ``f1`` field, else computed from ``golds`` when present."""
    if "f1" in obj:
        return float(obj["f1"])
    if "golds" not in obj:
        return None
    golds = [str(g) for g in obj["golds"]]
    if not golds or not obj.get("quote_valid", True):
        return 0.0  # unanswerable (every answer wrong) or an unverified quote
    return f1(obj["answer"], golds)


def parse_record(obj: dict[str, Any], data: RewardData) -> None:
    """Add one parsed JSON object to ``data`` (TypeError/KeyError/ValueError when malformed)."""
    kind = obj.get("kind") or ("pair" if "preferred" in obj else "candidate")
    if kind == "question":
        data.questions.append(obj)
        return
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if kind == "pair":
        if obj["preferred"] not in ("a", "b"):
            raise ValueError(f"'preferred' must be \"a\" or \"b\", not {obj['preferred']!r}")
        pref = 0 if obj["preferred"] == "a" else 1
        data.pairs.append(Pair(_input(question, obj["a"]), _input(question, obj["b"]), pref))
    elif kind == "candidate":
        label = obj["label"]
        if label not in (0, 1, True, False):
            raise ValueError(f"'label' must be 0 or 1, not {label!r}")
        data.labelled.append(
            Labelled(
                input=_input(question, obj),
                label=int(label),
                qid=str(obj.get("qid", "")),
                answerable=bool(obj.get("answerable", True)),
                sample=int(obj.get("sample", 0)),
                n=int(obj.get("n", 1)),
                soft=_soft_label(obj),
            )
        )
    else:
        raise ValueError(f"unknown kind {kind!r}; use candidate, pair or question")


def load_reward_data(paths: Path | Sequence[Path]) -> RewardData:
    """Read one or more JSONL files; SourceError naming the file and line when one is bad."""
    data = RewardData()
    for path in [paths] if isinstance(paths, Path | str) else paths:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise SourceError(
                f"reward data not found: {path}; build it with `citeqa train reward-data`"
            ) from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError("not a JSON object")
                parse_record(obj, data)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SourceError(
                    f"{path}:{lineno}: bad reward-data line ({type(e).__name__}: {e}); see "
                    "citeqa/reward/data.py for the format"
                ) from None
    if not data.labelled and not data.pairs:
        raise SourceError(f"{paths}: no labelled candidates or pairs to train on")
    return data


# --- building --------------------------------------------------------------------------------


def generator_fingerprint(model_id: str, gen_cfg: Any) -> dict[str, Any]:
    """Which generator made the data, independent of git: its model id, a hash of the prompt
    it is shown (the template text of citeqa/generation/prompt.py rendered on a fixed probe),
    and the sampling settings."""
    from citeqa.generation.prompt import build_messages

    probe = Hit(Passage(0, "probe", 0, 30, "The probe passage says 42 here."), "Probe", "p", 1.0)
    messages, _ = build_messages("What does the probe say?", [probe], gen_cfg)
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    return {
        "model_id": model_id,
        "prompt_sha256": digest[:16],
        "temperature": gen_cfg.temperature,
        "top_k_passages": gen_cfg.top_k_passages,
        "passage_chars": gen_cfg.passage_chars,
        "constrain_quote": gen_cfg.constrain_quote,
    }


def candidate_record(
    item: QAItem, c: Candidate, *, sample: int, n: int
) -> dict[str, Any]:
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
    keys = ("answer", "quote", *_INPUT_FIELDS[2:], "quote_valid")
    good = [c for c in cands if c["label"] == 1]
    bad = [c for c in cands if c["label"] == 0]
    return [
        {
            "kind": "pair",
            "qid": g["qid"],
            "question": g["question"],
            "a": {k: g[k] for k in keys},
            "b": {k: w[k] for k in keys},
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
    pipeline: Any,
    items: Iterable[QAItem],
    out: Path,
    *,
    n: int = 4,
    greedy: bool = False,
    progress: bool = True,
) -> BuildStats:
    """Run ``pipeline``'s retriever and generator on ``items`` and append labelled candidates,
    their pairs and a question marker per question to ``out`` (resumable: complete questions
    already in ``out`` are skipped).

    ``n``: samples per question; ``greedy``: also one greedy (n=1) generation per question,
    recorded with ``n: 1`` (for best-of-N versus greedy comparisons).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_qids(out)
    items = list(items)
    todo = [it for it in items if it.id not in done]
    fingerprint = generator_fingerprint(
        pipeline.generator.backend.model_id, pipeline.cfg.generation
    )
    k = pipeline.cfg.generation.top_k_passages
    n_cands = n_pairs = n_correct = 0
    t0 = time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        for item in tqdm(todo, desc="reward data", unit="question", disable=not progress):
            hits = pipeline.retriever.search(item.question, k=k)
            lines: list[dict[str, Any]] = []
            ms: dict[str, float] = {}
            for n_run in [n, 1] if greedy and n > 1 else [n]:
                t = time.perf_counter()
                gen = pipeline.generator.generate(
                    item.question, hits, pipeline.retriever.document, n=n_run
                )
                ms[str(n_run)] = (time.perf_counter() - t) * 1000
                cands = [
                    candidate_record(item, c, sample=i, n=n_run)
                    for i, c in enumerate(gen.candidates)
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


def stats_json(stats: BuildStats) -> dict[str, Any]:
    return asdict(stats)


def group_by_question(labelled: Sequence[Labelled], n: int | None = None) -> list[list[Labelled]]:
    """Candidates grouped per question (and per generation size), in first-seen order;
    only generations of ``n`` samples when ``n`` is given."""
    groups: dict[tuple[str, int], list[Labelled]] = {}
    for item in labelled:
        if n is None or item.n == n:
            groups.setdefault((item.qid or item.input.question, item.n), []).append(item)
    return list(groups.values())
