"""The quote constraint: grammars that only admit a cited answer whose quote is verbatim.

``output_grammar(passages)`` builds an llguidance Lark grammar for exactly (``free`` mode)::

    Answer: <one line, 1..max_answer_chars characters>
    Quote [<k>]: <a contiguous, word-aligned span of passage k>

In ``span`` mode it covers the answer line only (a word-aligned span of a passage, then the line
break); ``QuoteStage.grammar`` then builds, from the answer just written, the grammar of a quote
that CONTAINS that answer (``quote_grammar``): the answer is supported by its quote by
construction, and the model still answers first, the order it does best (``format.py``).

Decisions (see GopherCite, Menick et al. 2022, sec. 2.3 "constrained sampling"):

- The quote is **word-aligned**: llguidance's ``substring_words`` lexeme splits a passage into
  words, punctuation marks and whitespace runs, and admits any contiguous run of those chunks.
  A quote therefore never starts or stops in the middle of a word ("ris" from "Paris"), and the
  automaton stays small. Chinese, Japanese and Korean have no spaces between words: in text
  holding them each of their characters is a word (``substring_chunks``), so that an answer
  may be a name or a number inside a clause. We also intersect it with ``\\S(.*\\S)?`` so
  the quote is non-empty and neither starts nor ends with whitespace. A quote may contain a
  newline when the passage does.
- The quote must come from passage ``k`` itself: every passage has its own lexeme, reached only
  through its own ``Quote [k]: `` prefix, so a span from another passage (or one crossing two
  passages) cannot be emitted after that prefix.
- Span mode's quote lexeme is a stretch of the passage around an occurrence of the answer as
  whole words (``_around``), from a word's start to a word's end where words are split at
  whitespace (so "Roger." ends with its full stop), and only passages that hold the answer so
  get a ``Quote [k]`` alternative: the model cannot start a quote that no text could finish.
- Passages and answers are untrusted: a passage is embedded only as a JSON string inside
  ``%regex {...}`` (``json.dumps``), which escapes quotes, backslashes, newlines and control
  characters, and an answer only as ``\\x{..}`` escapes of every character that is not an
  ASCII letter or digit, so no text can end a lexeme or add grammar rules.

``OutputConstraint`` wraps an ``llguidance.LLMatcher`` (one per decoded row) with the few calls
the decoding loop needs; ``ll_tokenizer_for`` builds (once per tokenizer) the llguidance view of
a Hugging Face tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import unicodedata
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import llguidance
import numpy as np

from citeqa.errors import ModelError, OutputFormatError
from citeqa.generation.chat import stop_token_ids
from citeqa.generation.format import (
    ANSWER_LINE_END,
    ANSWER_MODES,
    ANSWER_PREFIX,
    QUOTE_PREFIX,
    QUOTE_SEPARATOR,
    AnswerMode,
)
from citeqa.text import CJK_RANGES, has_cjk, is_cjk, marks_class

# A span-mode quote reaches at most this many words beyond each side of its answer: its regex
# nests one group per word, and llguidance refuses regexes nested ~100 deep.
MAX_WORDS_AROUND = 64
# A quote holds one of the answer's first MAX_OCCURRENCES occurrences in its passage: each
# occurrence adds its own stretch to the grammar, and a one-letter answer repeated through
# 20 passages would otherwise exceed llguidance's grammar limit (and take seconds to compile).
MAX_OCCURRENCES = 8
_BEFORE = re.compile(r"\S+\s*")  # a word and the space after it
_AFTER = re.compile(r"\s*\S+")  # a word and the space before it
# A quote is non-empty and trimmed: it starts and ends with a non-whitespace character.
_TRIMMED = r"/\S(?s:.*\S)?/"
# Where a sentence starts: after a sentence's final mark (and closing quotes or brackets) and
# whitespace. Used only to guess where a quote starts (``quote_guess``), never to constrain one.
_SENTENCE_START = re.compile(r"[.!?][\"')\]\u201d\u2019]*\s+")


@functools.cache
def _cjk_patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """For text holding Chinese, Japanese or Korean (``text.CJK_RANGES``: no spaces between
    words, so a run of them was one word, a whole clause): its chunks for llguidance's
    ``substring_chunks`` (whitespace runs, each CJK character with its marks, runs of other
    word characters and marks, each other character), and ``_BEFORE``/``_AFTER`` whose
    "word" is one CJK character or a run of other non-space characters."""
    marks = marks_class(every_plane=True)  # as ``_inside_word`` reads a mark (any plane's)
    cjk = f"[{CJK_RANGES}][{marks}{_HALF_WIDTH_VOICING}]*"
    unit = f"(?:{cjk}|(?:(?![{CJK_RANGES}])\\S)+)"
    run = f"(?:(?![{CJK_RANGES}])[\\w{marks}])"
    # a number with the magnitudes written in it ("940만", "1千万", "1億2000万"): one chunk,
    # never "940" or "1千" alone (as ``_inside_word`` reads a cut inside ``_NUMBER``)
    number = f"{run}*{_NUMBER.pattern}"
    chunk = re.compile(f"\\s+|{number}|{cjk}|{run}+|.", re.DOTALL)
    return chunk, re.compile(f"{unit}\\s*"), re.compile(f"\\s*{unit}")


def _lark_string(s: str) -> str:
    """A Lark string literal for ``s`` (JSON string syntax is a subset Lark reads)."""
    return json.dumps(s, ensure_ascii=True)


def _words_around(passage: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """``_BEFORE`` and ``_AFTER`` for ``passage`` (``_cjk_patterns``'s where it holds CJK)."""
    if has_cjk(passage):
        _, before, after = _cjk_patterns()
        return before, after
    return _BEFORE, _AFTER


def _substring(text: str) -> str:
    """A regex lexeme of any word-aligned stretch of ``text`` (llguidance's
    ``substring_words``; in text holding CJK characters or combining marks, ``substring_chunks``
    of ``_cjk_patterns``'s chunks, so that one CJK character may begin or end a stretch and a
    mark stays with its letter: ``substring_words`` cuts before a mark that is not a letter,
    "Bogota" of "Bogota\u0301", "दिल" of "दिल्ली", which ``on_word_edges`` refuses)."""
    if has_cjk(text) or _has_marks(text):
        spec: dict[str, Any] = {"substring_chunks": _cjk_patterns()[0].findall(text)}
    else:
        spec = {"substring_words": text}
    return f"%regex {json.dumps(spec, ensure_ascii=True)}"


def _has_marks(text: str) -> bool:
    """Whether ``text`` holds a combining mark (of any plane)."""
    return not text.isascii() and _marked().search(text) is not None


@functools.cache
def _marked() -> re.Pattern[str]:
    return re.compile(f"[{_MARKS}]")


def _length(lo: int | None, hi: int | None) -> str:
    """A regex intersection bounding a lexeme to [lo, hi] characters ("" when unbounded)."""
    if lo is None and hi is None:
        return ""
    low = max(lo or 1, 1)
    high = "" if hi is None else str(max(hi, low))
    return f" & /(?s:.{{{low},{high}}})/"


def _shorter(min_quote_chars: int | None, passage: str) -> int | None:
    """The lower bound of a quote of ``passage``: ``min_quote_chars``, or the passage's own
    length where that is shorter (verify_quote takes a whole short passage)."""
    return None if min_quote_chars is None else min(min_quote_chars, len(passage.strip()))


def _pieces(passage: str, unquotable: str | None, min_quote_chars: int | None,
            ) -> tuple[list[str], int | None]:
    """``passage`` cut at the matches of the regex ``unquotable``, and the lower bound of a
    quote's length there: a quote or answer is a stretch of one piece, never one holding such
    a text. The whole passage, as it is, and ``_shorter``'s bound when nothing is cut (or
    ``unquotable`` is None); else the pieces that can hold a quote of ``min_quote_chars``
    (a piece is never the whole passage that verify_quote lets be shorter)."""
    if unquotable is None:
        return [passage], _shorter(min_quote_chars, passage)
    pieces = [piece for piece in re.split(unquotable, passage) if piece.strip()]
    if pieces == [passage]:
        return pieces, _shorter(min_quote_chars, passage)
    return [p for p in pieces if len(p.strip()) >= (min_quote_chars or 0)], min_quote_chars


def can_quote(passage: str, unquotable: str | None = None,
              min_quote_chars: int | None = None) -> bool:
    """Whether a grammar can offer a quote of ``passage`` (``_pieces``)."""
    return any(piece.strip() for piece in _pieces(passage, unquotable, min_quote_chars)[0])


def _quotable(passages: Sequence[str], only_passage: int | None) -> list[tuple[int, str]]:
    """``(k, passage)`` of the passages with a word to quote (only passage k when given)."""
    quotable = [(k, p) for k, p in enumerate(passages, start=1) if p.strip()]
    if only_passage is not None:
        quotable = [(k, p) for k, p in quotable if k == only_passage]
    return quotable


def _quote_rules(lexemes: Sequence[tuple[int, Sequence[str]]]) -> list[str]:
    """The ``quote`` rule: ``Quote [k]: `` then one of passage k's lexemes (one per piece of
    it, ``_pieces``), for each (k, lexemes)."""
    lines = ["quote: " + " | ".join(f"quote_{k}" for k, _ in lexemes)]
    for k, alternatives in lexemes:
        prefix = _lark_string(f"{QUOTE_PREFIX}{k}{QUOTE_SEPARATOR}")
        names = ([f"QUOTE_{k}"] if len(alternatives) == 1
                 else [f"QUOTE_{k}_{i}" for i in range(len(alternatives))])
        lines.append(f"quote_{k}: {prefix} " + (names[0] if len(names) == 1
                                                else "(" + " | ".join(names) + ")"))
        lines += [f"{name}: {lexeme}" for name, lexeme in zip(names, alternatives, strict=True)]
    return lines


def output_grammar(
    passages: Sequence[str],
    *,
    mode: AnswerMode = "free",
    max_answer_chars: int = 200,
    min_quote_chars: int | None = None,
    max_quote_chars: int | None = None,
    answer_from_passages: bool = False,
    only_passage: int | None = None,
    unquotable: str | None = None,
) -> str:
    """Return the llguidance Lark grammar of a cited answer quoting one of ``passages``.

    ``passages[k-1]`` is shown to the model as passage ``k``. Passages with no word to quote
    (empty or whitespace) get no ``Quote [k]`` alternative; ``only_passage`` (a number k)
    keeps only that one, so that candidates can be made to quote different passages.
    ``min_quote_chars`` / ``max_quote_chars`` bound the quote length in characters.

    ``mode="free"``: the whole output, ``Answer: ...`` then ``Quote [k]: ...``. The answer is
    free text, or with ``answer_from_passages`` a word-aligned span of one of the passages
    (a small model then cannot answer with a number that is in no passage, nor copy a format
    placeholder).

    ``mode="span"``: the answer line only, ``Answer: <word-aligned span of a passage>`` and its
    line break; the quote follows under ``quote_grammar`` built from that answer
    (``QuoteStage``).

    ``unquotable``: a regex of texts no answer or quote may hold (a passage is quoted piece by
    piece between them): what an engine's own grammar matcher cannot take as text
    (``Backend.unquotable``).

    Raises ValueError when no passage can be quoted (callers generate only over passages).
    """
    if max_answer_chars < 1:
        raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer mode must be one of {ANSWER_MODES}, got {mode!r}")
    quotable = [(k, cut) for k, p in _quotable(passages, only_passage)
                if (cut := _pieces(p, unquotable, min_quote_chars))[0]]
    if not quotable:
        raise ValueError("no passage has text to quote; retrieve passages first")
    # trimmed, as a parse reads it (an answer of spaces alone is none: a failed candidate)
    answer = f"{_TRIMMED} & /[^\\n]{{1,{int(max_answer_chars)}}}/"
    if answer_from_passages or mode == "span":
        joined = "\n".join(p for _, (pieces, _) in quotable for p in pieces)
        answer = f"{_substring(joined)} & {answer}"
    head = f"start: {_lark_string(ANSWER_PREFIX)} ANSWER {_lark_string(ANSWER_LINE_END)}"
    if mode == "span":
        return f"{head}\nANSWER: {answer}\n"
    # the lower bound gives way to a passage shorter than it (its whole text is the quote)
    lexemes = [(k, [f"{_substring(p)} & {_TRIMMED}{_length(low, max_quote_chars)}"
                    for p in pieces])
               for k, (pieces, low) in quotable]
    lines = [f"{head} quote", f"ANSWER: {answer}", *_quote_rules(lexemes)]
    return "\n".join(lines) + "\n"


def _literal(text: str) -> str:
    """A regex matching exactly ``text``: every character but ASCII letters and digits as a
    ``\\x{..}`` escape, so no character of it is regex or Lark syntax."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


def _word_char(c: str) -> bool:
    """Part of a word: a letter or digit, "_", or a combining mark (it belongs to the letter
    before it: "é" written as "e" and U+0301, a Devanagari vowel sign), which ``\\w`` is not."""
    return c.isalnum() or c == "_" or unicodedata.category(c).startswith("M")


# Half-width katakana's voicing marks (ﾞ ﾟ): letters, not combining marks, yet each belongs
# to the kana before it, as a combining mark does ("ｶﾞ" is one letter, ガ).
_HALF_WIDTH_VOICING = "\uff9e\uff9f"
# CJK numerals of magnitude written after digits: 万 (10^4), 億 (10^8), 兆, 千, 百; Korean's 만,
# 억, 조, 천, 백. Cut off, the digits say another number ("940" of "940만 명", 9.4 million people).
MAGNITUDES = ("\u4e07\u842c\u5104\u4ebf\u5146\u5343\u767e\u4f70"
              "\ub9cc\uc5b5\uc870\ucc9c\ubc31")
# digits with magnitudes in them, and the digits between ("1億2000万", "1万5千"): the marks a
# character may carry (a variation selector) go with it, and so does a word going on after a
# magnitude (a cut there is inside a word, as between any two characters of it)
_MARKS = marks_class(every_plane=True)
_NUMBER = re.compile(f"\\d[{_MARKS}]*(?:[{MAGNITUDES}][{_MARKS}{_HALF_WIDTH_VOICING}]*"
                     f"(?:(?![{CJK_RANGES}])[\\w{_MARKS}])*)+")


def _inside_word(text: str, at: int) -> bool:
    """Whether a cut of ``text`` at ``at`` falls inside a word: before a combining mark of a
    word character (or a half-width voicing mark of a CJK one: "ｶ|ﾞ"), inside a number written
    with magnitudes (``_NUMBER``: "1千|万"), or between two word characters of which neither is
    a CJK one (each is a word of its own; the one before is the letter a run of marks belongs
    to). The chunks of ``_cjk_patterns`` and llguidance's ``substring_words`` cut so."""
    if not 0 < at < len(text):
        return False
    before, after = text[at - 1], text[at]
    if not (_word_char(before) and _word_char(after)):
        return False
    if unicodedata.category(after).startswith("M"):
        return True
    if any(m.start() < at < m.end()  # "940" of "940만" is another number, "1千" of "1千万" too
           for m in _NUMBER.finditer(text, max(0, at - 64), min(len(text), at + 64))):
        return True
    base = at - 1
    while base > 0 and unicodedata.category(text[base]).startswith("M"):
        base -= 1
    if after in _HALF_WIDTH_VOICING and is_cjk(text[base]):  # ("1ﾞ": a chunk of its own)
        return True
    return not (is_cjk(text[base]) or is_cjk(after))


def on_word_edges(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` neither begins nor ends inside a word ("40" in "1940" and
    "cafe" in "cafe\u0301s" do; "千四百万人" in "約千四百万人です" does not)."""
    return not (_inside_word(text, start) or _inside_word(text, end))


def word_occurrences(passage: str, answer: str) -> list[int]:
    """Where ``answer`` stands in ``passage`` as whole words (not "King" in "Kingdom")."""
    return [m.start() for m in re.finditer(f"(?={re.escape(answer)})", passage)
            if on_word_edges(passage, m.start(), m.start() + len(answer))]


def _tails(pieces: Sequence[str]) -> str:
    """A regex for any run of the last pieces of ``pieces`` (none included): nested optional
    groups, linear in size."""
    acc = None
    for piece in pieces:
        acc = _literal(piece) if acc is None else f"(?:{acc})?{_literal(piece)}"
    return "" if acc is None else f"(?:{acc})?"


def _heads(pieces: Sequence[str]) -> str:
    """A regex for any run of the first pieces of ``pieces`` (none included)."""
    acc = None
    for piece in reversed(pieces):
        acc = _literal(piece) if acc is None else f"{_literal(piece)}(?:{acc})?"
    return "" if acc is None else f"(?:{acc})?"


def _within(pieces: list[str], room: int | None) -> list[str]:
    """The leading ``pieces`` that fit in ``room`` characters and ``MAX_WORDS_AROUND``."""
    kept, used = [], 0
    for piece in pieces[:MAX_WORDS_AROUND]:
        used += len(piece)
        if room is not None and used > room:
            break
        kept.append(piece)
    return kept


def _around(passage: str, start: int, answer: str, room: int | None, low: int | None,
            high: int | None) -> str | None:
    """A regex for the stretches of ``passage`` holding ``answer`` at ``start`` (whole words
    before it, each with the space after it, the answer, whole words after it); None when none
    of them is ``low`` to ``high`` characters long (a quote opened there could not be ended:
    words around it too long, as in text without spaces, or only both sides together long
    enough and then too long)."""
    before_re, after_re = _words_around(passage)
    before = before_re.findall(passage[:start])
    after = after_re.findall(passage[start + len(answer) :])
    before = _within(before[::-1], room)[::-1]
    after = _within(after, room)
    # the lengths a stretch can have: some last words before, the answer, some first words after
    heads = list(accumulate((len(p) for p in reversed(before)), initial=0))
    tails = list(accumulate(map(len, after), initial=0))  # ascending
    least, most = (low or 0) - len(answer), (math.inf if high is None else high) - len(answer)
    if not any((i := bisect_left(tails, least - h)) < len(tails) and tails[i] <= most - h
               for h in heads):
        return None
    return f"{_tails(before)}{_literal(answer)}{_heads(after)}"


def quote_grammar(
    passages: Sequence[str],
    answer: str,
    *,
    min_quote_chars: int | None = None,
    max_quote_chars: int | None = None,
    only_passage: int | None = None,
    unquotable: str | None = None,
) -> str | None:
    """The grammar of a span-mode quote after ``answer``'s line: ``Quote [k]: `` and a stretch
    of passage k, from a word's start to a word's end (words split at whitespace; a CJK
    character is a word of its own), that contains ``answer`` as whole words.

    Only passages holding the answer so are offered (and only ``only_passage`` when given).
    The length bounds give way where they would leave no quote: the lower one to a shorter
    passage, the upper one to a longer answer; a quote reaches at most ``MAX_WORDS_AROUND``
    words beyond each side of the answer, and holds one of its first ``MAX_OCCURRENCES``
    occurrences in the passage; with ``unquotable`` (``output_grammar``) the stretch lies in
    one piece of the passage. None when no passage holds the answer.

    Each passage's lexeme is a plain regex (a union over the answer's occurrences) rather than
    the passage's ``substring_words`` intersected with "contains the answer": llguidance gave
    up on that intersection ("too many expressions constructed") on real passages.
    """
    answer = answer.strip()
    if not answer:
        return None
    room = None if max_quote_chars is None else max(max_quote_chars - len(answer), 0)
    lexemes = []
    high = None if max_quote_chars is None else max(max_quote_chars, len(answer))
    for k, passage in _quotable(passages, only_passage):
        pieces, low = _pieces(passage, unquotable, min_quote_chars)
        # only occurrences some stretch of which fits the bounds: another would open a quote
        # nothing can finish
        stretches = dict.fromkeys(
            regex for piece, at in [(piece, at) for piece in pieces
                                    for at in word_occurrences(piece, answer)][:MAX_OCCURRENCES]
            if (regex := _around(piece, at, answer, room, low, high)) is not None)
        if stretches:
            lexemes.append((k, [f"/(?:{'|'.join(stretches)})/{_length(low, high)}"]))
    if not lexemes:
        return None
    return "\n".join(["start: quote", *_quote_rules(lexemes)]) + "\n"


def quote_guess(passages: Sequence[str], answer: str, *, max_quote_chars: int | None = None,
                only_passage: int | None = None) -> str | None:
    """A guess at the quote a span-mode generator writes after ``answer``'s line, for drafting
    it (speculative decoding checks the guess against the model, so a wrong one costs only
    the rows it adds): ``Quote [k]: `` and passage k from the last sentence start before the
    answer (or the passage's start) that leaves the answer inside ``max_quote_chars`` and
    ``MAX_WORDS_AROUND`` words, in the
    first passage holding the answer as whole words; from the answer itself when no sentence
    start fits. Runs on to the passage's end: the grammar cuts it where a quote must stop.
    None when no passage holds the answer."""
    answer = answer.strip()
    if not answer:
        return None
    room = None if max_quote_chars is None else max(max_quote_chars - len(answer), 0)
    for k, passage in _quotable(passages, only_passage):
        found = word_occurrences(passage, answer)
        if not found:
            continue
        at = found[0]
        starts = [0, *(m.end() for m in _SENTENCE_START.finditer(passage, 0, at))]
        before_re = _words_around(passage)[0]
        fits = [s for s in starts if s <= at and (room is None or at - s <= room)
                and len(before_re.findall(passage[s:at])) <= MAX_WORDS_AROUND]
        begin = max(fits) if fits else at
        return f"{QUOTE_PREFIX}{k}{QUOTE_SEPARATOR}{passage[begin:].lstrip()}"
    return None


def answer_of_first_part(text: str) -> str | None:
    """The answer of a span-mode output's first part (``Answer: <answer>`` and its line
    break), or None when ``text`` is not one."""
    if not (text.startswith(ANSWER_PREFIX) and text.endswith(ANSWER_LINE_END)):
        return None
    answer = text[len(ANSWER_PREFIX) : len(text) - len(ANSWER_LINE_END)]
    return answer if answer.strip() and ANSWER_LINE_END not in answer else None


@dataclass(frozen=True)
class QuoteStage:
    """What a backend needs to constrain a span-mode quote once the answer is written (see
    ``GenerationRequest.quote_stage``): the passages as shown and the quote's bounds."""

    passages: tuple[str, ...]
    min_quote_chars: int | None = None
    max_quote_chars: int | None = None
    only_passage: int | None = None
    unquotable: str | None = None  # (output_grammar)

    def grammar(self, first_part: str) -> str | None:
        """The quote's grammar after ``first_part`` (the decoded answer line), or None when
        that is no answer line or no passage holds the answer."""
        answer = answer_of_first_part(first_part)
        if answer is None:
            return None
        return quote_grammar(self.passages, answer, min_quote_chars=self.min_quote_chars,
                             max_quote_chars=self.max_quote_chars,
                             only_passage=self.only_passage, unquotable=self.unquotable)

    def guess(self, first_part: str) -> str | None:
        """``quote_guess`` for the answer of ``first_part`` (see ``grammar``): text to draft the
        quote from, or None."""
        answer = answer_of_first_part(first_part)
        if answer is None:
            return None
        return quote_guess(self.passages, answer, max_quote_chars=self.max_quote_chars,
                           only_passage=self.only_passage)


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)
_LL_LOCK = threading.Lock()


def ll_tokenizer_for(hf_tokenizer: Any) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for a fast Hugging Face tokenizer (built once, ~1 s, cached).

    Stop tokens are ``chat.stop_token_ids``, so any of them ends a row once the grammar
    accepts.
    """
    with _LL_LOCK:
        cached = _LL_TOKENIZERS.get(hf_tokenizer)
        if cached is not None:
            return cached
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelError(
                "constrained decoding needs a fast (Rust) Hugging Face tokenizer; "
                "save the model with a tokenizer.json"
            )
        eos = stop_token_ids(hf_tokenizer)
        raw = json.loads(backend.to_str())
        raw["padding"] = None  # llguidance tokenises single strings; padding would leak in
        raw["truncation"] = None
        rust = llguidance.LLTokenizer(json.dumps(raw), n_vocab=len(hf_tokenizer), eos_token=eos)
        ll_tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TextTokens(
            hf_tokenizer, rust, eos)), n_vocab=len(hf_tokenizer), eos_token=eos)
        _LL_TOKENIZERS[hf_tokenizer] = ll_tok
        return ll_tok


class _TextTokens:
    """The tokenizer as llguidance's ``TokenizerWrapper`` takes it, reading a special token's
    text as text. The Rust tokenizer read a document's "<|im_end|>" as that special token, so
    a quote forced across it came back as a token the grammar refuses (a crash, and a 500 for
    every request of the batch); citeqa's prompts read such texts as text too (chat.defused).
    Each token's bytes and which are special are the Rust tokenizer's own; text between
    special tokens' texts is tokenized by it as before (``tokenize_str``: a SentencePiece
    tokenizer's "▁" prefix is its business, not added again), and a special token's text by
    its greedy reading of ordinary tokens."""

    def __init__(self, hf_tokenizer: Any, rust: llguidance.LLTokenizer, eos: list[int]) -> None:
        self._rust = rust
        self.eos_token_id = eos[0]
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.tokens = [rust.decode_bytes([i]) for i in range(rust.vocab_size)]
        self.special_token_ids = [i for i in range(rust.vocab_size) if rust.is_special_token(i)]
        texts = {t.decode("utf-8", "replace") for i in self.special_token_ids
                 if (t := self.tokens[i])}
        self._specials = (re.compile("(" + "|".join(map(re.escape, sorted(
            texts, key=len, reverse=True))) + ")") if texts else None)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # (so the wrapper passes text, not bytes)
            raise TypeError("text only")
        if self._specials is None:
            return self._rust.tokenize_str(text)
        out: list[int] = []
        for i, piece in enumerate(self._specials.split(text)):  # odd pieces: special texts
            if piece:
                out += (self._rust.greedy_tokenize(piece) if i % 2
                        else self._rust.tokenize_str(piece))
        return out


# llguidance's limits for a grammar (its defaults), then those tried where they refuse it:
# precomputing the large lexemes ran out of lexer fuel on free mode's quotes of near-duplicate
# CJK passages (each character a chunk: the request failed, 500); without it the lexer works
# them out as decoding reaches them
_LIMITS: tuple[dict[str, Any] | None, ...] = (None, {"precompute_large_lexemes": False})


class OutputConstraint:
    """One row's grammar state: which tokens may come next, and what the grammar forces."""

    def __init__(self, grammar: str, ll_tokenizer: llguidance.LLTokenizer) -> None:
        self._tokenizer = ll_tokenizer
        for limits in _LIMITS:
            self._matcher = llguidance.LLMatcher(
                ll_tokenizer, grammar, log_level=0,
                limits=None if limits is None else llguidance.LLParserLimits(**limits))
            if not self._matcher.is_error():
                break
        else:
            raise OutputFormatError(f"invalid output grammar: {self._matcher.get_error()}")
        self.vocab_size: int = ll_tokenizer.vocab_size
        self.stop_tokens: tuple[int, ...] = tuple(ll_tokenizer.eos_tokens)

    def copy(self) -> OutputConstraint:
        """An independent matcher in the same state (cheaper than recompiling the grammar)."""
        twin = object.__new__(OutputConstraint)
        twin._tokenizer = self._tokenizer
        twin._matcher = self._matcher.deep_copy()
        twin.vocab_size = self.vocab_size
        twin.stop_tokens = self.stop_tokens
        return twin

    def allowed_mask(self) -> np.ndarray:
        """Boolean mask over the tokenizer's vocabulary: True where the token may come next."""
        bias = self._matcher.compute_logit_bias()  # one byte per token: 0 or 200
        return np.frombuffer(bias, dtype=np.uint8) != 0

    def consume(self, token_id: int) -> bool:
        """Advance by one token; False (and an error state) when the grammar forbids it."""
        return self._matcher.consume_token(int(token_id))

    def consume_many(self, token_ids: Sequence[int]) -> bool:
        return self._matcher.consume_tokens([int(t) for t in token_ids])

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``token_ids`` the grammar would accept (state unchanged)."""
        return self._matcher.validate_tokens([int(t) for t in token_ids])

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from here (jump-forward), possibly none."""
        return list(self._matcher.compute_ff_tokens())

    def is_accepting(self) -> bool:
        """The output so far is complete (EOS would be allowed now)."""
        return self._matcher.is_accepting()

    def is_stopped(self) -> bool:
        """No further token except EOS can be added (complete, or in an error state)."""
        return self._matcher.is_stopped()

    def is_error(self) -> bool:
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()
