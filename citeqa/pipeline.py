"""The question pipeline: retrieve -> generate cited candidates -> score -> answer or decline.

``Pipeline.ask`` is what the CLI and the API call. Candidates with a verified quote rank first,
by score. The pipeline declines (``declined=True``, no answer, no quote) when no candidate has a
verified quote or the best score is below the threshold.

Scores come from a ``Scorer`` (the reward model). Without one, a candidate's score is the
generator's own confidence, ``exp(mean token log-probability)``: a stand-in, not calibrated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from citeqa.config import Config, Settings
from citeqa.errors import InvalidRequestError
from citeqa.generation.cited import CitedGenerator
from citeqa.retrieval.base import Retriever
from citeqa.types import Answer, Candidate, Document, Hit

MAX_QUESTION_CHARS = 1000  # longer questions are refused (prompt budget of a small model)
MAX_TOP_K = 20  # most passages a request may ask to show
MAX_CANDIDATES = 32  # most samples a request may ask for

STAND_IN_NOTE = (
    "scores are the generator's own confidence exp(mean token logprob), "
    "a stand-in until a reward model is configured"
)


class Scorer(Protocol):
    def score(self, question: str, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates in the same order with ``score`` (and ``uncertainty``) filled in."""
        ...


def confidence(candidate: Candidate) -> float:
    """The generator's own confidence in a candidate: exp(mean token log-probability)."""
    return math.exp(min(candidate.mean_logprob, 0.0))


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Verified quotes first, then by score (best first); stable for ties."""
    return sorted(
        candidates,
        key=lambda c: (c.quote is None, -(c.score if c.score is not None else -math.inf)),
    )


class Pipeline:
    """Answers questions with a verified quote, or declines."""

    def __init__(
        self,
        retriever: Retriever,
        generator: CitedGenerator,
        cfg: Config,
        scorer: Scorer | None = None,
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.cfg = cfg
        self.scorer = scorer

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Open the index and load the generator named by ``settings`` (never downloads)."""
        from citeqa.retrieval import HybridRetriever

        cfg = settings.config()
        retriever = HybridRetriever.open(settings.index, cfg.retrieval)
        gen = cfg.generation
        if gen.model == "fake":
            from citeqa.generation.extractive import extractive_responder
            from citeqa.generation.fake import FakeBackend

            backend = FakeBackend(extractive_responder, model_id="extractive")
        else:
            from citeqa.generation.hf import HFBackend

            backend = HFBackend.load(
                gen.model,
                settings.cache_dir,
                speculative_tokens=gen.speculative_quote_tokens,
                threads=gen.threads,
            )
        return cls(retriever, CitedGenerator(backend, gen), cfg)

    def ask(
        self,
        question: str,
        *,
        top_k: int | None = None,
        n_candidates: int | None = None,
        min_score: float | None = None,
    ) -> Answer:
        """Answer ``question`` or decline.

        ``top_k``: passages shown to the generator (default ``cfg.generation.top_k_passages``);
        ``n_candidates``: samples (default ``cfg.generation.n_candidates``); ``min_score``:
        decline below this score (default ``cfg.reward.threshold``, else the scorer's own
        ``threshold`` attribute if it has one, else no score threshold).
        """
        question = _validate(question, top_k, n_candidates)
        t0 = time.perf_counter()
        k = top_k or self.cfg.generation.top_k_passages
        hits = self.retriever.search(question, k=k)
        t1 = time.perf_counter()
        generation = self.generator.generate(
            question, hits, self.retriever.document, n=n_candidates, top_k=k
        )
        t2 = time.perf_counter()
        if self.scorer is not None:
            scored = self.scorer.score(question, generation.candidates)
        else:
            scored = [replace(c, score=confidence(c)) for c in generation.candidates]
        candidates = rank(scored)
        t3 = time.perf_counter()

        timings = {
            **generation.timings_ms,  # backend_ms, prefill_ms, decode_ms, verify_ms, ...
            "retrieve_ms": (t1 - t0) * 1000,
            "generate_ms": (t2 - t1) * 1000,
            "score_ms": (t3 - t2) * 1000,
            "total_ms": (t3 - t0) * 1000,
        }
        best = candidates[0] if candidates else None
        threshold = self._threshold(min_score)
        reason = None
        if not hits:
            reason = "no passages were retrieved; add documents to the index or rephrase"
        elif best is None or best.quote is None:
            reason = (
                "no candidate had a quote that could be verified in the sources; "
                "rephrase the question or ask for more candidates"
            )
        elif threshold is not None and (best.score is None or best.score < threshold):
            reason = f"best score {best.score or 0.0:.3f} is below the threshold {threshold:.3f}"
            if self.scorer is None:
                reason += f" ({STAND_IN_NOTE})"
        if reason is not None:
            return Answer(
                question=question,
                declined=True,
                answer=None,
                quote=None,
                score=best.score if best else None,
                uncertainty=best.uncertainty if best else None,
                reason=reason,
                candidates=candidates,
                timings_ms=timings,
            )
        assert best is not None and best.quote is not None, best
        return Answer(
            question=question,
            declined=False,
            answer=best.answer,
            quote=best.quote,
            score=best.score,
            uncertainty=best.uncertainty,
            candidates=candidates,
            timings_ms=timings,
        )

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Retrieved passages for ``query``, best first (no generation)."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("the query is empty; search for some words")
        return self.retriever.search(query, k=k)

    def document(self, doc_id: str) -> Document:
        """The full source document (``KeyError`` when unknown), so clients can check quotes."""
        return self.retriever.document(doc_id)

    def _threshold(self, min_score: float | None) -> float | None:
        if min_score is not None:
            return min_score
        if self.cfg.reward.threshold is not None:
            return self.cfg.reward.threshold
        return getattr(self.scorer, "threshold", None)


def _validate(question: str, top_k: int | None, n_candidates: int | None) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequestError("the question is empty; ask a question in words")
    question = " ".join(question.split())
    if len(question) > MAX_QUESTION_CHARS:
        raise InvalidRequestError(
            f"the question is {len(question)} characters; keep it under {MAX_QUESTION_CHARS}"
        )
    if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if n_candidates is not None and not 1 <= n_candidates <= MAX_CANDIDATES:
        raise InvalidRequestError(
            f"n_candidates must be between 1 and {MAX_CANDIDATES}, got {n_candidates}"
        )
    return question
