"""Markdown as a reader reads it: the markup no one reads (``unread_out``: HTML comments and
tags, images, reference definitions, MyST's targets, MDX's imports), links read as their words
(``read_text``), and which sources are Markdown (``is_markdown``). Titles (``title.py``),
chunking (a passage of markup alone is not indexed: ``retrieval.chunk.passage_spans``) and what
BM25 and the embedder see of a passage (``retrieval.builder.indexed_text``: no link's address,
no tag's attributes) read Markdown so; a document's text, and so its passages and quotes, stay
the file's, unchanged.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import urlsplit

# the names of Markdown files (a folder's, or a URL's path's)
MARKDOWN_EXTENSIONS = frozenset({".md", ".markdown", ".mdown", ".mkd", ".mdx"})

# A link's or an image's address in parentheses (a title in quotes too), one level of them
# inside ("Logo_(2019).svg", "(logo)")
_ADDRESS = r"\((?:[^()]|\([^()]{0,500}\)){0,1000}\)"
# What a Markdown text holds that a reader does not read: HTML comments and tags, linked images
# (badges) and images, reference definitions ("[1]: https://..."), MyST's targets
# ("(label)="), MDX's imports and exports, a URL alone on its line, Liquid's tags ("{% include
# toc %}", "{{ page.title }}"); each bounded, so that a long run of "<" or "![" is not rescanned
# from every position
_UNREAD_RE = re.compile(rf"<!--.{{0,2000}}?-->|<[^<>]{{0,1000}}>"
                        rf"|\[!\[[^\[\]]{{0,500}}\]{_ADDRESS}\]{_ADDRESS}"
                        rf"|!\[[^\[\]]{{0,500}}\](?:{_ADDRESS}|\[[^\[\]]{{0,500}}\])"
                        r"|^ {0,3}\[[^\]\n]{1,500}\]:.*$|^\([^()\n]{1,200}\)=[ \t]*$"
                        r"|^(?:import|export)[ \t][^\n]{0,1000}$"
                        r"|^[ \t]*(?:https?|ftp)://[^\s<>]{1,2000}[ \t]*$"
                        r"|\{%.{0,500}?%\}|\{\{.{0,500}?\}\}",
                        re.DOTALL | re.MULTILINE)
# a link: [words](address), [words][reference], [reference] (a shortcut reference)
_ANY_LINK_RE = re.compile(rf"\[([^\[\]]{{0,500}})\](?:{_ADDRESS}|\[[^\[\]]{{0,500}}\])?")
# a block quote's line (a notice before a README's title: "> [!IMPORTANT]")
_QUOTED_LINE_RE = re.compile(r"^ {0,3}>.*$", re.MULTILINE)


def source_suffix(source: str) -> str:
    """The extension, lower case, of the file a document's ``source`` (a path, or a URL's path)
    names ("" for none)."""
    path = urlsplit(source).path if "://" in source else source
    return PurePosixPath(path.replace("\\", "/")).suffix.lower()


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


def read_words(text: str, *, quotes: bool = True) -> bool:
    """Whether ``text`` holds words a reader reads (``read_text``); with ``quotes=False``, its
    block quotes' aside."""
    if not quotes:
        text = _QUOTED_LINE_RE.sub("", text)
    return any(c.isalnum() for c in read_text(text))


def links_only(line: str) -> bool:
    """Whether ``line`` has no words but its links' (a bar of links: "[Website] | [Learn]")."""
    return not any(c.isalnum() for c in _ANY_LINK_RE.sub("", line))
