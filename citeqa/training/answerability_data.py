"""Answerability training data: does this passage answer this question at all?

Each example is a question with the passage view the verifier reads at serving time (the quote
sentence with the text around it, ``citeqa.reward.verifier.around``), labelled 1 when the
question can be answered from it and 0 when not. The hard negatives are the point: SQuAD 2.0's
adversarial unanswerables, written against the very paragraph they are shown with, and red-team
variants (``citeqa.redteam``) shown beside the original question on the same passage, so that
the passage alone never gives the label away.

- ``squad_examples``: every question of a SQuAD 2.0 file with its own paragraph, centred on a
  gold answer (answerable) or on a plausible answer (unanswerable; the paragraph's middle when
  it has none), where the file's ``answer_start`` puts it.
- ``redteam_examples``: per unanswerable variant, the variant (0) and its original question (1)
  on the same view; a paraphrase control (1) alone.
- ``sample_lines``: a seeded uniform sample of a large JSONL file's lines in one pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from citeqa.evals.squad import QAItem
from citeqa.redteam.maker import Variant
from citeqa.reward.verifier import Judged, around
from citeqa.training.demos import quote_span
from citeqa.training.verifier_data import MAX_QUOTE, MIN_QUOTE


@dataclass(frozen=True)
class Labelled:
    """A question with a passage view, and whether the passage answers it."""

    judged: Judged  # answer is "": the view is what matters
    label: int  # 1 answerable from this passage, 0 not
    source: str  # squad2:answerable | squad2:unanswerable | redteam:<kind> | redteam:original


def view(question: str, text: str, title: str, start: int, end: int) -> Judged:
    """The passage as served: the quote sentence holding ``[start, end)`` with its
    surroundings; the text's first ``MAX_QUOTE`` characters when no quote fits there."""
    quote = quote_span(text, start, end, min_chars=MIN_QUOTE, max_chars=MAX_QUOTE)
    if quote is None:
        quote = (0, min(len(text), MAX_QUOTE))
    before, after = around(text, *quote)
    return Judged(question, "", text[quote[0]:quote[1]], title, before, after)


def _anchor(context: str, answers: Sequence[str], starts: Mapping[str, int]
            ) -> tuple[int, int]:
    """The first answer's place in ``context``: where the file says it is (``starts``), else
    its first occurrence (the same words earlier in a paragraph are often another mention, a
    view around which may not answer the question at all)."""
    for a in answers:
        if not a.strip():
            continue
        i = starts.get(a, -1)
        if i < 0 or not context.startswith(a, i):
            i = context.find(a)
        if i >= 0:
            return i, i + len(a)
    # none: a character at the middle (an empty span fits no quote, and the view fell back to
    # the paragraph's start, a shortcut its label 0 always had)
    mid = len(context) // 2
    while mid < len(context) - 1 and context[mid].isspace():
        mid += 1
    return mid, mid + 1


def squad_examples(items: Iterable[QAItem], plausible: Mapping[str, Sequence[str]],
                   starts: Mapping[str, Mapping[str, int]] | None = None
                   ) -> Iterator[Labelled]:
    """Every question that names its paragraph, shown with it (see the module docstring);
    ``starts``: question id -> {answer or plausible answer: its ``answer_start``}
    (``squad_answer_starts``)."""
    for item in items:
        if not item.context.strip():
            continue
        # whether the file gives an answer ("$" normalises to nothing, yet answers the question)
        answered = bool(item.answers)
        anchors = item.answers if answered else plausible.get(item.id, ())
        start, end = _anchor(item.context, anchors, (starts or {}).get(item.id, {}))
        kind = "answerable" if answered else "unanswerable"
        yield Labelled(view(item.question, item.context, item.article.replace("_", " "),
                            start, end), int(answered), f"squad2:{kind}")


def redteam_examples(variants: Iterable[Variant]) -> Iterator[Labelled]:
    """Made questions beside their originals on the same passage view, titled as served (the
    seed's article, as its document is titled; the reader learnt them untitled, and saw every
    served passage with its title)."""
    for v in variants:
        start = v.passage.find(v.answer) if v.answer else -1
        if start < 0:
            continue
        end = start + len(v.answer or "")
        made = view(v.question, v.passage, v.article.replace("_", " "), start, end)
        yield Labelled(made, int(v.answerable), f"redteam:{v.kind}")
        if not v.answerable:
            yield Labelled(replace(made, question=v.original), 1, "redteam:original")


def sample_lines(path: Path, n: int, seed: int) -> list[str]:
    """``n`` lines of ``path`` drawn uniformly (reservoir sampling), in file order."""
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    with Path(path).open(encoding="utf-8") as f:
        # i counts the lines that are drawn from (a blank one is none: counted, it made each
        # later line less likely than an earlier one)
        for i, line in enumerate(line for line in f if line.strip()):
            if len(kept) < n:
                kept.append((i, line))
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    kept[j] = (i, line)
    return [line for _, line in sorted(kept)]
