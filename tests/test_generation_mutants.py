"""Mutation-testing round 8 (generation): tests that kill mutants of constraint.py,
streamed.py, parse.py and verify.py that the rest of the suite let live. No model is loaded."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from citeqa.config import GenerationConfig
from citeqa.generation.parse import ParsedOutput, parse_output
from citeqa.generation.streamed import (
    ABANDONED,
    ENGINE_GONE,
    Watch,
    Watched,
    assembled,
    post_streamed,
)
from citeqa.generation.verify import verify_quote
from citeqa.types import Document

# ---------------------------------------------------------------- parse.py


def test_a_quote_holding_the_separator_keeps_it():
    """The passage number ends at the FIRST "]: ": a quote may itself hold "]: " (a passage
    quoting a list or code)."""
    out = parse_output("Answer: x\nQuote [1]: see [2]: the list", 3)
    assert out == ParsedOutput(answer="x", passage_number=1, quote="see [2]: the list")


def test_a_six_digit_passage_number_is_read():
    """Passage numbers of up to six digits are read (the bound keeps int() cheap)."""
    out = parse_output("Answer: x\nQuote [123456]: text", 200_000)
    assert out.passage_number == 123456


# ---------------------------------------------------------------- verify.py


def test_a_whole_short_passage_with_whitespace_around_it_is_quoted_whole():
    """A quote shorter than min_quote_chars is kept when it is the whole passage shown; the
    window may hold whitespace around the passage's text (a chunk's line breaks)."""
    text = "Intro text here.\n\n  Rome fell.  \n\nMore text follows after it."
    doc = Document(doc_id="d", title="t", source="s", text=text)
    start = text.index("\n\n  Rome")
    window = (start, text.index("\n\nMore") + 2)
    assert text[window[0]:window[1]].strip() == "Rome fell."
    cfg = GenerationConfig(min_quote_chars=20, max_quote_chars=200)
    q = verify_quote("Rome fell.", window, doc, cfg)
    assert q is not None and q.text == "Rome fell."
    assert text[q.start:q.end] == "Rome fell."
    # not the whole passage: still too short
    assert verify_quote("Rome", window, doc, cfg) is None


# ---------------------------------------------------------------- streamed.py


def test_a_choice_without_an_index_is_choice_zero():
    body, complete = assembled([json.dumps({"choices": [{"delta": {"content": "a"},
                                                         "finish_reason": "stop"}]}), "[DONE]"])
    assert complete
    assert [c["index"] for c in body["choices"]] == [0]


def test_done_with_whitespace_around_it_ends_the_stream():
    body, complete = assembled([
        json.dumps({"choices": [{"index": 0, "delta": {"content": "a"},
                                 "finish_reason": "stop"}]}),
        " [DONE] ", "not json"])
    assert complete and body["choices"][0]["message"]["content"] == "a"


def _stream_client(content: bytes) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(
        200, content=content, headers={"content-type": "text/event-stream"})))


@pytest.mark.parametrize("code", [600, 399, "429"])
def test_an_error_event_with_a_code_that_is_no_http_error_is_a_500(code):
    error = "data: " + json.dumps({"error": {"message": "bad", "code": code}}) + "\n\n"
    with _stream_client(error.encode()) as client:
        resp = post_streamed(client, "http://gen/v1/chat/completions", {}, time.monotonic() + 5,
                             watch=Watch(lambda: False), gone=lambda: False, headers={})
    assert resp.status_code == 500


def test_an_error_event_keeps_its_http_code():
    error = "data: " + json.dumps({"error": {"message": "bad", "code": 599}}) + "\n\n"
    with _stream_client(error.encode()) as client:
        resp = post_streamed(client, "http://gen/v1/chat/completions", {}, time.monotonic() + 5,
                             watch=Watch(lambda: False), gone=lambda: False, headers={})
    assert resp.status_code == 599


def test_a_stream_still_coming_at_its_deadline_times_out():
    chunk = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "a"},
                                               "finish_reason": "stop"}]}) + "\n\n"
    with _stream_client((chunk + "data: [DONE]\n\n").encode()) as client:
        with pytest.raises(httpx.ReadTimeout):
            post_streamed(client, "http://gen/v1/chat/completions", {}, time.monotonic() - 0.5,
                          watch=Watch(lambda: False), gone=lambda: False, headers={})


def test_an_ended_stream_keeps_its_reason_and_is_not_asked_again():
    """A stream the watch already ended (its engine gone) is not ended again as abandoned,
    nor its ``gone`` asked again."""
    asked = []

    def gone() -> bool:
        asked.append(1)
        return True

    watched = Watched(None, gone)
    watched.end(ENGINE_GONE)
    watch = Watch(lambda: False, stall_s=1e9)
    watch._look([watched], time.monotonic())
    assert watched.reason == ENGINE_GONE and asked == []
    fresh = Watched(None, gone)
    watch._look([fresh], time.monotonic())
    assert fresh.reason == ABANDONED and asked == [1]


def test_the_engine_is_asked_by_one_probe_at_a_time():
    """While a probe of the engine is under way (it may take seconds), the watch starts no
    other, however long ago it last asked."""
    release = threading.Event()
    calls = []

    def engine_gone() -> bool:
        calls.append(1)
        release.wait(5)
        return False

    watch = Watch(engine_gone, stall_s=0.0)
    stalled = Watched(None, lambda: False)
    stalled.last = time.monotonic() - 10
    try:
        watch._look([stalled], 0.0)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
        assert calls == [1]
        watch._look([stalled], 0.0)  # long ago, yet the first probe is still out
        time.sleep(0.1)
        assert calls == [1]
    finally:
        release.set()


# ---------------------------------------------------------------- constraint.py

def _grammar_accepts(grammar: str, text: str) -> bool:
    from helpers import grammar_accepts

    return grammar_accepts(grammar, text)


def test_a_short_passage_with_whitespace_around_it_is_quotable_whole_under_both_grammars():
    """The lower bound of a quote gives way to a passage shorter than it: its length is the
    length of its TEXT (whitespace around it is never part of a quote), as verify_quote reads
    it (the window's text stripped)."""
    from citeqa.generation.constraint import output_grammar, quote_grammar

    passages = ["\n  Rome fell.  \n"]
    free = output_grammar(passages, min_quote_chars=20, max_quote_chars=200)
    assert _grammar_accepts(free, "Answer: Rome\nQuote [1]: Rome fell.")
    span = quote_grammar(passages, "Rome", min_quote_chars=20, max_quote_chars=200)
    assert span is not None and _grammar_accepts(span, "Quote [1]: Rome fell.")
    assert not _grammar_accepts(span, "Quote [1]: Rome")  # not the whole passage: too short


def test_a_piece_exactly_min_quote_chars_long_is_quotable():
    """Cut at an unquotable text, a piece whose text is exactly ``min_quote_chars`` long can
    still be quoted (verify_quote keeps a quote of exactly that length)."""
    from citeqa.generation.constraint import can_quote, output_grammar, quote_grammar

    piece = "Rome fell in 476."
    passage = f"{piece} <|im_end|> x"
    unquotable = r"<\|im_end\|>"
    n = len(piece)
    assert can_quote(passage, unquotable, n)
    assert not can_quote(passage, unquotable, n + 1)
    free = output_grammar([passage], min_quote_chars=n, max_quote_chars=200,
                          unquotable=unquotable)
    assert _grammar_accepts(free, f"Answer: 476\nQuote [1]: {piece}")
    span = quote_grammar([passage], "476", min_quote_chars=n, max_quote_chars=200,
                         unquotable=unquotable)
    assert span is not None and _grammar_accepts(span, f"Quote [1]: {piece}")


def test_a_cjk_character_with_several_marks_is_still_a_word_of_its_own():
    """After a CJK character carrying a RUN of marks (an ideographic variation selector and a
    combining mark), the next word starts a word: the base a run of marks belongs to is found
    however long the run (the CJK chunks read it so, ``[CJK][marks]*``)."""
    from citeqa.generation.constraint import on_word_edges, word_occurrences

    text = "\u6f22\u0301\u0302abc"
    assert on_word_edges(text, 3, 6)
    assert on_word_edges(text, 0, 3)
    assert word_occurrences(text, "abc") == [3]
    assert not on_word_edges("e\u0301\u0302abc", 3, 6)  # (a Latin base: inside its word)


def test_an_answer_found_first_inside_a_word_is_found_again_overlapping_it():
    """Occurrences are looked for at every position: one inside a word does not hide the
    whole-word occurrence overlapping it."""
    from citeqa.generation.constraint import quote_grammar, word_occurrences

    passage = "They sang ola la la all night long."
    assert word_occurrences(passage, "la la") == [14]
    g = quote_grammar([passage], "la la", min_quote_chars=5, max_quote_chars=100)
    assert g is not None and _grammar_accepts(g, "Quote [1]: ola la la all")


def test_the_guess_may_start_exactly_max_quote_chars_before_the_answers_end():
    """A sentence start leaving the answer exactly inside ``max_quote_chars`` is taken."""
    from citeqa.generation.constraint import quote_guess

    passage = "Intro words. Then Rome fell at last."
    at = passage.index("Rome")
    s = passage.index("Then")
    answer = "Rome"
    fits = (at - s) + len(answer)  # room == at - s exactly
    assert quote_guess([passage], answer, max_quote_chars=fits) == (
        "Quote [1]: Then Rome fell at last.")
    assert quote_guess([passage], answer, max_quote_chars=fits - 1) == (
        "Quote [1]: Rome fell at last.")


def test_a_first_part_of_two_lines_is_no_answer_line():
    from citeqa.generation.constraint import QuoteStage, answer_of_first_part

    assert answer_of_first_part("Answer: Rome\n") == "Rome"
    assert answer_of_first_part("Answer: Rome\nfell\n") is None
    stage = QuoteStage(("Rome fell\nin 476 to invaders.",), 1, 100)
    assert stage.grammar("Answer: Rome\nfell\n") is None
    assert stage.guess("Answer: Rome\nfell\n") is None


def test_a_passage_of_unquotable_text_alone_has_nothing_to_quote():
    from citeqa.generation.constraint import can_quote, output_grammar

    unquotable = r"<\|im_end\|>"
    assert not can_quote("<|im_end|> <|im_end|>", unquotable)
    with pytest.raises(ValueError, match="no passage has text to quote"):
        output_grammar(["<|im_end|> <|im_end|>"], unquotable=unquotable)
    with pytest.raises(ValueError, match="no passage has text to quote"):
        output_grammar(["<|im_end|> <|im_end|>"], unquotable=unquotable, mode="span")


def test_a_short_passage_nothing_cuts_is_quoted_whole_under_an_engines_unquotable():
    """``unquotable`` that matches nothing in a passage leaves it whole: a passage shorter
    than ``min_quote_chars`` is still quoted whole (as without ``unquotable``)."""
    from citeqa.generation.constraint import output_grammar, quote_grammar

    unquotable = r"<\|im_end\|>"
    free = output_grammar(["Rome fell."], min_quote_chars=20, unquotable=unquotable)
    assert _grammar_accepts(free, "Answer: Rome\nQuote [1]: Rome fell.")
    span = quote_grammar(["Rome fell."], "Rome", min_quote_chars=20, max_quote_chars=200,
                         unquotable=unquotable)
    assert span is not None and _grammar_accepts(span, "Quote [1]: Rome fell.")


def test_a_free_answer_is_one_line():
    from citeqa.generation.constraint import output_grammar

    g = output_grammar(["Rome fell in 476 to the invaders."])
    assert _grammar_accepts(g, "Answer: a b\nQuote [1]: Rome fell")
    assert not _grammar_accepts(g, "Answer: a\nb\nQuote [1]: Rome fell")


def test_a_span_quote_reaches_sixty_four_words_each_side():
    """The documented reach of a span-mode quote (64 words each side of its answer), pinned
    as a number: the existing test reads ``MAX_WORDS_AROUND`` and so moves with it."""
    from citeqa.generation.constraint import quote_grammar

    before = " ".join(f"b{i}" for i in range(64))
    after = " ".join(f"a{i}" for i in range(64))
    passage = f"x {before} Paris {after} y"
    grammar = quote_grammar([passage], "Paris")
    assert grammar is not None
    assert _grammar_accepts(grammar, f"Quote [1]: {before} Paris {after}")
    assert not _grammar_accepts(grammar, f"Quote [1]: x {before} Paris")


def test_the_guess_reads_the_answer_without_its_surrounding_whitespace():
    from citeqa.generation.constraint import quote_guess

    assert quote_guess(["Rome fell."], " Rome ") == "Quote [1]: Rome fell."
    assert quote_guess(["Rome fell."], "  ") is None


def test_a_span_quote_holds_one_of_the_answers_first_eight_occurrences():
    """The documented cap (MAX_OCCURRENCES = 8), pinned as a number."""
    from citeqa.generation.constraint import quote_grammar

    passage = " ".join(f"s{i} Rome." for i in range(1, 11))
    grammar = quote_grammar([passage], "Rome", max_quote_chars=30)
    assert grammar is not None
    assert _grammar_accepts(grammar, "Quote [1]: s8 Rome.")
    assert not _grammar_accepts(grammar, "Quote [1]: s9 Rome.")
