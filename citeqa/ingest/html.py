"""Visible text and a title from an HTML page (stdlib ``html.parser``); plain text's title is
``title.py``'s.

HTML is turned into readable text: script/style/head contents and other non-visible parts are
dropped, and so is a page's navigation (``<nav>``, or an element marked as one: menus,
breadcrumbs, a docs site's contents, DocBook's header and footer bars, menu bars, toolbars,
popups and modal dialogs, skip links, copy buttons, a block of ``rel="next"``/``"prev"``/
``"up"`` links and their labels; a page with no text outside it keeps it) and a heading's
permalink ("¶"); entities are unescaped, soft hyphens dropped, runs of whitespace collapse to
one space, block elements (paragraphs, headings, list items, table rows...) become paragraph
breaks (a blank line; inside ``<pre>``, a line break), ``<br>`` a line break, and cells of
text side by side in a row are joined by " | " (a cell holding blocks, or none, adds none).
Lines are stripped, but inside ``<pre>`` their indentation is kept (nested code arrived
flat).

Headers, footers and asides are kept: docutils writes footnotes, topics and sidebars as
``<aside>`` outside any ``<main>``, and blogs their post's title in a ``<header>``.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from html.parser import HTMLParser

from citeqa.errors import SourceError
from citeqa.ingest.title import cap_title
from citeqa.text import is_blank

# Python's HTMLParser reads some malformed markup in quadratic time ("<a<a<a...": 80 KB took
# 10 s, so a 5 MB page would take a day); well-formed pages parse at >1 MB/s. A page may take
# PARSE_BASE_S plus PARSE_S_PER_MB per MB of its text before it is refused, in the parsing
# thread's CPU time (a busy process or machine does not eat into it).
PARSE_BASE_S = 10.0
PARSE_S_PER_MB = 4.0

REDIRECT_MAX_CHARS = 300  # a page that refreshes to another with no more text is a redirect
# a meta refresh's content: a delay, then (after ";" or ",") an address, "URL=" before it or
# not, quoted or not ("0; URL='new page.html'", "0; https://example.org/new")
# (matched against the stripped content: greedy to the end, as a lazy group before "\s*$" read a
# content with a run of spaces inside in quadratic time)
_REFRESH_RE = re.compile(r"""([\d.]+)(?:\s*[;,]\s*|\s+)(?:url\s*=\s*)?"""
                         r"""(?:(['"])(.*)\2|([^\s'"].*))?$""", re.IGNORECASE | re.DOTALL)
REDIRECT_MAX_DELAY_S = 5.0  # a later refresh reloads a live page ("300; url=scores.html")

# Elements whose whole content is not visible text.
_SKIP = frozenset(
    {"script", "style", "head", "noscript", "template", "svg", "math", "iframe", "object", "canvas",
     "textarea", "select"}  # (a form's contents: no text the page says)
)
# Inline styles that hide an element: a page that reads harmless in a browser must not add
# claims (or instructions to a model) that no reader sees.
_HIDING_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)


def _hidden(attrs: list[tuple[str, str | None]]) -> bool:
    """Whether an element's attributes hide it from a reader (``hidden``, ``aria-hidden="true"``
    in any case, as browsers read it, an inline style of ``display: none`` or ``visibility:
    hidden``), or say it is not the page's text (``data-nosnippet``: rustdoc's line numbers of
    source)."""
    for name, value in attrs:
        if name in ("hidden", "data-nosnippet") or (
                name == "aria-hidden" and (value or "").strip().lower() == "true"):
            return True
        if name == "style" and value and _HIDING_STYLE.search(value):
            return True
    return False


# Class names of a page's navigation and controls, not its content: DocBook's header and
# footer bars, Bootstrap's nav and navbar, breadcrumbs, menu bars and toolbars (mdBook's)
_NAVIGATION_CLASSES = frozenset({"nav", "navbar", "navheader", "navfooter", "navigation",
                                 "breadcrumb", "breadcrumbs", "menu-bar", "menubar", "toolbar"})
# ARIA roles of the same
_NAVIGATION_ROLES = frozenset({"navigation", "menu", "menubar", "toolbar"})
# A class or id naming UI hidden until it is opened: a popup, a modal dialog, by its last word
# (mdBook's "mdbook-help-popup", the keyboard help: "Press ← or → to navigate between chapters"
# began every page of a book; not Bootstrap's "modal-open" on a page's body while one shows)
_CLOSED_UI_RE = re.compile(r"(?:^|[-_])(?:popup|modal|picker)$")
# a table of contents: a class or id "toc" or "table-of-contents", or a list's ending in "toc"
# (Texinfo's "ul.section-toc"; not a heading's "no_toc", nor an article's "has-toc")
_TOC_NAMES = frozenset({"toc", "table-of-contents"})
_TOC_LIST_RE = re.compile(r"[-_]toc$")
# a link that skips to the content ("skip-link", "skip-to-content", "skipnav"; not "skipped"),
# a control that copies code
_SKIP_LINK_RE = re.compile(r"^skip(?:$|[-_]|nav|link)")
_COPY_CONTROL_RE = re.compile(r"(?:^|[-_])(?:copy|clipboard)(?:$|[-_])")
# Elements that hold a page's content, whatever their class, id or role say
_PAGE_TAGS = frozenset({"html", "body", "main", "article"})


def _navigation(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    """Whether an element is a page's navigation or controls: a ``<nav>``, a ``<dialog>`` not
    open, a link skipping to the content, a button copying code, or an element that says it is
    one (``role="navigation"``, as Sphinx's bars and sidebar, a menu, menu bar or toolbar; a
    class name of one; a class or id naming a popup, a modal, a picker or a table of
    contents; a table summarised "Navigation header", as DocBook's)."""
    if tag == "nav" or (tag == "dialog" and all(name != "open" for name, _ in attrs)):
        return True
    if tag in _PAGE_TAGS:  # (WordPress's "enable-search-modal" on <body> named the page)
        return False
    named = {name: (value or "").strip().lower() for name, value in attrs}
    if tag == "a" and named.get("href", "").startswith("#") and any(
            _SKIP_LINK_RE.match(word) for word in named.get("class", "").split()):
        return True  # ("Skip to main content")
    if any(word in _TOC_NAMES or (tag in ("ul", "ol") and _TOC_LIST_RE.search(word))
           for name in ("class", "id") for word in named.get(name, "").split()):
        return True
    if tag == "button" and any(_COPY_CONTROL_RE.search(word) for name in ("class", "id")
                               for word in named.get(name, "").split()):
        return True  # ("Copy item path", a code block's "copy")
    for name, value in attrs:
        value = (value or "").strip().lower()
        if ((name == "role" and value in _NAVIGATION_ROLES)
                or (name == "class" and not _NAVIGATION_CLASSES.isdisjoint(value.split()))
                or (name in ("class", "id")
                    and any(_CLOSED_UI_RE.search(word) for word in value.split()))
                or (name == "summary" and value.startswith("navigation"))):
            return True
    return False


# Elements that end a paragraph of text before and after them.
_BLOCK = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div",
        "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4",
        "h5", "h6", "header", "hr", "html", "legend", "li", "main", "nav", "ol", "p", "pre",
        "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_CELL = frozenset({"td", "th"})  # a row's cells: " | " between cells of text side by side
# soft hyphens: no text (a zero-width space stays: Thai, Khmer, Lao and Burmese part words so)
_INVISIBLE = str.maketrans("", "", "\xad\ufdd0\ufdd1")  # (and the marks of indentation below)
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
# End tags a browser implies (HTML's tree construction, in short): a start tag of the first set
# closes an open element of the second, looked for from the innermost out, but not past an
# element of the third (or of _SCOPE). Without them a hidden <p> or <li> whose end tag the
# page leaves out hid every paragraph or item after it.
_CLOSES_P = frozenset(
    {
        "address", "article", "aside", "blockquote", "details", "div", "dl", "fieldset",
        "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
        "hr", "main", "menu", "nav", "ol", "p", "pre", "section", "summary", "table", "ul",
    }
)  # fmt: skip
_IMPLIED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "li": (frozenset({"li"}), frozenset({"ul", "ol", "menu"})),
    "dt": (frozenset({"dt", "dd"}), frozenset({"dl"})),
    "dd": (frozenset({"dt", "dd"}), frozenset({"dl"})),
    "tr": (frozenset({"tr", "td", "th"}), frozenset({"table", "thead", "tbody", "tfoot"})),
    "td": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "th": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "option": (frozenset({"option"}), frozenset({"select", "datalist", "optgroup"})),
    "body": (frozenset({"head"}), frozenset()),  # a missing </head> must not hide the page
}
_FOREIGN = frozenset({"svg", "math"})  # inside them, "/>" closes an element, as in XML
_SCOPE = frozenset({"applet", "button", "caption", "html", "marquee", "object", "table", "td",
                    "th", "template"})
_SPACE_RE = re.compile(r"\s+")
# Indentation in <pre>, marked while lines are stripped, then restored (by Unicode's
# noncharacters U+FDD0 and U+FDD1, for a program's own use: a page's own are dropped)
_INDENT_MARKS = ("\ufdd0", "\ufdd1")
_INDENT = str.maketrans(" \t", "".join(_INDENT_MARKS))
_UNMARKED = str.maketrans("".join(_INDENT_MARKS), " \t")
_BREAKS_RE = re.compile(r"\n{3,}")
_BLANK_LINE_RE = re.compile(r"^[ \t]+$", re.MULTILINE)


@dataclass(frozen=True)
class HtmlText:
    """The result of :func:`extract_html`."""

    text: str  # visible text, paragraphs separated by a blank line
    title: str  # the <title> (whitespace collapsed), "" when the page has none
    refresh_to: str = ""  # where a <meta http-equiv="refresh"> sends the reader ("": nowhere)

    def redirect(self) -> str | None:
        """Where the page sends its reader, when it is a redirect page: a meta refresh, and at
        most ``REDIRECT_MAX_CHARS`` of text ("Redirecting to... ch18-00-oop.html"); else
        None. Such a page says nothing of its own (a book's moved chapters were 22 of its
        documents)."""
        return self.refresh_to if self.refresh_to and len(self.text) <= REDIRECT_MAX_CHARS else None


# A link to the next, previous or enclosing part, or to the contents or index (HTML's rel
# values): a block of such links and their labels alone is a navigation bar (Texinfo's "Next:
# Size and Alignment, Previous: Primitive Types, Up: Types [Index]", DocBook's, Sphinx's)
_NAV_RELS = frozenset({"next", "prev", "previous", "up", "index", "contents", "toc", "start",
                       "first", "last", "top"})
_NAV_LABELS_RE = re.compile(r"\b(?:next|prev|previous|up|top|contents|index|start|first|last|"
                            r"home|table of contents|toc)\b|[\W_]", re.IGNORECASE)
# A fragment link's text that is a heading's permalink, not words: Sphinx's ¶, rustdoc's §,
# Node.js's #
_PERMALINK_TEXTS = frozenset({"¶", "§", "#", "🔗", "⚓"})


@dataclass
class _Frame:
    """A shown block, or link, being read: where it is in the open elements and where its text
    starts in the pieces; a link whether it goes to another part (``nav``: its rel says so);
    a block how many such links and other links it holds, and whether it has words of its own
    (out of those links, but their labels: "Next:", "[Index]")."""

    at: int
    start: int
    link: bool = False
    href: str = ""
    nav: bool = False
    nav_links: int = 0
    other_links: int = 0
    words: bool = False


def _delay(text: str) -> float:
    """A meta refresh's delay in seconds (inf where it is no number: "1.2.3")."""
    try:
        return float(text)
    except ValueError:
        return float("inf")


class _TooSlowError(Exception):
    """The parse ran past its deadline."""


class _Extractor(HTMLParser):
    """Collects visible text pieces and the <title>; driven by :func:`extract_html`.

    Every handler first checks the deadline: the parser calls one for each construct it reads,
    and in its quadratic cases each costs one scan of the rest of the page, so the parse ends
    within one scan of the deadline."""

    def __init__(self, deadline: float, *, xml: bool = False, chrome: bool = False) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self._xml = xml  # XHTML (application/xhtml+xml): "/>" closes any element
        self._chrome = chrome  # keep the page's navigation, header, footer and asides
        self.pieces: list[str] = []
        self.title_parts: list[str] = []
        self.refresh_to = ""
        # open elements, innermost last: (tag, whether it hides its content, whether it is
        # shown); every one, so that a hidden element ends at its own end tag, not at a nested
        # one of the same name
        self._open: list[tuple[str, bool, bool]] = []
        # where the open elements of each tag are, innermost last
        self._at: defaultdict[str, list[int]] = defaultdict(list)
        self._hiding = 0  # open elements that hide their content
        self._in_title = False
        self._pre = 0  # open <pre> elements that are shown
        self._cells = 0  # cells begun in the row being read
        self._separate = False  # a cell after another began: " | " before its text, if inline
        # the shown blocks and links being read, innermost last (two stacks: the innermost
        # block is at hand, however many links are left open inside it)
        self._blocks: list[_Frame] = []
        self._links: list[_Frame] = []
        self._nav_at: list[int] = []  # where the navigation links being read are open
        self._deadline = deadline

    def _tick(self) -> None:
        if time.thread_time() > self._deadline:
            raise _TooSlowError

    def handle_comment(self, data: str) -> None:
        self._tick()

    def handle_decl(self, decl: str) -> None:
        self._tick()

    def handle_pi(self, data: str) -> None:
        self._tick()

    def unknown_decl(self, data: str) -> None:
        self._tick()

    def _close_from(self, i: int) -> None:
        """Close the open element at position ``i`` and every one inside it."""
        self._frames_done(i)
        for tag, hides, shown in self._open[i:]:
            self._at[tag].pop()
            self._hiding -= hides
            self._pre -= tag == "pre" and shown
        del self._open[i:]

    def _innermost(self, tags: frozenset[str], stops: frozenset[str]) -> int | None:
        """Position of the innermost open element of ``tags``, unless one of ``stops`` (or
        of ``_SCOPE``) is open inside it; None when there is none. In constant time: a walk
        down the open elements made ``<p><button>`` and thousands of ``<div>`` quadratic."""
        inner = max((self._at[t][-1] for t in tags if self._at[t]), default=None)
        if inner is None or any(self._at[t] and self._at[t][-1] > inner
                                for t in itertools.chain(stops, _SCOPE)):
            return None
        return inner

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tick()
        if tag == "meta" and not self.refresh_to:
            named = dict(attrs)
            if (named.get("http-equiv") or "").strip().lower() == "refresh":
                m = _REFRESH_RE.match((named.get("content") or "")[:2000].strip())
                if m and _delay(m.group(1)) <= REDIRECT_MAX_DELAY_S:
                    self.refresh_to = (m.group(3) or m.group(4) or "").strip()[:500]
        if tag == "title":  # only the page's first <title>, not an <svg><title>
            # (in constant time: every open element hiding its content is a <head>, which
            # always hides; a walk down the open elements at each <title> was quadratic)
            self._in_title = not self.title_parts and self._hiding == len(self._at["head"])
            return
        implied = [_IMPLIED[tag]] if tag in _IMPLIED else []
        if tag in _CLOSES_P:
            implied.append((frozenset({"p"}), frozenset()))
        for closes, stops in implied:
            if (i := self._innermost(closes, stops)) is not None:
                self._close_from(i)
        hides = (tag in _SKIP or (not self._chrome and _navigation(tag, attrs))
                 or _hidden(attrs) or (tag == "button" and self._pre > 0))  # (a code's "copy")
        shown = not self._hiding and not hides
        if tag not in _VOID:
            self._open.append((tag, hides, shown))
            self._at[tag].append(len(self._open) - 1)
            self._hiding += hides
        if not shown:
            return
        if tag == "a" and not self._chrome:
            named = dict(attrs)
            nav = not _NAV_RELS.isdisjoint((named.get("rel") or "").lower().split())
            self._links.append(_Frame(len(self._open) - 1, len(self.pieces), link=True,
                                      href=(named.get("href") or "").strip(), nav=nav))
            if nav:
                self._nav_at.append(len(self._open) - 1)
        if tag == "br":
            self.pieces.append("\n")
        elif tag in _BLOCK:
            self._block_break()
            if not self._chrome:
                self._blocks.append(_Frame(len(self._open) - 1, len(self.pieces)))
            if tag == "pre":
                self._pre += 1
            if tag == "tr":
                self._cells = 0
        elif tag in _CELL:
            self._separate = self._cells > 0
            self._cells += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not (self._xml or tag in _FOREIGN or any(self._at[t] for t in _FOREIGN)):
            # HTML ignores "/>" but on SVG and MathML: <div hidden/> opens a hidden div, and
            # <script/> a script, whose content a browser does not show
            self.handle_starttag(tag, attrs)
            return
        self._tick()
        # a self-closed element opens nothing, so hides nothing
        if not self._hiding and tag == "br":
            self.pieces.append("\n")
        elif not self._hiding and tag in _BLOCK:
            self.pieces.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        self._tick()
        if tag == "title":
            self._in_title = False
            return
        if not self._at[tag]:  # nothing of that name is open: ignored, as browsers do
            return
        i = self._at[tag][-1]
        shown = self._open[i][2]
        self._frames_done(i, ended=True)  # its, and those left open inside it
        self._close_from(i)  # it, and anything left open inside it
        if shown and tag in _BLOCK:
            self._block_break()

    def _block_break(self) -> None:
        """A block's start or end: a paragraph break; in code, a line break (one, between two
        blocks side by side)."""
        if not self._pre:
            self.pieces.append("\n\n")
        elif self.pieces and not self.pieces[-1].endswith("\n"):
            self.pieces.append("\n")

    def _block(self) -> _Frame | None:
        """The innermost block being read (None: none, or the page's chrome is kept)."""
        return self._blocks[-1] if self._blocks else None

    def _frames_done(self, i: int, *, ended: bool = False) -> None:
        """The frames of the open elements from position ``i`` in are done, innermost first
        (``ended``: the one at ``i`` by its own end tag)."""
        while True:
            link = self._links[-1].at if self._links else -1
            block = self._blocks[-1].at if self._blocks else -1
            if max(link, block) < i:
                return
            stack = self._links if link > block else self._blocks
            frame = stack.pop()
            self._left(frame, ended=ended and frame.at == i)

    def _left(self, frame: _Frame, *, ended: bool = False) -> None:
        """A frame is done (``ended``: by its own end tag, not closed by another's). A heading's
        permalink ("¶") is no text; a block of navigation links and their labels alone ("Next:
        X, Previous: Y, Up: Z [Index]") is no text; what a block holds counts in the block
        around it. Each in constant time, but for a short link's text."""
        if frame.link:
            if frame.nav:  # (frames end innermost first: it is the last)
                self._nav_at.pop()
            if ended and frame.href.startswith("#") and len(self.pieces) - frame.start <= 3:
                text = "".join(self.pieces[frame.start:])
                if text.strip(" |\n") in _PERMALINK_TEXTS:
                    del self.pieces[frame.start:]
                    self._separate |= text.lstrip(" ").startswith("|")  # (the cell's, kept)
                    return
            if ended and (outer := self._block()) is not None:  # (one never closed: no link)
                outer.nav_links += frame.nav
                outer.other_links += not frame.nav
            return
        if ended and frame.nav_links and not frame.other_links and not frame.words:
            del self.pieces[frame.start:]
            return
        if (outer := self._block()) is not None:
            outer.nav_links += frame.nav_links
            outer.other_links += frame.other_links
            outer.words |= frame.words

    def _text(self, text: str) -> None:
        """Add ``text``, after the " | " its cell owes the one before it in the same line (none
        where a block came between: a cell of paragraphs, a line-number column); out of a
        navigation link, words but labels make its block more than a navigation bar."""
        block = self._block()
        if (block is not None and not block.words
                and (not self._nav_at or self._nav_at[-1] < block.at)  # (a block in a link's)
                and _NAV_LABELS_RE.sub("", text).strip()):
            block.words = True
        if self._separate:
            self._separate = False
            if self.pieces and not self.pieces[-1].endswith("\n"):
                self.pieces[-1] = self.pieces[-1].rstrip(" ")
                text = " | " + text.lstrip(" ")
        self.pieces.append(text)

    def _indent_kept(self, data: str) -> str:
        """Preformatted ``data`` with the indentation of each line it starts marked (``_INDENT``),
        so that stripping lines leaves it (a line of white space alone is not marked, but for
        the last, whose code may come in the next element: "    <span>if</span>")."""
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        start = 0 if not self.pieces or self.pieces[-1].endswith(("\n", *_INDENT_MARKS)) else 1
        for i in range(start, len(lines)):
            code = lines[i].lstrip(" \t")
            if code or i == len(lines) - 1:
                lines[i] = lines[i][:len(lines[i]) - len(code)].translate(_INDENT) + code
        return "\n".join(lines)

    def handle_data(self, data: str) -> None:
        self._tick()
        if self._in_title:
            self.title_parts.append(data.translate(_INVISIBLE))
        elif self._pre and not self._hiding:
            self._text(self._indent_kept(data.translate(_INVISIBLE)))
        elif not self._hiding:  # white space collapses across elements: "a <img> b" is "a b"
            text = _SPACE_RE.sub(" ", data.translate(_INVISIBLE))
            if text[:1] == " " and self.pieces and self.pieces[-1][-1:] in (" ", "\n"):
                text = text[1:]
            if text.strip(" "):
                self._text(text)
            elif text:
                self.pieces.append(text)


def _parsed(html: str, deadline: float, *, xml: bool, chrome: bool) -> _Extractor:
    """``html`` read by an ``_Extractor`` (``chrome``: keeping the page's chrome)."""
    parser = _Extractor(deadline=deadline, xml=xml, chrome=chrome)
    parser.feed(html)
    parser.close()
    return parser


def parse_seconds(html: str) -> float:
    """How long ``extract_html`` may parse ``html`` (see ``PARSE_BASE_S``)."""
    return PARSE_BASE_S + PARSE_S_PER_MB * len(html) / 1e6


def extract_html(html: str, *, max_seconds: float | None = None, xml: bool = False) -> HtmlText:
    """Visible text and title of an HTML document (tolerates malformed markup); SourceError
    where the parser itself gives up (Python 3.11's raises AssertionError on ``<![<![``) or
    takes over ``max_seconds`` of this thread's CPU time (default ``parse_seconds(html)``).
    ``xml``: the page is XHTML served as XML (``application/xhtml+xml``), where ``<div/>``
    closes the div; in HTML it opens one."""
    budget = parse_seconds(html) if max_seconds is None else max_seconds
    deadline = time.thread_time() + budget
    try:
        parser = _parsed(html, deadline, xml=xml, chrome=False)
        if is_blank("".join(parser.pieces)):  # all in a header never closed, say: keep it
            parser = _parsed(html, deadline, xml=xml, chrome=True)
    except _TooSlowError:
        raise SourceError(f"the HTML took over {budget:.3g} s of CPU to parse: markup that "
                          "Python's parser reads in quadratic time (unclosed tags)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure means the same: unreadable
        raise SourceError(f"the HTML could not be parsed ({type(e).__name__}: {e}"[:200] + ")"
                          ) from None
    raw = "".join(parser.pieces).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.strip() for line in raw.split("\n")]
    text = _BLANK_LINE_RE.sub("", "\n".join(lines).translate(_UNMARKED))  # (indentation alone)
    text = _BREAKS_RE.sub("\n\n", text).strip("\n")  # (a first line's indentation is code's)
    title = _SPACE_RE.sub(" ", "".join(parser.title_parts)).strip()
    return HtmlText(text=text, title=cap_title(title), refresh_to=parser.refresh_to)
