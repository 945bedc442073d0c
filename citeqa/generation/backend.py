"""The generator seam: a backend turns chat messages (+ an optional grammar) into completions.

Implementations: the local transformers backend (``hf.py``), a remote OpenAI-compatible server
(``remote.py``, e.g. vLLM, which accepts the same llguidance grammars) and ``FakeBackend`` for
tests. Everything above this seam (prompting, parsing, verification) is backend-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from citeqa.generation.constraint import QuoteStage


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete, ``n`` times."""

    messages: tuple[dict[str, str], ...]  # chat messages: {"role": ..., "content": ...}
    grammar: str | None = None  # llguidance Lark grammar for the whole output; None = free text
    n: int = 1  # completions wanted; greedy when n == 1 and temperature == 0
    temperature: float = 0.0
    max_tokens: int = 128
    seed: int | None = None
    # Span mode: when set, ``grammar`` covers the answer line only (up to and including
    # ``format.ANSWER_LINE_END``) and the quote then continues under ``quote_stage.grammar(
    # <text so far>)``: a stretch of a passage that contains that very answer. A backend builds
    # the second grammar as soon as the first is complete; when it gets None (no passage holds
    # the answer) the output ends after the answer line.
    quote_stage: QuoteStage | None = None
    # True once nobody waits for this request any more (the client left): a backend stops
    # its rows at the next step or skips it, and its completions come out cut (failed).
    abandoned: Callable[[], bool] | None = field(default=None, compare=False)

    def is_abandoned(self) -> bool:
        return self.abandoned is not None and self.abandoned()


@dataclass(frozen=True)
class Completion:
    text: str  # generated text only (not the prompt), special tokens removed
    logprob: float  # sum of log-probabilities of the generated tokens (after masking)
    n_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # prefill_ms, decode_ms, ...


def abandoned_completions(req: GenerationRequest) -> list[Completion]:
    """What a backend returns for a request abandoned before it started: ``n`` empty
    completions (failed candidates, as cut ones are)."""
    return [Completion("", 0.0, 0) for _ in range(req.n)]


class Backend(Protocol):
    @property
    def model_id(self) -> str:
        """What produced the completions (recorded in eval reports and RM cards)."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Complete every request; result[i] holds request i's ``n`` completions."""
        ...


def unquotable(backend: Backend) -> str | None:
    """A backend's ``unquotable``, when it has one: a regex of texts its engine's grammar
    matcher cannot take as text, which grammars then keep out of answers and quotes
    (``constraint.output_grammar``); None (any text) for backends without it."""
    value = getattr(backend, "unquotable", None)
    return value if isinstance(value, str) else None
