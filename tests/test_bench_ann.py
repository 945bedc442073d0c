"""benchmarks/bench_ann.py's MiniLM-composed vectors: each passage the normalised mean of its
sentences' vectors, over the same sentence draws as the benchmark corpus's texts."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # it imports bench_retrieval
    import bench_ann
    import bench_retrieval

    return bench_ann, bench_retrieval


class FakeEmbedder:
    """A fixed random unit vector per distinct text; counts the texts it embeds."""

    def __init__(self, dim: int = 8) -> None:
        self.dim, self.embedded = dim, 0

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.embedded += len(texts)
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=self.dim)
                        for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


SENTENCES = [f"Sentence {i} about topic {i % 7}." for i in range(40)]


def test_sentence_draws_are_three_to_seven_sentences_and_repeatable(bench) -> None:
    _, br = bench
    draws = br.sentence_draws(500, len(SENTENCES), seed=3)
    assert len(draws) == 500
    assert {len(d) for d in draws} == {3, 4, 5, 6, 7}
    assert all(0 <= i < len(SENTENCES) for d in draws for i in d)
    again = br.sentence_draws(500, len(SENTENCES), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in
                   zip(draws, br.sentence_draws(500, len(SENTENCES), seed=4), strict=False))


def test_composed_vectors_are_the_normalised_mean_of_the_sentences(bench) -> None:
    ba, br = bench
    draws = br.sentence_draws(50, len(SENTENCES), seed=0)
    embedder = FakeEmbedder()
    vectors = ba.composed_vectors(SENTENCES, draws, embedder, chunk=7)  # chunks of 7 passages
    assert embedder.embedded == len(SENTENCES)  # each sentence embedded once, not per passage
    emb = FakeEmbedder().embed(SENTENCES)
    for draw, v in zip(draws, vectors, strict=True):
        mean = emb[draw].mean(axis=0)
        np.testing.assert_allclose(v, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert vectors.shape == (50, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(ba.composed_vectors(SENTENCES, draws, FakeEmbedder()), vectors,
                               rtol=1e-6)  # chunking changes nothing


def test_the_corpus_texts_are_the_draws_the_vectors_compose(bench, monkeypatch) -> None:
    _, br = bench
    monkeypatch.setattr(br, "squad_sentences", lambda: (SENTENCES, ["q?"]))
    texts, queries, what = br.corpus_and_queries(30, seed=5)
    draws = br.sentence_draws(30, len(SENTENCES), seed=5)
    assert texts == [" ".join(SENTENCES[i] for i in d) for d in draws]
    assert queries == ["q?"] and "40 sentences" in what
