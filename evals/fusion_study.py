"""Which fusion of BM25 and dense rankings finds the gold SQuAD paragraph best?

Tunes on the train + calibration articles and reports every variant on the eval articles, so
the chosen default is not fitted to the figures it is judged by. Needs the squad eval index
(built by evals/retrieval_recall.py) and ../shared/data/squad2.

    python evals/fusion_study.py --index .cache/squad-eval-index
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.evals.squad import EVAL_ARTICLES  # noqa: E402
from citeqa.retrieval import HybridRetriever  # noqa: E402
from citeqa.retrieval.fusion import rrf  # noqa: E402
from evals.retrieval_recall import load_paragraphs, questions  # noqa: E402

DEPTH = 50


def weighted_rrf(bm25: list[int], dense: list[int], k: int, w: float) -> list[int]:
    """RRF with the BM25 list weighted by ``w`` (the dense list by 1)."""
    scores: dict[int, float] = {}
    for weight, ranking in ((w, bm25), (1.0, dense)):
        for rank, pid in enumerate(ranking, 1):
            scores[pid] = scores.get(pid, 0.0) + weight / (k + rank)
    return [p for p, _ in sorted(scores.items(), key=lambda x: -x[1])]


def recall(ranked: list[list[int]], golds: list[set[int]], k: int) -> float:
    return float(np.mean([bool(set(r[:k]) & g) for r, g in zip(ranked, golds, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=ROOT / ".cache" / "squad-eval-index")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "squad2")
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results" / "fusion_study.json")
    args = ap.parse_args()

    retriever = HybridRetriever.open(args.index)
    _, by_source = load_paragraphs([args.data / "qa.json", args.data / "distractors.json"])
    qs = questions(args.data / "qa.json", by_source)
    pids_of: dict[str, set[int]] = {}
    for p in retriever.index.passages:
        pids_of.setdefault(p.doc_id, set()).add(p.passage_id)
    rows = []
    for question, gold, article in tqdm(qs, desc="rankings"):
        rows.append(
            (
                list(retriever._bm25(question, DEPTH)),
                list(retriever._dense(question, DEPTH)),
                pids_of[gold],
                article in EVAL_ARTICLES,
            )
        )
    variants = {"bm25": lambda b, d: b, "dense": lambda b, d: d}
    for k in (10, 60):
        variants[f"rrf k={k}"] = lambda b, d, k=k: [p for p, _ in rrf([b, d], k=k)]
        for w in (1.5, 2.0, 3.0):
            variants[f"rrf k={k} w_bm25={w}"] = lambda b, d, k=k, w=w: weighted_rrf(b, d, k, w)
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split, is_eval in (("tune (train+calibration)", False), ("eval", True)):
        part = [r for r in rows if r[3] == is_eval]
        golds = [r[2] for r in part]
        result[split] = {}
        for name, fuse in variants.items():
            ranked = [fuse(b, d) for b, d, _, _ in part]
            result[split][name] = {f"recall@{k}": recall(ranked, golds, k) for k in (1, 5, 20)}
    print(f"{'variant':26s}" + "".join(f"{s[:5]:>8s}@1 @5 @20" for s in result))
    for name in variants:
        cells = ""
        for split in result:
            r = result[split][name]
            cells += f"   {r['recall@1']:.3f} {r['recall@5']:.3f} {r['recall@20']:.3f}"
        print(f"{name:26s}{cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"questions": len(rows), "results": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
