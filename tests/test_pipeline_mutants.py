"""Behaviour of citeqa/pipeline.py, citeqa/api/routes.py and citeqa/api/batching.py that hand
mutation testing (round 8) found no test pinned: each test here fails on one mutant of that code
and passes on it. The fakes are test_pipeline's and test_api's (no model is loaded)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from test_pipeline import (
    CFG,
    DOCS,
    UNCONSTRAINED,
    MemoryRetriever,
    ReverseScorer,
    fake_backend,
    pipeline,
)

from citeqa.config import MAX_CANDIDATES, MAX_PASSAGES, MAX_SEARCH_K
from citeqa.errors import InvalidRequestError
from citeqa.generation.cited import CitedGenerator
from citeqa.generation.extractive import extractive_responder
from citeqa.generation.fake import FakeBackend
from citeqa.pipeline import Pipeline, check_count, confidence
from citeqa.types import AskArgs, Candidate

# -- pipeline: request checks --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "most"), [("top_k", MAX_PASSAGES),
                                            ("n_candidates", MAX_CANDIDATES),
                                            ("search_k", MAX_SEARCH_K)])
def test_each_count_may_be_its_most_and_no_more(name: str, most: int) -> None:
    """The limits are inclusive (the REST schema's ``le``): a request at the limit is asked."""
    p = pipeline()
    assert getattr(p.check(AskArgs("When did it open?", **{name: most})), name) == most
    assert getattr(p.check(AskArgs("When did it open?", **{name: 1})), name) == 1
    with pytest.raises(InvalidRequestError, match=f"between 1 and {most}"):
        p.check(AskArgs("When did it open?", **{name: most + 1}))
    assert check_count("k", most, most) == most


@pytest.mark.parametrize("name", ["top_k", "n_candidates", "search_k"])
def test_a_boolean_is_not_a_count(name: str) -> None:
    """True is an int to Python; as a count it is refused, as REST's schema refuses it."""
    with pytest.raises(InvalidRequestError, match="whole number"):
        pipeline().check(AskArgs("When did it open?", **{name: True}))
    with pytest.raises(InvalidRequestError, match="whole number"):
        pipeline().search("Eiffel", k=True)  # type: ignore[arg-type]


def test_the_stand_in_confidence_is_never_above_one() -> None:
    """A backend that reports a positive mean log-probability (a remote engine's rounding) gives
    a confidence of 1, not a "score" above every threshold's range."""
    assert confidence(Candidate("a", None, logprob=2.0, n_tokens=4)) == 1.0
    ans = pipeline(mean_lp=0.5).ask("When did it open as the entrance to the World's Fair?")
    assert not ans.declined and ans.score == 1.0
    assert all(c.score is not None and c.score <= 1.0 for c in ans.candidates)


# -- pipeline: scoring ---------------------------------------------------------------------------


class CountingScorer:
    """Scorer stand-in: every candidate scores 0.8; records how many it was given."""

    threshold = 0.5

    def __init__(self) -> None:
        self.given: list[int] = []

    def score(self, question, candidates, documents=None):  # type: ignore[no-untyped-def]
        self.given.append(len(candidates))
        return [replace(c, score=0.8) for c in candidates]


def test_the_reward_model_scores_a_repeated_answer_and_quote_once() -> None:
    """The extractive stand-in gives one answer and quote three times: the reward model is given
    it once (its time), and the answer lists it once."""
    scorer = CountingScorer()
    p = pipeline(scorer=scorer)
    ans = p.ask("When did the Eiffel Tower in Paris open?", top_k=1, n_candidates=3)
    assert scorer.given == [1]
    assert len(ans.candidates) == 1 and not ans.declined and ans.score == 0.8


class UncertainScorer(CountingScorer):
    """Scores every candidate 0.9 with an uncertainty of 0.05."""

    def score(self, question, candidates, documents=None):  # type: ignore[no-untyped-def]
        return [replace(c, score=0.9, uncertainty=0.05) for c in candidates]


def test_a_decline_for_no_verified_quote_reports_no_score_nor_uncertainty() -> None:
    """Text that is not in the sources is no answer to score: the reward model's score and its
    uncertainty of it stay on the candidate, not on the answer."""
    p = pipeline(lambda r: ["Answer: 1889\nQuote [1]: It closed in 1999 forever."] * r.n,
                 cfg=UNCONSTRAINED, scorer=UncertainScorer())
    ans = p.ask("When did it open?")
    assert ans.declined and "verified" in ans.reason
    assert ans.score is None and ans.uncertainty is None
    assert ans.candidates[0].uncertainty == 0.05  # (kept for evaluation)
    ok = pipeline(scorer=UncertainScorer()).ask("When did it open as the entrance to the fair?")
    assert not ok.declined and ok.uncertainty == 0.05


@pytest.mark.parametrize("mode", ["span", "free"])
def test_the_answers_offsets_index_the_answer_in_its_document(mode: str) -> None:
    """The answer's offsets (a span of the quote: always in span mode, where found in free
    mode) index the answer in the quote's document, as the page marks it there."""
    cfg = replace(CFG, generation=replace(CFG.generation, answer_mode=mode))
    ans = pipeline(cfg=cfg).ask("When did it open as the entrance to the World's Fair?")
    assert not ans.declined, ans.reason
    text = next(d.text for d in DOCS if d.doc_id == ans.quote.doc_id)
    assert ans.answer_start is not None and ans.answer_end is not None
    assert ans.quote.start <= ans.answer_start < ans.answer_end <= ans.quote.end
    assert text[ans.answer_start:ans.answer_end] == ans.answer
    best = ans.candidates[0]
    assert (ans.answer_start, ans.answer_end) == (best.answer_start, best.answer_end)
    assert ans.to_json()["answer_start"] == ans.answer_start


@pytest.mark.parametrize("k", [0, MAX_SEARCH_K + 1, 2.0])
def test_a_search_depth_out_of_range_is_refused(k: object) -> None:
    """Pipeline.search checks ``k`` as the REST schema does (1 to MAX_SEARCH_K, an int): the
    CLI and Python callers reach the retriever only through it."""
    p = pipeline()
    with pytest.raises(InvalidRequestError, match="k must be"):
        p.search("Eiffel Tower", k=k)  # type: ignore[arg-type]
    assert p.retriever.queries == []  # nothing was searched
    assert len(p.search("Eiffel Tower", k=MAX_SEARCH_K)) >= 1


# -- pipeline: targets and thresholds ------------------------------------------------------------


class CertifiesUpTo(ReverseScorer):
    """A calibrated reward model whose thresholds are finite for targets up to ``highest``; a
    target outside (0, 1) is a ValueError, as the real one's."""

    def __init__(self, highest: float) -> None:
        self.highest = highest

    def threshold_for(self, target_accuracy: float) -> float:
        if not 0 < target_accuracy < 1:
            raise ValueError(f"target_accuracy must be in (0, 1), got {target_accuracy}")
        return 0.9 if target_accuracy <= self.highest else math.inf


@pytest.mark.parametrize("highest", [0.5, 0.73, 0.74, 0.99, 0.01])
def test_the_highest_certified_target_is_found_exactly(highest: float) -> None:
    """The bisection runs until its bounds meet: it stopped one short for some targets (0.74
    said 0.73), and the decline reason named a target below the one certified."""
    assert pipeline(scorer=CertifiesUpTo(highest)).highest_certified_accuracy() == highest


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2])
def test_a_target_outside_0_1_is_a_request_error(target: float) -> None:
    """The reward model's ValueError for a target outside (0, 1) is the request's fault: an
    InvalidRequestError (REST 4xx, the CLI's message), not an error from deep inside."""
    p = pipeline(scorer=CertifiesUpTo(0.8))
    with pytest.raises(InvalidRequestError, match="target_accuracy must be in"):
        p.check(AskArgs("When did it open?", target_accuracy=target))
    with pytest.raises(InvalidRequestError):
        p.ask("When did it open?", target_accuracy=target)


# -- pipeline: answers and declines --------------------------------------------------------------


def test_an_output_cut_short_beside_a_verified_answer_does_not_decline_it() -> None:
    """The token-budget decline is for questions with no verified quote: an engine that cut one
    sample short while another candidate quoted its source answers with that candidate."""
    text = "Answer: 1889\nQuote [1]: It opened in 1889 as the entrance to the World's Fair."
    backend = FakeBackend(lambda r: [text] * r.n, "test", scores=lambda t, i: (-1.0, 10),
                          timings_ms={"cut": 1.0})
    p = Pipeline(MemoryRetriever(DOCS), CitedGenerator(backend, UNCONSTRAINED.generation),
                 UNCONSTRAINED)
    ans = p.ask("When did it open?")
    assert not ans.declined and ans.reason is None and ans.answer == "1889"
    assert ans.timings_ms["cut"] == 1.0  # (still reported)


class VersionedRetriever(MemoryRetriever):
    index_version = "v42"


def test_every_answer_of_a_batch_names_the_index_version_it_came_from() -> None:
    gen = CitedGenerator(fake_backend(extractive_responder), CFG.generation)
    p = Pipeline(VersionedRetriever(DOCS), gen, CFG)
    answers = p.ask_many([AskArgs("When did it open?"), AskArgs("zzz qqq")])
    assert [a.index_version for a in answers] == ["v42", "v42"]
    assert p.index_version == "v42"
    assert answers[1].declined and answers[1].to_json()["index_version"] == "v42"


@pytest.mark.parametrize("mode", ["bogus", "SPAN", ""])
def test_an_unknown_answer_mode_is_a_request_error(mode: str) -> None:
    """An answer mode the generator has no format for is refused by ``check`` (before anything
    is searched or generated), naming the modes there are."""
    p = pipeline()
    with pytest.raises(InvalidRequestError, match="answer_mode must be one of"):
        p.check(AskArgs("When did it open?", answer_mode=mode))
    with pytest.raises(InvalidRequestError, match="answer_mode must be one of"):
        p.ask_many([AskArgs("When did it open?", answer_mode=mode)])
    assert p.retriever.queries == []
    assert p.check(AskArgs("When did it open?", answer_mode="span")).answer_mode == "span"


@pytest.mark.parametrize("name", ["min_score", "target_accuracy"])
@pytest.mark.parametrize("value", [True, False, "0.5"])
def test_a_boolean_or_a_string_is_not_a_score(name: str, value: object) -> None:
    """min_score=True read as 1.0 (declining everything), False as 0.0: refused, as REST's
    schema refuses them."""
    p = pipeline(scorer=CertifiesUpTo(0.8))
    with pytest.raises(InvalidRequestError, match=f"{name} must be a number"):
        p.check(AskArgs("When did it open?", **{name: value}))


# -- routes: shutdown and cancellation -----------------------------------------------------------


def test_a_running_answer_is_told_to_stop_when_the_grace_is_over_without_its_handler() -> None:
    """Once the shutdown's grace is over (``state.stopped``) the batch still running is told that
    nobody waits (its generation stops at the next step) at once: not only when the request's
    handler next looks, which a server stopping its event loop may never do."""
    from test_api import FakePipeline, serve, wait_until

    from citeqa.api.app import begin_shutdown

    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    # the handler looks only once its answer is done (or in a minute)
    with serve(pipe, shutdown_grace_s=0, disconnect_poll_s=60, request_timeout_s=600) as c:
        state = c.app.state.citeqa
        got: dict[str, Any] = {}
        asker = threading.Thread(
            target=lambda: got.update(r=c.post("/v1/answer", json={"question": "q"})))
        asker.start()
        assert pipe.started.wait(5)
        abandoned = pipe.asked[0].abandoned
        assert abandoned is not None and not abandoned()
        begin_shutdown(state).join(5)
        assert state.stopped.is_set()
        assert abandoned(), "the running batch was not told to stop"
        gate.set()
        asker.join(10)
        wait_until(lambda: not state.batcher.busy)
    assert got["r"].status_code == 503  # what a stopped row gave is no answer


def test_the_timeout_is_kept_however_seldom_the_handler_looks_for_a_disconnect() -> None:
    """request_timeout_s is when the 504 comes: a wait between looks for a disconnected client
    (disconnect_poll_s) is cut to the time left, not waited out past the deadline."""
    from test_api import FakePipeline, assert_uniform_error, serve

    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    with serve(pipe, request_timeout_s=0.3, disconnect_poll_s=10) as c:
        t0 = time.monotonic()
        r = c.post("/v1/answer", json={"question": "slow"})
        waited = time.monotonic() - t0
        gate.set()
    assert_uniform_error(r, 504, "timeout")
    assert 0.3 <= waited < 1.2, waited  # (not the poll's 10 s, nor a second past it)


# -- routes: metrics and messages ----------------------------------------------------------------


def test_the_declines_metric_counts_declines_not_answers() -> None:
    """Two answers and one decline: citeqa_declines_total is 1 (with one of each, counting the
    answers instead read the same)."""
    from test_api import samples, serve

    with serve() as c:
        for q in ("fine", "also fine", "decline this"):
            assert c.post("/v1/answer", json={"question": q}).status_code == 200
        got = samples(c.get("/metrics").text)
    assert got[("citeqa_answers_total", frozenset())] == 3
    assert got[("citeqa_declines_total", frozenset())] == 1


def test_a_chosen_doc_id_already_taken_is_said_to_be_taken_not_the_text_a_repeat() -> None:
    """409 for a doc_id the request chose: the index's own reason (that id exists: delete it or
    choose another), not "this text is already indexed", said of the texts whose id citeqa made
    from them."""
    from test_api import FakePipeline, assert_uniform_error, serve

    class Taken(FakePipeline):
        def add_documents(self, documents):  # type: ignore[no-untyped-def]
            raise InvalidRequestError(f"a document with id {documents[0].doc_id!r} already "
                                      "exists; delete it first or choose another doc_id",
                                      status=409, code="conflict")

    with serve(Taken()) as c:
        chosen = c.post("/v1/documents", json={"text": "Other text.", "doc_id": "mine"})
        made = c.post("/v1/documents", json={"text": "Other text."})
    error = assert_uniform_error(chosen, 409, "conflict")
    assert "already exists" in error["message"] and "this text" not in error["message"]
    error = assert_uniform_error(made, 409, "conflict")
    assert error["message"].startswith("this text (with the same title and source) is already "
                                       "indexed")


def test_looking_for_a_pages_holder_reads_each_page_of_the_listing_once() -> None:
    """page_holder stops at the listing's total: an index of exactly LIST_PAGE documents is one
    read, not a second read of an empty page (on the update thread, before every URL add)."""
    from citeqa.api.routes import LIST_PAGE, page_holder
    from citeqa.types import Document

    docs = [Document(f"d{i}", "T", f"https://example.org/p{i}", "x")
            for i in range(2 * LIST_PAGE)]
    reads: list[int] = []

    class Listing:
        def list_documents(self, offset: int, limit: int):  # type: ignore[no-untyped-def]
            reads.append(offset)
            return docs[offset:offset + limit], len(docs)

    assert page_holder(Listing(), "https://example.org/none") is None  # type: ignore[arg-type]
    assert reads == [0, LIST_PAGE]


def test_a_page_of_the_document_list_says_where_it_starts() -> None:
    """The list's ``offset`` is the one the page was asked from, not 0 for every page."""
    from test_api import ManyDocsPipeline, serve

    with serve(ManyDocsPipeline()) as c:
        page = c.get("/v1/documents", params={"offset": 4, "limit": 2}).json()
    assert (page["offset"], page["limit"], page["total"]) == (4, 2, 7)
    assert [d["doc_id"] for d in page["documents"]] == ["doc-4", "doc-5"]


# -- batching ------------------------------------------------------------------------------------


def test_a_lone_item_waits_the_window_in_milliseconds_and_no_longer() -> None:
    """``window_ms`` is milliseconds: a lone question is run once its window (200 ms) closes,
    not ten times later."""
    from citeqa.api.batching import Batcher

    b = Batcher(lambda items: [2 * x for x in items], max_batch=4, window_ms=200)
    try:
        t0 = time.monotonic()
        assert b.submit(21).result(5) == 42
        waited = time.monotonic() - t0
    finally:
        b.close()
    assert 0.2 <= waited < 1.6, waited  # (window_ms / 100: 2 s)
