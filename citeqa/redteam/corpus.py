"""What the question maker knows of a corpus: which passages hold which words, and the names,
numbers, years and common nouns it uses, with their counts.

Everything is derived from the passages' own text by rule (``citeqa.text``), so it works on any
collection, not only SQuAD. ``could_answer`` is the maker's check that a made question is not
answerable from the corpus: a replacement value must never stand in a passage together with
most of the question's other terms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from citeqa.text import STOP_WORDS, content_terms, term, tokenize


def _letter_class(wanted: Callable[[str], bool]) -> str:
    """A regex character class of the BMP's letters for which ``wanted`` holds (Python's ``re``
    has no \\p{Lu}): names are "São Paulo" and "Zürich" too, not only ASCII."""
    ranges: list[list[int]] = []
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or not wanted(chr(cp)):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[" + "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                         for a, b in ranges) + "]"


_UP = _letter_class(lambda c: c.isupper() and c.isalpha())
_LOW = _letter_class(lambda c: c.islower() and c.isalpha())
_WORD = f"{_UP}{_LOW}+(?:-(?:{_UP}|{_LOW})+)?"
# A name: capitalised words, optionally joined by "of"/"the"/"de"/... ("University of Chicago").
NAME = re.compile(
    rf"\b{_WORD}\b"
    rf"(?:\s+(?:(?:of(?:\s+the)?|de|du|da|del|der|von|van|la|le)\s+)?{_WORD}\b)*"
)
# a year: not a part of a decimal (3.1415, 1999.5) or of a number with thousands (1990,000);
# "1990,1991" holds two (a comma before four digits separates no thousands)
YEAR = re.compile(r"(?<![\d.])\b(1[0-9]{3}|20[0-9]{2})\b(?!\.\d|,\d{3}\b)")
NUMBER = re.compile(r"\b\d+(?:,\d{3})*(?:\.\d+)?\b")
# A sentence or quote start: a name right after it may just be a capitalised first word.
_SENTENCE_START = re.compile(r"(?:^|[.!?]\s+|[\"“(]\s*)$")
_WORD_BEFORE = re.compile(r"\b([a-z]+)\s+$")
# A probable noun: a lower-case word after a determiner, before a function word or punctuation
# ("the amount of", "their army,"; not "the annual report").
_NOUN = re.compile(
    r"\b(?:[Tt]he|an?|his|her|its|their|our|this|that|these|those)\s+([a-z]{4,})"
    r"(?=\s*[,.;:)]|\s+(?:of|in|to|was|were|is|are|and|or|that|which|for|by|with|from|on)\b)"
)
# Half of the question's other terms with the new value in one passage: maybe answerable.
CO_OCCURRENCE = 0.5


def names_in(text: str) -> list[tuple[int, int, str]]:
    """Capitalised names in ``text`` as ``(start, end, name)``, skipping a lone capitalised
    word that starts a sentence (it is probably an ordinary word)."""
    out = []
    for m in NAME.finditer(text):
        name, start = m.group(), m.start()
        first, _, rest = name.partition(" ")
        if rest and first.lower() in STOP_WORDS:  # "In September", "The Normans"
            name, start = rest, start + len(first) + 1
        if " " not in name and _SENTENCE_START.search(text[:start]):
            continue
        if name.lower() in STOP_WORDS or name in NOT_NAMES:
            continue
        out.append((start, m.end(), name))
    return out


def name_kind(name: str) -> tuple[int, str]:
    """A name's rough type, for swapping like with like: its word count and its last word when
    that word says what the name is (``University``, ``River``), else ``""``."""
    words = name.split()
    last = words[-1] if len(words) > 1 and words[-1] in KIND_WORDS else ""
    return len(words), last


# Capitalised words that are not names of things to swap.
NOT_NAMES = frozenset(
    """January February March April May June July August September October November December
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday""".split()
)


KIND_WORDS = frozenset(
    """University College School Church Cathedral Castle Palace River Lake Mountain Mountains
    Island Islands Sea Ocean Bay Street Avenue Square Park Bridge Company Corporation Party
    Army Navy Empire Kingdom Republic Council Parliament Court Act Treaty War Museum Library
    Hospital Station Airport Stadium Hall Tower House Street Valley Desert Province County
    State States City Railway Institute Society Association Abbey Dynasty Prize Award
    """.split()
)


@dataclass
class Corpus:
    """Passages with an inverted index of their words and counts of their names and numbers."""

    passages: list[str]
    postings: dict[str, set[int]] = field(default_factory=dict)  # token -> passage rows
    names: Counter[str] = field(default_factory=Counter)
    years: Counter[int] = field(default_factory=Counter)
    nouns: Counter[str] = field(default_factory=Counter)  # words seen after a determiner
    # name -> the lower-case words seen right before it ("in", "of", "by"): a hint of its type
    name_context: dict[str, Counter[str]] = field(default_factory=dict)
    _stem_rows: dict[str, set[int]] = field(default_factory=dict, repr=False)  # memo
    # (kind, context word) -> names; and (kind, usual context) -> sorted names: memos
    _by_kind_word: dict[tuple[tuple[int, str], str], list[str]] | None = field(
        default=None, repr=False)
    _alike: dict[tuple[tuple[int, str], frozenset[str]], tuple[str, ...]] = field(
        default_factory=dict, repr=False)

    @classmethod
    def build(cls, passages: Iterable[str]) -> Corpus:
        corpus = cls(list(passages))
        for row, text in enumerate(corpus.passages):
            tokens = set(tokenize(text))
            for tok in tokens:
                corpus.postings.setdefault(tok, set()).add(row)
            found = names_in(text)
            corpus.names.update({name for _, _, name in found})
            for start, _, name in found:
                before = _WORD_BEFORE.search(text[max(0, start - 24):start])
                corpus.name_context.setdefault(name, Counter())[
                    before.group(1) if before else ""] += 1
            corpus.years.update({int(y) for y in YEAR.findall(text)})
            corpus.nouns.update({m.group(1) for m in _NOUN.finditer(text)})
        return corpus

    def usual_context(self, name: str) -> frozenset[str]:
        """The lower-case words most often right before ``name`` in the corpus ("in", "of",
        "by"; "" for a sentence start): names used alike are probably of a kind."""
        ctx = self.name_context.get(name)
        return frozenset(w for w, _ in ctx.most_common(3)) if ctx else frozenset({""})

    def names_alike(self, name: str) -> tuple[str, ...]:
        """The corpus's names of ``name``'s kind that share a usual context word with it
        (``name`` itself included when it is in the corpus), sorted. Memoised: the first call
        indexes every name once, so a large corpus costs one pass, not one per question."""
        if self._by_kind_word is None:
            index: dict[tuple[tuple[int, str], str], list[str]] = {}
            for n in self.names:
                kind = name_kind(n)
                for w in self.usual_context(n):
                    index.setdefault((kind, w), []).append(n)
            self._by_kind_word = index
        key = (name_kind(name), self.usual_context(name))
        if key not in self._alike:
            found: set[str] = set()
            for w in key[1]:
                found.update(self._by_kind_word.get((key[0], w), ()))
            self._alike[key] = tuple(sorted(found))
        return self._alike[key]

    def passages_with(self, words: str) -> set[int]:
        """Rows of the passages holding every token of ``words``."""
        tokens = tokenize(words)
        if not tokens:
            return set()
        rows = set(self.postings.get(tokens[0], ()))
        for tok in tokens[1:]:
            rows &= self.postings.get(tok, set())
            if not rows:
                break
        return rows

    def could_answer(self, value: str, question: str) -> bool:
        """True when some passage holds ``value`` together with at least ``CO_OCCURRENCE`` of
        the question's other content terms (a question about ``value`` might be answered
        there). Terms are matched as ``citeqa.text.term`` stems against passage tokens."""
        rows = self.passages_with(value)
        if not rows:
            return False
        own = set(content_terms(value))
        others = [t for t in content_terms(question) if t not in own]
        if not others:
            return True  # nothing else to tell passages apart: assume it could
        need = math.ceil(CO_OCCURRENCE * len(others))
        # a term matches a passage when some token of the passage has that stem
        holders = [self._rows_of_term(t) for t in others]
        return any(sum(row in h for h in holders) >= need for row in rows)

    def _rows_of_term(self, stem: str) -> set[int]:
        """Rows of the passages holding a token with this stem (memoised)."""
        if not self._stem_rows:
            for tok, rows in self.postings.items():
                self._stem_rows.setdefault(term(tok), set()).update(rows)
        return self._stem_rows.get(stem, set())
