"""The cited generator: prompt -> backend (grammar-constrained) -> parse -> verify.

One call turns a question and its hits into ``n`` candidates; ``generate_many`` does several
questions with ONE backend call (cross-request batching). The candidates of one question:

- ``n == 1``: one greedy completion, free to quote any shown passage;
- ``n > 1`` (constrained): candidate ``i`` is the greedy completion constrained to quote passage
  ``i`` of those shown, so the candidates cover the evidence rather than repeat the best-ranked
  passage; beyond the number of passages shown, the rest are samples at ``cfg.temperature``
  free to quote any. The requests share one prompt, which the local backend prefills once.

Answer modes (``format.py``): ``span`` (the default) writes an answer that is a span of a shown
passage and then a quote that contains it, both enforced while decoding, so every answer stands
in its quote; ``free`` writes a free-text answer and any quote (large generators writing
sentences) and leaves support to the reward model. A quote the local backend's ``max_tokens``
cut short is still a verbatim span, ending before a word the budget cut into, so the budget
only bounds latency (a remote engine's cut choice is a failed candidate: ``remote.py``).

Every completion becomes a Candidate; one whose output does not parse keeps ``answer == ""``
and ``quote is None`` for evaluation, but is never presented as a quote.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from citeqa.config import GenerationConfig
from citeqa.errors import OutputFormatError
from citeqa.generation.backend import Backend, Completion, GenerationRequest, unquotable
from citeqa.generation.constraint import (
    QuoteStage,
    can_quote,
    on_word_edges,
    output_grammar,
    word_occurrences,
)
from citeqa.generation.format import ANSWER_MODES, AnswerMode
from citeqa.generation.parse import parse_output
from citeqa.generation.prompt import ShownPassage, build_messages
from citeqa.generation.verify import ANSWER_TRIM, locate, verify_quote
from citeqa.types import Candidate, Document, Hit

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # rough budget conversion between answer characters and tokens
QUOTE_CHARS_PER_TOKEN = 3  # quotes copy names and numbers, which split into shorter tokens
# backend timing keys counted per completion (a remote engine's: outputs cut short, quote
# calls that failed)
PER_COMPLETION = frozenset({"tokens", "cut", "quote_errors"})
# Backend timing keys that describe the whole backend call (the local backend decodes every
# request in one batch and reports the batch's figures in each completion): counted once
BATCH_WIDE = frozenset({"prefill_ms", "decode_ms", "forward_passes", "batch_rows"})
FORMAT_TOKENS = 16  # tokens of the fixed parts of the output ("Answer: ", "Quote [k]: ", ...)
# Tokens per character beyond ASCII, which the budgets above assume (SmolLM2's vocabulary,
# measured: Cyrillic and Greek ~1.2 characters a token, Arabic ~1.0, Japanese ~0.6): a
# Japanese quote of 200 characters needs ~330 tokens, not the ~67 an English one does.
_NOT_ASCII = re.compile(r"[^\x00-\x7f]")
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
TOKENS_PER_CHAR_OTHER = 1.0  # a letter of another alphabet
TOKENS_PER_CHAR_CJK = 2.0  # a CJK character (conservatively)
TOKENS_PER_DIGIT = 1.0  # SmolLM2's, Llama's and Qwen's tokenizers write a digit a token
_DIGIT = re.compile(r"[0-9]")


def budget_scale(texts: Sequence[str], window: int | None = None) -> float:
    """How many times the ASCII-based token budgets a reply copying from ``texts`` needs: 1
    for ASCII text of words, more the more of it is digits or in other scripts
    (``TOKENS_PER_*``: a quote of numbers ran out of tokens mid-quote). With ``window`` (a
    quote's most characters), as its densest stretch of that many characters needs: a
    sentence of numbers in a page of prose is quoted alone."""
    scale = 1.0
    for text in texts:
        if not text:
            continue
        cost = np.ones(len(text))  # each character's tokens, over an ASCII letter's
        for pattern, tokens in ((_NOT_ASCII, TOKENS_PER_CHAR_OTHER), (_CJK, TOKENS_PER_CHAR_CJK),
                                (_DIGIT, TOKENS_PER_DIGIT)):
            at = np.array([m.start() for m in pattern.finditer(text)], np.int64)
            cost[at] = tokens * QUOTE_CHARS_PER_TOKEN
        width = len(text) if window is None else max(1, min(window, len(text)))
        sums = np.concatenate([[0.0], np.cumsum(cost)])
        scale = max(scale, float((sums[width:] - sums[:-width]).max()) / width)
    return scale


@dataclass(frozen=True)
class GenerationItem:
    """One question for ``generate_many``."""

    question: str
    hits: Sequence[Hit]
    documents: Callable[[str], Document]  # doc_id -> Document (quotes are verified against it)
    n: int | None = None  # candidates; None = cfg.n_candidates
    mode: str | None = None  # answer mode; None = cfg.answer_mode
    abandoned: Callable[[], bool] | None = None  # see GenerationRequest.abandoned


@dataclass(frozen=True)
class Generation:
    """Candidates in generation order, and timings."""

    candidates: list[Candidate]
    timings_ms: dict[str, float]  # backend_ms, prefill_ms, decode_ms (_merge_timings), verify_ms


def _merge_timings(per_request: list[list[Completion]]) -> dict[str, float]:
    """One question's backend timings from its requests' completions: the keys in
    ``PER_COMPLETION`` summed over completions, those in ``BATCH_WIDE`` (the whole backend
    call's) counted once, and the rest (a request's own, such as ``prompt_tokens``) summed over
    requests, each request's taken once."""
    total: dict[str, float] = {}
    for completions in per_request:
        keys = {k for c in completions for k in c.timings_ms}
        for k in keys:
            values = [c.timings_ms.get(k, 0.0) for c in completions]
            if k in PER_COMPLETION:
                total[k] = total.get(k, 0.0) + sum(values)
            elif k in BATCH_WIDE:
                total[k] = max(total.get(k, 0.0), *values)
            else:
                total[k] = total.get(k, 0.0) + max(values)
    return total


def answer_span(answer: str, quote: str) -> tuple[int, int] | None:
    """Where ``answer`` stands in ``quote``, as offsets into ``quote``: its first occurrence as
    whole words (the grammar places an answer so: "40" in "1940 ... 40 years" is the second),
    else by ``verify.locate``'s rules (up to whitespace runs, and punctuation that ends a
    sentence or wraps words trimmed from its ends when the whole does not stand there,
    ``verify.ANSWER_TRIM``; a sign, currency or percent is kept); None when it does not."""
    if not answer.strip():
        return None
    whole = word_occurrences(quote, answer)
    if whole:
        return whole[0], whole[0] + len(answer)
    found = locate(answer, quote, (0, len(quote)), trim=ANSWER_TRIM)
    # part of a word ("40" in "1940") is not the answer standing there
    return found if found is not None and on_word_edges(quote, *found) else None


class CitedGenerator:
    """Generates (answer, verified quote) candidates with any Backend."""

    def __init__(self, backend: Backend, cfg: GenerationConfig) -> None:
        self.backend = backend
        self.cfg = cfg

    def _request(self, messages: tuple[dict[str, str], ...], shown: list[ShownPassage], *,
                 n: int, temperature: float, constrain: bool, mode: AnswerMode,
                 only_passage: int | None = None) -> GenerationRequest:
        cfg = self.cfg
        max_answer_chars = cfg.max_answer_tokens * CHARS_PER_TOKEN
        grammar = stage = None
        if constrain:
            # Bounding the quote's length in the grammar keeps a model that would copy on and
            # on from producing a quote the verifier must then reject as too long.
            grammar = output_grammar(
                [p.text for p in shown],
                mode=mode,
                max_answer_chars=max_answer_chars,
                min_quote_chars=cfg.min_quote_chars,
                max_quote_chars=cfg.max_quote_chars,
                answer_from_passages=cfg.extractive_answer,
                only_passage=only_passage,
                unquotable=unquotable(self.backend),
            )
            if mode == "span":
                stage = QuoteStage(tuple(p.text for p in shown), cfg.min_quote_chars,
                                   cfg.max_quote_chars, only_passage, unquotable(self.backend))
        copied = cfg.max_answer_tokens + cfg.max_quote_chars // QUOTE_CHARS_PER_TOKEN
        # the reply copies from one passage: the one that needs most (or the one it must use)
        quotable = [p for p in shown if only_passage is None or p.number == only_passage]
        scale = budget_scale([p.text for p in quotable], cfg.max_quote_chars)
        max_tokens = math.ceil(copied * scale) + FORMAT_TOKENS
        return GenerationRequest(
            messages=messages, grammar=grammar, n=n, temperature=temperature,
            max_tokens=max_tokens,
            quote_stage=stage,
        )

    def _plan(self, item: GenerationItem, constrain: bool, top_k: int | None,
              ) -> tuple[list[GenerationRequest], list[ShownPassage]]:
        """The requests for one question and the windows its passage numbers refer to (no
        request when no passage has text to show)."""
        cfg = self.cfg
        n = cfg.n_candidates if item.n is None else item.n
        mode = item.mode or cfg.answer_mode
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, got {mode!r}")
        messages, shown = build_messages(item.question, item.hits, cfg, top_k=top_k)
        if not shown:
            return [], shown

        def request(count: int, temperature: float, only: int | None = None) -> GenerationRequest:
            return self._request(messages, shown, n=count, temperature=temperature,
                                 constrain=constrain, mode=mode, only_passage=only)  # type: ignore[arg-type]

        # (a passage of nothing but texts the backend cannot quote offers no quote)
        quotable = [p for p in shown if not constrain
                    or can_quote(p.text, unquotable(self.backend), cfg.min_quote_chars)]
        if not quotable:
            return [], shown
        if n == 1:
            return [request(1, 0.0)], shown
        if not constrain:  # no grammar to point a candidate at a passage: samples only
            return [request(n, cfg.temperature)], shown
        covered = min(n, len(quotable))
        plan = [request(1, 0.0, p.number) for p in quotable[:covered]]
        if n > covered:
            plan.append(request(n - covered, cfg.temperature))
        return plan, shown

    def generate(
        self,
        question: str,
        hits: Sequence[Hit],
        documents: Callable[[str], Document],
        *,
        n: int | None = None,
        mode: str | None = None,
        constrain: bool | None = None,
        top_k: int | None = None,
    ) -> Generation:
        """Generate ``n`` candidates (default ``cfg.n_candidates``) for ``question``.

        ``documents`` maps a doc_id to its Document (quotes are verified against it); ``mode``
        overrides ``cfg.answer_mode``; ``constrain`` overrides ``cfg.constrain_quote``;
        ``top_k`` overrides ``cfg.top_k_passages``.
        """
        [generation] = self.generate_many(
            [GenerationItem(question, hits, documents, n, mode)], constrain=constrain,
            top_k=top_k,
        )
        return generation

    def generate_many(
        self,
        items: Sequence[GenerationItem],
        *,
        constrain: bool | None = None,
        top_k: int | None = None,
    ) -> list[Generation]:
        """``generate`` for several questions at once: every request of every item goes to the
        backend in ONE ``generate`` call (the local backend decodes them as one batch).

        Result ``i`` is item ``i``'s Generation. Timings: ``backend_ms`` is the whole batch's
        wall time, shared by every item; ``batch_items`` says how many items shared it.
        """
        constrain = self.cfg.constrain_quote if constrain is None else constrain
        plans = [self._plan(item, constrain, top_k) for item in items]
        requests = [replace(request, abandoned=item.abandoned) if item.abandoned else request
                    for item, (plan, _) in zip(items, plans, strict=True) for request in plan]
        t0 = time.perf_counter()
        results = self.backend.generate(requests) if requests else []
        backend_ms = (time.perf_counter() - t0) * 1000
        assert len(results) == len(requests), f"backend answered {len(results)} of {len(requests)}"

        out = []
        at = 0
        for item, (plan, shown) in zip(items, plans, strict=True):
            mine, at = results[at : at + len(plan)], at + len(plan)
            if not plan:
                out.append(Generation(candidates=[], timings_ms={}))
                continue
            t1 = time.perf_counter()
            # span mode under its grammar: what the grammar promises is checked (without it,
            # an evaluation's ablation, answers are free text and judged like free mode's)
            span_mode = constrain and (item.mode or self.cfg.answer_mode) == "span"
            candidates = [
                # Under the grammar a quote may span the passage's own line breaks.
                self._candidate(c, shown, item.documents, multiline_quote=constrain,
                                supported_only=span_mode)
                for completions in mine
                for c in completions
            ]
            timings = _merge_timings(mine)
            timings["backend_ms"] = backend_ms
            timings["batch_items"] = float(len(items))
            timings["verify_ms"] = (time.perf_counter() - t1) * 1000
            out.append(Generation(candidates=candidates, timings_ms=timings))
        return out

    def _candidate(
        self,
        completion: Completion,
        shown: list[ShownPassage],
        documents: Callable[[str], Document],
        *,
        multiline_quote: bool,
        supported_only: bool = False,
    ) -> Candidate:
        """``supported_only`` (span mode): an answer that does not stand in its quote keeps no
        quote, so it is never given. The grammar makes one impossible, but a remote engine may
        not apply it (vLLM before 0.12 reads another key)."""
        try:
            parsed = parse_output(completion.text, len(shown), multiline_quote=multiline_quote,
                                  strip_eos=not multiline_quote)  # (multiline: a grammar's)
        except OutputFormatError as e:
            logger.debug("unparseable generation: %s", e)
            return Candidate(
                answer="",
                quote=None,
                logprob=completion.logprob,
                n_tokens=completion.n_tokens,
                raw=completion.text,
            )
        passage = shown[parsed.passage_number - 1]
        try:
            document = documents(passage.hit.passage.doc_id)
        except KeyError:
            logger.warning("document %s of a hit is missing", passage.hit.passage.doc_id)
            quote = None
        else:
            quote = verify_quote(parsed.quote, passage.window, document, self.cfg)
        span = answer_span(parsed.answer, quote.text) if quote is not None else None
        if supported_only and span is None and quote is not None:
            logger.info("an answer not in its quote, in span mode (did the engine ignore the "
                        "grammar?): %r", parsed.answer[:80])
            quote = None
        return Candidate(
            answer=parsed.answer,
            quote=quote,
            logprob=completion.logprob,
            n_tokens=completion.n_tokens,
            retrieval_score=passage.hit.score,
            retrieval_fused=passage.hit.fused,
            raw=completion.text,
            answer_start=None if span is None or quote is None else quote.start + span[0],
            answer_end=None if span is None or quote is None else quote.start + span[1],
        )
