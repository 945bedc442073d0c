"""A weightless, deterministic stand-in model for the ``tiny`` preset and tests.

``extractive_responder`` reads the passages and question back out of the prompt built by
``prompt.py``, picks the sentence sharing most (rare) question terms among the passages the
request lets it quote, and replies in the exact output format (``format.py``): a few words of
that sentence not already in the question as the answer, and the sentence (extended to the
minimum quote length when short) as the quote; in span mode (a request with a
``quote_stage``) the answer is always words of the quote, as the grammars would enforce.
Use it as ``FakeBackend(extractive_responder)``.
"""

from __future__ import annotations

import re

from citeqa.config import GenerationConfig
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.format import ANSWER_PREFIX, QUOTE_PREFIX, QUOTE_SEPARATOR
from citeqa.generation.prompt import parse_user_message
from citeqa.text import STOP_WORDS, content_terms, relevance, sentence_spans

ANSWER_WORDS = 5  # at most this many words in an answer
# A quote's bounds when the request sets none (no grammar): GenerationConfig's, which verify.py
# applies. A short sentence is extended with the next ones (on the same line) to the first, a
# longer one cut at a word boundary to the second. A request's grammar or quote stage sets its
# own.
MIN_QUOTE_CHARS = GenerationConfig.min_quote_chars
MAX_QUOTE_CHARS = GenerationConfig.max_quote_chars

_WORD = re.compile(r"\S+")
_QUOTE_RULE = re.compile(r"^quote: (.*)$", re.M)  # the grammar's passage alternatives
_QUOTE_LENGTH = re.compile(r"\(\?s:\.\{(\d+),(\d*)\}\)")  # constraint._length's bound
_PUNCT = ".,;:!?\"'()[]"


def _runs(sentence: str, question_terms: set[str]) -> list[list[re.Match[str]]]:
    """Maximal runs of words not in the question, without stop words at their ends."""
    runs: list[list[re.Match[str]]] = [[]]
    for m in _WORD.finditer(sentence):
        core = m.group().strip(_PUNCT)
        # its terms as the question's were made ("Acme™" is acme and tm, "ＰＡＲＩＳ" paris), all
        # of them the question's ("Apple's" is not the question's for its "s")
        if (core and core.lower() not in STOP_WORDS
                and (terms := content_terms(core)) and terms <= question_terms):
            runs.append([])
        else:
            runs[-1].append(m)
    out = []
    for run in runs:
        while run and run[0].group().strip(_PUNCT).lower() in STOP_WORDS | {""}:
            run.pop(0)
        del run[ANSWER_WORDS:]
        while run and run[-1].group().strip(_PUNCT).lower() in STOP_WORDS | {""}:
            run.pop()
        if run:
            out.append(run)
    return out


_EDGES = re.compile(rf"^[\s{re.escape(_PUNCT)}]+|[\s{re.escape(_PUNCT)}]+$")


def _verbatim(text: str, words: list[re.Match[str]]) -> str:
    """``text`` from the first of ``words`` to the last, as it stands there (its own white
    space: a span-mode answer is a span of the passage), without punctuation at its ends."""
    return _EDGES.sub("", text[words[0].start() : words[-1].end()]) if words else ""


def _answer(sentence: str, question_terms: set[str]) -> str:
    """The first run of new words holding a name or number (else the first run, else the
    sentence's first words): the kind of span SQuAD answers are."""
    runs = _runs(sentence, question_terms)
    first = sentence.split(maxsplit=1)[0] if sentence.strip() else ""

    def entity(run: list[re.Match[str]]) -> bool:
        return any(any(ch.isdigit() for ch in w) or (w[:1].isupper() and w != first)
                   for w in (m.group() for m in run))

    chosen = next((r for r in runs if entity(r)),
                  runs[0] if runs else list(_WORD.finditer(sentence))[:3])
    return _verbatim(sentence, chosen) or sentence[:40]


def _quote(text: str, spans: list[tuple[int, int]], i: int, bounds: tuple[int, int]) -> str:
    lo, hi = bounds
    start, end = spans[i]
    j = i
    while end - start < lo and j + 1 < len(spans):
        if "\n" in text[end : spans[j + 1][0]]:
            break  # a quote is one line
        j += 1
        end = spans[j][1]
    if end - start > hi:
        cut = text.rfind(" ", start, start + hi)
        end = cut if cut > start else start + hi
    return text[start:end].strip()


def respond(user_message: str, *, mode: str = "free", allowed: frozenset[int] | None = None,
            bounds: tuple[int, int] = (MIN_QUOTE_CHARS, MAX_QUOTE_CHARS)) -> str:
    """The reply to one prompt's user message in answer ``mode`` ("" when it shows no
    passage); only the passage numbers in ``allowed`` are quoted when given, in at most
    ``bounds[1]`` characters (extended towards ``bounds[0]``)."""
    passages, question = parse_user_message(user_message)
    if allowed is not None:
        passages = [(number, text) for number, text in passages if number in allowed]
    terms = content_terms(question)
    # Every sentence of every passage, in prompt order: (passage number, text, spans, index).
    sentences = [
        (number, text, spans, i)
        for number, text in passages
        for spans in [sentence_spans(text)]
        for i in range(len(spans))
    ]
    if not sentences:
        return ""
    scores = relevance([t[s[i][0] : s[i][1]] for _, t, s, i in sentences], question)
    best = max(range(len(sentences)), key=lambda j: (scores[j], -j))  # earliest on ties
    number, text, spans, i = sentences[best]
    s, e = spans[i]
    answer = _answer(text[s:e], terms)
    quote = _quote(text, spans, i, bounds)
    if mode == "span" and answer not in quote:  # the quote was cut short: answer from it
        answer = _verbatim(quote, list(_WORD.finditer(quote))[:ANSWER_WORDS]) or quote
    return f"{ANSWER_PREFIX}{answer}\n{QUOTE_PREFIX}{number}{QUOTE_SEPARATOR}{quote}"


def _allowed_passages(grammar: str | None) -> frozenset[int] | None:
    """The passage numbers a request's grammar lets it quote (None: no grammar, any)."""
    if grammar is None:
        return None
    m = _QUOTE_RULE.search(grammar)
    return frozenset(int(k) for k in re.findall(r"quote_(\d+)", m.group(1))) if m else None


def _quote_bounds(request: GenerationRequest) -> tuple[int, int]:
    """The quote length the request's quote stage or grammar allows (the defaults where it
    sets none)."""
    stage = request.quote_stage
    if stage is not None:
        lo, hi = stage.min_quote_chars, stage.max_quote_chars
    else:
        m = _QUOTE_LENGTH.search(request.grammar or "")
        lo, hi = (int(m.group(1)), int(m.group(2)) if m.group(2) else None) if m else (None, None)
    return (MIN_QUOTE_CHARS if lo is None else lo, MAX_QUOTE_CHARS if hi is None else hi)


def extractive_responder(request: GenerationRequest) -> list[str]:
    """``request.n`` identical replies to the request's last user message, in its answer mode,
    quoting only the passages its grammar (or its quote stage) allows, within its bounds."""
    users = [m["content"] for m in request.messages if m.get("role") == "user"]
    stage = request.quote_stage
    mode = "free" if stage is None else "span"
    if stage is not None and stage.only_passage is not None:
        allowed: frozenset[int] | None = frozenset({stage.only_passage})
    else:
        allowed = _allowed_passages(request.grammar)
    reply = respond(users[-1], mode=mode, allowed=allowed,
                    bounds=_quote_bounds(request)) if users else ""
    return [reply] * request.n
