"""Markdown as a reader reads it: the markup no one reads (``unread_out``: HTML comments and
tags, images, reference definitions, MyST's targets, MDX's imports), links read as their words
(``read_text``, ``read_words``), front matter (``front_matter``: metadata, not prose), headings'
lines (``headings_out``), and which sources are Markdown (``is_markdown``). Titles
(``title.py``) and chunking (front matter, and a passage of markup and headings alone, are not
indexed: ``retrieval.chunk.passage_spans``) read Markdown so. What BM25 and the embedder see of
a passage stays its text as it is (a reading that drops markup also drops "a < b", "Vec<u8>",
code), and so do a document's text, its passages and quotes.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from citeqa.text import ATX_HEADING

# the names of Markdown files (a folder's, or a URL's path's)
MARKDOWN_EXTENSIONS = frozenset({".md", ".markdown", ".mdown", ".mkd", ".mdx"})

# A link's or an image's address in parentheses (a title in quotes too), one level of them
# inside ("Logo_(2019).svg", "(logo)"); an HTML tag (a name right after "<": "a < b" is none)
ADDRESS = r"\((?:[^()]|\([^()]{0,500}\)){0,1000}\)"
TAG = r"</?[A-Za-z][A-Za-z0-9:-]{0,50}(?:[\s/][^<>]{0,1000})?>"
# What a Markdown text holds that a reader does not read: HTML comments and tags, linked images
# (badges) and images, link reference definitions ("[1]: https://x 'title'": an address, then
# a title at most; "[^1]:" is a footnote, "[Breaking]: words" prose), MyST's targets
# ("(label)="), MDX's imports ("import X from 'y'") and exports, a URL alone on its line,
# Liquid's tags ("{% include toc %}"); a line may end in CRLF; each bounded, and a comment or a
# Liquid tag never runs past the next one's start, so a long run of "<!--" or "{{" is read in
# linear time
_IMPORTED = r"(?:\w+|\*[ \t]+as[ \t]+\w+|\{[^}\n]{0,500}\})"
_UNREAD_RE = re.compile(rf"<!--(?:(?!<!--|-->)[\s\S]){{0,2000}}-->|{TAG}"
                        rf"|\[!\[[^\[\]]{{0,500}}\]{ADDRESS}\]{ADDRESS}"
                        rf"|!\[[^\[\]]{{0,500}}\](?:{ADDRESS}|\[[^\[\]]{{0,500}}\])"
                        r"|^ {0,3}\[(?!\^)[^\]\n]{1,500}\]:[ \t]*<?[^\s<>]{1,2000}>?"
                        r"(?:[ \t]+(?:\"[^\"\n]{0,500}\"|'[^'\n]{0,500}'"
                        r"|\([^()\n]{0,500}\)))?[ \t]*\r?$"
                        r"|^\([^()\n]{1,200}\)=[ \t]*\r?$"
                        rf"|^import[ \t]+{_IMPORTED}(?:[ \t]*,[ \t]*{_IMPORTED})?[ \t]+from[ \t]+"
                        r"['\"][^'\"\n]{1,500}['\"];?[ \t]*\r?$"
                        r"|^import[ \t]+['\"][^'\"\n]{1,500}['\"];?[ \t]*\r?$"
                        r"|^export[ \t]+(?:const|default|function|let|var|class)\b[^\n]{0,1000}$"
                        r"|^[ \t]*(?:https?|ftp)://[^\s<>]{1,2000}[ \t]*\r?$"
                        r"|\{%[^\n{}%]{0,200}%\}|\{\{[^\n{}]{0,200}\}\}",
                        re.MULTILINE)
# YAML front matter (--- ... --- or ...), or TOML (+++ ... +++), at a Markdown file's start:
# metadata (layout, date, tags), read for its title (``ingest/title.py``), never as a passage;
# each of its lines a key's ("title: x", "date = 2024"), a table's ("[extra]"), a list item's,
# a comment's, an indented one or blank (a "---" rule over prose and another is no front matter);
# after a byte-order mark too (Windows editors write one: its front matter was a passage)
_FRONT_MATTER_RE = re.compile(r"\A\ufeff?(?:(---)|\+\+\+)[ \t]*\r?\n(.*?)"
                              r"^(?(1)(?:---|\.\.\.)|\+\+\+)[ \t]*\r?$", re.DOTALL | re.MULTILINE)
_METADATA_LINE_RE = re.compile(r"[ \t]|#|-(?:[ \t]|$)|[\w\"'][^:=\n]{0,200}?[ \t]*[:=](?:[ \t]|$)"
                               r"|\[[^\]\n]{1,200}\][ \t]*$|\r?$")
# a heading: a line of text underlined by =s (level 1) or -s (level 2: not under a list item,
# "- item\n---" is a list, then a rule); a list item's start
SETEXT_RE = re.compile(r"^ {0,3}(\S[^\r\n]*)\r?\n {0,3}(?:=+|-+)[ \t]*\r?$", re.MULTILINE)
LIST_ITEM_RE = re.compile(r"(?:[-*+]|\d{1,9}[.)])(?:\s|$)")
# a "#" heading's line (text.ATX_HEADING's, or "#" alone)
_ATX_LINE_RE = re.compile(rf"^{ATX_HEADING}[^\n]*$|^ {{0,3}}#{{1,6}}\r?$", re.MULTILINE)
# a link: [words](address), [words][reference], [reference] (a shortcut reference)
_ANY_LINK_RE = re.compile(rf"\[([^\[\]]{{0,500}})\](?:{ADDRESS}|\[[^\[\]]{{0,500}}\])?")
# a block quote's line (a notice before a README's title: "> [!IMPORTANT]")
_QUOTED_LINE_RE = re.compile(r"^ {0,3}>.*$", re.MULTILINE)


def source_suffix(source: str) -> str:
    """The extension, lower case, of the file a document's ``source`` (a path, or a URL's path)
    names ("" for none)."""
    try:
        path = urlsplit(source).path if "://" in source else source
    except ValueError:  # an address urlsplit refuses ("http://[oops/a.md": a record's source)
        path = source
    return PurePosixPath(path.replace("\\", "/")).suffix.lower()


def front_matter(text: str) -> re.Match[str] | None:
    """A Markdown text's front matter (``_FRONT_MATTER_RE``: its body is group 2), or None."""
    m = _FRONT_MATTER_RE.match(text)
    if m is None or not all(_METADATA_LINE_RE.match(line)
                            for line in m.group(2).split("\n")):
        return None
    return m


def without_front_matter(text: str) -> str:
    """``text`` with its front matter (``front_matter``), if it has one, blanked: each of its
    characters but line breaks made a space, so offsets and lines stay those of ``text``."""
    m = front_matter(text)
    if m is None:
        return text
    return re.sub(r"[^\r\n]", " ", m.group(0)) + text[m.end():]


def is_markdown(source: str) -> bool:
    """Whether a document's ``source`` (a path, or a URL) names a Markdown file."""
    return source_suffix(source) in MARKDOWN_EXTENSIONS


def unread_out(text: str) -> str:
    """``text`` without the markup no one reads (``_UNREAD_RE``), each piece's line breaks
    kept."""
    return _UNREAD_RE.sub(lambda m: "\n" * m.group().count("\n"), text)


def read_text(text: str) -> str:
    """``text`` as a reader reads it: ``unread_out``'s, its links as their words."""
    return _ANY_LINK_RE.sub(r"\1", unread_out(text))


_MARKUP_STARTS = frozenset("<[{(")  # what each markup ``_UNREAD_RE`` reads starts with


def read_words(text: str, *, quotes: bool = True) -> bool:
    """Whether ``text`` holds words a reader reads (``read_text``); with ``quotes=False``, its
    block quotes' aside. (Without a "<", "](" or "][" in it, nothing that ``_UNREAD_RE`` reads
    runs over lines: a line with words and none of what markup starts with says so at once. An
    image's alt text may run over lines, before "](" or, a reference image's, "][".)"""
    if not quotes:
        text = _QUOTED_LINE_RE.sub("", text)
    if "<" not in text and "](" not in text and "][" not in text:
        for line in text.splitlines():
            if (any(c.isalnum() for c in line) and _MARKUP_STARTS.isdisjoint(line)
                    and not line.lstrip().startswith(("http", "ftp", "import", "export"))):
                return True
    return any(c.isalnum() for c in read_text(text))


def headings_out(text: str) -> str:
    """``text`` less its headings' lines (``#`` and underlined ones): what a passage says
    beyond them (a README's "# Name" over its badges says nothing a quote could support, and
    its name is the document's title, indexed with every passage)."""
    text = SETEXT_RE.sub(lambda m: m.group(0) if LIST_ITEM_RE.match(m.group(1)) else "", text)
    return _ATX_LINE_RE.sub("", text)


def links_only(line: str) -> bool:
    """Whether ``line`` has no words but its links' (a bar of links: "[Website] | [Learn]")."""
    return not any(c.isalnum() for c in _ANY_LINK_RE.sub("", line))
