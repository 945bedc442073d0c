"""Mutation leftovers (routes, batching, pipeline document updates, kv/lean): each test kills a
mutant the suite let survive."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_api import ChangingPipeline, assert_uniform_error, serve
from test_documents_api import client, index_dir, mock_fetcher  # noqa: F401 - fixtures

import citeqa.api.routes as routes
from citeqa.api.schemas import UrlDocumentIn
from citeqa.config import Settings
from citeqa.errors import InvalidRequestError
from citeqa.retrieval import Index


def test_a_fetched_page_of_exactly_the_document_limit_is_indexed_one_more_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """routes.url_document: a page may hold MAX_DOCUMENT_CHARS characters (as a posted text
    may: the schema's max_length), only more is refused."""
    fetcher = mock_fetcher()
    url = "https://moths.example/moths"
    size = len(fetcher.fetch(url).text)
    monkeypatch.setattr(routes, "MAX_DOCUMENT_CHARS", size)
    doc = routes.url_document(UrlDocumentIn(url=url), fetcher)
    assert len(doc.text) == size and doc.title == "Glimmer moths"
    monkeypatch.setattr(routes, "MAX_DOCUMENT_CHARS", size - 1)
    with pytest.raises(InvalidRequestError, match="over the"):
        routes.url_document(UrlDocumentIn(url=url), fetcher)


def test_the_location_of_an_added_document_keeps_the_slashes_and_colons_of_its_id(
        client: TestClient) -> None:  # noqa: F811 - the fixture
    """The 201's Location is the document's path as its id reads (``/`` and ``:`` as they are,
    not %2F and %3A, which a proxy may refuse or not decode: Apache's AllowEncodedSlashes)."""
    doc_id = "notes/2024.v2/a:b-c_d"
    r = client.post("/v1/documents", json={"text": "Kestrels hover over the old mill.",
                                           "doc_id": doc_id})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/documents/{doc_id}"


def test_a_delete_whose_body_is_over_the_limit_deletes_nothing_when_nothing_waits() -> None:
    """routes.delete_document reads the body before it queues the delete: with the update
    thread idle, a chunked body over the limit (413) must not delete the document first."""
    pipe = ChangingPipeline()
    with serve(pipe, max_body_bytes=1024, disconnect_poll_s=0.01) as c:
        r = c.request("DELETE", "/v1/documents/victim", content=iter([b"x" * 600, b"x" * 600]))
        assert_uniform_error(r, 413, "payload_too_large")
        assert c.delete("/v1/documents/after").status_code == 204
    assert pipe.changes == ["delete after"]


# -- kv.SystemPrefixCache ---------------------------------------------------------------------

def _prefix_cache(system: list[int]):  # type: ignore[no-untyped-def]
    from test_kv_stack import CONFIG

    from citeqa.generation.kv import SystemPrefixCache

    fed: list[list[int]] = []

    def decoder(*, input_ids: torch.Tensor, cache, use_cache: bool,  # type: ignore[no-untyped-def]
                position_ids: torch.Tensor | None = None) -> None:
        fed.append(input_ids[0].tolist())
        for layer in cache.layers:
            kv = torch.zeros(1, 1, input_ids.shape[1], 4)
            layer.update(kv, kv)

    return SystemPrefixCache(decoder, CONFIG, torch.device("cpu"), lambda m: list(system)), fed


def test_a_batch_prefix_is_computed_only_when_it_reaches_min_prefix_past_the_system_turn() -> None:
    """kv.batch_prefix: rows sharing fewer than MIN_PREFIX tokens past the system turn get no
    batch prefix (nothing run for it); MIN_PREFIX of them get one."""
    from citeqa.generation.kv import MIN_PREFIX

    system = list(range(10))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    kv, fed = _prefix_cache(system)
    short = [system + [50, 51, 52, 60, 70], system + [50, 51, 52, 61, 70]]
    assert kv.batch_prefix(messages, short) is None
    assert fed == [system]  # the system turn only
    shared = [30 + i for i in range(MIN_PREFIX)]
    rows = [system + shared + [60, 70], system + shared + [61, 70]]
    got = kv.batch_prefix(messages, rows)
    assert got is not None and got.tokens == system + shared
    assert fed == [system, shared]


# -- pipeline: an index directory left without its index -----------------------------------

def test_an_index_put_back_from_a_dead_writers_backup_is_not_called_missing_nor_unreadable(
        index_dir: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811 - fixture
    """Pipeline._say_if_absent: when recover_index puts a dead writer's backup back at the
    ABSENT_LOOKS-th look, the count starts again: no warning (neither "no index" nor "a
    manifest that cannot be read"), and no "holds an index again" at the next look."""
    from citeqa.pipeline import ABSENT_LOOKS, Pipeline

    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    served = pipeline.index_version
    index_dir.rename(index_dir.parent / f".{index_dir.name}.old-999999-0badcafe")
    with caplog.at_level(logging.INFO, logger="citeqa.pipeline"):
        for _ in range(ABSENT_LOOKS):
            assert pipeline.reload_index() is None
        assert Index.load(index_dir).version == served  # put back
        assert pipeline.reload_index() is None
        said = [r.getMessage() for r in caplog.records if r.name == "citeqa.pipeline"]
    assert not [m for m in said if "index directory" in m], said
