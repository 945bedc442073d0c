"""Mutation-testing round on the command line (cli.py, index_cli.py) and the REST client
(client.py): the boundaries, defaults and branches the other tests left open."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from citeqa.cli import app, quote_in_context, snippet
from citeqa.client import CiteqaAPIError, CiteqaClient, Readiness
from citeqa.config import ChunkConfig, RetrievalConfig
from citeqa.index_cli import _dense_line, _echo_skipped, _echo_twins
from citeqa.ingest.sources import Skipped
from citeqa.retry import Backoff
from citeqa.types import Candidate, Document, Quote


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _index(tmp_path: Path, n: int = 7) -> Path:
    """A BM25 + hash-embedding index of ``n`` one-passage documents that all name kestrels."""
    from citeqa.retrieval import build_index_from_documents

    docs = [Document(f"k{i}", f"Birds {i}", f"birds{i}.txt",
                     f"Kestrels hover over mill number {i} at dawn.") for i in range(n)]
    build_index_from_documents(docs, tmp_path / "idx", RetrievalConfig(
        embedder="hash", chunk=ChunkConfig(max_chars=200)), progress=False)
    return tmp_path / "idx"


# --- cli: snippet and quote_in_context at their boundaries --------------------------------------


def test_a_snippet_exactly_as_long_as_the_limit_is_whole() -> None:
    assert snippet("abcde", 5) == "abcde"


def test_a_snippet_cut_at_a_space_exactly_half_way_cuts_where_it_reaches() -> None:
    # the space (at 5) is not in the last half of 10 characters: cut at 10, not at the word
    assert snippet("abcde fghijklmno", 10) == "abcde fghi\u2026"


QT = "The tower opened in 1889"


def _cand(text: str, **kw: Any) -> Candidate:
    start = text.index(QT)
    return Candidate("x", Quote(QT, "d", "T", "s", start, start + len(QT)), **kw)


def test_an_answer_at_either_end_of_its_quote_is_marked() -> None:
    text = "before " + QT + " after"
    start = text.index(QT)
    first = _cand(text, answer_start=start, answer_end=start + 3)  # "The"
    last = _cand(text, answer_start=start + len(QT) - 4, answer_end=start + len(QT))  # "1889"
    mark = lambda s: f"[{s}]"  # noqa: E731
    assert quote_in_context(text, first, mark=mark) == (
        "before \u201c[The] tower opened in 1889\u201d after")
    assert quote_in_context(text, last, mark=mark) == (
        "before \u201cThe tower opened in [1889]\u201d after")


def test_context_exactly_as_long_as_the_document_around_it_is_not_cut() -> None:
    text = "one two " + QT + " six seven"
    cand = _cand(text)
    # 8 characters before the quote and 10 after it: all shown, with no ellipsis
    assert quote_in_context(text, cand, chars=8) == "one two \u201c" + QT + "\u201d six\u2026"
    assert quote_in_context(text, cand, chars=10) == "one two \u201c" + QT + "\u201d six seven"


def test_a_quote_without_its_document_is_shown_without_its_edge_whitespace() -> None:
    quote = Quote(" " + QT + " ", "d", "T", "s", 0, len(QT) + 2)
    assert quote_in_context(None, Candidate("x", quote)) == "\u201c" + QT + "\u201d"


# --- cli: search, ask and serve options -----------------------------------------------------------


def test_search_lists_five_hits_by_default_and_takes_the_dense_mode(tmp_path: Path) -> None:
    index = _index(tmp_path)
    result = run("search", "kestrels", "--index", str(index), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 5
    dense = run("search", "kestrels", "--index", str(index), "--mode", "dense", "-k", "2")
    assert dense.exit_code == 0, dense.output
    assert dense.output.splitlines()[0].startswith("1. Birds ")


@pytest.mark.parametrize("value", ["0", "1"])
def test_ask_refuses_a_target_accuracy_at_either_bound(tmp_path: Path, value: str) -> None:
    result = run("ask", "tower?", "--index", str(tmp_path), "--target-accuracy", value)
    assert result.exit_code == 2
    assert "between 0 and 1 (exclusive)" in result.output


def test_serve_refuses_port_0(tmp_path: Path) -> None:
    result = run("serve", "--index", str(tmp_path / "nowhere"), "--port", "0")
    assert result.exit_code == 2
    assert "--port" in result.output and "0 is not in the range" in result.output


def test_serve_on_an_ipv6_loopback_allows_it_in_host_as_clients_name_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.api.server as server
    import citeqa.cli as cli

    served: list[Any] = []
    monkeypatch.setattr(server, "run", lambda app, **kw: served.append(app))
    monkeypatch.setattr(cli, "_probe_bind", lambda addresses: None)  # (IPv6 may be off here)
    monkeypatch.setattr("socket.getaddrinfo", lambda *a, **kw: [])
    for name in ("CITEQA_PRESET", "CITEQA_INDEX", "CITEQA_API_KEYS", "CITEQA_ALLOWED_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    index = _index(tmp_path, 2)
    result = run("serve", "--index", str(index), "--preset", "tiny", "--host", "::1")
    assert result.exit_code == 0, result.output
    allowed = served[0].state.citeqa.settings.allowed_hosts.split(",")
    assert "[::1]" in allowed and "::1" not in allowed


# --- index_cli: what a build says, by its boundaries ----------------------------------------------


def _unsupported(name: str) -> Skipped:
    return Skipped(f"site/{name}", f"unsupported file type '{Path(name).suffix}' in a folder "
                   "(name the file explicitly)")


def test_five_files_of_types_not_read_are_each_named(capsys: pytest.CaptureFixture[str]) -> None:
    _echo_skipped([_unsupported(f"f{i}.css") for i in range(5)])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[0].startswith("skipped site/f0.css: unsupported file type")
    _echo_skipped([_unsupported(f"f{i}.css") for i in range(6)])
    assert capsys.readouterr().err.startswith("skipped 6 files in folders")


def test_five_records_skipped_alike_are_each_said(capsys: pytest.CaptureFixture[str]) -> None:
    _echo_skipped([Skipped("r.jsonl", f"line {i}: no text") for i in range(1, 6)])
    assert capsys.readouterr().err.splitlines() == [
        f"skipped r.jsonl: line {i}: no text" for i in range(1, 6)]


def test_twins_are_said_by_how_many_and_which(capsys: pytest.CaptureFixture[str]) -> None:
    _echo_twins([("a", "a"), ("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d"),
                 ("p", "q"), ("x", "y"), ("u", "v", "w")])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6, err
    assert err[0].startswith("warning: 2 documents of a have one text; both are indexed")
    assert err[1].startswith("warning: b has the text of a; both are indexed")
    assert err[2].startswith("warning: 3 documents have one text (a, b, c); all are indexed")
    assert err[3].startswith("warning: 4 documents have one text (a, b, c and 1 more); all")
    assert err[4].startswith("warning: q has the text of p;")
    # past five groups: only how many documents more (one of the sixth, two of the seventh)
    assert err[5] == ("warning: 3 more documents have the text of another, and each is "
                      "indexed beside it")
    _echo_twins([*[("a", "b")] * 5, ("x", "y")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "warning: 1 more document has the text of another, and each is indexed beside it")
    _echo_twins([*[("a", "b")] * 5, ("x", "y", "z")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "warning: 2 more documents have the text of another, and each is indexed beside it")


@pytest.mark.parametrize(("spec", "removed", "line"), [
    ({"kind": "ivf", "nlist": 8, "nprobe": 8}, None, "ivf (8 cells, all probed)"),
    ({"kind": "ivf", "nlist": 8, "nprobe": 7}, None, "ivf (8 cells, 7 probed)"),
    ({"kind": "ivf", "nlist": None, "nprobe": 5}, None, "ivf (auto cells, 5 probed)"),
    ({"kind": "hnsw", "hnsw_m": 32, "ef_search": 64}, 0, "hnsw (M 32, efSearch 64)"),
    ({"kind": "hnsw", "hnsw_m": 32, "ef_search": 64}, 2,
     "hnsw (M 32, efSearch 64; 2 rows of deleted passages kept, skipped)"),
    ({}, None, "flat"),
    (None, None, "none (BM25 only)"),
])
def test_the_dense_index_line_of_index_info(spec: Any, removed: Any, line: str) -> None:
    assert _dense_line(spec, removed) == line


# --- client: what goes out, and how what comes back is read -----------------------------------


def _client(handler: Any, **kw: Any) -> CiteqaClient:
    return CiteqaClient("http://svc", transport=httpx.MockTransport(handler),
                        backoff=kw.pop("backoff", Backoff(retries=0)), **kw)


def _sent(call: Any, reply: httpx.Response) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return reply

    call(_client(handler))
    return seen


ANSWER = {"question": "q", "declined": True, "reason": "r"}


def test_zero_valued_options_are_sent_and_k_is_the_one_given() -> None:
    seen = _sent(lambda c: c.answer("q", min_score=0.0, top_k=0),
                 httpx.Response(200, json=ANSWER))
    assert json.loads(seen[0].content) == {"question": "q", "min_score": 0.0, "top_k": 0}
    seen = _sent(lambda c: c.search("q", k=3), httpx.Response(200, json={"hits": []}))
    assert json.loads(seen[0].content) == {"query": "q", "k": 3}


def test_an_empty_api_key_sends_no_authorization() -> None:
    seen = _sent(lambda c: None, httpx.Response(200))
    assert seen == []
    requests: list[httpx.Request] = []
    client = CiteqaClient("http://svc", api_key="", transport=httpx.MockTransport(
        lambda r: requests.append(r) or httpx.Response(200, json={"hits": []})))
    client.search("q")
    assert "authorization" not in requests[0].headers


def test_a_url_with_a_source_is_refused_before_sending() -> None:
    client = CiteqaClient("http://127.0.0.1:9")  # nothing is sent
    with pytest.raises(ValueError, match="title and source go with text"):
        client.add_document(url="https://example.org", source="s")


def test_a_list_row_whose_numbers_are_not_numbers_is_bad_response() -> None:
    body = {"documents": [{"doc_id": "d", "title": "", "source": "", "length": "many"}],
            "total": 1, "offset": 0, "limit": 20}
    client = _client(lambda r: httpx.Response(200, json=body))
    with pytest.raises(CiteqaAPIError) as err:
        client.list_documents()
    assert (err.value.status, err.value.code) == (200, "bad_response")


def test_a_list_that_does_not_say_whether_keys_may_change_it_says_none() -> None:
    body = {"documents": [], "total": 0, "offset": 0, "limit": 20}
    assert _client(lambda r: httpx.Response(200, json=body)).list_documents().can_change is None


def test_an_answer_with_passages_null_has_none() -> None:
    got = _client(lambda r: httpx.Response(200, json={**ANSWER, "passages": None})).answer("q")
    assert got.passages == []


def test_health_raises_for_an_error_status() -> None:
    client = _client(lambda r: httpx.Response(
        500, json={"error": {"code": "internal", "message": "m"}}))
    with pytest.raises(CiteqaAPIError) as err:
        client.health()
    assert (err.value.status, err.value.code) == (500, "internal")


def test_readiness_of_an_empty_200_and_of_an_odd_version() -> None:
    empty = _client(lambda r: httpx.Response(200))
    assert empty.readiness() == Readiness(True)
    odd = _client(lambda r: httpx.Response(200, json={"index_version": 7}))
    assert odd.readiness() == Readiness(True, index_version=None)


def test_readiness_raises_for_a_502_and_is_unreachable_when_no_connection_is_made() -> None:
    bad_gateway = _client(lambda r: httpx.Response(
        502, json={"error": {"code": "not_ready", "message": "m"}}))
    with pytest.raises(CiteqaAPIError) as err:
        bad_gateway.readiness()
    assert err.value.status == 502

    def no_connection(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    assert _client(no_connection).readiness() == Readiness(False, reason="unreachable")


def test_a_probe_that_could_not_be_sent_is_an_error_not_unreachable() -> None:
    """health() and readiness() caught every TransportError: a probe httpx refuses to send (an
    API key with a line break) read as "unreachable" for ever, and a start script polled on."""
    def never(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError("Illegal header value b'Bearer a\\nb'")

    client = _client(never)
    for probe in (client.readiness, client.health):
        with pytest.raises(CiteqaAPIError) as err:
            probe()
        assert (err.value.status, err.value.code) == (0, "request_error")


@pytest.mark.parametrize(("reply", "message"), [
    (httpx.Response(201, json=[1, 2]), "not a JSON object"),
    (httpx.Response(201, text="created"), "not JSON"),
])
def test_an_added_document_answered_with_no_json_object_is_bad_response(
        reply: httpx.Response, message: str) -> None:
    """add_document returns the body as it is: a body of another kind must not pass."""
    with pytest.raises(CiteqaAPIError) as err:
        _client(lambda r: reply).add_document("text")
    assert (err.value.status, err.value.code, err.value.message) == (201, "bad_response", message)


def test_a_refused_connection_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("citeqa.retry.time.sleep", lambda s: None)
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"hits": []})

    assert _client(handler, backoff=Backoff(retries=2)).search("q") == []
    assert len(calls) == 2


def test_a_timeout_is_its_own_code() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(CiteqaAPIError) as err:
        _client(slow).search("q")
    assert (err.value.status, err.value.code) == (0, "timeout")


def test_an_empty_error_body_says_the_status_phrase() -> None:
    with pytest.raises(CiteqaAPIError) as err:
        _client(lambda r: httpx.Response(404)).search("q")
    assert (err.value.code, err.value.message) == ("http_error", "Not Found")


def test_an_errors_details_come_through_and_survive_pickling() -> None:
    client = _client(lambda r: httpx.Response(
        422, json={"error": {"code": "invalid", "message": "m", "details": {"field": "k"}}}))
    with pytest.raises(CiteqaAPIError) as err:
        client.search("q")
    assert err.value.details == {"field": "k"}
    assert pickle.loads(pickle.dumps(err.value)).details == {"field": "k"}


# --- cli: the default context of a quote ------------------------------------------------------


def test_a_quote_shows_eighty_characters_of_context_by_default() -> None:
    before, after = "w" * 9 + " " + "x" * 75 + " ", " " + "y" * 75 + " " + "z" * 9
    text = before + QT + after
    shown = quote_in_context(text, _cand(text))
    # 80 characters each side, the words they cut into dropped: x*75 and y*75 are whole
    assert shown == "\u2026" + "x" * 75 + " \u201c" + QT + "\u201d " + "y" * 75 + "\u2026"


# --- index_cli: option checks, and what build, add and remove say -------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize(("options", "refused"), [
    (["--hnsw", "--dense-index", "hnsw"], "contradicts"),
    (["--resumable", "--shard-chars", "100"], "only apply with"),
    (["--bm25-only", "--dense-index", "ivf", "--nlist", "4"], "builds no dense index"),
])
def test_option_pairs_that_agree_or_are_refused_for_the_first_reason(
        tmp_path: Path, options: list[str], refused: str) -> None:
    code, _, err = _cli("index", "build", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "idx"), *options)
    assert code == 2
    if "--bm25-only" in options:  # ivf options beside --bm25-only: named for the ivf options
        assert "--nprobe and --nlist only apply with --dense-index ivf" in err, err
    else:  # accepted: the next check (the missing source) is what stops it
        assert "no such file or folder" in err and refused not in err, err


def test_a_url_source_is_not_called_missing(tmp_path: Path) -> None:
    code, _, err = _cli("index", "build", "http://127.0.0.1:18399/page", "--out",
                        str(tmp_path / "idx"), "--allow-private-urls", "--bm25-only",
                        "--no-progress")
    assert code == 2 and "no such file or folder" not in err, err


def _docs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"d{i}.txt").write_text(f"Document {i} tells of river number {i} and its fish.")
    return folder


def _build_bm25(docs: Path, index: Path) -> None:
    code, _, err = _cli("index", "build", str(docs), "--out", str(index), "--preset", "tiny",
                        "--bm25-only", "--no-progress")
    assert code == 0, err


def test_max_chars_of_fifty_is_taken(tmp_path: Path) -> None:
    code, out, err = _cli("index", "build", str(_docs(tmp_path / "docs", 1)), "--out",
                          str(tmp_path / "idx"), "--preset", "tiny", "--bm25-only",
                          "--max-chars", "50", "--no-progress")
    assert code == 0, err
    assert "indexed 1 document" in out


def test_five_conflicts_are_all_named_without_an_ellipsis(tmp_path: Path) -> None:
    docs = _docs(tmp_path / "docs", 5)
    index = tmp_path / "idx"
    _build_bm25(docs, index)
    for f in docs.iterdir():
        f.write_text(f.read_text() + " Edited.")
    code, _, err = _cli("index", "add", str(docs), "--index", str(index), "--no-progress")
    assert code == 2 and "holds 5 documents with other content" in err, err
    assert ", ..." not in err


def test_adding_nothing_new_forgets_what_an_interrupted_add_kept(tmp_path: Path) -> None:
    from citeqa.retrieval.kept import kept_dir

    docs = _docs(tmp_path / "docs", 1)
    index = tmp_path / "idx"
    _build_bm25(docs, index)
    kept_dir(index).mkdir()  # (empty: what it held went in with the add that was cut short)
    code, out, err = _cli("index", "add", str(docs), "--index", str(index), "--no-progress")
    assert code == 0 and out.startswith("nothing to add"), err
    assert not kept_dir(index).exists()


def test_an_id_named_twice_is_removed_once(tmp_path: Path) -> None:
    docs = _docs(tmp_path / "docs", 2)
    index = tmp_path / "idx"
    _build_bm25(docs, index)
    doc_id = json.loads(_cli("index", "list", "--index", str(index), "--json")[1]
                        )["documents"][0]["doc_id"]
    code, out, err = _cli("index", "remove", doc_id, doc_id, "--index", str(index))
    assert code == 0, err
    assert out.startswith("removed 1 document from") and "1 document left" in out, out


def test_one_kept_shard_is_said_in_the_singular(tmp_path: Path) -> None:
    from citeqa.index_cli import _kept_shards
    from citeqa.retrieval.shards import MARKER

    work = tmp_path / "work"
    (work / "shards" / "s0").mkdir(parents=True)
    (work / MARKER).write_text("{}")
    said = _kept_shards(tmp_path / "idx", work)
    assert said.startswith(f"; the 1 shard finished so far is kept in {work}:"), said


def test_a_full_disk_names_no_kept_embeddings_where_their_folder_is_empty(
        tmp_path: Path) -> None:
    from citeqa.index_cli import _room_for_a_change
    from citeqa.retrieval.kept import kept_dir

    index = tmp_path / "idx"
    index.mkdir()
    kept_dir(index).mkdir()
    assert "embeddings an add kept" not in _room_for_a_change(index)
    (kept_dir(index) / "part").write_text("x")
    assert "embeddings an add kept" in _room_for_a_change(index)


def test_an_option_value_the_pipeline_refuses_is_one_line_and_the_pipeline_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from citeqa.pipeline import asked_text

    closed: list[bool] = []

    class Pipeline:  # stands in for citeqa.pipeline.Pipeline: no model is loaded
        @classmethod
        def from_settings(cls, settings: Any) -> Pipeline:
            return cls()

        def ask(self, question: str, **kw: Any) -> Any:
            raise ValueError("top_k is more than the index holds")

        def close(self) -> None:
            closed.append(True)

    module = types.ModuleType("citeqa.pipeline")
    module.Pipeline = Pipeline  # type: ignore[attr-defined]
    module.asked_text = asked_text  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "citeqa.pipeline", module)
    result = run("ask", "Where is the Seine?", "--index", "x", "--preset", "tiny")
    assert result.exit_code == 2 and closed == [True]
    assert result.output.strip() == "error: top_k is more than the index holds"
