"""citeqa: cited question answering with verified verbatim quotes."""

from citeqa.types import Answer, Candidate, Document, Hit, Passage, Quote

__version__ = "0.1.0"
__all__ = ["Answer", "Candidate", "Document", "Hit", "Passage", "Quote", "__version__"]
