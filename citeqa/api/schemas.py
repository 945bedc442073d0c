"""Request and response schemas of the REST API (pydantic), kept apart from the handlers' logic.

Requests reject unknown fields (``extra="forbid"``) and carry every limit, so that bad input
becomes a 422 before any handler runs. Responses mirror ``citeqa.types`` (``Answer.to_json``,
``Hit.to_json``, ``Document``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from citeqa.config import (
    MAX_CANDIDATES,
    MAX_DOCUMENT_CHARS,
    MAX_PASSAGES,
    MAX_QUESTION_CHARS,
    MAX_SEARCH_K,
    MAX_SOURCE_CHARS,
    MAX_TITLE_CHARS,
)
from citeqa.generation.format import AnswerMode
from citeqa.text import BLANK_CHARS, is_blank, unsendable
from citeqa.types import DOC_ID_PATTERN, DOC_ID_RULE, MAX_DOC_ID_CHARS

# GET /v1/documents pages: at most this many documents per request.
MAX_DOCUMENTS_PAGE = 100

# doc ids in a path: any indexed id (built ones may hold spaces), but no control characters
DOC_ID_PATH_PATTERN = r"^[^\x00-\x1f\x7f]+$"

_BLANK_CLASS = "".join(f"\\u{ord(c):04x}" for c in BLANK_CHARS)  # the same set, as a regex class
# Some character that is neither blank nor NUL, and no NUL anywhere (checked again below).
NOT_BLANK = rf"^[^\x00]*[^\x00{_BLANK_CLASS}][^\x00]*$"
NO_NUL = r"^[^\x00]*$"  # optional free text: anything but NUL (checked again below)


# A URL to fetch: http(s), then printable ASCII only (IDNs as punycode, other characters %XX).
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[!-~]+$"

# What each pattern means, for error messages (pydantic would print the regex itself).
PATTERN_HELP = {
    URL_PATTERN: "must be an http(s) URL in printable ASCII without spaces: write an "
                 "international host name in punycode (xn--...) and other characters as %XX",
    NOT_BLANK: "must contain something other than whitespace and invisible characters, and no "
               "NUL character",
    NO_NUL: "must not contain a NUL character",
    DOC_ID_PATTERN: f"must be {DOC_ID_RULE}",
    DOC_ID_PATH_PATTERN: "must not contain control characters (no document id has them)",
}


def _json_number(v: Any) -> Any:
    """JSON's true/false are not numbers, though Python's bool is an int: refuse them by name
    (strings such as "0.5" are refused by ``strict``, as JSON Schema's "number" refuses them)."""
    if isinstance(v, bool):
        raise PydanticCustomError("number_type", "must be a number, not true or false")
    return v


def _json_integer(v: Any) -> Any:
    """JSON Schema's "integer" includes ``3.0``; strings and booleans stay refused."""
    v = _json_number(v)
    return int(v) if isinstance(v, float) and v.is_integer() else v


# A number in [0, 1] as JSON Schema means it: 0.5 or 1, never "0.5" or true.
Probability = Annotated[
    float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True), BeforeValidator(_json_number)
]
# An accuracy to reach, in (0, 1): no threshold certifies 0 or 1.
Target = Annotated[
    float, Field(gt=0.0, lt=1.0, allow_inf_nan=False, strict=True), BeforeValidator(_json_number)
]


# Integers in a range as JSON Schema means them: 3 or 3.0, never "3" or true.
TopK = Annotated[int, Field(ge=1, le=MAX_SEARCH_K, strict=True), BeforeValidator(_json_integer)]
Passages = Annotated[
    int, Field(ge=1, le=MAX_PASSAGES, strict=True), BeforeValidator(_json_integer)
]
Candidates = Annotated[
    int, Field(ge=1, le=MAX_CANDIDATES, strict=True), BeforeValidator(_json_integer)
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_text(v: str, what: str) -> str:
    """Refuse NUL characters and lone surrogates (``text.unsendable``)."""
    if (why := unsendable(v)) is not None:
        raise ValueError(f"the {what} {why}")
    return v


class AnswerRequest(_Request):
    """POST /v1/answer. ``min_score`` and ``target_accuracy`` are mutually exclusive."""

    model_config = ConfigDict(
        extra="forbid",
        # min_score and target_accuracy are mutually exclusive (both null is fine)
        json_schema_extra={"not": {
            "required": ["min_score", "target_accuracy"],
            "properties": {"min_score": {"type": "number"}, "target_accuracy": {"type": "number"}},
        }},
    )

    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NOT_BLANK,
        description="the question to answer",
    )
    top_k: Passages | None = Field(default=None, description="passages given to the model")
    n_candidates: Candidates | None = Field(default=None, description="samples per question")
    min_score: Probability | None = Field(
        default=None, description="decline when the best score is below this"
    )
    target_accuracy: Target | None = Field(
        default=None,
        description="decline so that answered questions are right this often, rounded up to "
        "a multiple of 0.01 (needs a calibrated reward model; a target that no threshold "
        "certifies, or one above 0.99, declines every question, and the reason says up to "
        "which target the calibration certifies)",
    )
    answer_mode: AnswerMode | None = Field(
        default=None,
        description="span: the answer is a span of a passage and its quote a stretch of a "
        "passage that contains it, enforced while decoding (the default); free: a free-text "
        "answer and any quote, whose support the reward model judges",
    )
    with_passages: bool = Field(
        default=False, strict=True,
        description="also return the passages retrieval found (the ones given to the model, "
        "best first, with their text): what a decline was based on. Off by default: they "
        "are most of the response's size",
    )

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if is_blank(v):
            raise ValueError("the question is blank; ask something")
        return check_text(v, "question")

    @model_validator(mode="after")
    def _one_threshold(self) -> AnswerRequest:
        if self.min_score is not None and self.target_accuracy is not None:
            raise ValueError("give min_score or target_accuracy, not both")
        return self


class SearchRequest(_Request):
    """POST /v1/search."""

    query: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NOT_BLANK)
    k: TopK = Field(default=10, description="hits to return")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if is_blank(v):
            raise ValueError("the query is blank; search for something")
        return check_text(v, "query")


class TextDocumentIn(_Request):
    """POST /v1/documents with the document's text."""

    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS, pattern=NOT_BLANK,
                      description="full text (the whole request body is limited to "
                      "CITEQA_MAX_BODY_BYTES, 64 KiB unless the server sets more)")
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS, pattern=NO_NUL,
                              description="default: the text's first line where it reads as "
                              "a title (a # heading, or up to 120 characters not ending as a "
                              "sentence does), else the doc_id")
    doc_id: str | None = Field(default=None, max_length=MAX_DOC_ID_CHARS, pattern=DOC_ID_PATTERN,
                               description="default: a hash of source, title and text (16 "
                               "hex digits, a form a chosen id may not take)")
    source: str | None = Field(default=None, max_length=MAX_SOURCE_CHARS, pattern=NO_NUL,
                               description="where the text came from (shown with quotes)")

    @model_validator(mode="before")
    @classmethod
    def _text_or_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "text" not in data:  # ("url" would make it a UrlDocumentIn)
            raise ValueError("send the document's text, or a url for the service to fetch")
        return data

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if is_blank(v):
            raise ValueError("the text is blank; send the document's text")
        return check_text(v, "text")

    @field_validator("title", "source")
    @classmethod
    def _clean(cls, v: str | None) -> str | None:
        if v is not None and is_blank(v):  # " ", U+200B: a title no one sees (as builds read
            return None  # one): the default's, as for none
        return None if v is None else check_text(v, "title or source")


class UrlDocumentIn(_Request):
    """POST /v1/documents with an http(s) URL for the service to fetch."""

    url: str = Field(
        min_length=1,
        max_length=MAX_SOURCE_CHARS,
        pattern=URL_PATTERN,
        description="an http(s) URL of a public page (HTML or text)",
    )
    doc_id: str | None = Field(default=None, max_length=MAX_DOC_ID_CHARS, pattern=DOC_ID_PATTERN,
                               description="default: a hash of the URL (16 hex digits, a "
                               "form a chosen id may only take as this URL's own)")

    @model_validator(mode="before")
    @classmethod
    def _not_both(cls, data: Any) -> Any:
        if isinstance(data, dict) and "text" in data:
            raise ValueError("send the document's text or a url, not both")
        return data

    @field_validator("url")
    @classmethod
    def _clean_url(cls, v: str) -> str:
        return check_text(v, "url")


# The union's tags name no field: error locations drop them (api/errors.validation_details).
UNION_TAGS = frozenset({"text document", "url document"})


def _document_kind(body: Any) -> str:
    """A body with a "url" key is a URL to fetch, any other a text: errors then say what is
    wrong with that kind (not that the other kind's field is missing)."""
    return "url document" if isinstance(body, dict) and "url" in body else "text document"


DocumentIn = Annotated[
    Annotated[TextDocumentIn, Tag("text document")] | Annotated[UrlDocumentIn, Tag("url document")],
    Discriminator(_document_kind),
]


class QuoteOut(BaseModel):
    text: str
    doc_id: str
    title: str
    source: str
    start: int  # character offset into the document's text, inclusive
    end: int  # exclusive


class CandidateOut(BaseModel):
    answer: str
    quote: QuoteOut | None
    score: float | None
    uncertainty: float | None
    logprob: float
    mean_logprob: float
    retrieval_score: float
    retrieval_fused: bool = Field(default=True, description="retrieval_score is a fused "
                                  "(reciprocal-rank) score; false: one retriever's raw score")
    answer_start: int | None = Field(
        default=None, description="the answer's start in the quote's document (inside the "
        "quote); null when the answer is not in the quote (free mode) or there is no quote")
    answer_end: int | None = Field(default=None, description="the answer's end (exclusive)")
    supported: bool = Field(default=False,
                            description="the answer stands verbatim in its verified quote")


class HitOut(BaseModel):
    text: str
    doc_id: str
    title: str
    source: str
    start: int
    end: int
    passage_id: int
    score: float
    bm25: float | None = None
    dense: float | None = None
    fused: bool = Field(default=True, description="score is the fused (reciprocal-rank) one; "
                        "false when one retriever alone ordered the hits (a BM25-only index), "
                        "whose raw score it then is")


class AnswerOut(BaseModel):
    question: str
    declined: bool
    answer: str | None
    quote: QuoteOut | None
    answer_start: int | None = Field(
        default=None, description="the answer's start in the quote's document (inside the "
        "quote); null on a decline, and in free mode when the answer is not in the quote")
    answer_end: int | None = Field(default=None, description="the answer's end (exclusive)")
    score: float | None
    uncertainty: float | None = Field(
        default=None, description="spread of the reward model's ensemble of verifiers (their "
        "probabilities, not the served score where that combines them with other signals); "
        "null without a reward model")
    reason: str | None = None
    candidates: list[CandidateOut] = Field(
        default_factory=list, description="every candidate, best first: on a decline, the "
        "first one with a quote is the best guess the service was not confident in")
    timings_ms: dict[str, float] = Field(
        default_factory=dict, description="where the time went, in milliseconds (keys ending "
        "in _ms: retrieve, generate, score, total, and the generator's backend, prefill, "
        "decode and verify; generation is batched with concurrent questions, so backend, "
        "prefill and decode are the shared batch's; a remote engine reports request_ms, its "
        "requests' times summed, which run concurrently), beside a few counts for the same "
        "question (tokens, prompt_tokens, forward_passes, batch_rows, batch_items; cut: "
        "outputs a remote engine cut at its length limit; quote_errors: span-mode quote "
        "calls the engine answered with an error, each a failed candidate)")
    passages: list[HitOut] | None = Field(
        default=None, description="the passages retrieval found, best first; present only "
        "when the request set with_passages")
    index_version: str | None = Field(
        default=None, description="the version of the index this was answered from (16 hex "
        "digits; any document added, deleted or changed makes a new one, and /readyz gives "
        "the current one): the quote's offsets index into that version's documents")


class SearchOut(BaseModel):
    hits: list[HitOut]


class DocumentOut(BaseModel):
    doc_id: str
    title: str
    source: str
    text: str


class DocumentSummaryOut(BaseModel):
    doc_id: str
    title: str
    source: str
    length: int = Field(description="characters of text")


class DocumentListOut(BaseModel):
    """GET /v1/documents: one page of the indexed documents, in index order."""

    documents: list[DocumentSummaryOut]
    total: int = Field(description="documents in the index")
    offset: int
    limit: int
    can_change: bool = Field(description="whether this request's API key may add and delete "
                             "documents (false for a key of CITEQA_READ_API_KEYS)")


class DocumentAddedOut(BaseModel):
    doc_id: str
    title: str
    source: str
    passages: int  # passages the document was split into (all searchable now)


class StatusOut(BaseModel):
    status: str  # "ok", "ready", "loading", "failed", "shutting_down"
    detail: str | None = None


class ReadyOut(BaseModel):
    """GET /readyz once ready (before: a 503 error body)."""

    status: str  # "ready"
    index_version: str | None = Field(
        default=None, description="the version of the index questions are answered from now "
        "(as an answer's index_version)")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    """The uniform error body of every 4xx/5xx."""

    error: ErrorDetail
