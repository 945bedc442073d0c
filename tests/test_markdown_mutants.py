"""Mutation-testing round on text extraction (citeqa.markdown, citeqa.ingest.html,
citeqa.ingest.title, citeqa.ingest.encoding): the markup a reader does not read, front matter,
titles' edges, what an HTML page shows and where it sends, and how a page's bytes are decoded;
boundaries and branches the other tests left open."""

from __future__ import annotations

import pytest

from citeqa.ingest.encoding import decode, decode_page, meta_declared, text_codec
from citeqa.ingest.html import REDIRECT_MAX_CHARS, extract_html
from citeqa.ingest.title import TITLE_MAX_CHARS, cap_title, title_from_text, title_of_source
from citeqa.markdown import (
    front_matter,
    headings_out,
    links_only,
    read_text,
    read_words,
    unread_out,
    without_front_matter,
)

# --- markdown: what a reader reads --------------------------------------------------------------


@pytest.mark.parametrize(("text", "read"), [
    # a footnote's definition is prose, a link reference definition is not
    ("[^1]: footnote\n", "[^1]: footnote\n"),
    ("[1]: https://x.org\n", "\n"),
    # MyST's target, Liquid's tag, an MDX export, a URL alone (ftp's too) are not read
    ("(label)=\nWords\n", "\nWords\n"),
    ("{% include toc %} Words\n", " Words\n"),
    ("export const meta = {a: 1}\nWords\n", "\nWords\n"),
    ("ftp://files.example.org/x.tar\nWords\n", "\nWords\n"),
])
def test_markup_no_one_reads_is_left_out_and_the_rest_kept(text: str, read: str) -> None:
    assert unread_out(text) == read


def test_markup_left_out_keeps_its_line_breaks() -> None:
    """Offsets by line (a passage's lines) stay those of the text."""
    assert unread_out("a <!-- x\ny\nz --> b") == "a \n\n b"


def test_front_matter_blanked_keeps_a_crlf_files_carriage_returns() -> None:
    text = "---\r\ntitle: A\r\n---\r\nBody"
    out = without_front_matter(text)
    assert out == "   \r\n        \r\n   \r\nBody"
    assert len(out) == len(text)


@pytest.mark.parametrize("text", [
    "---\r\ntitle: A\r\n\r\n---\r\nBody",  # a blank line of a CRLF file
    "\ufeff---\ntitle: A\n---\nBody",  # after a byte-order mark
    "---\ntitle: A\n...\nBody",  # YAML's end of document
    "---\ntags:\n- a\n- b\n---\nBody",  # a list's items
])
def test_front_matter_is_found_in_each_form_it_takes(text: str) -> None:
    assert front_matter(text) is not None
    assert "title" not in without_front_matter(text) and "- a" not in without_front_matter(text)


@pytest.mark.parametrize(("text", "quotes", "words"), [
    ("> a notice\n", True, True),
    ("> a notice\n", False, False),
    ("<!--\nhidden words\n-->\n", True, False),  # a comment over lines, "<" in it
    ("import X from 'y'\n", True, False),
    ("export const x = 1\n", True, False),
    ("Plain words\n", True, True),
])
def test_words_a_reader_reads_are_told_from_markup_and_asides(text: str, quotes: bool,
                                                               words: bool) -> None:
    assert read_words(text, quotes=quotes) is words


def test_headings_lines_go_but_a_list_item_over_a_rule_stays() -> None:
    assert headings_out("Title\n=====\nText") == "\nText"
    assert headings_out("- item\n---\nText") == "- item\n---\nText"
    assert headings_out("#\nText") == "\nText"  # "#" alone is an (empty) heading's line


def test_a_bar_of_links_has_no_words_of_its_own() -> None:
    assert links_only("[Website] | [Learn](https://x.org)")
    assert not links_only("[Website] and more")


# --- titles -------------------------------------------------------------------------------------


def test_a_title_cut_is_the_cap_long_ending_in_an_ellipsis_without_a_space_before_it() -> None:
    cut = cap_title("x" * 200)
    assert len(cut) == TITLE_MAX_CHARS and cut.endswith("x…")
    spaced = cap_title("a" * (TITLE_MAX_CHARS - 2) + " bbbb")
    assert spaced == "a" * (TITLE_MAX_CHARS - 2) + "…"


def test_a_front_matter_title_is_capped() -> None:
    title = title_from_text(f"---\ntitle: {'y' * 200}\n---\nBody\n", "fb", markdown=True)
    assert title == cap_title("y" * 200)


def test_a_page_served_as_markdown_is_titled_by_markdowns_rules_whatever_its_name() -> None:
    text = "---\ntitle: Named\n---\nBody\n"
    assert title_of_source(text, "fb", "https://x.org/page", markdown=True) == "Named"


_WRAPPED = "Zebras are the African equines with a striped coat"  # WRAPPED_MIN_CHARS wide


@pytest.mark.parametrize(("text", "markdown", "title"), [
    # a line of a wrapping width alone is a title; going on (indented) in lower case, prose
    (_WRAPPED, False, _WRAPPED),
    (f"{_WRAPPED}\n   of black and white.\n", False, "fb"),
    # strong emphasis left open on the first line goes on below: prose
    ("__Install the tool\nfirst.__\n", True, "fb"),
    # YAML front matter's values: quotes' escapes, a block scalar's lines, a comment's cut
    ("---\ntitle: 'It''s'\n---\n", True, "It's"),
    ('---\ntitle: "A\\nB"\n---\n', True, "A B"),
    ("---\ntitle: >-\n  Folded\n  title\nother: x\n---\n", True, "Folded title"),
    ("---\ntitle: a\t# comment\n---\n", True, "a"),
    ("---\ntitle: a # b\t# c\n---\n", True, "a"),
    # a closing sequence of #s follows a space ("C#" keeps its #)
    ("# Learn C#\n", True, "Learn C#"),
    ("# Title ##\n", True, "Title"),
    # a list's item over a rule is no setext heading
    ("- item\n---\n\nText.\n", True, "fb"),
    # a heading of a linked logo alone is titled by its alt text
    ("# [![Logo](logo.png)](https://x.org)\n\nText.\n", True, "Logo"),
    # a code block ends a line of a wrapping width: no prose going on after it
    (f"{_WRAPPED}\n```\ncode\n```\nof black and white.\n", True, _WRAPPED),
    # reStructuredText of fields and directives alone has no title
    (":orphan:\n\n.. image:: x.png\n", False, "fb"),
])
def test_a_titles_edges(text: str, markdown: bool, title: str) -> None:
    rst = text.startswith(":orphan:")
    assert title_from_text(text, "fb", markdown=markdown, rst=rst) == title


def test_a_heading_exactly_at_the_prose_limit_still_names_the_document() -> None:
    from citeqa.ingest.title import PROSE_BEFORE_MAX_CHARS

    text = "\n" * PROSE_BEFORE_MAX_CHARS + "# Section\n\nText.\n"
    assert title_from_text(text, "fb", markdown=True) == "Section"


# --- HTML ---------------------------------------------------------------------------------------


def _refresh(delay: str, url: str = "new.html") -> str:
    return f'<meta http-equiv="refresh" content="{delay}; url={url}">'


def test_a_refresh_after_at_most_five_seconds_of_a_short_page_is_a_redirect() -> None:
    assert extract_html(_refresh("5")).redirect() == "new.html"
    assert extract_html(_refresh("5.1")).redirect() is None
    text = "x" * REDIRECT_MAX_CHARS
    assert extract_html(_refresh("0") + f"<p>{text}</p>").redirect() == "new.html"
    assert extract_html(_refresh("0") + f"<p>{text}y</p>").redirect() is None


def test_a_refreshs_quoted_address_and_only_the_first_refresh_count() -> None:
    page = ("<meta http-equiv=refresh content=\"0; url='a b.html'\">"
            + _refresh("0", "second.html"))
    assert extract_html(page).refresh_to == "a b.html"


@pytest.mark.parametrize(("html", "text"), [
    ('<div aria-hidden="false">Shown</div><p>x</p>', "Shown\n\nx"),
    ('<div data-nosnippet>1 2 3</div><p>x</p>', "x"),
    ("<dialog open>Shown</dialog><p>x</p>", "Shown\n\nx"),
    ('<p style="DISPLAY: NONE">hid</p><p>x</p>', "x"),
    ("<textarea>typed</textarea><p>x</p>", "x"),
    # a class, id or summary that only looks like navigation's
    ('<body class="enable-search-modal"><nav>Menu</nav><p>Text</p></body>', "Text"),
    ('<p><a class="skipped" href="#s">Skipped tests</a> here</p>', "Skipped tests here"),
    ('<div class="has-toc"><p>Body</p></div><p>x</p>', "Body\n\nx"),
    ('<div class="copy-text">Body</div><p>x</p>', "Body\n\nx"),
    ('<div class="modal-open"><p>Body</p></div><p>x</p>', "Body\n\nx"),
    ('<table summary="Site navigation"><tr><td>Cell</td></tr></table><p>x</p>', "Cell\n\nx"),
    # a block of links with a "next" among others is no navigation bar; "top" is one
    ('<div>Next: <a rel=next href=b.html>B</a> <a href=c.html>C</a></div><p>body</p>',
     "Next: B C\n\nbody"),
    ("<div><a rel=top href=t.html>Top</a></div><p>body</p>", "body"),
    ('<div>Next: <a rel=next href=b.html>B</a> <a href=c.html>Index</a></div><p>body</p>',
     "Next: B Index\n\nbody"),  # (a link of no rel, though its text is a label)
    ("<div>Next: <a rel=next href=b.html>B</a></div><p>body</p>", "body"),  # (labels alone)
    # a link's own block holds words: its block is more than a navigation bar
    ("<div>Next: <a rel=next href=b.html><p>Chapter Two</p></a></div><p>body</p>",
     "Next:\n\nChapter Two\n\nbody"),
    # a page of navigation alone keeps it
    ("<nav><p>Only nav</p></nav>", "Only nav"),
    # code: its copy button is no text, blocks in it are lines, a line's indentation kept
    ("<pre><button>Copy</button>code</pre>", "code"),
    ("<pre><div>a</div><div>b</div></pre>", "a\nb"),
    ("<pre>if x:\n    <span>y</span></pre>", "if x:\n    y"),
    ("<div hidden><pre>x</pre></div><p>a</p><p>b</p>", "a\n\nb"),
    # a <p> in a hidden <p>'s button stays in it (a button is a scope)
    ("<p hidden><button><p>y</p></button></p><p>z</p>", "z"),
    # a cell's permalink goes, its " | " stays
    ('<table><tr><td>a</td><td><a href="#x">¶</a> b</td></tr></table>', "a | b"),
    # a "¶" linking elsewhere is the page's text
    ('<h2>Head <a href="other.html">¶</a></h2>', "Head ¶"),
])
def test_what_a_page_shows(html: str, text: str) -> None:
    assert extract_html(html).text == text


def test_a_self_closed_block_in_hidden_xhtml_breaks_no_paragraph() -> None:
    assert extract_html("<p>a<span hidden><br/><div/></span>b</p>", xml=True).text == "ab"


def test_an_svgs_title_is_not_the_pages() -> None:
    assert extract_html("<body><svg><title>Icon</title></svg><p>x</p></body>").title == ""


def test_a_head_left_open_hides_no_body() -> None:
    page = "<html><head><title>T</title><body><p>Text</p></body>"
    assert (extract_html(page).text, extract_html(page).title) == ("Text", "T")


# --- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "declared", "text"), [
    # a UTF-32 LE mark begins with UTF-16 LE's: the longer one is read first
    (b"\xff\xfe\x00\x00" + "hi".encode("utf-32-le"), None, "hi"),
    # a label of no text codec (or none that reads any bytes) is as if there were none
    ("café".encode(), "idna", "café"),
    ("café".encode(), "base64", "café"),
    # a label with white space round it; an ISO-8859-1 label is windows-1252
    ("café".encode(), " utf-8 ", "café"),
    (b"\x93hi\x94", "iso-8859-1", "\u201chi\u201d"),
    # windows-1252's undefined bytes are the C1 controls of their numbers
    (b"a\x81b\x9d", "windows-1252", "a\x81b\x9d"),
])
def test_a_pages_bytes_are_decoded_as_a_browser_decodes_them(data: bytes, declared: str | None,
                                                             text: str) -> None:
    assert decode_page(data, declared, html=False) == text


def test_a_meta_naming_a_wide_encoding_is_read_as_utf_8() -> None:
    assert meta_declared(b'<meta charset="utf-16">') == ("utf-16", "utf-8")
    assert text_codec("base64") is None


# --- defects this round found (fixed with these tests) ---------------------------------------


def test_an_images_alt_text_over_lines_is_no_words_a_reader_reads() -> None:
    """read_words' fast path took a line inside a reference image's alt text over lines
    ("![a\\nwords\\nb][ref]": no "<" nor "](") for words, and the image for the title."""
    image = "![Logo of\nthe whole\nproject][logo]\n"
    assert read_text(image).strip() == ""
    assert read_words(image) is False
    # so it stands before a README's title as a one-line image does
    text = image + "\nWhy Proj?\n=========\n\nText.\n"
    assert title_from_text(text, "fb", markdown=True) == "Why Proj?"


@pytest.mark.parametrize(("text", "codec", "label"), [
    ("朱镕基", "gbk", "gb2312"),
    ("똠방각하", "cp949", "euc-kr"),
    ("ğ €", "cp1254", "iso-8859-9"),
    ("€ ไทย", "cp874", "tis-620"),
    ("① 日本", "cp932", "shift_jis"),
])
def test_a_legacy_label_is_decoded_as_browsers_decode_it(text: str, codec: str,
                                                         label: str) -> None:
    """Only latin-1 and ASCII labels were read as browsers read them (WHATWG): a gb2312 page
    lost what GBK adds ("镕"), an EUC-KR page windows-949's syllables, and so on."""
    assert decode_page(text.encode(codec), label, html=False) == text


@pytest.mark.parametrize(("text", "codec", "label"), [
    ("ภาษาไทย €", "cp874", "windows-874"),
    ("① 日本語", "cp932", "x-sjis"),
    ("朱镕基", "gbk", "X-GBK"),
    ("עברית", "iso8859-8", "iso-8859-8-i"),
    ("Привет", "cp1251", "x-cp1251"),
    ("café", "mac-roman", "x-mac-roman"),
])
def test_a_whatwg_label_python_lacks_still_names_its_encoding(text: str, codec: str,
                                                              label: str) -> None:
    """Labels browsers know and Python's codecs do not (a Thai page's windows-874) named no
    encoding: the page was read as UTF-8, every letter of it a U+FFFD."""
    assert decode_page(text.encode(codec), label, html=False) == text


# The WHATWG Encoding Standard's labels, but for its "replacement" ones (ISO-2022-KR/CN, HZ),
# UTF-16's and x-user-defined: each names an encoding citeqa reads
WHATWG_LABELS = """unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8
866 cp866 csibm866 ibm866 csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2
iso_8859-2:1987 l2 latin2 csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3
iso_8859-3:1988 l3 latin3 csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4
iso_8859-4:1988 l4 latin4 csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595
iso_8859-5 iso_8859-5:1988 arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114
iso-8859-6 iso-8859-6-e iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987
csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597
iso_8859-7 iso_8859-7:1987 sun_eu_greek csiso88598e csisolatinhebrew hebrew iso-8859-8
iso-8859-8-e iso-ir-138 iso8859-8 iso88598 iso_8859-8 iso_8859-8:1988 visual csiso88598i
iso-8859-8-i logical csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6
iso-8859-13 iso8859-13 iso885913 iso-8859-14 iso8859-14 iso885914 csisolatin9 iso-8859-15
iso8859-15 iso885915 iso_8859-15 l9 iso-8859-16 cskoi8r koi koi8 koi8-r koi8_r koi8-ru koi8-u
csmacintosh mac macintosh x-mac-roman dos-874 iso-8859-11 iso8859-11 iso885911 tis-620
windows-874 cp1250 windows-1250 x-cp1250 cp1251 windows-1251 x-cp1251 ansi_x3.4-1968 ascii
cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 iso_8859-1
iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252 cp1253 windows-1253 x-cp1253 cp1254
csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 iso_8859-9:1989 l5 latin5
windows-1254 x-cp1254 cp1255 windows-1255 x-cp1255 cp1256 windows-1256 x-cp1256 cp1257
windows-1257 x-cp1257 cp1258 windows-1258 x-cp1258 x-mac-cyrillic x-mac-ukrainian chinese
csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk gb18030 big5
big5-hkscs cn-big5 csbig5 x-x-big5 cseucpkdfmtjapanese euc-jp x-euc-jp csiso2022jp iso-2022-jp
csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis cseuckr csksc56011987
euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 windows-949""".split()


def test_every_whatwg_label_names_an_encoding() -> None:
    """A label Python's codecs lack (iso88599, cseuckr, koi8, ...) named none: the page was
    read as UTF-8."""
    assert [label for label in WHATWG_LABELS if text_codec(label) is None] == []


@pytest.mark.parametrize(("data", "label", "text"), [
    (b"T\xfcrk\x8e", "iso-8859-9", "Türk\x8e"),  # windows-1254 leaves 0x8E undefined
    (b"\xa1\x81", "tis-620", "ก\x81"),  # windows-874 leaves 0x81 undefined
    (b"\x81\x91", "latin1", "\x81\u2018"),
])
def test_an_undefined_byte_of_0x80_to_0x9f_is_its_c1_control(data: bytes, label: str,
                                                             text: str) -> None:
    """As WHATWG's decoders (and Python's ISO-8859 codecs) read it, in a page and in a local
    file (read strictly): mapping ISO-8859-9 to windows-1254 turned it into U+FFFD, and a local
    HTML file holding one was refused."""
    assert decode_page(data, label, html=False) == text
    assert decode(data, text_codec(label) or "") == text


def test_another_undefined_byte_of_a_windows_code_page_is_no_c1_control() -> None:
    with pytest.raises(UnicodeDecodeError):
        decode(b"\xdb", "cp874")  # (undefined in windows-874; not 0x80-0x9F)
    assert decode(b"\xdb", "cp874", errors="replace") == "\ufffd"
