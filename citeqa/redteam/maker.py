"""The question maker: unanswerable variants of answerable questions, the way SQuAD 2.0's
annotators wrote them, by rule and from the corpus's own statistics; and answerable controls.

Kinds (``KINDS``), each a pure function of (question, its passage, the corpus, a seeded RNG):

- ``entity_swap``: a name in the question replaced by another name of the same rough type
  (``corpus.name_kind``) that the corpus uses;
- ``number_swap`` / ``date_swap``: a number replaced by another of the same size, a year by
  another year (or a month by another month);
- ``negation``: the question's auxiliary verb negated ("What did X build" -> "What didn't X
  build"; "will" and "can" only where they are verbs, not "the will of", "a tin can");
- ``antonym``: a word replaced by its opposite from a small list (first/last, largest/...),
  unless some passage says it so (``Corpus.could_answer``);
- ``absent_subject``: the question's rarest content word (its subject, usually) replaced by
  another word of similar frequency that the passage does not hold;
- ``impossible_condition``: a year the passage never mentions attached as a condition that
  cannot hold: "in 1512", "before 1512" only when every year the passage names is later,
  "after 1512" only when every one is earlier;
- ``paraphrase`` (answerable control): a rewording that keeps the meaning and the answer
  ("What year" -> "In which year", "built" -> "constructed").

Every swapped-in value is checked with ``Corpus.could_answer``: it must never stand in a passage
with most of the question's other terms, so no made question is answerable from the corpus by
the maker's own check. The maker is deterministic for a seed: the same questions and corpus
give the same variants.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from citeqa.redteam.corpus import NUMBER, YEAR, Corpus, names_in
from citeqa.text import STOP_WORDS, term, tokenize

UNANSWERABLE_KINDS = ("entity_swap", "number_swap", "date_swap", "negation", "antonym",
                      "absent_subject", "impossible_condition")
CONTROL_KINDS = ("paraphrase",)
KINDS = (*UNANSWERABLE_KINDS, *CONTROL_KINDS)
MAX_TRIES = 24  # replacement values tried per variant before giving up


@dataclass(frozen=True)
class Seed:
    """An answerable question to make variants of: its passage, and its answer if known."""

    question: str
    passage: str
    answer: str | None = None
    id: str = ""
    answers: tuple[str, ...] = ()  # every right answer (``answer`` among them); () = (answer,)

    @property
    def golds(self) -> tuple[str, ...]:
        """The answers a control is graded against."""
        return self.answers or ((self.answer,) if self.answer is not None else ())


@dataclass(frozen=True)
class Variant:
    """A made question: what it is, what it was made from, and whether it can be answered."""

    question: str
    kind: str  # one of KINDS
    answerable: bool  # False for the unanswerable kinds, True for controls
    original: str  # the question it was made from
    answer: str | None  # the original answer (still the answer for a control)
    passage: str  # the original question's passage
    change: str  # what was changed, e.g. "Normandy -> Brittany"
    seed_id: str = ""
    answers: tuple[str, ...] = ()  # the seed's right answers (a control is graded on them)
    article: str = ""  # the seed's article, where known (what the held-out checks read)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Variant:
        """A variant as ``to_json`` wrote it; ValueError saying which field is wrong (a null
        or a number where text belongs failed later, in a traceback)."""
        if not isinstance(obj, dict):
            raise ValueError(f"a record is {json.dumps(obj)[:60]}, not an object")
        try:
            made = cls(**obj)
        except TypeError as e:  # a field missing or unknown
            raise ValueError(str(e)) from None
        for f in fields(cls):
            value = getattr(made, f.name)
            if f.name == "answerable":
                right = isinstance(value, bool)
            elif f.name == "answer":
                right = value is None or isinstance(value, str)
            elif f.name == "answers":
                right = isinstance(value, list | tuple) and all(isinstance(a, str) for a in value)
            else:
                right = isinstance(value, str)
            if not right:
                raise ValueError(f"a record's {f.name!r} is {json.dumps(value)[:60]}")
        return replace(made, answers=tuple(made.answers))


MONTHS = ("January February March April May June July August September October November "
          "December").split()
AUXILIARIES = re.compile(
    r"\b(is|was|are|were|did|does|do|has|have|had|can|could|will|would|should)\b"
)
# "will" and "can" are nouns too ("the will of", "a tin can"): a verb neither follows a
# determiner nor comes before a preposition, a comma or the end
_NOUN_TOO = frozenset({"will", "can"})
_DETERMINER_BEFORE = re.compile(r"\b(?:the|a|an|his|her|its|their|this|that|my|our|your)"
                                r"\s+$", re.I)
_PREPOSITION_AFTER = re.compile(r"^\s*(?:$|[,.;:?!]|(?:of|in|on|at|for|from|by|with|to)\b)")
NEGATED = {"is": "isn't", "was": "wasn't", "are": "aren't", "were": "weren't", "did": "didn't",
           "does": "doesn't", "do": "don't", "has": "hasn't", "have": "haven't",
           "had": "hadn't", "can": "can't", "could": "couldn't", "will": "won't",
           "would": "wouldn't", "should": "shouldn't"}
TIME_WORDS = re.compile(r"\b(when|year|years|date|century|decade|era|period|age)\b", re.I)
ANTONYMS: dict[str, str] = {}
for _a, _b in [
    ("first", "last"), ("largest", "smallest"), ("biggest", "smallest"), ("highest", "lowest"),
    ("most", "least"), ("before", "after"), ("earliest", "latest"), ("early", "late"),
    ("north", "south"), ("northern", "southern"), ("east", "west"), ("eastern", "western"),
    ("increase", "decrease"), ("increased", "decreased"), ("more", "less"), ("fewer", "more"),
    ("older", "younger"), ("oldest", "youngest"), ("longest", "shortest"),
    ("best", "worst"), ("won", "lost"), ("win", "lose"), ("began", "ended"), ("start", "end"),
    ("started", "ended"), ("opened", "closed"), ("major", "minor"), ("maximum", "minimum"),
    ("rose", "fell"), ("higher", "lower"), ("upper", "lower"), ("inner", "outer"),
    ("private", "public"), ("ancient", "modern"), ("accepted", "rejected"),
    ("allowed", "banned"), ("above", "below"), ("large", "small"), ("strong", "weak"),
    ("success", "failure"), ("successful", "unsuccessful"), ("internal", "external"),
    ("positive", "negative"), ("common", "rare"), ("popular", "unpopular"),
    ("supported", "opposed"), ("built", "destroyed"), ("founded", "dissolved"),
    ("gained", "lost"), ("joined", "left"), ("entered", "left"), ("import", "export"),
    ("imported", "exported"), ("maximum", "minimum"), ("majority", "minority"),
]:
    ANTONYMS.setdefault(_a, _b)
    ANTONYMS.setdefault(_b, _a)

# Rewordings that keep a question's meaning (and answer): regex -> replacement.
PARAPHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r) for p, r in [
        (r"^What year\b", "In which year"),
        (r"^In what year\b", "In which year"),
        (r"^When did\b", "At what time did"),
        (r"^How many\b", "What number of"),
        (r"^What (city|country|state|river|year|century|language|group|company|type|kind)\b",
         r"Which \1"),
        (r"\bbuilt\b", "constructed"), (r"\bfounded\b", "established"),
        (r"\bbegan\b", "started"), (r"\bbegin\b", "start"), (r"\bbig\b", "large"),
        (r"\bbought\b", "purchased"),
        (r"\bhelped\b", "assisted"), (r"\bmain\b", "principal"), (r"\bpicked\b", "chose"),
        (r"\bwanted\b", "sought"), (r"\bneeded\b", "required"), (r"\bused\b", "employed"),
    ]
)


def _replace(question: str, start: int, end: int, value: str) -> str:
    return question[:start] + value + question[end:]


def _number_like(value: str, rng: random.Random) -> str:
    """Another number of the same size and form as ``value``: an integer keeps its thousands
    commas (8,180 -> 12,345), a decimal its number of fraction digits (written without commas)."""
    digits = value.replace(",", "")
    if "." in digits:
        whole, frac = digits.split(".", 1)
        tail = rng.randint(0, 10 ** len(frac) - 1)
        return f"{int(whole or 0) + rng.randint(1, 9)}.{tail:0{len(frac)}d}"
    n = int(digits)
    if n < 10:
        return str(rng.choice([d for d in range(2, 13) if d != n]))
    low, high = max(1, n // 2), n * 2
    new_n = n
    while new_n == n:
        new_n = rng.randint(low, high)
    return f"{new_n:,}" if "," in value else str(new_n)


def entity_swap(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    names = names_in(seed.question)
    if not names:
        return None
    start, end, name = rng.choice(names)
    pool = corpus.names_alike(name)  # same kind, used in the same places
    asked = seed.question.lower()
    tries = [n for n in rng.sample(pool, min(2 * MAX_TRIES, len(pool)))
             if n != name and n.lower() not in asked]
    for new in tries[:MAX_TRIES]:
        question = _replace(seed.question, start, end, new)
        if new not in seed.passage and not corpus.could_answer(new, question):
            return _variant(seed, question, "entity_swap", f"{name} -> {new}")
    return None


def number_swap(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    numbers = [m for m in NUMBER.finditer(seed.question) if not YEAR.fullmatch(m.group())]
    if not numbers:
        return None
    m = rng.choice(numbers)
    for _ in range(MAX_TRIES):
        new = _number_like(m.group(), rng)
        question = _replace(seed.question, m.start(), m.end(), new)
        if new not in seed.passage and not corpus.could_answer(new, question):
            return _variant(seed, question, "number_swap", f"{m.group()} -> {new}")
    return None


def date_swap(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    years = list(YEAR.finditer(seed.question))
    months = [m for m in re.finditer(r"\b(" + "|".join(MONTHS) + r")\b", seed.question)]
    if years:
        m = rng.choice(years)
        old = int(m.group())
        pool = sorted(y for y in corpus.years if y != old and abs(y - old) <= 60) or [
            old + d for d in (-40, -25, -12, 7, 19, 33)]
        for year in _sample(pool, rng):
            question = _replace(seed.question, m.start(), m.end(), str(year))
            if str(year) not in seed.passage and not corpus.could_answer(str(year), question):
                return _variant(seed, question, "date_swap", f"{old} -> {year}")
    if months:
        m = rng.choice(months)
        for month in _sample([x for x in MONTHS if x != m.group()], rng):
            question = _replace(seed.question, m.start(), m.end(), month)
            if month not in seed.passage and not corpus.could_answer(month, question):
                return _variant(seed, question, "date_swap", f"{m.group()} -> {month}")
    return None


def negation(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    del corpus, rng
    q = seed.question
    m = next((a for a in AUXILIARIES.finditer(q) if a.group() not in _NOUN_TOO or not (
        _DETERMINER_BEFORE.search(q[:a.start()]) or _PREPOSITION_AFTER.match(q[a.end():]))),
        None)
    if m is None or re.search(r"\b(not|never|no)\b|n't\b", q):
        return None
    question = _replace(seed.question, m.start(), m.end(), NEGATED[m.group()])
    return _variant(seed, question, "negation", f"{m.group()} -> {NEGATED[m.group()]}")


def antonym(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    words = [m for m in re.finditer(r"\b[a-z]+\b", seed.question) if m.group() in ANTONYMS]
    if not words:
        return None
    m = rng.choice(words)
    opposite = ANTONYMS[m.group()]
    question = _replace(seed.question, m.start(), m.end(), opposite)
    if corpus.could_answer(opposite, question):
        return None  # a passage says it the other way too: it may well be answerable
    return _variant(seed, question, "antonym", f"{m.group()} -> {opposite}")


def absent_subject(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    words = [m for m in re.finditer(r"\b(?:the|a|an|his|her|its|their) ([a-z]{4,})\b",
                                    seed.question)
             if m.group(1) not in STOP_WORDS and m.group(1) in corpus.nouns]
    if not words:
        return None
    m = min(words, key=lambda w: (corpus.nouns[w.group(1)], w.start()))  # the rarest noun
    old = m.group(1)
    count = corpus.nouns[old]
    passage_terms = set(tokenize(seed.passage))
    pool = sorted(w for w, c in corpus.nouns.items()
                  if count / 3 <= c <= count * 3 + 2 and w not in passage_terms
                  and term(w) != term(old))
    determiner = m.group(0)[: m.start(1) - m.start()].strip()
    for new in _sample(pool, rng):
        question = _replace(seed.question, m.start(1), m.end(1), new)
        if determiner in ("a", "an"):  # "a area" -> "an area"
            question = _replace(question, m.start(), m.start() + len(determiner),
                                "an" if new[0] in "aeiou" else "a")
        if not corpus.could_answer(new, question):
            return _variant(seed, question, "absent_subject", f"{old} -> {new}")
    return None


def impossible_condition(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    if not seed.question.rstrip().endswith("?") or TIME_WORDS.search(seed.question) or (
            YEAR.search(seed.question) or re.search(r"\b(in|of) \d{3,4}\b", seed.question)):
        return None  # a question about a time, or already holding one, gets no time condition
    mentioned = [int(y) for y in YEAR.findall(seed.passage)]
    pool = sorted(y for y in corpus.years if all(abs(y - x) > 30 for x in mentioned))
    for year in _sample(pool, rng):
        # "before" a year earlier than all the passage tells of cannot hold, nor "after" a
        # later one; the other way round it holds, and the seed's answer still fits
        conditions = ["in"]
        if mentioned and year < min(mentioned):
            conditions.append("before")
        if mentioned and year > max(mentioned):
            conditions.append("after")
        condition = rng.choice(conditions)
        question = seed.question.rstrip()[:-1].rstrip() + f" {condition} {year}?"
        if not corpus.could_answer(str(year), question):
            return _variant(seed, question, "impossible_condition", f"+ {condition} {year}")
    return None


def paraphrase(seed: Seed, corpus: Corpus, rng: random.Random) -> Variant | None:
    del corpus
    rules = [(p, r) for p, r in PARAPHRASES if p.search(seed.question)]
    if not rules:
        return None
    pattern, replacement = rng.choice(rules)
    question = pattern.sub(replacement, seed.question, count=1)
    if question == seed.question:
        return None
    return _variant(seed, question, "paraphrase", f"{pattern.pattern} -> {replacement}",
                    answerable=True)


MAKERS: dict[str, Callable[[Seed, Corpus, random.Random], Variant | None]] = {
    "entity_swap": entity_swap, "number_swap": number_swap, "date_swap": date_swap,
    "negation": negation, "antonym": antonym, "absent_subject": absent_subject,
    "impossible_condition": impossible_condition, "paraphrase": paraphrase,
}
assert tuple(MAKERS) == KINDS


def _sample(pool: Sequence[Any], rng: random.Random) -> list[Any]:
    return rng.sample(list(pool), min(MAX_TRIES, len(pool)))


def _variant(seed: Seed, question: str, kind: str, change: str, *,
             answerable: bool = False) -> Variant:
    return Variant(question=" ".join(question.split()), kind=kind, answerable=answerable,
                   original=seed.question, answer=seed.answer, passage=seed.passage,
                   change=change, seed_id=seed.id, answers=seed.golds)


def make_variants(seeds: Iterable[Seed], corpus: Corpus, *, seed: int = 0,
                  kinds: Sequence[str] = KINDS) -> list[Variant]:
    """Every kind's variant of every seed where that kind applies (at most one per kind and
    seed), in seed order then ``kinds`` order. Deterministic for ``seed``."""
    unknown = [k for k in kinds if k not in MAKERS]
    if unknown:
        raise ValueError(f"unknown variant kinds {unknown}; choose from {list(KINDS)}")
    out = []
    for i, s in enumerate(seeds):
        for kind in kinds:
            rng = random.Random(f"{seed}:{i}:{kind}:{s.question}")
            variant = MAKERS[kind](s, corpus, rng)
            if variant is not None and variant.question != s.question:
                out.append(variant)
    return out

