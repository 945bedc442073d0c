"""Approximate dense search at up to a million passages, and the Ray build against the local one.

One run, four parts, every figure from this run:

1. Corpus: passages of 3-7 SQuAD sentences (bench_retrieval.corpus_and_queries; Zipf words
   without the data), written as JSONL files; queries are SQuAD questions.
2. Build throughput: ``citeqa index build`` locally (builder.build_index) and with ``--ray
   local`` (distributed.build_index_sharded on RayExecutor), flat dense index, same sources;
   passages/s of each and their ratio, and a check that both hold the same passages. One
   machine cannot show a cluster's gain (docs/ray.md says what scales).
3. The flat index over all passages: exact top-10 for every query (the ground truth) and the
   single-query search p50.
4. HNSW (M=32, what ``--dense-index auto`` builds for large collections) and IVF (cells
   ``ivf_nlist(N)``): build time, index size and RSS growth, then recall@10 against flat and
   single-query p50 for each efSearch / nprobe; each pick is the smallest value reaching
   recall@10 >= 0.95, the figure behind the defaults in citeqa/retrieval/dense.py.

    python benchmarks/bench_ann.py --passages 1000000                 # hash embedder
    python benchmarks/bench_ann.py --passages 300000 --embedder minilm --build-passages 5000
    python benchmarks/bench_ann.py --passages 1000000 --embedder composed

With ``--embedder minilm`` the full corpus is embedded once through the Ray build (resumable:
rerun the same command after an interruption with the same ``--work``), and the local/Ray
throughput comparison runs on the first ``--build-passages`` passages.

``--embedder composed`` writes no files and skips part 2: each passage's vector is the
normalised mean of the MiniLM embeddings of its sentences (the ~5k SQuAD sentences are embedded
once), a stand-in for MiniLM passage embeddings at sizes these cores cannot embed in an hour.
Check it against ``--embedder minilm`` at a size both can run (docs/measurements.md: at 178k
passages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_retrieval import (  # noqa: E402
    corpus_and_queries,
    sample_queries,
    sentence_draws,
    squad_sentences,
)

from citeqa.config import RetrievalConfig  # noqa: E402
from citeqa.retrieval import build_index, load_embedder  # noqa: E402
from citeqa.retrieval.dense import (  # noqa: E402
    HNSW_EF_SEARCH,
    IVF_NPROBE,
    DenseIndex,
    DenseSpec,
    ivf_nlist,
)

TARGET_RECALL, TARGET_P50_MS = 0.95, 10.0


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def write_sources(texts: list[str], directory: Path, files: int) -> list[Path]:
    """The passages as JSONL documents spread over ``files`` files (Ray reads files in
    parallel), in order."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    paths = []
    for f in range(0, len(texts), per):
        path = directory / f"part-{f // per:04d}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for i in range(f, min(f + per, len(texts))):
                out.write(json.dumps({"id": f"p{i}", "title": f"p{i}", "text": texts[i]}) + "\n")
        paths.append(path)
    return paths


def composed_vectors(sentences: list[str], draws: list[np.ndarray], embedder,
                     chunk: int = 100_000) -> np.ndarray:
    """MiniLM-composed passage vectors: passage i's vector is the normalised mean of the
    embeddings of its sentences ``sentences[draws[i]]``, so a million vectors cost one embedding
    of the ~5k sentences instead of a million passage embeddings. [len(draws), dim] float32."""
    emb = embedder.embed(sentences, batch_size=64)  # [S, dim]
    out = np.empty((len(draws), emb.shape[1]), dtype=np.float32)
    for start in range(0, len(draws), chunk):
        part = draws[start : start + chunk]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in part])[:-1]])
        sums = np.add.reduceat(emb[np.concatenate(part)], offsets, axis=0)  # [chunk, dim]
        out[start : start + len(part)] = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return out


def single_query_p50(index: DenseIndex, queries: np.ndarray, k: int = 10) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - t)
    return float(np.percentile(np.asarray(times) * 1000, 50))


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k that the approximate top-k holds."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth,
                                                                         strict=True)]))


def measure_build(spec: DenseSpec, vectors: np.ndarray, tmp: Path) -> tuple[DenseIndex, dict]:
    before = rss_mb()
    t = time.perf_counter()
    index = DenseIndex.build(vectors, spec=spec)
    seconds = time.perf_counter() - t
    path = tmp / f"{spec.kind}.faiss"
    index.save(path)
    size = path.stat().st_size
    path.unlink()
    return index, {"build_s": seconds, "file_mb": size / 2**20,
                   "bytes_per_vector": size / len(vectors), "rss_growth_mb": rss_mb() - before}


def built_vectors(args: argparse.Namespace, sources: list[Path], work: Path,
                  fig: dict[str, object]) -> np.ndarray:
    """Parts 2 and 3: the local and ``--ray local`` builds of the first ``--build-passages``
    passages (throughput, same passages), then the flat index over every passage through Ray;
    its vectors [N, dim]."""
    from citeqa.distributed import RayExecutor, RayOptions, build_index_sharded

    cfg = RetrievalConfig(embedder=args.embedder)
    flat = DenseSpec(kind="flat")
    n_build = args.build_passages or (args.passages if args.embedder == "hash" else 5000)
    per_file = -(-args.passages // len(sources))
    build_sources = [str(p) for p in sources[: max(1, -(-n_build // per_file))]]

    # --- 2. build throughput: local vs Ray on one machine
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.threads, include_dashboard=False)
    ray_start = time.perf_counter() - t
    summaries = {}
    for name in ("local", "ray"):
        out = work / f"index-{name}-{len(build_sources)}"
        t = time.perf_counter()
        if name == "local":
            s = build_index(build_sources, out, cfg, dense_spec=flat)
        else:
            executor = RayExecutor(RayOptions("local", num_cpus=args.threads))
            s = build_index_sharded(build_sources, out, cfg, dense_spec=flat,
                                    executor=executor, work_dir=work / "shards-compare")
        summaries[name] = (s, time.perf_counter() - t)
    (local, t_local), (rayed, t_ray) = summaries["local"], summaries["ray"]
    assert (local.documents, local.passages) == (rayed.documents, rayed.passages), summaries
    rate_local, rate_ray = local.passages / t_local, rayed.passages / t_ray
    fig.update(build_passages=local.passages, local_build_s=t_local, ray_build_s=t_ray,
               ray_start_s=ray_start, local_passages_per_s=rate_local,
               ray_passages_per_s=rate_ray)
    print(f"build ({args.embedder}, flat, {local.passages:,} passages, same passages both ways): "
          f"local {rate_local:,.0f} passages/s ({t_local:.1f} s); --ray local "
          f"{rate_ray:,.0f} passages/s ({t_ray:.1f} s, {rayed.shards} shards; Ray start "
          f"{ray_start:.1f} s more) -> Ray/local {rate_ray / rate_local:.2f}x on one machine")

    # --- 3. the flat index over every passage: ground truth
    if len(build_sources) == len(sources):
        full = work / f"index-ray-{len(build_sources)}"
    else:
        full = work / "index-full"
        t = time.perf_counter()
        s = build_index_sharded([str(p) for p in sources], full, cfg, dense_spec=flat,
                                executor=RayExecutor(RayOptions("local")),
                                work_dir=work / "shards-full")
        print(f"full build via --ray local: {s.passages:,} passages in "
              f"{time.perf_counter() - t:.0f} s ({s.shards_reused} shards reused)")
    ray.shutdown()
    return DenseIndex.load(full / "dense.faiss").vectors()


def main() -> None:
    ap = argparse.ArgumentParser(description="citeqa approximate dense search benchmark")
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--embedder", choices=["hash", "minilm", "composed"], default="hash",
                    help="composed: MiniLM-composed vectors (each passage the normalised mean "
                         "of its sentences' MiniLM embeddings), no index build")
    ap.add_argument("--build-passages", type=int, default=None,
                    help="about how many source texts the local-vs-Ray throughput comparison "
                         "builds from, rounded up to whole source files (chunking can make more "
                         "passages; the figures report the passages built; default: all with "
                         "hash, 5000 with minilm)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch/FAISS threads, Ray CPUs")
    ap.add_argument("--files", type=int, default=64, help="JSONL source files")
    ap.add_argument("--no-hnsw", action="store_true", help="skip HNSW (slow to build)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep corpus and indexes here (reuse/resume); default a temp dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import faiss
    import torch

    from citeqa.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_ann-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{args.threads} threads; python {platform.python_version()}, faiss "
          f"{faiss.__version__}; work dir {work}")
    fig: dict[str, object] = {"threads": args.threads, "embedder": args.embedder}

    # --- 1. corpus
    texts, queries, what = corpus_and_queries(args.passages, args.seed)
    queries = sample_queries(queries, args.queries, args.seed)
    if args.embedder == "composed":
        found = squad_sentences()
        if found is None:
            sys.exit("--embedder composed needs the SQuAD data in ../shared/data/squad2")
        print(f"corpus: {len(texts):,} texts ({what}), mean "
              f"{np.mean([len(t) for t in texts]):.0f} chars; {len(queries)} queries")
        del texts
        t = time.perf_counter()
        embedder = load_embedder("minilm")
        draws = sentence_draws(args.passages, len(found[0]), args.seed)  # corpus_and_queries'
        vectors = composed_vectors(found[0], draws, embedder)
        print(f"MiniLM-composed vectors: {len(vectors):,} in {time.perf_counter() - t:.0f} s "
              "(no index build: the local-vs-Ray comparison needs --embedder hash or minilm)")
    else:
        sources = write_sources(texts, work / "sources", args.files)
        print(f"corpus: {len(texts):,} texts ({what}), mean "
              f"{np.mean([len(t) for t in texts]):.0f} chars, in {len(sources)} JSONL files; "
              f"{len(queries)} queries")
        del texts
        vectors = built_vectors(args, sources, work, fig)  # [N, dim]
        embedder = load_embedder(args.embedder)
    n = len(vectors)
    qv = embedder.embed(queries, batch_size=64)  # [Q, dim]
    exact = DenseIndex.build(vectors, spec=DenseSpec(kind="flat"))
    _, truth = exact.index.search(qv, 10)
    lat_q = qv[: args.latency_queries]
    flat_p50 = single_query_p50(exact, lat_q)
    fig.update(passages=n, dim=int(vectors.shape[1]), flat_p50_ms=flat_p50)
    print(f"flat: {n:,} vectors of {vectors.shape[1]} dims, single-query top-10 p50 "
          f"{flat_p50:.2f} ms")
    del exact

    rows: list[tuple[str, str, float, float]] = []
    picks: dict[str, tuple[int, float, float]] = {}

    def sweep(kind: str, index: DenseIndex, knob: str, values: list[int]) -> None:
        fig[kind]["sweep"] = []  # type: ignore[index]
        for v in values:
            if kind == "hnsw":
                index.index.hnsw.efSearch = v
            else:
                index.index.nprobe = v
            _, found = index.index.search(qv, 10)
            r, p50 = recall_at(found, truth), single_query_p50(index, lat_q)
            fig[kind]["sweep"].append({knob: v, "recall_at_10": r, "p50_ms": p50})  # type: ignore[index]
            rows.append((kind, f"{knob}={v}", r, p50))
            if kind not in picks and r >= TARGET_RECALL:
                picks[kind] = (v, r, p50)

    # --- 4a. HNSW
    if not args.no_hnsw:
        hspec = DenseSpec(kind="hnsw")
        hnsw, hstats = measure_build(hspec, vectors, work)
        print(f"HNSW: M {hspec.hnsw_m}, efConstruction {hspec.ef_construction}; build "
              f"{hstats['build_s']:.1f} s, {hstats['bytes_per_vector']:.0f} bytes/vector "
              f"({hstats['file_mb']:,.0f} MiB), RSS +{hstats['rss_growth_mb']:,.0f} MiB")
        fig["hnsw"] = dict(hstats)
        sweep("hnsw", hnsw, "efSearch", [16, 32, 64, 128, 256, 512])
        del hnsw

    # --- 4b. IVF
    spec = DenseSpec(kind="ivf").resolved(n)
    ivf, stats = measure_build(spec, vectors, work)
    trained = min(n, spec.train_per_list * (spec.nlist or 1))
    print(f"IVF: nlist {spec.nlist} (ivf_nlist({n:,}) = {ivf_nlist(n)}), trained on "
          f"{trained:,} vectors; build {stats['build_s']:.1f} s, "
          f"{stats['bytes_per_vector']:.0f} bytes/vector ({stats['file_mb']:,.0f} MiB), RSS "
          f"+{stats['rss_growth_mb']:,.0f} MiB")
    fig["ivf"] = {"nlist": spec.nlist, **stats}
    sweep("ivf", ivf, "nprobe", [p for p in (8, 16, 32, 64, 128, 256, 512)
                                 if p <= (spec.nlist or 1)])
    del ivf

    print(f"\n{'index':6} {'setting':14} {'recall@10':>9} {'p50 ms':>8}   "
          f"(flat p50 {flat_p50:.2f} ms over {n:,} vectors)")
    for kind, setting, r, p50 in rows:
        print(f"{kind:6} {setting:14} {r:9.3f} {p50:8.2f}")
    print()
    defaults = {"hnsw": ("efSearch", HNSW_EF_SEARCH), "ivf": ("nprobe", IVF_NPROBE)}
    for kind, (knob, default) in defaults.items():
        if kind not in fig:
            continue
        at_default = next((row for row in rows if row[:2] == (kind, f"{knob}={default}")), None)
        if kind not in picks:
            print(f"{kind}: no {knob} reached recall@10 >= {TARGET_RECALL}")
            continue
        v, r, p50 = picks[kind]
        fig[f"{kind}_pick"] = v
        verdict = "meets" if p50 <= TARGET_P50_MS else "MISSES"
        print(f"{kind} pick: {knob}={v} (smallest with recall@10 >= {TARGET_RECALL}): recall@10 "
              f"{r:.3f} vs flat at p50 {p50:.2f} ms ({flat_p50 / p50:.1f}x faster than flat); "
              f"{verdict} the {TARGET_P50_MS:.0f} ms target"
              + (f"; the default {knob}={default}: recall@10 {at_default[2]:.3f} at p50 "
                 f"{at_default[3]:.2f} ms" if at_default else ""))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fig["peak_rss_mb"] = peak
    print(f"peak RSS {peak:,.0f} MiB (whole process). One machine shows no cluster gain: the "
          "Ray build scales with embedding actors (GPUs or CPU nodes); see docs/ray.md.")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
