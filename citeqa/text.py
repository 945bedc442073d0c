"""Text heuristics, in one place: words, answer normalisation, stop words, terms, sentences.

Everything that reads text by rule imports it from here: BM25 (``tokenize``), chunking and
prompt windows (``sentences``), quote verification (``is_contentful``), the extractive stand-in
model, the reward model's inputs and the SQuAD metrics (``normalize_answer``). A change here
changes all of them together, so each function says what depends on it.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

WORD = re.compile(r"\w+")  # a word: a run of unicode word characters (tokenizer 1)


@functools.cache
def _word_with_marks() -> re.Pattern[str]:
    """Tokenizer 2's word: a run of ``\\w`` and combining marks (built on first use, ~25 ms)."""
    return re.compile(rf"[\w{marks_class()}]+")


@functools.cache
def marks_class(every_plane: bool = False) -> str:
    """A character class's ranges (without brackets) of the Basic Multilingual Plane's
    combining marks (Unicode categories Mn, Mc, Me; built once): the vowel signs of Indic
    scripts, Hebrew points, Arabic harakat, accents left apart by NFD. ``\\w`` leaves them
    out, splitting such words. Marks of the other planes (rare scripts, the ideographic
    variation selectors) only with ``every_plane`` (~0.2 s to build): a class that holds them
    is several times slower to match."""
    ranges: list[list[int]] = []
    for c in range(0x110000 if every_plane else 0x10000):
        if unicodedata.category(chr(c))[0] == "M":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b)))
                   for a, b in ranges)


# Tokenizer 2: words keep their combining marks, in NFC ("café" typed as c-a-f-e-U+0301 is
# "café", not "cafe"; "हिन्दी" is one token, not "ह", "न", "द").
# Tokenizer 3: tokenizer 2's words, case-folded ("Straße" and "STRASSE" are one word), with each
# run of Han, kana or Hangul (scripts written without spaces between words: a "word" of ``\w``
# was a whole clause, which no question matched) cut into overlapping pairs of characters, as
# Lucene's CJK bigrams: "東京タワー" -> 東京 京タ タワ ワー; a lone one stands alone.
# Tokenizer 4: tokenizer 3's in NFKC (full-width "１９２７" is 1927; see ``tokenize``).
# Tokenizer 5: tokenizer 4's with a symbol that NFKC writes in letters a word of its own.
TOKENIZER = 5
# Han (with its extensions and compatibility forms), hiragana, katakana (half-width too),
# Hangul: the characters of scripts written without spaces between words, as a regex class's
# ranges (BM25 pairs them; an answer or quote may begin and end at any of them)
# (not the kana voicing marks U+3099-U+309C: combining, or no letters; with the iteration and
# closing marks 々〆〇 of Han text)
CJK_RANGES = ("\u3005-\u3007\u3040-\u3098\u309d-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
              "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f")
_CJK = re.compile(f"[{CJK_RANGES}]+")
_CJK_OR_NOT = re.compile(f"[{CJK_RANGES}]|[^{CJK_RANGES}]+")  # a CJK character, or a run of others


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a character of ``CJK_RANGES``."""
    return not text.isascii() and _CJK.search(text) is not None


def is_cjk(c: str) -> bool:
    """Whether the character ``c`` is one of ``CJK_RANGES``."""
    return not c.isascii() and _CJK.match(c) is not None


# A small English stop-word list: a quote made only of these (and punctuation) supports nothing,
# and they never count as question terms.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    """.split()
)

# Closing quotes and brackets that stay with the sentence they end (CJK's corner brackets too).
_CLOSERS = "\"')]\u201d\u2019\u300d\u300f\u3011\uff09"
# A line that reads as a heading (chunking keeps it with its section) or a title is no longer.
HEADING_MAX_CHARS = 120
# The marks a line of prose ends with: a sentence's (those ``_SENTENCE_BREAK`` reads) or a
# clause's.
_PROSE_ENDS = (".", "!", "?", ";", ",", "\u0964", "\u0965", "\u061f", "\u06d4", "\u1362",
               "\u3002", "\uff01", "\uff1f", "\uff0e", "\uff61")


def ends_as_prose(line: str) -> bool:
    """Whether ``line`` ends as a sentence or a clause does, closing quotes and brackets after
    its mark aside ('He left.)' does; "Installation (Linux)" does not): a heading or a title
    does not. The one rule of chunking's headings (which also take a line that ``asks``) and of
    plain text's titles."""
    return line.rstrip().rstrip(_CLOSERS + "}\u00bb").endswith(_PROSE_ENDS)


def asks(line: str) -> bool:
    """Whether ``line`` ends as a question does (closing quotes and brackets after its mark
    aside): a line of its own that asks names what follows, as a FAQ's question does."""
    return line.rstrip().rstrip(_CLOSERS + "}\u00bb").endswith(("?", "\uff1f", "\u061f"))
# A sentence ends after . ! or ? (and the Devanagari danda, the Arabic question mark and full
# stop, the Ethiopic full stop), plus closing quotes/brackets, followed by whitespace; after a
# CJK full stop, ! or ? (。！？, and the full-width and half-width stops ．｡, the first not
# next to a digit: "３．５", a list's "１．"; written with no space after) whether or not
# whitespace follows, but for a quotation the sentence goes on after ("「行く。」と言った");
# or at a line break (LF, CR, CRLF, NEL, U+2028, U+2029: old Mac files end lines in CR alone,
# word processors' exports in U+2028/9), but for a hard-wrapped line (``_wrapped``). The
# whitespace between sentences belongs to neither. Two line breaks in that whitespace make a
# paragraph break, and so does one U+2029 (a paragraph separator). The line-break branch starts
# only where whitespace starts (the same matches: a greedy one always began there): tried
# inside a long run of spaces it rescanned the run from every position, quadratic (a 64 KB post
# held the server for seconds).
_SENTENCE_BREAK = re.compile(
    "(?<=[.!?\u0964\u0965\u061f\u06d4\u1362])[\"')\\]\u201d\u2019]*\\s+"
    "|(?<=[\u3002\uff01\uff1f\uff61])(?![\u300d\u300f]+\u3068)"
    "[\"')\\]\u201d\u2019\u300d\u300f\u3011\uff09]*\\s*"
    "|(?<=[^0-9\uff10-\uff19]\uff0e)(?![0-9\uff10-\uff19])"
    "[\"')\\]\u201d\u2019\u300d\u300f\u3011\uff09]*\\s*"
    "|(?P<line>(?<!\\s)\\s*[\n\r\x85\u2028\u2029]\\s*)")
LINE_BREAK_CHARS = "\n\r\x85\u2028\u2029"  # what ends a line (a CRLF is one break)
LINE_BREAK = re.compile(f"\r\n|[{LINE_BREAK_CHARS}]")
WRAPPED_MIN_CHARS = 50  # shorter lines are not cut by wrapping (wrap widths are 60-80)
_ROW_OR_HEADING = re.compile(r"[ \t]*[#|]")  # a line that wraps nothing: a heading, a table row
# what starts a line of its own: a list item, a heading, a quotation, a table row, a fence
_LINE_START = re.compile(r"(?:[-*+\u2022>#|]|\d{1,3}[.)]|`{3}|~{3})(?:\s|$)|[#|>`]")


# Words shortened before what they qualify ("Dr. Smith", "vs. Spain"): a stop after one ends no
# sentence unless a new one plainly starts (below).
_TITLES = frozenset("""
    Mr Mrs Ms Messrs Dr Prof St Mt Ft Gen Col Maj Lt Sgt Capt Cmdr Adm Rev Fr Gov Sen Rep Pres
    Hon vs cf viz approx ca
    """.split())
_BEFORE_NUMBERS = frozenset("No Nos no p pp Vol Vols vol Fig Figs fig Ch Sec Eq Art".split())
# Words shortened where a sentence may end, but does not where it goes on in lower case.
_BEFORE_LOWER = frozenset("etc al Inc Ltd Co Corp Bros Jr Sr incl esp resp est dept ed eds".split())
# The word a stop ends, read back to whitespace or an opening bracket or quote.
_STOPPED_WORD = re.compile(r"(?:^|(?<=[\s(\[\"'\u201c\u2018]))(\w+(?:\.\w+)*)\.\Z")
_INITIALS = re.compile(r"[^\W\d_](?:\.[^\W\d_])+\Z")  # "U.S", "e.g", "i.e", "a.m"
# Lower-case letters parted by stops that shorten words ("a.x" is more likely code's name).
_DOTTED_LOWER = frozenset("e.g i.e a.m p.m a.k.a c.f n.b v.s".split())
_NEXT_WORD = re.compile(r"\w+")
_INITIAL = re.compile(r"[^\W\d_]\.\s")  # "O. " in "E. O. Wilson"
_NUMBERED = re.compile(r"[ \t]*\d{1,3}[.)]\s")  # a numbered list item's start


def _abbreviated(text: str, m: re.Match[str]) -> bool:
    """Whether the stop before ``m`` (a break after ``.`` within a line) ends an abbreviation
    rather than a sentence. Each such split cut a name or phrase in two, so an extractive quote
    or a prompt's window began or ended mid-sentence:
    - a title ("Dr. Watson", "St. Augustine") or ``vs.``, ``cf.``, ``approx.``;
    - ``No.``, ``p.``, ``Fig.`` before a number ("No. 5", "pp. 4-9");
    - letters parted by stops ("the U.S. Army", "e.g. customs");
    - ``etc.``, ``et al.``, ``Inc.`` with the sentence going on in lower case;
    - one capital, an initial, between capitalised words of a name ("Charles H. Smith") or
      before another initial ("E. O. Wilson");
    - a numbered list item's number at a line's start, where a list can start ("1. Install").
    A stop inside quotes or brackets ('"No." He') ends the sentence, and so does one before a
    capitalised stop word ("in the U.S. The", "World War I. It"): a new sentence starts."""
    if text[m.start() - 1] != "." or not text[m.start()].isspace() or _line_breaks(m.group()):
        return False
    word = _STOPPED_WORD.search(text, max(0, m.start() - 24), m.start())
    if word is None:
        return False
    token = word.group(1)
    nxt = _NEXT_WORD.match(text, m.end())
    following = nxt.group() if nxt else text[m.end():m.end() + 1]
    if following[:1].isupper() and following.lower() in STOP_WORDS:
        return False
    if token in _BEFORE_NUMBERS:
        return following[:1].isdigit()
    if token in _TITLES or (_INITIALS.match(token) and (token in _DOTTED_LOWER
                                                        or not token.islower())):
        return True
    if token.isdigit() and len(token) <= 3:
        return _list_can_start(text, word.start())
    if following[:1].islower():
        return token in _BEFORE_LOWER
    if not (len(token) == 1 and token.isupper() and following[:1].isupper()):
        return False
    # One capital: an initial where a name goes on ("Charles H. Smith", "E. O. Wilson"), not a
    # letter that ends a sentence ("reduced to X. Thus", "in class C. This").
    return (_INITIAL.match(text, m.end()) is not None
            or _word_before(text, word.start())[:1].isupper())


def _word_before(text: str, i: int) -> str:
    """The word before position ``i`` (past the whitespace there), less an opening bracket or
    quote; up to 40 characters back."""
    j = i
    while j > max(0, i - 40) and text[j - 1].isspace():
        j -= 1
    k = j
    while k > max(0, j - 40) and not text[k - 1].isspace():
        k -= 1
    return text[k:j].lstrip("([\"'\u201c\u2018")


def _list_can_start(text: str, i: int) -> bool:
    """Whether the number at ``i`` starts a line where a numbered list can: the text's or a
    paragraph's first line, or one after a line ending in ":" or another numbered item (not
    a number a page's markup left on a line of its own: "the formula O\\n2. Diatomic")."""
    line = i
    while line > 0 and text[line - 1] in " \t":
        line -= 1
    if line == 0:
        return True
    if text[line - 1] not in LINE_BREAK_CHARS:
        return False
    before = text[max(0, line - 400):line].rstrip(" \t")
    prev = LINE_BREAK.split(before.rstrip(LINE_BREAK_CHARS))[-1] if before else ""
    crossed = before[len(before.rstrip(LINE_BREAK_CHARS)):]
    return (not prev.strip() or _line_breaks(crossed) >= 2 or prev.rstrip().endswith(":")
            or _NUMBERED.match(prev) is not None)


def _line_breaks(whitespace: str) -> int:
    """How many line breaks ``whitespace`` holds (CRLF is one; U+2029, a paragraph's end, two)."""
    return (sum(whitespace.count(c) for c in "\n\r\x85\u2028") - whitespace.count("\r\n")
            + 2 * whitespace.count("\u2029"))


def _wrapped(text: str, line_start: int, m: re.Match[str]) -> bool:
    """Whether the one line break of ``m`` (a line-break match) only wraps prose: the line it
    ends (from ``line_start``) is of a wrapping width, not a heading or table row, and the next
    goes on in lower case or with a number, not as a list item or other line of its own. Text
    wrapped at 72-80 columns otherwise became a sentence per line ("The" one of them): passages,
    prompt windows and extractive quotes began and ended mid-sentence."""
    if (m.start() - line_start < WRAPPED_MIN_CHARS or _line_breaks(m.group()) != 1
            or _ROW_OR_HEADING.match(text, line_start)):
        return False
    first = text[m.end():m.end() + 1]
    return ((first.islower() or first.isdigit())
            and _LINE_START.match(text, m.end()) is None)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)  # ASCII only: "–", "—", "’" are kept


# Blank = only these characters: the union of what Python's str.isspace() and JSON Schema's
# (ECMA-262) \s call whitespace, spelled out because the two disagree (\x1c-\x1f, \x85, \ufeff),
# so the published pattern and the server accept exactly the same strings; and the invisible
# format characters (zero-width spaces and joiners, direction marks and embeddings, the soft
# hyphen, word joiners): a question or document of only those shows nothing.
INVISIBLE_CHARS = ("\xad\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                   "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b"
                   "\u206c\u206d\u206e\u206f")
BLANK_CHARS = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
               "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
               + INVISIBLE_CHARS)


def is_blank(text: str) -> bool:
    """True when ``text`` holds only whitespace and invisible characters (``BLANK_CHARS``)."""
    return all(c in BLANK_CHARS for c in text)


def unsendable(text: str) -> str | None:
    """Why ``text`` cannot be stored or sent as UTF-8 ("contains a NUL character", "is not
    valid Unicode (lone surrogate)", as a lone byte a terminal hands Python becomes), or None.
    REST's schema and the pipeline refuse such a question alike."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    return None


def tokenize(text: str, version: int = TOKENIZER) -> list[str]:
    """Lowercase word tokens of ``text``, in order: the one BM25 tokenizer.

    BM25 indexes and queries with it, and an index records the ``version`` it was built with
    (``BM25Index.tokenizer``; 1 before version 2 existed): a query is tokenized as its index
    was. Version 1: runs of ``\\w``. Version 2: in NFC, runs of ``\\w`` and combining marks.
    Version 3: version 2's, case-folded, with Han, kana and Hangul in overlapping pairs.
    Version 4: version 3's in NFKC, so that full-width and half-width forms
    are the ones they stand for ("１９２７" is 1927, "ｶﾀｶﾅ" カタカナ, "ＰＡＲＩＳ" paris; Japanese
    text writes digits full-width: a search for 1927 found none of them), and ligatures,
    circled and superscript digits too ("ﬁle" is file, "①" 1).
    Version 5 (``TOKENIZER``): version 4's, but a symbol that NFKC writes as letters or digits,
    two or more, is a word of its own with the marks after it: "Acme™" is acme and tm
    (version 4: "acmetm", which a search for Acme missed; "Core™", "5㎏" too), while a symbol
    standing for one letter stays in its word (a Kangxi radical "⼤" of PDF text is 大, "ⓉⒺⓈⓉ"
    test), variation selectors are dropped ("™" with U+FE0F is ™, an ideograph with its
    variant's selector the ideograph); and a dotted capital I is i ("İstanbul" is istanbul:
    case folding wrote i and a combining dot, which "Istanbul" never matched). All five give
    the same tokens for ASCII text. A change here is a new version.
    """
    if version == 1:
        return WORD.findall(text.lower())
    if version not in (2, 3, 4, 5):
        raise ValueError(f"unknown tokenizer version {version!r}")
    text = text.lower() if version == 2 else text.casefold()
    if text.isascii():  # no marks, already NFC and NFKC: the quick path
        return WORD.findall(text)
    if version >= 5:
        text = text.translate(_VARIATION_SELECTORS)
    if version >= 4 and not unicodedata.is_normalized("NFKC", text):
        if version >= 5:
            text = _symbol().sub(_apart, text)
        text = unicodedata.normalize("NFKC", text).casefold()  # (casefold after: "Ｓ" is "s")
    if version >= 5 and "i\u0307" in text:  # (NFC has no dotted i to compose it into)
        text = text.replace("i\u0307", "i")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    words = _word_with_marks().findall(text)
    if version == 2 or not _CJK.search(text):
        return words
    return [piece for word in words for piece in _cjk_pairs(word)]


# (tokenizer 5) how a character is drawn, not which it is: an emoji's, an ideograph's variant
_VARIATION_SELECTORS = dict.fromkeys([*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])


@functools.cache
def _symbol() -> re.Pattern[str]:
    """Tokenizer 5's symbol: a character neither a word's nor a space, with the combining marks
    after it ("™️": its variation selector is no word of its own)."""
    return re.compile(rf"[^\w\s][{marks_class()}]*")


def _apart(m: re.Match[str]) -> str:
    """A symbol that NFKC writes as two or more letters or digits (™ -> TM, ㎏ -> kg, ℡ -> TEL,
    ㍿ -> 株式会社), with its marks, set apart from the word it is written against; anything
    else as it is (a mark; a stand-in for one letter: ⼤ -> 大, Ⓣ -> T)."""
    c = m.group()[0]
    if c.isascii() or unicodedata.category(c)[0] == "M":
        return m.group()
    folded = unicodedata.normalize("NFKC", c)
    return f" {m.group()} " if len(folded) > 1 and any(ch.isalnum() for ch in folded) \
        else m.group()


def _cjk_pairs(word: str) -> list[str]:
    """``word`` with each run of Han, kana or Hangul in it as its overlapping character pairs
    (a run of one as itself); the rest of the word stays whole ("2024年" -> 2024, 年)."""
    out: list[str] = []
    pos = 0
    for m in _CJK.finditer(word):
        if m.start() > pos:
            out.append(word[pos:m.start()])
        run = m.group()
        out.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
        pos = m.end()
    if pos < len(word):
        out.append(word[pos:])
    return out


def _cjk_punctuation(ch: str) -> bool:
    """A punctuation mark of CJK text: of the CJK symbols block (、。「」) or a full- or
    half-width form (！，．｡)."""
    return ("\u3000" <= ch <= "\u303f" or "\uff00" <= ch <= "\uff65") and (
        unicodedata.category(ch).startswith("P"))


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation (and CJK text's, which
    SQuAD never met: "「東京タワー」" is "東京タワー"), drop a/an/the, collapse whitespace (in the
    official script's order). Metrics and the reward model use it."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION and not _cjk_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The tokens F1 counts in a normalized answer: its words, with each CJK character a token
    of its own (MLQA's mixed segmentation: a Chinese or Japanese answer, written without
    spaces, was one token, so its F1 was its exact match: "1420年建成" scored 0 against
    "1420年")."""
    out: list[str] = []
    for word in text.split():
        out += _CJK_OR_NOT.findall(word) if has_cjk(word) else [word]
    return out


def answer_f1(pred: str, gold: str) -> float:
    """SQuAD's token F1 of two answers after ``normalize_answer`` (bag-of-words overlap of
    ``answer_tokens``); 1 when both are empty, 0 when only one is (the official no-answer
    convention)."""
    gold_toks = answer_tokens(normalize_answer(gold))
    pred_toks = answer_tokens(normalize_answer(pred))
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    num_same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def is_contentful(text: str) -> bool:
    """True when ``text`` has at least one word that is not a stop word."""
    return any(w not in STOP_WORDS for w in tokenize(text))


_TAKES_ES = ("ss", "x", "z", "ch", "sh", "o")  # endings whose plural adds "es" (term)


def term(word: str) -> str:
    """A word as a matching term: case-folded (as ``tokenize``), with a plural/tense suffix cut
    (opened -> open). A plural's "es" goes whole only after what takes it (ss, x, z, ch, sh, o:
    boxes -> box, heroes -> hero); else only its "s", so that a word ending in "e" meets its
    plural (castles -> castle, not castl; houses -> house). A final "y" after a consonant, and
    a final "ie", end in "i", as do "-ies" and "-ied", so that city, cities and studied meet
    (city -> citi, cities -> citi, studying -> studi; movie and movies -> movi; sky and skies
    -> ski); a "y" after a vowel stays (days -> day)."""
    word = word.casefold()
    stem = word
    for suffix in ("ies", "ied", "ing", "ed", "es", "s"):
        shortest = 2 if suffix in ("ies", "ied") else 3  # the stem's letters ("ties" -> tie)
        if word.endswith(suffix) and len(word) - len(suffix) >= shortest:
            if suffix in ("ies", "ied"):
                stem = word[:-3] + "i"
            elif suffix == "es" and not word[:-2].endswith(_TAKES_ES):
                stem = word[:-1]
            else:
                stem = word[: -len(suffix)]
            break
    if len(stem) >= 3 and stem.endswith("y") and stem[-2] not in "aeiouy":
        return stem[:-1] + "i"
    if len(stem) >= 4 and stem.endswith("ie"):  # (brie -> bri, as bries; not tie, pie)
        return stem[:-1]
    return stem


def content_terms(text: str) -> set[str]:
    """Matching terms of the words of ``text`` that are not stop words."""
    return {term(w) for w in tokenize(text) if w not in STOP_WORDS}


def term_share(part: str, whole: str) -> float:
    """The share of ``part``'s content terms that ``whole`` also has (0 when it has none)."""
    mine = content_terms(part)
    return len(mine & content_terms(whole)) / len(mine) if mine else 0.0


def relevance(sentences: Sequence[str], question: str) -> list[float]:
    """Score each sentence by the question terms it shares, rarer terms (within these
    sentences) weighing more: ``sum(log(1 + N / df(t)))`` over shared terms ``t``.

    Summed exactly (``math.fsum``): a plain sum over a set depends on the set's order, which
    changes with each process's string hashing, and near-ties then broke differently from one
    run to the next (the prompt's windows, and training data rendered from them)."""
    terms = content_terms(question)
    bags = [content_terms(s) & terms for s in sentences]
    df = Counter(t for bag in bags for t in bag)
    n = len(sentences)
    return [math.fsum(math.log1p(n / df[t]) for t in bag) for bag in bags]


# A Markdown ATX heading's marker at a line's start (CommonMark: 1-6 #s, indented at most 3
# spaces, then a space or tab); the line is a heading whatever precedes or ends it
ATX_HEADING = r" {0,3}#{1,6}[ \t]"
# A Markdown code fence (CommonMark: ``` or ~~~, three or more, indented at most 3 spaces)
FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def fenced_code(text: str, *, tilde_underlines: bool = False) -> list[tuple[int, int]]:
    """The spans of ``text``'s fenced code blocks, their fence lines included (CommonMark:
    closed by a fence of the same character at least as long; unclosed, to the end). A title
    is never one of their lines; chunking never ends a passage at a blank line in one.
    ``tilde_underlines``: a line of ~ alone opens none right under a line of text (it underlines
    a reStructuredText heading: read as a fence, it ran to the next such line, or the end), nor
    between blank lines (a reStructuredText transition; code after a fence starts with a line)."""
    spans: list[tuple[int, int]] = []
    fence, opened, pos = "", 0, 0
    lines = text.split("\n")
    for k, line in enumerate(lines):
        end = pos + len(line)
        m = FENCE_RE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and (
                    not line.strip().strip(fence[0])):
                spans.append((opened, end))
                fence = ""
        elif m and not (m.group(1)[0] == "`" and "`" in line[m.end():]) and not (
                tilde_underlines and m.group(1)[0] == "~" and not line.strip().strip("~")
                and (k > 0 and lines[k - 1].strip()  # ("~~~python" under text: a fence)
                     or k + 1 == len(lines) or not lines[k + 1].strip())):
            fence, opened = m.group(1), pos  # (a backtick fence's info string holds no backtick)
        pos = end + 1
    if fence:
        spans.append((opened, len(text)))
    return spans


class Sentence(NamedTuple):
    """A sentence of a text: ``text[start:end]``, trimmed and non-empty."""

    start: int
    end: int
    paragraph_start: bool  # a paragraph break (two line breaks) comes before it


def sentences(text: str) -> list[Sentence]:
    """The sentences of ``text`` in order (see ``_SENTENCE_BREAK``); chunking packs them into
    passages and the prompt picks windows of them."""
    raw: list[tuple[int, int, bool]] = []
    pos, para = 0, False
    breaks = LINE_BREAK.finditer(text)  # read up to each line-break match's first
    line_start = last_break = 0  # where the line that match ends starts; where that break ends
    for m in _SENTENCE_BREAK.finditer(text):
        if m.group("line") is not None:
            for b in breaks:
                line_start, last_break = last_break, b.end()
                if last_break > m.start():
                    break
            if _wrapped(text, line_start, m):
                continue
        elif _abbreviated(text, m):
            continue
        if m.start() > pos:
            raw.append((pos, m.start(), para))
        if m.end() > pos:
            para = _line_breaks(m.group()) >= 2
        pos = max(pos, m.end())
    if pos < len(text):
        raw.append((pos, len(text), para))
    out = []
    for s, e, p in raw:
        # A break match may start with the closing quote/bracket it consumed: give it back.
        while e < len(text) and text[e] in _CLOSERS:
            e += 1
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append(Sentence(s, e, p))
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, without surrounding whitespace."""
    return [(s.start, s.end) for s in sentences(text)]


# scheme://user:pw@ (greedy to the authority's last "@", where httpx splits it too)
# A URL's scheme and user:password@ part, wherever a URL starts in a text
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages and logs (a text's URLs, each
    without it)."""
    return _USERINFO.sub(r"\1", url)


__all__ = [
    "STOP_WORDS",
    "TOKENIZER",
    "WORD",
    "Sentence",
    "answer_f1",
    "content_terms",
    "is_contentful",
    "normalize_answer",
    "relevance",
    "sentence_spans",
    "sentences",
    "term",
    "term_share",
    "tokenize",
    "without_userinfo",
]
