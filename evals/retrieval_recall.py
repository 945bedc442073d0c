"""Retrieval recall on SQuAD 2.0: does the gold paragraph come back for answerable questions?

Builds (or reuses) an index over qa.json + distractors.json (one document per paragraph, 988 in
all) and, for every answerable question, checks whether a passage of its own paragraph is in
the top 1 / 5 / 20 for BM25 alone, dense alone, and hybrid (reciprocal-rank fusion). Prints a
table and writes evals/results/retrieval_recall.json.

    python evals/retrieval_recall.py [--index PATH] [--rebuild] [--embedder minilm|hash]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.config import RetrievalConfig  # noqa: E402
from citeqa.errors import IndexError_  # noqa: E402
from citeqa.retrieval import HybridRetriever, build_index_from_documents  # noqa: E402
from citeqa.types import Document  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "squad2"
KS = (1, 5, 20)
MODES = ("bm25", "dense", "hybrid")
SPLITS = {
    "train": {"Normans", "Computational_complexity_theory", "Huguenot", "Steam_engine",
              "1973_oil_crisis"},
    "calibration": {"European_Union_law", "Packet_switching"},
    "eval": {"Harvard_University", "Scottish_Parliament", "Imperialism", "French_and_Indian_War"},
}


def load_paragraphs(paths: list[Path]) -> tuple[list[Document], dict[str, str]]:
    """Paragraph documents (via citeqa.ingest) and a map "<path>#<title>/<p>" -> doc_id."""
    from citeqa.ingest import load_sources

    loaded = load_sources([str(p) for p in paths], progress=False)
    assert not loaded.skipped, loaded.skipped
    return loaded.documents, {d.source: d.doc_id for d in loaded.documents}


def questions(qa_path: Path, by_source: dict[str, str]) -> list[tuple[str, str, str]]:
    """(question, gold doc_id, article) for every answerable question."""
    out = []
    for article in json.loads(qa_path.read_text())["data"]:
        for p, paragraph in enumerate(article["paragraphs"]):
            gold = by_source[f"{qa_path}#{article['title']}/{p}"]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible", False):
                    out.append((qa["question"], gold, article["title"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--index", type=Path, default=ROOT / ".cache" / "squad-eval-index")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if --index loads")
    ap.add_argument("--embedder", default="minilm", choices=["minilm", "hash"])
    ap.add_argument("--threads", type=int, default=1, help="torch/faiss threads")
    default_out = ROOT / "evals" / "results" / "retrieval_recall.json"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    qa_path, distractors = args.data / "qa.json", args.data / "distractors.json"
    if not qa_path.is_file():
        sys.exit(f"SQuAD data not found at {args.data}; pass --data DIR")
    docs, by_source = load_paragraphs([qa_path, distractors])
    cfg = replace(RetrievalConfig(), embedder=args.embedder)

    t0 = time.perf_counter()
    retriever = None
    if not args.rebuild:
        try:
            retriever = HybridRetriever.open(args.index)
            if retriever.cfg != cfg or len(retriever.index.documents) != len(docs):
                print(f"{args.index} was built with other settings or data; rebuilding")
                retriever = None
        except IndexError_:
            pass
    built = retriever is None
    if retriever is None:
        summary = build_index_from_documents(docs, args.index, cfg, progress=True)
        print(f"built {summary.passages} passages from {summary.documents} paragraphs "
              f"in {summary.seconds:.1f} s")
        retriever = HybridRetriever.open(args.index)
    build_s = time.perf_counter() - t0

    qs = questions(qa_path, by_source)
    depth = max(KS)
    found: dict[str, list[int | None]] = {m: [] for m in MODES}  # rank of gold (1-based) or None
    t1 = time.perf_counter()
    for question, gold, _ in tqdm(qs, desc="questions"):
        for mode in MODES:
            hits = retriever.search(question, depth, mode=mode)
            ranks = [r for r, h in enumerate(hits, 1) if h.passage.doc_id == gold]
            found[mode].append(ranks[0] if ranks else None)
    query_s = time.perf_counter() - t1

    def recall(ranks: list[int | None]) -> dict[str, float]:
        n = max(len(ranks), 1)
        out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in KS}
        out["mrr@20"] = sum(1.0 / r for r in ranks if r is not None) / n
        return out

    results = {m: recall(found[m]) for m in MODES}
    by_split = {}
    for split, articles in SPLITS.items():
        rows = [i for i, (_, _, a) in enumerate(qs) if a in articles]
        by_split[split] = {
            "questions": len(rows),
            **{m: recall([found[m][i] for i in rows]) for m in MODES},
        }

    print(f"\n{len(qs)} answerable questions, {len(docs)} paragraphs, "
          f"{len(retriever.index.passages)} passages, embedder {args.embedder}")
    header = f"{'mode':8}" + "".join(f"{c:>11}" for c in [*(f"R@{k}" for k in KS), "MRR@20"])
    print(header)
    for m in MODES:
        r = results[m]
        print(f"{m:8}" + "".join(f"{r[f'recall@{k}']:11.3f}" for k in KS) + f"{r['mrr@20']:11.3f}")
    print(f"eval split ({by_split['eval']['questions']} questions): "
          + ", ".join(f"{m} R@5={by_split['eval'][m]['recall@5']:.3f}" for m in MODES))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": "SQuAD 2.0 answerable questions: gold paragraph in top k",
        "data": str(args.data),
        "index": str(args.index),
        "index_built_now": built,
        "questions": len(qs),
        "paragraphs": len(docs),
        "passages": len(retriever.index.passages),
        "settings": asdict(retriever.cfg),
        "results": results,
        "by_split": by_split,
        "seconds": {"build_or_load": round(build_s, 2), "queries_all_modes": round(query_s, 2)},
        "threads": args.threads,
        "machine": platform.platform(),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
