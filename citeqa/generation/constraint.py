"""The quote constraint: a grammar that only admits a cited answer whose quote is verbatim.

``output_grammar(passages)`` builds an llguidance Lark grammar for exactly (``free`` mode)::

    Answer: <one line, 1..max_answer_chars characters>
    Quote [<k>]: <a contiguous, word-aligned span of passage k>

or, in ``span`` mode, for ``Quote [<k>]: <span of passage k>`` + the start of the answer line;
``answer_grammar(quote)`` then admits only words of that quote as the answer: an answer is
supported by its quote by construction (``format.py``).

Decisions (see GopherCite, Menick et al. 2022, sec. 2.3 "constrained sampling"):

- The quote is **word-aligned**: llguidance's ``substring_words`` lexeme splits a passage into
  words, punctuation marks and whitespace runs, and admits any contiguous run of those chunks.
  A quote therefore never starts or stops in the middle of a word ("ris" from "Paris"), and the
  automaton stays small. We also intersect it with ``\\S(.*\\S)?`` so the quote is non-empty and
  neither starts nor ends with whitespace. A quote may contain a newline when the passage does.
- The quote must come from passage ``k`` itself: every passage has its own lexeme, reached only
  through its own ``Quote [k]: `` prefix, so a span from another passage (or one crossing two
  passages) cannot be emitted after that prefix.
- Passages are untrusted: each passage is embedded only as a JSON string inside
  ``%regex {...}`` (``json.dumps``), which escapes quotes, backslashes, newlines and control
  characters, so no passage text can end the lexeme or add grammar rules.

``OutputConstraint`` wraps an ``llguidance.LLMatcher`` (one per decoded row) with the few calls
the decoding loop needs; ``ll_tokenizer_for`` builds (once per tokenizer) the llguidance view of
a Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

from citeqa.errors import InvalidRequestError
from citeqa.generation.chat import stop_token_ids
from citeqa.generation.format import (
    ANSWER_LINE_START,
    ANSWER_MODES,
    ANSWER_PREFIX,
    QUOTE_PREFIX,
    QUOTE_SEPARATOR,
    AnswerMode,
)

# A quote is non-empty and trimmed: it starts and ends with a non-whitespace character.
_TRIMMED = r"/\S(?s:.*\S)?/"


def _lark_string(s: str) -> str:
    """A Lark string literal for ``s`` (JSON string syntax is a subset Lark reads)."""
    return json.dumps(s, ensure_ascii=True)


def _length(lo: int | None, hi: int | None) -> str:
    """A regex intersection bounding a lexeme to [lo, hi] characters ("" when unbounded)."""
    if lo is None and hi is None:
        return ""
    low = max(lo or 1, 1)
    high = "" if hi is None else str(max(hi, low))
    return f" & /(?s:.{{{low},{high}}})/"


def output_grammar(
    passages: Sequence[str],
    *,
    mode: AnswerMode = "free",
    max_answer_chars: int = 200,
    min_quote_chars: int | None = None,
    max_quote_chars: int | None = None,
    answer_from_passages: bool = False,
    only_passage: int | None = None,
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

    ``mode="span"``: the first part only, ``Quote [k]: ...`` up to ``ANSWER_LINE_START``; the
    answer follows under ``answer_grammar(quote)``, built once the quote is known, so that it
    can only be words of that quote (``GenerationRequest.answer_in_quote``).

    Raises InvalidRequestError when no passage can be quoted.
    """
    if max_answer_chars < 1:
        raise InvalidRequestError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
    if mode not in ANSWER_MODES:
        raise InvalidRequestError(f"answer mode must be one of {ANSWER_MODES}, got {mode!r}")
    quotable = [(k, p) for k, p in enumerate(passages, start=1) if p.strip()]
    if only_passage is not None:
        quotable = [(k, p) for k, p in quotable if k == only_passage]
    if not quotable:
        raise InvalidRequestError("no passage has text to quote; retrieve passages first")
    bound = _length(min_quote_chars, max_quote_chars)
    if mode == "span":
        # One line: lexemes are greedy, so a quote that may go on past a line break could
        # never be followed by the line break that starts the answer.
        bound += " & /[^\\n]+/"
        lines = [f"start: quote {_lark_string(ANSWER_LINE_START)}"]
    else:
        answer = f"/[^\\n]{{1,{int(max_answer_chars)}}}/"
        if answer_from_passages:
            spec = json.dumps({"substring_words": "\n".join(p for _, p in quotable)},
                              ensure_ascii=True)
            answer = f"%regex {spec} & {_TRIMMED} & {answer}"
        lines = [f"start: {_lark_string(ANSWER_PREFIX)} ANSWER {_lark_string(chr(10))} quote",
                 f"ANSWER: {answer}"]
    lines.append("quote: " + " | ".join(f"quote_{k}" for k, _ in quotable))
    for k, passage in quotable:
        prefix = _lark_string(f"{QUOTE_PREFIX}{k}{QUOTE_SEPARATOR}")
        lines.append(f"quote_{k}: {prefix} QUOTE_{k}")
        spec = json.dumps({"substring_words": passage}, ensure_ascii=True)
        lines.append(f"QUOTE_{k}: %regex {spec} & {_TRIMMED}{bound}")
    return "\n".join(lines) + "\n"


def answer_grammar(quote: str, *, max_answer_chars: int = 200) -> str:
    """The grammar of a span-mode answer after ``ANSWER_LINE_START``: a space, then a
    word-aligned span of ``quote`` (trimmed, one line, at most ``max_answer_chars``).

    The quote is embedded only as a JSON string (``json.dumps``), like passages: grammar-like
    text in it stays text. Raises InvalidRequestError when the quote has no word.
    """
    if not quote.strip():
        raise InvalidRequestError("the quote is empty; there is nothing to answer from")
    spec = json.dumps({"substring_words": quote}, ensure_ascii=True)
    return (
        f'start: " " ANSWER\n'
        f"ANSWER: %regex {spec} & {_TRIMMED} & /[^\\n]{{1,{int(max_answer_chars)}}}/\n"
    )


def quote_of_first_part(text: str) -> str | None:
    """The quote of a span-mode output's first part (``Quote [k]: <quote>`` + the answer
    line's start), or None when ``text`` is not one."""
    if not (text.startswith(QUOTE_PREFIX) and text.endswith(ANSWER_LINE_START)):
        return None
    _, sep, rest = text.partition(QUOTE_SEPARATOR)
    if not sep:
        return None
    return rest[: len(rest) - len(ANSWER_LINE_START)]


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
            raise InvalidRequestError(
                "constrained decoding needs a fast (Rust) Hugging Face tokenizer; "
                "save the model with a tokenizer.json"
            )
        eos = stop_token_ids(hf_tokenizer)
        raw = json.loads(backend.to_str())
        raw["padding"] = None  # llguidance tokenises single strings; padding would leak in
        raw["truncation"] = None
        ll_tok = llguidance.LLTokenizer(
            json.dumps(raw), n_vocab=len(hf_tokenizer), eos_token=eos
        )
        _LL_TOKENIZERS[hf_tokenizer] = ll_tok
        return ll_tok


class OutputConstraint:
    """One row's grammar state: which tokens may come next, and what the grammar forces."""

    def __init__(self, grammar: str, ll_tokenizer: llguidance.LLTokenizer) -> None:
        self._tokenizer = ll_tokenizer
        self._matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidRequestError(f"invalid output grammar: {self._matcher.get_error()}")
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
