"""Chunking: split a document's text into passages given as ``(start, end)`` character spans.

Passages are packed greedily from sentences (``citeqa.text.sentences``; a paragraph break ends a
passage once it holds at least a quarter of ``max_chars``, but not right after a heading: a
paragraph of one short line not ending as a sentence does (or asking, as a FAQ's question), or
such a line with a rule under it, and over it too (setext, reStructuredText), or in Markdown a
``#`` line however it ends (an ATX heading, a block of its own: blank line before it or not),
goes with the section it names, its line one unit even with a stop inside ("Step 2. Install");
nor inside fenced code, nor before a rest of the text under a quarter of ``max_chars`` that
fits), so each is at most ``cfg.max_chars`` characters long; a sentence longer than that is
hard-split at whitespace (when it has none, as CJK text: after a clause's comma, or mid-word,
never before a combining mark). Every span is trimmed of surrounding whitespace, so
``text[start:end]`` is exactly the passage text. ``passage_spans`` chunks a document so, as
Markdown where it is a Markdown file, less its passages of markup alone.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

from citeqa.config import ChunkConfig
from citeqa.markdown import headings_out, is_markdown, read_words, without_front_matter
from citeqa.text import (
    ATX_HEADING,
    HEADING_MAX_CHARS,
    LINE_BREAK,
    LINE_BREAK_CHARS,
    Sentence,
    asks,
    ends_as_prose,
    fenced_code,
    sentences,
)
from citeqa.types import Document

# Where a piece without whitespace may end: after a clause's comma or colon (CJK text has no
# spaces between words: a sentence of it was cut mid-word)
_CLAUSE_ENDS = frozenset("\u3001\uff0c\uff1b\uff1a,;:")


def _clause_cut(text: str, start: int, max_chars: int) -> int | None:
    """After the last clause comma or colon in the second half of the window of ``max_chars``
    from ``start``; None when it has none there."""
    for cut in range(start + max_chars, start + max_chars // 2, -1):
        if text[cut - 1] in _CLAUSE_ENDS:
            return cut
    return None


def _mid_word_cut(text: str, start: int, max_chars: int) -> int:
    """The window's end, moved back off combining marks (a passage never starts with a mark of
    the letter before it), but never into the window's first half: a longer run of marks is cut
    at the window's end (a run of 32,000 marks was cut one character a piece, each piece
    rescanning its window: minutes for a 64 KB document)."""
    end = cut = start + max_chars
    while unicodedata.category(text[cut])[0] == "M":
        cut -= 1
        if cut <= start or cut < start + max_chars // 2:
            return end
    return cut


def _hard_split(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """Pieces of at most ``max_chars`` of the trimmed span [start, end), cut at the window's last
    whitespace; where that lies in its first half (CJK text, with a Latin word or two near its
    start) or there is none, after a clause's comma in its second half; else at whitespace
    anyway, or mid-word."""
    while end - start > max_chars:
        cut = start + max_chars  # < end, so text[cut] exists; a cut there keeps the piece full
        while cut > start and not text[cut].isspace():
            cut -= 1
        if cut - start <= max_chars // 2 and (clause := _clause_cut(text, start, max_chars)):
            cut = clause
            yield start, cut
        elif cut == start:  # no whitespace in the window, no clause's end: mid-word
            cut = _mid_word_cut(text, start, max_chars)
            yield start, cut
        else:
            piece_end = cut
            while text[piece_end - 1].isspace():
                piece_end -= 1
            yield start, piece_end
        start = cut
        while text[start].isspace():  # the span is trimmed, so this stops before ``end``
            start += 1
    yield start, end


_ATX_RE = re.compile(ATX_HEADING)
# A setext or reStructuredText heading's underline (or overline): one mark, repeated
_RULE_MARKS = frozenset("=-~^\"'#*+_")


def _is_rule(line: str) -> bool:
    """A line of one mark of ``_RULE_MARKS``, three or more times (surrounding spaces aside)."""
    line = line.strip()
    return len(line) >= 3 and line[0] in _RULE_MARKS and line == line[0] * len(line)


def _line_start(text: str, i: int, floor: int) -> int | None:
    """Where the line holding position ``i`` starts, when a line break stands in
    ``text[floor:i]``; None when none does."""
    for k in range(i - 1, floor - 1, -1):
        if text[k] in LINE_BREAK_CHARS:
            return k + 1
    return None


def _line_after(text: str, i: int) -> str:
    """The line after the one that holds position ``i`` ("" where that is the last; a CRLF's LF
    is no line of its own)."""
    end = LINE_BREAK.search(text, i)
    if end is None:
        return ""
    below = LINE_BREAK.search(text, end.end())
    return text[end.end():below.start() if below else len(text)]


def _marked_headings(text: str, units: list[Sentence], max_chars: int,
                     markdown: bool) -> list[Sentence]:
    """``units`` with a marked heading's line whole, as one unit, and, in Markdown
    (``markdown``), a ``#`` heading's line a paragraph's start. A heading's line is marked by a
    rule right under it (setext, reStructuredText) or, in Markdown, by #s (an ATX heading; in
    other text a "# comment" line is none). "## Step 2. Install it" was two sentences, neither
    read as a heading; a changelog's "## 1.2.1" right under a list (CommonMark: a block of its
    own, blank line before it or not) ended a passage, its entries in the next."""
    out: list[Sentence] = []
    prev, marked = 0, False  # where ``out[-1]`` starts; whether its line is a marked heading's
    for u in units:
        line_start = _line_start(text, u.start, prev if out else 0)  # (linear: back to prev)
        prev = u.start
        if out and line_start is None:  # on the line of ``out[-1]``: joins a marked one's,
            if marked and u.end - out[-1].start <= min(HEADING_MAX_CHARS, max_chars):
                out[-1] = out[-1]._replace(end=u.end)  # while that stays short
            else:
                marked = False
                out.append(u)
            continue
        start = line_start or 0
        atx = markdown and not text[start:u.start].strip() and _ATX_RE.match(text, start)
        marked = bool(atx) or _is_rule(_line_after(text, u.start))
        out.append(u._replace(paragraph_start=True) if atx else u)
    return out


def _units(text: str, max_chars: int,
           markdown: bool = False) -> tuple[list[Sentence], list[bool]]:
    """The sentences of ``text``, an over-long one in pieces (``_hard_split``), a marked heading's
    line whole (``_marked_headings``), and whether each is code (a line of a fenced block, its
    fences included: never a heading or a rule); a blank line inside a fenced code block starts
    no paragraph (a passage ended there, mid-code)."""
    units: list[Sentence] = []
    for start, end, para in sentences(text):
        for i, (s, e) in enumerate(_hard_split(text, start, end, max_chars)):
            units.append(Sentence(s, e, para and i == 0))
    units = _marked_headings(text, units, max_chars, markdown)
    code = [False] * len(units)
    if "```" in text or "~~~" in text:
        # (in Markdown, a line of ~ under text opens a fence: it underlines no heading there)
        fences, f = fenced_code(text, tilde_underlines=not markdown), 0  # (in order: one pass)
        for k, u in enumerate(units):
            while f < len(fences) and fences[f][1] <= u.start:
                f += 1
            if f < len(fences) and fences[f][0] <= u.start:
                code[k] = True
                if fences[f][0] < u.start and u.paragraph_start:
                    units[k] = u._replace(paragraph_start=False)
    return units, code


HEADINGS_STACKED = 3  # a full passage leaves at most this many last headings to the next


class _Headings:
    """Which units of a text read as headings (or parts of one)."""

    def __init__(self, text: str, units: list[Sentence], code: list[bool],
                 markdown: bool) -> None:
        self.text, self.units, self.code, self.markdown = text, units, code, markdown

    def rule(self, k: int) -> bool:
        """A line of one mark, repeated (not code)."""
        return not self.code[k] and _is_rule(self.text[self.units[k].start:self.units[k].end])

    def title_line(self, k: int) -> bool:
        """One line of at most ``HEADING_MAX_CHARS`` characters, no rule and no code, that does
        not end as prose does (``text.ends_as_prose``, as a title), or that asks (``text.asks``:
        a FAQ's question), or, in Markdown, a ``#`` heading's (however it ends)."""
        unit = self.units[k]
        line = self.text[unit.start:unit.end]
        return (unit.end - unit.start <= HEADING_MAX_CHARS and not LINE_BREAK.search(line)
                and not self.rule(k) and not self.code[k]
                and (not ends_as_prose(line) or asks(line)
                     or (self.markdown and _ATX_RE.match(line) is not None)))

    def underlined(self, k: int) -> bool:
        """Whether ``units[k]`` is a heading's text with a rule right under it (a setext or
        reStructuredText heading: "Usage\n-----"), starting a paragraph or right under a rule
        that does (reStructuredText's overline)."""
        units = self.units
        if not (k + 1 < len(units) and self.rule(k + 1) and not units[k + 1].paragraph_start
                and self.title_line(k)):
            return False
        overlined = k > 0 and self.rule(k - 1) and (k == 1 or units[k - 1].paragraph_start)
        return k == 0 or units[k].paragraph_start or overlined

    def heading(self, k: int) -> bool:
        """Whether ``units[k]`` is a paragraph of its own that reads as a heading
        (``title_line``), or a part of an underlined one (its text, its underline or
        overline)."""
        units, unit = self.units, self.units[k]
        if self.rule(k):
            return ((k > 0 and not unit.paragraph_start and self.underlined(k - 1))
                    or (k + 1 < len(units) and not units[k + 1].paragraph_start
                        and self.underlined(k + 1)))
        line = self.text[unit.start:unit.end]
        return (((k == 0 or unit.paragraph_start)  # a "# " heading may have its text below
                 and (k + 1 == len(units) or units[k + 1].paragraph_start
                      or line.startswith("#"))
                 and self.title_line(k))
                or self.underlined(k))

    def splits(self, j: int) -> bool:
        """Whether a passage ending before ``units[j]`` cuts an underlined heading in two."""
        units = self.units
        return 0 < j < len(units) and not units[j].paragraph_start and (
            (self.rule(j) and self.underlined(j - 1))  # its text | its underline
            or (self.rule(j - 1) and self.underlined(j)))  # its overline | its text


def chunk_document(text: str, cfg: ChunkConfig, *,
                   markdown: bool = False) -> list[tuple[int, int]]:
    """Passage spans ``(start, end)`` covering ``text`` in order (see the module docstring);
    ``markdown``: the text is Markdown's (a ``#`` line is a heading, not a comment).

    With ``cfg.overlap_sentences > 0`` each passage starts with up to that many sentences of the
    previous one (fewer when they would not fit with the next new sentence).
    """
    assert cfg.max_chars >= 1, cfg  # ChunkConfig refuses less
    units, code = _units(text, cfg.max_chars, markdown)
    headings = _Headings(text, units, code, markdown)
    min_chars = cfg.max_chars // 4  # a paragraph break ends a passage at least this long
    spans: list[tuple[int, int]] = []
    i = fresh = 0  # units[i:] are next; units[fresh] is the first not yet in any passage
    while i < len(units):
        start = units[i].start
        j = i + 1
        while j < len(units) and units[j].end - start <= cfg.max_chars:
            # a paragraph break may end the passage only once it holds a fresh sentence, not
            # after a heading (it names what follows), and not before a short rest of the text
            # that fits (a last line alone, "See also X.", was a passage of its own)
            if (j > fresh and units[j].paragraph_start and units[j - 1].end - start >= min_chars
                    and not headings.heading(j - 1)
                    and not (units[-1].end - start <= cfg.max_chars
                             and units[-1].end - units[j].start < min_chars)):
                break
            j += 1
        # full: its last units headings, which begin the next passage instead; a few at most
        # (a list of short lines, API names one per line, reads as headings all: backing off
        # over all of it cut 1 KB into 16 passages of one line)
        stacked = 0  # (a heading's underline or overline is no heading of its own)
        while j < len(units) and j - 1 > max(i, fresh) and headings.heading(j - 1):
            if not headings.rule(j - 1):
                stacked += 1
                if stacked > HEADINGS_STACKED:
                    break
            j -= 1
        # an underlined heading stays whole where the passage would end inside it: with its
        # section in the next passage, else (no room to back off) in this one, if it fits
        while headings.splits(j) and j - 1 > max(i, fresh):
            j -= 1
        while headings.splits(j) and units[j].end - start <= cfg.max_chars:
            j += 1
        spans.append((start, units[j - 1].end))
        if j >= len(units):
            break
        fresh = j
        nxt = max(j - cfg.overlap_sentences, i + 1)
        while nxt < j and units[j].end - units[nxt].start > cfg.max_chars:
            nxt += 1  # drop overlap that would leave no room for the next new sentence
        i = nxt
    return spans


def _without_bom(text: str) -> str:
    """``text`` with a byte-order mark at its start made a space (offsets stay ``text``'s)."""
    return " " + text[1:] if text.startswith("\ufeff") else text


def passage_spans(doc: Document, cfg: ChunkConfig) -> list[tuple[int, int]]:
    """A document's passages: ``chunk_document``'s spans of its text, less, for a Markdown file
    (``citeqa.markdown``), its front matter (metadata: "layout: post", tags; a quote of it
    says nothing), and those of markup and headings alone that no one reads (badges, logos,
    link definitions: search ranked a README's "# Name" over its badges first for its name;
    code is read), unless all of them are. A byte-order mark a file's text starts with (kept:
    offsets are the file's) starts no passage."""
    if not is_markdown(doc.source):
        return chunk_document(_without_bom(doc.text), cfg)
    spans = (chunk_document(_without_bom(without_front_matter(doc.text)), cfg, markdown=True)
             or chunk_document(_without_bom(doc.text), cfg, markdown=True))  # (front matter alone)
    code = fenced_code(doc.text)  # (code is read: "export X=1", "<b>")
    read, f = [], 0
    for start, end in spans:
        while f < len(code) and code[f][1] <= start:
            f += 1
        if (f < len(code) and code[f][0] < end) or read_words(headings_out(doc.text[start:end])):
            read.append((start, end))
    return read or spans
