"""Quote verification: map a generated quote back to an exact span of its source document.

A quote is only ever returned when ``document.text[start:end] == quote.text``. Repairs are limited
to those that provably keep the same text: surrounding whitespace/punctuation trimmed, and runs of
whitespace that differ from the document's (the document's own characters are returned). A span
found inside the window shown to the model wins over spans elsewhere in the document; several
different spans outside the window are an ambiguity we refuse to guess at.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Iterator

from citeqa.config import GenerationConfig
from citeqa.text import is_contentful
from citeqa.types import Document, Quote

# CJK text's full stop, commas, marks, colons, brackets and corner quotes (full width)
CJK_PUNCTUATION = ("\u3001\u3002\u300c\u300d\u300e\u300f\u3010\u3011"
                   "\uff01\uff08\uff09\uff0c\uff0e\uff1a\uff1b\uff1f\uff61")
# Characters trimmed from a quote's ends when the untrimmed quote is not found: whitespace,
# ASCII punctuation and typographic quotes/dashes/ellipsis a model may wrap a quote in.
_TRIM = (
    string.whitespace
    + string.punctuation
    + "\u201c\u201d\u2018\u2019\u2026\u2013\u2014\u00ab\u00bb"
    + CJK_PUNCTUATION
)


def _exact_spans(needle: str, haystack: str, lo: int = 0,
                 hi: int | None = None) -> Iterator[tuple[int, int]]:
    """Where ``needle`` stands in ``haystack[lo:hi]`` (offsets into ``haystack``), in order."""
    hi = len(haystack) if hi is None else hi
    i = haystack.find(needle, lo, hi)
    while i != -1:
        yield i, i + len(needle)
        i = haystack.find(needle, i + 1, hi)


def _flexible_spans(needle: str, haystack: str, lo: int = 0,
                    hi: int | None = None) -> Iterator[tuple[int, int]]:
    """Spans of ``haystack[lo:hi]`` equal to ``needle`` up to the length/kind of each
    whitespace run."""
    parts = needle.split()
    if not parts:
        return
    pattern = re.compile(r"\s+".join(re.escape(p) for p in parts))
    for m in pattern.finditer(haystack, lo, len(haystack) if hi is None else hi):
        yield m.start(), m.end()


def _choose(
    spans: list[tuple[int, int]], text: str, window: tuple[int, int]
) -> tuple[int, int] | None:
    """Pick one of ``spans`` (all outside the window): the nearest if all read the same."""
    if not spans or len(spans) > MAX_SPANS_OUTSIDE:
        return None  # none, or too many to tell which was meant
    ws, we = window
    if len({text[s:e] for s, e in spans}) > 1:
        return None  # different texts outside the window: cannot tell which was meant
    return min(spans, key=lambda s: min(abs(s[0] - ws), abs(s[0] - we)))


# A quote not in its window but standing more often than this elsewhere in the document is
# not located: listing every place a short quote stands in a long, repetitive document took
# seconds (three million places in a 3 MB page of one letter), on the one generation thread.
MAX_SPANS_OUTSIDE = 1000


# What an answer may lose from its ends to stand in its quote: what ends a sentence or wraps
# words, never what changes what it says ("-40", "$40" and "40%" are not "40").
ANSWER_TRIM = (string.whitespace + ".,;:!?\"'()[]{}*_`"  # and markdown's emphasis marks
               + "\u201c\u201d\u2018\u2019\u2026\u00ab\u00bb\u2014" + CJK_PUNCTUATION)


def _trimmed(text: str, trim: str) -> str:
    """``text`` without the characters of ``trim`` or any whitespace at its ends, however they
    alternate ("1\u00a0;" -> "1": ``trim`` lists ASCII whitespace only, and a no-break space
    before the punctuation stayed on the quote)."""
    before = None
    while text != before:
        before, text = text, text.strip().strip(trim)
    return text


def locate(quote: str, document_text: str, window: tuple[int, int], *,
           trim: str = _TRIM) -> tuple[int, int] | None:
    """The ``(start, end)`` of ``quote`` in ``document_text``, or None when not provably there.

    Tries the quote with whitespace stripped, then with the characters of ``trim``
    (punctuation) also trimmed from its ends; for each, an exact match and then a
    whitespace-insensitive one. Every one of these is first looked for inside ``window`` (the
    passage the model was shown: the first place there wins), and only then outside it (the
    nearest place, where every place reads the same and there are at most
    ``MAX_SPANS_OUTSIDE``): a looser reading inside the window beats a stricter one elsewhere.
    """
    variants = [quote.strip()]
    trimmed = _trimmed(quote, trim)
    if trimmed and trimmed != variants[0]:
        variants.append(trimmed)
    ws, we = window
    tries = [(v, finder) for v in variants if v for finder in (_exact_spans, _flexible_spans)]
    for variant, finder in tries:
        inside = next(finder(variant, document_text, ws, we), None)  # the first there
        if inside is not None:
            return inside
    for variant, finder in tries:
        outside = list(itertools.islice(finder(variant, document_text), MAX_SPANS_OUTSIDE + 1))
        span = _choose(outside, document_text, window)
        if span is not None:
            return span
    return None


def verify_quote(
    quote: str, window: tuple[int, int], document: Document, cfg: GenerationConfig
) -> Quote | None:
    """Return the verified Quote for ``quote`` (cited from the passage window shown to the model,
    ``window`` = its ``(start, end)`` in the document) or None.

    None when the quote is not found verbatim (up to the repairs in ``locate``), is ambiguous,
    is shorter than ``cfg.min_quote_chars`` (unless it is the whole of a shorter passage: the
    grammar offers such a passage whole) or longer than ``cfg.max_quote_chars``, or is made
    only of stop words and punctuation.
    """
    span = locate(quote, document.text, window)
    if span is None:
        return None
    start, end = span
    text = document.text[start:end]
    short_enough = len(text) <= cfg.max_quote_chars
    long_enough = (len(text) >= cfg.min_quote_chars
                   or text == document.text[window[0]:window[1]].strip())
    if not (short_enough and long_enough) or not is_contentful(text):
        return None
    return Quote(
        text=text,
        doc_id=document.doc_id,
        title=document.title,
        source=document.source,
        start=start,
        end=end,
    )
