"""Reward-model data: the JSONL record format and reading it (``citeqa.training.reward_data``
builds it by running the pipeline on SQuAD questions).

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

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citeqa.errors import SourceError
from citeqa.reward.features import RewardInput
from citeqa.text import answer_f1

logger = logging.getLogger(__name__)

_INPUT_FIELDS = ("answer", "quote", "title", "logprob", "n_tokens", "retrieval_score")


@dataclass(frozen=True)
class Labelled:
    """A judged candidate: is this answer (with its quote) correct?"""

    input: RewardInput
    label: int  # 1 correct (by the evaluation's correctness rule), 0 not
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
    return max(answer_f1(obj["answer"], g) for g in golds)


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


def group_by_question(labelled: Sequence[Labelled], n: int | None = None) -> list[list[Labelled]]:
    """Candidates grouped per question (and per generation size), in first-seen order;
    only generations of ``n`` samples when ``n`` is given."""
    groups: dict[tuple[str, int], list[Labelled]] = {}
    for item in labelled:
        if n is None or item.n == n:
            groups.setdefault((item.qid or item.input.question, item.n), []).append(item)
    return list(groups.values())
