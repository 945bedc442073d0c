"""Mutation-testing round on the sources side (ingest/fetch.py, ingest/sources.py, config.py,
retrieval/retriever.py, retrieval/embed.py): boundaries, branches and messages the other tests
left open, and a defect found on the way (RetrievalConfig's unchecked cpu_dtype)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from citeqa.errors import BadURLError, BlockedURLError, ConfigError, FetchError
from citeqa.ingest import Fetcher, FetchPolicy, LoadResult, load_sources

PUBLIC = "93.184.216.34"


def page(text: str = "<html><head><title>T</title></head><body><p>Hello web</p></body></html>",
         ctype: str = "text/html; charset=utf-8") -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": ctype}, text=text)


def fetcher(handler: Callable[[httpx.Request], httpx.Response] | None = None,
            dns: Callable[[str, int], list[str]] | None = None, **policy: object) -> Fetcher:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no connection expected, got {request.url}")

    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError(f"resolver must not be called for {host!r}")

    return Fetcher(FetchPolicy(**policy),  # type: ignore[arg-type]
                   transport=httpx.MockTransport(handler or refuse), resolver=dns or no_dns)


def load(*sources: str | Path, **kw: object) -> LoadResult:
    return load_sources([str(s) for s in sources], progress=False, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fetch: host names


def test_a_host_name_of_exactly_253_characters_is_fetched_and_254_is_a_bad_url() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 3 * 64 + 61 = 253
    assert len(name) == 253
    seen: list[str] = []
    f = fetcher(lambda r: page(), lambda host, port: seen.append(host) or [PUBLIC])
    assert f.fetch(f"http://{name}/").text == "Hello web"
    assert seen == [name]
    with pytest.raises(BadURLError, match="longer than 253 characters"):
        fetcher().fetch(f"http://{name}c/")


def test_a_label_of_64_characters_is_named_for_its_length() -> None:
    with pytest.raises(BadURLError, match="a label of 64 characters \\(at most 63\\)"):
        fetcher().fetch(f"http://{'a' * 64}.org/")


def test_the_resolver_is_asked_for_the_urls_port_or_its_schemes_default() -> None:
    asked: list[tuple[str, int]] = []

    def dns(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [PUBLIC]

    f = fetcher(lambda r: page(), dns)
    for url in ("http://example.com/", "https://example.com/", "http://example.com:8080/"):
        f.fetch(url)
    assert asked == [("example.com", 80), ("example.com", 443), ("example.com", 8080)]


def test_port_zero_is_a_bad_url() -> None:
    with pytest.raises(BadURLError, match="port 0 is not a port"):
        fetcher().fetch("http://example.com:0/")


def test_the_sni_name_is_the_host_without_its_trailing_dot() -> None:
    sent: list[httpx.Request] = []
    f = fetcher(lambda r: sent.append(r) or page(), lambda host, port: [PUBLIC])
    f.fetch("https://Example.COM./")
    assert sent[0].extensions["sni_hostname"] == "example.com"


def test_the_first_address_dns_answers_is_the_one_connected_to() -> None:
    """All are checked; the connection goes to the first, as the resolver ordered them."""
    sent: list[httpx.Request] = []
    f = fetcher(lambda r: sent.append(r) or page(),
                lambda host, port: ["93.184.216.35", PUBLIC, "93.184.216.35"])
    f.fetch("http://example.com/")
    assert sent[0].url.host == "93.184.216.35"


def test_a_url_is_fetched_with_the_white_space_around_it_left_out() -> None:
    f = fetcher(lambda r: page(), lambda host, port: [PUBLIC])
    got = f.fetch("  http://example.com/a \n")
    assert got.final_url == "http://example.com/a" and got.text == "Hello web"


def test_a_308_redirect_is_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(308, headers={"Location": "/new"})
        return page()

    got = fetcher(handler, lambda host, port: [PUBLIC]).fetch("http://example.com/old")
    assert got.final_url == "http://example.com/new"


def test_an_untitled_page_reached_by_a_redirect_is_titled_by_its_final_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(302, headers={"Location": "/new"})
        return page("<html><body><p>No title here</p></body></html>")

    got = fetcher(handler, lambda host, port: [PUBLIC]).fetch("http://example.com/old")
    assert got.url == "http://example.com/old"
    assert got.title == got.final_url == "http://example.com/new"


def test_a_content_type_is_matched_in_any_case() -> None:
    got = fetcher(lambda r: page(ctype="Text/HTML; Charset=UTF-8"),
                  lambda host, port: [PUBLIC]).fetch("http://example.com/")
    assert got.content_type == "text/html" and got.text == "Hello web"


@pytest.mark.parametrize("status", [201, 203, 204, 206])
def test_a_success_status_other_than_200_is_no_page(status: int) -> None:
    f = fetcher(lambda r: httpx.Response(status, headers={"Content-Type": "text/plain"},
                                         text="partial"), lambda host, port: [PUBLIC])
    with pytest.raises(FetchError, match=f"answered HTTP {status}"):
        f.fetch("http://example.com/")


def test_a_relative_meta_refresh_is_resolved_against_the_final_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a/old":
            return httpx.Response(301, headers={"Location": "/b/moved.html"})
        return page('<meta http-equiv="refresh" content="0; url=next.html"><p>moved</p>')

    got = fetcher(handler, lambda host, port: [PUBLIC]).fetch("http://example.com/a/old")
    assert got.redirect == "http://example.com/b/next.html"
    assert got.only_redirects() is not None and "http://example.com/b/next.html" in (
        got.only_redirects() or "")


def test_a_refused_redirects_password_is_not_said_back() -> None:
    f = fetcher(lambda r: httpx.Response(302, headers={"Location": "http://u:hunter2@10.0.0.1/"}),
                lambda host, port: [PUBLIC])
    with pytest.raises(BlockedURLError) as info:
        f.fetch("http://example.com/")
    assert "hunter2" not in str(info.value) and "redirected to" in str(info.value)


def test_a_numeric_host_of_five_parts_is_a_bad_url_even_when_its_last_is_zero() -> None:
    """(inet_aton would have read "1.2.3.4.0" as nothing; 1.2.3.4 is not what it names.)"""
    with pytest.raises(BadURLError, match="not a valid IPv4 address"):
        fetcher().fetch("http://1.2.3.4.0/")


@pytest.mark.parametrize(("nuls", "refused"), [(1, False), (3, True)])
def test_a_page_is_refused_as_binary_past_one_nul_in_a_hundred_characters(
        nuls: int, refused: bool) -> None:
    body = "x" * (200 - nuls) + "\x00" * nuls  # 0.5 % or 1.5 % NUL
    f = fetcher(lambda r: page(body, "text/plain; charset=utf-8"), lambda host, port: [PUBLIC])
    if refused:
        with pytest.raises(FetchError, match="binary"):
            f.fetch("http://example.com/")
    else:
        assert f.fetch("http://example.com/").text.endswith("x\ufffd")


# --------------------------------------------------------------------------- sources: records


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_json_lines_ended_by_carriage_returns_alone_are_read_line_by_line(tmp_path: Path) -> None:
    """Old Mac files: "\\r" ends each line."""
    f = write(tmp_path / "mac.jsonl", '{"text": "one"}\r{"text": "two"}\r\r{"oops": 1}\r')
    result = load(f)
    assert [d.text for d in result.documents] == ["one", "two"]
    assert [s.reason.split(":")[0] for s in result.skipped] == ["line 4"]


def test_a_record_id_of_exactly_the_longest_doc_id_is_kept_and_one_longer_hashed(
        tmp_path: Path) -> None:
    from citeqa.types import MAX_DOC_ID_CHARS

    ok, long = "a" * MAX_DOC_ID_CHARS, "b" * (MAX_DOC_ID_CHARS + 1)
    f = write(tmp_path / "r.jsonl", json.dumps({"id": ok, "text": "x"}) + "\n"
              + json.dumps({"id": long, "text": "y"}) + "\n")
    first, second = load(f).documents
    assert first.doc_id == ok
    assert second.doc_id != long and len(second.doc_id) == 16


def test_a_boolean_record_id_is_replaced_by_a_hash(tmp_path: Path) -> None:
    """true is no id (str(True) is "True", which REST would take)."""
    f = write(tmp_path / "r.jsonl", json.dumps({"id": True, "text": "x"}) + "\n")
    (doc,) = load(f).documents
    assert doc.doc_id != "True" and len(doc.doc_id) == 16


def test_a_records_title_is_stripped(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", json.dumps({"title": "  Zebras \n", "text": "x"}) + "\n")
    assert load(f).documents[0].title == "Zebras"


def test_a_list_elements_position_names_it_from_zero(tmp_path: Path) -> None:
    from citeqa.ingest import doc_id_for

    f = write(tmp_path / "r.json", json.dumps([{"text": "x"}, {"text": "y"}]))
    docs = load(f).documents
    assert [d.source for d in docs] == [f"{f}#0", f"{f}#1"]
    assert docs[0].doc_id == doc_id_for(f"{f}#0")


def test_a_nul_in_a_records_url_skips_it(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", json.dumps({"text": "x", "url": "https://a.org/\u0000"}) + "\n")
    result = load(f)
    assert result.documents == []
    assert "a NUL character in its 'url'" in result.skipped[0].reason


def test_a_record_without_text_lists_five_of_its_fields_then_an_ellipsis(tmp_path: Path) -> None:
    five = {k: 1 for k in "abcde"}
    six = {k: 1 for k in "abcdef"}
    f = write(tmp_path / "r.jsonl", json.dumps(five) + "\n" + json.dumps(six) + "\n")
    first, second = (s.reason for s in load(f).skipped)
    assert "(its fields: a, b, c, d, e);" in first
    assert "(its fields: a, b, c, d, e, …);" in second


# --------------------------------------------------------------------------- sources: SQuAD


def squad(*articles: dict) -> str:
    return json.dumps({"version": "v2.0", "data": list(articles)})


def test_a_squad_file_with_no_articles_says_so(tmp_path: Path) -> None:
    f = write(tmp_path / "sq.json", squad())
    result = load(f)
    assert result.documents == []
    assert [s.reason for s in result.skipped] == [
        "the SQuAD file has no articles ('data' is empty)"]


def test_squad_articles_sharing_a_title_are_told_apart_by_position(tmp_path: Path) -> None:
    p = [{"context": "c", "qas": []}]
    f = write(tmp_path / "sq.json", squad({"title": "Super_Bowl", "paragraphs": p},
                                          {"title": "Super_Bowl", "paragraphs": p},
                                          {"title": "Empty", "paragraphs": []}))
    result = load(f)
    assert [d.source for d in result.documents] == [f"{f}#Super_Bowl/0", f"{f}#Super_Bowl#1/0"]
    assert {d.title for d in result.documents} == {"Super Bowl"}  # underscores read as spaces
    assert [(s.source, s.reason) for s in result.skipped] == [
        (f"{f}#Empty", "SQuAD article with no paragraphs")]


# --------------------------------------------------------------------------- sources: paths


def test_a_folder_reads_old_news_by_name_and_leaves_out_hidden_folders(tmp_path: Path) -> None:
    (tmp_path / "NEWS.old").write_text("Version 1 was released.", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("secret", encoding="utf-8")
    result = load(tmp_path)
    assert [Path(d.source).name for d in result.documents] == ["NEWS.old"]
    assert result.skipped == []


def test_a_folder_with_no_supported_files_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x01")
    result = load(tmp_path)
    assert (str(tmp_path), "folder has no supported files") in [
        (s.source, s.reason) for s in result.skipped]


def test_a_folders_files_are_read_depth_first_in_name_order(tmp_path: Path) -> None:
    for rel in ("b/z.txt", "a/y.txt", "a/c/x.txt", "m.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel, encoding="utf-8")
    assert [d.text for d in load(tmp_path).documents] == ["a/c/x.txt", "a/y.txt", "b/z.txt",
                                                          "m.txt"]


@pytest.mark.parametrize("source", ["example.io/page", "docs.python.org/3/"])
def test_a_web_address_without_its_scheme_is_told_to_add_it(source: str) -> None:
    (skip,) = load(source).skipped
    assert skip.reason.endswith(f"give the URL with its scheme: https://{source}")


def test_an_upper_case_http_scheme_is_fetched_and_an_empty_source_names_nothing() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return page()

    f = fetcher(handler, lambda host, port: [PUBLIC])
    result = load_sources(["HTTPS://example.com/a", ""], fetcher=f, progress=False)
    assert [d.text for d in result.documents] == ["Hello web"] and result.skipped == []
    assert len(seen) == 1


def test_a_fetched_documents_source_is_its_final_url_and_two_urls_of_one_page_one_document(
        ) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(301, headers={"Location": "https://EXAMPLE.com./new"})
        return page()

    f = fetcher(handler, lambda host, port: [PUBLIC])
    result = load_sources(["https://example.com/old", "https://example.com/new#top"],
                          fetcher=f, progress=False)
    (doc,) = result.documents
    assert doc.source == "https://example.com./new"
    ((source, reason),) = [(s.source, s.reason) for s in result.skipped]
    assert source == "https://example.com/new#top"
    assert reason.startswith("the same page as https://example.com/old")


def test_a_utf16_file_without_a_mark_is_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "ps.txt"
    f.write_bytes("Hi there, PowerShell wrote this.".encode("utf-16-le"))
    (skip,) = load(f).skipped
    assert skip.reason.startswith("UTF-16LE text without a byte-order mark")
    two, one = tmp_path / "two.txt", tmp_path / "one.txt"  # one character: too little to tell
    two.write_bytes("Hi".encode("utf-16-le"))
    one.write_bytes("H".encode("utf-16-le"))
    assert load(two).skipped[0].reason.startswith("UTF-16LE text without a byte-order mark")
    assert load(one).skipped[0].reason.startswith("binary file")


def test_an_html_files_byte_order_mark_is_not_in_its_title(tmp_path: Path) -> None:
    f = tmp_path / "p.html"
    f.write_bytes(b"\xef\xbb\xbfHello <b>there</b>")
    (doc,) = load(f).documents
    assert not doc.text.startswith("\ufeff") and doc.text.startswith("Hello")


def test_a_json_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "marked"}]).encode())
    assert [d.text for d in load(f).documents] == ["marked"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("cls", "ok"), [
    ("RetrievalConfig", {"hnsw_m": 2}), ("RetrievalConfig", {"bm25_b": 1.0}),
    ("RetrievalConfig", {"rrf_k": 0}), ("RetrievalConfig", {"embed_batch_size": 1}),
    ("GenerationConfig", {"min_quote_chars": 200, "max_quote_chars": 200}),
    ("GenerationConfig", {"temperature": 0.0}),
    ("GenerationConfig", {"speculative_quote_tokens": 0}),
    ("GenerationConfig", {"threads": 1}), ("GenerationConfig", {"concurrency": 1}),
    ("ChunkConfig", {"max_chars": 1}),
])
def test_config_values_at_their_bounds_are_accepted(cls: str, ok: dict) -> None:
    import citeqa.config as config

    getattr(config, cls)(**ok)


@pytest.mark.parametrize(("cls", "bad"), [
    ("RetrievalConfig", {"hnsw_m": 1}), ("RetrievalConfig", {"bm25_b": -0.1}),
    ("RetrievalConfig", {"embed_batch_size": 0}), ("RetrievalConfig", {"rrf_k": -1}),
    ("GenerationConfig", {"min_quote_chars": 201, "max_quote_chars": 200}),
    ("GenerationConfig", {"temperature": -0.1}), ("GenerationConfig", {"threads": 0}),
    ("GenerationConfig", {"concurrency": 0}),
    ("GenerationConfig", {"speculative_quote_tokens": -1}),
    ("RewardConfig", {"threshold": float("nan")}),
])
def test_config_values_past_their_bounds_are_refused_by_name(cls: str, bad: dict) -> None:
    import citeqa.config as config

    with pytest.raises(ConfigError, match=f"{cls}: invalid .*{next(iter(bad))}="):
        getattr(config, cls)(**bad)



def test_an_unknown_retrieval_cpu_dtype_is_refused_by_name() -> None:
    """RetrievalConfig did not check cpu_dtype (GenerationConfig did): a bad one passed and
    every query embedding then raised a bare ValueError (a 500 on each dense or hybrid
    search)."""
    from citeqa.config import RetrievalConfig

    with pytest.raises(ConfigError, match="RetrievalConfig: invalid cpu_dtype='fp16'"):
        RetrievalConfig(cpu_dtype="fp16")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.upper().startswith("CITEQA_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_unknown_environment_reads_names_in_any_case() -> None:
    from citeqa.config import unknown_environment

    env = {"citeqa_preset": "tiny", "CITEQA_TOPK": "3", "citeqa_port": "1", "OTHER": "x",
           "Citeqa_Nope": "1"}
    assert unknown_environment(env) == ["CITEQA_TOPK", "Citeqa_Nope"]


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:0", "port 0 is outside 1-65535"), ("http://", "no host"),
    ("ftp://h:1", "scheme 'ftp'"),
])
def test_a_generator_url_that_is_no_http_url_says_why(clean_env: pytest.MonkeyPatch, url: str,
                                                      why: str) -> None:
    from pydantic import ValidationError

    from citeqa.config import Settings

    with pytest.raises(ValidationError, match=f"is not an http\\(s\\) URL \\({why}"):
        Settings(generator_url=url)


def test_a_generator_url_is_kept_without_the_space_around_it(clean_env: pytest.MonkeyPatch
                                                             ) -> None:
    from citeqa.config import Settings

    s = Settings(generator_url="  http://127.0.0.1:8100  ")
    assert s.generator_url == "http://127.0.0.1:8100"
    assert s.config().generation.url == "http://127.0.0.1:8100"


def test_keywords_of_path_settings_are_read_in_any_case_with_spaces(clean_env: pytest.MonkeyPatch
                                                                    ) -> None:
    from citeqa.config import Settings

    s = Settings(reward=" None ", adapter=" PACKAGED ")
    assert (s.reward, s.adapter) == ("none", "packaged")
    assert s.config().reward.model is None


def test_an_adapter_of_none_goes_with_a_remote_generator(clean_env: pytest.MonkeyPatch) -> None:
    from citeqa.config import Settings

    s = Settings(generator_url="http://127.0.0.1:8100", adapter="none")
    assert s.config().generation.url == "http://127.0.0.1:8100"


def test_the_batch_size_is_4_locally_and_the_concurrency_remotely(clean_env: pytest.MonkeyPatch
                                                                  ) -> None:
    from citeqa.config import Settings

    assert Settings().batch_size == 4
    assert Settings(generator_url="http://127.0.0.1:8100", generator_concurrency=7).batch_size == 7
    assert Settings(generator_url="http://127.0.0.1:8100", max_batch=2).batch_size == 2


@pytest.mark.parametrize(("field", "ok", "bad"), [
    ("max_body_bytes", 1024, 1023), ("window_ms", 10_000, 10_001),
    ("max_connections_per_client", 0, -1), ("generator_concurrency", 256, 257),
])
def test_service_settings_at_and_past_their_bounds(clean_env: pytest.MonkeyPatch, field: str,
                                                   ok: float, bad: float) -> None:
    from pydantic import ValidationError

    from citeqa.config import Settings

    assert getattr(Settings(**{field: ok}), field) == ok
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: bad})


def test_allowed_hosts_of_commas_alone_are_refused(clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from citeqa.config import Settings

    with pytest.raises(ValidationError, match="CITEQA_ALLOWED_HOSTS=' , ' lists no name"):
        Settings(allowed_hosts=" , ")
    assert Settings(allowed_hosts="a.org, ").allowed_hosts == "a.org, "


def test_api_keys_are_split_on_commas_and_a_key_with_a_space_is_refused(
        clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from citeqa.config import Settings, parse_api_keys

    assert parse_api_keys(" k1 ,, k2 ,") == (b"k1", b"k2")
    with pytest.raises(ValidationError, match="1 key with characters other than printable ASCII"):
        Settings(api_keys="good,bad key")


def test_settings_carry_the_fake_generator_the_cpu_dtype_and_reward_flags(
        clean_env: pytest.MonkeyPatch) -> None:
    from citeqa.config import Settings

    cfg = Settings(preset="tiny", generator="fake", cpu_dtype="fp32", reward_compile=True,
                   decline_uncertified=True).config()
    assert cfg.generation.model == "fake"
    assert cfg.generation.cpu_dtype == cfg.retrieval.cpu_dtype == "fp32"
    assert cfg.reward.compile and cfg.reward.decline_uncertified


def test_a_path_setting_starting_at_home_is_expanded(clean_env: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from citeqa.config import Settings

    clean_env.setenv("HOME", str(tmp_path))
    assert Settings(index="~/idx").index == tmp_path / "idx"


# --------------------------------------------------------------------------- retriever




def _rcfg():
    from citeqa.config import ChunkConfig, RetrievalConfig

    return RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=120))


def _docs():
    from citeqa.types import Document

    return [Document("normans", "Normans", "n.txt", "The Normans gave their name to Normandy. "
                     "Rollo was their first ruler."),
            Document("steam", "Steam engine", "s.txt", "A steam engine performs mechanical work "
                     "using steam as its working fluid."),
            Document("oil", "1973 oil crisis", "o.txt", "In October 1973 OAPEC proclaimed an oil "
                     "embargo.")]


@pytest.fixture(scope="module")
def hash_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from citeqa.retrieval import build_index_from_documents

    out = tmp_path_factory.mktemp("src") / "idx"
    build_index_from_documents(_docs(), out, _rcfg(), progress=False)
    return out


def test_dense_turned_off_in_the_settings_serves_bm25_over_a_dense_index(hash_index: Path
                                                                          ) -> None:
    from citeqa.retrieval import HybridRetriever, Index

    r = HybridRetriever(Index.load(hash_index), replace(_rcfg(), dense=False))
    hits = r.search("oil embargo", 2)
    assert hits and all(h.dense is None and not h.fused for h in hits)
    with pytest.raises(ConfigError, match="no dense part"):
        r.search("oil", 1, mode="dense")


def test_the_fusion_setting_dense_makes_dense_the_default_mode(hash_index: Path) -> None:
    from citeqa.retrieval import HybridRetriever, Index

    r = HybridRetriever(Index.load(hash_index), replace(_rcfg(), fusion="dense"))
    hits = r.search("oil embargo", 2)
    assert hits and all(h.bm25 is None and h.dense is not None and not h.fused for h in hits)


def test_the_query_embedder_is_the_one_the_index_names(hash_index: Path) -> None:
    """The manifest's embedder, not the settings' (which only name one where it records none)."""
    from citeqa.retrieval import HashEmbedder, HybridRetriever, Index

    r = HybridRetriever(Index.load(hash_index), replace(_rcfg(), embedder="minilm"))
    assert isinstance(r.embedder, HashEmbedder)


def test_the_settings_embedder_does_not_matter_without_a_dense_part(hash_index: Path,
                                                                   tmp_path: Path) -> None:
    from citeqa.retrieval import HybridRetriever, Index, build_index_from_documents

    build_index_from_documents(_docs(), tmp_path / "bm25", replace(_rcfg(), dense=False),
                               progress=False)
    minilm = replace(_rcfg(), embedder="minilm")
    assert HybridRetriever.open(tmp_path / "bm25", minilm).search("Rollo", 1)
    # nor an index's dense part when the settings turn it off
    off = HybridRetriever.open(tmp_path / "bm25", replace(minilm, dense=False))
    assert off.with_index(Index.load(hash_index)).search("Rollo", 1)


def test_a_query_embedder_of_the_same_model_id_but_another_width_is_refused(hash_index: Path
                                                                            ) -> None:
    from citeqa.errors import IndexError_
    from citeqa.retrieval import HashEmbedder, HybridRetriever, Index

    narrow = HashEmbedder(dim=64)
    narrow.model_id = "hash-bow-256"
    with pytest.raises(IndexError_, match="dim 256.*dim 64"):
        HybridRetriever(Index.load(hash_index), _rcfg(), embedder=narrow)


def test_hybrid_reads_deeper_when_copies_leave_fewer_than_k_and_one_list_is_full(
        tmp_path: Path) -> None:
    """BM25 matched fewer than the depth, the dense list filled it: more was there to read."""
    from citeqa.retrieval import HybridRetriever, build_index_from_documents
    from citeqa.types import Document

    docs = [Document("ch", "Chapter", "ch.html", "Granite is an igneous rock."),
            Document("book", "Book", "book.html", "Granite is an igneous rock.\n\n"
                     + "Filler words " * 12 + "end.")]  # its first passage: the chapter's copy
    docs += [Document(f"f{i}", "Other", f"f{i}.txt", f"Sandstone layer number {i} is soft.")
             for i in range(6)]
    build_index_from_documents(docs, tmp_path / "idx", replace(
        _rcfg(), candidates_per_retriever=1), progress=False)
    r = HybridRetriever.open(tmp_path / "idx")
    hits = r.search("igneous", 3, mode="hybrid")
    assert len(hits) == 3
    assert hits[0].passage.doc_id == "ch"


# --------------------------------------------------------------------------- embedders


def test_the_hash_embedders_vectors_are_its_names_fixed_function() -> None:
    """An index embedded by "hash-bow-256" is queried by it later: the function is the name."""
    import zlib

    from citeqa.retrieval import load_embedder

    e = load_embedder("hash")
    assert (e.model_id, e.dim) == ("hash-bow-256", 256)
    (v,) = e.embed(["zebra"])
    h = zlib.crc32(b"zebra")
    want = np.zeros(256, dtype=np.float32)
    want[h % 256] = 1.0 if (h >> 31) & 1 else -1.0
    np.testing.assert_array_equal(v, want)


def test_minilm_rows_follow_their_texts_whatever_the_batches(tiny_minilm_dir: Path) -> None:
    """Texts are embedded longest first; each row goes back to its text's place, unit length,
    and a text is cut at max_length tokens."""
    from citeqa.retrieval.embed import MiniLMEmbedder

    e = MiniLMEmbedder(tiny_minilm_dir, cpu_dtype="fp32", fp32_kernel="torch")
    texts = ["short", "a somewhat longer text about rocks", "mid length one", "x " * 10]
    together = e.embed(texts, batch_size=2)
    alone = np.concatenate([e.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    long = "granite " * 300  # past 256 tokens: what follows is cut
    a, b = e.embed([long, long + "basalt " * 100])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_zone_id_does_not_hide_a_metadata_address_from_check_ip() -> None:
    from citeqa.ingest import check_ip

    with pytest.raises(BlockedURLError, match="metadata"):
        check_ip("[fd00:ec2::254%eth0]", allow_private=True)
    check_ip("fe80::1%eth0", allow_private=True)  # link-local: allowed with the opt-in


def test_an_existing_cache_folder_is_used_even_read_only(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    import os

    from citeqa.config import default_cache_dir

    cache = tmp_path / ".cache" / "citeqa"
    cache.mkdir(parents=True)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only everywhere
    assert default_cache_dir() == cache
    cache.rmdir()  # not there, and its parent not writable: the temp folder's
    assert default_cache_dir().name.startswith("citeqa-cache-")


def test_an_unknown_setting_is_warned_about_with_the_closest_name(
        clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from citeqa.config import Settings

    clean_env.setenv("CITEQA_PRESTE", "tiny")
    clean_env.setenv("CITEQA_TOPK", "3")
    with caplog.at_level("WARNING", logger="citeqa.config"):
        Settings()
    said = sorted(r.getMessage() for r in caplog.records)
    assert said == ["CITEQA_PRESTE is not a citeqa setting and is ignored (did you mean "
                    "CITEQA_PRESET?)", "CITEQA_TOPK is not a citeqa setting and is ignored"]


def test_a_metadata_address_is_not_said_to_be_reachable_by_opting_in() -> None:
    with pytest.raises(BlockedURLError) as info:
        fetcher().fetch("http://169.254.169.254/")
    assert "metadata" in str(info.value) and "allow-private-urls" not in str(info.value)
