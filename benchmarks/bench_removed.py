"""Recall of an HNSW index whose deleted passages stay in its graph as removed rows, against
the graph built again from the surviving vectors (what a deletion did before).

Real deletions remove whole documents, whose passages sit close together; the searches that
suffer are those near them (their neighbourhood in the graph is now mostly removed nodes). One
run: clustered synthetic unit vectors (``--centres`` cluster centres, so that whole clusters can
be removed as a document's passages would be); for each share of removed rows, the recall@10
and @100 against an exact search of the survivors, of queries near removed clusters and near
kept ones, for the marked rows (``DenseIndex.without``) and for a fresh graph.

    python benchmarks/bench_removed.py --vectors 40000 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's citeqa, not the one installed (a worktree's)

from citeqa.retrieval.dense import MAX_REMOVED_FRACTION, DenseIndex, DenseSpec  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(index: DenseIndex, exact: DenseIndex, queries: np.ndarray, k: int) -> float:
    found, _ = index.search(queries, k)
    truth, _ = exact.search(queries, k)
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=400)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, MAX_REMOVED_FRACTION])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim))
    label = rng.integers(0, args.centres, args.vectors)
    x = unit(centres[label] + 0.35 * rng.standard_normal((args.vectors, args.dim)))
    spec = DenseSpec(kind="hnsw")
    t = time.perf_counter()
    graph = DenseIndex.build(x, spec=spec)
    print(f"{args.vectors:,} vectors of {args.dim} dims, HNSW built in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
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
            picks = rng.choice(clusters, args.queries)
            q = unit(centres[picks] + 0.35 * rng.standard_normal((args.queries, args.dim)))
            for k in (10, 100):
                row[f"{where}_marked_r{k}"] = recall(marked, exact, q, k)
                row[f"{where}_fresh_r{k}"] = recall(fresh, exact, q, k)
        results.append(row)
        print(f"{row['removed_share']:.1%} removed (whole clusters): recall@10 / @100 near "
              f"removed clusters {row['near_removed_marked_r10']:.3f} / "
              f"{row['near_removed_marked_r100']:.3f} with marked rows, "
              f"{row['near_removed_fresh_r10']:.3f} / {row['near_removed_fresh_r100']:.3f} with "
              f"a fresh graph ({fresh_s:.1f} s to build); near kept clusters "
              f"{row['near_kept_marked_r10']:.3f} / {row['near_kept_marked_r100']:.3f} vs "
              f"{row['near_kept_fresh_r10']:.3f} / {row['near_kept_fresh_r100']:.3f}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"vectors": args.vectors, "dim": args.dim,
                                        "centres": args.centres, "machine":
                                        platform.processor() or platform.machine(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
