"""A document's title from its text: a Markdown file's front matter or first heading, or a
plain text's first line where it reads as a title (``title_from_text``); and a title's cap
(``cap_title``). HTML's title is its ``<title>`` (``html.py``).
"""

from __future__ import annotations

import re
from html import unescape

from citeqa.markdown import (
    ADDRESS,
    LIST_ITEM_RE,
    MARKDOWN_EXTENSIONS,
    SETEXT_RE,
    TAG,
    front_matter,
    links_only,
    read_words,
    source_suffix,
    unread_out,
    without_front_matter,
)
from citeqa.text import (
    ATX_HEADING,
    FENCE_RE,
    HEADING_MAX_CHARS,
    WRAPPED_MIN_CHARS,
    ends_as_prose,
    fenced_code,
    is_blank,
)

TITLE_MAX_CHARS = HEADING_MAX_CHARS  # titles longer than this are cut (with an ellipsis)
RST_EXTENSION = ".rst"  # the name of reStructuredText files (a folder's, or a URL's path's)
_SPACE_RE = re.compile(r"\s+")
# A markdown heading line; its text is group 1 less a closing sequence of #s (_heading).
# Not stripped in the pattern: a lazy text before "[ \t#]*$" rescanned a long run of #s from
# every position, quadratic (a 64 KB post held the server for 25 s). It ends at a carriage
# return too: a CRLF file's "# Title ##" kept its #s, an old Mac file's ran into its text.
_HEADING_RE = re.compile(rf"^{ATX_HEADING}[ \t]*([^\r\n]+)", re.MULTILINE)


def cap_title(title: str, max_chars: int = TITLE_MAX_CHARS) -> str:
    """``title`` cut to ``max_chars`` characters (ending in an ellipsis when cut)."""
    return title if len(title) <= max_chars else title[: max_chars - 1].rstrip() + "…"


def title_of_source(text: str, fallback: str, source: str, *, markdown: bool = False) -> str:
    """``title_from_text`` by the rules of the format ``source`` names: a Markdown or a
    reStructuredText file, by its path's or URL's extension (``markdown``: Markdown whatever
    its name, as a page served as text/markdown)."""
    suffix = source_suffix(source)
    return title_from_text(text, fallback, markdown=markdown or suffix in MARKDOWN_EXTENSIONS,
                           rst=suffix == RST_EXTENSION)


def title_from_text(text: str, fallback: str, *, markdown: bool = False,
                    rst: bool = False) -> str:
    """A title for plain text: a Markdown file's (``markdown``) front matter's, or its first
    heading's where no prose stands before it; a reStructuredText file's (``rst``) ``:title:``
    field, or its first section title where no prose stands before it; else the first line
    with words (Markdown's and reStructuredText's reduced to their text) when it is a ``#``
    heading (the marker removed) or reads as one (at most ``TITLE_MAX_CHARS`` characters, not
    ending as a sentence does, and not a line of wrapped prose going on in lower case on the
    next line), else ``fallback``.

    A title is indexed with every passage of its document (``indexed_text``), so a first line
    that is the text's first sentence must not become it: its words would match every
    passage; nor may a section's heading further down ("Sponsors", "Features" of a README that
    opens with HTML and prose)."""
    text = text.removeprefix("\ufeff")  # a byte-order mark is no part of the title
    if markdown:
        named, text = _front_matter(text)  # (its lines left empty)
        if named:
            return cap_title(named)
        text = _without_fenced_code(text)  # no line of a code block, nor a fence itself
        heading = _first_heading(text)
        if heading is not None and not _prose_before(text, heading[0]):
            return cap_title(heading[1])
        text = unread_out(text[:PROSE_BEFORE_MAX_CHARS])
    elif rst:
        named, text = _rst_head(text)
        if named:
            return cap_title(named)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if markdown and (links_only(line[:1000]) or LIST_ITEM_RE.match(line)
                         or line.startswith(">")):
            continue  # (a bar of links, a list's item, a block quote)
        if markdown or rst:  # (its markup's text: "**To create a vocabulary**", "<p>")
            line = (_markup_text if markdown else _rst_text)(line[:1000]).strip()
            if line.startswith("<"):  # a tag over lines ("<img src=x\n alt=y>")
                continue
            if "**" in line or "__" in line:  # emphasis that goes on below: prose
                return fallback
        if is_blank(line.strip("#")) and len(line) <= 6:  # an empty heading ("#", "## \u200b")
            continue
        if line and not any(c.isalnum() for c in line[:200]):  # a rule: "---", "====", "***"
            continue
        if not is_blank(line):  # (a zero-width space alone is no title either)
            m = _HEADING_RE.match(line)
            if m:
                return cap_title(_SPACE_RE.sub(" ", _heading(m)).strip())
            line = _SPACE_RE.sub(" ", line)
            # hard-wrapped prose: a line of a wrapping width that goes on in lower case on the
            # next line ("...black-and-white striped\ncoats.")
            wrapped = (len(line) >= WRAPPED_MIN_CHARS and i + 1 < len(lines)
                       and lines[i + 1].lstrip()[:1].islower())
            if (not wrapped and len(line) <= TITLE_MAX_CHARS
                    and not ends_as_prose(line)):
                return line
            return fallback
    return fallback


_FRONT_TITLE_RE = re.compile(r"^title[ \t]*[:=][ \t]*([^\r\n]*)\r?$", re.MULTILINE)
_QUOTED_RE = re.compile(r"""\"((?:[^"\\]|\\.)*)\"|'((?:[^']|'')*)'""")
_BLOCK_SCALAR_RE = re.compile(r"[|>][-+]?\d?[ \t]*(?:#.*)?")  # YAML's | and > (folded)
# (bounded: a lazy scan for the end tag from every "<h1>" of a page without one is quadratic)
_HTML_HEADING_RE = re.compile(r"^[ \t]*<h[1-6]\b[^>\n]{0,300}>(.{0,300}?)</h[1-6]\s*>",
                              re.IGNORECASE | re.DOTALL | re.MULTILINE)
_IMAGE_RE = re.compile(rf"!\[([^\]]*)\]{ADDRESS}|!\[([^\]]*)\]\[[^\]]*\]")  # (its alt text)
_LINKED_IMAGE_RE = re.compile(rf"\[!\[[^\]]*\](?:{ADDRESS}|\[[^\]]*\])\](?:{ADDRESS}|\[[^\]]*\])")
_LINK_RE = re.compile(rf"\[([^\]]*)\]{ADDRESS}|\[([^\]]*)\]\[[^\]]*\]")
_TAG_RE = re.compile(TAG)
_EMPHASIS_RE = re.compile(r"(\*{1,3}|`+|~~)(?=\S)(.+?)(?<=\S)\1"
                          r"|(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\3(?!\w)")  # (my_name: no)


def _front_matter(text: str) -> tuple[str, str]:
    """The ``title`` a Markdown file's front matter names ("" for none), and the text with the
    front matter blanked (its "---" read as the title, or as a setext heading's underline)."""
    m = front_matter(text)
    if m is None:
        return "", text
    title = _FRONT_TITLE_RE.search(m.group(2))
    named = _SPACE_RE.sub(" ", _front_value(m.group(2), title)).strip() if title else ""
    return named, without_front_matter(text)


def _front_value(front: str, title: re.Match[str]) -> str:
    """The value of front matter's ``title`` line (``title``): a quoted string's text (YAML's
    ``''`` and ``\\"`` escapes read), a block scalar's (``>-``, ``|``) indented lines that
    follow, or the plain value less a ``# comment``."""
    value = title.group(1).strip()
    if (quoted := _QUOTED_RE.match(value)) is not None:
        if quoted.group(1) is not None:
            return _YAML_ESCAPE_RE.sub(_yaml_escape, quoted.group(1))
        return quoted.group(2).replace("''", "'")
    if _BLOCK_SCALAR_RE.fullmatch(value):
        lines = []
        for line in front[title.end():].lstrip("\r\n").splitlines():
            if line.strip() and not line[:1].isspace():
                break
            lines.append(line.strip())
        return " ".join(lines)
    cuts = [i for i in (value.find(" #"), value.find("\t#")) if i >= 0]  # (a regex's run of
    return value[:min(cuts)] if cuts else value  # spaces before "#" was quadratic)


_YAML_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)")


def _yaml_escape(m: re.Match[str]) -> str:
    """One escape of a YAML double-quoted string, as a title reads it (a line break a space)."""
    code = m.group(1)
    if len(code) > 1:
        try:
            return chr(int(code[1:], 16))
        except ValueError:  # past U+10FFFF
            return ""
    return " " if code in "nrtbfv0" else code


def _first_heading(text: str) -> tuple[int, str] | None:
    """Where a Markdown document's first heading that holds words starts, and its text: a ``#``
    heading, a setext one (underlined by = or -) or an HTML ``<h1>``-``<h6>``, whichever comes
    first, its links, images, emphasis and tags reduced to their text; None where there is
    none."""
    found = [(m.start(), _heading(m)) for m in _HEADING_RE.finditer(text)]
    found += [(m.start(), m.group(1)) for m in SETEXT_RE.finditer(text)
              if not _HEADING_RE.match(m.group(1)) and not FENCE_RE.match(m.group(1))
              and not LIST_ITEM_RE.match(m.group(1))]  # ("- item\n---": a list, then a rule)
    found += [(m.start(), m.group(1)) for m in _HTML_HEADING_RE.finditer(text)]
    for at, heading in sorted(found):  # (a title is 120 characters at most: cap_title)
        words = _SPACE_RE.sub(" ", _markup_text(heading[:1000])).strip()
        if any(c.isalnum() for c in words):  # not "# ---", nor a rule underlined
            return at, words
    return None


PROSE_BEFORE_MAX_CHARS = 20_000  # a heading further in than this never names the document


def _prose_before(text: str, at: int) -> bool:
    """Whether words a reader reads (``markdown.read_words``; a block quote's aside: a notice)
    stand in ``text`` before position ``at``: then a heading there names a section, not the
    document."""
    return at > PROSE_BEFORE_MAX_CHARS or read_words(text[:at], quotes=False)


def _markup_text(heading: str) -> str:
    """A heading's text without Markdown's link, image and emphasis markup or HTML tags (a
    title has no offsets to keep); linked images (badges: "# Proj [![PyPI](..)](..)" is "Proj")
    left out, unless they are all it has (a logo's alt text)."""
    words = _reduced(_LINKED_IMAGE_RE.sub("", heading))
    return words if any(c.isalnum() for c in words) else _reduced(heading)


def _reduced(heading: str) -> str:
    """``heading``'s links and images as their text, emphasis as its text, tags left out."""
    def text_of(m: re.Match[str]) -> str:
        return m.group(1) if m.group(1) is not None else m.group(2)

    heading = _LINK_RE.sub(text_of, _IMAGE_RE.sub(text_of, heading))  # ([![badge](..)](..))
    heading = _TAG_RE.sub("", heading)
    for _ in range(3):  # (nested: ***a*** and **_a_**)
        heading = _EMPHASIS_RE.sub(lambda m: m.group(2) if m.group(1) else m.group(4), heading)
    return unescape(heading)  # (A &amp; B)


# reStructuredText: a section title's adornment (one punctuation mark repeated), a field
# (":title: Guide", Sphinx's ":orphan:"), a directive or comment (".. image:: x", ".. note")
_RST_ADORNMENT_RE = re.compile(r"""([!-/:-@\[-`{-~])\1{2,}[ \t]*""")
_RST_FIELD_RE = re.compile(r":([^:`\s][^:`]*):(?:\s+(.*)|$)")
# inline markup, read as its text: a role (":mod:`email`"), a literal, a reference or
# interpreted text ("`PyPI <http://pypi.org>`_"), emphasis, a substitution ("|name|")
_RST_ROLE_RE = re.compile(r":[\w.+:-]+:`([^`]*)`")
_RST_LITERAL_RE = re.compile(r"``([^`]+)``")
_RST_REFERENCE_RE = re.compile(r"`([^`]*)`_{0,2}")
_RST_EMPHASIS_RE = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\|([^|\s][^|]*)\|")
_RST_SUBSTITUTIONS_RE = re.compile(r"(?:\|[^|\s][^|]*\|_{0,2}[ \t]*)+")  # "|PyPI| |Build|"
_RST_TARGET_RE = re.compile(r"\s*<[^<>]*>\s*$")  # "PyPI <http://pypi.org>": its target


def _rst_head(text: str) -> tuple[str, str]:
    """A reStructuredText document's title, and its text with its head's lines left empty: the
    ``:title:`` field, else its first section title (a line over a line of one mark repeated,
    an overline or not) where nothing but fields, comments and directives (".. image::" and the
    indented lines under it) stands before it; "" for neither."""
    lines = text.split("\n")
    named, directive = "", False
    for k, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or (directive and line[:1].isspace()):
            continue
        directive = stripped.startswith("..")  # (or a field: its value may go on indented)
        field = None if directive else _RST_FIELD_RE.fullmatch(stripped[:1000])
        if directive or field or _RST_SUBSTITUTIONS_RE.fullmatch(stripped[:1000]):
            if field and field.group(1).strip().lower() == "title" and not named:
                named = _SPACE_RE.sub(" ", _rst_text(field.group(2) or "")).strip()
            directive = directive or field is not None
            continue
        below = lines[k + 1].strip() if k + 1 < len(lines) else ""
        if _RST_ADORNMENT_RE.fullmatch(stripped):  # an overline, or a transition
            if k + 2 < len(lines) and lines[k + 2].strip() == stripped and lines[k + 1].strip():
                below, line = stripped, lines[k + 1]
            else:
                continue
        if _RST_ADORNMENT_RE.fullmatch(below) and not line[:1].isspace():
            words = _SPACE_RE.sub(" ", _rst_text(line.strip()[:1000])).strip()
            if any(c.isalnum() for c in words):
                return named or words, text
        # prose: no section title names the document; the first line may (title_from_text)
        return named, "\n" * k + "\n".join(lines[k:])
    return named, ""  # (fields, comments and directives only)


def _rst_text(line: str) -> str:
    """A line of reStructuredText as its text, inline markup reduced (``_RST_ROLE_RE`` ...)."""
    def target_off(m: re.Match[str]) -> str:
        return _RST_TARGET_RE.sub("", m.group(1)) or m.group(1)

    line = _RST_ROLE_RE.sub(target_off, line)
    line = _RST_LITERAL_RE.sub(r"\1", line)
    line = _RST_REFERENCE_RE.sub(target_off, line)
    return _RST_EMPHASIS_RE.sub(lambda m: next(g for g in m.groups() if g is not None), line)


def _without_fenced_code(text: str) -> str:
    """``text`` with the lines of its fenced code blocks (``text.fenced_code``) left empty."""
    out, pos = [], 0
    for start, end in fenced_code(text):
        out += [text[pos:start], "\n" * text.count("\n", start, end)]
        pos = end
    return "".join([*out, text[pos:]])


def _heading(m: re.Match[str]) -> str:
    """A heading match's text without its closing sequence: the #s at its end where a space
    comes before them (CommonMark's rule: "# Learn C#" keeps its "#", "# Title ##" is "Title")
    and the spaces around them, but at least one character (``# ###`` is titled "###")."""
    text = m.group(1).rstrip(" \t")
    body = text.rstrip("#")
    if body != text and (not body or body[-1] in " \t"):
        return body.rstrip(" \t") or text
    return text or m.group(1)[0]  # ("#  ": a space)
