"""Request and response schemas of the REST API (pydantic), kept apart from the handlers' logic.

Requests reject unknown fields (``extra="forbid"``) and carry every limit, so that bad input
becomes a 422 before any handler runs. Responses mirror ``citeqa.types`` (``Answer.to_json``,
``Hit.to_json``, ``Document``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_QUESTION_CHARS = 1000  # longer questions are rejected (422)
MAX_TOP_K = 50  # passages shown to the generator / search hits per request
MAX_CANDIDATES = 16  # samples per question

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnswerRequest(_Request):
    """POST /v1/answer. ``min_score`` and ``target_accuracy`` are mutually exclusive."""

    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, description="the question to answer"
    )
    top_k: int | None = Field(
        default=None, ge=1, le=MAX_TOP_K, strict=True, description="passages given to the model"
    )
    n_candidates: int | None = Field(
        default=None, ge=1, le=MAX_CANDIDATES, strict=True, description="samples per question"
    )
    min_score: Probability | None = Field(
        default=None, description="decline when the best score is below this"
    )
    target_accuracy: Probability | None = Field(
        default=None,
        description="decline so that answered questions are right this often "
        "(needs a calibrated reward model)",
    )

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the question is blank; ask something")
        if "\x00" in v:
            raise ValueError("the question contains a NUL character")
        return v

    @model_validator(mode="after")
    def _one_threshold(self) -> AnswerRequest:
        if self.min_score is not None and self.target_accuracy is not None:
            raise ValueError("give min_score or target_accuracy, not both")
        return self


class SearchRequest(_Request):
    """POST /v1/search."""

    query: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    k: int = Field(default=10, ge=1, le=MAX_TOP_K, strict=True)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the query is blank; search for something")
        return v


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


class AnswerOut(BaseModel):
    question: str
    declined: bool
    answer: str | None
    quote: QuoteOut | None
    score: float | None
    uncertainty: float | None = None
    reason: str | None = None
    candidates: list[CandidateOut] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)


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


class SearchOut(BaseModel):
    hits: list[HitOut]


class DocumentOut(BaseModel):
    doc_id: str
    title: str
    source: str
    text: str


class StatusOut(BaseModel):
    status: str  # "ok", "ready", "loading", "failed", "shutting_down"
    detail: str | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    """The uniform error body of every 4xx/5xx."""

    error: ErrorDetail
