"""Strict parsing of the two-line cited output."""

from __future__ import annotations

import re

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from citeqa.errors import OutputFormatError
from citeqa.generation.parse import EOS_REMNANTS, ParsedOutput, parse_output

GOOD = "Answer: 1889\nQuote [2]: It opened in 1889 for the World's Fair."


def test_parses_the_format():
    assert parse_output(GOOD, 3) == ParsedOutput(
        answer="1889", passage_number=2, quote="It opened in 1889 for the World's Fair."
    )


@pytest.mark.parametrize(
    "suffix", ["\n", "  \n", "\n\n", "<|im_end|>", "\n<|im_end|>", "</s>", " <|endoftext|>\n"]
)
def test_tolerates_trailing_whitespace_and_eos(suffix):
    assert parse_output(GOOD + suffix, 3).passage_number == 2


def test_answer_is_stripped_quote_kept():
    out = parse_output("Answer:   Paris  \nQuote [1]:  the capital", 1)
    assert out.answer == "Paris"
    assert out.quote == " the capital"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Answer: 1889",  # missing quote line
        "Quote [1]: It opened in 1889.",  # missing answer line
        "Sure! Here is the answer.\n" + GOOD,  # prose before
        GOOD + "\nI hope this helps.",  # prose after
        " " + GOOD,  # leading whitespace
        "\n" + GOOD,
        "Answer: \nQuote [1]: It opened in 1889.",  # empty answer
        "Answer:    \nQuote [1]: It opened in 1889.",
        "Answer: 1889\nQuote [1]: ",  # empty quote
        "Answer: 1889\nQuote [1]:    x".replace("x", " "),
        "Answer: 1889\nQuote [0]: It opened in 1889.",  # out of range
        "Answer: 1889\nQuote [4]: It opened in 1889.",
        "Answer: 1889\nQuote [-1]: It opened in 1889.",
        "Answer: 1889\nQuote [01]: It opened in 1889.",
        "Answer: 1889\nQuote [+1]: It opened in 1889.",
        "Answer: 1889\nQuote [1.0]: It opened in 1889.",
        "Answer: 1889\nQuote [one]: It opened in 1889.",
        "Answer: 1889\nQuote [\u0661]: It opened in 1889.",  # Arabic-Indic digit one
        "Answer: 1889\nQuote []: It opened in 1889.",
        "Answer: 1889\nQuote [1] It opened in 1889.",  # no separator
        "Answer: 1889\nQuote 1: It opened in 1889.",
        "Answer: 1889\nquote [1]: It opened in 1889.",
        "answer: 1889\nQuote [1]: It opened in 1889.",
        "Answer:1889\nQuote [1]: It opened in 1889.",
        "Answer: in\n1889\nQuote [1]: It opened in 1889.",  # answer spanning lines
        "Answer: 1889\n\nQuote [1]: It opened in 1889.",  # blank line between
        "Answer: 1889\nQuote [1]: It opened\nin 1889.",  # quote spanning lines
        GOOD + "\nQuote [1]: It opened in 1889.",  # two quotes
        "Answer: 1889\nAnswer: 1890",
        "Quote [1]: It opened in 1889.\nAnswer: 1889",  # wrong order
        "Answer: 1889\nQuote [99999999999]: It opened in 1889.",
    ],
)
def test_rejects_malformed(text):
    with pytest.raises(OutputFormatError):
        parse_output(text, 3)


@pytest.mark.parametrize(("text", "why"), [
    ("Answer: \nQuote [1]: It opened in 1889.", "the answer is empty"),
    ("Answer:    \nQuote [1]: It opened in 1889.", "the answer is empty"),
    ("Answer: 1889\nQuote [1]: ", "the quote is empty"),
    ("Answer: 1889\nQuote [1]:  \u00a0 \n", "the quote is empty"),
    ("Answer: 1889\nQuote [1] It opened in 1889.", "quote line lacks"),
    ("Answer: 1889\nQuote [4]: It opened in 1889.", "passage 4 was not shown"),
])
def test_malformed_outputs_are_refused_for_their_reason(text, why):
    with pytest.raises(OutputFormatError, match=re.escape(why)):
        parse_output(text, 3)


@pytest.mark.parametrize("sep", ["\r", "\u2028", "\u2029", "\x85", "\x0c", "\x1c"])
def test_lines_end_at_newlines_only(sep):
    """A passage may hold these inside an answer the grammar lets through (whitespace there);
    str.splitlines ended the line at them and the candidate was lost."""
    out = parse_output(f"Answer: in{sep}1889\nQuote [1]: It opened{sep}in 1889.", 3,
                       multiline_quote=True)
    assert out.answer == f"in{sep}1889" and out.quote == f"It opened{sep}in 1889."
    crlf = parse_output("Answer: 1889\r\nQuote [1]: It opened in 1889.\r\n", 3)
    assert crlf.answer == "1889"


def test_no_passages_means_no_valid_number():
    with pytest.raises(OutputFormatError):
        parse_output(GOOD, 0)


_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
).filter(lambda s: s.strip() and s == s.rstrip() and s.strip() == s)


# A quote that itself ends in an end-of-sequence marker loses it to the parser, by design
# (see test_tolerates_trailing_whitespace_and_eos), so it cannot round-trip.
_quote = _line.filter(lambda s: not s.endswith(EOS_REMNANTS))


@given(answer=_line, quote=_quote, k=st.integers(1, 9), n=st.integers(1, 9))
def test_round_trip(answer, quote, k, n):
    text = f"Answer: {answer}\nQuote [{k}]: {quote}"
    if k > n:
        with pytest.raises(OutputFormatError):
            parse_output(text, n)
        return
    out = parse_output(text, n)
    assert out == ParsedOutput(answer=answer.strip(), passage_number=k, quote=quote)


# Random text rarely starts with "Answer: ", so texts are also made in the format's shape, with
# scraps of anything for the answer and quote and up to three characters then changed.
SCRAP = st.text(min_size=1, max_size=8) | st.sampled_from(
    ["1889", " Paris ", "\n", "]: ", *EOS_REMNANTS])


@st.composite
def pieced(draw) -> str:
    text = f"Answer: {draw(SCRAP)}\nQuote [{draw(st.integers(0, 4))}]: {draw(SCRAP)}"
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", "\n", " ", "[", "]", ":", "x"])) + text[
            at + draw(st.integers(0, 1)):]
    return text


PIECED = pieced()


def _parses(text: str) -> bool:
    try:
        parse_output(text, 3)
    except OutputFormatError:
        return False
    return True


def test_pieced_texts_include_ones_that_parse():
    assert _parses(find(PIECED, _parses))


@settings(max_examples=300)
@given(st.text(max_size=200) | PIECED)
def test_random_text_parses_only_to_a_valid_shape(text):
    if not _parses(text):
        return
    out = parse_output(text, 3)
    assert out.answer and out.answer == out.answer.strip()
    assert "\n" not in out.answer and "\n" not in out.quote
    assert 1 <= out.passage_number <= 3
    assert out.quote.strip()
    assert text.startswith("Answer: ")


@given(prefix=st.text(min_size=1, max_size=20).filter(lambda s: s.strip()))
def test_any_leading_prose_is_rejected(prefix):
    with pytest.raises(OutputFormatError):
        parse_output(prefix + "\n" + GOOD, 3)


@pytest.mark.parametrize("eos", EOS_REMNANTS)
def test_a_quote_that_is_only_an_eos_marker_is_empty(eos):
    with pytest.raises(OutputFormatError):
        parse_output(f"Answer: 1889\nQuote [1]: {eos}", 1)


def test_under_a_grammar_text_like_an_end_marker_is_the_passages() -> None:
    out = "Answer: x\nQuote [1]: marked </s>"
    assert parse_output(out, 1, multiline_quote=True, strip_eos=False).quote == "marked </s>"
    assert parse_output(out, 1).quote == "marked"  # a free model's stray marker: cut


@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|end|>", "<eos>"])
def test_common_end_markers_are_cut_from_the_quote(eos) -> None:
    """A Llama-3 style "<|eot_id|>" (or other end marker) left on a free model's quote was
    kept as part of the quote."""
    out = parse_output(f"Answer: Rollo\nQuote [1]: Rollo was the leader.{eos}", 1)
    assert out.quote == "Rollo was the leader."


@pytest.mark.parametrize("number", [" 1", "1 ", " 1 "])
def test_a_passage_number_with_spaces_in_its_brackets_is_rejected(number) -> None:
    """"Quote [ 1]:" was accepted although the format allows only digits in the brackets."""
    with pytest.raises(OutputFormatError):
        parse_output(f"Answer: Rollo\nQuote [{number}]: Rollo was the leader.", 1)
