"""The cited generator: prompt -> backend (optionally grammar-constrained) -> parse -> verify.

One call turns a question and its hits into ``n`` candidates; ``generate_many`` does several
questions with ONE backend call (cross-request batching). All samples go to the backend in
one ``generate`` call: one request with ``n`` completions (the prompt is prefilled once), or,
with ``round_robin`` (GopherCite), one request per passage where sample ``i`` sees only passage
``i mod k`` (candidates then come grouped by passage). A quote cut short by ``max_tokens`` is
still a verbatim span, so the budget only bounds latency.

Every completion becomes a Candidate; one whose output does not parse keeps ``answer == ""``
and ``quote is None`` for evaluation, but is never presented as a quote.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from citeqa.config import GenerationConfig
from citeqa.errors import OutputFormatError
from citeqa.generation.backend import Backend, Completion, GenerationRequest
from citeqa.generation.constraint import output_grammar
from citeqa.generation.parse import parse_output
from citeqa.generation.prompt import ShownPassage, build_messages
from citeqa.generation.verify import verify_quote
from citeqa.types import Candidate, Document, Hit

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # rough budget conversion between answer characters and tokens
QUOTE_CHARS_PER_TOKEN = 3  # quotes copy names and numbers, which split into shorter tokens
PER_COMPLETION = frozenset({"tokens"})  # backend timing keys counted per completion
FORMAT_TOKENS = 16  # tokens of the fixed parts of the output ("Answer: ", "Quote [k]: ", ...)


# One question for ``generate_many``: (question, hits, doc_id -> Document, n or None).
GenerationItem = tuple[str, Sequence[Hit], Callable[[str], Document], int | None]


@dataclass(frozen=True)
class Generation:
    """Candidates in generation order, the windows they were shown, and timings."""

    candidates: list[Candidate]
    timings_ms: dict[str, float]  # backend_ms, prefill_ms, decode_ms (summed), verify_ms


def _merge_timings(per_request: list[list[Completion]]) -> dict[str, float]:
    """Sum backend timings over requests. Within a request the completions share one prefill
    and decode loop and each report it, so those keys take the max; the keys in
    ``PER_COMPLETION`` are each completion's own and are summed."""
    total: dict[str, float] = {}
    for completions in per_request:
        keys = {k for c in completions for k in c.timings_ms}
        for k in keys:
            values = [c.timings_ms.get(k, 0.0) for c in completions]
            total[k] = total.get(k, 0.0) + (sum(values) if k in PER_COMPLETION else max(values))
    return total


class CitedGenerator:
    """Generates (answer, verified quote) candidates with any Backend."""

    def __init__(self, backend: Backend, cfg: GenerationConfig) -> None:
        self.backend = backend
        self.cfg = cfg

    def _request(
        self,
        messages: tuple[dict[str, str], ...],
        shown: list[ShownPassage],
        n: int,
        temperature: float,
        constrain: bool,
    ) -> GenerationRequest:
        max_answer_chars = self.cfg.max_answer_tokens * CHARS_PER_TOKEN
        grammar = None
        if constrain:
            # Bounding the quote's length in the grammar keeps a model that would copy on and
            # on from producing a quote the verifier must then reject as too long.
            grammar = output_grammar(
                [p.text for p in shown],
                max_answer_chars=max_answer_chars,
                min_quote_chars=self.cfg.min_quote_chars,
                max_quote_chars=self.cfg.max_quote_chars,
                answer_from_passages=self.cfg.extractive_answer,
            )
        max_tokens = (
            self.cfg.max_answer_tokens
            + self.cfg.max_quote_chars // QUOTE_CHARS_PER_TOKEN
            + FORMAT_TOKENS
        )
        return GenerationRequest(
            messages=messages, grammar=grammar, n=n, temperature=temperature, max_tokens=max_tokens
        )

    def _plan(
        self, question: str, hits: Sequence[Hit], n: int, constrain: bool, top_k: int | None
    ) -> list[tuple[GenerationRequest, list[ShownPassage]]]:
        """The requests for one question, each with the windows its passage numbers refer to
        (none when no passage has text to show)."""
        cfg = self.cfg
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        temperature = 0.0 if n == 1 else cfg.temperature
        messages, shown = build_messages(question, hits, cfg, top_k=top_k)
        if not shown:
            return []
        if not (cfg.round_robin and n > 1 and len(shown) > 1):
            return [(self._request(messages, shown, n, temperature, constrain), shown)]
        plan = []
        k = len(shown)
        for j, passage in enumerate(shown):
            count = len(range(j, n, k))  # samples i with i mod k == j
            if count:
                sub_messages, sub_shown = build_messages(question, [passage.hit], cfg)
                request = self._request(sub_messages, sub_shown, count, temperature, constrain)
                plan.append((request, sub_shown))
        return plan

    def generate(
        self,
        question: str,
        hits: Sequence[Hit],
        documents: Callable[[str], Document],
        *,
        n: int | None = None,
        constrain: bool | None = None,
        top_k: int | None = None,
    ) -> Generation:
        """Generate ``n`` candidates (default ``cfg.n_candidates``) for ``question``.

        ``documents`` maps a doc_id to its Document (quotes are verified against it);
        ``constrain`` overrides ``cfg.constrain_quote``; ``top_k`` overrides
        ``cfg.top_k_passages``. Greedy when ``n == 1``, ``cfg.temperature`` otherwise.
        """
        [generation] = self.generate_many(
            [(question, hits, documents, n)], constrain=constrain, top_k=top_k
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

        Each item is ``(question, hits, documents, n)`` (``n`` None = ``cfg.n_candidates``);
        result ``i`` is item ``i``'s Generation. Timings: ``backend_ms`` is the whole batch's
        wall time, shared by every item; ``batch_items`` says how many items shared it.
        """
        constrain = self.cfg.constrain_quote if constrain is None else constrain
        plans = [
            self._plan(question, hits, self.cfg.n_candidates if n is None else n, constrain, top_k)
            for question, hits, _, n in items
        ]
        requests = [request for plan in plans for request, _ in plan]
        t0 = time.perf_counter()
        results = self.backend.generate(requests) if requests else []
        backend_ms = (time.perf_counter() - t0) * 1000
        assert len(results) == len(requests), f"backend answered {len(results)} of {len(requests)}"

        out = []
        at = 0
        for (_, _, documents, _), plan in zip(items, plans, strict=True):
            mine, at = results[at : at + len(plan)], at + len(plan)
            if not plan:
                out.append(Generation(candidates=[], timings_ms={}))
                continue
            t1 = time.perf_counter()
            candidates = [
                # Under the grammar a quote may span the passage's own line breaks.
                self._candidate(c, windows, documents, multiline_quote=constrain)
                for (_, windows), completions in zip(plan, mine, strict=True)
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
    ) -> Candidate:
        try:
            parsed = parse_output(completion.text, len(shown), multiline_quote=multiline_quote)
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
        return Candidate(
            answer=parsed.answer,
            quote=quote,
            logprob=completion.logprob,
            n_tokens=completion.n_tokens,
            retrieval_score=passage.hit.score,
            raw=completion.text,
        )
