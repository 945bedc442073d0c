"""Demonstrations for teaching the generator to cite: (question, passages) -> answer + quote.

One demonstration per ANSWERABLE SQuAD question, JSON lines::

    {"id", "question", "passages": [{"title", "text", "doc_id", "start"}], "gold", "answer",
     "quote"}

``passages`` are what the retriever returns for the question, between one and ``MAX_PASSAGES``
of them (the count drawn per question, seeded by its id, so the model meets every prompt size a
request may ask for), with the gold paragraph's passage put in place of a random one of them
when retrieval missed it; ``gold`` is its index. ``answer`` is the first gold answer; ``quote``
the sentence(s) of the gold passage holding the answer (at SQuAD's ``answer_start``), cut to
``cfg.max_quote_chars`` around the answer at word boundaries and verified verbatim.

Unanswerable questions are skipped on purpose. Declining is the reward model's job: it scores
the generator's best attempt and declines when the attempt is unsupported. A generator taught
to refuse would emit refusals instead of attempts, and the reward model would lose the very
signal (a confident answer with a weak quote) it learns to reject; the grammar also has no
refusal form.

The target text is rendered at training time (``render_target``) from the passages through the
serving prompt code (``prompt.build_messages``), in the answer mode trained for (``span``:
``Quote [k]: ...`` then ``Answer: ...``, the answer being words of the quote; ``free``: the
other way round), so a change of prompt never needs new data; a demonstration whose quote falls
outside the window the prompt shows is dropped, since the model could not have copied it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from citeqa.atomic import atomic_open
from citeqa.config import GenerationConfig
from citeqa.errors import SourceError
from citeqa.evals.squad import QAItem, read_question_file, squad_objects
from citeqa.generation.cited import CHARS_PER_TOKEN, answer_span
from citeqa.generation.format import ANSWER_PREFIX, QUOTE_PREFIX, QUOTE_SEPARATOR
from citeqa.generation.prompt import build_messages
from citeqa.retrieval.base import Retriever
from citeqa.text import is_contentful, sentence_spans
from citeqa.types import Document, Hit, Passage

logger = logging.getLogger(__name__)

MAX_PASSAGES = 5  # a demonstration shows 1..MAX_PASSAGES passages
# How often each count is drawn: most like the served default (3), every size represented.
PASSAGE_COUNT_WEIGHTS = (0.1, 0.2, 0.4, 0.2, 0.1)


@dataclass(frozen=True)
class DemoPassage:
    title: str
    text: str  # the passage text: document.text[start:start + len(text)]
    doc_id: str
    start: int  # character offset of ``text`` in its document


@dataclass(frozen=True)
class Demo:
    id: str  # the question's id
    question: str
    passages: tuple[DemoPassage, ...]  # in retrieval order, as shown to the generator
    gold: int  # index in ``passages`` of the passage the quote comes from
    answer: str
    quote: str  # a verbatim span of passages[gold].text containing the answer

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "passages": [vars(p) for p in self.passages],
            "gold": self.gold,
            "answer": self.answer,
            "quote": self.quote,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Demo:
        """A demonstration from its JSON; ValueError when its parts do not fit together (a
        ``gold`` no passage has, a quote not in the gold passage, an answer not in its quote:
        span mode's grammar never lets the model answer so)."""
        demo = cls(
            id=str(_json(obj["id"], "id", str, int)),
            question=_json(obj["question"], "question", str),
            passages=tuple(
                DemoPassage(_json(p["title"], "a passage's title", str),
                            _json(p["text"], "a passage's text", str),
                            _json(p["doc_id"], "a passage's doc_id", str),
                            _json(p["start"], "a passage's start", int))
                for p in obj["passages"]
            ),
            gold=_json(obj["gold"], "gold", int),
            answer=_json(obj["answer"], "answer", str),
            quote=_json(obj["quote"], "quote", str),
        )
        if not 0 <= demo.gold < len(demo.passages):
            raise ValueError(f"gold is {demo.gold}, not the index of one of its "
                             f"{len(demo.passages)} passages")
        if not demo.quote.strip() or demo.quote not in demo.passages[demo.gold].text:
            raise ValueError(f"its quote is not a span of passage {demo.gold}'s text")
        if answer_span(demo.answer, demo.quote) is None:  # (the grammar's rule, as served)
            raise ValueError("its answer does not stand in its quote as span mode places one")
        return demo

    def hits(self) -> list[Hit]:
        """The passages as retrieval hits, the form ``build_messages`` takes."""
        return [
            Hit(Passage(i, p.doc_id, p.start, p.start + len(p.text), p.text), p.title, "", 0.0)
            for i, p in enumerate(self.passages)
        ]


def _json(value: Any, what: str, *kinds: type) -> Any:
    """``value`` when it is of one of ``kinds`` (a bool is no int); TypeError naming ``what``
    else (str() made a null the title or question "None", trained on as such; int() read a
    gold of 0.9 or "0" as 0)."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{what} is {json.dumps(value)[:40]}, not "
                        f"{' or '.join(k.__name__ for k in kinds)}")
    return value


@dataclass
class BuildStats:
    """Why questions did or did not become demonstrations."""

    questions: int = 0
    written: int = 0
    gold_retrieved: int = 0  # demonstrations whose gold passage retrieval found by itself
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


# -- pure parts --------------------------------------------------------------------------------


def quote_span(
    text: str, answer_start: int, answer_end: int, *, min_chars: int, max_chars: int
) -> tuple[int, int] | None:
    """``(start, end)`` in ``text`` of the quote for the answer at ``[answer_start, answer_end)``.

    The sentences overlapping the answer, widened by neighbouring sentences while shorter than
    ``min_chars``; when longer than ``max_chars``, cut to ``max_chars`` around the answer at
    word boundaries. None when no such quote exists (answer longer than ``max_chars``, quote
    still shorter than ``min_chars``, only stop words).
    """
    if not 0 <= answer_start < answer_end <= len(text) or answer_end - answer_start > max_chars:
        return None
    spans = sentence_spans(text)
    idx = [i for i, (s, e) in enumerate(spans) if s < answer_end and e > answer_start]
    if not idx:
        return None
    lo, hi = idx[0], idx[-1]
    start, end = min(spans[lo][0], answer_start), max(spans[hi][1], answer_end)
    while end - start < min_chars:
        if hi + 1 < len(spans) and spans[hi + 1][1] - start <= max_chars:
            hi += 1
            end = spans[hi][1]
        elif lo > 0 and end - spans[lo - 1][0] <= max_chars:
            lo -= 1
            start = spans[lo][0]
        else:
            return None
    if end - start > max_chars:
        # Centre the answer in a max_chars window, then shrink both ends to whole words.
        room = max_chars - (answer_end - answer_start)
        s = max(start, answer_start - room // 2)
        e = min(end, s + max_chars)
        s = max(start, e - max_chars)
        while s < answer_start and s > start and not text[s - 1].isspace():
            s += 1
        while e > answer_end and e < end and not text[e].isspace():
            e -= 1
        start, end = s, e
        while start < answer_start and text[start].isspace():
            start += 1
        while end > answer_end and text[end - 1].isspace():
            end -= 1
    quote = text[start:end]
    if not min_chars <= len(quote) <= max_chars or not is_contentful(quote):
        return None
    return start, end


def render_target(
    demo: Demo, cfg: GenerationConfig
) -> tuple[tuple[dict[str, str], ...], str] | None:
    """The serving prompt's messages for ``demo`` and the exact reply to train on.

    The reply is ``Answer: ...`` / ``Quote [k]: ...`` (the layout of both answer modes; the
    quote holds the answer, as span mode's grammar requires), with ``k`` the number the prompt
    gives the gold passage. None when the prompt's window of the gold passage does not show the
    quote.
    """
    hits = demo.hits()
    messages, shown = build_messages(demo.question, hits, cfg, top_k=len(hits))
    gold = hits[demo.gold]
    number = next(
        (p.number for p in shown if p.hit == gold and demo.quote in p.text), None
    )
    if number is None:
        return None
    answer = " ".join(demo.answer.split())
    quote_line = f"{QUOTE_PREFIX}{number}{QUOTE_SEPARATOR}{demo.quote}"
    return messages, f"{ANSWER_PREFIX}{answer}\n{quote_line}"


def passage_count(question_id: str, top_k: int | None = None) -> int:
    """How many passages a question's demonstration shows: ``top_k`` when given, else a count
    drawn by ``PASSAGE_COUNT_WEIGHTS``, seeded by the question's id."""
    if top_k is not None:
        return top_k
    rng = random.Random(f"passages:{question_id}")
    return rng.choices(range(1, MAX_PASSAGES + 1), weights=PASSAGE_COUNT_WEIGHTS)[0]


def make_demo(
    item: QAItem,
    answer_start: int,
    hits: Sequence[Hit],
    gold_passage: Hit,
    cfg: GenerationConfig,
    *,
    top_k: int | None = None,
) -> tuple[Demo | None, str]:
    """One demonstration from a question, its retrieved hits and its gold passage hit, showing
    ``passage_count(item.id, top_k)`` passages.

    Returns ``(demo, "")`` or ``(None, reason)`` when the question cannot make one.
    """
    answer = item.answers[0]
    if len(" ".join(answer.split())) > cfg.max_answer_tokens * CHARS_PER_TOKEN:
        return None, "answer too long"
    p = gold_passage.passage
    a0 = answer_start - p.start
    if p.text[a0 : a0 + len(answer)] != answer:
        return None, "answer not at answer_start in the gold passage"
    span = quote_span(
        p.text, a0, a0 + len(answer), min_chars=cfg.min_quote_chars, max_chars=cfg.max_quote_chars
    )
    if span is None:
        return None, "no quote within the length limits"
    quote = p.text[span[0] : span[1]]
    assert answer in quote and quote in p.text, (answer, quote)
    if answer_span(answer, quote) is None:  # ("Norman" in "Normans": read_demos refuses it)
        return None, "answer is part of a word in its quote"

    key = (p.doc_id, p.start)
    chosen = list(hits[: passage_count(item.id, top_k)])
    keys = [(h.passage.doc_id, h.passage.start) for h in chosen]
    if key in keys:
        gold = keys.index(key)
    elif chosen:  # retrieval missed it: the gold passage takes a random place among the shown
        gold = random.Random(f"gold:{item.id}").randrange(len(chosen))
        chosen[gold] = gold_passage
    else:
        chosen, gold = [gold_passage], 0
    demo = Demo(
        id=item.id,
        question=item.question,
        passages=tuple(
            DemoPassage(h.title, h.passage.text, h.passage.doc_id, h.passage.start)
            for h in chosen
        ),
        gold=gold,
        answer=answer,
        quote=quote,
    )
    if render_target(demo, cfg) is None:
        return None, "quote outside the prompt's window"
    return demo, ""


# -- I/O -----------------------------------------------------------------------------------------


def squad_answer_starts(path: Path, field: str = "answers") -> dict[str, dict[str, int]]:
    """question id -> {answer text: first answer_start} of a SQuAD JSON file ({} for JSONL),
    of its ``field`` ("plausible_answers": an unanswerable's), for the questions that have
    one; an answer without an integer ``answer_start`` has no entry (its first occurrence is
    used: the question loader checked the file's shape, not this field)."""
    try:
        obj = json.loads(read_question_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        return {}
    out: dict[str, dict[str, int]] = {}
    for article in obj["data"]:
        for paragraph in squad_objects(article, "paragraphs"):
            for qa in squad_objects(paragraph, "qas"):
                starts: dict[str, int] = {}
                for a in squad_objects(qa, field):
                    start = a.get("answer_start")
                    if isinstance(a.get("text"), str) and type(start) is int:
                        starts.setdefault(a["text"], start)
                if starts:
                    out[str(qa.get("id"))] = starts
    return out



def build_demos(
    items: Iterable[QAItem],
    retriever: Retriever,
    passages_by_context: dict[str, list[Hit]],
    answer_starts: dict[str, dict[str, int]],
    cfg: GenerationConfig,
    *,
    limit: int | None = None,
    top_k: int | None = None,
    progress: bool = True,
) -> tuple[list[Demo], BuildStats]:
    """Demonstrations for the answerable ``items`` (at most ``limit``), with build statistics;
    each shows ``top_k`` passages, or a varied count (``passage_count``) when None.

    ``passages_by_context`` maps a paragraph's text to the index passages of its document (as
    hits); ``answer_starts`` comes from ``squad_answer_starts`` (the answer's first occurrence
    in the paragraph is used where it has no entry).
    """
    stats = BuildStats()
    demos: list[Demo] = []
    items = list(items)
    bar = tqdm(items, desc="demonstrations", disable=not progress)
    for item in bar:
        if limit is not None and len(demos) >= limit:
            break
        stats.questions += 1
        if not item.answerable:
            stats.skip("unanswerable")
            continue
        answer = item.answers[0]
        start = answer_starts.get(item.id, {}).get(answer, -1)
        if not (0 <= start and item.context.startswith(answer, start)):  # (none, or off)
            start = item.context.find(answer)
        if start < 0:
            stats.skip("answer not in its paragraph")
            continue
        gold = [
            h
            for h in passages_by_context.get(item.context, [])
            if h.passage.start <= start and start + len(answer) <= h.passage.end
        ]
        if not gold:
            stats.skip("gold paragraph not in the index (or answer split across passages)")
            continue
        hits = retriever.search(item.question, MAX_PASSAGES if top_k is None else top_k)
        demo, reason = make_demo(item, start, hits, gold[0], cfg, top_k=top_k)
        if demo is None:
            stats.skip(reason)
            continue
        g = gold[0].passage
        stats.gold_retrieved += any(
            (h.passage.doc_id, h.passage.start) == (g.doc_id, g.start)
            for h in hits[: len(demo.passages)]
        )
        demos.append(demo)
        bar.set_postfix(written=len(demos), refresh=False)  # drawn with the bar, not per demo
    stats.written = len(demos)
    return demos, stats


def passages_by_context(documents: Iterable[Document], passages: Iterable[Passage]) -> dict[
    str, list[Hit]
]:
    """Document text -> that document's passages (as hits), for finding a question's gold
    paragraph in an index (SQuAD paragraphs are indexed one document each, text == context)."""
    docs = {d.doc_id: d for d in documents}
    out: dict[str, list[Hit]] = {}
    for p in passages:
        d = docs[p.doc_id]
        out.setdefault(d.text, []).append(Hit(p, d.title, d.source, 0.0))
    return out


def sample_items(items: Sequence[QAItem], seed: int) -> list[QAItem]:
    """``items`` in a seeded random order, so that ``--limit`` spans every article."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def write_demos(path: Path, demos: Iterable[Demo]) -> None:
    """Write demonstrations as JSON lines (to a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for d in demos:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")


def read_demos(path: Path) -> list[Demo]:
    """Read a demonstrations file; SourceError naming the bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = "it is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise SourceError(
            f"cannot read demonstrations {path}: {why}; build them with "
            "`citeqa train generator-data`"
        ) from e
    demos = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            demos.append(Demo.from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SourceError(
                f"{path}:{lineno}: bad demonstration ({type(e).__name__}: {e}); see "
                "citeqa/training/demos.py for the format"
            ) from e
    if not demos:
        raise SourceError(
            f"{path}: no demonstrations; build them with `citeqa train generator-data`"
        )
    return demos
