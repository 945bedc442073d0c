"""Tests written from a hand mutation-testing pass over citeqa/reward/verifier.py,
citeqa/reward/scorer.py and citeqa/generation/extractive.py: each pins a behaviour that a
mutant (a flipped comparison, a dropped condition, an off-by-one) changed without any other test
failing. Pure functions, the packaged tokenizer and the tiny random encoder only: fast."""

from __future__ import annotations

from citeqa.generation.extractive import _answer, _quote
from citeqa.reward.scorer import judged
from citeqa.reward.verifier import Judged, around, char_to_tokens, fitting_firsts, gold_span, render
from citeqa.text import content_terms, sentence_spans
from citeqa.types import Candidate, Document, Quote

# --- verifier.around --------------------------------------------------------------------------


def test_around_keeps_a_before_that_reaches_the_text_start_whole() -> None:
    """``start == chars``: the window starts at the text's start, no word is cut there, so the
    first word stays (``start - chars >= 0`` dropped it)."""
    text = "one two three four"
    start = text.index("three")
    before, _ = around(text, start, start + 5, chars=start)
    assert before == "one two "


def test_around_keeps_an_after_that_reaches_the_text_end_whole() -> None:
    """``end + chars == len(text)``: the window ends at the text's end, so its last word is
    whole and stays; and a short text's tail is never cut at all."""
    text = "one two three four"
    assert around(text, 0, 3, chars=len(text) - 3) == ("", " two three four")
    assert around(text, 0, 3) == ("", " two three four")
    assert around(text, 8, 13) == ("one two ", " four")


def test_around_cuts_before_after_the_space_not_at_it() -> None:
    text = "aa bb cc dd"
    before, after = around(text, 6, 8, chars=5)  # window "a bb ": "a" is a cut word
    assert before == "bb "  # starts at a word, not at the space before it
    assert after == " dd"


def test_around_cuts_after_at_its_last_space() -> None:
    before, after = around("aa bb cc dd ee ff", 0, 2, chars=8)  # window " bb cc d"
    assert (before, after) == ("", " bb cc")


# --- verifier.render / _find / gold_span / char_to_tokens -------------------------------------


def _marked(x: Judged) -> str | None:
    _, b, span = render(x)
    return None if span is None else b[span[0]:span[1]]


def test_an_answer_is_found_without_its_surrounding_space() -> None:
    assert _marked(Judged("q", " Rollo ", "Rollo swore fealty.")) == "Rollo"


def test_an_empty_answer_is_never_found() -> None:
    assert render(Judged("q", " ", "Rollo swore fealty."))[2] is None


def test_an_answer_with_regex_characters_is_found_as_text() -> None:
    assert _marked(Judged("q", "c++", "He wrote it in C++ and C.")) == "C++"
    assert _marked(Judged("q", "u.s.", "Made in the USA, sold in the U.S. too.")) == "U.S."


def test_a_gold_of_no_content_word_is_not_a_target() -> None:
    _, b, _ = render(Judged("q", "Rollo", "the leader of the Normans", "Normans"))
    assert gold_span(b, ["the"], "Rollo") is None
    at = b.index("Normans")  # the title's, the passage part's first
    assert gold_span(b, ["the", "Normans"], "Rollo") == (at, at + 7)


def test_tokens_touching_a_span_at_its_edges_are_not_in_it() -> None:
    # "(Rollo)": "(" ends where the span starts, ")" starts where it ends
    offsets, seq = [(0, 0), (0, 1), (1, 6), (6, 7), (0, 0)], [None, 1, 1, 1, None]
    assert char_to_tokens(offsets, seq, (1, 6)) == (2, 2)


def test_a_span_between_tokens_is_cls() -> None:
    offsets, seq = [(0, 0), (0, 3), (4, 7), (0, 0)], [None, 1, 1, None]
    assert char_to_tokens(offsets, seq, (3, 3)) == (0, 0)


# --- verifier.fitting_firsts ------------------------------------------------------------------


def test_a_small_budget_keeps_a_third_for_the_passage(tokenizer) -> None:
    question = "word " * 100
    [cut] = fitting_firsts(tokenizer, [question], 60)
    # 60 - 3 special tokens - 20 (a third of 60, under MIN_SECOND_TOKENS) = 37 tokens
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 37


def test_a_question_of_exactly_the_room_is_as_it_was(tokenizer) -> None:
    room = 192 - 3 - 64
    question = " ".join(["word"] * room)
    assert len(tokenizer(question, add_special_tokens=False)["input_ids"]) == room
    assert fitting_firsts(tokenizer, [question], 192) == [question]
    [cut] = fitting_firsts(tokenizer, [question + " word"], 192)
    assert cut == question


# --- scorer.judged ----------------------------------------------------------------------------


TEXT = "First part of the story. Rollo swore fealty to the king. The end came later on."
QUOTE = Quote("Rollo swore fealty to the king.", "d", "The Title", "t.txt",
              TEXT.index("Rollo"), TEXT.index(" The end"))


def test_judged_reads_the_title_and_the_text_on_each_side_of_the_quote() -> None:
    doc = Document("d", "The Title", "t.txt", TEXT)
    j = judged("Who?", Candidate("Rollo", QUOTE), {"d": doc}.__getitem__)
    assert j == Judged("Who?", "Rollo", QUOTE.text, "The Title", "First part of the story. ",
                       " The end came later on.")


def test_judged_without_the_document_reads_the_quote_alone() -> None:
    def missing(doc_id: str) -> Document:
        raise KeyError(doc_id)

    j = judged("Who?", Candidate("Rollo", QUOTE), missing)
    assert (j.before, j.after, j.title) == ("", "", "The Title")


# --- extractive stand-in ----------------------------------------------------------------------


TOWER = content_terms("When was the tower built?")


def test_a_lone_punctuation_word_does_not_take_an_answer_words_place() -> None:
    """A run's leading "(" (no letters: ``""`` once stripped) is dropped like a stop word, so the
    five answer words are five words."""
    sentence = "The tower was built ( by workers who laboured every single day ) in Paris."
    assert _answer(sentence, TOWER) == "workers who laboured every single"


def test_the_sentences_capitalised_first_word_is_not_a_name() -> None:
    assert _answer("Yesterday the cat met Rollo.", content_terms("What did the cat do?")) == (
        "met Rollo")


def test_without_a_name_or_number_the_first_run_is_the_answer() -> None:
    sentence = "old stones lay there but the tower stood in green fields"
    assert _answer(sentence, TOWER) == "old stones lay"


def test_without_a_new_word_the_sentences_first_three_words_are_the_answer() -> None:
    assert _answer("the tower was built", TOWER) == "the tower was"


def test_a_sentence_of_punctuation_is_its_own_answer() -> None:
    assert _answer("?! ...", TOWER) == "?! ..."


def test_a_sentence_of_exactly_the_minimum_length_is_not_extended() -> None:
    text = "Exactly twenty char. Then more text follows."
    spans = sentence_spans(text)
    assert spans[0] == (0, 20)
    assert _quote(text, spans, 0, (20, 200)) == "Exactly twenty char."
    assert _quote(text, spans, 0, (21, 200)) == text  # one more: extended


def test_a_sentence_of_exactly_the_maximum_length_is_not_cut() -> None:
    text = "One two three four five. Six."
    spans = sentence_spans(text)
    assert _quote(text, spans, 0, (5, 24)) == "One two three four five."
    assert _quote(text, spans, 0, (5, 23)) == "One two three four"  # one less: cut at a space


def test_a_short_quote_is_not_extended_onto_the_next_line() -> None:
    text = "Short one.\nThe next line is here."
    assert _quote(text, sentence_spans(text), 0, (20, 200)) == "Short one."


def test_a_served_score_is_the_verifiers_own_reading_of_the_passage_around_the_quote(
        tiny_encoder, tokenizer, tmp_path) -> None:
    """Nothing compared ``VerifierScorer.score`` with the model: score and uncertainty swapped,
    the score given as the uncertainty, or the documents not passed on (the passage around the
    quote unread) all passed. Here each candidate's score and uncertainty are the ensemble's
    mean and spread over exactly what ``judged`` reads, passage around the quote included."""
    import numpy as np

    from citeqa.reward.checkpoint import save_verifier
    from citeqa.reward.scorer import VerifierScorer
    from citeqa.reward.verifier import Verifier

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 3, 8), tokenizer, {})
    scorer = VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")
    text = ("The Normans gave their name to Normandy, a region in France. Their leader Rollo "
            "swore fealty to King Charles III. The Norman dynasty shaped medieval Europe.")
    doc = Document("d", "Normans", "n.txt", text)
    start, end = text.index("Their leader"), text.index(" The Norman dynasty")
    quote = Quote(text[start:end], "d", "Normans", "n.txt", start, end)
    candidates = [Candidate("Rollo", quote), Candidate("Charles", quote)]
    scored = scorer.score("Who led the Normans?", candidates, {"d": doc}.__getitem__)
    items = [judged("Who led the Normans?", c, {"d": doc}.__getitem__) for c in candidates]
    assert all(x.before and x.after for x in items)  # the passage around the quote is read
    mean, spread = scorer.predict(items)
    assert [c.score for c in scored] == [float(s) for s in mean]
    assert [c.uncertainty for c in scored] == [float(u) for u in spread]
    assert all(u < s for u, s in zip(spread, mean, strict=True))  # (not swapped: a seeded net)
    bare = scorer.predict([judged("Who led the Normans?", c, None) for c in candidates])[0]
    assert not np.allclose(bare, mean)  # without the passage, other scores


def test_a_batch_of_many_candidates_scores_each_as_alone(tiny_encoder, tokenizer,
                                                         tmp_path) -> None:
    """Candidates are encoded SCORE_BATCH at a time: a chunk boundary that skipped or repeated
    one (every 16th left at 0, or scored with its neighbour's input) went untested. Each of 35
    candidates (three chunks, some without a quote) scores as it does alone."""
    import numpy as np

    from citeqa.reward.checkpoint import save_verifier
    from citeqa.reward.scorer import SCORE_BATCH, VerifierScorer
    from citeqa.reward.verifier import Verifier

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 8), tokenizer, {})
    scorer = VerifierScorer(tmp_path / "rm", cpu_dtype="fp32", combined=False)
    text = " ".join(f"Word{i} stands at place {i} of this passage." for i in range(40))
    items = []
    for i in range(2 * SCORE_BATCH + 3):
        start = text.index(f"Word{i} ")
        end = start + len(f"Word{i} stands at place {i}")
        quote = Quote(text[start:end], "d", "T", "t.txt", start, end) if i % 7 != 3 else None
        items.append(judged(f"What stands at place {i}?", Candidate(f"Word{i}", quote), None))
    together, spread = scorer.predict(items)
    alone = [scorer.predict([x]) for x in items]
    assert np.allclose(together, [s[0] for s, _ in alone], atol=1e-5)
    assert np.allclose(spread, [u[0] for _, u in alone], atol=1e-5)
    assert all((s > 0) == bool(x.quote) for s, x in zip(together, items, strict=True))
    assert len(set(np.round(together[[i for i, x in enumerate(items) if x.quote]], 6))) > 20
