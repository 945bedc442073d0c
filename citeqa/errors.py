"""The one exception tree of citeqa. Messages say what went wrong and what to do.

    CiteqaError
    ├── ConfigError          bad setting or preset
    │   └── NotSupportedError   what was asked needs something this setup lacks (501)
    ├── SourceError          a document source could not be read (missing, binary, empty)
    │   └── FetchError       a URL could not be fetched
    │       ├── BadURLError       the URL is malformed or its host does not exist
    │       ├── BlockedURLError   the URL is not allowed (scheme, private address, ...)
    │       └── UnreadablePageError  it was fetched, but cannot be used: too large, a type
    │                                    or encoding refused, HTML that cannot be read
    ├── IndexError_          an index directory is missing, corrupt or mismatched
    │   ├── IndexChangedError   another writer changed it since this process loaded it
    │   └── IndexExistsError    a build only where none is found one there at its swap
    ├── IndexWriteError      a change to the index could not be written (a full disk: .full)
    ├── EmptyCorpusError     nothing to index
    ├── ModelError           a model could not be found or loaded
    ├── EngineError          a remote generation engine answered with an error
    │   └── EngineUnavailableError  it could not be reached, or is busy or starting
    ├── OutputFormatError    a generator's output does not follow the cited-answer format
    └── InvalidRequestError  a user's request is invalid (API maps it to 4xx)

Beside it, ``citeqa.client.CiteqaAPIError`` is what the client raises for an error the service
returned. A ValueError or AssertionError raised inside citeqa is a bug (an internal invariant,
never a user's mistake): the API answers it 500.
"""

from __future__ import annotations


class CiteqaError(Exception):
    """Base class for all errors citeqa raises on purpose."""


class ConfigError(CiteqaError):
    """A setting or preset is invalid."""


class NotSupportedError(ConfigError):
    """What was asked needs something this setup lacks (e.g. changing the documents of a
    retriever that is not an index directory): the server's limit, not the request's fault."""


class BusyError(ConfigError):
    """Another process holds the run directory (or the file) a command would write: nothing
    of it was touched, and it is that process's."""


class SourceError(CiteqaError):
    """A document source could not be read."""


class FetchError(SourceError):
    """A URL could not be fetched."""


class BadURLError(FetchError):
    """A URL is the caller's mistake: malformed, or naming a host that does not exist."""


class BlockedURLError(FetchError):
    """A URL is not allowed: wrong scheme or an address that is not public."""


class UnreadablePageError(FetchError):
    """A page was fetched, but cannot be used: over the size cap, a content type or encoding
    that is refused, or HTML that cannot be read (the parser gives up, or takes too long): the
    page's fault, so retrying does not help."""


class IndexError_(CiteqaError):  # noqa: N801 - trailing underscore avoids the builtin
    """An index directory is missing, corrupt, or was built with other settings."""


class IndexChangedError(IndexError_):
    """The index on disk is no longer the one a server loaded (another writer changed it)."""


class IndexExistsError(IndexError_):
    """A build meant only where no index is (``--if-missing``) found one there when it came to
    swap its own in (another build wrote it meanwhile): that index is left as it is."""


class IndexWriteError(CiteqaError):
    """A change to the index could not be written (a full disk: ``full``; a read-only file
    system, ...); the index is as it was."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class EmptyCorpusError(CiteqaError):
    """The sources produced no documents to index."""


class ModelError(CiteqaError):
    """A model could not be found or loaded."""


class EngineError(CiteqaError):
    """A remote generation engine (vLLM, SGLang) answered a request with an error."""


class EngineUnavailableError(EngineError):
    """A remote generation engine could not be reached, timed out, or is busy or starting;
    ``retry_after_s``: how long the engine itself asked to be left alone (its Retry-After),
    where it said."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutputFormatError(CiteqaError):
    """A generator's output does not follow the cited-answer format (see generation/format.py)."""


class InvalidRequestError(CiteqaError):
    """A request is invalid; ``status`` and ``code`` are the HTTP status and error code the API
    returns for it."""

    def __init__(self, message: str, *, status: int = 422, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
