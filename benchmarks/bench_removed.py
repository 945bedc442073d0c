"""Recall of an HNSW index whose deleted passages stay in its graph as removed rows, against
the graph built again from the surviving vectors (what a deletion did before).

Real deletions remove whole documents, whose passages sit close together; the searches that
suffer are those near them (their neighbourhood in the graph is now mostly removed nodes). One
run: clustered synthetic unit vectors (``--centres`` cluster centres, so that whole clusters can
be removed as a document's passages would be); for each share of removed rows, the recall@10
and @100 against an exact search of the survivors, of queries near removed clusters and near
kept ones, for the marked rows (``DenseIndex.without``) and for a fresh graph.

With ``--squad FILE`` the vectors are real instead: the paragraphs of a SQuAD file's first
``--articles`` articles embedded with the default embedder (all-MiniLM-L6-v2), an article
standing for a document (removed whole), and the queries are its questions (embedded too):
questions about removed articles and about kept ones. Use training data (the SQuAD 1.1 train
set), never the evaluation articles.

    python benchmarks/bench_removed.py --vectors 40000 --out FILE.json
    python benchmarks/bench_removed.py --squad ../shared/data/squad1-train/train-v1.1.json.gz \
        --articles 100 --out FILE.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's citeqa, not the one installed (a worktree's)

from benchmarks._args import above  # noqa: E402
from citeqa.retrieval.dense import MAX_REMOVED_FRACTION, DenseIndex, DenseSpec  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(index: DenseIndex, exact: DenseIndex, queries: np.ndarray, k: int) -> float:
    found, _ = index.search(queries, k)
    truth, _ = exact.search(queries, k)
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def squad_vectors(path: Path, articles: int, per_article: int,
                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Unit vectors of the paragraphs of ``path``'s first ``articles`` articles, the article
    of each, and per article the vectors of up to ``per_article`` of its questions."""
    from citeqa.config import preset
    from citeqa.retrieval.embed import load_embedder

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"][:articles]
    texts, label, questions = [], [], []
    for a, article in enumerate(data):
        asked = []
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            label.append(a)
            asked += [q["question"] for q in paragraph["qas"]]
        questions.append(asked[:per_article])
    cfg = preset("default").retrieval
    embedder = load_embedder(cfg.embedder, cpu_dtype=cfg.cpu_dtype)
    t = time.perf_counter()
    x = unit(np.asarray(embedder.embed(texts, batch_size=32), dtype=np.float32))
    q = [unit(np.asarray(embedder.embed(qs), dtype=np.float32)) for qs in questions]
    print(f"{len(texts):,} paragraphs of {len(data)} articles and {sum(map(len, q)):,} "
          f"questions embedded in {time.perf_counter() - t:.0f} s", flush=True)
    return x, np.asarray(label), q


def removed_share(text: str) -> float:
    """--shares: a share the graph is kept for (past MAX_REMOVED_FRACTION it is rebuilt)."""
    share = above(0)(text)
    if share > MAX_REMOVED_FRACTION:
        raise argparse.ArgumentTypeError(f"{text}: past {MAX_REMOVED_FRACTION} a removal builds "
                                         "the graph again, so nothing removed is measured")
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=400)
    parser.add_argument("--shares", type=removed_share, nargs="+",
                        default=[0.1, MAX_REMOVED_FRACTION],
                        help=f"shares of the vectors removed, each in (0, {MAX_REMOVED_FRACTION}]"
                             " (past it a removal builds the graph again)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--squad", type=Path, default=None,
                        help="real vectors: a SQuAD JSON file (.json or .json.gz)")
    parser.add_argument("--articles", type=int, default=100, help="--squad: articles used")
    parser.add_argument("--per-article", type=int, default=10,
                        help="--squad: questions embedded per article (the queries' pool)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    if args.squad is not None:
        x, label, asked = squad_vectors(args.squad, args.articles, args.per_article)
        args.vectors, args.dim = x.shape
        args.centres = int(label.max()) + 1

        def queries(clusters: np.ndarray) -> np.ndarray:  # questions of those articles
            pool = np.concatenate([asked[c] for c in clusters])
            return pool[rng.choice(len(pool), min(args.queries, len(pool)), replace=False)]
    else:
        centres = rng.standard_normal((args.centres, args.dim))
        label = rng.integers(0, args.centres, args.vectors)
        x = unit(centres[label] + 0.35 * rng.standard_normal((args.vectors, args.dim)))

        def queries(clusters: np.ndarray) -> np.ndarray:  # near those clusters' centres
            picks = rng.choice(clusters, args.queries)
            return unit(centres[picks] + 0.35 * rng.standard_normal((args.queries, args.dim)))
    spec = DenseSpec(kind="hnsw")
    t = time.perf_counter()
    graph = DenseIndex.build(x, spec=spec)
    print(f"{args.vectors:,} vectors of {args.dim} dims, HNSW built in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    unit_name = "article" if args.squad is not None else "cluster"
    results = []
    for share in args.shares:
        order = rng.permutation(args.centres)
        # whole clusters removed until the share is reached (at most it)
        sizes = np.bincount(label, minlength=args.centres)[order]
        gone_clusters = order[:int(np.searchsorted(np.cumsum(sizes), share * args.vectors,
                                                   side="right"))]
        kept_clusters = order[len(gone_clusters):]
        gone = np.flatnonzero(np.isin(label, gone_clusters))
        keep = np.setdiff1d(np.arange(args.vectors), gone)
        marked = graph.without(gone)
        assert marked.index is graph.index, "past the share that builds the graph again"
        t = time.perf_counter()
        fresh = DenseIndex.build(x[keep], spec=spec)
        fresh_s = time.perf_counter() - t
        exact = DenseIndex.build(x[keep])
        row: dict[str, float] = {"removed_share": len(gone) / args.vectors,
                                 "fresh_build_s": fresh_s}
        for where, clusters in (("near_removed", gone_clusters), ("near_kept", kept_clusters)):
            q = queries(clusters)
            for k in (10, 100):
                row[f"{where}_marked_r{k}"] = recall(marked, exact, q, k)
                row[f"{where}_fresh_r{k}"] = recall(fresh, exact, q, k)
        results.append(row)
        print(f"{row['removed_share']:.1%} removed (whole {unit_name}s): recall@10 / @100 "
              f"near removed {unit_name}s {row['near_removed_marked_r10']:.3f} / "
              f"{row['near_removed_marked_r100']:.3f} with marked rows, "
              f"{row['near_removed_fresh_r10']:.3f} / {row['near_removed_fresh_r100']:.3f} with "
              f"a fresh graph ({fresh_s:.1f} s to build); near kept {unit_name}s "
              f"{row['near_kept_marked_r10']:.3f} / {row['near_kept_marked_r100']:.3f} vs "
              f"{row['near_kept_fresh_r10']:.3f} / {row['near_kept_fresh_r100']:.3f}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"vectors": args.vectors, "dim": args.dim,
                                        "centres": args.centres,
                                        "source": str(args.squad or "synthetic clusters"),
                                        "machine":
                                        platform.processor() or platform.machine(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
