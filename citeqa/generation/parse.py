"""Strict parser of the generator's two-line output (the format in ``format.py``).

Only trailing whitespace and end-of-sequence remnants a backend may leave are tolerated;
anything else (extra prose, missing or extra lines, a bad passage number) is an
``OutputFormatError``: a malformed output is never mined for an answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from citeqa.errors import OutputFormatError
from citeqa.generation.format import ANSWER_PREFIX, QUOTE_PREFIX, QUOTE_SEPARATOR

# End-of-sequence markers of common chat templates, stripped when they trail the output.
EOS_REMNANTS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end|>", "<eos>")

_NUMBER = re.compile(r"[1-9][0-9]{0,5}")  # bounded: int() of a huge string is slow


@dataclass(frozen=True)
class ParsedOutput:
    answer: str  # the answer line's text, stripped
    passage_number: int  # 1-based, within range of the passages shown
    quote: str  # the quote as generated (verification maps it to the document)


def _strip_trailer(text: str) -> str:
    while True:
        text = text.rstrip()
        for eos in EOS_REMNANTS:
            if text.endswith(eos):
                text = text[: -len(eos)]
                break
        else:
            return text


def parse_output(text: str, n_passages: int, *, multiline_quote: bool = False,
                 strip_eos: bool = True) -> ParsedOutput:
    """Parse ``Answer: ...`` / ``Quote [k]: ...`` (both answer modes), or raise
    OutputFormatError saying why.

    ``multiline_quote`` lets the quote run over line breaks (for grammar-constrained output,
    where the grammar admits only passage text after ``Quote [k]: `` and passages may hold
    line breaks); otherwise the output must be exactly two lines. ``strip_eos``: end markers
    a model wrote as text (``EOS_REMNANTS``) are cut from the end; not under a grammar, where
    such text can only be the passage's own (a quote ending in "</s>" lost it, and its answer).
    """
    body = _strip_trailer(text) if strip_eos else text.rstrip()
    # lines end at "\n" only, as the format's do: an answer may hold U+2028, \x85 or \x0c
    # (whitespace inside a passage), which str.splitlines took for line ends
    lines = body.removesuffix("\n").split("\n")
    if multiline_quote and len(lines) > 2:
        head, sep, quote_rest = body.partition("\n")
        if sep and head == lines[0]:
            lines = [head, quote_rest]
    if len(lines) != 2:
        raise OutputFormatError(
            f"expected exactly 2 lines ({ANSWER_PREFIX.strip()} and {QUOTE_PREFIX}k]), "
            f"got {len(lines)}: {text[:120]!r}"
        )
    answer_line, quote_line = lines
    answer = _answer(answer_line)
    number, quote = _quote(quote_line, n_passages)
    return ParsedOutput(answer=answer, passage_number=number, quote=quote)


def _answer(line: str) -> str:
    if not line.startswith(ANSWER_PREFIX):
        raise OutputFormatError(f"first line must start with {ANSWER_PREFIX!r}: {line!r}")
    answer = line[len(ANSWER_PREFIX) :].strip()
    if not answer:
        raise OutputFormatError("the answer is empty")
    return answer


def _quote(quote_line: str, n_passages: int) -> tuple[int, str]:
    if not quote_line.startswith(QUOTE_PREFIX):
        raise OutputFormatError(f"the quote line must start with {QUOTE_PREFIX!r}: {quote_line!r}")
    rest = quote_line[len(QUOTE_PREFIX) :]
    number_text, sep, quote = rest.partition(QUOTE_SEPARATOR)
    if not sep and rest.endswith(QUOTE_SEPARATOR.rstrip()):  # its trailing space was stripped
        raise OutputFormatError("the quote is empty")
    if not sep:
        raise OutputFormatError(f"quote line lacks {QUOTE_SEPARATOR!r}: {quote_line!r}")
    if not _NUMBER.fullmatch(number_text):
        raise OutputFormatError(f"passage number must be a positive integer: {number_text!r}")
    number = int(number_text)
    if not 1 <= number <= n_passages:
        raise OutputFormatError(f"passage {number} was not shown (passages 1..{n_passages})")
    assert quote.strip(), quote_line  # the output's end was stripped: a quote ends in a non-space
    return number, quote
