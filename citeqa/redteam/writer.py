"""A template question writer: answerable questions from a passage's own sentences, for corpora
that come without questions (``citeqa redteam`` on a user's index).

A sentence holding a year, a number or a name (not its first word) becomes a question about
it: the value is replaced by a question phrase and the sentence ends in "?". "The Normans gave
their name to Normandy in 911." -> "The Normans gave their name to Normandy in what year?",
answer "911". Crude, but the answer stands in the passage by construction, so the questions are
answerable controls, and the seeds of the unanswerable variants (``maker.py``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from citeqa.redteam.corpus import NUMBER, YEAR, names_in
from citeqa.redteam.maker import Seed
from citeqa.text import STOP_WORDS, sentence_spans

MIN_WORDS, MAX_WORDS = 6, 40  # sentences outside this length make poor questions
_LINE_BREAK = re.compile(r"(?<![\n])\n(?![\n])")  # a single line break inside a paragraph
# a number of things, not a year, is followed by what it counts ("1200 men"): a lower-case word
# that is no function word ("in 1066 the duke", "in 1889 as the entrance" are years)
_COUNTED = re.compile(r"\s+(?!(?:" + "|".join(map(re.escape, sorted(STOP_WORDS))) + r")\b)[a-z]+\b")


def _question_from(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) made from one sentence, or None when it holds nothing to ask."""
    words = len(sentence.split())
    if not MIN_WORDS <= words <= MAX_WORDS or "?" in sentence:
        return None
    body = sentence.rstrip(" .!;:")
    options: list[tuple[int, int, str]] = []
    for m in NUMBER.finditer(body):
        year = YEAR.fullmatch(m.group()) and not _COUNTED.match(body[m.end():])
        options.append((m.start(), m.end(), "what year" if year else "how many"))
    for start, end, _ in names_in(body):
        if start > 0:
            options.append((start, end, "what"))
    if not options:
        return None
    start, end, phrase = rng.choice(sorted(options))
    answer = body[start:end]
    before, after = body[:start].rstrip(), body[end:]
    if phrase == "what year":
        before = re.sub(r"\b(in|In)$", "in", before)
    question = f"{before} {phrase}{after}".strip()
    question = question[0].upper() + question[1:] + "?"
    return " ".join(question.split()), answer


def write_questions(passages: Iterable[tuple[str, str]], *, per_passage: int = 2,
                    seed: int = 0) -> list[Seed]:
    """Up to ``per_passage`` template questions from each ``(passage_id, text)``, as Seeds
    (question, passage, answer). Deterministic for ``seed``."""
    out = []
    for pid, text in passages:
        rng = random.Random(f"{seed}:{pid}")
        flat = _LINE_BREAK.sub(" ", text)  # wrapped lines (Markdown) rejoined; same offsets
        sentences = [flat[s:e] for s, e in sentence_spans(flat)]
        rng.shuffle(sentences)
        made = 0
        for sentence in sentences:
            qa = _question_from(sentence, rng)
            if qa is None:
                continue
            question, answer = qa
            out.append(Seed(question=question, passage=text, answer=answer,
                            id=f"{pid}#{made}"))
            made += 1
            if made >= per_passage:
                break
    return out
