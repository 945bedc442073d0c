"""Reward-model features of one (question, answer, quote) judgement: sentence-embedding products
plus a few scalars the generator and retriever already know.

    RewardInput -> [embedding block | scalar block] -> float32 row of ``FeatureSpec.dim``

Embedding block (when ``FeatureSpec.embeddings``): with q, a, s the L2-normalised embeddings of
the question, the answer and the quote (prefixed by its title), ``[q*a, q*s, a*s, |q-s|]``
(4 * dim) and the three cosines. Scalar block: see ``SCALARS``. Every feature depends on one
candidate only (never on how many candidates were sampled), so a model trained on best-of-4
data scores a single greedy answer the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from citeqa.retrieval.embed import Embedder
from citeqa.text import normalize_answer, term_share
from citeqa.types import Candidate

# Names of the scalar features, in column order (see ``scalar_row``).
SCALARS: tuple[str, ...] = (
    "mean_logprob",  # generator mean token log-probability, clipped to [-10, 0]
    "logprob",  # generator total log-probability / 10, clipped to [-10, 0]
    "log_n_tokens",  # log(1 + generated tokens)
    "log_retrieval_rank",  # log(1 + effective RRF rank of the quoted passage), see below
    "answer_in_quote",  # 1 if the normalised answer is a substring of the normalised quote
    "question_quote_overlap",  # share of the question's content terms found in the quote
    "answer_question_overlap",  # share of the answer's content terms already in the question
    "log_answer_words",  # log(1 + words in the answer)
    "log_quote_chars",  # log(1 + characters in the quote)
    "quote_valid",  # 1 if the quote was verified verbatim in its source
    "answer_empty",  # 1 if the answer is empty (an unparseable generation)
)
MAX_RANK = 200.0  # effective ranks are clipped here (a passage found by one retriever only)


@dataclass(frozen=True)
class RewardInput:
    """What the reward model judges: one answer with its quote, and generator/retriever facts."""

    question: str
    answer: str
    quote: str  # the quoted text; "" when the quote failed verification
    title: str = ""  # title of the quoted document
    logprob: float = 0.0  # sum of the generator's token log-probabilities
    n_tokens: int = 0  # generated tokens
    retrieval_score: float = 0.0  # fused (RRF) retrieval score of the quoted passage
    quote_valid: bool = True  # the quote was verified verbatim

    @classmethod
    def from_candidate(cls, question: str, c: Candidate) -> RewardInput:
        return cls(
            question=question,
            answer=c.answer,
            quote=c.quote.text if c.quote else "",
            title=c.quote.title if c.quote else "",
            logprob=c.logprob,
            n_tokens=c.n_tokens,
            # a raw single-retriever score is not on RRF's scale, and this model knows no
            # unknown: it counts as the lowest rank
            retrieval_score=c.retrieval_score if c.retrieval_fused else 0.0,
            quote_valid=c.quote is not None,
        )


@dataclass(frozen=True)
class FeatureSpec:
    """How rows are built; stored in the reward model's config.json and checked on load."""

    embedder: str = "minilm"  # "minilm" | "hash" (see citeqa.retrieval.embed.load_embedder)
    embedding_dim: int = 384  # the embedder's output size
    embeddings: bool = True  # include the embedding block; False = scalar features only
    scalars: tuple[str, ...] = SCALARS  # scalar feature names, in column order
    rrf_k: int = 60  # the retriever's RRF constant, to turn a fused score back into a rank

    @property
    def dim(self) -> int:
        emb = 4 * self.embedding_dim + 3 if self.embeddings else 0
        return emb + len(self.scalars)


def effective_rank(score: float, rrf_k: int) -> float:
    """The rank r at which both retrievers agreeing would give RRF score ``score``:
    ``2 / (rrf_k + r) = score``. A passage only one retriever found lands far down."""
    if score <= 0.0:
        return MAX_RANK
    return float(min(max(2.0 / score - rrf_k, 1.0), MAX_RANK))


def scalar_row(x: RewardInput, spec: FeatureSpec) -> np.ndarray:
    """The scalar features of one input, in ``spec.scalars`` order."""
    norm_answer, norm_quote = normalize_answer(x.answer), normalize_answer(x.quote)
    values = {
        "mean_logprob": min(max(x.logprob / max(x.n_tokens, 1), -10.0), 0.0),
        "logprob": min(max(x.logprob / 10.0, -10.0), 0.0),
        "log_n_tokens": math.log1p(max(x.n_tokens, 0)),
        "log_retrieval_rank": math.log1p(effective_rank(x.retrieval_score, spec.rrf_k)),
        "answer_in_quote": float(bool(norm_answer) and norm_answer in norm_quote),
        "question_quote_overlap": term_share(x.question, x.quote),
        "answer_question_overlap": term_share(x.answer, x.question),
        "log_answer_words": math.log1p(len(x.answer.split())),
        "log_quote_chars": math.log1p(len(x.quote)),
        "quote_valid": float(x.quote_valid),
        "answer_empty": float(not x.answer.strip()),
    }
    unknown = [name for name in spec.scalars if name not in values]
    if unknown:
        raise ValueError(f"unknown scalar features {unknown}; known: {list(values)}")
    return np.array([values[name] for name in spec.scalars], dtype=np.float32)


def _embed_unique(texts: Sequence[str], embedder: Embedder) -> np.ndarray:
    """Embeddings of ``texts`` (each distinct text embedded once)."""
    unique = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(unique)}
    emb = embedder.embed(unique) if unique else np.zeros((0, embedder.dim), np.float32)
    return emb[[index[t] for t in texts]]  # [N, dim]


def embedding_block(
    items: Sequence[RewardInput], embedder: Embedder
) -> np.ndarray:
    """``[q*a, q*s, a*s, |q-s|, cos(q,a), cos(q,s), cos(a,s)]`` per input: [N, 4*dim + 3]."""
    q = _embed_unique([x.question for x in items], embedder)  # [N, dim]
    a = _embed_unique([x.answer for x in items], embedder)  # [N, dim]
    s = _embed_unique([f"{x.title}: {x.quote}" if x.quote else "" for x in items], embedder)
    cos = np.stack([(q * a).sum(1), (q * s).sum(1), (a * s).sum(1)], axis=1)  # [N, 3]
    return np.concatenate([q * a, q * s, a * s, np.abs(q - s), cos], axis=1).astype(np.float32)


def featurize(
    items: Sequence[RewardInput], spec: FeatureSpec, embedder: Embedder | None
) -> np.ndarray:
    """Feature rows for ``items``: float32 [N, spec.dim]."""
    scalars = np.stack([scalar_row(x, spec) for x in items]) if items else np.zeros(
        (0, len(spec.scalars)), np.float32
    )
    if not spec.embeddings:
        return scalars
    if embedder is None:
        raise ValueError("this feature spec needs an embedder; pass load_embedder(spec.embedder)")
    if embedder.dim != spec.embedding_dim:
        raise ValueError(
            f"the embedder gives {embedder.dim} dimensions but the spec expects "
            f"{spec.embedding_dim}; use the embedder {spec.embedder!r} the model was trained with"
        )
    if not items:
        return np.zeros((0, spec.dim), np.float32)
    return np.concatenate([embedding_block(items, embedder), scalars], axis=1)
