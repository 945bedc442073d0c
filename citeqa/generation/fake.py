"""A scripted backend for tests and the ``tiny`` preset: no weights, fully deterministic."""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Sequence

from citeqa.errors import ModelError
from citeqa.generation.backend import Completion, GenerationRequest, abandoned_completions

Responder = Callable[[GenerationRequest], list[str]]
# (completion text, its index among the request's n) -> (log-probability, tokens)
Scorer = Callable[[str, int], tuple[float, int]]
KEEP_CALLS = 64  # generate() calls remembered for inspection (bounded: a server runs for long)


def fake_logprob(text: str) -> float:
    """A deterministic stand-in log-probability in [-n_tokens, 0): depends only on ``text``."""
    n = max(len(text.split()), 1)
    return -n * (0.05 + (zlib.crc32(text.encode()) % 1000) / 1000.0)


def _default_scores(text: str, index: int) -> tuple[float, int]:
    del index
    return fake_logprob(text), max(len(text.split()), 1)


class FakeBackend:
    """Backend whose outputs come from ``responder(request)`` (it must return ``n`` texts).

    ``scores`` gives each completion its log-probability and token count (default: a stable
    hash of the text, one token per word); ``timings_ms`` is reported by every completion. The
    last ``KEEP_CALLS`` calls are kept in ``calls`` (each the list of its requests) so tests can
    inspect prompts and grammars; ``unquotable`` fakes an engine's (``backend.unquotable``).
    """

    def __init__(self, responder: Responder, model_id: str = "fake", *,
                 scores: Scorer = _default_scores,
                 timings_ms: dict[str, float] | None = None,
                 unquotable: str | None = None) -> None:
        self.responder = responder
        self.unquotable = unquotable  # as an engine's (backend.unquotable)
        self.model_id = model_id
        self.scores = scores
        self.timings_ms = timings_ms or {"prefill_ms": 0.0, "decode_ms": 0.0,
                                         "forward_passes": 0.0}
        self.calls: deque[list[GenerationRequest]] = deque(maxlen=KEEP_CALLS)

    @property
    def requests(self) -> list[GenerationRequest]:
        """The requests of the remembered calls, oldest first."""
        return [r for call in self.calls for r in call]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        out = []
        for req in requests:
            if req.is_abandoned():  # as the real backends do
                out.append(abandoned_completions(req))
                continue
            texts = list(self.responder(req))
            if len(texts) != req.n:
                raise ModelError(f"fake responder returned {len(texts)} texts for n={req.n}")
            out.append([self._completion(t, i) for i, t in enumerate(texts)])
        return out

    def _completion(self, text: str, index: int) -> Completion:
        logprob, n_tokens = self.scores(text, index)
        return Completion(text, logprob, n_tokens,
                          {**self.timings_ms, "tokens": float(n_tokens)})
