"""A scripted backend for tests and the ``tiny`` preset: no weights, fully deterministic."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

from citeqa.errors import ModelError
from citeqa.generation.backend import Completion, GenerationRequest

Responder = Callable[[GenerationRequest], list[str]]


def fake_logprob(text: str) -> float:
    """A deterministic stand-in log-probability in [-n_tokens, 0): depends only on ``text``."""
    n = max(len(text.split()), 1)
    return -n * (0.05 + (zlib.crc32(text.encode()) % 1000) / 1000.0)


class FakeBackend:
    """Backend whose outputs come from ``responder(request)`` (it must return ``n`` texts).

    Every request is recorded in ``requests`` so tests can inspect prompts and grammars.
    """

    def __init__(self, responder: Responder, model_id: str = "fake") -> None:
        self.responder = responder
        self.model_id = model_id
        self.requests: list[GenerationRequest] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        out = []
        for req in requests:
            self.requests.append(req)
            texts = list(self.responder(req))
            if len(texts) != req.n:
                raise ModelError(f"fake responder returned {len(texts)} texts for n={req.n}")
            out.append([self._completion(t) for t in texts])
        return out

    @staticmethod
    def _completion(text: str) -> Completion:
        n_tokens = max(len(text.split()), 1)
        timings = {"prefill_ms": 0.0, "decode_ms": 0.0, "forward_passes": 0.0,
                   "tokens": float(n_tokens)}
        return Completion(text, fake_logprob(text), n_tokens, timings)
