"""citeqa: cited question answering with verified verbatim quotes.

The vocabulary (``Answer``, ``Quote``, ...) is imported with the package; the heavier entry
points are served on first use (PEP 562), so ``import citeqa`` loads no model library:
``citeqa.Pipeline`` (answer questions in-process), ``citeqa.Settings`` / ``citeqa.preset``
(configuration), ``citeqa.CiteqaClient`` (the REST service's client), ``citeqa.CiteqaError``.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from citeqa.lazy import lazy_dir, lazy_exports
from citeqa.types import Answer, AskArgs, Candidate, Document, Hit, Passage, Quote

if TYPE_CHECKING:  # what type checkers and editors see; at run time, the lazy import below
    from citeqa.client import CiteqaAPIError, CiteqaClient
    from citeqa.config import Config, Settings, preset
    from citeqa.errors import CiteqaError
    from citeqa.pipeline import Pipeline

try:  # one home: pyproject.toml's version, as installed
    __version__ = version("citeqa")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

_HOMES = {
    "Pipeline": "pipeline",
    "Settings": "config",
    "Config": "config",
    "preset": "config",
    "CiteqaClient": "client",
    "CiteqaAPIError": "client",
    "CiteqaError": "errors",
}
__all__ = [  # a literal list: type checkers read no other (checked: tests/test_package.py)
    "Answer", "AskArgs", "Candidate", "CiteqaAPIError", "CiteqaClient", "CiteqaError", "Config",
    "Document", "Hit", "Passage", "Pipeline", "Quote", "Settings", "__version__", "preset",
]
if not TYPE_CHECKING:  # (seen by type checkers, it made every misspelt name an Any)
    __getattr__ = lazy_exports(__name__, _HOMES)
__dir__ = lazy_dir(__name__, _HOMES)
