"""The question pipeline: retrieve -> generate cited candidates -> score -> answer or decline.

There is one way through: ``ask_many`` takes a batch of ``AskArgs`` (the API's batcher, the
eval runner, the reward-data builder) and ``ask`` is ``ask_many`` of one question. ``check``
validates a request and turns a ``target_accuracy`` into a score threshold; the API calls it
before queueing, so bad input fails at once. Candidates with a verified quote rank first, by
score. The pipeline declines (``declined=True``, no answer, no quote) when no candidate has a
verified quote or the best score is below the threshold.

Scores come from a ``Scorer`` (the reward model). Without one, a candidate's score is the
generator's own confidence, ``exp(mean token log-probability)``: a stand-in, not calibrated.

Documents can be added and deleted while serving (``add_documents``, ``delete_document``): the
index is rewritten atomically (citeqa/retrieval/updates.py) and the retriever is swapped in one
assignment. Every request reads ``self.retriever`` once, so it sees the old or the new index,
never a mix. An index another writer changed on disk is served once ``reload_index`` sees it
(the service looks every ``CITEQA_INDEX_RELOAD_S``), and a document change that meets one is
applied to it rather than undoing it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, cast

from citeqa.atomic import disk_full, files_stamp
from citeqa.config import (
    MAX_CANDIDATES,
    MAX_PASSAGES,
    MAX_QUESTION_CHARS,
    MAX_SEARCH_K,
    Config,
    Settings,
)
from citeqa.errors import (
    CiteqaError,
    ConfigError,
    IndexChangedError,
    IndexError_,
    IndexWriteError,
    InvalidRequestError,
    ModelError,
    NotSupportedError,
)
from citeqa.generation.cited import CitedGenerator, Generation, GenerationItem
from citeqa.generation.factory import build_backend
from citeqa.generation.format import ANSWER_MODES, AnswerMode
from citeqa.retrieval.base import Retriever
from citeqa.retrieval.retriever import HybridRetriever
from citeqa.retrieval.store import (
    MANIFEST,
    Index,
    check_documents,
    recover_index,
    settled_version,
    version_on_disk,
)
from citeqa.retrieval.updates import IndexUpdate, apply_update
from citeqa.text import is_blank, unsendable
from citeqa.types import Answer, AskArgs, Candidate, Document, Hit

logger = logging.getLogger(__name__)

# looks of ``reload_index`` in a row that find no index before it warns (a swap empties the
# index directory for an instant only; the service looks every CITEQA_INDEX_RELOAD_S)
ABSENT_LOOKS = 3
WARM_UP_QUESTION = "What is this collection about?"  # asked by ``warm_up``, answer discarded

STAND_IN_NOTE = (
    "scores are the generator's own confidence exp(mean token logprob), "
    "a stand-in until a reward model is configured"
)


class Scorer(Protocol):
    """The reward model as the pipeline uses it."""

    def score(self, question: str, candidates: Sequence[Candidate],
              documents: Callable[[str], Document]) -> list[Candidate]:
        """The candidates in the same order with ``score`` (and ``uncertainty``) filled in;
        ``documents`` gives the text around each quote."""
        ...

    @property
    def threshold(self) -> float | None:
        """The calibrated decline threshold; None when uncalibrated, inf when the calibration
        certified no accuracy target."""
        ...

    def threshold_for(self, target_accuracy: float) -> float:
        """The decline threshold that guarantees ``target_accuracy`` (ModelError when the
        model was never calibrated, ValueError for a target outside (0, 1))."""
        ...


def check_count(name: str, value: object, most: int) -> int:
    """``value`` as an int, InvalidRequestError unless it is a whole number (numpy's too) from 1
    to ``most`` (a float or "2" passed from Python failed deep inside, True counted as 1)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a whole number (an int), got {value!r}")
    if not 1 <= int(value) <= most:
        raise InvalidRequestError(f"{name} must be between 1 and {most}, got {value}")
    return int(value)


def asked_text(text: object, what: str = "question") -> str:
    """A question (or search query) with its whitespace collapsed; InvalidRequestError when it
    is empty or, as given, longer than MAX_QUESTION_CHARS (as REST's schema counts). Pure, so
    that callers can refuse bad input before loading any model."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"the {what} must be text (a str), got a "
                                  f"{type(text).__name__}")
    if is_blank(text):  # whitespace, or nothing visible
        raise InvalidRequestError(f"the {what} is empty; " + (
            "ask a question in words" if what == "question" else "search for some words"))
    if len(text) > MAX_QUESTION_CHARS:
        raise InvalidRequestError(
            f"the {what} is {len(text)} characters; {MAX_QUESTION_CHARS} at most")
    if (why := unsendable(text)) is not None:  # as REST's schema refuses it (a 422)
        raise InvalidRequestError(f"the {what} {why}")
    return " ".join(text.split())


def confidence(candidate: Candidate) -> float:
    """The generator's own confidence in a candidate: exp(mean token log-probability)."""
    return math.exp(min(candidate.mean_logprob, 0.0))


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Verified quotes first, then by score (best first); stable for ties."""
    return sorted(
        candidates,
        key=lambda c: (c.quote is None, -(c.score if c.score is not None else -math.inf)),
    )


def distinct(candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` with repeats of one verified (answer, quote) merged into the one the
    generator was surest of, in the place of the first: a sample equal to the greedy answer
    was scored (the reward model's time) and listed twice. Candidates without a verified quote
    are kept as they are."""
    out: list[Candidate] = []
    seen: dict[tuple[str, str, int, int], int] = {}
    for c in candidates:
        if c.quote is None:
            out.append(c)
            continue
        key = (c.answer, c.quote.doc_id, c.quote.start, c.quote.end)
        if key not in seen:
            seen[key] = len(out)
            out.append(c)
        elif c.mean_logprob > out[seen[key]].mean_logprob:
            out[seen[key]] = c
    return out


def _digits_apart(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` to 3 decimals, or as many more (up to 9) as tell them apart: a score
    just below its threshold read "0.313 is below the threshold 0.313"."""
    for digits in range(3, 10):
        x, y = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if x != y:
            break
    return x, y


def _no_nan_scores(candidates: Sequence[Candidate]) -> list[Candidate]:
    """``candidates`` with a NaN score (a model that failed on them) left unscored (None),
    logged: NaN passes no comparison, so it stood above every threshold and broke the ranking;
    unscored, a candidate ranks after every scored one and is never given (``_finish``)."""
    out = []
    for c in candidates:
        if c.score is not None and math.isnan(c.score):
            logger.warning("the scorer gave a NaN score to answer %r; left unscored", c.answer)
            c = replace(c, score=None)
        if c.uncertainty is not None and math.isnan(c.uncertainty):  # JSON has no NaN
            c = replace(c, uncertainty=None)
        out.append(c)
    return out


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
        self._update_lock = threading.Lock()  # one document update (or reload) at a time
        # (files_stamp, why) of an index on disk that failed to load: said once, not at
        # every look
        self._refused: tuple[tuple[Any, ...], str] | None = None
        self._absent = 0  # looks in a row that found no index in the index directory
        self._highest_certified: tuple[float | None] | None = None  # None: not computed yet

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Open the index and load the models named by ``settings`` (never downloads)."""
        cfg = settings.config()
        started = time.perf_counter()
        logger.info("loading the index %s and the models (preset %s) ...", settings.index,
                    settings.preset)
        retriever = HybridRetriever.open(settings.index, cfg.retrieval)
        backend = build_backend(cfg.generation, settings.cache_dir,
                                api_key=settings.generator_api_key or None,
                                timeout_s=settings.request_timeout_s)
        try:
            if cfg.generation.url:  # a remote engine: not ready until it answers
                from citeqa.generation.remote import RemoteBackend

                assert isinstance(backend, RemoteBackend)
                backend.wait_ready(settings.generator_wait_s)
            from citeqa.reward.scorer import load_scorer

            scorer = load_scorer(cfg.reward.model, cpu_dtype=cfg.generation.cpu_dtype,
                                 compile=cfg.reward.compile)
        except BaseException:
            _close_backend(backend)
            raise
        logger.info("loaded in %.1f s", time.perf_counter() - started)
        pipeline = cls(
            retriever,
            CitedGenerator(backend, cfg.generation),
            cfg,
            scorer,
            index_dir=Path(settings.index),
        )
        if warning := pipeline.calibration_warning():
            logger.warning("%s", warning)
        threshold = scorer.threshold if scorer is not None else None
        uncertified = threshold is None or math.isinf(threshold)
        if (scorer is not None and cfg.reward.threshold is None and uncertified
                and not cfg.reward.decline_uncertified):
            logger.warning(
                "%s; answering without a score threshold (pass min_score or target_accuracy "
                "per request to decline, or set CITEQA_DECLINE_UNCERTIFIED=1)",
                "the reward model has no calibration" if threshold is None else
                "the reward model's calibration certified no accuracy target")
        return pipeline

    def calibration_warning(self, *, n_candidates: int | None = None,
                            answer_mode: str | None = None) -> str | None:
        """The line saying the reward model's decline threshold was calibrated on other answers
        than this pipeline gives (asked with these options), which a service logs when it
        starts and an evaluation's report shows; None when none differs or nothing recorded."""
        record = getattr(self.scorer, "calibration", None)  # its calibration.json, parsed
        body = getattr(record, "body", None)
        if not isinstance(body, dict):
            return None
        from citeqa.generation.prompt import generator_fingerprint
        from citeqa.reward.provenance import mismatch_warning

        gen = self.cfg.generation
        asked = replace(gen, answer_mode=cast(AnswerMode, answer_mode or gen.answer_mode))
        return mismatch_warning(body, generator_fingerprint(self.generator.backend.model_id,
                                                            asked),
                                n_candidates or gen.n_candidates)

    # -- questions ---------------------------------------------------------------------------

    def check(self, args: AskArgs) -> AskArgs:
        """``args`` validated, its question's whitespace collapsed and a ``target_accuracy``
        turned into ``min_score`` (the target kept: checked args check again);
        InvalidRequestError (422 ``needs_calibration`` for a target without a calibrated reward
        model, 422 ``uncertified_options`` for a target with options of the request's own that
        give answers the calibration did not certify: ``options_off_calibration``) when it
        cannot be asked."""
        question = asked_text(args.question)
        counts = {name: None if value is None else check_count(name, value, most)
                  for name, value, most in (("top_k", args.top_k, MAX_PASSAGES),
                                            ("n_candidates", args.n_candidates, MAX_CANDIDATES),
                                            ("search_k", args.search_k, MAX_SEARCH_K))}
        if args.answer_mode is not None and args.answer_mode not in ANSWER_MODES:
            raise InvalidRequestError(
                f"answer_mode must be one of {list(ANSWER_MODES)}, got {args.answer_mode!r}")
        for name, number in (("min_score", args.min_score),
                             ("target_accuracy", args.target_accuracy)):
            if number is not None and (not isinstance(number, numbers.Real)
                                       or isinstance(number, bool)):
                raise InvalidRequestError(f"{name} must be a number, got {number!r}")
        min_score = None if args.min_score is None else float(args.min_score)
        # between 0 and 1, or inf: what threshold_for gives a target no threshold certifies;
        # NaN is neither
        if min_score is not None and not (0.0 <= min_score <= 1.0 or min_score == math.inf):
            raise InvalidRequestError(f"min_score must be between 0 and 1, got {min_score}")
        if args.target_accuracy is not None:
            threshold = self.threshold_for(args.target_accuracy)
            # (checked args come back here through ask_many with both: the target kept, for
            # the reason a decline gives, and the threshold made of it)
            if min_score is not None and min_score != threshold:
                raise InvalidRequestError("give min_score or target_accuracy, not both")
            min_score = threshold
            if differ := self.options_off_calibration(args):
                raise InvalidRequestError(
                    "target_accuracy is certified only for answers like those the reward model "
                    "was calibrated on, and this request's own options give others: "
                    f"{'; '.join(differ)}. Leave those options at the service's settings, or "
                    "pass min_score (--min-score) instead", status=422,
                    code="uncertified_options")
        return replace(args, question=question, min_score=min_score,
                       top_k=counts["top_k"], n_candidates=counts["n_candidates"],
                       search_k=counts["search_k"])

    def options_off_calibration(self, args: AskArgs) -> list[str]:
        """What a request's own options (``top_k``, ``n_candidates``, ``answer_mode``) change
        from the answers the reward model's calibration was made on, beyond what the service's
        settings change already (which it warned about at start), one phrase each
        (reward/provenance.py); empty without a recorded calibration."""
        record = getattr(self.scorer, "calibration", None)
        body = getattr(record, "body", None)
        if not isinstance(body, dict):
            return []
        from citeqa.generation.prompt import generator_fingerprint
        from citeqa.reward.provenance import calibration_mismatch

        gen = self.cfg.generation
        asked = replace(gen, top_k_passages=args.top_k or gen.top_k_passages,
                        answer_mode=cast(AnswerMode, args.answer_mode or gen.answer_mode))
        model_id = self.generator.backend.model_id
        served = calibration_mismatch(body, generator_fingerprint(model_id, gen),
                                      gen.n_candidates)
        own = calibration_mismatch(body, generator_fingerprint(model_id, asked),
                                   args.n_candidates or gen.n_candidates)
        return [d for d in own if d not in served]

    def ask(
        self,
        question: str,
        *,
        top_k: int | None = None,
        n_candidates: int | None = None,
        min_score: float | None = None,
        target_accuracy: float | None = None,
        search_k: int | None = None,
        answer_mode: str | None = None,
    ) -> Answer:
        """Answer ``question`` or decline (``ask_many`` of one; options as in ``AskArgs``)."""
        [answer] = self.ask_many(
            [AskArgs(question, top_k, n_candidates, min_score, target_accuracy, search_k,
                     answer_mode)]
        )
        return answer

    def close(self) -> None:
        """Release the generator's backend (a remote engine's connections and threads)."""
        _close_backend(self.generator.backend)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self) -> float:
        """Ask ``WARM_UP_QUESTION``, discard the answer and return the seconds it took.

        A process's first question pays for what loads lazily (the query embedder), its first
        grammar and, in bf16, the CPU kernels built for each new matrix shape: on the AMX Xeon
        about 1.1 s against ~0.45 s for the next ones. The service asks it before it reports
        ready, so that its first user does not wait for them.
        """
        self.highest_certified_accuracy()  # ~1 s once: not on the first uncertified request
        t0 = time.perf_counter()
        self.ask(WARM_UP_QUESTION)
        return time.perf_counter() - t0

    def ask_many(self, items: Sequence[AskArgs]) -> list[Answer]:
        """Answers for several questions, in order; raises if any request is invalid.

        The batch goes to the backend in one call per distinct ``top_k`` (usually one), so the
        local backend decodes the questions together.
        """
        if not isinstance(items, Sequence) or not all(isinstance(a, AskArgs) for a in items):
            raise InvalidRequestError("ask_many takes a list of citeqa.AskArgs")
        checked = [self.check(a) for a in items]
        retriever = self.retriever  # one snapshot for the whole batch
        t0 = time.perf_counter()
        searched: list[tuple[int, list[Hit], float]] = []  # (top_k, hits, retrieve ms)
        for a in checked:
            k = a.top_k or self.cfg.generation.top_k_passages
            t = time.perf_counter()
            gone = a.abandoned is not None and a.abandoned()  # its client left: not searched
            hits = [] if gone else retriever.search(a.question, k=max(k, a.search_k or 0))
            searched.append((k, hits, (time.perf_counter() - t) * 1000))
        groups: dict[int, list[int]] = {}  # top_k -> item positions
        for i, (k, _, _) in enumerate(searched):
            groups.setdefault(k, []).append(i)
        generations: dict[int, tuple[Generation, float]] = {}
        for k, members in groups.items():
            t = time.perf_counter()
            outs = self.generator.generate_many(
                [GenerationItem(checked[i].question, searched[i][1][:k], retriever.document,
                                checked[i].n_candidates, checked[i].answer_mode,
                                checked[i].abandoned)
                 for i in members],
                top_k=k,
            )
            ms = (time.perf_counter() - t) * 1000  # the whole group's wall time
            assert len(outs) == len(members), f"generate_many gave {len(outs)} of {len(members)}"
            generations.update((i, (g, ms)) for i, g in zip(members, outs, strict=True))
        return [
            replace(self._finish(a, hits, generations[i][0], retriever.document,
                                 {"retrieve_ms": retrieve_ms, "generate_ms": generations[i][1]},
                                 t0), index_version=_index_version(retriever))
            for i, (a, (_, hits, retrieve_ms)) in enumerate(zip(checked, searched, strict=True))
        ]

    def _finish(
        self,
        args: AskArgs,
        hits: Sequence[Hit],
        generation: Generation,
        documents: Callable[[str], Document],
        timings: dict[str, float],
        t0: float,
    ) -> Answer:
        """Score, rank and decide: the answer, or a decline with its reason."""
        question = args.question
        t2 = time.perf_counter()
        if self.scorer is not None and not (args.abandoned and args.abandoned()):
            scored = self.scorer.score(question, distinct(generation.candidates), documents)
        else:
            scored = [replace(c, score=confidence(c)) for c in distinct(generation.candidates)]
        candidates = rank(_no_nan_scores(scored))
        t3 = time.perf_counter()

        timings = {
            **generation.timings_ms,  # backend_ms, prefill_ms, decode_ms, verify_ms, ...
            **timings,  # retrieve_ms, generate_ms
            "score_ms": (t3 - t2) * 1000,
            "total_ms": (t3 - t0) * 1000,
        }
        best = candidates[0] if candidates else None
        threshold = self.decline_threshold(args.min_score)
        reason = None
        if not hits:
            reason = "no passages were retrieved; add documents to the index or rephrase"
        elif (best is None or best.quote is None) and generation.timings_ms.get("cut"):
            cut = int(generation.timings_ms["cut"])
            reason = (
                f"the generator ran out of its token budget before ending a quote ({cut} "
                f"output{'s' if cut != 1 else ''} cut short), so no quote could be verified: a "
                "model that does not keep to the answer and quote format, or an engine that "
                "does not enforce its grammar, runs on so; rephrasing will not help"
            )
        elif best is None or best.quote is None:
            reason = (
                "no candidate had a quote that could be verified in the sources; rephrase the "
                "question (n_candidates, -n on the command line, can also ask for more "
                "candidates)"
            )
        elif best.score is None:  # a scorer failed (NaN) on every candidate with a quote
            who = ("the reward model failed to score" if self.scorer is not None else
                   "the generator's confidence is not a number for")
            reason = (f"{who} every candidate with a verified quote (see the server log); "
                      "nothing is answered unscored")
        elif threshold is not None and math.isinf(threshold):
            reason = self._uncertified_reason(best.score or 0.0, asked=args.min_score is not None,
                                              target=args.target_accuracy is not None)
        elif threshold is not None and not (best.score is not None and best.score >= threshold):
            shown, limit = _digits_apart(best.score or 0.0, threshold)
            reason = f"best score {shown} is below the threshold {limit}"
            if self.scorer is None:
                reason += f" ({STAND_IN_NOTE})"
        given = best if reason is None else None
        assert given is None or given.quote is not None, given
        return Answer(
            question=question,
            declined=given is None,
            answer=given.answer if given else None,
            quote=given.quote if given else None,
            # a candidate without a verified quote is no answer to score (without a reward
            # model its "score" was the generator's confidence, above the threshold it failed)
            score=best.score if best and best.quote else None,
            uncertainty=best.uncertainty if best and best.quote else None,
            reason=reason,
            candidates=candidates,
            passages=list(hits),
            timings_ms=timings,
            answer_start=given.answer_start if given else None,
            answer_end=given.answer_end if given else None,
        )

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """Retrieved passages for ``query``, best first (no generation)."""
        query = asked_text(query, "query")
        return self.retriever.search(query, k=check_count("k", k, MAX_SEARCH_K))

    @property
    def index_version(self) -> str | None:
        """The version of the index questions are answered from now (``Index.version``)."""
        return _index_version(self.retriever)

    def document(self, doc_id: str) -> Document:
        """The full source document (``KeyError`` when unknown), so clients can check quotes."""
        return self.retriever.document(doc_id)

    # -- documents ---------------------------------------------------------------------------

    def list_documents(self, offset: int = 0, limit: int = 20) -> tuple[list[Document], int]:
        """Up to ``limit`` indexed documents from position ``offset`` (in index order), and
        how many there are in all, so that people can see what answers can come from."""
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                   for n in (offset, limit)) or offset < 0 or limit < 1:
            raise InvalidRequestError(f"offset must be a whole number from 0 and limit one from "
                                      f"1, got {offset!r} and {limit!r}")
        offset, limit = int(offset), int(limit)
        retriever = self.retriever  # one snapshot, as for questions
        if not isinstance(retriever, HybridRetriever):
            raise NotSupportedError(f"a {type(retriever).__name__} cannot list its documents; "
                                    "serve an index directory (citeqa serve --index DIR)")
        return retriever.list_documents(offset, limit)

    def add_documents(self, documents: Sequence[Document]) -> dict[str, int]:
        """Index ``documents`` now (searchable on return, persisted atomically); returns the
        passage count of each. InvalidRequestError 409 when a doc_id is already indexed, 422
        for a document no index can hold as given (``store.check_documents``)."""
        documents = tuple(documents)  # (read twice)
        check_documents(documents)
        return self._update(IndexUpdate(add=documents))

    def delete_document(self, doc_id: str) -> None:
        """Remove ``doc_id`` from the index now (InvalidRequestError 404 when unknown)."""
        self._update(IndexUpdate(remove=(doc_id,)))

    def _update(self, update: IndexUpdate) -> dict[str, int]:
        """Apply ``update`` to disk, then swap the retriever (one update at a time). When
        another writer changed the index since it was loaded, the index is loaded as it is now
        and the update applied to that (once): nobody's change is undone, and none refused
        (nor one the index loaded would refuse: an id unknown or taken there)."""
        with self._update_lock:
            old = self.retriever
            if not isinstance(old, HybridRetriever):
                raise NotSupportedError(
                    f"documents cannot be changed in a {type(old).__name__}; serve an index "
                    "directory (citeqa serve --index DIR) to manage documents"
                )
            out = self.index_dir or old.index.directory
            if out is None:
                raise ConfigError("the index has no directory to write updates to")
            for attempt in range(2):
                embedder = old.embedder if update.add and old.index.dense is not None else None
                try:
                    result = apply_update(old.index, update, out, embedder=embedder)
                    break
                except OSError as e:  # the index's file system: full, read-only, ...
                    as_was = version_on_disk(out) == old.index.version  # (a flush after the
                    # swap can fail too: the change is then on disk, and reloaded from there)
                    raise IndexWriteError(
                        f"could not write the index: {e.strerror or e}; " + (
                            "it is as it was" if as_was else "the change may be on disk: the "
                            "service serves the index on disk once it reloads it"),
                        full=disk_full(e)) from e
                except IndexChangedError:
                    if attempt or self._reload_or_say_why(out) is None:  # nothing to load
                        raise
                    assert isinstance(self.retriever, HybridRetriever), self.retriever
                    old = self.retriever
                except InvalidRequestError as e:
                    # an unknown or a taken id, by the index loaded: another writer (a replica)
                    # may have added or deleted it since (a delete of what it added was a 404,
                    # nothing deleted): judged again on the index as it is now
                    if (attempt or e.status not in (404, 409)
                            or settled_version(out) in (None, old.index.version)
                            or self._reload_or_say_why(out) is None):
                        raise
                    assert isinstance(self.retriever, HybridRetriever), self.retriever
                    old = self.retriever
            self.retriever = old.with_index(result.index)
        logger.info("documents updated: +%s -%s", [d.doc_id for d in update.add],
                    list(update.remove))
        return result.added_passages

    def reload_index(self) -> str | None:
        """Serve the index the index directory holds now when another writer changed it (a
        rebuild, ``citeqa index add/remove``, another server): its version, or None when it
        holds the one served (or none readable yet: a writer mid-swap). IndexError_ when it
        cannot be loaded (damaged, another embedder) and then, until it changes again, None:
        the index served stays as it is."""
        with self._update_lock:
            version = self._reload_locked()
            self._say_if_absent()
            return version

    def _say_if_absent(self) -> None:
        """Warn once when the index directory has held no index for ``ABSENT_LOOKS`` looks in a
        row (deleted or moved: a writer's swap leaves it empty for an instant only), and say
        when it holds one again. The index loaded is served meanwhile."""
        old = self.retriever
        out = self.index_dir or (old.index.directory if isinstance(old, HybridRetriever)
                                 else None)
        if out is None:
            return
        if version_on_disk(out) is not None:
            if self._absent >= ABSENT_LOOKS:
                logger.info("the index directory %s holds an index again", out)
            self._absent = 0
            return
        self._absent += 1
        if self._absent != ABSENT_LOOKS:
            return
        with contextlib.suppress(CiteqaError, OSError):  # a writer killed mid-swap: its
            recover_index(out)  # backup back in place, as a restart would have it
        if version_on_disk(out) is not None:
            self._absent = 0
        elif os.path.exists(Path(out) / MANIFEST):  # (never raises: a folder it may not search)
            logger.warning("the index directory %s holds a manifest that cannot be read as "
                           "an index's (its permissions, a copy not finished, another "
                           "program's file?); the one loaded is still served", out)
        else:
            logger.warning(
                "the index directory %s holds no index (deleted or moved?): the one loaded is "
                "still served, but a restart would find none, and document changes are "
                "refused until one is there again (build or copy one there)", out)

    def _reload_or_say_why(self, out: Path) -> str | None:
        """``_reload_locked`` for an update that met another writer's index: one that cannot
        be loaded is that update's failure (409), not the served index's."""
        try:
            return self._reload_locked(again=True)
        except IndexError_ as exc:
            raise IndexChangedError(
                f"another writer changed the index at {out}, and it cannot be served as it is "
                f"now ({exc}); nothing was changed: the index served is still the one loaded"
            ) from exc

    def _reload_locked(self, *, again: bool = False) -> str | None:
        """``reload_index``'s work; ``again``: an index on disk refused before is an error
        again (its reason), not None."""
        old = self.retriever
        if not isinstance(old, HybridRetriever):
            return None
        out = self.index_dir or old.index.directory
        # (an update that met another writer's index may meet its swap: looked at again)
        version = (None if out is None else settled_version(out) if again
                   else version_on_disk(out))
        if out is None or version in (None, old.index.version):
            return None
        stamp = files_stamp(out)  # a refused index copied in again, or repaired, is retried
        if self._refused is not None and self._refused[0] == stamp:
            if again:
                raise IndexError_(self._refused[1])
            return None
        try:
            new = old.with_index(Index.load(out))  # the settings' embedder, as at start
            if new.index.dense is not None and new.cfg.dense:
                new.embedder  # noqa: B018 (loaded and checked here, not in a request)
        except (IndexError_, ModelError) as exc:
            self._refused = (stamp, str(exc))
            raise IndexError_(str(exc)) from exc
        self.retriever = new
        logger.info("serving the index %s as another writer left it: version %s -> %s", out,
                    old.index.version, self.retriever.index_version)
        return self.retriever.index_version

    # -- declining ---------------------------------------------------------------------------

    def threshold_for(self, target_accuracy: float) -> float:
        """The calibrated decline threshold that guarantees ``target_accuracy`` (reward model);
        InvalidRequestError 422 ``needs_calibration`` when there is no calibrated one."""
        if self.scorer is None:
            raise InvalidRequestError(
                "target_accuracy needs a calibrated reward model, and none is loaded; "
                "pass min_score (--min-score) instead",
                status=422,
                code="needs_calibration",
            )
        try:
            return float(self.scorer.threshold_for(target_accuracy))
        except ModelError as exc:  # a reward model that was never calibrated
            raise InvalidRequestError(str(exc), status=422, code="needs_calibration") from exc
        except ValueError as exc:  # a target outside (0, 1)
            raise InvalidRequestError(str(exc)) from exc

    def _uncertified_reason(self, best: float, *, asked: bool, target: bool) -> str:
        """Why every question is declined at an infinite threshold: ``asked`` with a
        ``target``, a target accuracy that no threshold certifies; asked without, a min_score
        of inf; else the stored calibration certified none and the settings decline without
        one."""
        if not asked:
            calibrated = self.scorer is not None and self.scorer.threshold is not None
            what = ("the reward model's calibration certified no accuracy target" if calibrated
                    else "the reward model has no calibration (docs/calibrate.md)")
            return (f"{what}, and this service declines without one "
                    f"(CITEQA_DECLINE_UNCERTIFIED; best score {best:.3f})")
        if not target:
            return (f"the threshold asked for (min_score) is infinite, so every question is "
                    f"declined (best score {best:.3f})")
        highest = self.highest_certified_accuracy()
        return (f"no decline threshold is certified for the target accuracy asked for, so every "
                f"question is declined (best score {best:.3f}); " + (
                    f"the reward model's calibration certifies targets up to {highest:.2f}"
                    if highest is not None else
                    "the reward model's calibration certifies no target"))

    def highest_certified_accuracy(self) -> float | None:
        """The highest ``target_accuracy`` on a 0.01 grid whose threshold is finite (None: the
        reward model certifies none, or there is no calibrated one). Found once, by bisection:
        from 0.50 up a threshold never falls as the target rises (``_grid_thresholds``), so the
        answer is exact there; below 0.50 thresholds need not be monotone, and the bisection
        may then miss a certified target."""
        if self._highest_certified is None:
            def certified(i: int) -> bool:
                try:
                    return math.isfinite(self.threshold_for(i / 100))
                except InvalidRequestError:
                    return False

            lo, hi = 0, 100  # certified(lo) holds (or lo == 0), certified(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if certified(mid) else (lo, mid)
            self._highest_certified = (lo / 100 if lo else None,)
        return self._highest_certified[0]

    def decline_threshold(self, min_score: float | None = None) -> float | None:
        """The score below which a question is declined: ``min_score`` when given, else the
        configured or calibrated threshold (None: no threshold)."""
        if min_score is not None:
            return min_score
        if self.cfg.reward.threshold is not None:
            return self.cfg.reward.threshold
        if self.scorer is None:
            return None
        calibrated = self.scorer.threshold
        if calibrated is None or math.isinf(calibrated):
            # Never calibrated, or the stored calibration certified no accuracy target (inf).
            return math.inf if self.cfg.reward.decline_uncertified else None
        return calibrated


def _index_version(retriever: Retriever) -> str | None:
    """``retriever.index_version``, None for a retriever written before it existed."""
    return getattr(retriever, "index_version", None)


def _close_backend(backend: object) -> None:
    close = getattr(backend, "close", None)  # local backends hold nothing to release
    if callable(close):
        close()
