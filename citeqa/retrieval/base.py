"""The retrieval seam: anything that finds passages for a query and returns their documents."""

from __future__ import annotations

from typing import Protocol

from citeqa.types import Document, Hit


class Retriever(Protocol):
    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Best-first hits for ``query`` (at most ``k``)."""
        ...

    def document(self, doc_id: str) -> Document:
        """The full document; raises KeyError when unknown."""
        ...

    @property
    def index_version(self) -> str | None:
        """What names the documents searched, so that an answer says which it came from (an
        index's ``Index.version``); None when there is no such name. Optional: a retriever
        without the attribute is read as None."""
        ...
