"""The question pipeline: retrieve -> generate cited candidates -> score -> answer or decline.

``Pipeline.ask`` is what the CLI calls; the API calls ``Pipeline.ask_many`` with a batch of
``AskArgs`` (one backend call for the whole batch when the generator has ``generate_many``).
Candidates with a verified quote rank first, by score. The pipeline declines
(``declined=True``, no answer, no quote) when no candidate has a verified quote or the best
score is below the threshold.

Scores come from a ``Scorer`` (the reward model). Without one, a candidate's score is the
generator's own confidence, ``exp(mean token log-probability)``: a stand-in, not calibrated.

Documents can be added and deleted while serving (``add_documents``, ``delete_document``): the
index is rewritten atomically (citeqa/retrieval/updates.py) and the retriever is swapped in one
assignment. Every request reads ``self.retriever`` once, so it sees the old or the new index,
never a mix.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from citeqa.config import Config, Settings
from citeqa.errors import ConfigError, InvalidRequestError, ModelError
from citeqa.generation.backend import Backend
from citeqa.generation.cited import CitedGenerator, Generation
from citeqa.retrieval.base import Retriever
from citeqa.retrieval.retriever import HybridRetriever
from citeqa.retrieval.updates import IndexUpdate, apply_update
from citeqa.types import Answer, Candidate, Document, Hit

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 1000  # longer questions are refused (prompt budget of a small model)
MAX_TOP_K = 20  # most passages a request may ask to show
MAX_CANDIDATES = 32  # most samples a request may ask for

STAND_IN_NOTE = (
    "scores are the generator's own confidence exp(mean token logprob), "
    "a stand-in until a reward model is configured"
)


@dataclass(frozen=True)
class AskArgs:
    """One question with its per-request options, as queued for generation (and ask_many)."""

    question: str
    top_k: int | None = None  # None = the preset's default
    n_candidates: int | None = None
    min_score: float | None = None  # None = the pipeline's (calibrated) threshold


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
        *,
        index_dir: Path | None = None,
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.cfg = cfg
        self.scorer = scorer
        self.index_dir = index_dir  # where document updates are written; None = the index's own
        self._update_lock = threading.Lock()  # one document update at a time

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Open the index and load the generator named by ``settings`` (never downloads)."""
        cfg = settings.config()
        retriever = HybridRetriever.open(settings.index, cfg.retrieval)
        gen = cfg.generation
        backend: Backend
        if gen.model == "fake":
            from citeqa.generation.extractive import extractive_responder
            from citeqa.generation.fake import FakeBackend

            backend = FakeBackend(extractive_responder, model_id="extractive")
        else:
            from citeqa.generation.adapter import resolve_adapter
            from citeqa.generation.hf import HFBackend

            backend = HFBackend.load(
                gen.model,
                settings.cache_dir,
                adapter=resolve_adapter(gen.adapter, gen.model),
                cpu_weights=gen.cpu_weights,
                speculative_tokens=gen.speculative_quote_tokens,
                threads=gen.threads,
            )
        from citeqa.reward.scorer import load_scorer

        scorer = load_scorer(cfg.reward.model, settings.cache_dir)
        threshold = getattr(scorer, "threshold", None)
        if threshold is not None and math.isinf(threshold) and not cfg.reward.decline_uncertified:
            logger.warning(
                "the reward model's calibration certified no accuracy target; answering without "
                "a score threshold (pass min_score or target_accuracy per request to decline)"
            )
        return cls(
            retriever,
            CitedGenerator(backend, gen),
            cfg,
            scorer,
            index_dir=Path(settings.index),
        )

    # -- questions ---------------------------------------------------------------------------

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
        args = AskArgs(question, top_k, n_candidates, min_score)
        question = _validate(question, top_k, n_candidates)
        retriever = self.retriever  # one snapshot for the whole request
        t0 = time.perf_counter()
        k = top_k or self.cfg.generation.top_k_passages
        hits = retriever.search(question, k=k)
        t1 = time.perf_counter()
        generation = self.generator.generate(
            question, hits, retriever.document, n=n_candidates, top_k=k
        )
        t2 = time.perf_counter()
        return self._finish(replace(args, question=question), hits, generation,
                            {"retrieve_ms": (t1 - t0) * 1000, "generate_ms": (t2 - t1) * 1000},
                            t0)

    def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
        """Answers for several questions, in order; raises if any request is invalid.

        With ``generator.generate_many`` the batch goes to the backend in one call per distinct
        ``top_k`` (usually one); without it, each item goes through ``ask``.
        """
        generate_many = getattr(self.generator, "generate_many", None)
        if generate_many is None or len(items) <= 1:
            return [
                self.ask(a.question, top_k=a.top_k, n_candidates=a.n_candidates,
                         min_score=a.min_score)
                for a in items
            ]
        retriever = self.retriever  # one snapshot for the whole batch
        t0 = time.perf_counter()
        prepared: list[tuple[AskArgs, int, list[Hit], float]] = []
        for a in items:
            question = _validate(a.question, a.top_k, a.n_candidates)
            k = a.top_k or self.cfg.generation.top_k_passages
            t = time.perf_counter()
            hits = retriever.search(question, k=k)
            prepared.append((replace(a, question=question), k, hits,
                             (time.perf_counter() - t) * 1000))
        groups: dict[int, list[int]] = {}  # top_k -> item positions
        for i, (_, k, _, _) in enumerate(prepared):
            groups.setdefault(k, []).append(i)
        generations: dict[int, tuple[Generation, float]] = {}
        for k, members in groups.items():
            t = time.perf_counter()
            outs = generate_many(
                [(prepared[i][0].question, prepared[i][2], retriever.document,
                  prepared[i][0].n_candidates) for i in members],
                top_k=k,
            )
            ms = (time.perf_counter() - t) * 1000  # the whole group's wall time
            assert len(outs) == len(members), f"generate_many gave {len(outs)} of {len(members)}"
            generations.update((i, (g, ms)) for i, g in zip(members, outs, strict=True))
        return [
            self._finish(a, hits, generations[i][0],
                         {"retrieve_ms": retrieve_ms, "generate_ms": generations[i][1]}, t0)
            for i, (a, _, hits, retrieve_ms) in enumerate(prepared)
        ]

    def _finish(
        self,
        args: AskArgs,
        hits: Sequence[Hit],
        generation: Generation,
        timings: dict[str, float],
        t0: float,
    ) -> Answer:
        """Score, rank and decide: the answer, or a decline with its reason."""
        question = args.question
        t2 = time.perf_counter()
        if self.scorer is not None:
            scored = self.scorer.score(question, generation.candidates)
        else:
            scored = [replace(c, score=confidence(c)) for c in generation.candidates]
        candidates = rank(scored)
        t3 = time.perf_counter()

        timings = {
            **generation.timings_ms,  # backend_ms, prefill_ms, decode_ms, verify_ms, ...
            **timings,  # retrieve_ms, generate_ms
            "score_ms": (t3 - t2) * 1000,
            "total_ms": (t3 - t0) * 1000,
        }
        best = candidates[0] if candidates else None
        threshold = self._threshold(args.min_score)
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

    # -- documents ---------------------------------------------------------------------------

    def add_documents(self, documents: Sequence[Document]) -> dict[str, int]:
        """Index ``documents`` now (searchable on return, persisted atomically); returns the
        passage count of each. InvalidRequestError 409 when a doc_id is already indexed."""
        return self._update(IndexUpdate(add=tuple(documents)))

    def delete_document(self, doc_id: str) -> None:
        """Remove ``doc_id`` from the index now (InvalidRequestError 404 when unknown)."""
        self._update(IndexUpdate(remove=(doc_id,)))

    def _update(self, update: IndexUpdate) -> dict[str, int]:
        """Apply ``update`` to disk, then swap the retriever (one update at a time)."""
        with self._update_lock:
            old = self.retriever
            if not isinstance(old, HybridRetriever):
                raise ConfigError(
                    f"documents cannot be added to a {type(old).__name__}; serve an index "
                    "directory (citeqa serve --index DIR) to manage documents"
                )
            out = self.index_dir or old.index.directory
            if out is None:
                raise ConfigError("the index has no directory to write updates to")
            embedder = old.embedder if update.add and old.index.dense is not None else None
            result = apply_update(old.index, update, out, embedder=embedder)
            self.retriever = old.with_index(result.index)
        logger.info("documents updated: +%s -%s", [d.doc_id for d in update.add],
                    list(update.remove))
        return result.added_passages

    def threshold_for(self, target_accuracy: float) -> float:
        """The calibrated decline threshold that guarantees ``target_accuracy`` (reward model)."""
        threshold_for = getattr(self.scorer, "threshold_for", None)
        if threshold_for is None:
            raise InvalidRequestError(
                "target_accuracy needs a calibrated reward model, and none is loaded; "
                "pass min_score instead",
                status=422,
                code="needs_calibration",
            )
        try:
            return float(threshold_for(target_accuracy))
        except ModelError as exc:  # a reward model that was never calibrated
            raise InvalidRequestError(str(exc), status=422, code="needs_calibration") from exc

    def _threshold(self, min_score: float | None) -> float | None:
        if min_score is not None:
            return min_score
        if self.cfg.reward.threshold is not None:
            return self.cfg.reward.threshold
        calibrated = getattr(self.scorer, "threshold", None)
        if calibrated is not None and math.isinf(calibrated):
            # The stored calibration certified no accuracy target (threshold inf).
            return calibrated if self.cfg.reward.decline_uncertified else None
        return calibrated


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
