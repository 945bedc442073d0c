"""The one word tokenizer of citeqa: lowercase unicode ``\\w+`` runs.

BM25 indexes and queries with it, and other stages use it for term overlap, so a change here
changes every index: bump the index format version if you change it.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` (``\\w+`` in the unicode sense), in order."""
    return _WORD.findall(text.lower())
