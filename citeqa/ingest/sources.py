"""Document sources -> :class:`~citeqa.types.Document` list: files, folders and URLs.

``load_sources`` never lets one bad source abort the rest: a missing path, a binary file, a
bad JSON line, a blocked URL... each becomes a :class:`Skipped` entry with a reason that says
what to do. It does not raise on an empty result either: a caller that needs documents checks
``result.documents`` and raises :class:`~citeqa.errors.EmptyCorpusError` itself.

Formats (by extension):
- ``.txt`` / ``.md`` (and ``.text``, ``.rst``; ``.markdown``, ``.mdown``, ``.mkd``, ``.mdx``):
  the file's bytes decoded as UTF-8, otherwise UNCHANGED (no newline translation), so
  character offsets into ``Document.text`` are offsets into the file.
- ``.html`` / ``.htm``: visible text and <title> (see :mod:`citeqa.ingest.html`).
- ``.json`` / ``.jsonl``: SQuAD v1/v2 (one document per paragraph, ``text == context``,
  ``source == f"{path}#{article_title}/{paragraph_index}"``), else one document per JSON-lines
  line / array element with a ``text`` field (optional ``title``, ``id``/``doc_id``,
  ``source``/``url``).
A file named explicitly with another extension is read as plain text; inside a folder, such
files are skipped (hidden files and folders silently), but for those a project names by
convention (``TEXT_NAMES``: README, NEWS, INSTALL, COPYING, ..., with no extension or one that
is no format: README.Debian).

``doc_id``: a record's own ``id``/``doc_id`` when REST would accept it as a doc_id
(``types.DOC_ID_PATTERN``, at most ``MAX_DOC_ID_CHARS``), else the first 16 hex digits of
sha256 of the source string (plus ``#position`` for multi-document files). The first document
with a given id wins; later ones are skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from citeqa.errors import FetchError, SourceError
from citeqa.ingest.encoding import bom_codec, decode, meta_declared
from citeqa.ingest.fetch import Fetcher, FetchPolicy, page_key
from citeqa.ingest.html import extract_html
from citeqa.ingest.title import RST_EXTENSION, cap_title, title_of_source
from citeqa.markdown import MARKDOWN_EXTENSIONS
from citeqa.text import is_blank
from citeqa.types import DOC_ID_PATTERN, MAX_DOC_ID_CHARS, Document

logger = logging.getLogger(__name__)

# Markdown's and reStructuredText's (titled as such: ingest/title.py), then other plain text's
TEXT_EXTENSIONS = MARKDOWN_EXTENSIONS | {".txt", ".text", RST_EXTENSION}
HTML_EXTENSIONS = frozenset({".html", ".htm"})
JSON_EXTENSIONS = frozenset({".json", ".jsonl"})
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS | HTML_EXTENSIONS | JSON_EXTENSIONS
_ID_RE = re.compile(DOC_ID_PATTERN)  # the rule REST applies to a chosen doc_id
# "www.example.org", "example.org/page": a web address without its scheme, when no such file
# ("notes.md" alone reads as a file name, though .md is a domain too)
_WEB_ADDRESS_RE = re.compile(r"^(?:www\.[a-z0-9.-]+\.[a-z]{2,}(?:[/?#:].*)?"
                             r"|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}[/?#:].*)$", re.I)
# Formats that hold text citeqa does not read itself: how to get the text out first.
EXTRACT_FIRST = {
    ".pdf": "pdftotext FILE", ".docx": "pandoc -t plain FILE", ".odt": "pandoc -t plain FILE",
    ".epub": "pandoc -t plain FILE", ".rtf": "pandoc -t plain FILE", ".gz": "gunzip FILE",
    ".bz2": "bunzip2 FILE", ".xz": "unxz FILE", ".zst": "unzstd FILE", ".zip": "unzip FILE",
}


# A folder's file of a type no reader takes: its reason, and what to do
_UNSUPPORTED, _NO_SUFFIX = "unsupported file type", "(no extension)"
UNSUPPORTED_HELP = ("(name the file explicitly to read it as plain text; `citeqa index build "
                    "--help` lists the types a folder's files are read by)")
_UNSUPPORTED_RE = re.compile(rf"{_UNSUPPORTED} '([^']*)' in a folder ")


_REDIRECT_ONLY = "a page that only redirects to"


def redirects_only(skipped: Skipped) -> bool:
    """Whether a folder's HTML file was skipped for only redirecting (rustdoc's std has 259)."""
    return skipped.reason.startswith(_REDIRECT_ONLY)


def unsupported_type(skipped: Skipped) -> str | None:
    """The extension of a folder's file skipped for its type (".woff2", "(no extension)"),
    else None: a generated site's fonts, styles and scripts were 185 lines alike."""
    m = _UNSUPPORTED_RE.match(skipped.reason)
    return m.group(1) if m else None


_BAD_RECORD_RE = re.compile(r"(line|element) (\d+): (.*)", re.DOTALL)


def bad_record(skipped: Skipped) -> tuple[str, int, str] | None:
    """``("line", 12, why)`` for a record file's line (or a JSON list's element) skipped, else
    None: a file of 2,000 records in the wrong shape was 2,000 lines alike."""
    m = _BAD_RECORD_RE.fullmatch(skipped.reason)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


@dataclass(frozen=True)
class Skipped:
    """A source (or part of one) that produced no document, and why."""

    source: str  # path or URL
    reason: str  # human-readable, tells what to do

    def __post_init__(self) -> None:  # printable and storable: a path may not be UTF-8
        object.__setattr__(self, "source", _printable(self.source))
        object.__setattr__(self, "reason", _printable(self.reason))


@dataclass
class LoadResult:
    """Documents loaded from the sources, in source order, and what was skipped."""

    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    fetched: dict[str, str] = field(default_factory=dict)  # a fetched page's doc id -> its URL


class _SkipError(Exception):
    """A whole file yields no document; the message is the Skipped reason."""


def doc_id_for(source: str) -> str:
    """The stable id of a document from ``source`` (first 16 hex chars of its sha256)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


_MADE_ID_RE = re.compile(r"[0-9a-f]{16}")


def is_made_id(doc_id: str) -> bool:
    """Whether ``doc_id`` has the form of the ids ``doc_id_for`` makes."""
    return _MADE_ID_RE.fullmatch(doc_id) is not None


def is_url(source: str) -> bool:
    """Whether ``source`` is meant as a URL (``scheme://...``) rather than a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source) is not None


# Paths and URLs, or one of them alone
Sources = Sequence[str | os.PathLike[str]] | str | os.PathLike[str]


def as_sources(sources: Sources) -> list[str]:
    """``sources`` as a list: one path or URL given alone is one source (a str is a sequence,
    and its characters were taken as sources: "/" first, so the whole file system). An empty
    string names nothing, alone or in a list (``Path("")`` is the working directory: a list
    holding one loaded every file under it)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    return [os.fspath(s) for s in sources if os.fspath(s)]


def load_sources(
    sources: Sources, *, fetcher: Fetcher | None = None, progress: bool = True
) -> LoadResult:
    """Load documents from files, folders (recursive) and http(s) URLs.

    Args:
        sources: paths (file or folder) and http(s):// URLs, in the order to load them.
        fetcher: fetches URLs; None -> ``Fetcher(FetchPolicy())`` (public addresses only).
        progress: show a tqdm progress bar over files/URLs on stderr.

    Returns:
        The documents (possibly none: the caller raises EmptyCorpusError) and the skipped
        sources with reasons. Never raises for a bad source.
    """
    result = LoadResult()
    items, result.skipped = expand_sources(as_sources(sources))
    fetcher = fetcher or Fetcher(FetchPolicy())
    kept = Kept()
    bar = tqdm(items, desc="loading sources", unit="src", disable=not progress, file=sys.stderr)
    for item in bar:
        url = item if isinstance(item, str) else None
        for entry in load_item(item, fetcher):
            if isinstance(entry, Skipped):
                result.skipped.append(entry)
            elif (skip := kept.skip(entry, url)) is not None:
                result.skipped.append(skip)
            else:
                if url is not None:
                    result.fetched[entry.doc_id] = url
                result.documents.append(entry)
    for s in result.skipped:  # the caller reports them (`citeqa index build` prints each once)
        logger.debug("skipped %s: %s", s.source, s.reason)
    logger.info("loaded %d documents, skipped %d", len(result.documents), len(result.skipped))
    return result


def expand_sources(sources: Sources) -> tuple[list[str | Path], list[Skipped]]:
    """The items ``load_sources`` reads, in its order (http(s) URLs as str, files as Path,
    folders walked), and the sources that name nothing readable. A distributed build plans
    with this and hands each item to a worker (``load_item``)."""
    items: list[str | Path] = []
    skipped: list[Skipped] = []
    named: dict[Path, Path] = {}  # the real file -> how a source first named it
    for source in as_sources(sources):
        for item in _expand(source, skipped):
            if isinstance(item, Path):
                real = item.resolve()
                if real in named:  # src/a.txt and ./src/../src/a.txt: one file, one document
                    skipped.append(Skipped(str(item), f"the same file as {named[real]}"))
                    continue
                named[real] = item
            items.append(item)
    # a folder's file left out for its type, but named too (`proj/NOTES proj`): read as named,
    # so not skipped (it was reported skipped, and told to name the file, as it was)
    return items, [s for s in skipped if not (_left_out_by_type(s)
                                                 and Path(s.source).resolve() in named)]


def _left_out_by_type(skipped: Skipped) -> bool:
    """Whether ``skipped`` is a folder's file left out for its type (unsupported, or a format
    whose text is to be extracted first)."""
    suffix = Path(skipped.source).suffix.lower()
    return (unsupported_type(skipped) is not None
            or (suffix in EXTRACT_FIRST and skipped.reason == _extract_first(suffix)))


def load_item(item: str | Path, fetcher: Fetcher) -> Iterator[Document | Skipped]:
    """The documents of one item of ``expand_sources`` and its unreadable parts, in order;
    never raises for a bad source. Duplicate ids across items are the caller's to drop."""
    return _load_item(item, fetcher)


class Kept:
    """The documents a build keeps, in order: the first of each id, and of each fetched page
    (``page_key`` of its final URL) the first URL that reached it. One home for the loaders of a
    local build (``load_sources``) and of a sharded one (``merge.merge_shards``)."""

    def __init__(self) -> None:
        self.first_seen: dict[str, str] = {}  # doc_id -> the source of the document kept
        self.pages: dict[str, str] = {}  # a fetched page -> the URL that first reached it

    def skip(self, doc: Document, url: str | None) -> Skipped | None:
        """Why ``doc`` (fetched from ``url``; None: read from a file) is not kept, or None,
        and then it is."""
        if doc.doc_id in self.first_seen:
            return duplicate(doc, self.first_seen[doc.doc_id])
        if url is not None:
            page = page_key(doc.source)
            if page in self.pages:
                return same_page(url, self.pages[page], doc.source)  # one page, one document
            self.pages[page] = url
        self.first_seen[doc.doc_id] = doc.source
        return None


def same_page(url: str, first_url: str, page: str) -> Skipped:
    """The Skipped entry of a URL that leads to the page (its final URL) an earlier URL
    reached: one page, one document."""
    return Skipped(url, f"the same page as {first_url} (both lead to {page})")


def duplicate(document: Document, first_source: str) -> Skipped:
    """The Skipped entry of a document whose id an earlier document (from ``first_source``)
    already took: the first one wins."""
    return Skipped(
        document.source,
        f"duplicate doc_id {document.doc_id!r} (first from {first_source}); "
        "give it a unique id or remove the duplicate source",
    )


def _expand(source: str, skipped: list[Skipped]) -> list[str | Path]:
    """One source -> the URLs/files to load (folders walked, sorted, hidden entries left out)."""
    if is_url(source):
        if source.split(":", 1)[0].lower() in ("http", "https"):
            return [source]
        skipped.append(Skipped(source, "only http:// and https:// URLs can be fetched"))
        return []
    path = Path(source)
    try:
        if path.is_file():
            return [path]
    except OSError as e:  # in a folder that can be listed but not entered (no x permission)
        skipped.append(Skipped(source, _no_access(e)))
        return []
    if path.is_dir():
        files = sorted(_walk(path, skipped), key=lambda p: p.relative_to(path).parts)
        out: list[str | Path] = []
        for f in files:
            try:
                regular = f.is_file()
            except OSError as e:
                skipped.append(Skipped(str(f), _no_access(e)))
                continue
            if not regular:  # a pipe would block the build; a looping or broken link
                skipped.append(Skipped(str(f), "not a regular file (a pipe, device, or broken "
                                       "or looping symlink)"))
            elif f.suffix.lower() in SUPPORTED_EXTENSIONS or _text_by_name(f):
                out.append(f)
            elif f.suffix.lower() in EXTRACT_FIRST:
                skipped.append(Skipped(str(f), _extract_first(f.suffix.lower())))
            else:
                skipped.append(Skipped(str(f), f"{_UNSUPPORTED} {f.suffix or _NO_SUFFIX!r} in a "
                                       f"folder {UNSUPPORTED_HELP}"))
        if not out:
            skipped.append(Skipped(source, "folder has no supported files"))
        return out
    if path.exists():
        skipped.append(Skipped(source, "not a regular file or folder; give a file or folder"))
    elif path.is_symlink():  # it is there, pointing nowhere (or round in a loop)
        skipped.append(Skipped(source, "a broken or looping symlink; check where it points"))
    elif _WEB_ADDRESS_RE.match(source):
        skipped.append(Skipped(source, f"no such file or folder; for a web page, give the URL "
                                       f"with its scheme: https://{source}"))
    else:
        skipped.append(Skipped(source, "no such file or folder; check the path"))
    return []


def _no_access(e: OSError) -> str:
    return f"could not be read ({e.strerror or e}); check permissions"


# The plain-text files a project or package names by convention (in any case: ChangeLog,
# Readme, Debian's copyright), without an extension or with one of ``TEXT_NAME_TAGS``
# (README.Debian, NEWS.old): read in a folder as plain text (install.sh, history.py are code)
TEXT_NAMES = frozenset({"README", "NEWS", "INSTALL", "AUTHORS", "COPYING", "CHANGES", "CHANGELOG",
                        "HISTORY", "TODO", "HACKING", "THANKS", "CONTRIBUTING", "LICENSE",
                        "LICENCE", "NOTICE", "COPYRIGHT", "FAQ", "BUGS"})
TEXT_NAME_TAGS = frozenset({"", ".debian", ".source", ".old"})


def _text_by_name(path: Path) -> bool:
    """Whether ``path`` is a conventional plain-text file of ``TEXT_NAMES`` (not README.gz,
    LICENSE.svg, INSTALL.sh: another format, or code)."""
    stem, _, tag = path.name.partition(".")
    return stem.upper() in TEXT_NAMES and f".{tag}".lower().rstrip(".") in TEXT_NAME_TAGS


def _extract_first(suffix: str) -> str:
    return f"{suffix} files are not read; extract their text first (e.g. {EXTRACT_FIRST[suffix]})"


def _walk(root: Path, skipped: list[Skipped]) -> Iterator[Path]:
    """Files under ``root``, not following symlinked folders, hidden names and citeqa indexes
    left out (an index built inside its source folder would otherwise be read back in)."""
    from citeqa.retrieval.store import is_index_dir

    def unreadable(e: OSError, what: str = "list") -> None:
        where = e.filename if e.filename is not None else str(root)
        skipped.append(Skipped(_printable(str(where)),
                               f"could not {what} the folder ({e.strerror or e}); check "
                               "permissions"))

    for dirpath, dirnames, filenames in _os_walk(str(root), unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for d in dirnames:  # (os.walk lists a symlinked folder among the folders, not entered)
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append(Skipped(os.path.join(dirpath, d), "a symlinked folder is not "
                                       "followed (a link may loop); name it as a source"))
        try:
            index = is_index_dir(Path(dirpath))
        except OSError as e:  # listed, but not entered (a folder without x permission)
            dirnames[:] = []
            unreadable(OSError(e.errno, e.strerror, dirpath), "enter")
            continue
        if index:
            dirnames[:] = []
            skipped.append(Skipped(dirpath, "a citeqa index, not a source: left out"))
            continue
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _os_walk(top: str, onerror: Callable[[OSError], None]
             ) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, onerror=onerror)`` (top down, symlinked folders listed among the folders
    but not entered), without recursion: Python 3.11's calls itself per level, and a folder
    ~1,000 levels deep ended the whole build in a RecursionError."""
    stack = [top]
    while stack:
        where = stack.pop()
        try:
            with os.scandir(where) as found:
                entries = list(found)
        except OSError as e:
            onerror(e)
            continue
        dirnames: list[str] = []
        filenames: list[str] = []
        for entry in entries:
            try:
                folder = entry.is_dir()
            except OSError:
                folder = False
            (dirnames if folder else filenames).append(entry.name)
        yield where, dirnames, filenames  # (the caller may prune dirnames)
        for name in reversed(dirnames):
            path = os.path.join(where, name)
            if not os.path.islink(path):
                stack.append(path)


def _load_item(item: str | Path, fetcher: Fetcher) -> Iterator[Document | Skipped]:
    for out in _read_item(item, fetcher):
        if isinstance(out, Skipped):
            yield out
        elif (bad := _not_unicode(out)) is not None:
            yield Skipped(out.source, f"its {bad} is not valid Unicode (a lone "
                          "surrogate, such as a \\ud800-\\udfff escape in JSON); fix it")
        else:
            yield out


def _read_item(item: str | Path, fetcher: Fetcher) -> Iterator[Document | Skipped]:
    if isinstance(item, str):
        yield _load_url(item, fetcher)
        return
    try:
        yield from _load_file(item)
    except (_SkipError, SourceError) as e:  # SourceError: an HTML file the parser gave up on
        yield Skipped(str(item), str(e))
    except OSError as e:
        yield Skipped(str(item), f"could not read the file ({e.strerror or e}); check permissions")


def _not_unicode(doc: Document) -> str | None:
    """The first of ``doc``'s fields that cannot be written as UTF-8 (the index stores UTF-8),
    or None."""
    for name in ("text", "title", "source", "doc_id"):
        try:
            getattr(doc, name).encode("utf-8")
        except UnicodeEncodeError:
            return name
    return None


def _printable(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates) written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _load_url(url: str, fetcher: Fetcher) -> Document | Skipped:
    try:
        page = fetcher.fetch(url)
    except FetchError as e:  # BlockedURLError included
        return Skipped(url, str(e))
    if is_blank(page.text):
        return Skipped(url, "the page has no text")
    if (why := page.only_redirects()) is not None:
        return Skipped(url, why)
    return Document(doc_id=doc_id_for(url), title=page.title, source=page.final_url, text=page.text)


def _load_file(path: Path) -> Iterator[Document | Skipped]:
    """Documents from one file; raises _SkipError when the whole file yields none."""
    suffix = path.suffix.lower()
    if suffix in EXTRACT_FIRST:
        raise _SkipError(_extract_first(suffix))
    data = path.read_bytes()
    source = _printable(str(path))  # a name that is not UTF-8 (surrogates) written as escapes
    if suffix in HTML_EXTENSIONS:
        page = extract_html(_decode_html(data))
        if (target := page.redirect()) is not None:
            raise _SkipError(f"{_REDIRECT_ONLY} {target!r} (a meta refresh): index the page "
                             "it names")
        yield _single(source, page.title or _printable(path.name), page.text)
    elif suffix in JSON_EXTENSIONS:
        yield from _load_json(path, _decode_text(data))
    else:  # .txt, .md, or a file named explicitly
        text = _decode_text(data)
        title = title_of_source(text, _printable(path.name), path.name)
        yield _single(source, title, text)


def _single(source: str, title: str, text: str) -> Document:
    if is_blank(text):
        raise _SkipError("the file has no text")
    return Document(doc_id=doc_id_for(source), title=title, source=source, text=text)


def _decode_text(data: bytes) -> str:
    """UTF-8 text exactly as stored (no newline translation), or _SkipError for binary data."""
    bom = bom_codec(data)  # UTF-16 or UTF-32 (its mark says which): text, not binary
    if bom is not None and bom[0] != "utf-8":
        wide = bom[0][:6].upper()  # "UTF-16", "UTF-32"
        raise _SkipError(f"{wide} text; convert it to UTF-8 (e.g. iconv -f {wide} -t UTF-8)")
    if b"\x00" in data:
        if (layout := _wide_without_bom(data)) is not None:  # PowerShell's Out-File writes so
            raise _SkipError(f"{layout} text without a byte-order mark; convert it to UTF-8 "
                             f"(e.g. iconv -f {layout} -t UTF-8)")
        raise _SkipError("binary file (contains NUL bytes); give text, Markdown, HTML or JSON")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _SkipError(  # (iconv without -f reads the locale's encoding: UTF-8, and fails)
            f"not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 from its "
            "encoding (e.g. iconv -f WINDOWS-1252 -t UTF-8)"
        ) from None


# Text in UTF-32 or UTF-16 without a byte-order mark: (iconv's name, bytes a character, where
# in them the high bytes are: NUL for text of the first 256 code points, as English is)
_WIDE_LAYOUTS = (("UTF-32LE", 4, (1, 2, 3)), ("UTF-32BE", 4, (0, 1, 2)),
                 ("UTF-16LE", 2, (1,)), ("UTF-16BE", 2, (0,)))


_TEXT_BYTES = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)) + bytes(range(0xA0, 0x100)))


def _wide_without_bom(data: bytes) -> str | None:
    """The encoding (``_WIDE_LAYOUTS``) of ``data`` when its first 4 KB read as UTF-32 or UTF-16
    text without a byte-order mark: nine in ten of its high bytes NUL, of its low bytes text's;
    else None (a binary file)."""
    sample = data[:4096]
    for name, width, high in _WIDE_LAYOUTS:
        n = len(sample) // width * width
        if n < 2 * width:
            continue
        highs = bytes(sample[i] for i in range(n) if i % width in high)
        lows = bytes(sample[i] for i in range(n) if i % width not in high)
        # (the low bytes of text: letters, not a binary file's small numbers, "05 00 00 00")
        if (highs.count(0) >= 0.9 * len(highs)
                and sum(b in _TEXT_BYTES for b in lows) >= 0.9 * len(lows)):
            return name
    return None


def _decode_html(data: bytes) -> str:
    """HTML bytes as text: UTF-8, else the charset its <meta> declares; without a byte-order
    mark (its text is extracted, not kept byte for byte; a fetched page drops it too)."""
    try:
        return _decode_text(data).removeprefix("\ufeff")
    except _SkipError:
        declared = meta_declared(data)
        if declared is None or b"\x00" in data:
            raise
        label, codec = declared
        refused = _SkipError(f"could not decode as UTF-8 or its declared charset {label!r}")
        if codec is None:
            raise refused from None
        try:
            return decode(data, codec)
        except UnicodeError:
            raise refused from None


# --------------------------------------------------------------------------- JSON formats


def _load_json(path: Path, text: str) -> Iterator[Document | Skipped]:
    hashed: list[str] = []  # records' own ids REST would refuse, replaced by hashes
    yield from _json_documents(path, text, hashed)
    if hashed:
        one = len(hashed) == 1
        some = ", ".join(repr(i[:40]) for i in hashed[:3]) + (", ..." if len(hashed) > 3 else "")
        logger.warning(
            "%s: %d record id%s replaced by a hash, as REST would not accept %s as a doc_id "
            "(ASCII letters and digits, then also '.', '_', ':' and '-', parts joined by '/', "
            "at most %d characters): %s", _printable(str(path)), len(hashed), "" if one else "s",
            "it" if one else "them", MAX_DOC_ID_CHARS, some)


def _line_end(text: str) -> str:
    """What ends a JSON Lines file's lines: "\n" ("\r\n" less its "\r"), or "\r" alone
    (old Mac files)."""
    return "\n" if "\n" in text or "\r" not in text else "\r"


_NOT_ONE = object()  # no JSON value (JSON's null is None)
_NOT_SPACE = re.compile(r"\S")  # (what str.strip and str.isspace take for white space, less)


def _first_line(text: str) -> tuple[str, int]:
    """The first non-blank line of ``text`` as ``_json_documents`` reads lines, and where the
    text after it starts (``len(text)`` where none does)."""
    end, start = _line_end(text), 0
    while (stop := text.find(end, start)) >= 0 and not text[start:stop].strip():
        start = stop + 1  # (not text.split: the file may be large, one line is wanted)
    return (text[start:stop], stop + 1) if stop >= 0 else (text[start:], len(text))


def _json_line(line: str) -> Any:
    """``line``'s JSON value, or ``_NOT_ONE`` where it holds none (on its own)."""
    try:
        return json.loads(line.removesuffix("\r"))
    except (ValueError, RecursionError):
        return _NOT_ONE


def _first_line_is_json(text: str) -> bool:
    """Whether the first non-blank line of ``text`` is a JSON value on its own (lines as
    ``_json_documents`` reads them)."""
    return _json_line(_first_line(text)[0]) is not _NOT_ONE


def _json_documents(path: Path, text: str, hashed: list[str]) -> Iterator[Document | Skipped]:
    source = _printable(str(path))
    text = text.removeprefix("\ufeff")  # a byte-order mark: JSON's offsets are not the file's
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data": several values, i.e. JSON lines, if the first line is one value
            # (else a JSON document with something after it, not to be read line by line)
            if e.msg != "Extra data" or not _first_line_is_json(text):
                raise _SkipError(
                    f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; fix the file"
                ) from None
        except (ValueError, RecursionError) as e:  # too deep, or an integer too long
            raise _SkipError(f"JSON that cannot be read ({_json_limit(e)}); fix the file") from None
        else:
            yield from _json_value_documents(source, obj, hashed)
            return
    elif (obj := _one_json_document(text)) is not _NOT_ONE:
        # a .json file's content: read so (each line of a pretty-printed one was "invalid
        # JSON", and a list on one line "expected a JSON object": the file's records lost)
        yield from _json_value_documents(source, obj, hashed)
        return
    n_lines = 0
    # lines end at "\n" only: JSON strings may hold U+2028, U+2029 and U+0085 as they are,
    # which str.splitlines would take for line ends
    for lineno, line in enumerate(text.split(_line_end(text)), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        n_lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield Skipped(source, f"line {lineno}: invalid JSON ({e.msg}); fix or remove the line")
            continue
        except (ValueError, RecursionError) as e:
            yield Skipped(source, f"line {lineno}: JSON that cannot be read ({_json_limit(e)}); "
                                  "fix or remove the line")
            continue
        yield _record_document(source, record, lineno, f"line {lineno}", hashed)
    if n_lines == 0:
        raise _SkipError("the file has no records")


def _one_json_document(text: str) -> Any:
    """The JSON document a JSON Lines file holds instead of records a line, else ``_NOT_ONE``:
    one pretty-printed (its first line is no JSON value alone), or, its one line that is not
    blank (as the records' loop reads blank lines), a list or SQuAD (one record on its one
    line is a record: its id stays as it was)."""
    first, after = _first_line(text)
    value = _json_line(first)
    if value is _NOT_ONE:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return _NOT_ONE  # no JSON document: its lines are bad lines
    if _NOT_SPACE.search(text, after):  # (no copy of a large file's text)
        return _NOT_ONE  # lines of JSON values: records
    return value if isinstance(value, list) or _is_squad(value) else _NOT_ONE


def _json_value_documents(source: str, obj: Any, hashed: list[str]
                          ) -> Iterator[Document | Skipped]:
    """The documents of a JSON document (a .json file's): SQuAD's paragraphs, a list's
    records, or one ``{"text": ...}`` object."""
    if _is_squad(obj):
        yield from _squad_documents(source, obj)
    elif isinstance(obj, list):
        if not obj:
            raise _SkipError("the file has no records (an empty JSON list)")
        for i, element in enumerate(obj):
            yield _record_document(source, element, i, f"element {i}", hashed)
    elif isinstance(obj, dict) and "text" in obj:
        yield _record_document(source, obj, 0, "the object", hashed)
    else:
        raise _SkipError(
            "JSON is neither SQuAD ({'data': [{'title', 'paragraphs': [{'context'}]}]}) "
            "nor a list of {'text': ...} records"
        )


def _json_limit(e: ValueError | RecursionError) -> str:
    """What about a well-formed-looking JSON text Python's parser refused."""
    if isinstance(e, RecursionError):
        return "arrays or objects nested too deeply"
    return str(e).split(";")[0]


def _record_document(source: str, record: Any, position: int, where: str,
                     hashed: list[str]) -> Document | Skipped:
    """One ``{"text": ..., "title"?, "id"/"doc_id"?, "source"/"url"?}`` record; an own id REST
    would refuse is replaced by a hash and appended to ``hashed``."""
    if not isinstance(record, dict):
        return Skipped(source, f"{where}: expected a JSON object with a 'text' field")
    text = record.get("text")
    if not isinstance(text, str) or is_blank(text):
        return Skipped(source, f"{where}: no non-empty string 'text' field{_fields_of(record)}; "
                               "add one (or name the field that holds the text 'text')")
    nul = [k for k in ("text", "title", "source", "url")
           if isinstance(record.get(k), str) and "\x00" in record[k]]
    if nul:  # as POST /v1/documents refuses it, and a text file holding one (binary)
        return Skipped(source, f"{where}: a NUL character in its {nul[0]!r}; remove it")
    own_id = record.get("doc_id")
    if own_id is None:
        own_id = record.get("id")
    if own_id is not None and (isinstance(own_id, bool) or not isinstance(own_id, str | int)):
        said = (f"<a {'list' if isinstance(own_id, list) else 'object'}>"
                if isinstance(own_id, list | dict) else json.dumps(own_id))
        hashed.append(said)  # 3.0, true, a list: said, as "-5" is (a list nested 1,000 deep
        # made json.dumps recurse past Python's limit)
        own_id = None
    doc_id = str(own_id) if own_id is not None else ""
    if len(doc_id) > MAX_DOC_ID_CHARS or not _ID_RE.fullmatch(doc_id):
        if doc_id:
            hashed.append(_printable(doc_id))
        doc_id = doc_id_for(f"{source}#{position}")
    doc_source = record.get("source") or record.get("url")
    if not isinstance(doc_source, str):
        doc_source = f"{source}#{position}"
    title = record.get("title")
    if not isinstance(title, str) or is_blank(title):
        title = title_of_source(text, f"{Path(source).name} #{position}", doc_source)
    return Document(doc_id=doc_id, title=cap_title(title.strip()), source=doc_source, text=text)


def _fields_of(record: dict[str, Any]) -> str:
    """" (its fields: a, b)": what a record without a text has ("content", "body"?)."""
    if not record:
        return " (it has no fields)"
    names = [_printable(str(k))[:40] for k in itertools.islice(record, 6)]
    return f" (its fields: {', '.join(names[:5])}{', …' if len(names) > 5 else ''})"


def _is_squad(obj: Any) -> bool:
    """SQuAD's shape: ``{"data": [...]}`` whose articles (some may be malformed: each is skipped
    on its own) have ``paragraphs``."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("data"), list)
        and (not obj["data"] or any(isinstance(a, dict) and "paragraphs" in a
                                    for a in obj["data"]))
    )


def _squad_documents(source: str, obj: dict[str, Any]) -> Iterator[Document | Skipped]:
    """One document per SQuAD paragraph: text == context, titled by its article."""
    if not obj["data"]:
        raise _SkipError("the SQuAD file has no articles ('data' is empty)")
    titles: set[str] = set()
    for a, article in enumerate(obj["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            yield Skipped(f"{source}#article-{a}", "SQuAD article without a 'paragraphs' list")
            continue
        raw_title = article.get("title")
        if not isinstance(raw_title, str) or is_blank(raw_title):
            raw_title = f"article-{a}"
        title = cap_title(raw_title.replace("_", " ").strip())
        # an article whose title an earlier one has is told apart by its position (the first
        # keeps the plain name, so ids of files without repeats stay as they were)
        name = raw_title if raw_title not in titles else f"{raw_title}#{a}"
        extra = 1
        while name in titles:  # an article titled so already ("A", "A#2", then "A" again)
            name, extra = f"{raw_title}#{a}.{extra}", extra + 1
        titles.update((raw_title, name))
        if not article["paragraphs"]:
            yield Skipped(f"{source}#{name}", "SQuAD article with no paragraphs")
        for p, paragraph in enumerate(article["paragraphs"]):
            doc_source = f"{source}#{name}/{p}"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or is_blank(context):
                yield Skipped(doc_source, "SQuAD paragraph has no 'context' text")
                continue
            yield Document(
                doc_id=doc_id_for(doc_source), title=title, source=doc_source, text=context
            )
