"""citeqa: cited question answering with verified verbatim quotes."""

from importlib.metadata import PackageNotFoundError, version

from citeqa.types import Answer, Candidate, Document, Hit, Passage, Quote

try:  # one home: pyproject.toml's version, as installed
    __version__ = version("citeqa")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
__all__ = ["Answer", "Candidate", "Document", "Hit", "Passage", "Quote", "__version__"]
