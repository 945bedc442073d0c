"""The REST service driven end to end (TestClient) with a fake pipeline: no models, no index."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import CannedPipeline
from pydantic import ValidationError

from citeqa.api.app import STATIC_DIR, create_app
from citeqa.api.deps import key_matches, parse_api_keys
from citeqa.api.errors import map_citeqa_error
from citeqa.api.metrics import Metrics
from citeqa.api.middleware import page_csp
from citeqa.api.routes import make_run_batch
from citeqa.api.schemas import NOT_BLANK
from citeqa.config import Settings
from citeqa.errors import (
    BlockedURLError,
    CiteqaError,
    ConfigError,
    EmptyCorpusError,
    EngineError,
    EngineUnavailableError,
    FetchError,
    IndexError_,
    InvalidRequestError,
    ModelError,
    NotSupportedError,
    OutputFormatError,
    SourceError,
)
from citeqa.text import BLANK_CHARS, INVISIBLE_CHARS
from citeqa.types import Answer, AskArgs, Candidate, Document, Hit, Passage, Quote

DOC = Document("d1", "Normans", "https://en.wikipedia.org/wiki/Normans",
               "The Normans were the people who in the 10th and 11th centuries gave their name "
               "to Normandy, a region in France.")
QUOTE_AT = DOC.text.index("gave their name")
QUOTE = Quote("gave their name to Normandy", "d1", DOC.title, DOC.source, QUOTE_AT,
              QUOTE_AT + len("gave their name to Normandy"))
assert DOC.text[QUOTE.start:QUOTE.end] == QUOTE.text


class FakePipeline(CannedPipeline):
    """Canned answers; ``gate`` holds every batch until set; ``fail`` makes asking raise it;
    ``batch_sizes`` records the size of every batch it is given."""

    corpus = [DOC]

    def __init__(self, *, gate: threading.Event | None = None, fail: Exception | None = None,
                 delay_s: float = 0.0) -> None:
        self.gate = gate
        self.fail = fail
        self.delay_s = delay_s
        self.asked: list[AskArgs] = []
        self.batch_sizes: list[int] = []
        self.started = threading.Event()

    def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
        self.batch_sizes.append(len(items))
        return super().ask_many(items)

    def answer(self, a: AskArgs) -> Answer:
        self.asked.append(a)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        if a.question.startswith("decline"):
            return Answer(a.question, True, None, None, 0.1, reason="score 0.10 below 0.50",
                          passages=self.search(a.question))
        cand = Candidate("the Normans", QUOTE, logprob=-3.0, n_tokens=6, score=0.9)
        return Answer(a.question, False, "the Normans", QUOTE, 0.9, uncertainty=0.05,
                      candidates=[cand], timings_ms={"retrieve": 1.0, "generate": 2.0},
                      passages=self.search(a.question))

    def search(self, query: str, k: int = 10) -> list[Hit]:
        p = Passage(0, "d1", 0, 40, DOC.text[:40])
        return [Hit(p, DOC.title, DOC.source, score=0.5, bm25=1.2, dense=None)][:k]

    def document(self, doc_id: str) -> Document:
        if doc_id != DOC.doc_id:
            raise KeyError(doc_id)
        return DOC


class CalibratedFakePipeline(FakePipeline):
    def check(self, args: AskArgs) -> AskArgs:
        if args.target_accuracy is None:
            return args
        return replace(args, min_score=round(args.target_accuracy / 2, 3), target_accuracy=None)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@contextmanager
def serve(pipeline: Any = None, *, factory: Callable[[Settings], Any] | None = None,
          wait_ready: bool = True, **settings: Any) -> Iterator[TestClient]:
    """The app with ``pipeline`` (default a FakePipeline) and ``Settings(**settings)``."""
    pipeline = pipeline if pipeline is not None else FakePipeline()
    app = create_app(Settings(**{"window_ms": 1, **settings}), factory or (lambda s: pipeline))
    with TestClient(app, raise_server_exceptions=False) as client:
        if wait_ready:
            wait_until(lambda: app.state.citeqa.phase != "loading")
        yield client


def assert_uniform_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in resp.text
    return body["error"]


# -- lifecycle --------------------------------------------------------------------------------


def test_healthz_answers_while_loading_and_readyz_waits() -> None:
    loaded = threading.Event()

    def slow_factory(_: Settings) -> FakePipeline:
        assert loaded.wait(10)
        return FakePipeline()

    with serve(factory=slow_factory, wait_ready=False) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.get("/readyz")
        assert_uniform_error(r, 503, "not_ready")
        assert r.headers["retry-after"]
        assert_uniform_error(c.post("/v1/answer", json={"question": "q"}), 503, "not_ready")
        assert_uniform_error(c.get("/v1/documents/d1"), 503, "not_ready")
        loaded.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/v1/answer", json={"question": "q"}).status_code == 200
        # a pipeline without index_version (written before it) is ready, with none
        assert c.get("/readyz").json() == {"status": "ready", "index_version": None}
        assert c.get("/healthz").json() == {"status": "ok", "detail": None}


def test_a_failed_load_is_reported_by_readyz(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Settings) -> FakePipeline:
        raise ModelError("no model at /x; run `citeqa download`")

    with serve(factory=broken) as c:
        err = assert_uniform_error(c.get("/readyz"), 503, "load_failed")
        assert "citeqa download" in err["message"]
        assert c.get("/healthz").status_code == 200
    # an error written for users is logged as its one line, without a traceback
    [record] = [r for r in caplog.records if "loading the pipeline failed" in r.getMessage()]
    assert "citeqa download" in record.getMessage() and record.exc_info is None
    # with API keys, the open /readyz leaves the cause (paths, addresses) to the log; the
    # routes behind the keys still say it
    for keys in ({"api_keys": "k1"}, {"read_api_keys": "k1"}):  # read keys alone too
        with serve(factory=broken, **keys) as c:
            err = assert_uniform_error(c.get("/readyz"), 503, "load_failed")
            assert "/x" not in err["message"] and "see the server log" in err["message"]
            err = assert_uniform_error(c.post("/v1/answer", json={"question": "q"},
                                              headers={"X-API-Key": "k1"}), 503, "load_failed")
            assert "citeqa download" in err["message"]
    # without keys, to a Host the service does not answer to (a page that rebound its name to
    # 127.0.0.1) neither: it read the index's path there; its own names still get the cause
    with serve(factory=broken, allowed_hosts="localhost") as c:
        err = assert_uniform_error(c.get("/readyz", headers={"Host": "attacker.example"}), 503,
                                   "load_failed")
        assert "/x" not in err["message"] and "see the server log" in err["message"]
        err = assert_uniform_error(c.get("/readyz", headers={"Host": "localhost:8000"}), 503,
                                   "load_failed")
        assert "citeqa download" in err["message"]


def test_a_load_that_exits_is_a_failed_load_not_a_load_forever() -> None:
    def exits(_: Settings) -> FakePipeline:
        raise SystemExit(3)  # a library giving up so

    with serve(factory=exits) as c:
        err = assert_uniform_error(c.get("/readyz"), 503, "load_failed")
        assert "SystemExit" in err["message"]  # it said "models are still loading" for ever


def test_not_ready_says_a_remote_engine_is_waited_for() -> None:
    """A service waiting for its engine said only "models are still loading"."""
    from citeqa.api.deps import ServiceState

    remote = ServiceState(Settings(generator_url="http://user:pw@engine:8100"))
    message = remote.not_ready_error().message
    assert "generator engine, CITEQA_GENERATOR_URL" in message
    assert ServiceState(Settings()).not_ready_error().message == (
        "models are still loading; retry")


def test_shutdown_marks_not_ready_then_lets_the_running_batch_finish() -> None:
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    app = create_app(Settings(window_ms=1), lambda s: pipe)
    client = TestClient(app, raise_server_exceptions=False)
    client.__enter__()
    state = app.state.citeqa
    wait_until(lambda: state.phase == "ready")
    result: dict[str, Any] = {}
    asker = threading.Thread(
        target=lambda: result.update(r=client.post("/v1/answer", json={"question": "q"}))
    )
    asker.start()
    assert pipe.started.wait(5)
    closer = threading.Thread(target=client.__exit__, args=(None, None, None))
    closer.start()
    wait_until(lambda: state.phase == "shutting_down")
    assert state.not_ready_error().code == "shutting_down"
    assert closer.is_alive()  # waiting for the batch
    gate.set()
    asker.join(5)
    closer.join(5)
    assert not closer.is_alive()
    assert result["r"].status_code == 200
    assert not state.batcher._thread.is_alive()


def test_shutdown_closes_the_pipeline_after_its_last_batch() -> None:
    """A remote engine's connections and threads are released: the pipeline's close() runs
    once, after the batcher stopped."""
    pipe = FakePipeline()
    closed: list[bool] = []
    pipe.close = lambda: closed.append(app.state.citeqa.batcher._thread.is_alive())  # type: ignore[attr-defined]
    app = create_app(Settings(window_ms=1), lambda s: pipe)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: app.state.citeqa.phase == "ready")
        assert client.post("/v1/answer", json={"question": "q"}).status_code == 200
        assert closed == []
    assert closed == [False]


def test_shutdown_leaves_the_pipeline_open_under_a_batch_that_outlives_the_grace() -> None:
    """A batch still running after shutdown_grace_s keeps its backend: closing a remote
    engine's client under it would fail every request of the batch. (The shutdown is called
    directly: run through the test client's own exit, a loaded machine could leave the
    client's portal waiting on the request it was tearing down.)"""
    from citeqa.api.app import _shutdown

    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    closed: list[bool] = []
    pipe.close = lambda: closed.append(True)  # type: ignore[attr-defined]
    app = create_app(Settings(window_ms=1, shutdown_grace_s=0.1), lambda s: pipe)
    with TestClient(app, raise_server_exceptions=False) as client:
        state = app.state.citeqa
        wait_until(lambda: state.phase == "ready")
        answered: list[int] = []
        asker = threading.Thread(target=lambda: answered.append(
            client.post("/v1/answer", json={"question": "q"}).status_code))
        asker.start()
        assert pipe.started.wait(5)
        t0 = time.monotonic()
        _shutdown(state)  # the batch outlives the 0.1 s grace...
        assert time.monotonic() - t0 < 10 and state.phase == "shutting_down"
        assert closed == []  # ...so the pipeline stays open under it
        asker.join(30)  # its request is answered 503 at once, not left to the server's 500
        assert answered == [503]
        gate.set()  # (then the batch ends)


# -- the endpoints ----------------------------------------------------------------------------


def test_answer_returns_the_pipeline_answer_as_json() -> None:
    pipe = FakePipeline()
    with serve(pipe) as c:
        r = c.post("/v1/answer", json={"question": "Who?", "top_k": 3, "n_candidates": 2,
                                       "min_score": 0.4})
    assert r.status_code == 200
    expected = pipe.answer(AskArgs("Who?")).to_json()
    assert r.json() == expected
    assert pipe.asked[0] == AskArgs("Who?", top_k=3, n_candidates=2, min_score=0.4)


def test_a_decline_is_a_200_with_its_reason() -> None:
    with serve() as c:
        body = c.post("/v1/answer", json={"question": "decline please"}).json()
    assert body["declined"] is True and body["answer"] is None and body["quote"] is None
    assert body["reason"]


def test_target_accuracy_needs_a_calibrated_pipeline() -> None:
    with serve() as c:
        assert_uniform_error(
            c.post("/v1/answer", json={"question": "q", "target_accuracy": 0.9}),
            422, "needs_calibration")
    pipe = CalibratedFakePipeline()
    with serve(pipe) as c:
        assert c.post("/v1/answer", json={"question": "q", "target_accuracy": 0.9}).is_success
    assert pipe.asked[0].min_score == 0.45


def test_search_returns_hits_with_offsets() -> None:
    with serve() as c:
        hits = c.post("/v1/search", json={"query": "Normans", "k": 5}).json()["hits"]
    assert len(hits) == 1
    h = hits[0]
    assert DOC.text[h["start"]:h["end"]] == h["text"]
    assert {"doc_id", "title", "source", "passage_id", "score", "bm25", "dense"} <= set(h)


def test_searches_past_the_limit_are_503_and_the_places_come_back() -> None:
    """Each search holds a thread of the pool every request shares: past ``max_searches``
    running at once a caller is told to retry, not queued."""
    gate, started = threading.Event(), threading.Event()

    class SlowSearch(FakePipeline):
        def search(self, query: str, k: int = 10) -> list[Hit]:
            if query == "slow":
                started.set()
                assert gate.wait(10), "test gate never opened"
            return super().search(query, k)

    with serve(SlowSearch(), max_searches=1, retry_after_s=3) as c:
        state = c.app.state.citeqa
        held = threading.Thread(target=c.post, args=("/v1/search",),
                                kwargs={"json": {"query": "slow"}})
        held.start()
        assert started.wait(5)
        r = c.post("/v1/search", json={"query": "Normans"})
        gate.set()
        held.join(10)
        assert_uniform_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "3"
        assert "searches are at their limit (1 at once)" in r.text
        assert state.running["searches"] == 0
        assert len(c.post("/v1/search", json={"query": "Normans"}).json()["hits"]) == 1


def test_documents_found_and_not_found() -> None:
    with serve() as c:
        assert c.get("/v1/documents/d1").json() == {
            "doc_id": "d1", "title": DOC.title, "source": DOC.source, "text": DOC.text}
        assert_uniform_error(c.get("/v1/documents/nope"), 404, "document_not_found")
        assert_uniform_error(c.get("/v1/documents/a%2Fb"), 404, "document_not_found")


def test_passages_come_back_only_when_asked_for() -> None:
    pipe = FakePipeline()
    with serve(pipe) as c:
        plain = c.post("/v1/answer", json={"question": "Who?"}).json()
        asked = c.post("/v1/answer", json={"question": "decline", "with_passages": True}).json()
        off = c.post("/v1/answer", json={"question": "Who?", "with_passages": False}).json()
        for bad in (1, "true", None):
            r = c.post("/v1/answer", json={"question": "q", "with_passages": bad})
            assert_uniform_error(r, 422, "invalid_request")
    assert "passages" not in plain and "passages" not in off  # no bandwidth unless asked
    assert asked["declined"] and asked["reason"]
    assert asked["passages"] == [h.to_json() for h in pipe.search("decline")]
    assert DOC.text[asked["passages"][0]["start"]:asked["passages"][0]["end"]] == (
        asked["passages"][0]["text"])


class ManyDocsPipeline(FakePipeline):
    corpus = [Document(f"doc-{i}", f"Title {i}", f"src/{i}.txt", "x" * (i + 1))
              for i in range(7)]


def test_documents_are_listed_a_page_at_a_time() -> None:
    with serve(ManyDocsPipeline()) as c:
        first = c.get("/v1/documents", params={"limit": 3}).json()
        last = c.get("/v1/documents", params={"offset": 6, "limit": 3}).json()
        past = c.get("/v1/documents", params={"offset": 10**30}).json()
        default = c.get("/v1/documents").json()
    assert first == {"documents": [{"doc_id": f"doc-{i}", "title": f"Title {i}",
                                    "source": f"src/{i}.txt", "length": i + 1}
                                   for i in range(3)],
                     "total": 7, "offset": 0, "limit": 3, "can_change": True}
    assert [d["doc_id"] for d in last["documents"]] == ["doc-6"] and last["total"] == 7
    assert past["documents"] == [] and past["total"] == 7
    assert len(default["documents"]) == 7 and default["limit"] == 20


@pytest.mark.parametrize("query", [
    {"offset": -1}, {"limit": 0}, {"limit": 101}, {"limit": "ten"}, {"offset": "1.5"},
    {"limit": ""},
])
def test_bad_document_pages_are_422(query: dict[str, Any]) -> None:
    with serve(ManyDocsPipeline()) as c:
        err = assert_uniform_error(c.get("/v1/documents", params=query), 422, "invalid_request")
    assert err["message"].startswith("query." + next(iter(query))), err


def test_openapi_lists_the_versioned_routes() -> None:
    with serve() as c:
        spec = c.get("/openapi.json").json()
    assert {"/v1/answer", "/v1/search", "/v1/documents", "/v1/documents/{doc_id}"} <= set(
        spec["paths"])
    assert "ErrorOut" in spec["components"]["schemas"]
    schemas = spec["components"]["schemas"]
    listing = spec["paths"]["/v1/documents"]["get"]
    params = {p["name"]: p["schema"] for p in listing["parameters"]}
    assert params["offset"]["minimum"] == 0 and params["limit"]["maximum"] == 100
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/DocumentListOut")
    assert "501" in listing["responses"]  # a retriever that cannot list its documents
    assert "can_change" in schemas["DocumentListOut"]["required"]
    for path, method in (("/v1/documents", "get"), ("/v1/documents/{doc_id}", "get"),
                         ("/v1/documents/{doc_id}", "delete"), ("/v1/answer", "post")):
        assert "415" in spec["paths"][path][method]["responses"], (path, method)  # gzip body
    assert set(schemas["DocumentSummaryOut"]["properties"]) == {"doc_id", "title", "source",
                                                                 "length"}
    assert schemas["AnswerRequest"]["properties"]["with_passages"]["type"] == "boolean"
    assert "passages" in schemas["AnswerOut"]["properties"]
    assert "passages" not in schemas["AnswerOut"].get("required", [])
    for probe in ("/healthz", "/readyz", "/metrics"):  # a bad Host or body reaches them too
        assert {"400", "413"} <= set(spec["paths"][probe]["get"]["responses"])
    # the page's views are pages, not API
    assert not {"/", "/documents", "/document"} & set(spec["paths"])


# -- validation: bad input is a 4xx with the uniform body, never a 500 --------------------------

BAD_ANSWER_BODIES: list[Any] = [
    {},
    {"question": ""},
    {"question": "   \n\t "},
    {"question": "x" * 1001},
    {"question": 5},
    {"question": None},
    {"question": ["a"]},
    {"question": {"a": 1}},
    {"question": "a\x00b"},
    {"question": "q", "top_k": 0},
    {"question": "q", "top_k": 21},  # MAX_PASSAGES + 1 (51 passed any limit up to 50)
    {"question": "q", "top_k": "5"},
    {"question": "q", "top_k": 2.5},
    {"question": "q", "top_k": True},
    {"question": "q", "top_k": 10**30},
    {"question": "q", "n_candidates": 0},
    {"question": "q", "n_candidates": 17},
    {"question": "q", "min_score": -0.01},
    {"question": "q", "min_score": 1.01},
    {"question": "q", "min_score": "high"},
    {"question": "q", "target_accuracy": 2},
    {"question": "q", "target_accuracy": 1},  # no threshold certifies 0 or 1: the schema says so
    {"question": "q", "target_accuracy": 0},
    {"question": "q", "min_score": 0.5, "target_accuracy": 0.9},
    {"question": "q", "unknown": 1},
    ["question", "q"],
    "question",
    None,
    12,
]

BAD_RAW_BODIES: list[bytes] = [
    b"",
    b"{",
    b"not json",
    b'{"question": "q", "min_score": NaN}',
    b'{"question": "q", "min_score": Infinity}',
    b"\xff\xfe\x00garbage",
    b"[" * 5000 + b"]" * 5000,
    b'{"question": "q"}{"question": "q"}',
]


@pytest.mark.parametrize("body", BAD_ANSWER_BODIES, ids=lambda b: repr(b)[:40])
def test_bad_answer_bodies_are_422(body: Any) -> None:
    with serve() as c:
        assert_uniform_error(c.post("/v1/answer", json=body), 422, "invalid_request")


@pytest.mark.parametrize("raw", BAD_RAW_BODIES, ids=lambda b: repr(b)[:30])
def test_malformed_bodies_are_4xx(raw: bytes) -> None:
    with serve() as c:
        r = c.post("/v1/answer", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500
        assert_uniform_error(r, r.status_code)


def test_bodies_in_a_content_coding_are_415_and_digits_past_the_limit_are_named() -> None:
    """A gzip body was a 400 blaming UTF-8 and nesting; a "br" header on a plain body was
    ignored (200)."""
    import gzip

    plain = b'{"question": "q"}'
    with serve() as c:
        for coding, body in (("gzip", gzip.compress(plain)), ("br", plain), ("GZIP", plain),
                             ("deflate, gzip", plain)):
            r = c.post("/v1/answer", content=body, headers={"content-type": "application/json",
                                                            "content-encoding": coding})
            err = assert_uniform_error(r, 415, "unsupported_media_type")
            assert f"encoded as {coding.lower()!r}" in err["message"]
            assert r.headers["accept-encoding"] == "identity"
        assert c.post("/v1/answer", content=plain, headers={
            "content-type": "application/json", "content-encoding": "identity"}).is_success
        assert c.get("/healthz", headers={"content-encoding": "gzip"}).is_success  # no body
        huge = b'{"question": "q", "top_k": 1' + b"0" * 5000 + b"}"
        r = c.post("/v1/answer", content=huge, headers={"content-type": "application/json"})
        assert "at most 4,300 digits" in assert_uniform_error(r, 400)["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/+json",
                                          None])
def test_bodies_not_declared_as_json_are_415(content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with serve() as c:
        for path, body in (("/v1/answer", b'{"question": "q"}'), ("/v1/search", b'{"query": "q"}'),
                           ("/v1/documents", b'{"text": "t"}')):
            r = c.post(path, content=body, headers=headers)
            err = assert_uniform_error(r, 415, "unsupported_media_type")
            assert "content-type: application/json" in err["message"]
        for declared in ("application/json; charset=utf-8", "application/problem+json"):
            r = c.post("/v1/search", content=b'{"query": "q"}', headers={"content-type": declared})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("declared", ["application/json", "application/json; charset=latin-1"])
def test_a_body_that_is_not_utf8_is_400_saying_so(declared: str) -> None:
    with serve() as c:
        for path in ("/v1/answer", "/v1/search", "/v1/documents"):
            r = c.post(path, content='{"question": "caf\xe9?"}'.encode("latin-1"),
                       headers={"content-type": declared})
            err = assert_uniform_error(r, 400, "bad_request")
            assert "UTF-8" in err["message"], err


def test_a_json_syntax_error_says_where_it_is() -> None:
    with serve() as c:
        r = c.post("/v1/answer", content=b'{"question": "a"}x',
                   headers={"content-type": "application/json"})
    err = assert_uniform_error(r, 422, "invalid_request")
    assert err["message"] == "body: not valid JSON at character 17 (Extra data)", err
    assert err["details"][0]["loc"] == ["body"]


def test_every_get_answers_head_too() -> None:
    """HEAD /v1/documents, /v1/documents/{id}, /metrics and /favicon.ico were 405, with an
    Allow naming GET alone."""
    with serve() as c:
        for path, status in (("/healthz", 200), ("/readyz", 200), ("/", 200), ("/documents", 200),
                             ("/v1/documents", 200), ("/v1/documents/d1", 200), ("/metrics", 200),
                             ("/favicon.ico", 204)):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code == status, path
            assert head.content == b"", path
            assert head.headers.get("content-type") == got.headers.get("content-type"), path
        assert c.head("/v1/documents/nope").status_code == 404
        r = c.put("/v1/documents/d1")
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {
            "DELETE", "GET", "HEAD"}
        paths = c.get("/openapi.json").json()["paths"]
        assert not any("head" in ops for ops in paths.values())  # GET documents them


@pytest.mark.parametrize("body", [{}, {"query": " "}, {"query": "q", "k": 0},
                                  {"query": "q", "k": 51}, {"query": "q", "extra": 1}])
def test_bad_search_bodies_are_422(body: Any) -> None:
    with serve() as c:
        assert_uniform_error(c.post("/v1/search", json=body), 422, "invalid_request")


def test_published_blank_pattern_and_the_server_agree_on_every_whitespace_character() -> None:
    """JSON Schema's \\s and Python's str.isspace() differ (\\x1d, \\x85, \\ufeff): a string the
    published pattern calls non-blank must be accepted, and a blank one refused, by both."""
    whitespace = {chr(c) for c in range(0x3001) if chr(c).isspace()} | {"\ufeff"}
    shown = {*range(0x600, 0x606), 0x6dd, 0x70f, 0x890, 0x891, 0x8e2}  # marks that are drawn
    invisible = {chr(c) for c in range(0x3001)
                 if unicodedata.category(chr(c)) == "Cf" and c not in shown}
    assert invisible == set(INVISIBLE_CHARS) and whitespace | invisible == set(BLANK_CHARS)
    whitespace |= invisible
    with serve() as c:
        for ch in sorted(whitespace):
            assert re.fullmatch(NOT_BLANK, ch * 3) is None
            assert_uniform_error(c.post("/v1/search", json={"query": ch * 3}), 422,
                                 "invalid_request")
            assert re.fullmatch(NOT_BLANK, f"{ch}q{ch}")
            assert c.post("/v1/search", json={"query": f"{ch}q{ch}"}).status_code == 200


def test_pattern_errors_say_what_is_wrong_not_the_regex() -> None:
    with serve() as c:
        for body in ({"question": "a\x00b"}, {"question": "\ufeff "}):
            msg = assert_uniform_error(c.post("/v1/answer", json=body), 422)["message"]
            assert msg == "question: must contain something other than whitespace and " \
                          "invisible characters, and no NUL character", msg


def test_validation_error_names_the_field() -> None:
    with serve() as c:
        err = assert_uniform_error(c.post("/v1/answer", json={"question": "q", "top_k": 99}), 422)
    assert err["message"].startswith("top_k:")
    assert err["details"][0]["loc"] == ["body", "top_k"]


def test_unknown_routes_methods_and_long_ids_get_uniform_errors() -> None:
    with serve() as c:
        assert_uniform_error(c.get("/nope"), 404, "not_found")
        assert_uniform_error(c.get("/v2/answer"), 404, "not_found")
        assert_uniform_error(c.get("/v1/answer"), 405, "method_not_allowed")
        assert_uniform_error(c.put("/v1/documents/d1"), 405, "method_not_allowed")
        assert_uniform_error(c.get("/v1/documents/" + "x" * 300), 422, "invalid_request")


def test_body_limit_from_content_length_and_while_reading_a_chunked_body() -> None:
    pipe = FakePipeline()
    with serve(pipe, max_body_bytes=1024) as c:
        big = json.dumps({"question": "q" * 2000}).encode()
        error = assert_uniform_error(c.post("/v1/answer", content=big,
                                            headers={"content-type": "application/json"}),
                                     413, "payload_too_large")
        assert "1024 bytes, this server's limit (CITEQA_MAX_BODY_BYTES)" in error["message"]
        # A generator body goes out chunked, without Content-Length.
        chunks = iter([big[:600], big[600:1200], big[1200:]])
        r = c.post("/v1/answer", content=chunks, headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_uniform_error(r, 413, "payload_too_large")
        # one byte over, chunked: refused; at the limit: read
        assert_uniform_error(c.post("/v1/answer", content=iter([b" " * 1000, b"x" * 25]),
                                    headers={"content-type": "application/json"}),
                             413, "payload_too_large")
        at_limit = json.dumps({"question": "q"}).encode().ljust(1024)  # (JSON allows the spaces)
        assert c.post("/v1/answer", content=iter([at_limit[:500], at_limit[500:]]),
                      headers={"content-type": "application/json"}).status_code == 200
        # Under the limit, chunked or not, is fine.
        ok = json.dumps({"question": "small"}).encode()
        assert c.post("/v1/answer", content=iter([ok[:5], ok[5:]]),
                      headers={"content-type": "application/json"}).status_code == 200
    assert [a.question for a in pipe.asked] == ["q", "small"]


# -- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidRequestError("question too vague", status=400), 400, "invalid_request"),
        (InvalidRequestError("bad"), 422, "invalid_request"),
        (BlockedURLError("private address"), 400, "blocked_url"),
        (FetchError("upstream 500"), 502, "fetch_failed"),
        (SourceError("binary file"), 422, "bad_source"),
        (IndexError_("index missing; run citeqa index"), 503, "index_unavailable"),
        (EmptyCorpusError("empty"), 503, "index_unavailable"),
        (ModelError("no weights"), 503, "model_unavailable"),
        (EngineUnavailableError("the generator is busy"), 503, "engine_unavailable"),
        (EngineError("the generator answered 500"), 502, "engine_error"),
        (OutputFormatError("no QUOTE line"), 500, "generation_failed"),
        (NotSupportedError("cannot change documents"), 501, "not_supported"),
        (ConfigError("bad preset"), 500, "config_error"),
        (CiteqaError("other"), 500, "internal_error"),
    ],
)
def test_pipeline_errors_map_to_http(exc: CiteqaError, status: int, code: str) -> None:
    assert map_citeqa_error(exc) == (status, code)
    with serve(FakePipeline(fail=exc), retry_after_s=7) as c:
        r = c.post("/v1/answer", json={"question": "q"})
    err = assert_uniform_error(r, status, code)
    assert err["message"] == str(exc)
    # an engine busy or restarting is worth asking again, as the service's own 503s say
    assert r.headers.get("retry-after") == ("7" if code == "engine_unavailable" else None)


@pytest.mark.parametrize(("asked", "said"), [(100.0, "100"), (2.5, "7"), (0.2, "7"),
                                              (1e9, "3600"), (math.inf, "3600"),
                                              (math.nan, "7"), (None, "7")])
def test_an_engines_own_retry_after_is_passed_on(asked: float | None, said: str) -> None:
    """An engine that asked to be left alone for 100 s: the service's 503 said 7 s."""
    busy = EngineUnavailableError("the generator is busy", retry_after_s=asked)
    with serve(FakePipeline(fail=busy), retry_after_s=7) as c:
        r = c.post("/v1/answer", json={"question": "q"})
    assert_uniform_error(r, 503, "engine_unavailable")
    assert r.headers["retry-after"] == said


def test_unexpected_errors_are_500_without_leaking_details(caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    secret = RuntimeError("secret at /home/me/.cache/weights")
    with caplog.at_level(logging.ERROR), serve(FakePipeline(fail=secret)) as c:
        r = c.post("/v1/answer", json={"question": "q"})
        metrics = c.get("/metrics").text
    assert_uniform_error(r, 500, "internal_error")
    assert "secret" not in r.text and "RuntimeError" not in r.text
    # answered inside the other middlewares: the security headers, no-store, and counted
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert re.search(r'citeqa_requests_total\{[^}]*status="500"[^}]*\} 1\.0', metrics), metrics
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and "unhandled error on POST /v1/answer" in caplog.text


def test_one_failing_request_in_an_ask_many_batch_does_not_fail_the_others() -> None:
    class Picky(FakePipeline):
        def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
            if any(a.question == "bad" for a in items):
                raise InvalidRequestError("bad question")
            return super().ask_many(items)

    outcomes = make_run_batch(Picky())([AskArgs("good"), AskArgs("bad")])
    assert isinstance(outcomes[0], Answer) and isinstance(outcomes[1], InvalidRequestError)


def test_a_batch_an_engine_cannot_take_now_is_not_asked_again_one_by_one() -> None:
    """An engine that answered 429 "for 100 s" was sent each request of the batch at once."""
    calls: list[int] = []
    busy = EngineUnavailableError("the generator is busy", retry_after_s=100.0)

    class Busy(FakePipeline):
        def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
            calls.append(len(items))
            raise busy

    outcomes = make_run_batch(Busy())([AskArgs("a"), AskArgs("b"), AskArgs("c")])
    assert calls == [3] and outcomes == [busy] * 3


# -- batching, backpressure, timeouts, cancellation -------------------------------------------


def test_concurrent_requests_are_batched_through_ask_many() -> None:
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    with serve(pipe, max_batch=4, window_ms=20, max_queue=16) as c:
        results: dict[int, httpx.Response] = {}

        def ask(i: int) -> None:
            results[i] = c.post("/v1/answer", json={"question": f"q{i}"})

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert pipe.started.wait(5)
        others = [threading.Thread(target=ask, args=(i,)) for i in range(1, 9)]
        for t in others:
            t.start()
        state = c.app.state.citeqa
        wait_until(lambda: state.batcher.depth == 8)
        gate.set()
        for t in [first, *others]:
            t.join(10)
        metrics = c.get("/metrics").text
    assert all(results[i].json()["question"] == f"q{i}" for i in range(9))
    assert pipe.batch_sizes == [1, 4, 4]
    assert samples(metrics)[("citeqa_batch_size_bucket", frozenset({("le", "4.0")}))] == 3


def test_full_queue_is_503_with_retry_after() -> None:
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    with serve(pipe, max_batch=1, window_ms=0, max_queue=1, retry_after_s=7) as c:
        state = c.app.state.citeqa
        threads = [threading.Thread(target=c.post, args=("/v1/answer",),
                                    kwargs={"json": {"question": f"q{i}"}}) for i in range(2)]
        threads[0].start()
        assert pipe.started.wait(5)
        threads[1].start()
        wait_until(lambda: state.batcher.depth == 1)
        r = c.post("/v1/answer", json={"question": "one too many"})
        gate.set()
        for t in threads:
            t.join(10)
    assert_uniform_error(r, 503, "overloaded")
    assert r.headers["retry-after"] == "7"
    assert "one too many" not in [a.question for a in pipe.asked]


def test_timeout_is_504_and_the_queued_request_never_runs() -> None:
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    with serve(pipe, max_batch=1, window_ms=0, request_timeout_s=0.2) as c:
        r1 = c.post("/v1/answer", json={"question": "first"})  # runs, then times out
        # the running one is told that nobody waits any more (its generation stops early)
        abandoned = pipe.asked[0].abandoned
        assert abandoned is not None and abandoned()
        r2 = c.post("/v1/answer", json={"question": "second"})  # queued, times out, cancelled
        gate.set()
        wait_until(lambda: not c.app.state.citeqa.batcher.busy)
        time.sleep(0.05)
        metrics = c.get("/metrics").text
    assert_uniform_error(r1, 504, "timeout")
    assert_uniform_error(r2, 504, "timeout")
    assert [a.question for a in pipe.asked] == ["first"]
    assert samples(metrics)[("citeqa_cancelled_total", frozenset())] == 1


def test_a_client_that_disconnects_has_its_queued_work_cancelled() -> None:
    """Raw ASGI call whose receive() reports http.disconnect while the request is queued."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    with serve(pipe, max_batch=1, window_ms=0, disconnect_poll_s=0.01) as c:
        app, state = c.app, c.app.state.citeqa
        blocker = threading.Thread(target=c.post, args=("/v1/answer",),
                                   kwargs={"json": {"question": "blocker"}})
        blocker.start()
        assert pipe.started.wait(5)
        sent: list[dict] = []

        async def leaving_client() -> None:
            body = json.dumps({"question": "gone"}).encode()
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                if messages:
                    return messages.pop(0)
                while state.batcher.depth == 0:  # leave once the request is queued
                    await asyncio.sleep(0.005)
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/v1/answer", "raw_path":
                     b"/v1/answer", "query_string": b"", "root_path": "",
                     "headers": [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 1), "server": ("testserver", 80),
                     "state": {}}
            await app(scope, receive, send)

        c.portal.call(leaving_client)
        gate.set()
        blocker.join(10)
        wait_until(lambda: not state.batcher.busy and state.batcher.depth == 0)
        blocker_left = pipe.asked[0].abandoned  # (before the shutdown, which stops all)
        assert blocker_left is not None and not blocker_left()  # answered: not abandoned
    assert sent[0]["status"] == 499
    assert [a.question for a in pipe.asked] == ["blocker"]


# -- authentication ---------------------------------------------------------------------------


def test_api_keys_guard_v1_only() -> None:
    with serve(api_keys="k1, k2") as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "k3"},
                        {"Authorization": "Basic k1"}, {"Authorization": "Bearer "},
                        {"Authorization": "Bearer k1k2"},
                        {"X-API-Key": "\xe9k1".encode("latin-1")}):
            r = c.post("/v1/answer", json={"question": "q"}, headers=headers)
            assert_uniform_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        assert_uniform_error(c.get("/v1/documents/d1"), 401, "unauthorized")
        assert_uniform_error(c.get("/v1/documents"), 401, "unauthorized")
        # Unauthenticated requests learn nothing about validation either.
        assert_uniform_error(c.post("/v1/answer", json={"bad": 1}), 401, "unauthorized")
        for body in (b'{"question": ', b'\xff\xfe'):  # not JSON; not UTF-8
            r = c.post("/v1/answer", content=body, headers={"content-type": "application/json"})
            assert_uniform_error(r, 401, "unauthorized")
        bad = c.post("/v1/answer", content=b'{"question": ', headers={
            "content-type": "application/json", "X-API-Key": "k1"})
        assert_uniform_error(bad, 422, "invalid_request")  # with a key: what is wrong
        ok = {"json": {"question": "q"}}
        assert c.post("/v1/answer", headers={"Authorization": "Bearer k2"}, **ok).is_success
        assert c.post("/v1/answer", headers={"authorization": "bearer k1"}, **ok).is_success
        assert c.post("/v1/answer", headers={"X-API-Key": "k1"}, **ok).is_success
        for other in ("", "wrong"):  # an empty or stale X-API-Key hid a right bearer key
            both = {"X-API-Key": other, "Authorization": "Bearer k2"}
            assert c.post("/v1/answer", headers=both, **ok).is_success
        for name, good, bad in (("Authorization", "Bearer k1", "Bearer nope"),
                                ("X-API-Key", "k1", "nope")):  # which would count?
            for twice in ([(name, good), (name, bad)], [(name, bad), (name, good)],
                          [(name, good), (name, good)]):
                r = c.post("/v1/answer", headers=twice, **ok)
                assert_uniform_error(r, 401, "unauthorized")
                assert "each header once" in r.json()["error"]["message"]
        for path in ("/", "/documents", "/document?id=d1", "/healthz", "/readyz",
                     "/openapi.json", "/metrics"):
            assert c.get(path).status_code == 200, path
        # the schema says so, for clients generated from it
        schema = c.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        assert schema["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                want = [{"bearer": []}, {"apiKey": []}] if path.startswith("/v1/") else None
                assert operation.get("security") == want, path
    with serve() as c:  # no keys: no security in the schema
        schema = c.get("/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})
        assert not any("security" in op for ops in schema["paths"].values()
                       for op in ops.values())


class ChangingPipeline(FakePipeline):
    """Records the changes it is asked to make (and makes none)."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[str] = []

    def add_documents(self, documents: Sequence[Document]) -> dict[str, int]:
        self.changes += [f"add {d.doc_id}" for d in documents]
        return {d.doc_id: 1 for d in documents}

    def delete_document(self, doc_id: str) -> None:
        self.changes.append(f"delete {doc_id}")


def test_read_keys_ask_and_read_but_never_change_the_index() -> None:
    pipe = ChangingPipeline()
    with serve(pipe, api_keys="w1", read_api_keys="r1, r2") as c:
        for key in ("r1", "r2", "w1"):
            for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
                assert c.post("/v1/answer", json={"question": "q"}, headers=headers).is_success
                assert c.post("/v1/search", json={"query": "q"}, headers=headers).is_success
                listed = c.get("/v1/documents", headers=headers)
                assert listed.json()["can_change"] is (key == "w1")  # what the page offers
                assert c.get("/v1/documents/d1", headers=headers).is_success
        doc = {"json": {"text": "Some text.", "doc_id": "new"}}
        for headers in ({"X-API-Key": "r1"}, {"Authorization": "Bearer r2"},
                        {"X-API-Key": "r1", "Authorization": "Bearer nope"}):
            err = assert_uniform_error(c.post("/v1/documents", headers=headers, **doc), 403,
                                       "forbidden")
            assert "CITEQA_API_KEYS" in err["message"]
            assert_uniform_error(c.delete("/v1/documents/d1", headers=headers), 403, "forbidden")
            # what is wrong with its body is not told to a key that may not post it
            assert_uniform_error(c.post("/v1/documents", headers=headers, json={"bad": 1}),
                                 403, "forbidden")
            r = c.post("/v1/documents", headers={**headers, "content-type": "application/json"},
                       content=b'{"text": ')
            assert_uniform_error(r, 403, "forbidden")
        for headers in ({}, {"X-API-Key": "r3"}):  # no key, a wrong one: 401 as before
            assert_uniform_error(c.post("/v1/documents", headers=headers, **doc), 401,
                                 "unauthorized")
            assert_uniform_error(c.delete("/v1/documents/d1", headers=headers), 401,
                                 "unauthorized")
        assert pipe.changes == []  # nothing reached the index
        assert c.post("/v1/documents", headers={"X-API-Key": "w1"}, **doc).status_code == 201
        assert c.delete("/v1/documents/new", headers={"Authorization": "Bearer w1"}
                        ).status_code == 204
        assert pipe.changes == ["add new", "delete new"]
        # the schema names the 403 on the changing routes, and the keys on every /v1 route
        schema = c.get("/openapi.json").json()
        assert "403" in schema["paths"]["/v1/documents"]["post"]["responses"]
        assert "403" in schema["paths"]["/v1/documents/{doc_id}"]["delete"]["responses"]
        assert "403" not in schema["paths"]["/v1/answer"]["post"]["responses"]
        assert schema["paths"]["/v1/answer"]["post"]["security"] == [{"bearer": []},
                                                                    {"apiKey": []}]


def test_a_delete_refused_for_its_body_changes_nothing_even_when_queued() -> None:
    """A chunked DELETE body over the limit is refused (413) before the delete is queued, and
    a queued change whose request fails for any reason is dropped, not run after its error."""
    gate = threading.Event()

    class Slow(ChangingPipeline):
        def delete_document(self, doc_id: str) -> None:
            if doc_id == "slow":
                assert gate.wait(10)
            super().delete_document(doc_id)

    pipe = Slow()
    with serve(pipe, max_body_bytes=1024, disconnect_poll_s=0.01) as c:
        first = threading.Thread(target=lambda: c.delete("/v1/documents/slow"))
        first.start()  # holds the single update thread
        wait_until(lambda: c.app.state.citeqa.pending_updates == 1)  # type: ignore[attr-defined]
        threading.Timer(0.5, gate.set).start()
        r = c.request("DELETE", "/v1/documents/victim", content=iter([b"x" * 600, b"x" * 600]))
        assert_uniform_error(r, 413, "payload_too_large")
        first.join(10)
        assert c.delete("/v1/documents/after").status_code == 204  # runs after any queued one
    assert pipe.changes == ["delete slow", "delete after"]


def test_read_keys_alone_make_a_service_no_request_can_change() -> None:
    pipe = ChangingPipeline()
    with serve(pipe, read_api_keys="r1") as c:
        assert_uniform_error(c.post("/v1/answer", json={"question": "q"}), 401, "unauthorized")
        assert c.post("/v1/answer", json={"question": "q"}, headers={"X-API-Key": "r1"}
                      ).is_success
        err = assert_uniform_error(c.post("/v1/documents", json={"text": "Some text."},
                                          headers={"X-API-Key": "r1"}), 403, "forbidden")
        assert "read keys only" in err["message"]
        assert_uniform_error(c.delete("/v1/documents/d1"), 401, "unauthorized")
        assert "securitySchemes" in c.get("/openapi.json").json()["components"]
    assert pipe.changes == []
    with serve(pipe) as c:  # no keys at all: anyone may change it, as before
        assert c.get("/v1/documents").json()["can_change"] is True
        assert c.delete("/v1/documents/d1").status_code == 204
    assert pipe.changes == ["delete d1"]


def test_key_helpers() -> None:
    keys = parse_api_keys(" a , ,bc,")
    assert keys == (b"a", b"bc")
    assert key_matches("bc", keys) and key_matches("a", keys)
    assert not key_matches("b", keys) and not key_matches("", keys)
    assert parse_api_keys("") == ()


# -- metrics ----------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser
    (so the text must be valid): (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, frozenset(smp.labels.items())): smp.value
            for family in text_string_to_metric_families(text) for smp in family.samples}


def test_the_schema_declares_the_headers_and_statuses_the_routes_send() -> None:
    """No response header was in the schema (Location, Retry-After, WWW-Authenticate), and a
    DELETE whose body stalls answers 408, which its operation did not list."""
    with serve() as c:
        paths = c.get("/openapi.json").json()["paths"]
    post = paths["/v1/documents"]["post"]["responses"]
    assert "Location" in post["201"]["headers"] and "content" in post["201"]
    for path, method in (("/v1/answer", "post"), ("/v1/search", "post"), ("/readyz", "get")):
        assert "Retry-After" in paths[path][method]["responses"]["503"]["headers"], path
    assert "WWW-Authenticate" in paths["/v1/answer"]["post"]["responses"]["401"]["headers"]
    assert "408" in paths["/v1/documents/{doc_id}"]["delete"]["responses"]


def test_readme_names_every_metric_the_service_exports() -> None:
    """README's /metrics row left out citeqa_answers_total and citeqa_cancelled_total."""
    from prometheus_client.parser import text_string_to_metric_families

    with serve() as c:
        text = c.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names, text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `GET /metrics` |"))
    exported = {n if n.endswith("_seconds") or n in ("citeqa_batch_size", "citeqa_queue_depth")
                else n + "_total" for n in names}  # the parser drops a counter's _total
    assert {n for n in exported if f"`{n}`" not in row} == set(), row


def test_metrics_count_requests_by_route_template_and_declines() -> None:
    with serve(max_body_bytes=1024) as c:
        c.post("/v1/answer", json={"question": "fine"})
        c.post("/v1/answer", json={"question": "decline this"})
        c.post("/v1/answer", json={"question": ""})
        c.post("/v1/answer", json={"question": "q" * 2000})  # refused before routing
        c.get("/v1/answer")  # no such method
        c.get("/v1/documents/d1")
        c.get("/v1/documents/zzz")
        c.get("/no/such/route")
        c.get("/openapi.json")
        text = c.get("/metrics").text
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(text)

    def requests(route: str, status: str) -> float:
        key = frozenset({("route", route), ("method", "POST" if "answer" in route else "GET"),
                         ("status", status)})
        return got[("citeqa_requests_total", key)]

    assert requests("/v1/answer", "200") == 2 and requests("/v1/answer", "422") == 1
    assert requests("/v1/answer", "413") == 1
    get_answer = frozenset({("route", "/v1/answer"), ("method", "GET"), ("status", "405")})
    assert got[("citeqa_requests_total", get_answer)] == 1
    assert requests("/v1/documents/{doc_id}", "404") == 1
    assert requests("unmatched", "404") == 1
    assert requests("/openapi.json", "200") == 1  # FastAPI's own route: a plain Starlette one
    assert got[("citeqa_declines_total", frozenset())] == 1
    assert got[("citeqa_answers_total", frozenset())] == 2
    assert got[("citeqa_queue_depth", frozenset())] == 0
    latency = got[("citeqa_request_duration_seconds_count", frozenset({("route", "/v1/answer")}))]
    assert latency == 5
    assert not any(name.endswith("_created") for name, _ in got)


def test_metrics_histogram_buckets_and_label_values_are_exposed_escaped() -> None:
    m = Metrics()
    for size in (1, 3, 3, 40):
        m.observe_batch(size, skipped=0)
    m.observe_batch(0, skipped=2)
    m.observe_request('/x"\\y', "GET", 200, 0.01)
    got = samples(m.render())
    bucket = {dict(k)["le"]: v for (name, k), v in got.items()
              if name == "citeqa_batch_size_bucket"}
    assert (bucket["1.0"], bucket["2.0"], bucket["4.0"], bucket["+Inf"]) == (1, 1, 3, 4)
    assert got[("citeqa_batch_size_sum", frozenset())] == 47
    assert got[("citeqa_cancelled_total", frozenset())] == 2
    key = frozenset({("route", '/x"\\y'), ("method", "GET"), ("status", "200")})
    assert got[("citeqa_requests_total", key)] == 1  # quote and backslash survive the round trip
    for reason in ("head_timeout", "silent", "head_timeout"):
        m.observe_closed(reason)
    got = samples(m.render())
    assert got[("citeqa_connections_closed_total", frozenset({("reason", "head_timeout")}))] == 2
    assert got[("citeqa_connections_closed_total", frozenset({("reason", "silent")}))] == 1


# -- the page and its headers -----------------------------------------------------------------


def test_index_page_is_self_contained_and_has_a_strict_csp() -> None:
    with serve() as c:
        r = c.get("/")
        api = c.get("/healthz")
    page = r.text
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == page_csp(page)
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", r.headers["content-security-policy"])
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no CDN, no fonts
    assert "@import" not in page and "url(" not in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink
    assert "<mark>" not in page and '"mark"' in page  # the quote is marked via DOM nodes
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    for answer in (r, api):  # no frame, no referrer, no sniffing, page or API
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
    assert "cache-control" not in api.headers


def test_v1_answers_are_never_cached() -> None:
    """A document's text or an answer kept by a browser or proxy cache, or handed to a caller
    with another key."""
    with serve() as c:
        for r in (c.get("/v1/documents"), c.get("/v1/documents/d1"),
                  c.post("/v1/answer", json={"question": "q"}), c.get("/v1/documents/nope")):
            assert r.headers["cache-control"] == "no-store", r.url
            assert r.headers["vary"] == "Authorization, X-API-Key"


def test_every_view_of_the_page_is_the_same_page_with_the_same_csp() -> None:
    with serve() as c:
        pages = [c.get(path) for path in ("/", "/documents", "/document?id=d1&start=0&end=3")]
    assert len({r.text for r in pages}) == 1
    assert len({r.headers["content-security-policy"] for r in pages}) == 1
    assert all(r.status_code == 200 and r.headers["cache-control"] == "no-cache" for r in pages)


def test_page_csp_hashes_each_inline_block() -> None:
    csp = page_csp("<style>a{}</style><script>1</script><script>2</script>")
    assert csp.count("'sha256-") == 3
    assert "script-src 'none'" in page_csp("<p>no scripts</p>")


PAGE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];
function node(tag) {  // the few DOM methods the page uses; no HTML parser at all
  return {tag, children: [], textContent: "", className: "", dataset: {}, hidden: false,
          append(...xs) { this.children.push(...xs); },
          replaceChildren(...xs) { this.children = xs; }, addEventListener() {},
          setAttribute() {}, removeAttribute() {}, focus() {}, value: ""};
}
const ids = {}, stored = {"citeqa.apiKey": "k-saved"};
const ctx = {document: {createElement: node, getElementById: id => ids[id] ??= node("div"),
                        querySelectorAll: () => [], addEventListener() {}},
             window: {addEventListener() {}, sessionStorage: {getItem: k => stored[k] ?? null}},
             location: {pathname: "/", search: ""},
             history: {}, URL, URLSearchParams};
vm.createContext(ctx);
vm.runInContext(script + "\nthis.passage = passage; this.safeUrl = safeUrl; " +
                "this.citation = citation; this.docHref = docHref;", ctx);
const show = c => typeof c === "string" ? c : {tag: c.tag, cls: c.className,
  text: c.children.length ? null : c.textContent, children: c.children.map(show)};
const text = "x".repeat(400) + "<b>before</b> QUOTE <i>A</i> <script>alert(1)</script>" +
             "y".repeat(400);
const start = text.indexOf("QUOTE"), end = text.indexOf(" <script>");
const quote = {text: text.slice(start, end), doc_id: "d/1", title: "<T>", source: "s",
               start, end};
const a = text.indexOf("<i>");
console.log(JSON.stringify({
  box: ctx.passage(Array.from(text), quote, a, a + 8).children.map(show),
  plain: ctx.passage(Array.from(text), quote, null, null).children.map(show)[1],
  outside: ctx.passage(Array.from(text), quote, 0, 5).children.map(show)[1],
  urls: ["javascript:alert(1)", "data:text/html,x", "/rel", "https://a.org/x"].map(ctx.safeUrl),
  href: ctx.docHref("d/1 &x", {start: 3, end: 9, answer_start: 4, answer_end: 6}),
  citation: ctx.citation("A", quote), key: ids.key.value}));
"""


def test_page_marks_the_quote_and_answer_with_dom_nodes_and_only_links_http_sources(
        tmp_path: Path) -> None:
    """Runs the page's own script under node with a stub DOM (skipped without node)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the page's script is not executed")
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_HARNESS)
    page = STATIC_DIR / "index.html"
    out = subprocess.run([node, str(harness), str(page)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    result = json.loads(out)
    before, mark, after = result["box"]
    assert mark == {"tag": "mark", "cls": "", "text": None, "children": [
        "QUOTE ", {"tag": "span", "cls": "ans", "text": "<i>A</i>", "children": []}, ""]}
    assert before.startswith("\u2026") and before.endswith("<b>before</b> ")  # kept as text
    assert after.startswith(" <script>alert(1)</script>") and after.endswith("\u2026")
    assert len(before) == 1 + 300 and len(after) == 300 + 1  # CONTEXT_CHARS either side
    # without an answer, or with one outside the quote (free mode), only the quote is marked
    assert result["plain"]["children"] == ["QUOTE <i>A</i>"]
    assert result["outside"]["children"] == ["QUOTE <i>A</i>"]
    assert result["urls"] == [None, None, None, "https://a.org/x"]
    assert result["key"] == "k-saved"  # the tab's saved API key is back after a reload
    assert result["href"] == ("/document?id=d%2F1+%26x&start=3&end=9&answer_start=4"
                              "&answer_end=6")
    start = 400 + len("<b>before</b> ")
    assert result["citation"].splitlines() == [
        "\u201cA\u201d", "Quote: \u201cQUOTE <i>A</i>\u201d",
        f"Source: <T>, s, characters {start}-{start + len('QUOTE <i>A</i>')} (document d/1)"]


def test_building_the_app_imports_no_model_code() -> None:
    """A fresh interpreter: ``create_app`` pulls in neither the pipeline nor torch, faiss or
    transformers (they load in the lifespan, off the event loop)."""
    code = textwrap.dedent("""
        import sys
        from citeqa.api import create_app
        from citeqa.config import Settings
        create_app(Settings())
        heavy = {"citeqa.pipeline", "torch", "transformers", "faiss", "llguidance"}
        print(sorted(heavy & set(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_default_factory_imports_the_pipeline_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("citeqa.pipeline")
    built: list[Settings] = []

    class Pipeline(FakePipeline):
        @classmethod
        def from_settings(cls, settings: Settings) -> Pipeline:
            built.append(settings)
            return cls()

        def warm_up(self) -> float:
            warmed.append(self)
            return 0.0

    warmed: list[Pipeline] = []
    module.Pipeline = Pipeline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "citeqa.pipeline", module)
    app = create_app(Settings())
    assert built == []  # nothing loads at create_app time
    with TestClient(app) as c:
        wait_until(lambda: app.state.citeqa.phase != "loading")
        assert c.get("/readyz").status_code == 200
    assert len(built) == 1 and len(warmed) == 1


# -- numbers are numbers; the schema declares every error the server sends (issue #16) ----------


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/answer", {"question": "q", "min_score": True}),
    ("/v1/answer", {"question": "q", "min_score": False}),
    ("/v1/answer", {"question": "q", "target_accuracy": True}),
    ("/v1/answer", {"question": "q", "top_k": True}),
    ("/v1/answer", {"question": "q", "n_candidates": False}),
    ("/v1/search", {"query": "q", "k": True}),
])
def test_booleans_are_not_numbers(path: str, body: dict[str, Any]) -> None:
    field = next(k for k in body if k not in ("question", "query"))
    with serve(CalibratedFakePipeline()) as c:
        err = assert_uniform_error(c.post(path, json=body), 422, "invalid_request")
    assert err["message"] == f"{field}: must be a number, not true or false", err


def test_numbers_in_strings_are_not_numbers() -> None:
    with serve() as c:
        for body in ({"question": "q", "min_score": "0.5"}, {"question": "q", "top_k": "3"}):
            assert_uniform_error(c.post("/v1/answer", json=body), 422, "invalid_request")
        assert c.post("/v1/answer", json={"question": "q", "min_score": 1}).status_code == 200
        assert c.post("/v1/answer", json={"question": "q", "top_k": 3.0}).status_code == 200


def test_openapi_declares_the_400s_of_unparsable_bodies() -> None:
    with serve() as c:
        spec = c.get("/openapi.json").json()
        for path in ("/v1/answer", "/v1/search"):
            assert "400" in spec["paths"][path]["post"]["responses"], path
            r = c.post(path, content=b'{"q": "\xff"}', headers={"content-type": "application/json"})
            assert_uniform_error(r, 400, "bad_request")


def test_405_allows_every_method_of_the_path() -> None:
    with serve() as c:
        for method in ("OPTIONS", "PUT", "PATCH"):
            r = c.request(method, "/v1/documents/d1")
            assert_uniform_error(r, 405, "method_not_allowed")
            assert r.headers["allow"] == "DELETE, GET, HEAD", r.headers
        r = c.request("OPTIONS", "/v1/answer")
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_allowed_hosts_refuse_other_host_headers() -> None:
    """DNS rebinding: a page on attacker.example re-pointed at 127.0.0.1 sends its own Host."""
    from citeqa.api.middleware import host_name

    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "127.0.0.1", "a.example.")
            ] == ["localhost", "[::1]", "127.0.0.1", "a.example"]
    with serve(allowed_hosts="localhost, 127.0.0.1,[::1]") as c:
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example"):
            r = c.delete("/v1/documents/d1", headers={"Host": host})
            err = assert_uniform_error(r, 400, "bad_host")
            assert "CITEQA_ALLOWED_HOSTS" in err["message"]
            assert r.headers["x-content-type-options"] == "nosniff"
            assert_uniform_error(c.get("/", headers={"Host": host}), 400, "bad_host")
        # the probes answer any Host (a container's health check asks 127.0.0.1 whatever the
        # service is allowed to answer to)
    with serve(allowed_hosts="citeqa.example.com") as c:
        for probe in ("/healthz", "/readyz"):
            assert c.get(probe, headers={"Host": "127.0.0.1:8000"}).status_code == 200, probe
        assert c.get("/metrics", headers={"Host": "127.0.0.1"}).status_code == 400
        for near in ("/healthzx", "/readyz/", "/v1/healthz", "/docz"):  # the probes exactly
            assert c.get(near, headers={"Host": "127.0.0.1"}).status_code == 400, near
    with serve(allowed_hosts="*") as c:
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 200
    # a list of no names is refused: "," answered every Host on a loopback address
    for empty in (",", " , "):
        with pytest.raises(ValidationError, match="lists no name"):
            Settings(allowed_hosts=empty)


def served_app() -> Any:
    """What `citeqa serve` needs of the app it serves, in a test that runs no server: the
    service's metrics (its HTTP protocol counts the connections it closes there)."""
    from types import SimpleNamespace

    return SimpleNamespace(state=SimpleNamespace(citeqa=SimpleNamespace(metrics=Metrics())))


def test_serve_on_loopback_answers_to_localhost_names_only(monkeypatch, tmp_path) -> None:
    """`citeqa serve` fills CITEQA_ALLOWED_HOSTS in when it binds a loopback address and the
    setting is unset; on another address, or with the setting given, it leaves it."""
    from typer.testing import CliRunner

    import citeqa.api as api
    import citeqa.api.server as server
    import citeqa.cli as cli

    seen: list[str] = []
    monkeypatch.setattr(api, "create_app", lambda s: seen.append(s.allowed_hosts) or served_app())
    monkeypatch.setattr(server, "run", lambda *a, **k: None)
    monkeypatch.setattr(cli, "open_index_dir", lambda index: None)
    monkeypatch.delenv("CITEQA_ALLOWED_HOSTS", raising=False)
    for args, env in ((["--host", "127.0.0.1"], {}), (["--host", "::1"], {}),
                      (["--host", "127.0.0.2"], {}), (["--host", "0.0.0.0"], {}),
                      (["--host", "127.0.0.1"], {"CITEQA_ALLOWED_HOSTS": "docs.lan"})):
        r = CliRunner().invoke(cli.app, ["serve", "--preset", "tiny", *args], env=env)
        assert r.exit_code == 0, r.output
    # the bound address too: clients of --host 127.0.0.2 send it as their Host
    assert seen == ["localhost,127.0.0.1,[::1]"] * 2 + [
        "localhost,127.0.0.1,[::1],127.0.0.2", "", "docs.lan"]


def test_serve_waits_for_requests_in_flight_at_most_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn waited for every request in flight (each up to its timeout) before the
    shutdown grace began: a container's stop period passed and it was killed mid-answer. Its
    own timeout now comes a margin after the service's grace (test below)."""
    from citeqa.api import server
    from citeqa.api.server import MARGIN_S, uvicorn_grace_s

    assert uvicorn_grace_s(7.5) == 8 + MARGIN_S and uvicorn_grace_s(0) == 1 + MARGIN_S
    # and `citeqa serve` runs the server that begins the grace at the stop, with that timeout
    built: list = []

    class Recorded(server._Server):
        def run(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
            built.append(self)
            self.started = True

    service = create_app(Settings(shutdown_grace_s=7.5), lambda s: FakePipeline())
    monkeypatch.setattr(server, "_Server", Recorded)
    monkeypatch.setattr(server.uvicorn.Server, "run", lambda self, sockets=None: None)  # (never
    server.run(service, host="127.0.0.1", port=0, http="h11")  # serves: any other server fails)
    [made] = built
    assert made.config.timeout_graceful_shutdown == uvicorn_grace_s(7.5)
    assert made.config.get_loop_factory() is server.loop_factory  # (failed accepts: below)


def test_a_stop_past_the_grace_answers_requests_in_flight_503_not_500() -> None:
    """Past the grace uvicorn cancelled every request in flight with a bare 500 (queued ones
    too), and only then did the service's own shutdown begin, waiting a second grace while the
    running batch went on: now the grace begins when the server is told to stop, and what is
    queued or running then gets the 503 shutting_down, in the service's error format."""
    import asyncio

    import httpx
    import uvicorn

    from citeqa.api.server import _Server, uvicorn_grace_s

    gate = threading.Event()  # the running batch never finishes by itself

    class StopsWhenAbandoned(FakePipeline):  # as the real backend: a stopped row is a decline
        def answer(self, a: AskArgs) -> Answer:
            self.asked.append(a)
            self.started.set()
            while not (a.abandoned is not None and a.abandoned()) and not gate.is_set():
                time.sleep(0.01)
            return Answer(a.question, True, None, None, None, reason="no candidate")

    pipe = StopsWhenAbandoned()
    service = create_app(Settings(window_ms=1, max_batch=1, shutdown_grace_s=0.5),
                         lambda s: pipe)
    server = _Server(uvicorn.Config(service, host="127.0.0.1", port=0, log_level="warning",
                                    timeout_graceful_shutdown=uvicorn_grace_s(0.5)), service)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        state = service.state.citeqa
        wait_until(lambda: server.started and state.phase == "ready")
        port = server.servers[0].sockets[0].getsockname()[1]
        got: list[httpx.Response] = []

        def ask() -> None:
            got.append(httpx.post(f"http://127.0.0.1:{port}/v1/answer", json={"question": "q"},
                                  timeout=30))

        askers = [threading.Thread(target=ask) for _ in range(2)]  # one runs, one is queued
        for a in askers:
            a.start()
        assert pipe.started.wait(5)
        wait_until(lambda: state.batcher.depth >= 1)
        t0 = time.monotonic()
        server.should_exit = True  # as SIGTERM does
        for a in askers:
            a.join(20)
        thread.join(20)
        assert not thread.is_alive() and time.monotonic() - t0 < 5  # (its margin is 5 s)
        assert [r.status_code for r in got] == [503, 503]
        assert all(r.json()["error"]["code"] == "shutting_down" for r in got)
    finally:
        gate.set()


def test_failed_accepts_are_reported_once_per_interval_with_their_count(caplog) -> None:
    """Out of file descriptors, Python 3.11's accept loop reports a failure for each of its
    2048 tries every second (96,000 tracebacks, 40 MB of log and a busy core in 22 s with
    `ulimit -n 64` and 100 idle clients): one line per interval, with the count, instead."""
    from citeqa.api.server import ACCEPT_FAILED, AcceptErrors

    now = [0.0]
    handler = AcceptErrors(every_s=10, clock=lambda: now[0])
    passed: list[dict] = []

    class Loop:
        def default_exception_handler(self, context: dict) -> None:
            passed.append(context)

    failed = {"message": ACCEPT_FAILED, "exception": OSError(24, "Too many open files")}
    with caplog.at_level("ERROR", logger="citeqa.api.server"):
        for _ in range(2048):
            handler(Loop(), failed)
        now[0] = 9.9
        handler(Loop(), failed)
        now[0] = 10.0
        handler(Loop(), failed)
        other = {"message": "Task exception was never retrieved"}
        handler(Loop(), other)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "Too many open files" in lines[0] and "ulimit -n" in lines[0]
    assert "1 tries since the last report" in lines[0]
    assert "2049 tries since the last report" in lines[1]
    assert passed == [other]  # anything else as before


def test_serve_raises_the_soft_open_files_limit_towards_the_hard_one() -> None:
    import resource

    from citeqa.api.server import raise_open_files_limit

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[1] != resource.RLIM_INFINITY and before[1] < 300:
        pytest.skip(f"the hard limit on open files is {before[1]}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, before[1]))
        raise_open_files_limit(most=300)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (300, before[1])
        raise_open_files_limit(most=250)  # never lowered
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 300
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


_OUT_OF_FDS = """
import asyncio, resource, sys, time
from citeqa.api.server import EventLoop
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
loop = EventLoop() if sys.argv[1] == "citeqa" else asyncio.SelectorEventLoop()
failed = []
loop.set_exception_handler(lambda _, context: failed.append(context.get("message")))

async def main():
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # the clients are connected
    cpu = time.process_time()
    await asyncio.sleep(3)
    print(len(failed), round(time.process_time() - cpu, 2), flush=True)

loop.run_until_complete(main())
"""


@pytest.mark.parametrize("loop", ["citeqa"])  # ("asyncio": ~20,000 tries and a busy core)
def test_a_server_out_of_file_descriptors_tries_to_accept_once_a_second(loop: str) -> None:
    """Python 3.11's accept loop, out of file descriptors, goes on for all its backlog's tries,
    each scheduling another retry: a core kept busy while connections wait."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _OUT_OF_FDS, loop], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    clients = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        for _ in range(60):  # past its 40 file descriptors
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        proc.stdin.write("\n")
        proc.stdin.flush()
        tries, cpu_s = proc.stdout.readline().split()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        for c in clients:
            c.close()
    assert 1 <= int(tries) <= 10 and float(cpu_s) < 1.0
