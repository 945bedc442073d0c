"""Verifier training data: the JSONL record format, and reading it into groups.

One JSON object a line; two kinds (``kind`` may be left out for a candidate):

    candidate  {"group", "question", "answer", "quote", "label": 0|1, optional "title",
                "before", "after" (the passage around the quote), "golds" (gold answers, for
                the reader; [] = unanswerable), "source" (how it was made), "qid", "article"
                (the question's: what the held-out checks read)}
    question   {"kind": "question", "qid", ...}  a marker closing one question's candidates
               (written by builders that run the generator; it makes them resumable)

A group is one question's candidates; pairs for the preference loss are taken within a group
(every correct against every wrong one). Builders live in ``citeqa.training.verifier_data``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citeqa.errors import SourceError
from citeqa.reward.verifier import Judged


@dataclass(frozen=True)
class Example:
    """A judged candidate: is this answer, with this quote, right and supported?"""

    judged: Judged
    label: int  # 1 right and supported (the evaluation's correctness rule), 0 not
    golds: tuple[str, ...] = ()  # gold answers (the reader's target); () = none here
    group: str = ""  # its question
    source: str = ""  # generator | synthetic:<how> | redteam:<kind> | ...
    # what the generator and the pipeline said of the candidate (generator data only):
    # logprob, mean_logprob, n_tokens, retrieval_score, retrieval_fused (1 or 0; absent: 1),
    # rm_score (the serving reward model's)
    signals: dict[str, float] = field(default_factory=dict)
    article: str = ""  # the question's article, where known ("": not said)

    def to_json(self) -> dict[str, Any]:
        j = self.judged
        out = {"group": self.group, "question": j.question, "answer": j.answer,
               "quote": j.quote, "title": j.title, "before": j.before, "after": j.after,
               "label": self.label, "golds": list(self.golds), "source": self.source}
        if self.signals:
            out["signals"] = dict(self.signals)
        if self.article:
            out["article"] = self.article
        return out


def _file_of(files: list[int], i: int, per_file: bool) -> int:
    """Which file item ``i`` came from (``VerifierData.example_files`` or ``question_files``),
    or 0 for all when files are not told apart."""
    return files[i] if per_file and files else 0


@dataclass
class VerifierData:
    """What one or more JSONL files hold."""

    examples: list[Example] = field(default_factory=list)
    questions: list[dict[str, Any]] = field(default_factory=list)  # builder markers
    # which of the files read each example and each marker came from (0 for the first)
    example_files: list[int] = field(default_factory=list)
    question_files: list[int] = field(default_factory=list)

    def groups(self, *, per_file: bool = False) -> list[list[Example]]:
        """Examples grouped by question, in first-seen order; with ``per_file``, a question
        in two files is two groups (two generators' answers to it, say)."""
        out: dict[tuple[int, str], list[Example]] = {}
        for i, ex in enumerate(self.examples):
            key = (_file_of(self.example_files, i, per_file), ex.group or ex.judged.question)
            out.setdefault(key, []).append(ex)
        return list(out.values())

    def unanswered(self, *, per_file: bool = False) -> list[dict[str, Any]]:
        """The markers of questions with no candidate (their generation gave none): declines,
        which count among the questions. With ``per_file``, as ``groups`` reads them."""
        answered = {(_file_of(self.example_files, i, per_file), ex.group or ex.judged.question)
                    for i, ex in enumerate(self.examples)}
        return [q for i, q in enumerate(self.questions)
                if (_file_of(self.question_files, i, per_file), q.get("qid")) not in answered]

    @property
    def generators(self) -> list[dict[str, Any]]:
        """The distinct generator fingerprints recorded in the question markers."""
        seen = {json.dumps(q["generator"], sort_keys=True)
                for q in self.questions if "generator" in q}
        return [json.loads(s) for s in sorted(seen)]


def parse_record(obj: dict[str, Any]) -> Example | dict[str, Any]:
    """An Example, or a question marker; TypeError/KeyError/ValueError when malformed."""
    kind = obj.get("kind", "candidate")
    if kind == "question":
        return obj
    if kind != "candidate":
        raise ValueError(f"unknown kind {kind!r}; use candidate or question")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    texts = {k: obj.get(k, "") for k in ("answer", "quote", "title", "before", "after")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise TypeError("answer, quote, title, before and after must be strings")
    label = obj["label"]
    if label not in (0, 1, True, False):
        raise ValueError(f"'label' must be 0 or 1, not {label!r}")
    golds = obj.get("golds", [])
    if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
        raise TypeError("'golds' must be a list of strings")
    signals = obj.get("signals", {})
    if not isinstance(signals, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in signals.values()):
        raise TypeError("'signals' must be an object of numbers")
    article = obj.get("article", "")
    if not isinstance(article, str):
        raise TypeError("'article' must be a string")
    return Example(Judged(question=question, **texts), int(label), tuple(golds),
                   str(obj.get("group") or obj.get("qid") or ""), str(obj.get("source", "")),
                   {str(k): float(v) for k, v in signals.items()}, article)


def load_verifier_data(paths: Path | Sequence[Path]) -> VerifierData:
    """Read one or more JSONL files; SourceError naming the file and line when one is bad."""
    data = VerifierData()
    for file, path in enumerate([paths] if isinstance(paths, Path | str) else paths):
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise SourceError(f"reward data not found: {path}; build it with "
                              "`citeqa train reward-data`") from None
        except IsADirectoryError:
            raise SourceError(f"{path} is a folder; give reward data, a JSONL file") from None
        except UnicodeDecodeError as e:
            raise SourceError(f"{path} is not UTF-8 text (byte {e.start}); give reward data, "
                              "a JSONL file") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError("not a JSON object")
                parsed = parse_record(obj)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise SourceError(f"{path}:{lineno}: bad reward-data line ({type(e).__name__}: "
                                  f"{e}); see citeqa/reward/data.py for the format") from None
            if isinstance(parsed, Example):
                data.examples.append(parsed)
                data.example_files.append(file)
            else:
                data.questions.append(parsed)
                data.question_files.append(file)
    if not data.examples:
        names = ", ".join(str(p) for p in ([paths] if isinstance(paths, Path | str) else paths))
        raise SourceError(f"{names}: no candidates in the reward data; build it with "
                          "`citeqa train reward-data`")
    return data


def write_examples(f: Any, examples: Iterable[Example]) -> int:
    """Append examples to an open text file as JSON lines; return how many."""
    n = 0
    for ex in examples:
        f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        n += 1
    return n
