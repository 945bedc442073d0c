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
    # a plural's "es" goes whole only after what takes it; else its "s" ("castles" was "castl")
    ("castles", "castle"), ("houses", "house"), ("times", "time"), ("classes", "class"),
    ("churches", "church"), ("wishes", "wish"), ("heroes", "hero"),
    ("time", "time"), ("tim", "tim"), ("plane", "plane"), ("plan", "plan"),  # kept apart
    # a final "y" after a consonant, a final "ie", "-ies" and "-ied" end in "i" (cities was
    # "citie", city "city"; studied "studi", study "study")
    ("city", "citi"), ("cities", "citi"), ("study", "studi"), ("studied", "studi"),
    ("studying", "studi"), ("studies", "studi"), ("movie", "movi"), ("movies", "movi"),
    ("sky", "ski"), ("skies", "ski"), ("countries", "countri"),
    ("days", "day"), ("day", "day"), ("played", "play"), ("keys", "key"),  # "y" after a vowel
    ("ties", "tie"), ("tie", "tie"), ("dies", "die"),  # "-ies" leaving one letter: its "s"
    ("brie", "bri"), ("bries", "bri"),  # a 4-letter "-ie" word meets its plural
    ("my", "my"),  # two letters: kept whole
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
    # the full-width stop of technical Japanese (not inside a number) and the half-width one
    assert split("これはペンである．値は３．５である．") == [
        "これはペンである．", "値は３．５である．"]
    assert split("ｶﾀｶﾅ｡ﾃｽﾄ｡") == ["ｶﾀｶﾅ｡", "ﾃｽﾄ｡"]
    # a quotation's stop ends no sentence that goes on after it ("...」と言った")
    assert split("彼は「行く。」と言った。次だ。") == ["彼は「行く。」と言った。", "次だ。"]
    assert split("「行く。」「来る。」") == ["「行く。」", "「来る。」"]


@pytest.mark.parametrize(("text", "expected"), [
    # initials where a name goes on, and letters parted by stops
    ("Charles H. Smith was born. He died.", ["Charles H. Smith was born.", "He died."]),
    ("biologist E. O. Wilson and T. S. Eliot met. Yes.",
     ["biologist E. O. Wilson and T. S. Eliot met.", "Yes."]),
    ("The U.S. Army fought. It won.", ["The U.S. Army fought.", "It won."]),
    ("barriers (e.g. customs) and i.e. this. Next.", ["barriers (e.g. customs) and i.e. this.",
                                                      "Next."]),
    # titles, words before a number, and words that end a sentence unless it goes on
    ("He met Dr. Watson at St. Augustine. They talked.",
     ["He met Dr. Watson at St. Augustine.", "They talked."]),
    ("No. 5 was sold, see pp. 4-9. Fine.", ["No. 5 was sold, see pp. 4-9.", "Fine."]),
    ("It cost approx. five, etc. and more. Smith et al. found it. Then",
     ["It cost approx. five, etc. and more.", "Smith et al. found it.", "Then"]),
    ("Martin Luther King Jr. He preached. Apple Inc. It grew.",
     ["Martin Luther King Jr.", "He preached.", "Apple Inc.", "It grew."]),
    # a numbered list item where a list can start: the text's first line, after a ":" line or
    # another item, or after a blank line; not a number left on a line of its own
    ("1. Install it.\n2. Run it. Done.", ["1. Install it.", "2. Run it.", "Done."]),
    ("Steps:\n1. Install it.\n\n3. Run it.", ["Steps:", "1. Install it.", "3. Run it."]),
    ("the formula O\n2. Diatomic oxygen.", ["the formula O", "2.", "Diatomic oxygen."]),
    # a new sentence plainly starts: a capitalised stop word, a capital letter ending a
    # sentence, lower-case text, a stop inside quotes or brackets, a word not shortened
    ("He moved to the U.S. The next year he wed. At 5 p.m. Then he left.",
     ["He moved to the U.S.", "The next year he wed.", "At 5 p.m.", "Then he left."]),
    ("He fought in World War I. The war ended. Did he go? No. He stayed on Main St. His house.",
     ["He fought in World War I.", "The war ended.", "Did he go?", "No.", "He stayed on Main St.",
      "His house."]),
    ("X is reduced to X. Thus it is in C. This holds.",
     ["X is reduced to X.", "Thus it is in C.", "This holds."]),
    ("the cat sat. the dog ran. He bought a phone. iPhone sales rose.",
     ["the cat sat.", "the dog ran.", "He bought a phone.", "iPhone sales rose."]),
    ('"No." He turned away (see Fig.) Then left.',
     ['"No."', "He turned away (see Fig.)", "Then left."]),
    ("not just a.x. Capturing a. See e.g. this.",  # (lower-case letters: code's names)
     ["not just a.x.", "Capturing a.", "See e.g. this."]),
    ("Ask Dr.\nSmith", ["Ask Dr.", "Smith"]),  # a line break still ends it
    ("Go! then? no.", ["Go!", "then?", "no."]),  # only a full stop can abbreviate
    (("x" * 30) + "H. Smith", [("x" * 30) + "H.", "Smith"]),  # a long word is no initial
])
def test_an_abbreviation_ends_no_sentence(text: str, expected: list[str]) -> None:
    """A stop after an initial ("Charles H. Smith"), "U.S.", "e.g." or "Dr." ended a sentence:
    extractive quotes and prompt windows of SQuAD's articles began or ended mid-name."""
    from citeqa.text import sentences

    assert [text[s.start:s.end] for s in sentences(text)] == expected


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


def test_a_list_item_numbered_up_to_three_digits_stays_one_sentence() -> None:
    from citeqa.text import sentence_spans

    # ("Run", not a capitalised stop word as "Then": that ends a sentence whatever the number)
    text = "Steps:\n100. Install the package now.\n1000. Run this."
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Steps:", "100. Install the package now.", "1000.", "Run this."]


def test_a_word_shortened_before_numbers_ends_a_sentence_before_a_word() -> None:
    """"no" and "Fig" are shortened only before a number ("No. 5", "Fig. 3"): "He said no."
    before a capitalised word that is no stop word still ends its sentence."""
    from citeqa.text import sentence_spans

    text = "He said no. Nothing changed. See Fig. 3 for it."
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "He said no.", "Nothing changed.", "See Fig. 3 for it."]


def test_a_line_ending_in_a_closing_guillemet_or_brace_after_its_stop_ends_as_prose() -> None:
    from citeqa.text import ends_as_prose

    assert ends_as_prose("Il a dit «Partez.»") and ends_as_prose("{Then it stops.}")
    assert not ends_as_prose("Installation «Linux»")


def test_tokenizer_version_4_keeps_its_words_as_version_4_indices_hold_them() -> None:
    """Under tokenizer version 4 (indices built before version 5), a variation selector and
    the dot of a Turkish capital I were dropped, so queries missed words those indices hold."""
    from citeqa.text import tokenize

    assert tokenize("Acme\u2122\ufe0f", 4) == ["acmetm\ufe0f"]
    assert tokenize("\u0130stanbul", 4) == ["i\u0307stanbul"]


def test_a_byte_order_mark_is_blank() -> None:
    """A text of only a byte order mark (U+FEFF) and spaces was not read as blank."""
    from citeqa.text import is_blank

    assert is_blank("\ufeff")
    assert is_blank(" \ufeff\n")


def test_relevance_meets_a_y_plural_and_its_singular() -> None:
    """Asked about a "city", the sentence naming "cities" is the more relevant (term cut
    "cities" to "citie", which met no "city": both sentences scored the river alone)."""
    sentences = ["The river floods each spring.", "Three cities border the river."]
    scores = relevance(sentences, "Which city is on the river?")
    assert scores[1] > scores[0]
