"""The question pipeline end to end: an in-memory retriever + the extractive stand-in model."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import THREE_DOCS

from citeqa.config import (
    MAX_CANDIDATES,
    MAX_QUESTION_CHARS,
    Config,
    GenerationConfig,
    RewardConfig,
    Settings,
    preset,
)
from citeqa.errors import InvalidRequestError, ModelError
from citeqa.generation.backend import GenerationRequest
from citeqa.generation.cited import CitedGenerator
from citeqa.generation.extractive import extractive_responder
from citeqa.generation.fake import FakeBackend
from citeqa.pipeline import WARM_UP_QUESTION, Pipeline, confidence, rank
from citeqa.types import AskArgs, Candidate, Document, Hit, Passage, Quote

DOCS = THREE_DOCS


def _words(text: str) -> set[str]:
    return {w.strip(".,?!'\"").lower() for w in text.split()}


class MemoryRetriever:
    """Tiny Retriever: whole documents as passages, ranked by word overlap."""

    def __init__(self, documents: Sequence[Document]) -> None:
        self.docs = {d.doc_id: d for d in documents}
        self.queries: list[tuple[str, int]] = []

    def search(self, query: str, k: int = 10) -> list[Hit]:
        self.queries.append((query, k))
        q = _words(query)
        scored = []
        for pid, d in enumerate(self.docs.values()):
            overlap = len(q & _words(d.text))
            if overlap:
                passage = Passage(pid, d.doc_id, 0, len(d.text), d.text)
                scored.append(Hit(passage, d.title, d.source, float(overlap)))
        scored.sort(key=lambda h: -h.score)
        return scored[:k]

    def document(self, doc_id: str) -> Document:
        return self.docs[doc_id]
    # no index_version: a retriever written before it existed (answers then carry None)


def fake_backend(responder: Callable[[GenerationRequest], list[str]],
                 mean_lp: float = -0.1) -> FakeBackend:
    """Texts from ``responder``, each of 10 tokens at mean log-probability ``mean_lp``."""
    return FakeBackend(responder, "test", scores=lambda text, i: (mean_lp * 10, 10),
                       timings_ms={"prefill_ms": 1.0, "decode_ms": 2.0})


CFG = Config(  # free mode: the scripted replies below put the answer first
    generation=GenerationConfig(model="fake", constrain_quote=True, answer_mode="free"),
    reward=RewardConfig(model=None),
)
UNCONSTRAINED = replace(CFG, generation=replace(CFG.generation, constrain_quote=False))


def pipeline(responder=extractive_responder, mean_lp=-0.1, cfg=CFG, scorer=None) -> Pipeline:
    gen = CitedGenerator(fake_backend(responder, mean_lp), cfg.generation)
    return Pipeline(MemoryRetriever(DOCS), gen, cfg, scorer)


def test_answers_with_a_verified_quote():
    ans = pipeline().ask("When did it open as the entrance to the World's Fair?")
    assert ans.index_version is None  # a retriever without versions
    assert not ans.declined and ans.reason is None
    assert "1889" in ans.answer
    q = ans.quote
    assert q.doc_id == "eiffel" and DOCS[1].text[q.start : q.end] == q.text
    assert ans.score == pytest.approx(math.exp(-0.1))
    assert ans.candidates[0].quote == q
    for key in ("retrieve_ms", "generate_ms", "prefill_ms", "decode_ms", "score_ms", "total_ms"):
        assert key in ans.timings_ms and ans.timings_ms[key] >= 0
    assert ans.timings_ms["total_ms"] >= ans.timings_ms["generate_ms"]
    assert ans.to_json()["quote"]["doc_id"] == "eiffel"


def test_warm_up_asks_its_question_once_and_times_it(monkeypatch):
    p = pipeline()
    asked = []
    real = p.ask_many
    monkeypatch.setattr(p, "ask_many", lambda items: asked.extend(items) or real(items))
    seconds = p.warm_up()
    assert [a.question for a in asked] == [WARM_UP_QUESTION] and seconds >= 0


def test_uses_the_real_fake_backend_too():

    gen = CitedGenerator(FakeBackend(extractive_responder), CFG.generation)
    ans = Pipeline(MemoryRetriever(DOCS), gen, CFG).ask("Who was the leader Rollo swore fealty to?")
    assert not ans.declined and "King" in ans.answer and ans.quote.doc_id == "normans"


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_invalid(question):
    with pytest.raises(InvalidRequestError):
        pipeline().ask(question)


@pytest.mark.parametrize(
    "kw", [{"top_k": 0}, {"top_k": 1000}, {"n_candidates": 0}, {"n_candidates": 10_000}]
)
def test_bad_request_parameters_are_invalid(kw):
    with pytest.raises(InvalidRequestError):
        pipeline().ask("When did it open?", **kw)


def test_overlong_question_is_invalid():
    with pytest.raises(InvalidRequestError):
        pipeline().ask("why " * 1000)


def test_declines_when_nothing_is_retrieved():
    ans = pipeline().ask("zzz qqq")
    assert ans.declined and ans.answer is None and ans.quote is None
    assert "no passages" in ans.reason


def test_declines_when_no_quote_verifies():
    ans = pipeline(lambda r: ["Answer: 1889\nQuote [1]: It closed in 1999 forever."] * r.n).ask(
        "When did it open?"
    )
    assert ans.declined and ans.answer is None and ans.quote is None
    assert "verified" in ans.reason
    assert ans.candidates and ans.candidates[0].answer == "1889"  # kept for evaluation
    # no answer to score: not the generator's confidence in text that is not in the sources
    assert ans.score is None and ans.uncertainty is None and ans.candidates[0].score > 0.5


def test_a_decline_of_outputs_cut_at_the_token_limit_says_so() -> None:
    """An engine that cut every output at its token limit was declined with "rephrase the
    question", which cannot help."""
    backend = FakeBackend(lambda r: [""] * r.n, "test", scores=lambda text, i: (-1.0, 10),
                          timings_ms={"cut": 1.0})
    p = Pipeline(MemoryRetriever(DOCS), CitedGenerator(backend, CFG.generation), CFG, None)
    ans = p.ask("When did it open?")
    assert ans.declined and ans.reason.startswith(
        "the generator ran out of its token budget before ending a quote (1 output cut short)"
    ), ans.reason


def test_declines_on_unparseable_output():
    ans = pipeline(lambda r: ["I think 1889."] * r.n).ask("When did it open?")
    assert ans.declined and ans.candidates[0].answer == ""


def test_min_score_declines_and_says_the_score_is_a_stand_in():
    p = pipeline(mean_lp=-1.0)  # confidence exp(-1) ~ 0.37
    ans = p.ask("When did it open as the entrance to the fair?", min_score=0.5)
    assert ans.declined and ans.answer is None and ans.quote is None
    assert "below the threshold" in ans.reason and "stand-in" in ans.reason
    assert ans.score == pytest.approx(math.exp(-1.0))
    assert not p.ask("When did it open as the entrance to the fair?", min_score=0.3).declined


def test_config_threshold_applies_when_no_min_score():
    cfg = replace(CFG, reward=RewardConfig(model=None, threshold=0.95))  # exp(-0.1) = 0.905
    assert pipeline(cfg=cfg).ask("When did it open as the fair entrance?").declined
    assert (
        not pipeline(cfg=cfg).ask("When did it open as the fair entrance?", min_score=0.0).declined
    )


def test_top_k_and_n_candidates_reach_retriever_and_generator():
    seen: list[GenerationRequest] = []

    def responder(r: GenerationRequest) -> list[str]:
        seen.append(r)
        return extractive_responder(r)

    p = pipeline(responder)
    ans = p.ask("When did the Eiffel Tower in Paris open?", top_k=1, n_candidates=3)
    assert p.retriever.queries[-1][1] == 1
    # one passage shown: one greedy candidate quoting it, then two samples
    assert [(r.n, r.temperature > 0) for r in seen] == [(1, False), (2, True)]
    assert seen[-1].messages[-1]["content"].count("<passage ") == 1
    # the extractive stand-in gives the same answer and quote three times: one candidate
    assert len(ans.candidates) == 1


def test_repeats_of_one_answer_and_quote_are_scored_once() -> None:
    from citeqa.pipeline import distinct

    q = Quote("x" * 20, "d", "t", "s", 0, 20)
    a = Candidate("a", q, logprob=-4.0, n_tokens=2)
    a_surer = Candidate("a", q, logprob=-1.0, n_tokens=2)
    b = Candidate("b", q, logprob=-1.0, n_tokens=2)
    other_place = Candidate("a", Quote("y" * 20, "d", "t", "s", 30, 50), logprob=-9.0, n_tokens=2)
    unverified = Candidate("a", None)
    got = distinct([a, b, a_surer, other_place, unverified, unverified])
    assert got == [a_surer, b, other_place, unverified, unverified]
    shorter = Candidate("a", Quote("x" * 12, "d", "t", "s", 0, 12), logprob=-9.0, n_tokens=2)
    assert distinct([a, shorter]) == [a, shorter]  # one start, another end: another quote


class ReverseScorer:
    """Scorer stand-in: prefers the later candidate, and declares its own threshold."""

    threshold = 0.5

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: object = None) -> list[Candidate]:
        n = len(candidates)
        return [replace(c, score=(i + 1) / n, uncertainty=0.01) for i, c in enumerate(candidates)]


def test_scorer_orders_candidates_and_its_threshold_applies():
    texts = [
        "Answer: Paris\nQuote [1]: The Eiffel Tower is a wrought-iron lattice tower in Paris.",
        "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair.",
    ]
    p = pipeline(lambda r: texts[: r.n], cfg=UNCONSTRAINED, scorer=ReverseScorer())
    ans = p.ask("When did the Eiffel Tower open?", n_candidates=2)
    assert ans.answer == "1889" and ans.score == 1.0 and ans.uncertainty == 0.01
    assert [c.answer for c in ans.candidates] == ["1889", "Paris"]
    p = pipeline(lambda r: texts[: r.n][:1] * r.n, scorer=ReverseScorer())
    assert not p.ask("When did the Eiffel Tower open?", n_candidates=1).declined  # score 1.0


class FixedScorer:
    """Scorer stand-in: every candidate scores ``value``; its calibration says ``threshold``."""

    def __init__(self, value: float, threshold: float) -> None:
        self.value, self.threshold = value, threshold

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: object = None) -> list[Candidate]:
        return [replace(c, score=self.value) for c in candidates]


@pytest.mark.parametrize(("value", "threshold", "declined"),
                         [(0.4, 0.5, True), (0.6, 0.5, False), (0.4, 0.3, False),
                          (0.5, 0.5, False)])  # a score at the threshold answers
def test_the_scorers_calibrated_threshold_decides(value, threshold, declined):
    text = "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair."
    p = pipeline(lambda r: [text] * r.n, cfg=UNCONSTRAINED, scorer=FixedScorer(value, threshold))
    assert p.decline_threshold() == threshold
    ans = p.ask("When did the Eiffel Tower open?")
    assert ans.declined is declined and ans.score == value
    assert (ans.answer is None) is declined
    # a request's min_score overrides the calibration either way
    assert p.ask("When did it open?", min_score=value + 0.05).declined
    assert not p.ask("When did it open?", min_score=value - 0.05).declined


class NanFirstScorer:
    """Scorer stand-in for a model that fails on the first candidate (NaN)."""

    threshold = 0.5

    def __init__(self, rest: float) -> None:
        self.rest = rest

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: object = None) -> list[Candidate]:
        return [replace(c, score=math.nan if i == 0 else self.rest,
                        uncertainty=math.nan if i == 0 else 0.01)
                for i, c in enumerate(candidates)]


@pytest.mark.parametrize("rest", [0.1, 0.95])
def test_a_nan_score_never_passes_a_threshold_or_heads_the_ranking(rest: float) -> None:
    texts = [
        "Answer: Paris\nQuote [1]: The Eiffel Tower is a wrought-iron lattice tower in Paris.",
        "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair.",
    ]
    p = pipeline(lambda r: texts[: r.n], cfg=UNCONSTRAINED, scorer=NanFirstScorer(rest))
    ans = p.ask("When did the Eiffel Tower open?", n_candidates=2)
    assert [c.answer for c in ans.candidates] == ["1889", "Paris"]
    assert ans.candidates[1].score is None and ans.candidates[1].uncertainty is None
    json.dumps(ans.to_json(), allow_nan=False)  # what the API sends: NaN made it a 500
    assert ans.declined is (rest < 0.5) and ans.answer == (None if rest < 0.5 else "1889")


@pytest.mark.parametrize("min_score", [None, 0.0])
def test_a_candidate_the_scorer_failed_on_is_never_answered(min_score: float | None) -> None:
    """With no threshold in force (none calibrated, or min_score 0) a failed score (NaN) was
    made 0 and answered."""
    text = "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair."
    scorer = NanFirstScorer(0.9)
    scorer.threshold = None  # type: ignore[assignment]
    p = pipeline(lambda r: [text] * r.n, cfg=UNCONSTRAINED, scorer=scorer)
    ans = p.ask("When did it open?", min_score=min_score)
    assert ans.declined and ans.answer is None and ans.score is None, ans
    assert ans.reason.startswith("the reward model failed to score every candidate"), ans.reason
    assert ans.candidates[0].quote is not None  # the best guess is still shown
    # without a reward model, a NaN log-probability: the reason does not blame a reward model
    p = pipeline(lambda r: [text] * r.n, mean_lp=math.nan, cfg=UNCONSTRAINED)
    ans = p.ask("When did it open?", min_score=min_score)
    assert ans.declined and ans.reason.startswith(
        "the generator's confidence is not a number for every candidate"), ans.reason


def test_a_decline_reason_tells_a_score_from_its_threshold() -> None:
    text = "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair."
    p = pipeline(lambda r: [text] * r.n, cfg=UNCONSTRAINED, scorer=FixedScorer(0.3130, 0.31347))
    ans = p.ask("When did it open?")
    assert ans.reason == "best score 0.3130 is below the threshold 0.3135"
    p = pipeline(lambda r: [text] * r.n, cfg=UNCONSTRAINED, scorer=FixedScorer(0.2, 0.5))
    assert p.ask("When did it open?").reason == "best score 0.200 is below the threshold 0.500"


@pytest.mark.parametrize("min_score", [math.nan, -0.1, 1.5])
def test_a_min_score_outside_0_1_is_refused(min_score: float) -> None:
    text = "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair."
    p = pipeline(lambda r: [text] * r.n, cfg=UNCONSTRAINED, scorer=FixedScorer(0.1, 0.5))
    with pytest.raises(InvalidRequestError, match="min_score must be between 0 and 1"):
        p.ask("When did it open?", min_score=min_score)


def _quote() -> Quote:
    return Quote("x" * 20, "d", "t", "s", 0, 20)


def test_rank_puts_verified_quotes_first_then_score():
    a = Candidate("a", None, score=0.99)
    b = Candidate("b", _quote(), score=0.2)
    c = Candidate("c", _quote(), score=0.7)
    d = Candidate("d", _quote(), score=None)
    assert [x.answer for x in rank([a, b, c, d])] == ["c", "b", "d", "a"]


def test_confidence_is_exp_mean_logprob():
    assert confidence(Candidate("a", None, logprob=-2.0, n_tokens=4)) == pytest.approx(
        math.exp(-0.5)
    )
    assert confidence(Candidate("a", None, logprob=0.0, n_tokens=0)) == 1.0


def test_from_settings_tiny_preset_end_to_end(tmp_path):
    from citeqa.retrieval import build_index_from_documents

    cfg = preset("tiny")
    build_index_from_documents(DOCS, tmp_path / "idx", cfg.retrieval, progress=False)
    p = Pipeline.from_settings(
        Settings(preset="tiny", index=tmp_path / "idx", cache_dir=tmp_path / "cache")
    )
    ans = p.ask("Who was the leader Rollo swore fealty to?")
    assert not ans.declined, ans.reason
    assert ans.quote.doc_id == "normans" and "King" in ans.answer
    assert DOCS[0].text[ans.quote.start : ans.quote.end] == ans.quote.text


# -- ask_many ---------------------------------------------------------------------------------

QUESTIONS = [
    "Who was the leader Rollo swore fealty to?",
    "When did the Eiffel Tower open?",
    "When was Harvard University founded?",
]


class CountingGenerator(CitedGenerator):
    """The real CitedGenerator, counting its generate and generate_many calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, int | None]] = []  # (items, top_k) per generate_many
        self.singles = 0

    def generate(self, *args, **kwargs):
        self.singles += 1
        return super().generate(*args, **kwargs)

    def generate_many(self, items, **kwargs):
        self.batches.append((len(items), kwargs.get("top_k")))
        return super().generate_many(items, **kwargs)


def _strip_timings(a):
    return replace(a, timings_ms={})


def test_ask_many_uses_generate_many_in_one_call_and_matches_ask():
    gen = CountingGenerator(fake_backend(extractive_responder), CFG.generation)
    p = Pipeline(MemoryRetriever(DOCS), gen, CFG)
    items = [AskArgs(q) for q in QUESTIONS] + [AskArgs(QUESTIONS[1], min_score=0.999)]
    many = p.ask_many(items)
    assert gen.batches == [(4, CFG.generation.top_k_passages)] and gen.singles == 0
    expected = [p.ask(a.question, min_score=a.min_score) for a in items]  # batches of one
    assert gen.batches[1:] == [(1, CFG.generation.top_k_passages)] * 4
    assert [_strip_timings(a) for a in many] == [_strip_timings(a) for a in expected]
    assert [a.declined for a in many] == [False, False, False, True]
    assert DOCS[0].text[many[0].quote.start : many[0].quote.end] == many[0].quote.text


def test_an_abandoned_question_generates_nothing_and_the_others_are_answered():
    asked: list[GenerationRequest] = []

    def responder(req: GenerationRequest) -> list[str]:
        asked.append(req)
        return extractive_responder(req)

    scored: list[str] = []

    class Spy(ReverseScorer):
        def score(self, question, candidates, documents=None):  # type: ignore[no-untyped-def]
            scored.append(question)
            return super().score(question, candidates, documents)

    p = pipeline(responder, scorer=Spy())
    searched: list[str] = []
    search = p.retriever.search
    p.retriever.search = lambda q, **kw: searched.append(q) or search(q, **kw)  # type: ignore[method-assign]
    left, waiting = p.ask_many([AskArgs(QUESTIONS[0], abandoned=lambda: True),
                                AskArgs(QUESTIONS[1], abandoned=lambda: False)])
    assert searched == [QUESTIONS[1]]  # the abandoned one is not searched,
    assert scored == [QUESTIONS[1]]  # nor scored,
    # and its requests never reached the responder
    assert asked and all(QUESTIONS[1] in r.messages[-1]["content"] for r in asked)
    assert left.declined and all(not c.answer for c in left.candidates)
    assert _strip_timings(waiting) == _strip_timings(p.ask(QUESTIONS[1]))
    assert not waiting.declined


def test_ask_many_groups_items_by_top_k():
    gen = CountingGenerator(fake_backend(extractive_responder), CFG.generation)
    p = Pipeline(MemoryRetriever(DOCS), gen, CFG)
    default = CFG.generation.top_k_passages
    out = p.ask_many([AskArgs(QUESTIONS[0]), AskArgs(QUESTIONS[1], top_k=default + 2),
                      AskArgs(QUESTIONS[2], top_k=default)])
    assert sorted(gen.batches) == [(1, default + 2), (2, default)] and gen.singles == 0
    assert [a.question for a in out] == QUESTIONS
    assert not any(a.declined for a in out)


def test_ask_many_raises_on_an_invalid_item():
    gen = CountingGenerator(fake_backend(extractive_responder), CFG.generation)
    p = Pipeline(MemoryRetriever(DOCS), gen, CFG)
    with pytest.raises(InvalidRequestError):
        p.ask_many([AskArgs(QUESTIONS[0]), AskArgs("   ")])
    assert gen.batches == []


class UncertifiedScorer(ReverseScorer):
    """A reward model whose calibration certified no accuracy target (threshold inf)."""

    threshold = math.inf

    def threshold_for(self, target_accuracy: float) -> float:
        return 0.9 if target_accuracy <= 0.5 else math.inf


def test_an_uncertified_calibration_answers_unless_told_to_decline():
    question = "When did it open as the entrance to the World's Fair?"
    ans = pipeline(scorer=UncertifiedScorer()).ask(question)
    assert not ans.declined and ans.score == 1.0
    strict = replace(CFG, reward=replace(CFG.reward, decline_uncertified=True))
    ans = pipeline(cfg=strict, scorer=UncertifiedScorer()).ask(question)
    assert ans.declined and ans.reason.startswith(
        "the reward model's calibration certified no accuracy target, and this service "
        "declines without one (CITEQA_DECLINE_UNCERTIFIED")


class NeverCalibrated(ReverseScorer):
    """A reward model with no calibration.json (a fresh `train reward`, or `reward-combine`)."""

    threshold = None


def test_a_reward_model_never_calibrated_declines_when_told_to_decline_uncertified():
    question = "When did it open as the entrance to the World's Fair?"
    assert not pipeline(scorer=NeverCalibrated()).ask(question).declined
    strict = replace(CFG, reward=replace(CFG.reward, decline_uncertified=True))
    ans = pipeline(cfg=strict, scorer=NeverCalibrated()).ask(question)
    assert ans.declined and ans.reason.startswith(
        "the reward model has no calibration (docs/calibrate.md), and this service declines "
        "without one (CITEQA_DECLINE_UNCERTIFIED"), ans.reason
    assert not pipeline(cfg=strict, scorer=NeverCalibrated()).ask(question, min_score=0.5).declined


class NothingCertified(UncertifiedScorer):
    def threshold_for(self, target_accuracy: float) -> float:
        return math.inf


def test_a_target_no_threshold_certifies_declines_and_says_what_is_certified():
    question = "When did it open as the entrance to the World's Fair?"
    p = pipeline(scorer=UncertifiedScorer())  # certifies targets up to 0.5
    ans = p.ask(question, target_accuracy=0.8)
    assert ans.declined and ans.candidates and "every question is declined" in ans.reason
    assert ans.reason.startswith("no decline threshold is certified for the target accuracy")
    assert "certifies targets up to 0.50" in ans.reason and "inf" not in ans.reason
    assert not p.ask(question, target_accuracy=0.5).declined  # score 1.0 >= 0.9
    assert p.highest_certified_accuracy() == 0.5
    ans = pipeline(scorer=NothingCertified()).ask(question, target_accuracy=0.3)
    assert ans.declined and ans.reason.endswith("calibration certifies no target")


def test_asked_text_counts_the_length_as_given_as_rest_does():
    from citeqa.pipeline import asked_text

    assert asked_text("  Who   led\tthem? ") == "Who led them?"
    assert asked_text("x" * MAX_QUESTION_CHARS) == "x" * MAX_QUESTION_CHARS
    with pytest.raises(InvalidRequestError, match=f"{MAX_QUESTION_CHARS} at most"):
        asked_text("Who led them?" + " " * MAX_QUESTION_CHARS)  # REST refuses it too
    with pytest.raises(InvalidRequestError, match="query is empty"):
        asked_text(" \n", "query")
    for invisible in ("\u200b\u200b", "\u200f\u202e", " \u2060 "):  # blank as REST says
        with pytest.raises(InvalidRequestError, match="question is empty"):
            asked_text(invisible)
    # what REST's schema refuses (422), `citeqa ask` answered, printing invalid UTF-8 (a
    # terminal's lone byte reaches Python as a lone surrogate)
    with pytest.raises(InvalidRequestError, match="question contains a NUL"):
        asked_text("Who\x00 led them?")
    with pytest.raises(InvalidRequestError, match="query is not valid Unicode"):
        asked_text("Eiffel \udcff completed?", "query")


def test_warm_up_finds_the_highest_certified_target_so_no_request_waits_for_it(monkeypatch):
    p = pipeline(scorer=UncertifiedScorer())
    p.warm_up()
    monkeypatch.setattr(p, "threshold_for", lambda t: pytest.fail("searched again"))
    assert p.highest_certified_accuracy() == 0.5
    assert pipeline().highest_certified_accuracy() is None  # no reward model


def test_check_resolves_a_target_accuracy_and_refuses_bad_requests():
    p = pipeline(scorer=UncertifiedScorer())
    args = p.check(AskArgs("  When   did it open? ", target_accuracy=0.5))
    assert args == AskArgs("When did it open?", min_score=0.9, target_accuracy=0.5)
    assert p.check(args) == args  # (checked again by ask_many: as it was)
    assert p.ask("When did the Eiffel Tower open?", target_accuracy=0.8).declined
    for bad in (AskArgs("q", min_score=0.5, target_accuracy=0.5), AskArgs("q", top_k=0),
                AskArgs("q", n_candidates=MAX_CANDIDATES + 1), AskArgs("q", search_k=99),
                AskArgs("x" * (MAX_QUESTION_CHARS + 1))):
        with pytest.raises(InvalidRequestError):
            p.check(bad)
    with pytest.raises(InvalidRequestError, match="calibrated reward model"):
        pipeline().check(AskArgs("q", target_accuracy=0.8))


class RecordedScorer(UncertifiedScorer):
    """Calibrated on the answers of CFG's generator ("test"), one candidate a question."""

    def __init__(self) -> None:
        from citeqa.generation.prompt import generator_fingerprint

        self.calibration = SimpleNamespace(body={
            "generators": [generator_fingerprint("test", CFG.generation)],
            "candidates_per_question": 1})


def test_a_target_is_refused_for_options_its_calibration_did_not_see():
    """A target accuracy is certified for the answers calibrated on: a request that asks for
    more candidates, other passages or the other answer mode gets other answers."""
    p = pipeline(scorer=RecordedScorer())
    top_k = CFG.generation.top_k_passages
    assert p.check(AskArgs("q", target_accuracy=0.5)).min_score == 0.9
    assert p.check(AskArgs("q", target_accuracy=0.5, top_k=top_k, n_candidates=1,
                           answer_mode="free")).min_score == 0.9  # the same as calibrated
    for args, phrase in ((AskArgs("q", top_k=1), f"top_k_passages {top_k} -> 1"),
                         (AskArgs("q", n_candidates=2), "candidates per question 1 -> 2"),
                         (AskArgs("q", answer_mode="span"), "answer_mode 'free' -> 'span'")):
        with pytest.raises(InvalidRequestError, match=phrase) as info:
            p.check(replace(args, target_accuracy=0.5))
        assert info.value.code == "uncertified_options" and info.value.status == 422
        assert "min_score" in str(info.value)
        p.check(replace(args, min_score=0.5))  # a threshold of its own: no claim to check
    # what the service's settings change already was said at start: not the request's doing
    wider = replace(CFG, generation=replace(CFG.generation, top_k_passages=top_k + 1))
    p = pipeline(cfg=wider, scorer=RecordedScorer())
    assert p.options_off_calibration(AskArgs("q")) == []
    assert p.options_off_calibration(AskArgs("q", top_k=top_k + 1)) == []
    assert p.options_off_calibration(AskArgs("q", top_k=top_k, n_candidates=3)) == [
        "candidates per question 1 -> 3"]  # back to the calibrated top_k is no difference
    assert pipeline(scorer=UncertifiedScorer()).options_off_calibration(
        AskArgs("q", n_candidates=3)) == []  # nothing recorded to compare with


def test_an_answer_carries_the_passages_retrieval_found():
    p = pipeline()
    one = p.ask("When did the Eiffel Tower open in Paris?", top_k=1)
    deep = p.ask("When did the Eiffel Tower open in Paris?", top_k=1, search_k=3)
    assert len(one.passages) == 1 and len(deep.passages) == 3  # all three share a word
    assert deep.passages[0] == one.passages[0]
    # the generator saw the same passage: the rest of the answer is the same
    assert _strip_timings(replace(deep, passages=[])) == _strip_timings(replace(one, passages=[]))
    assert "passages" not in one.to_json()
    assert len(deep.to_json(with_passages=True)["passages"]) == 3


@pytest.mark.parametrize("scorer", [None, "uncertified"])
def test_an_infinite_min_score_is_not_said_to_be_a_target(scorer: str | None) -> None:
    """Declined, the reason spoke of a target accuracy (and a calibration) that no one asked
    for; asked for, a target still is (and REST's check, then ask_many's, say so alike)."""
    p = pipeline(scorer=UncertifiedScorer() if scorer else None)
    ans = p.ask("When did the Eiffel Tower open?", min_score=math.inf)
    assert ans.declined and ans.reason.startswith(
        "the threshold asked for (min_score) is infinite, so every question is declined")
    if scorer:
        [ans] = p.ask_many([p.check(AskArgs("When did the Eiffel Tower open?",
                                            target_accuracy=0.8))])
        assert ans.declined and ans.reason.startswith(
            "no decline threshold is certified for the target accuracy asked for")


def test_threshold_for_asks_the_reward_model_and_needs_one():
    p = pipeline(scorer=UncertifiedScorer())
    assert p.threshold_for(0.5) == 0.9 and p.threshold_for(0.8) == math.inf
    assert p.ask("When did the Eiffel Tower open?", min_score=p.threshold_for(0.8)).declined
    with pytest.raises(InvalidRequestError, match="calibrated reward model") as info:
        pipeline().threshold_for(0.8)
    assert info.value.code == "needs_calibration" and info.value.status == 422


class NeverCalibratedScorer(ReverseScorer):
    def threshold_for(self, target_accuracy: float) -> float:
        raise ModelError("rm/ has no calibration.json; run `citeqa calibrate` first")


def test_an_uncalibrated_reward_model_is_a_request_error_not_a_server_error():
    with pytest.raises(InvalidRequestError, match="citeqa calibrate") as info:
        pipeline(scorer=NeverCalibratedScorer()).threshold_for(0.8)
    assert info.value.code == "needs_calibration"


def test_settings_choose_adapter_and_reward_model(tmp_path, monkeypatch):
    assert Settings().config().generation.adapter == "packaged"
    assert Settings().config().reward.model == "default"
    monkeypatch.setenv("CITEQA_ADAPTER", "none")
    monkeypatch.setenv("CITEQA_REWARD", "none")
    cfg = Settings().config()
    assert cfg.generation.adapter == "none" and cfg.reward.model is None
    monkeypatch.setenv("CITEQA_REWARD", str(tmp_path))
    assert Settings().config().reward.model == str(tmp_path)
    monkeypatch.setenv("CITEQA_REWARD", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="CITEQA_REWARD"):
        Settings()
    # the keywords in any case, as the checks accept them, reach the loaders as they expect
    monkeypatch.setenv("CITEQA_REWARD", " Default")
    monkeypatch.setenv("CITEQA_ADAPTER", "Packaged ")
    cfg = Settings().config()
    assert (cfg.generation.adapter, cfg.reward.model) == ("packaged", "default")
    monkeypatch.setenv("CITEQA_ADAPTER", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="CITEQA_ADAPTER='.*missing' is not an adapter directory"):
        Settings()


def test_paths_in_settings_start_at_home_as_a_shell_reads_them(tmp_path, monkeypatch):
    """An env file or a unit file passes "~/x" as it is: the settings expand it, as the loaders
    given it in Python do (a generator there was refused as "not a directory")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("gen", "rm", "ad", "idx"):
        (tmp_path / name).mkdir()
    for var, value in (("CITEQA_GENERATOR", "~/gen"), ("CITEQA_REWARD", "~/rm"),
                       ("CITEQA_ADAPTER", "~/ad"), ("CITEQA_INDEX", "~/idx"),
                       ("CITEQA_CACHE_DIR", "~/cache")):
        monkeypatch.setenv(var, value)
    s = Settings()
    assert (s.generator, s.reward, s.adapter) == tuple(
        str(tmp_path / n) for n in ("gen", "rm", "ad"))
    assert (s.index, s.cache_dir) == (tmp_path / "idx", tmp_path / "cache")
    monkeypatch.setenv("CITEQA_INDEX", "~nosuchuser/idx")  # left as a shell leaves it
    assert str(Settings().index) == "~nosuchuser/idx"  # (it raised RuntimeError)


def test_without_a_home_the_model_cache_is_a_temporary_folder_of_the_user(monkeypatch,
                                                                         tmp_path):
    """No HOME and a user id without a passwd entry (a container run as an arbitrary uid):
    Path.home() raised RuntimeError when the settings were made, a traceback for every command
    (the tiny preset's too, which needs no cache)."""
    import os
    import pwd
    import tempfile
    from pathlib import Path

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("CITEQA_CACHE_DIR", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    fallback = Path(tempfile.gettempdir()) / f"citeqa-cache-{os.getuid()}"
    assert Settings().cache_dir == fallback
    # a home named that does not exist (nobody's /nonexistent), or a relative one: the README
    # promised the fallback "with no home folder", and the cache was said not writable
    for home in ("/nonexistent-home-of-nobody", "relative/home"):
        monkeypatch.setenv("HOME", home)
        assert Settings().cache_dir == fallback, home
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().cache_dir == tmp_path / ".cache" / "citeqa"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a home it may not write
    assert Settings().cache_dir == fallback
    (tmp_path / ".cache").mkdir()  # ... with a ~/.cache it may (a container's usual layout)
    monkeypatch.setattr(os, "access", lambda path, mode: str(path).endswith(".cache"))
    assert Settings().cache_dir == tmp_path / ".cache" / "citeqa"
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    (tmp_path / ".cache" / "citeqa").mkdir()  # a cache made there is read as it is
    assert Settings().cache_dir == tmp_path / ".cache" / "citeqa"
    # a home it may not even look into: a PermissionError ended every command
    stat = os.stat

    def refused(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(f"{tmp_path}/"):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refused)
    assert Settings().cache_dir == fallback


def test_settings_choose_the_cpu_dtype(monkeypatch):
    cfg = Settings().config()
    assert cfg.generation.cpu_dtype == "auto" and cfg.retrieval.cpu_dtype == "auto"
    monkeypatch.setenv("CITEQA_CPU_DTYPE", "fp32")
    cfg = Settings().config()
    assert cfg.generation.cpu_dtype == "fp32" and cfg.retrieval.cpu_dtype == "fp32"
    monkeypatch.setenv("CITEQA_CPU_DTYPE", "int4")
    with pytest.raises(ValueError, match="cpu_dtype"):
        Settings()


def test_close_releases_the_backend_and_a_failed_load_does_too(tmp_path, monkeypatch):
    """A remote engine's backend holds connections and threads: Pipeline.close() releases
    them, and so does from_settings when loading fails after the backend was built."""
    import citeqa.pipeline as pipeline_module

    closed: list[str] = []

    class Held(FakeBackend):
        def __init__(self) -> None:
            super().__init__(extractive_responder)

        def close(self) -> None:
            closed.append("closed")

    p = pipeline()
    p.generator.backend = Held()
    p.close()
    assert closed == ["closed"]

    from citeqa.retrieval import build_index_from_documents

    build_index_from_documents(DOCS, tmp_path / "idx", preset("tiny").retrieval, progress=False)
    monkeypatch.setattr(pipeline_module, "build_backend", lambda *a, **k: Held())

    def broken(*a, **k):
        raise ModelError("the reward model is damaged")

    monkeypatch.setattr("citeqa.reward.scorer.load_scorer", broken)
    with pytest.raises(ModelError, match="damaged"):
        Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "idx"))
    assert closed == ["closed", "closed"]


@pytest.mark.parametrize("mode", ["free", "span"])
def test_the_stand_in_model_quotes_within_the_configured_bounds(mode):
    """The extractive stand-in keeps to the quote length the request allows (its grammar or
    quote stage), as a constrained model must: a 240-character best sentence is cut to
    max_quote_chars, not quoted whole and then refused by verification."""
    long = ("The Vessik plateau glimmer moth, a small grey insect first described by the "
            "naturalist Ilse Marrow in 1911 after a decade of night walks across the high "
            "moorland, migrates every spring toward the coast in swarms that can darken the "
            "sky for hours.")
    assert len(long) > 200
    doc = Document("moth", "Glimmer moths", "moths.txt", long + " It rests by day.")
    cfg = replace(CFG, generation=replace(CFG.generation, answer_mode=mode,
                                          max_quote_chars=120))
    gen = CitedGenerator(fake_backend(extractive_responder), cfg.generation)
    p = Pipeline(MemoryRetriever([doc]), gen, cfg)
    ans = p.ask("Who first described the Vessik plateau glimmer moth?")
    assert ans.quote is not None and 20 <= len(ans.quote.text) <= 120, ans
    assert doc.text[ans.quote.start:ans.quote.end] == ans.quote.text
