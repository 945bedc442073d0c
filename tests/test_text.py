"""The matching terms and sentence relevance of citeqa/text.py: hand cases with known values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citeqa.text import content_terms, relevance, term, term_share


@pytest.mark.parametrize(("word", "expected"), [
    ("opened", "open"), ("Opening", "open"), ("boxes", "box"), ("cats", "cat"),
    ("gas", "gas"),  # the stem would be under 3 letters: kept whole
    ("ones", "one"),  # "es" would leave 2 letters, "s" leaves 3
    ("bed", "bed"), ("sing", "sing"), ("based", "bas"),
])
def test_a_term_is_the_lower_cased_word_less_one_suffix(word: str, expected: str) -> None:
    assert term(word) == expected


def test_content_terms_leave_out_stop_words_and_match_across_tenses() -> None:
    assert content_terms("The tower opened in 1889") == {"tower", "open", "1889"}
    assert content_terms("the of and") == set()
    assert term_share("when was the tower opened", "The tower opens at nine") == 1.0
    assert term_share("tower height", "The tower opens") == 0.5
    assert term_share("the of", "anything") == 0.0  # no content terms: nothing to share


def test_relevance_weighs_a_rare_shared_term_above_two_common_ones() -> None:
    sentences = ["Zebras graze at dawn.", "The river bank.", "A river bank floods.",
                 "Trees line the river bank.", "Birds nest by the river bank."]
    scores = relevance(sentences, "zebra river bank")
    # sum(log(1 + N / df)) over shared terms: zebra is in 1 of 5, river and bank in 4 of 5
    assert scores[0] == pytest.approx(math.log1p(5 / 1))
    assert scores[1] == pytest.approx(2 * math.log1p(5 / 4))
    assert scores[0] > scores[1] == scores[2] == scores[3] == scores[4]
    assert relevance(sentences, "the of") == [0.0] * 5
    assert relevance([], "zebra") == []


def test_sentences_end_at_the_stops_of_other_scripts() -> None:
    """Only . ! ? ended a sentence: a Hindi or Chinese paragraph was one "sentence", so the
    prompt's window of a long passage was always its start, wherever the answer stood."""
    from citeqa.text import sentences

    def split(text: str) -> list[str]:
        return [text[s.start:s.end] for s in sentences(text)]

    assert split("गंगा पवित्र नदी है। यह हिमालय से निकलती है।") == [
        "गंगा पवित्र नदी है।", "यह हिमालय से निकलती है।"]
    assert split("هل هذا صحيح؟ نعم.") == ["هل هذا صحيح؟", "نعم."]
    assert split("他说：「你好。」然后走了。真的吗？是的！") == [
        "他说：「你好。」", "然后走了。", "真的吗？", "是的！"]
    assert split("v1.2 is out") == ["v1.2 is out"]  # (a stop needs a space after it, as before)
    # a closing mark after a CJK stop ends that sentence, and is in no other (it was in both)
    assert split("他说：“好。”然后走了。") == ["他说：“好。”", "然后走了。"]
    assert split("文。)次の文。") == ["文。)", "次の文。"]


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(list("東京 a.!?。！？”」)\n")), max_size=40))
def test_sentences_never_overlap_and_are_trimmed(text: str) -> None:
    from citeqa.text import sentences

    end = 0
    for s in sentences(text):
        assert end <= s.start < s.end and text[s.start:s.end] == text[s.start:s.end].strip()
        end = s.end


def test_terms_and_cjk_characters_as_tokenize_reads_them() -> None:
    from citeqa.text import is_cjk, tokenize

    assert term("Straße") == term("STRASSE") == "strasse"  # case-folded, as tokenize
    assert tokenize("佐々木〇") == ["佐々", "々木", "木〇"]  # the iteration mark is Han text
    assert not is_cjk("\u3099") and is_cjk("か") and is_cjk("々")  # a voicing mark is a mark
