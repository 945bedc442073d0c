"""Document ingestion: files, folders and URLs -> Documents (``load_sources``), and the
SSRF-safe URL fetcher (``Fetcher``) they use.

Modules: ``sources`` (formats, folders, skipping), ``html`` (HTML -> visible text), ``title``
(a title from plain text or Markdown), ``fetch`` (URL and address rules, redirects, size/time
caps).
"""

from citeqa.ingest.fetch import FetchedPage, Fetcher, FetchPolicy, check_ip, page_key
from citeqa.ingest.html import HtmlText, extract_html
from citeqa.ingest.sources import (
    Kept,
    LoadResult,
    Skipped,
    doc_id_for,
    duplicate,
    expand_sources,
    is_made_id,
    load_item,
    load_sources,
    same_page,
)

__all__ = [
    "FetchPolicy",
    "FetchedPage",
    "Fetcher",
    "page_key",
    "HtmlText",
    "Kept",
    "LoadResult",
    "Skipped",
    "check_ip",
    "doc_id_for",
    "is_made_id",
    "duplicate",
    "expand_sources",
    "extract_html",
    "load_item",
    "load_sources",
    "same_page",
]
