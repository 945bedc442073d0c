"""Live document updates: POST/DELETE /v1/documents on the REAL app (tiny preset), and
citeqa/retrieval/updates.py against a from-scratch build (the reference), under failures and
SIGKILL. No weights; URLs go to an httpx.MockTransport or to 127.0.0.1, never the internet."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import THREE_DOCS

from citeqa.api.app import create_app
from citeqa.config import RetrievalConfig, Settings, preset
from citeqa.errors import IndexError_, InvalidRequestError
from citeqa.ingest import Fetcher, FetchPolicy
from citeqa.retrieval import HashEmbedder, Index, build_index_from_documents
from citeqa.retrieval.updates import IndexUpdate, apply_update
from citeqa.types import Document

CFG = preset("tiny").retrieval
DOCS = THREE_DOCS[:2]
NEW_TEXT = ("The Zorblax telescope was installed on Mount Quillon in 1921. "
            "Its mirror was ground by Hedda Vantrum over eleven winters.")
PAGE_HTML = ("<html><head><title>Glimmer moths</title></head><body><p>Glimmer moths migrate "
             "across the Vessik plateau every spring, guided by polarised moonlight.</p>"
             "</body></html>")


def mock_fetcher(policy: FetchPolicy = FetchPolicy(), ip: str = "93.184.216.34") -> Fetcher:  # noqa: B008
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moths":
            return httpx.Response(200, headers={"Content-Type": "text/html; charset=utf-8"},
                                  text=PAGE_HTML)
        if request.url.path == "/moved":
            return httpx.Response(200, headers={"Content-Type": "text/html"}, text=(
                '<meta http-equiv="refresh" content="0;URL=/moths"><p>Moved.</p>'))
        return httpx.Response(404, text="no")

    return Fetcher(policy, transport=httpx.MockTransport(handler), resolver=lambda h, p: [ip])


@pytest.fixture()
def index_dir(tmp_path: Path) -> Path:
    build_index_from_documents(DOCS, tmp_path / "idx", CFG, progress=False)
    return tmp_path / "idx"


@pytest.fixture()
def client(index_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    with serve(index_dir, tmp_path) as c:
        yield c


def serve(index_dir: Path, tmp_path: Path, *, fetcher: Fetcher | None = None,
          allow_private_urls: bool = False, index_reload_s: float = 0.0) -> TestClient:
    settings = Settings(preset="tiny", index=index_dir, cache_dir=tmp_path / "cache",
                        allow_private_urls=allow_private_urls, window_ms=1,
                        index_reload_s=index_reload_s)
    app = create_app(settings, fetcher=fetcher or mock_fetcher())
    client = TestClient(app, raise_server_exceptions=False)

    class Ready:
        def __enter__(self) -> TestClient:
            client.__enter__()
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").json()
                time.sleep(0.01)
            return client

        def __exit__(self, *exc: object) -> None:
            client.__exit__(*exc)

    return Ready()  # type: ignore[return-value]


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def search_ids(client: TestClient, query: str) -> list[str]:
    r = client.post("/v1/search", json={"query": query, "k": 5})
    assert r.status_code == 200, r.text
    return [h["doc_id"] for h in r.json()["hits"]]


# -- the API ----------------------------------------------------------------------------------


def test_posted_text_is_searchable_answerable_and_persisted(client: TestClient,
                                                            index_dir: Path) -> None:
    assert "zorblax" not in search_ids(client, "Zorblax telescope")
    r = client.post("/v1/documents", json={"text": NEW_TEXT, "title": "Zorblax",
                                           "doc_id": "zorblax", "source": "notes/z.txt"})
    assert r.status_code == 201, r.text
    assert r.json() == {"doc_id": "zorblax", "title": "Zorblax", "source": "notes/z.txt",
                        "passages": 1}
    assert search_ids(client, "Zorblax telescope")[0] == "zorblax"
    ans = client.post("/v1/answer", json={"question": "Who ground the Zorblax mirror?"}).json()
    assert not ans["declined"] and ans["quote"]["doc_id"] == "zorblax", ans
    doc = client.get("/v1/documents/zorblax").json()
    assert doc["text"] == NEW_TEXT
    assert doc["text"][ans["quote"]["start"]:ans["quote"]["end"]] == ans["quote"]["text"]
    # on disk, complete and checksummed
    assert set(Index.load(index_dir).documents) == {"normans", "eiffel", "zorblax"}


def test_answers_name_the_index_version_they_came_from(index_dir: Path, tmp_path: Path) -> None:
    """An answer's quote offsets index into one version of the documents: the answer names it,
    /readyz gives the current one, an update makes a new one, and a restart keeps it."""
    question = {"question": "Who ground the Zorblax mirror?"}
    with serve(index_dir, tmp_path) as c:
        before = c.get("/readyz").json()["index_version"]
        assert before == Index.load(index_dir).version
        assert c.post("/v1/answer", json=question).json()["index_version"] == before
        r = c.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "zorblax"})
        assert r.status_code == 201, r.text
        after = c.get("/readyz").json()["index_version"]
        ans = c.post("/v1/answer", json=question).json()
        assert after != before and ans["index_version"] == after
        assert ans["quote"]["doc_id"] == "zorblax", ans
    assert Index.load(index_dir).version == after
    with serve(index_dir, tmp_path) as c:
        assert c.get("/readyz").json()["index_version"] == after


def test_a_posted_markdown_or_rst_text_is_titled_as_its_source_names(
        client: TestClient) -> None:
    """A posted text named as a Markdown or reStructuredText file was titled as plain text,
    while a build of that file titles it by its format."""
    md = "[![ci](https://ci.example/b.svg)](https://ci.example)\n\n# Wren notes\n\nWrens sing."
    r = client.post("/v1/documents", json={"text": md, "source": "notes/wrens.md"})
    assert r.status_code == 201 and r.json()["title"] == "Wren notes", r.text
    rst = ":orphan:\n\nFinch notes\n===========\n\nFinches sing."
    r = client.post("/v1/documents", json={"text": rst, "source": "https://x.org/finch.rst"})
    assert r.status_code == 201 and r.json()["title"] == "Finch notes", r.text
    r = client.post("/v1/documents", json={"text": md})  # no source: plain text's rules
    assert r.status_code == 201 and r.json()["title"] != "Wren notes", r.text


def test_defaults_for_doc_id_and_title(client: TestClient) -> None:
    r = client.post("/v1/documents", json={"text": "Quarrel birds nest in old chimneys.\nMore."})
    assert r.status_code == 201, r.text
    body = r.json()
    # a first line that is a sentence is no title (it would be indexed with every passage)
    assert body["title"] == body["doc_id"] and len(body["doc_id"]) == 16
    headed = client.post("/v1/documents", json={"text": "Quarrel birds\nThey nest in chimneys."})
    assert headed.status_code == 201 and headed.json()["title"] == "Quarrel birds"
    assert client.get(f"/v1/documents/{body['doc_id']}").status_code == 200
    # the same text again is the same default id: a conflict, not a second copy
    again = client.post("/v1/documents", json={"text": "Quarrel birds nest in old chimneys.\n"
                                                       "More."})
    assert again.status_code == 409 and again.json()["error"]["message"] == (
        "this text (with the same title and source) is already indexed, as document "
        f"{body['doc_id']!r}; nothing was added")  # not "choose another doc_id": none was given
    # a title no one sees (spaces, a zero-width space) is none: the default's, as a build's
    invisible = client.post("/v1/documents", json={"text": "\u200b\nWrens sing.", "title": " "})
    assert invisible.status_code == 201 and invisible.json()["title"] == invisible.json()[
        "doc_id"]  # not the zero-width space the text's first line is
    for blank in (" ", "\u200b", " \u2060\t"):
        r = client.post("/v1/documents", json={"text": f"Finches{blank!r}\nThey sing.",
                                               "title": blank, "source": blank})
        assert r.status_code == 201, r.text
        assert r.json()["title"] == f"Finches{blank!r}" and r.json()["source"] in ("", None)


@pytest.mark.parametrize("doc_id", ["notes/2024.v2/a:b-c_d...", "a" * 200, "x/y.../z."])
def test_a_chosen_id_with_parts_is_stored_and_read_back_by_it(client: TestClient,
                                                               doc_id: str) -> None:
    r = client.post("/v1/documents", json={"text": "Kestrels hover over the old mill.",
                                           "doc_id": doc_id})
    assert r.status_code == 201, r.text
    assert client.get(f"/v1/documents/{doc_id}").json()["doc_id"] == doc_id
    assert client.get(r.headers["location"]).json()["doc_id"] == doc_id  # the 201 names it


def test_duplicate_doc_id_is_409(client: TestClient) -> None:
    r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "normans"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert client.get("/v1/documents/normans").json()["text"] == DOCS[0].text


def test_a_change_the_disk_cannot_hold_is_507_and_loses_nothing(
        client: TestClient, index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or a read-only one) under an upload ended in a bare 500 "internal error"."""
    import errno

    import citeqa.pipeline

    def fails(errno_: int):  # type: ignore[no-untyped-def]
        def apply(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise OSError(errno_, os.strerror(errno_))
        return apply

    before = set(Index.load(index_dir).documents)
    for code, status, name in ((errno.ENOSPC, 507, "insufficient_storage"),
                               (errno.EROFS, 503, "index_not_writable")):
        monkeypatch.setattr(citeqa.pipeline, "apply_update", fails(code))
        r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "new"})
        assert r.status_code == status and r.json()["error"]["code"] == name, r.text
        assert "could not write the index" in r.json()["error"]["message"]
        assert "it is as it was" in r.json()["error"]["message"]
        assert client.delete("/v1/documents/eiffel").status_code == status
    assert set(Index.load(index_dir).documents) == before
    assert client.get("/v1/documents/new").status_code == 404
    assert "eiffel" in search_ids(client, "Eiffel Tower Paris")
    # a failure after the swap (a flush) leaves the change on disk: not said to be undone
    monkeypatch.setattr(citeqa.pipeline, "version_on_disk", lambda out: "another")
    r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "new"})
    assert r.status_code == 503 and "the change may be on disk" in r.json()["error"]["message"]


def test_a_write_error_without_errno_on_a_full_disk_is_507(
        client: TestClient, index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy says "N requested and M written" and FAISS names its file, neither with ENOSPC: a
    full disk was a 503 index_not_writable that showed the server's own paths."""
    import shutil

    import citeqa.retrieval.store

    def cut(directory, **parts):  # type: ignore[no-untyped-def]
        raise OSError(f"could not write the dense index {directory}/dense.faiss: write error")

    monkeypatch.setattr(citeqa.retrieval.store, "write_index", cut)
    monkeypatch.setattr("citeqa.atomic.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 10, 10))
    r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "new"})
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
    assert r.json()["error"]["message"] == (
        "could not write the index: No space left on device; it is as it was")
    assert client.get("/v1/documents/new").status_code == 404


def test_delete_is_204_then_404_and_persisted(client: TestClient, index_dir: Path) -> None:
    assert "eiffel" in search_ids(client, "Eiffel Tower Paris")
    assert client.delete("/v1/documents/eiffel").status_code == 204
    assert "eiffel" not in search_ids(client, "Eiffel Tower Paris")
    assert client.get("/v1/documents/eiffel").status_code == 404
    r = client.delete("/v1/documents/eiffel")
    assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found"
    assert set(Index.load(index_dir).documents) == {"normans"}
    # the last document cannot go: an index is never empty
    r = client.delete("/v1/documents/normans")
    assert r.status_code == 409, r.text
    assert set(Index.load(index_dir).documents) == {"normans"}


@pytest.mark.parametrize("path", ["eiffel%0A", "eiffel%0a%0a", "eif%0Afel", "%0Aeiffel",
                                  "eiffel%0D", "eiffel%00"])
def test_an_id_with_a_control_character_never_reaches_another_document(
        client: TestClient, index_dir: Path, path: str) -> None:
    """A newline at the end of an id used to vanish in route matching: DELETE eiffel%0A
    deleted "eiffel". Every such id is now refused as a whole, and nothing is lost."""
    for method in ("GET", "DELETE"):
        err = assert_error(client.request(method, f"/v1/documents/{path}"), 422)
        assert "control characters" in err["message"], err
    assert set(Index.load(index_dir).documents) == {"normans", "eiffel"}
    assert client.get("/v1/documents/eiffel").status_code == 200


def test_a_trailing_slash_reaches_the_list_as_elsewhere(client: TestClient) -> None:
    r = client.get("/v1/documents/", params={"limit": 1}, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/v1/documents?limit=1")
    assert client.get("/v1/documents/").json()["total"] == 2
    r = client.post("/v1/documents/", json={"text": NEW_TEXT, "doc_id": "slash"})
    assert r.status_code == 201, r.text


def test_a_server_that_cannot_change_documents_says_501(index_dir: Path, tmp_path: Path) -> None:
    with serve(index_dir, tmp_path) as c:
        c.app.state.citeqa.pipeline.retriever = ListlessRetriever()
        for r in (c.post("/v1/documents", json={"text": NEW_TEXT}),
                  c.delete("/v1/documents/eiffel"), c.get("/v1/documents")):
            err = assert_error(r, 501)
            assert err["code"] == "not_supported" and "serve an index directory" in err["message"]
    assert set(Index.load(index_dir).documents) == {"normans", "eiffel"}


def listed(client: TestClient, **page: int) -> dict:
    r = client.get("/v1/documents", params=page)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_list_follows_adds_and_deletes_in_index_order(client: TestClient) -> None:
    before = listed(client)
    assert before == {"documents": [{"doc_id": d.doc_id, "title": d.title, "source": d.source,
                                     "length": len(d.text)} for d in DOCS],
                      "total": 2, "offset": 0, "limit": 20, "can_change": True}
    client.post("/v1/documents", json={"text": NEW_TEXT, "title": "Zorblax", "doc_id": "z"})
    assert [d["doc_id"] for d in listed(client)["documents"]] == ["normans", "eiffel", "z"]
    assert listed(client, offset=2, limit=1)["documents"] == [
        {"doc_id": "z", "title": "Zorblax", "source": "", "length": len(NEW_TEXT)}]
    assert client.delete("/v1/documents/normans").status_code == 204
    after = listed(client, limit=1)
    assert [d["doc_id"] for d in after["documents"]] == ["eiffel"] and after["total"] == 2


def test_index_pages_are_slices_of_the_documents_in_order(index_dir: Path) -> None:
    index = Index.load(index_dir)
    ids = list(index.documents)
    for offset in range(4):
        for limit in range(4):
            page, total = index.list_documents(offset, limit)
            assert [d.doc_id for d in page] == ids[offset:offset + limit] and total == len(ids)
    assert index.list_documents(2**70, 5) == ([], len(ids))


class ListlessRetriever:  # a Retriever with search and document only
    def search(self, query: str, k: int = 10) -> list:
        return []

    def document(self, doc_id: str) -> Document:
        raise KeyError(doc_id)


def test_the_pipeline_lists_documents_of_an_index_only(index_dir: Path, tmp_path: Path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.pipeline import Pipeline

    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir,
                                               cache_dir=tmp_path / "cache"))
    assert pipeline.list_documents(1, 5) == ([DOCS[1]], 2)
    for offset, limit in ((-1, 5), (0, 0), (1.5, 2), ("0", 5), (None, None), (0, True)):
        with pytest.raises(InvalidRequestError, match="offset must be a whole number from 0"):
            pipeline.list_documents(offset, limit)  # type: ignore[arg-type]
    assert pipeline.list_documents(np.int64(1), np.int32(5)) == ([DOCS[1]], 2)
    with pytest.raises(InvalidRequestError, match="a list of citeqa.AskArgs"):
        pipeline.ask_many(["When?"])  # type: ignore[list-item]
    with pipeline as same:  # a context manager, closing on the way out
        assert same is pipeline

    bare = Pipeline(ListlessRetriever(), pipeline.generator, pipeline.cfg)
    with pytest.raises(ConfigError, match="cannot list its documents"):
        bare.list_documents()


def test_changes_survive_a_restart(index_dir: Path, tmp_path: Path) -> None:
    with serve(index_dir, tmp_path) as c:
        assert c.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "z"}).status_code == 201
        assert c.delete("/v1/documents/eiffel").status_code == 204
    with serve(index_dir, tmp_path) as c:
        assert search_ids(c, "Zorblax telescope")[0] == "z"
        assert c.get("/v1/documents/eiffel").status_code == 404


def test_url_is_fetched_and_indexed(client: TestClient) -> None:
    r = client.post("/v1/documents", json={"url": "https://moths.example/moths"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["title"] == "Glimmer moths" and body["source"] == "https://moths.example/moths"
    assert search_ids(client, "glimmer moths plateau")[0] == body["doc_id"]
    assert client.post("/v1/documents", json={"url": "https://moths.example/none"}
                       ).json()["error"]["code"] == "fetch_failed"
    err = assert_error(client.post("/v1/documents", json={"url": "https://moths.example/moved"}),
                       422)  # (a page that only redirects: its target is said)
    assert "only redirects to https://moths.example/moths (a meta refresh)" in err["message"]


def test_a_page_is_indexed_once_whatever_spelling_of_its_url(client: TestClient) -> None:
    """The id is made from the URL as written: another spelling of it (case, a fragment)
    reached the same page and indexed it again, under another id."""
    first = client.post("/v1/documents", json={"url": "https://moths.example/moths"})
    assert first.status_code == 201, first.text
    held = first.json()["doc_id"]
    for again in ("HTTPS://MOTHS.EXAMPLE/moths", "https://moths.example/moths#spring",
                  "https://moths.example:443/moths", "https://moths.example./moths",
                  "https://moths.example/%6Doths"):
        err = assert_error(client.post("/v1/documents", json={"url": again}), 409)
        assert err["code"] == "conflict"
        assert err["message"] == ("a document from this page (https://moths.example/moths) "
                                  f"is already indexed, as document {held!r}; nothing was added")
    # the very same URL: the id it makes is taken, said as before
    err = assert_error(client.post("/v1/documents", json={"url": "https://moths.example/moths"}),
                       409)
    assert f"this URL is already indexed, as document {held!r}" in err["message"]
    assert [d["doc_id"] for d in listed(client, limit=100)["documents"]].count(held) == 1
    assert listed(client, limit=100)["total"] == len(DOCS) + 1
    # an id of the caller's own choosing is a second copy asked for
    r = client.post("/v1/documents", json={"url": "https://moths.example/moths#x",
                                           "doc_id": "moths-copy"})
    assert r.status_code == 201, r.text


def test_a_chosen_id_cannot_claim_a_page_before_it_is_added(client: TestClient) -> None:
    """A text posted with the id citeqa would make for a URL (an unsalted hash) sat there when
    that URL was added: 409 "already indexed", and answers quoted the text as that page."""
    from citeqa.ingest import doc_id_for

    url = "https://moths.example/moths"
    claim = client.post("/v1/documents", json={"text": "Moths eat stars.", "doc_id":
                                               doc_id_for(url), "source": url})
    assert claim.status_code == 422 and "the ids citeqa makes" in claim.json()["error"]["message"]
    other = client.post("/v1/documents", json={"url": "https://moths.example/none",
                                               "doc_id": doc_id_for(url)})
    assert other.status_code == 422  # refused before fetching
    r = client.post("/v1/documents", json={"url": url, "doc_id": doc_id_for(url)})
    assert r.status_code == 201 and r.json()["title"] == "Glimmer moths"  # its own id: fine


def test_a_page_over_the_document_limit_is_refused_as_a_posted_text_is(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A posted text is held to MAX_DOCUMENT_CHARS; a fetched page was not (a 3 MB one was
    indexed as 7,500 passages)."""
    import citeqa.api.routes as routes

    monkeypatch.setattr(routes, "MAX_DOCUMENT_CHARS", 40)  # the page's text is longer
    r = client.post("/v1/documents", json={"url": "https://moths.example/moths"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "characters of text, over the 40 a document may hold" in r.json()["error"]["message"]
    assert client.get("/v1/documents").json()["total"] == len(DOCS)  # nothing added


def test_private_urls_are_blocked_unless_allowed(index_dir: Path, tmp_path: Path) -> None:
    with serve(index_dir, tmp_path, fetcher=mock_fetcher(ip="10.0.0.5")) as c:
        r = c.post("/v1/documents", json={"url": "https://intranet.example/moths"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "blocked_url"
    allowed = mock_fetcher(FetchPolicy(allow_private=True), ip="10.0.0.5")
    with serve(index_dir, tmp_path, fetcher=allowed) as c:
        assert c.post("/v1/documents",
                      json={"url": "https://intranet.example/moths"}).status_code == 201


def test_the_default_fetcher_follows_allow_private_urls(index_dir: Path, tmp_path: Path) -> None:
    """No fetcher injected: the app builds one from settings. Port 9 on 127.0.0.1 (discard)
    refuses; nothing leaves the machine."""
    for allow, status in ((False, 400), (True, 502)):
        settings = Settings(preset="tiny", index=index_dir, allow_private_urls=allow)
        with TestClient(create_app(settings)) as c:
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = c.post("/v1/documents", json={"url": "http://127.0.0.1:9/x"})
            assert r.status_code == status, r.text


@pytest.mark.parametrize("body", [
    {}, {"text": ""}, {"text": "   "}, {"text": "a", "url": "https://x.org/"},
    {"url": "ftp://x.org/a"}, {"text": "a", "doc_id": "has space"}, {"text": "a", "doc_id": ""},
    {"text": "a\u0000b"}, {"text": "a", "extra": 1}, {"url": "https://x.org/", "title": "t"},
    *({"text": "a", "doc_id": bad} for bad in ("a/../b", "a/./b", "a/", "a//b", ".x", "x" * 201)),
    {"url": "https://x.org/", "doc_id": "p/.."},
])
def test_bad_document_bodies_are_422(client: TestClient, body: dict) -> None:
    r = client.post("/v1/documents", json=body)
    assert r.status_code == 422, r.text


def test_searches_during_updates_see_a_whole_index(client: TestClient) -> None:
    stop, searching = threading.Event(), threading.Event()
    problems: list[str] = []
    checked: list[str] = []  # hits compared with their documents

    def search_forever() -> None:
        while not stop.is_set():
            r = client.post("/v1/search", json={"query": "tower telescope Normans", "k": 10})
            if r.status_code != 200:
                problems.append(r.text)
                continue
            for h in r.json()["hits"]:
                text = client.get(f"/v1/documents/{h['doc_id']}").json()["text"]
                if text[h["start"]:h["end"]] != h["text"]:
                    problems.append(f"bad hit {h}")
                checked.append(h["doc_id"])
            searching.set()

    thread = threading.Thread(target=search_forever)
    thread.start()
    try:
        assert searching.wait(30)  # the updates below start while searches run
        for i in range(8):
            r = client.post("/v1/documents", json={"text": f"Tower number {i}. " + NEW_TEXT,
                                                   "doc_id": f"t{i}"})
            assert r.status_code == 201, r.text
    finally:
        stop.set()
        thread.join(10)
    assert problems == [] and checked
    assert len(search_ids(client, "Zorblax telescope")) == 5


def test_a_failed_update_changes_nothing(client: TestClient, index_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.retrieval.store as store

    manifest_before = (index_dir / "manifest.json").read_text()

    def broken_publish(tmp: Path, out: Path) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(store, "publish", broken_publish)
    r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "z"})
    assert r.status_code == 500 and "disk full" not in r.text
    assert (index_dir / "manifest.json").read_text() == manifest_before
    assert client.get("/v1/documents/z").status_code == 404
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".idx.")]
    monkeypatch.undo()
    assert client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "z"}).status_code == 201


# -- updates.py against the reference (a fresh build of the same documents) --------------------


QUERIES = ["Zorblax telescope mirror", "Eiffel tower Paris", "Normans Rollo", "the of a"]


def _bm25_arrays(index: Index) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(index.bm25, name))
            for name in ("indptr", "doc_ids", "tf", "idf", "doc_len", "counts")}


def assert_same_search(got: Index, ref: Index, *, same_layout: bool) -> None:
    """``got`` (an updated index) and ``ref`` (a fresh build of the same documents) hold the
    same documents, passages, vectors and BM25 scores; with ``same_layout`` their BM25 arrays
    too (an index that only grew keeps its vocabulary order: a fresh build's)."""
    assert list(got.documents.values()) == list(ref.documents.values())
    assert got.passages == ref.passages
    assert sorted(got.bm25.vocab) == sorted(ref.bm25.vocab)
    assert got.bm25.params == pytest.approx(ref.bm25.params)
    for q in QUERIES:
        tokens = q.lower().split()
        np.testing.assert_allclose(got.bm25.scores(tokens), ref.bm25.scores(tokens), rtol=1e-12)
    if same_layout:
        assert got.bm25.vocab == ref.bm25.vocab
        for name, array in _bm25_arrays(ref).items():
            np.testing.assert_array_equal(_bm25_arrays(got)[name], array, err_msg=name)
    assert got.dense is not None and ref.dense is not None
    np.testing.assert_allclose(got.dense.vectors(), ref.dense.vectors(), atol=1e-6)
    assert got.manifest["counts"] == ref.manifest["counts"]
    assert got.manifest["embedding"] == ref.manifest["embedding"]


class CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def embed(self, texts, **kw):  # type: ignore[no-untyped-def]
        self.seen.extend(texts)
        return super().embed(texts, **kw)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_update_equals_a_fresh_build_and_reuses_vectors(tmp_path: Path, kind: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.retrieval.updates as updates
    from citeqa.retrieval.dense import DenseIndex, DenseSpec

    tokenized: list[str] = []
    real_tokenize = updates.tokenize
    monkeypatch.setattr(updates, "tokenize", lambda t: tokenized.append(t) or real_tokenize(t))

    spec = DenseSpec(kind=kind, nlist=2) if kind == "ivf" else DenseSpec(kind=kind)  # type: ignore[arg-type]
    base = tmp_path / "base"
    build_index_from_documents(DOCS, base, CFG, progress=False, dense_spec=spec)
    new_doc = Document("z", "Zorblax", "z.txt", NEW_TEXT * 8)  # several passages
    ref_spec = Index.load(base).dense.spec  # type: ignore[union-attr]  # IVF: its cells as built

    # only grown: the old rows are extended, not built again; BM25 from the stored counts
    emb = CountingEmbedder()
    with monkeypatch.context() as m:
        m.setattr(DenseIndex, "rebuilt", None)  # an index that only grew is not built again
        grown = apply_update(Index.load(base), IndexUpdate(add=(new_doc,)), base, embedder=emb)
    assert len(emb.seen) == grown.added_passages["z"] > 1  # only the new passages embedded
    assert tokenized == emb.seen  # and tokenized
    ref_dir = tmp_path / "ref"
    build_index_from_documents([*DOCS, new_doc], ref_dir, CFG, progress=False,
                               dense_spec=ref_spec)
    for idx in (Index.load(base), grown.index):
        assert_same_search(idx, Index.load(ref_dir), same_layout=True)

    # a removal and an addition: same search, the vocabulary perhaps in another order
    other = Document("y", "Yarrow", "y.txt", "Yarrow grows by the Vessik river in spring.")
    result = apply_update(Index.load(base), IndexUpdate(add=(other,), remove=("normans",)),
                          base, embedder=emb)
    ref2 = tmp_path / "ref2"
    build_index_from_documents([DOCS[1], new_doc, other], ref2, CFG, progress=False,
                               dense_spec=ref_spec)
    for idx in (Index.load(base), result.index):
        assert_same_search(idx, Index.load(ref2), same_layout=False)


def test_an_index_without_stored_counts_is_tokenized_again(tmp_path: Path) -> None:
    """Indexes written before counts.npy: an update tokenizes every passage, and writes the
    counts from then on."""
    import json as _json

    base = tmp_path / "base"
    build_index_from_documents(DOCS, base, CFG, progress=False)
    (base / "bm25" / "counts.npy").unlink()
    manifest = _json.loads((base / "manifest.json").read_text())
    del manifest["files"]["bm25/counts.npy"]
    (base / "manifest.json").write_text(_json.dumps(manifest))
    old = Index.load(base)
    assert old.bm25.counts is None
    new_doc = Document("z", "Zorblax", "z.txt", NEW_TEXT)
    apply_update(old, IndexUpdate(add=(new_doc,)), base, embedder=HashEmbedder())
    ref_dir = tmp_path / "ref"
    build_index_from_documents([*DOCS, new_doc], ref_dir, CFG, progress=False)
    assert_same_search(Index.load(base), Index.load(ref_dir), same_layout=True)


def test_update_checks(tmp_path: Path) -> None:
    build_index_from_documents(DOCS, tmp_path / "i", CFG, progress=False)
    idx = Index.load(tmp_path / "i")
    cases = [
        (IndexUpdate(remove=("nope",)), 404, "no document with id 'nope'"),
        (IndexUpdate(add=(DOCS[0],)), 409, "already exists"),
        (IndexUpdate(add=(Document("a", "", "", "x"), Document("a", "", "", "y"))), 409,
         "two documents to add have the id 'a'"),
        (IndexUpdate(remove=("normans", "eiffel")), 409, "at least one document"),
        (IndexUpdate(add=(Document("b", "", "", "  "),)), 422, "has no text"),
        (IndexUpdate(add=(Document("z", "", "", "\u200b\u200b"),)), 422, "has no text"),
    ]
    for update, status, says in cases:
        with pytest.raises(InvalidRequestError, match=says) as info:
            apply_update(idx, update, tmp_path / "i", embedder=HashEmbedder())
        assert info.value.status == status, update
    with pytest.raises(IndexError_, match=r"embedded with hash-bow-256 \(dim 256\), not "
                       r"hash-bow-64 \(dim 64\)"):
        apply_update(idx, IndexUpdate(add=(Document("c", "", "", "Moths fly."),)), tmp_path / "i",
                     embedder=HashEmbedder(dim=64))
    # replacing a document (remove + add of the same id) is allowed
    doc = Document("normans", "Normans", "n2.txt", "Normandy is in France.")
    res = apply_update(idx, IndexUpdate(add=(doc,), remove=("normans",)), tmp_path / "i",
                       embedder=HashEmbedder())
    assert res.index.documents["normans"].text == "Normandy is in France."


_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from citeqa.retrieval import HashEmbedder, Index
    from citeqa.retrieval.updates import IndexUpdate, apply_update
    from citeqa.types import Document
    out = Path(sys.argv[1])
    doc = Document("z", "Zorblax", "z.txt", "The Zorblax telescope sits on Mount Quillon.")
    apply_update(Index.load(out), IndexUpdate(add=(doc,)), out, embedder=HashEmbedder())
    """
)


@pytest.mark.parametrize("stage", ["before_swap", "mid_swap"])
def test_sigkill_mid_update_keeps_the_old_index(index_dir: Path, stage: str) -> None:
    env = {**os.environ, "CITEQA_TEST_PAUSE_AT": stage, "CITEQA_TEST_PAUSE_S": "60"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(index_dir)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None
        for line in child.stderr:  # blocks until the child reports its pause
            if line.strip() == f"citeqa-test-pause {stage}":
                break
        else:
            pytest.fail(f"the update exited without pausing at {stage} (rc {child.wait()})")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert set(Index.load(index_dir).documents) == {"normans", "eiffel"}  # old, complete
    # the next update restores and cleans up, then applies
    res = apply_update(Index.load(index_dir), IndexUpdate(remove=("eiffel",)), index_dir)
    assert set(res.index.documents) == {"normans"}
    assert set(Index.load(index_dir).documents) == {"normans"}
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".idx.")]


# -- URL errors say what is wrong with the URL (issue #16) -------------------------------------


@pytest.mark.parametrize(("body", "says"), [
    ({"url": "ftp://x.org/a"}, "url: must be an http(s) URL"),
    ({"url": "https://bücher.example/moths"}, "punycode"),
    ({"url": "https://x.org/ a"}, "url: must be an http(s) URL"),
    ({"url": 5}, "url: Input should be a valid string"),
    ({"url": "https://moths.example/moths", "text": "a"}, "text or a url, not both"),
    ({}, "body: send the document's text, or a url for the service to fetch"),
    ({"title": "t"}, "body: send the document's text, or a url for the service to fetch"),
])
def test_bad_document_bodies_say_what_is_wrong(client: TestClient, body: dict, says: str) -> None:
    r = client.post("/v1/documents", json=body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert says in message and "DocumentIn" not in message, message
    assert "Value error" not in message  # our words, without pydantic's tag


def _gaierror(errno: int, text: str) -> Fetcher:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(errno, text)

    return Fetcher(FetchPolicy(), resolver=resolver,
                   transport=httpx.MockTransport(lambda r: httpx.Response(500)))


@pytest.mark.parametrize("url", ["https://a..b/moths", "https://exa%20mple.org/",
                                 "https://" + "x" * 64 + ".org/", "https://-/", "http:///x",
                                 "https://1.2.3.4.5/"])
def test_a_malformed_host_is_422_bad_url(index_dir: Path, tmp_path: Path, url: str) -> None:
    with serve(index_dir, tmp_path) as c:
        r = c.post("/v1/documents", json={"url": url})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_url", r.text


def test_an_unresolvable_host_is_422_but_a_failing_resolver_is_502(index_dir: Path,
                                                                    tmp_path: Path) -> None:
    body = {"url": "https://nowhere.example/moths"}
    fetcher = _gaierror(socket.EAI_NONAME, "Name or service not known")
    with serve(index_dir, tmp_path, fetcher=fetcher) as c:
        r = c.post("/v1/documents", json=body)
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "bad_url", r.text
    assert "does not exist" in err["message"] and "nowhere.example" in err["message"]
    # DNS that cannot answer now is not the caller's mistake
    with serve(index_dir, tmp_path, fetcher=_gaierror(socket.EAI_AGAIN, "try again")) as c:
        r = c.post("/v1/documents", json=body)
    assert r.status_code == 502 and r.json()["error"]["code"] == "fetch_failed", r.text


def test_an_update_shutdown_dropped_is_a_503_not_a_dropped_connection() -> None:
    """Shutdown cancels queued updates (``cancel_futures``): their requests get a 503 saying
    so, as questions do, rather than a cancelled handler and a closed connection."""
    import asyncio
    from concurrent.futures import Future

    from citeqa.api.deps import ServiceState
    from citeqa.api.errors import ApiError
    from citeqa.api.routes import run_update

    class Dropping:
        def submit(self, fn: object, *args: object) -> Future:
            fut: Future = Future()
            fut.cancel()
            return fut

    state = ServiceState(settings=Settings(preset="tiny"), updater=Dropping(),  # type: ignore[arg-type]
                         phase="shutting_down")
    with pytest.raises(ApiError) as info:
        asyncio.run(run_update(state, print))
    assert (info.value.status, info.value.code) == (503, "shutting_down")


def test_a_request_cancelled_while_its_update_waits_stays_cancelled() -> None:
    """Only shutdown's dropping of a queued update is a 503: a request whose own task is
    cancelled (its client went away) is cancelled, not told the service is loading."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from citeqa.api.deps import ServiceState
    from citeqa.api.routes import run_update

    gate = threading.Event()
    updater = ThreadPoolExecutor(1)
    updater.submit(gate.wait, 5)  # a slow update ahead of ours
    state = ServiceState(settings=Settings(preset="tiny"), updater=updater, phase="ready")

    async def main() -> None:
        task = asyncio.create_task(run_update(state, print))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        gate.set()
        updater.shutdown(wait=True)


def test_too_many_waiting_updates_or_fetches_are_a_503(client: TestClient) -> None:
    """Each update may rebuild a large index and each fetch holds a thread for up to its
    deadline: past the limits a caller is told to retry, and nothing is added."""
    state = client.app.state.citeqa  # type: ignore[attr-defined]
    state.pending_updates = state.settings.max_pending_updates
    try:
        r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "late"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert "document updates are waiting" in r.text and "Retry-After" in r.headers
        assert client.delete("/v1/documents/" + DOCS[0].doc_id).status_code == 503
        fetched: list[str] = []  # a URL is refused before it is fetched, not after
        real_fetch = state.fetcher.fetch
        state.fetcher.fetch = lambda url: fetched.append(url) or real_fetch(url)
        r = client.post("/v1/documents", json={"url": "https://moths.example/moths"})
        assert r.status_code == 503 and fetched == []
    finally:
        state.pending_updates = 0
        state.fetcher.fetch = real_fetch
    state.running["URL fetches"] = state.settings.max_fetches
    try:
        r = client.post("/v1/documents", json={"url": "https://example.org/moths"})
        assert r.status_code == 503 and "URL fetches are at their limit" in r.text, r.text
    finally:
        state.running["URL fetches"] = 0
    assert client.get("/v1/documents/late").status_code == 404
    assert client.post("/v1/documents", json={"url": "https://example.org/moths"}
                       ).status_code == 201
    assert (state.pending_updates, state.running["URL fetches"]) == (0, 0)


def test_an_update_whose_client_left_before_it_started_is_dropped() -> None:
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from citeqa.api.deps import ServiceState
    from citeqa.api.errors import ApiError
    from citeqa.api.routes import run_update

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    gate, ran = threading.Event(), []
    updater = ThreadPoolExecutor(1)
    updater.submit(gate.wait, 5)  # a slow update ahead of ours
    state = ServiceState(settings=Settings(preset="tiny", disconnect_poll_s=0.01),
                         updater=updater, phase="ready")
    try:
        with pytest.raises(ApiError) as info:
            asyncio.run(run_update(state, ran.append, "x", request=Gone()))  # type: ignore[arg-type]
        assert (info.value.status, info.value.code) == (499, "client_closed_request")
    finally:
        gate.set()
        updater.shutdown(wait=True)
    assert ran == [] and state.pending_updates == 0
    # a client that stays is served
    updater = ThreadPoolExecutor(1)
    state.updater = updater
    try:
        assert asyncio.run(run_update(state, ran.append, "y")) is None and ran == ["y"]
    finally:
        updater.shutdown(wait=True)


def test_two_servers_on_one_index_never_undo_each_others_changes(index_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Each server updates the index it loaded: the second to write would have swapped in its
    own stale copy (losing the first's document, or a rebuild). It loads the index as the other
    left it and applies its change to that instead (the servers here never look by themselves:
    CITEQA_INDEX_RELOAD_S 0)."""
    with serve(index_dir, tmp_path / "a") as a, serve(index_dir, tmp_path / "b") as b:
        assert a.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "a1"}).status_code == 201
        before = b.get("/readyz").json()["index_version"]
        r = b.post("/v1/documents", json={"text": "Another text entirely.", "doc_id": "b1"})
        assert r.status_code == 201, r.text
        assert b.get("/readyz").json()["index_version"] != before
        assert "a1" in search_ids(b, "Zorblax telescope Quillon")  # a's document, served by b
        assert b.delete("/v1/documents/" + DOCS[0].doc_id).status_code == 204
        assert a.post("/v1/documents", json={"text": "More.", "doc_id": "a2"}).status_code == 201
        assert_error(a.post("/v1/documents", json={"text": "Again.", "doc_id": "b1"}), 409)
    ids = {d.doc_id for d in Index.load(index_dir).documents.values()}
    assert ids == {DOCS[1].doc_id, "a1", "b1", "a2"}
    # a rebuild while a server runs: the server's next change is made to the rebuilt index
    with serve(index_dir, tmp_path / "c") as c:
        build_index_from_documents(DOCS[:1], index_dir, CFG, progress=False)
        assert c.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "c1"}).status_code == 201
    assert set(Index.load(index_dir).documents) == {DOCS[0].doc_id, "c1"}


def test_a_change_the_loaded_index_refuses_is_judged_again_on_the_index_on_disk(
        index_dir: Path, tmp_path: Path) -> None:
    """Replicas: a delete of what the other added was a 404, and an add of what the other
    deleted a 409, by a server's stale copy, though the change was right: nothing changed (the
    servers here never look by themselves: CITEQA_INDEX_RELOAD_S 0)."""
    with serve(index_dir, tmp_path / "a") as a, serve(index_dir, tmp_path / "b") as b:
        assert a.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "x"}).status_code == 201
        assert b.delete("/v1/documents/x").status_code == 204  # (b had not loaded it)
        assert "x" not in Index.load(index_dir).documents
        assert a.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "x"}).status_code == 201
        assert b.delete("/v1/documents/x").status_code == 204
        r = a.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "x"})  # (a held it)
        assert r.status_code == 201, r.text
        assert "x" in Index.load(index_dir).documents
        # still refused where the index on disk refuses it too
        assert_error(b.delete("/v1/documents/nowhere"), 404)
        assert_error(b.post("/v1/documents", json={"text": "Other.", "doc_id": "x"}), 409)


def test_a_server_serves_the_index_another_writer_changed(index_dir: Path,
                                                          tmp_path: Path) -> None:
    """``citeqa index add`` (or a rebuild) beside a running server: it answers from the new
    index within CITEQA_INDEX_RELOAD_S, and keeps the one it has when the new one is damaged."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    def wait_for_version(client: TestClient, old: str) -> str:
        deadline = time.monotonic() + 10
        while (now := client.get("/readyz").json()["index_version"]) == old:
            assert time.monotonic() < deadline, "the server kept the old index"
            time.sleep(0.05)
        return now

    (tmp_path / "zorblax.txt").write_text(NEW_TEXT)
    with serve(index_dir, tmp_path, index_reload_s=0.05) as client:
        first = client.get("/readyz").json()["index_version"]
        r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "zorblax.txt"), "--index",
                                     str(index_dir), "--no-progress"])
        assert r.exit_code == 0, r.output
        second = wait_for_version(client, first)
        assert second == Index.load(index_dir).version
        assert search_ids(client, "Zorblax telescope Quillon")[0] != DOCS[0].doc_id
        assert any("Zorblax" in h["text"] for h in client.post(
            "/v1/search", json={"query": "Zorblax telescope", "k": 3}).json()["hits"])

        # a damaged index on disk: not served, the one loaded answers on (damaged before it
        # is swapped in: damaged in place, the whole one was there to load a moment first)
        from citeqa.retrieval.store import prepare, publish

        build_index_from_documents(DOCS[:1], tmp_path / "damaged", CFG, progress=False)
        with (tmp_path / "damaged" / "documents.jsonl").open("a") as f:
            f.write("\n")
        staged = prepare(index_dir)
        shutil.copytree(tmp_path / "damaged", staged, dirs_exist_ok=True)
        publish(staged, index_dir)
        time.sleep(0.5)  # ten looks
        assert client.get("/readyz").json()["index_version"] == second
        assert client.post("/v1/search", json={"query": "Zorblax", "k": 1}).status_code == 200
        err = assert_error(client.post("/v1/documents", json={"text": "More.", "doc_id": "m"}),
                           409)
        assert err["code"] == "index_changed" and "cannot be served" in err["message"]
        # repaired (rebuilt): served
        build_index_from_documents(DOCS, index_dir, CFG, progress=False)
        assert wait_for_version(client, second) == Index.load(index_dir).version


def test_a_rebuild_of_the_same_files_does_not_block_document_changes(index_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The same files rebuilt (a nightly rebuild) are the same index at another time: the
    server's next change was refused as if another writer had undone it, and never reloaded."""
    with serve(index_dir, tmp_path) as client:
        version = client.get("/readyz").json()["index_version"]
        time.sleep(1.1)  # another `created`
        build_index_from_documents(DOCS, index_dir, CFG, progress=False)
        assert Index.load(index_dir).version == version
        r = client.post("/v1/documents", json={"text": NEW_TEXT, "doc_id": "z"})
        assert r.status_code == 201, r.text
    assert set(Index.load(index_dir).documents) == {*[d.doc_id for d in DOCS], "z"}


def test_a_refused_index_is_served_once_its_files_are_whole(index_dir: Path,
                                                            tmp_path: Path) -> None:
    """An index copied in file by file can be read before its last file lands: refused then,
    it was never looked at again (its manifest, and so its version, did not change)."""
    import shutil

    from citeqa.pipeline import Pipeline

    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    build_index_from_documents(DOCS[:1], tmp_path / "next", CFG, progress=False)
    counts = index_dir / "bm25" / "counts.npy"
    shutil.rmtree(index_dir)
    shutil.copytree(tmp_path / "next", index_dir)
    whole = counts.read_bytes()
    counts.write_bytes(whole[: len(whole) // 2])  # the copy has not finished
    with pytest.raises(IndexError_, match="counts.npy"):
        pipeline.reload_index()
    assert pipeline.reload_index() is None  # said once
    counts.write_bytes(whole)  # ... now it has
    assert pipeline.reload_index() == Index.load(index_dir).version


def test_reload_checks_the_settings_embedder_as_a_start_does(tmp_path: Path) -> None:
    """A server on a BM25-only index took a rebuilt dense one from another embedder (no query
    embedder loaded yet to compare), which a start refuses."""
    from citeqa.pipeline import Pipeline

    index_dir = tmp_path / "idx"
    build_index_from_documents(DOCS, index_dir, RetrievalConfig(embedder="hash", dense=False),
                               progress=False)
    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    build_index_from_documents(DOCS, index_dir, RetrievalConfig(embedder="minilm"),
                               progress=False, embedder=HashEmbedder())
    with pytest.raises(IndexError_, match="built with the 'minilm' embedder"):
        pipeline.reload_index()
    with pytest.raises(IndexError_, match="built with the 'minilm' embedder"):
        Pipeline.from_settings(Settings(preset="tiny", index=index_dir))  # as a start does


def test_a_server_whose_index_failed_to_load_loads_again_once_it_is_rebuilt(
        index_dir: Path, tmp_path: Path) -> None:
    """A damaged index left the service unready until someone restarted it, while /healthz
    kept saying it was alive (an orchestrator restarts on neither)."""
    with (index_dir / "documents.jsonl").open("a") as f:
        f.write("\n")  # damaged: its checksum no longer matches
    settings = Settings(preset="tiny", index=index_dir, cache_dir=tmp_path / "cache",
                        window_ms=1, index_reload_s=0.05)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 10
        while (r := client.get("/readyz")).json().get("error", {}).get("code") != "load_failed":
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        time.sleep(0.3)  # looks that find the same files do not load again
        assert client.get("/readyz").json()["error"]["code"] == "load_failed"
        build_index_from_documents(DOCS, index_dir, CFG, progress=False)  # repaired
        while (r := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline + 10, r.text
            time.sleep(0.05)
        assert r.json()["index_version"] == Index.load(index_dir).version
        assert client.post("/v1/search", json={"query": "Normandy", "k": 1}).status_code == 200


def test_reload_index_refuses_another_embedder_and_says_so_once(index_dir: Path) -> None:
    from citeqa.pipeline import Pipeline

    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    assert pipeline.reload_index() is None  # unchanged
    pipeline.search("Zorblax", k=1)  # the query embedder is loaded now
    build_index_from_documents(DOCS, index_dir, CFG, progress=False,
                               embedder=HashEmbedder(dim=32))
    served = pipeline.index_version
    with pytest.raises(IndexError_, match="embedded with"):
        pipeline.reload_index()
    assert pipeline.reload_index() is None and pipeline.index_version == served  # said once
    build_index_from_documents(DOCS[:1], index_dir, CFG, progress=False)
    assert pipeline.reload_index() == Index.load(index_dir).version != served
    assert pipeline.reload_index() is None


def test_swaps_of_one_folder_take_turns(tmp_path: Path) -> None:
    import threading

    from citeqa.retrieval.store import publish, writer_lock

    out, new = tmp_path / "idx", tmp_path / ".idx.tmp-1"
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    done = threading.Event()
    with writer_lock(out):  # another writer mid-swap
        thread = threading.Thread(target=lambda: (publish(new, out), done.set()))
        thread.start()
        assert not done.wait(0.3) and not out.exists()  # waits for the lock
    thread.join(5)
    assert done.is_set() and (out / "manifest.json").is_file()


def test_an_index_directory_left_without_an_index_is_said_once(
        index_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A deleted or moved index was served on in silence: nothing said that a restart would
    find none, nor why every document change was refused."""
    from citeqa.pipeline import ABSENT_LOOKS, Pipeline

    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    served = pipeline.index_version
    index_dir.rename(tmp_path / "moved")
    with caplog.at_level(logging.INFO, logger="citeqa.pipeline"):
        for look in range(ABSENT_LOOKS + 3):  # not at the first look: a swap's instant
            assert pipeline.reload_index() is None and pipeline.index_version == served
            said = [r for r in caplog.records if "holds no index" in r.getMessage()]
            assert len(said) == (look + 1 >= ABSENT_LOOKS), look
        assert said[0].levelno == logging.WARNING
        assert pipeline.search("Zorblax", k=1)  # still served
        (tmp_path / "moved").rename(index_dir)
        assert pipeline.reload_index() is None  # the same index: nothing to load
        assert [r.getMessage() for r in caplog.records if "an index again" in r.getMessage()] == [
            f"the index directory {index_dir} holds an index again"]
        # a writer killed between its two renames: its backup is put back (as a restart
        # would), not called missing
        caplog.clear()
        index_dir.rename(index_dir.parent / f".{index_dir.name}.old-999999-0badcafe")
        for _ in range(ABSENT_LOOKS + 1):
            assert pipeline.reload_index() is None
        assert Index.load(index_dir).version == served
        assert not [r for r in caplog.records if "holds no index" in r.getMessage()]


def test_a_stale_404_met_mid_swap_is_judged_again_once_the_swap_is_done(
        index_dir: Path, tmp_path: Path) -> None:
    """A delete of what another writer added was a 404 when the stale copy's refusal met that
    writer's next swap between its two renames (no index on disk for an instant)."""
    from citeqa.pipeline import Pipeline

    a = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    b = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    b.add_documents([Document("x", "X", "x.txt", NEW_TEXT)])
    aside = tmp_path / "mid-swap"
    index_dir.rename(aside)  # the other writer's first rename ...
    threading.Timer(0.03, lambda: aside.rename(index_dir)).start()  # ... and its second
    a.delete_document("x")  # its copy has no "x": refused, then judged on the index on disk
    assert "x" not in Index.load(index_dir).documents
    with pytest.raises(InvalidRequestError) as gone:  # not there, on disk either: a 404
        a.delete_document("x")
    assert gone.value.status == 404


def test_a_page_is_found_indexed_past_the_first_page_of_the_listing() -> None:
    """Past LIST_PAGE (1,000) documents a page fetched under another spelling of its URL was
    not found, and was indexed twice."""
    from citeqa.api.routes import LIST_PAGE, page_holder

    docs = [Document(f"d{i}", "T", f"https://example.org/p{i}", "x") for i in range(1500)]

    class Listing:
        def list_documents(self, offset: int, limit: int) -> tuple[list[Document], int]:
            return docs[offset:offset + limit], len(docs)

    assert LIST_PAGE < 1200
    assert page_holder(Listing(), "https://EXAMPLE.org/p1200#frag") == "d1200"  # type: ignore[arg-type]
    assert page_holder(Listing(), "https://example.org/p9999") is None  # type: ignore[arg-type]
