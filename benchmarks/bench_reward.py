"""How long the verifier takes to score one question's candidates, as the pipeline calls it.

    python benchmarks/bench_reward.py [--reward DIR] [--threads 2] [--candidates 1,4,8]

For eval-article questions of the SQuAD 2.0 subset: their top passages are retrieved and each
question gets 8 candidates quoting one of its passages' sentences (the verifier's cost does not
depend on who wrote them); ``VerifierScorer.score`` is timed for 1, 4 and 8 of them, with the
passage around each quote as served. Target: 8 candidates in <= 60 ms on 2 cores (p50).
For the largest size it also splits the time between the verifier and the answerability reader
and sets each beside its floor on this CPU: the FLOPs of its linear layers over the padded
tokens at the bf16 (or fp32) matmul rate that ``citeqa.compute``'s probe measures.
Writes evals/results/bench_reward.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.reward.scorer import DEFAULT_DIR  # noqa: E402
from evals.generation_quality import DATA, INDEX, sample_questions  # noqa: E402

OUT = ROOT / "evals" / "results" / "bench_reward.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reward", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--candidates", default="1,4,8")
    ap.add_argument("--index", type=Path, default=INDEX)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    from citeqa.config import RetrievalConfig
    from citeqa.retrieval import HybridRetriever
    from citeqa.reward.scorer import VerifierScorer
    from citeqa.text import sentence_spans
    from citeqa.types import Candidate, Quote

    torch.set_num_threads(args.threads)
    scorer = VerifierScorer(args.reward)
    retriever = HybridRetriever.open(args.index, RetrievalConfig())
    questions = sample_questions(DATA / "qa.json", "eval", args.questions)
    work = []
    for q in questions:
        cands = []
        for hit in retriever.search(q.question, k=3):
            doc = retriever.document(hit.passage.doc_id)
            for s, e in sentence_spans(hit.passage.text)[:4]:
                start, end = hit.passage.start + s, hit.passage.start + e
                quote = Quote(doc.text[start:end], doc.doc_id, doc.title, doc.source, start, end)
                cands.append(Candidate(" ".join(quote.text.split()[:3]), quote))
        work.append((q.question, (cands * 8)[:8]))
    scorer.score(work[0][0], work[0][1], retriever.document)  # warm-up
    sizes = [int(c) for c in args.candidates.split(",")]
    results = {}
    for size in sizes:
        times = []
        for question, cands in work:
            t0 = time.perf_counter()
            scorer.score(question, cands[:size], retriever.document)
            times.append((time.perf_counter() - t0) * 1000)
        results[str(size)] = {"p50_ms": statistics.median(times),
                              "p95_ms": sorted(times)[int(0.95 * (len(times) - 1))]}
    parts = split_time(scorer, work, max(sizes), retriever.document)
    report = {"reward": str(args.reward), "dtype": scorer.dtype, "threads": args.threads,
              "machine": platform.platform(), "questions": len(work), "by_candidates": results,
              f"parts_at_{max(sizes)}": parts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for size, r in results.items():
        print(f"{size} candidates: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms")  # noqa: T201
    for name, p in parts.items():
        print(f"  {name}: p50 {p['p50_ms']:.1f} ms for {p['tokens_p50']:.0f} padded tokens; "  # noqa: T201
              f"floor {p['floor_ms_p50']:.1f} ms at {p['gflops']:.0f} GFLOP/s "
              f"({p['p50_ms'] / p['floor_ms_p50']:.1f}x it)")
    print(f"target: 8 candidates <= 60 ms; wrote {args.out}")  # noqa: T201


def split_time(scorer, work, size: int, documents) -> dict[str, dict[str, float]]:
    """p50 time of each cross-encoder alone on ``size`` candidates per question, with its floor:
    2 x (its linear layers' weights) x (padded tokens) FLOPs at the probed matmul rate."""
    import torch

    from citeqa.compute import probe_matmul
    from citeqa.reward import answerability, verifier
    from citeqa.reward.scorer import judged

    probe = probe_matmul()
    rate = probe.bf16_gflops if scorer.dtype == "bf16" else probe.fp32_gflops
    models = {"verifier": (scorer.model, scorer.tokenizer, scorer.max_tokens,
                           lambda tok, xs, n: verifier.encode(tok, xs, max_tokens=n),
                           scorer.model.predict)}
    if scorer.answerability is not None:
        a = scorer.answerability
        models["answerability reader"] = (a.model, a.tokenizer, a.max_tokens, answerability.encode,
                                          a.model)
    out = {}
    for name, (model, tokenizer, max_tokens, encode, run) in models.items():
        weights = sum(m.in_features * m.out_features for m in model.encoder.encoder.modules()
                      if hasattr(m, "in_features"))  # nn.Linear, or CpuLinear in bf16
        times, tokens = [], []
        for question, cands in work:
            items = [judged(question, c, documents) for c in cands[:size]]
            t0 = time.perf_counter()
            batch = encode(tokenizer, items, max_tokens)
            with torch.inference_mode():
                run(batch)
            times.append((time.perf_counter() - t0) * 1000)
            ids = batch.input_ids if hasattr(batch, "input_ids") else batch["input_ids"]
            tokens.append(ids.numel())
        floor = [2 * weights * n / rate / 1e6 for n in tokens]
        out[name] = {"p50_ms": statistics.median(times), "tokens_p50": statistics.median(tokens),
                     "floor_ms_p50": statistics.median(floor), "gflops": rate}
    return out


if __name__ == "__main__":
    main()
