"""The REAL app end to end over the ``tiny`` preset (hash embedder, extractive generator): a
real index in tmp_path, the real Pipeline, batching through ask_many; no weights, no network."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import THREE_DOCS

from citeqa.api.app import create_app
from citeqa.config import Settings, preset
from citeqa.errors import ModelError
from citeqa.pipeline import WARM_UP_QUESTION, Pipeline
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Document

DOCS = THREE_DOCS


def build_tiny_index(directory: Path, docs: list[Document] = DOCS) -> Path:
    build_index_from_documents(docs, directory, preset("tiny").retrieval, progress=False)
    return directory


@contextmanager
def ready_client(tmp_path: Path) -> Iterator[TestClient]:
    index = build_tiny_index(tmp_path / "idx")
    settings = Settings(preset="tiny", index=index, cache_dir=tmp_path / "cache",
                        window_ms=50, max_batch=8)
    app = create_app(settings)
    with TestClient(app) as c:
        for _ in range(500):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.01)
        assert c.get("/readyz").status_code == 200, c.get("/readyz").json()
        yield c


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with ready_client(tmp_path) as c:
        yield c


def test_the_service_warms_up_before_it_reports_ready(tmp_path: Path, monkeypatch,
                                                      caplog) -> None:
    asked: list[str] = []
    real = Pipeline.ask_many
    monkeypatch.setattr(Pipeline, "ask_many",
                        lambda self, items: asked.extend(a.question for a in items)
                        or real(self, items))
    caplog.set_level(logging.INFO, logger="citeqa.api.app")
    with ready_client(tmp_path):
        assert asked == [WARM_UP_QUESTION]  # asked before /readyz said 200
    assert "warm-up question answered" in caplog.text


def test_a_failed_warm_up_is_logged_and_the_service_serves(tmp_path: Path, monkeypatch,
                                                           caplog) -> None:
    def fail(self: Pipeline) -> float:
        raise ModelError("the engine hiccuped")

    monkeypatch.setattr(Pipeline, "warm_up", fail)
    with ready_client(tmp_path) as c:
        r = c.post("/v1/answer", json={"question": "Who did Rollo swear fealty to?"})
        assert r.status_code == 200 and "Charles" in r.json()["answer"]
    assert "the warm-up question failed, serving anyway: the engine hiccuped" in caplog.text


def test_answer_quote_is_verbatim_in_the_document_served_by_the_api(client: TestClient) -> None:
    r = client.post("/v1/answer", json={"question": "Who did Rollo swear fealty to?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["declined"] is False, body["reason"]
    assert "Charles" in body["answer"]
    q = body["quote"]
    doc = client.get(f"/v1/documents/{q['doc_id']}").json()
    assert doc["doc_id"] == "normans" and doc["source"] == DOCS[0].source
    assert doc["text"][q["start"]:q["end"]] == q["text"]
    assert 0.0 < body["score"] <= 1.0
    assert body["timings_ms"]["total_ms"] > 0


def test_search_offsets_index_into_the_documents(client: TestClient) -> None:
    hits = client.post("/v1/search", json={"query": "Eiffel Tower Paris", "k": 3}).json()["hits"]
    assert hits and hits[0]["doc_id"] == "eiffel"
    for h in hits:
        text = client.get(f"/v1/documents/{h['doc_id']}").json()["text"]
        assert text[h["start"]:h["end"]] == h["text"]


def test_a_high_min_score_declines(client: TestClient) -> None:
    r = client.post("/v1/answer", json={"question": "When did the Eiffel Tower open?",
                                        "min_score": 1.0})
    body = r.json()
    assert r.status_code == 200 and body["declined"] is True
    assert body["answer"] is None and body["quote"] is None and "threshold" in body["reason"]


def test_concurrent_questions_are_batched_through_ask_many(client: TestClient) -> None:
    questions = ["Who did Rollo swear fealty to?", "When did the Eiffel Tower open?",
                 "When was Harvard University founded?"] * 4
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        bodies = list(pool.map(
            lambda q: client.post("/v1/answer", json={"question": q}).json(), questions))
    expected = {"Rollo": "normans", "Eiffel": "eiffel", "Harvard": "harvard"}
    for q, body in zip(questions, bodies, strict=True):
        assert body["question"] == q and not body["declined"], body
        assert body["quote"]["doc_id"] == next(v for k, v in expected.items() if k in q)
    metrics = client.get("/metrics").text
    # some batch held more than one request: the sum of sizes exceeds the number of batches
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line and not line.startswith("#"))
    count = float(samples["citeqa_batch_size_count"])
    total = float(samples["citeqa_batch_size_sum"])
    assert total == len(questions) and count < total
