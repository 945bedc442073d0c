"""Quote verification: exact offsets, provable repairs only, ambiguity refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from citeqa.config import GenerationConfig
from citeqa.generation.verify import _TRIM, _trimmed, locate, verify_quote
from citeqa.text import STOP_WORDS, is_contentful
from citeqa.types import Document

CFG = GenerationConfig(min_quote_chars=10, max_quote_chars=120)
TEXT = (
    "The Normans were the people who gave their name to Normandy.\n"
    "Their leader  Rollo swore fealty to King Charles III.\n\n"
    "The Norman dynasty had a major political impact on medieval Europe."
)
DOC = Document(doc_id="d1", title="Normans", source="normans.txt", text=TEXT)


def shown_for(doc: Document, start: int, end: int) -> tuple[int, int]:
    """The window ``(start, end)`` of a passage shown from ``doc`` (checked to be in range)."""
    assert 0 <= start <= end <= len(doc.text), (start, end)
    return start, end


WHOLE = shown_for(DOC, 0, len(TEXT))


def check(quote, shown=WHOLE, doc=DOC, cfg=CFG):
    q = verify_quote(quote, shown, doc, cfg)
    if q is not None:
        assert doc.text[q.start : q.end] == q.text
        assert (q.doc_id, q.title, q.source) == (doc.doc_id, doc.title, doc.source)
    return q


def test_exact_quote():
    q = check("gave their name to Normandy")
    assert q.text == "gave their name to Normandy"
    assert q.start == TEXT.index("gave")


def test_surrounding_whitespace_and_quotes_are_trimmed():
    for raw in [
        "  gave their name to Normandy ",
        '"gave their name to Normandy"',
        "\u201cgave their name to Normandy\u201d",
        "...gave their name to Normandy...",
    ]:
        q = check(raw)
        assert q is not None and q.text == "gave their name to Normandy", raw


def test_trailing_punctuation_kept_when_in_document():
    q = check("gave their name to Normandy.")
    assert q.text == "gave their name to Normandy."


def test_whitespace_runs_map_to_the_documents_text():
    q = check("Their leader Rollo swore fealty")  # the document has two spaces
    assert q.text == "Their leader  Rollo swore fealty"
    q = check("Charles III. The Norman dynasty")  # the document has a blank line
    assert q.text == "Charles III.\n\nThe Norman dynasty"


def test_altered_text_is_rejected():
    roomy = GenerationConfig(min_quote_chars=1, max_quote_chars=10_000)  # no length refusal
    for altered in ["gave their names to Normandy",
                    "gave their name to normandy",  # case is not repaired
                    "gave theirname to Normandy",  # whitespace removed is not repaired
                    "Rollo swore fealty to King Charles IV"]:
        assert check(altered, cfg=roomy) is None, altered
        assert locate(altered, TEXT, WHOLE) is None, altered


def test_length_limits():
    assert check("Normandy.") is None  # shorter than min_quote_chars
    assert check(TEXT) is None  # longer than max_quote_chars
    cfg = GenerationConfig(min_quote_chars=1, max_quote_chars=10_000)
    assert check(TEXT, cfg=cfg).text == TEXT
    quote = TEXT[:40].strip()  # at the limits exactly, and one past them
    assert check(quote, cfg=GenerationConfig(min_quote_chars=1, max_quote_chars=len(quote)))
    assert not check(quote, cfg=GenerationConfig(min_quote_chars=1, max_quote_chars=len(quote) - 1))
    assert check(quote, cfg=GenerationConfig(min_quote_chars=len(quote), max_quote_chars=200))
    assert not check(quote, cfg=GenerationConfig(min_quote_chars=len(quote) + 1,
                                                 max_quote_chars=200))


def test_stop_words_only_is_rejected():
    doc = Document("d2", "t", "s", "It was in the one of them, and it was to the end of it.")
    cfg = GenerationConfig(min_quote_chars=5, max_quote_chars=100)
    assert check("and it was to the", shown_for(doc, 0, len(doc.text)), doc, cfg) is None
    assert check("in the one of them", shown_for(doc, 0, len(doc.text)), doc, cfg) is not None
    assert not is_contentful("of the, and; to")
    assert is_contentful("the 1889")


def test_prefers_the_span_inside_the_shown_window():
    text = "Rollo swore fealty to the king. Later, Rollo swore fealty to the king."
    doc = Document("d3", "t", "s", text)
    second = text.index("Later")
    q = check("Rollo swore fealty to the king", shown_for(doc, second, len(text)), doc)
    assert q.start == text.index("Rollo", second)
    q = check("Rollo swore fealty to the king", shown_for(doc, 0, second), doc)
    assert q.start == 0


def test_a_looser_reading_inside_the_window_beats_a_stricter_one_outside() -> None:
    """An exact match outside the window won over a whitespace-tolerant one inside it (and
    an untrimmed one outside over a trimmed one inside): the cited passage and the offsets
    disagreed."""
    from citeqa.generation.verify import locate

    text = "The cat sat on the mat. Filler words here. The cat  sat on the mat. End."
    window = (text.index("Filler"), len(text))
    start, end = locate("The cat sat on the mat.", text, window)
    assert start >= window[0] and text[start:end] == "The cat  sat on the mat."
    text = 'Paris is the capital." Filler. "Paris is the capital'
    window = (text.index("Filler"), len(text))
    start, end = locate('"Paris is the capital."', text, window)
    assert start >= window[0] and text[start:end] == "Paris is the capital"


def test_outside_window_same_text_takes_nearest_occurrence():
    text = "Rollo swore fealty to the king. Filler words here. Rollo swore fealty to the king."
    doc = Document("d4", "t", "s", text)
    mid = text.index("Filler")
    shown = shown_for(doc, mid, mid + len("Filler words here."))
    q = check("Rollo swore fealty to the king", shown, doc)
    assert q is not None and q.text == "Rollo swore fealty to the king"
    # the shown window ends 1 character before the second occurrence, 2 after the first's end
    second = text.index("Rollo", 1)
    assert (q.start, q.end) == (second, second + len(q.text))
    # nearest to the window as a whole, not to its start: the window starts nearer the first
    # occurrence (40 after its start) but ends 2 before the second
    quote = "Rollo swore fealty"
    text = quote + " " + "x" * 60 + " " + quote
    assert locate(quote, text, (40, 78)) == (80, 98)


def test_ambiguous_different_texts_outside_window_rejected():
    text = "Rollo swore  fealty to the king. Filler words here. Rollo swore fealty\nto the king."
    doc = Document("d5", "t", "s", text)
    mid = text.index("Filler")
    shown = shown_for(doc, mid, mid + len("Filler words here."))
    # Whitespace-insensitive: two document spans with different texts, neither shown.
    assert check("Rollo swore fealty to the king", shown, doc) is None
    # Inside the window it resolves to the shown one.
    q = check("Rollo swore fealty to the king", shown_for(doc, 0, mid), doc)
    assert q is not None and q.start == 0 and q.text == "Rollo swore  fealty to the king"


def test_a_quote_in_a_long_repetitive_document_is_located_without_listing_every_place():
    """Every place a short quote stood in the whole document was listed before one was picked:
    three million in a 3 MB page of one letter (seconds on the generation thread). The first
    place inside the window is found directly; outside it, more than MAX_SPANS_OUTSIDE places
    (all the same text) cannot tell which was meant."""
    from citeqa.generation.verify import MAX_SPANS_OUTSIDE

    text = "a" * 300_000 + "b"
    assert locate("a" * 30, text, (1000, 1600)) == (1000, 1030)
    assert locate("a" * 30, text, (300_000, 300_001)) is None  # 299,971 places, none shown
    few = "x" * 100 + " aaa " * MAX_SPANS_OUTSIDE
    assert locate("aaa", few, (0, 100)) == (101, 104)  # the nearest of 1000 places
    assert locate("aaa", few + " aaa", (0, 100)) is None  # 1001


def test_the_first_place_inside_the_window_is_found_whatever_overlaps_it():
    """Spans were listed over the whole document without overlaps, so a whitespace-insensitive
    match starting before the window could hide the one inside it."""
    text = "x y x y x y"
    assert locate("x y x", text, (4, 11)) == (4, 9)
    assert locate("x  y  x", text, (4, 11)) == (4, 9)


def test_found_outside_the_window_in_the_document():
    shown = shown_for(DOC, 0, TEXT.index("\n"))
    q = check("The Norman dynasty had a major political impact", shown)
    assert q is not None and q.start == TEXT.index("The Norman dynasty")


def test_locate_reference_agrees_with_str_find_for_exact_unique_spans():
    for needle in ["Normans were", "King Charles III.", "medieval Europe."]:
        assert locate(needle, TEXT, (0, len(TEXT))) == (
            TEXT.find(needle),
            TEXT.find(needle) + len(needle),
        )


def test_stop_word_list_is_lowercase_words():
    assert all(re.fullmatch(r"[a-z]+", w) for w in STOP_WORDS)
    assert {"the", "of", "and"} <= STOP_WORDS and "normandy" not in STOP_WORDS


# --- properties --------------------------------------------------------------------------

_alphabet = st.sampled_from(list("abcdeABC xyz.,;!\n\t'\"") + ["\u00e9", "\u00a0", "1"])
_doc_text = st.text(alphabet=_alphabet, min_size=1, max_size=300)
LOOSE = GenerationConfig(min_quote_chars=1, max_quote_chars=1000)


def _norm(s: str) -> str:
    return " ".join(s.split())


@settings(max_examples=300, deadline=None)
@given(text=_doc_text, data=st.data())
def test_random_spans_verify_to_their_own_text(text, data):
    doc = Document("r", "t", "s", text)
    a = data.draw(st.integers(0, len(text) - 1))
    b = data.draw(st.integers(a + 1, len(text)))
    ws = data.draw(st.integers(0, a))
    we = data.draw(st.integers(b, len(text)))
    span = text[a:b]
    assume(is_contentful(span))
    q = check(span, shown_for(doc, ws, we), doc, LOOSE)
    assert q is not None  # a true span of the shown window is always found
    # What came back is the span itself, possibly with ends trimmed; found inside the window
    # when the trimmed span is a window substring.
    assert q.text in span or _norm(q.text) == _norm(span.strip())
    assert ws <= q.start and q.end <= we or text[ws:we].find(q.text) == -1


@settings(max_examples=300, deadline=None)
@given(text=_doc_text, quote=st.text(alphabet=_alphabet, min_size=1, max_size=60), data=st.data())
def test_any_string_never_yields_a_misplaced_quote(text, quote, data):
    doc = Document("r", "t", "s", text)
    ws = data.draw(st.integers(0, len(text)))
    we = data.draw(st.integers(ws, len(text)))
    q = check(quote, shown_for(doc, ws, we), doc, LOOSE)
    if q is not None:
        # Provably the same text: equal up to whitespace runs and trimmed ends.
        assert _norm(q.text) in _norm(quote)
        assert q.text.strip() == q.text


@settings(max_examples=200, deadline=None)
@given(text=_doc_text, data=st.data())
def test_altering_one_character_never_verifies_to_other_text(text, data):
    doc = Document("r", "t", "s", text)
    a = data.draw(st.integers(0, len(text) - 1))
    b = data.draw(st.integers(a + 1, len(text)))
    span = text[a:b]
    i = data.draw(st.integers(0, len(span) - 1))
    new = data.draw(st.sampled_from("QZ#"))  # never in the document's alphabet
    altered = span[:i] + new + span[i + 1 :]
    q = check(altered, shown_for(doc, 0, len(text)), doc, LOOSE)
    if q is not None:  # only possible when the altered char was trimmed off an end
        assert new not in _trimmed(altered, _TRIM), (altered, q.text)  # "#" is trimmable
        assert _norm(q.text) in _norm(altered)


def test_a_quote_loses_punctuation_and_any_whitespace_at_its_ends_however_they_alternate():
    """Found by the property test above: a no-break space (not ASCII whitespace) before the
    trimmed punctuation stayed on the quote's end ("1\\u00a0;" verified as "1\\u00a0")."""
    doc = Document("r", "t", "s", "1\u00a0 and 2")
    q = check("1\u00a0;", shown_for(doc, 0, len(doc.text)), doc, LOOSE)
    assert q is not None and (q.text, q.start, q.end) == ("1", 0, 1)
    assert _trimmed("\u00ab\u2009x\u00a0.\u3000\u00bb", _TRIM) == "x"
    assert _trimmed("x", _TRIM) == "x" and _trimmed(" ;\u00a0", _TRIM) == ""


def test_cjk_punctuation_wraps_answers_and_quotes_as_ascii_punctuation_does():
    """A free-mode answer "一九五八年。" was not found in a quote holding "一九五八年」" (an
    English "1958." would have been trimmed to "1958")."""
    from citeqa.generation.cited import answer_span

    quote = "東京タワーは「一九五八年」に完成した"
    at = quote.index("一九五八年")
    assert answer_span("一九五八年。", quote) == (at, at + 5)
    assert answer_span("「一九五八年」", quote) == (at - 1, at + 6)  # in the quote as given
    text = "前文。" + quote + "。後文。"
    found = verify_quote("「" + quote + "」", (0, len(text)), Document("d", "東京", "t.txt", text),
                         GenerationConfig(min_quote_chars=5))
    assert found is not None and found.text == quote


def test_outside_the_window_overlapping_places_are_each_a_place() -> None:
    """"go on go on" stands at 0 and, overlapping, at 6 of this text: the nearest to the
    window (19-31) is the one at 6."""
    assert locate("go on go on", "go on go on go on. Window text.", (19, 31)) == (6, 17)


def test_a_quote_in_quotation_marks_is_found_inside_its_window_before_outside() -> None:
    """A quote wrapped in '"' was pinned to an earlier place outside the passage shown
    rather than to the same words inside it."""
    doc = ("Rollo swore fealty to Charles. " + "x" * 10 + " " + "y " * 40
           + "Then Rollo swore fealty to Charles again. " + "z " * 40)
    at = doc.index("Then Rollo") + len("Then ")
    assert locate('"Rollo swore fealty to Charles"', doc, (42, len(doc))) == (at, at + 29)


def test_a_quote_repeated_hundreds_of_times_outside_its_window_is_still_located() -> None:
    """A quote standing 500 times alike outside its window was refused as too ambiguous."""
    doc = "Intro text here. " + "Rollo swore fealty. " * 500
    assert locate("Rollo swore fealty.", doc, (0, 16)) == (17, 36)


@pytest.mark.parametrize("field, value", [
    ("min_quote_chars", 201), ("min_quote_chars", -1), ("max_quote_chars", 0),
    ("top_k_passages", 0), ("passage_chars", 0), ("n_candidates", 0), ("temperature", -0.1),
    ("temperature", float("nan")), ("max_answer_tokens", 0), ("answer_mode", "spans"),
    ("speculative_quote_tokens", -1), ("threads", 0), ("cpu_dtype", "bf32"),
    ("concurrency", 0)])
def test_a_generation_config_no_question_could_be_answered_with_is_refused(
        field: str, value: object) -> None:
    """A minimum quote length above the maximum refused every quote (each question declined,
    without a word); the other fields alike failed later, or at every question."""
    from citeqa.errors import ConfigError

    with pytest.raises(ConfigError, match=f"GenerationConfig: invalid .*\\b{field}="):
        GenerationConfig(**{field: value})
    GenerationConfig(min_quote_chars=200, max_quote_chars=200, temperature=0, threads=None)


def test_a_reward_threshold_of_nan_is_refused() -> None:
    """No score is below NaN: every answer was given, whatever its score."""
    from citeqa.config import RewardConfig
    from citeqa.errors import ConfigError

    with pytest.raises(ConfigError, match="RewardConfig: invalid threshold=nan"):
        RewardConfig(threshold=float("nan"))
    assert RewardConfig(threshold=0.9).threshold == 0.9
