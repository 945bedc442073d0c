"""Edges of citeqa.ingest's sources, encoding and title rules that a mutation review found
untested: which record field wins, what is skipped, how a page's charset is found, where a
title's limits lie, and reStructuredText's heads."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from citeqa.ingest import Fetcher, FetchPolicy, LoadResult, doc_id_for, load_sources
from citeqa.ingest.encoding import decode_page
from citeqa.ingest.title import PROSE_BEFORE_MAX_CHARS, TITLE_MAX_CHARS, title_from_text
from citeqa.text import WRAPPED_MIN_CHARS


def load(*sources: str | Path, **kw) -> LoadResult:
    return load_sources([str(s) for s in sources], progress=False, **kw)


def reasons(result: LoadResult) -> list[tuple[str, str]]:
    return [(s.source, s.reason) for s in result.skipped]


# --------------------------------------------------------------------------- URLs and files


def test_a_fetched_page_with_no_text_is_skipped() -> None:
    """A page of white space alone was indexed as an empty document."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/html"},
                              text="<html><body><p>  \n </p></body></html>")

    fetcher = Fetcher(FetchPolicy(), transport=httpx.MockTransport(handler),
                      resolver=lambda host, port: ["93.184.216.34"])
    result = load("https://example.com/blank", fetcher=fetcher)
    assert result.documents == []
    assert reasons(result) == [("https://example.com/blank", "the page has no text")]


def test_an_html_file_declaring_a_charset_but_holding_a_nul_is_skipped_as_binary(
        tmp_path: Path) -> None:
    """Its <meta> charset decoded the NUL into the document's text."""
    f = tmp_path / "page.html"
    f.write_bytes(b'<html><head><meta charset="windows-1252"><title>T</title></head>'
                  b"<body><p>caf\xe9 \x00 bar</p></body></html>")
    result = load(f)
    assert result.documents == []
    ((source, reason),) = reasons(result)
    assert source == str(f) and reason.startswith("binary file (contains NUL bytes)")


# --------------------------------------------------------------------------- JSON records


def test_a_json_lines_file_of_blank_lines_is_said_to_have_no_records(tmp_path: Path) -> None:
    """It yielded nothing, and nothing said why."""
    f = tmp_path / "blank.jsonl"
    f.write_text("\n\n  \n\n", encoding="utf-8")
    result = load(f)
    assert result.documents == []
    assert reasons(result) == [(str(f), "the file has no records")]


def test_a_json_lines_file_whose_first_line_is_a_list_reads_its_other_lines_as_records(
        tmp_path: Path) -> None:
    """The list on line 1 was taken for the whole file: the records after it were lost."""
    f = tmp_path / "a.jsonl"
    f.write_text('[{"text": "alpha"}]\n{"text": "beta"}\n', encoding="utf-8")
    result = load(f)
    assert [d.text for d in result.documents] == ["beta"]
    assert reasons(result) == [(str(f), "line 1: expected a JSON object with a 'text' field")]


def test_a_records_doc_id_beats_its_id_and_its_source_beats_its_url(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"id": "idA", "doc_id": "docB", "text": "x",
                             "url": "https://u.org/x", "source": "handbook/x"}) + "\n",
                 encoding="utf-8")
    (doc,) = load(f).documents
    assert (doc.doc_id, doc.source) == ("docB", "handbook/x")


def test_a_records_blank_title_falls_back_to_the_first_line_of_its_text(tmp_path: Path) -> None:
    """A title of spaces made a document titled "" (nothing to show for it in a result)."""
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"title": "  ", "text": "Zebra facts\nThey have stripes."}) + "\n",
                 encoding="utf-8")
    (doc,) = load(f).documents
    assert doc.title == "Zebra facts"


def test_an_untitled_squad_article_is_named_by_its_position_and_a_blank_context_skipped(
        tmp_path: Path) -> None:
    """An article without a title had sources "sq.json#/0" and an empty title; a paragraph
    of white space was a document."""
    f = tmp_path / "sq.json"
    paragraphs = [{"context": "   ", "qas": []}, {"context": "real", "qas": []}]
    f.write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}), encoding="utf-8")
    result = load(f)
    (doc,) = result.documents
    assert (doc.text, doc.title, doc.source) == ("real", "article-0", f"{f}#article-0/1")
    assert doc.doc_id == doc_id_for(f"{f}#article-0/1")
    assert reasons(result) == [(f"{f}#article-0/0", "SQuAD paragraph has no 'context' text")]


# --------------------------------------------------------------------------- page encodings


# a 3 KB licence comment first: past the 1,024 bytes HTML's prescan reads, within the 4,096 read
_BEFORE_META = b"<!--" + b"x" * 3000 + b"-->"


@pytest.mark.parametrize(("body", "declared", "html", "text"), [
    # an ASCII label is windows-1252 as browsers read it: curly quotes, not U+FFFD
    (b"<p>\x93hi\x94</p>", "us-ascii", True, "<p>\u201chi\u201d</p>"),
    # a <meta> charset anywhere in the first 4 KB, in any case, quoted or not
    (_BEFORE_META + b'<meta charset="windows-1252"><p>caf\xe9</p>', None, True,
     _BEFORE_META.decode() + '<meta charset="windows-1252"><p>caf\u00e9</p>'),
    (b'<META CHARSET="windows-1252"><p>caf\xe9</p>', None, True,
     '<META CHARSET="windows-1252"><p>caf\u00e9</p>'),
    (b"<meta charset=windows-1252><p>caf\xe9</p>", None, True,
     "<meta charset=windows-1252><p>caf\u00e9</p>"),
    # the server's header beats the <meta>
    (b"<meta charset=windows-1252><p>caf\xc3\xa9</p>", "utf-8", True,
     "<meta charset=windows-1252><p>caf\u00e9</p>"),
    # plain text's "<meta>" is text, not a declaration
    (b"x <meta charset=windows-1252> caf\xc3\xa9", None, False,
     "x <meta charset=windows-1252> caf\u00e9"),
    # bytes that do not decode become U+FFFD (the page is read, not refused)
    (b"<p>caf\xe9</p>", None, True, "<p>caf\ufffd</p>"),
])
def test_a_pages_charset_is_its_headers_else_its_metas_as_browsers_read_them(
        body: bytes, declared: str | None, html: bool, text: str) -> None:
    assert decode_page(body, declared, html=html) == text


# --------------------------------------------------------------------------- titles


_LONGEST = "x" * TITLE_MAX_CHARS
_WRAPPED = "Zebras are the African equines with a striped coat"  # WRAPPED_MIN_CHARS wide


@pytest.mark.parametrize(("text", "rst", "markdown", "title"), [
    # a title of exactly TITLE_MAX_CHARS is kept whole, as a heading or a first line
    (f"# {_LONGEST}\n\nBody.\n", False, False, _LONGEST),
    (f"{_LONGEST}\n\nBody.\n", False, False, _LONGEST),
    # a line of a wrapping width going on in lower case is prose, not a title
    (f"{_WRAPPED}\nof black and white.\n", False, False, "fb"),
    # a rule around a title is no title
    ("==========\nREADME\n==========\n\nSome text.\n", False, False, "README"),
    # Markdown: a block quote is a notice, not a title; nested emphasis is read through; the
    # first heading is the one first in the text, whatever its kind
    ("> Deprecated: see the new repo\n\nThis tool is old.\n", False, True, "fb"),
    ("# **_Proj_**\n\nText.\n", False, True, "Proj"),
    ("Why Proj?\n=========\n\n# Install\n\nText.\n", False, True, "Why Proj?"),
    # a heading further in than PROSE_BEFORE_MAX_CHARS names no document
    ("\n" * (PROSE_BEFORE_MAX_CHARS + 1) + "# Section\n\nText.\n", False, True, "fb"),
    # reStructuredText: the :title: field (any case; the first one) beats a section title
    (":Title: Guide\n\nThis is prose.\n", True, False, "Guide"),
    (":title: First\n:title: Second\n\nThis is prose.\n", True, False, "First"),
    (":title: Guide\n\nSection\n=======\n\nText.\n", True, False, "Guide"),
    # ... a reference's title is its text, not its target
    ("`Proj <https://x.org>`_\n======================\n\nText.\n", True, False, "Proj"),
    # ... a transition over prose, an indented line (a block quote) over a rule, and a field
    # before prose are no titles
    ("----------\nThis is the first sentence.\nmore prose here.\n", True, False, "fb"),
    ("   A quoted sentence.\n======\n", True, False, "fb"),
    (":orphan:\n\nThis is the first sentence.\n", True, False, "fb"),
])
def test_a_title_is_found_within_its_limits_and_its_markups_rules(
        text: str, rst: bool, markdown: bool, title: str) -> None:
    assert len(_WRAPPED) == WRAPPED_MIN_CHARS
    assert title_from_text(text, "fb", rst=rst, markdown=markdown) == title
