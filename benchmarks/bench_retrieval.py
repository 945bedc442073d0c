"""Retrieval benchmark at 100k passages: build throughput, query latency, peak memory.

Corpus: passages of 3-7 sentences drawn at random from the SQuAD paragraphs (qa.json +
distractors.json), so vocabulary and term statistics are realistic; queries are SQuAD
questions. Without the data it falls back to Zipf-distributed synthetic words (labelled).

Reported: BM25 build (passages/s), BM25 query p50/p95 (scores + top-50, the retriever's work)
versus rank_bm25.BM25Okapi.get_scores on the same corpus (a few queries: it is slow), MiniLM
embedding throughput measured on a sample and EXTRAPOLATED to the whole corpus, dense query
p50 (query embedding + FAISS flat search over 100k vectors: the sample's real vectors padded
with random unit vectors), hybrid query p50 (HybridRetriever.search, RRF), peak RSS.

    python benchmarks/bench_retrieval.py [--passages 100000] [--threads 2] [--dense-sample 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._args import at_least  # noqa: E402
from citeqa.compute import fp32_kernel  # noqa: E402
from citeqa.config import RetrievalConfig  # noqa: E402
from citeqa.retrieval import (  # noqa: E402
    BM25Index,
    DenseIndex,
    HybridRetriever,
    Index,
    MiniLMEmbedder,
    tokenize,
)
from citeqa.types import Document, Passage  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "squad2"


def squad_sentences() -> tuple[list[str], list[str]] | None:
    """The sentences of the SQuAD paragraphs (qa.json + distractors.json) and the questions,
    or None without the data."""
    files = [DATA / "qa.json", DATA / "distractors.json"]
    if not all(f.is_file() for f in files):
        return None
    sentences, queries = [], []
    for f in files:
        for article in json.loads(f.read_text())["data"]:
            for p in article["paragraphs"]:
                sentences += re.split(r"(?<=[.!?])\s+", p["context"])
                queries += [q["question"] for q in p.get("qas", [])]
    return sentences, queries


def sentence_draws(n: int, n_sentences: int, seed: int) -> list[np.ndarray]:
    """For each of ``n`` passages, the indices of its 3-7 sentences, drawn at random."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 8, size=n)
    picks = rng.integers(0, n_sentences, size=int(sizes.sum()))
    return np.split(picks, np.cumsum(sizes)[:-1])


def corpus_and_queries(n: int, seed: int) -> tuple[list[str], list[str], str]:
    found = squad_sentences()
    if found is not None:
        sentences, queries = found
        texts = [" ".join(sentences[i] for i in draw)
                 for draw in sentence_draws(n, len(sentences), seed)]
        return texts, queries, f"SQuAD sentences resampled ({len(sentences)} sentences)"
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(50_000)]
    ranks = np.minimum(rng.zipf(1.2, size=(n, 120)), len(words)) - 1
    texts = [" ".join(words[r] for r in row) for row in ranks]
    queries = [" ".join(words[r] for r in rng.integers(0, 2000, size=6)) for _ in range(300)]
    return texts, queries, "synthetic Zipf words (SQuAD data not found)"


def sample_queries(queries: list[str], k: int, seed: int) -> list[str]:
    """``k`` of the questions in a random order (seed + 1: independent of the corpus draws)."""
    rng = np.random.default_rng(seed + 1)
    return [queries[i] for i in rng.permutation(len(queries))[:k]]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description="citeqa retrieval benchmark")
    ap.add_argument("--passages", type=at_least(1), default=100_000)
    ap.add_argument("--queries", type=at_least(1), default=200)
    ap.add_argument("--reference-queries", type=at_least(1), default=5,
                    help="rank_bm25 is slow")
    ap.add_argument("--dense-sample", type=at_least(1), default=512,
                    help="passages embedded for real")
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import faiss
    import torch

    from citeqa.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"pinned threads: torch.set_num_threads({args.threads}), "
          f"faiss.omp_set_num_threads({args.threads}); {platform.processor() or platform.machine()}"
          f", python {platform.python_version()}, torch {torch.__version__}, faiss "
          f"{faiss.__version__}")
    fig: dict[str, object] = {"threads": args.threads, "passages": args.passages}

    texts, queries, what = corpus_and_queries(args.passages, args.seed)
    rng = np.random.default_rng(args.seed + 1)  # also pads the dense vectors below
    queries = [queries[i] for i in rng.permutation(len(queries))[: args.queries]]
    print(f"corpus: {len(texts)} passages, {what}; mean {np.mean([len(t) for t in texts]):.0f} "
          f"chars; {len(queries)} queries")

    # --- BM25 build
    t = time.perf_counter()
    tokens = [tokenize(x) for x in texts]
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    bm25 = BM25Index.build(tokens)
    t_build = time.perf_counter() - t
    fig["bm25_build_passages_per_s"] = len(texts) / (t_tok + t_build)
    print(f"BM25 build: {len(texts) / (t_tok + t_build):,.0f} passages/s "
          f"(tokenize {t_tok:.1f} s + index {t_build:.1f} s; vocab {len(bm25.vocab):,}, "
          f"postings {len(bm25.doc_ids):,})")

    # --- BM25 query
    qtokens = [tokenize(q) for q in queries]
    for q in qtokens[:5]:
        bm25.search(q, 50)  # warm up
    times = []
    for q in qtokens:
        t = time.perf_counter()
        bm25.search(q, 50)  # what the retriever runs: top-50 of the passages a term is in
        times.append(time.perf_counter() - t)
    ours_p50 = pct(times, 50)
    fig["bm25_query_p50_ms"], fig["bm25_query_p95_ms"] = ours_p50, pct(times, 95)
    print(f"BM25 query (scores + top-50) at {len(texts):,} passages: p50 {ours_p50:.2f} ms, "
          f"p95 {pct(times, 95):.2f} ms  (target <= 5 ms)")

    # --- rank_bm25 reference on the same corpus
    from rank_bm25 import BM25Okapi

    t = time.perf_counter()
    ref = BM25Okapi(tokens)
    t_ref_build = time.perf_counter() - t
    ref_times = []
    for q in qtokens[: args.reference_queries]:
        t = time.perf_counter()
        expected = ref.get_scores(q)
        ref_times.append(time.perf_counter() - t)
        np.testing.assert_allclose(bm25.scores(q), expected, rtol=1e-6, atol=1e-9)
    ref_p50 = pct(ref_times, 50)
    fig["rank_bm25_build_s"], fig["rank_bm25_query_p50_ms"] = t_ref_build, ref_p50
    fig["bm25_speedup_vs_rank_bm25"] = ref_p50 / ours_p50
    print(f"rank_bm25.BM25Okapi: build {t_ref_build:.1f} s, get_scores p50 {ref_p50:.1f} ms over "
          f"{len(ref_times)} queries (scores equal to 1e-6) -> ours is {ref_p50 / ours_p50:,.0f}x "
          "faster")
    del ref

    # --- dense build throughput (sample, extrapolated): fp32 (the code before bf16: torch's own
    # fp32 product, transformers' forward) against the default (auto: bf16 where the CPU's
    # matrix units make it pay, else fp32 with the product compute.fp32_kernel picks; through
    # LeanEncoder), in alternating halves
    embedders = {"fp32": MiniLMEmbedder(cpu_dtype="fp32", fp32_kernel="torch", lean=False),
                 "auto": MiniLMEmbedder()}
    for e in embedders.values():
        e.embed(["warm up"])
    fig["fp32_kernel"] = fp32_kernel() if embedders["auto"].dtype == "fp32" else None
    fig["dense_embed_lean"] = type(embedders["auto"]._model).__name__ == "LeanEncoder"
    sample = texts[: args.dense_sample]
    seconds = {name: 0.0 for name in embedders}
    half = len(sample) // 2
    for part in (sample[:half], sample[half:]):
        for name, e in embedders.items():
            t = time.perf_counter()
            vecs = e.embed(part, batch_size=32)
            seconds[name] += time.perf_counter() - t
    embedder = embedders["auto"]
    sample_vecs = embedder.embed(sample, batch_size=32)
    rates = {name: len(sample) / s for name, s in seconds.items()}
    rate = rates["auto"]
    fig["dense_embed_passages_per_s"] = rate
    fig["dense_embed_passages_per_s_fp32"] = rates["fp32"]
    fig["dense_embed_dtype"] = embedder.dtype
    fig["dense_embed_speedup_vs_fp32"] = rate / rates["fp32"]
    fig["dense_embed_extrapolated_s"] = len(texts) / rate
    kernel = f", {fig['fp32_kernel']}'s product" if fig["fp32_kernel"] else ""
    kernel += ", lean encoder" if fig["dense_embed_lean"] else ""
    print(f"MiniLM embedding: {rate:,.1f} passages/s ({embedder.dtype}{kernel}) against "
          f"{rates['fp32']:,.1f} in fp32 (x{rate / rates['fp32']:.2f}, target >= 2.5), measured "
          f"on {len(sample)} passages; EXTRAPOLATED to {len(texts):,} passages: "
          f"{len(texts) / rate / 60:.1f} min")
    del vecs

    # --- dense query: real sample vectors padded with random unit vectors to the corpus size
    pad = rng.standard_normal((len(texts) - len(sample), embedder.dim)).astype(np.float32)
    pad /= np.linalg.norm(pad, axis=1, keepdims=True)
    vectors = np.concatenate([sample_vecs, pad])
    t = time.perf_counter()
    dense = DenseIndex.build(vectors, kind="flat")
    t_faiss = time.perf_counter() - t
    emb_t, search_t, dense_t = [], [], []
    for q in queries:
        t = time.perf_counter()
        v = embedder.embed([q])
        t2 = time.perf_counter()
        dense.search(v, 50)
        t3 = time.perf_counter()
        emb_t.append(t2 - t)
        search_t.append(t3 - t2)
        dense_t.append(t3 - t)
    fig["dense_query_p50_ms"] = pct(dense_t, 50)
    fig["dense_query_embed_p50_ms"], fig["dense_flat_search_p50_ms"] = (
        pct(emb_t, 50), pct(search_t, 50)
    )
    print(f"dense query (MiniLM embed + FAISS flat top-50 over {len(texts):,} vectors, built in "
          f"{t_faiss:.1f} s): p50 {pct(dense_t, 50):.1f} ms (embed {pct(emb_t, 50):.1f} ms, "
          f"search {pct(search_t, 50):.1f} ms)")

    # --- hybrid query through the real retriever (in-memory index, no disk)
    docs = {f"p{i}": Document(f"p{i}", "", f"synthetic#{i}", x) for i, x in enumerate(texts)}
    passages = [Passage(i, f"p{i}", 0, len(x), x) for i, x in enumerate(texts)]
    emb_meta = {"model_id": embedder.model_id, "dim": embedder.dim, "name": "minilm"}
    index = Index(docs, passages, {"embedding": emb_meta}, bm25, dense)
    retriever = HybridRetriever(index, RetrievalConfig(), embedder=embedder)
    hyb_t = []
    for q in queries:
        t = time.perf_counter()
        retriever.search(q, 10)
        hyb_t.append(time.perf_counter() - t)
    fig["hybrid_query_p50_ms"] = pct(hyb_t, 50)
    print(f"hybrid query (HybridRetriever.search k=10, 50+50 candidates, RRF): "
          f"p50 {pct(hyb_t, 50):.1f} ms, p95 {pct(hyb_t, 95):.1f} ms")

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fig["peak_rss_mb"] = rss_mb
    print(f"peak RSS: {rss_mb:,.0f} MiB (whole process: corpus, rank_bm25 reference, model)")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
