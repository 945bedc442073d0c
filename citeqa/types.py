"""The shared vocabulary of citeqa: documents -> passages -> hits -> candidates -> answers,
and the question as asked (``AskArgs``).

Data flows one way through these types. Every span carries character offsets into its
document's ``text`` so that ``document.text[start:end]`` reproduces it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# The doc ids a user may choose (REST's doc_id, a JSON record's "id"): they appear in URLs
# (/v1/documents/{doc_id}), so no spaces etc., and every /-separated part starts with a letter
# or digit: no "." or ".." part (which clients and proxies resolve away before the request is
# sent) and no empty one. Other ids are replaced by a hash (ingest) or refused (REST).
MAX_DOC_ID_CHARS = 200
DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9][A-Za-z0-9._:-]*)*$"
DOC_ID_RULE = (f"1-{MAX_DOC_ID_CHARS} characters: letters, digits and . _ : / -, each "
               "/-separated part starting with a letter or digit")  # (what the pattern says)


@dataclass(frozen=True)
class Document:
    """One source document with its full extracted text."""

    doc_id: str  # stable id: a hash of source (+ position within it for multi-doc files)
    title: str
    source: str  # path or URL it came from
    text: str  # full extracted text; for plain-text files, the file's content unchanged


@dataclass(frozen=True)
class Passage:
    """A chunk of a document: ``text == document.text[start:end]``."""

    passage_id: int  # row in the index (dense position; stable within one index build)
    doc_id: str
    start: int  # character offset into the document's text, inclusive
    end: int  # character offset into the document's text, exclusive
    text: str


@dataclass(frozen=True)
class Hit:
    """A retrieved passage with its scores (best first in a result list)."""

    passage: Passage
    title: str
    source: str
    score: float  # the score that ordered the list: the fused (RRF) one, unless ``fused`` is False
    bm25: float | None = None  # raw BM25Okapi score, None when the passage was not a BM25 hit
    dense: float | None = None  # cosine similarity, None when not a dense hit
    # False when one retriever alone ordered the list (a BM25-only index, or search mode "bm25"
    # or "dense"): ``score`` is then that retriever's raw score, on another scale than RRF's
    fused: bool = True
    # (a passage shown in the place of a better-ranked copy of it, from a shorter document:
    # ``score`` is that copy's; ``bm25`` and ``dense`` its own, None when not among the hits)

    def to_json(self) -> dict[str, Any]:
        p = self.passage
        return {
            "text": p.text,
            "doc_id": p.doc_id,
            "title": self.title,
            "source": self.source,
            "start": p.start,
            "end": p.end,
            "passage_id": p.passage_id,
            "score": self.score,
            "bm25": self.bm25,
            "dense": self.dense,
            "fused": self.fused,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Hit:
        """Inverse of ``to_json`` (``fused`` defaults to True, as before it was sent)."""
        passage = Passage(d["passage_id"], d["doc_id"], d["start"], d["end"], d["text"])
        return cls(passage, d["title"], d["source"], d["score"], d.get("bm25"), d.get("dense"),
                   bool(d.get("fused", True)))


@dataclass(frozen=True)
class Quote:
    """A verified verbatim quote: ``document.text[start:end] == text``."""

    text: str
    doc_id: str
    title: str
    source: str
    start: int
    end: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Quote | None:
        """Inverse of ``to_json``; None for None."""
        if d is None:
            return None
        return cls(d["text"], d["doc_id"], d["title"], d["source"], int(d["start"]),
                   int(d["end"]))


@dataclass(frozen=True)
class Candidate:
    """One generated (answer, quote) pair, before or after scoring."""

    answer: str
    quote: Quote | None  # None when the quote failed verification (never returned as a quote)
    logprob: float = 0.0  # sum of token log-probabilities of the generated output
    n_tokens: int = 0  # generated tokens, for mean log-probability
    retrieval_score: float = 0.0  # retrieval score of the quoted passage (Hit.score)
    score: float | None = None  # reward-model probability of correct-and-supported
    # spread of the verifier ensemble's probabilities (not of a combined served score)
    uncertainty: float | None = None
    raw: str = ""  # the generator's raw output, for debugging and evaluation
    # Where the answer stands in the quote's document (inside the quote), when it stands there:
    # verbatim in span mode, by construction; in free mode as ``cited.answer_span`` finds it,
    # so the document's text there may differ from ``answer`` in white space, or by
    # punctuation trimmed from its ends.
    answer_start: int | None = None
    answer_end: int | None = None
    retrieval_fused: bool = True  # retrieval_score is a fused (RRF) score (Hit.fused)

    @property
    def supported(self) -> bool:
        """The answer stands verbatim in its verified quote."""
        return self.quote is not None and self.answer_start is not None

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.n_tokens, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "quote": self.quote.to_json() if self.quote else None,
            "score": self.score,
            "uncertainty": self.uncertainty,
            "logprob": self.logprob,
            "mean_logprob": self.mean_logprob,
            "retrieval_score": self.retrieval_score,
            "retrieval_fused": self.retrieval_fused,
            "answer_start": self.answer_start,
            "answer_end": self.answer_end,
            "supported": self.supported,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        """Inverse of ``to_json``: ``raw`` is not sent, so it comes back empty; the token count
        is recovered from logprob / mean_logprob (0 when unknowable); ``retrieval_fused``
        defaults to True, as before it was sent."""
        logprob, mean = float(d.get("logprob") or 0.0), float(d.get("mean_logprob") or 0.0)
        return cls(
            answer=d["answer"],
            quote=Quote.from_json(d.get("quote")),
            logprob=logprob,
            n_tokens=round(logprob / mean) if mean else 0,
            retrieval_score=float(d.get("retrieval_score") or 0.0),
            score=d.get("score"),
            uncertainty=d.get("uncertainty"),
            answer_start=d.get("answer_start"),
            answer_end=d.get("answer_end"),
            retrieval_fused=bool(d.get("retrieval_fused", True)),
        )


@dataclass
class Answer:
    """What the pipeline returns for one question (also the REST response body)."""

    question: str
    declined: bool
    answer: str | None
    quote: Quote | None
    score: float | None
    uncertainty: float | None = None
    reason: str | None = None  # why it declined, when it did
    candidates: list[Candidate] = field(default_factory=list)  # best first
    timings_ms: dict[str, float] = field(default_factory=dict)
    passages: list[Hit] = field(default_factory=list)  # what retrieval found, best first
    # The answer's offsets in the quote's document (inside the quote); None on a decline, or
    # in free mode when the answer's words are not verbatim in the quote
    answer_start: int | None = None
    answer_end: int | None = None
    # the version of the index it was answered from (``Index.version``: its quote's offsets
    # index into that index's documents); None from a retriever without versions
    index_version: str | None = None

    def to_json(self, *, with_candidates: bool = True,
                with_passages: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "question": self.question,
            "declined": self.declined,
            "answer": self.answer,
            "quote": self.quote.to_json() if self.quote else None,
            "answer_start": self.answer_start,
            "answer_end": self.answer_end,
            "score": self.score,
            "uncertainty": self.uncertainty,
            "reason": self.reason,
            "timings_ms": self.timings_ms,
            "index_version": self.index_version,
        }
        if with_candidates:
            out["candidates"] = [c.to_json() for c in self.candidates]
        if with_passages:
            out["passages"] = [h.to_json() for h in self.passages]
        return out


@dataclass(frozen=True)
class AskArgs:
    """One question with its per-request options (None = the configured default)."""

    question: str
    top_k: int | None = None  # passages shown to the generator
    n_candidates: int | None = None  # candidates generated
    min_score: float | None = None  # decline below this score
    target_accuracy: float | None = None  # decline below the threshold calibrated for this
    search_k: int | None = None  # passages retrieved and returned on the Answer (>= top_k)
    answer_mode: str | None = None  # "span" | "free"; None = the configured one
    # True once nobody waits for the answer (a server's client left): not searched if not yet,
    # generation stops early, its candidates fail, it is not scored, and the answer is thrown
    # away (GenerationRequest.abandoned)
    abandoned: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
