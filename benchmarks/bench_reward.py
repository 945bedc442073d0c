"""How long the verifier takes to score one question's candidates, as the pipeline calls it.

    python benchmarks/bench_reward.py [--reward DIR] [--threads 2] [--candidates 1,4,8] [--compile]
                                      [--no-lean]

For eval-article questions of the SQuAD 2.0 subset: their top passages are retrieved and each
question gets 8 candidates quoting one of its passages' sentences (the verifier's cost does not
depend on who wrote them); ``VerifierScorer.score`` is timed for 1, 4 and 8 of them, with the
passage around each quote as served. Target: 8 candidates in <= 60 ms on 2 cores (p50).
For the largest size it also splits the time between the verifier and the answerability reader
and sets each beside its floor on this CPU: the FLOPs of its linear layers over the padded
tokens at the bf16 (or fp32) matmul rate that ``citeqa.compute``'s probe measures.
With ``--compile`` it also loads the reward model compiled (``CITEQA_REWARD_COMPILE``), reports
how long compiling took and how far its scores are from eager, and times the two in alternating
passes (``--rounds``).
Reads the SQuAD eval index (``--index``, default ``.cache/squad-eval-index``: see
bench_dtype.py for how to build it). Writes ``--out`` (default a scratch file under .cache/bench/).
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

from benchmarks._args import at_least  # noqa: E402
from citeqa.reward.scorer import DEFAULT_DIR  # noqa: E402
from evals.generation_quality import DATA, INDEX, sample_questions  # noqa: E402

# a scratch file by default: the committed figures in evals/results/ change only when --out
# names them
OUT = ROOT / ".cache" / "bench" / "bench_reward.json"


def candidate_counts(text: str) -> list[int]:
    """--candidates: whole numbers >= 1, comma-separated."""
    try:
        sizes = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not whole numbers, comma-separated"
                                         ) from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reward", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--questions", type=at_least(1), default=30)
    ap.add_argument("--candidates", type=candidate_counts, default="1,4,8",
                    help="candidates per question to time, comma-separated")
    ap.add_argument("--index", type=Path, default=INDEX)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--compile", action="store_true",
                    help="also time the reward model compiled (CITEQA_REWARD_COMPILE), "
                         "alternating with eager")
    ap.add_argument("--no-lean", action="store_true",
                    help="score with transformers' encoder forward, not LeanEncoder")
    ap.add_argument("--rounds", type=at_least(1), default=None,
                    help="timed passes over the questions (default 1, or 2 with --compile)")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.compile else 1

    import torch

    from citeqa.allocator import keep_freed_memory
    from citeqa.config import RetrievalConfig
    from citeqa.retrieval import HybridRetriever
    from citeqa.reward.scorer import VerifierScorer
    from citeqa.text import sentence_spans
    from citeqa.types import Candidate, Quote

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    scorer = VerifierScorer(args.reward, lean=not args.no_lean)
    retriever = HybridRetriever.open(args.index, RetrievalConfig())
    questions = sample_questions(DATA / "qa.json", "eval", args.questions)
    sizes = args.candidates
    work = []
    for q in questions:
        cands = []
        for hit in retriever.search(q.question, k=3):
            doc = retriever.document(hit.passage.doc_id)
            for s, e in sentence_spans(hit.passage.text)[:4]:
                start, end = hit.passage.start + s, hit.passage.start + e
                quote = Quote(doc.text[start:end], doc.doc_id, doc.title, doc.source, start, end)
                cands.append(Candidate(" ".join(quote.text.split()[:3]), quote))
        work.append((q.question, (cands * max(sizes))[:max(sizes)]))  # as many as timed
    scorers = {"eager": scorer}
    compile_s = None
    if args.compile:
        scorers["compiled"] = VerifierScorer(args.reward, lean=not args.no_lean)
        compile_s = scorers["compiled"].compile()
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in scorers}
    for each in scorers.values():
        each.score(work[0][0], work[0][1], retriever.document)  # warm-up
    for _ in range(args.rounds):  # the variants alternate, so that drift hits both alike
        for name, each in scorers.items():
            for size in sizes:
                for question, cands in work:
                    t0 = time.perf_counter()
                    each.score(question, cands[:size], retriever.document)
                    times[name][size].append((time.perf_counter() - t0) * 1000)
    results = {name: {str(n): {"p50_ms": statistics.median(ts),
                               "p95_ms": sorted(ts)[int(0.95 * (len(ts) - 1))]}
                      for n, ts in by_size.items()} for name, by_size in times.items()}
    parts = split_time(scorer, work, max(sizes), retriever.document)
    from citeqa.compute import fp32_kernel

    report = {"reward": str(args.reward), "name": scorer.name, "dtype": scorer.dtype,
              "fp32_kernel": fp32_kernel() if scorer.dtype == "fp32" else None,
              "lean_encoder": not args.no_lean, "threads": args.threads,
              "machine": platform.platform(), "questions": len(work), "rounds": args.rounds,
              "by_candidates": results["eager"], f"parts_at_{max(sizes)}": parts}
    if args.compile:
        report["compiled"] = {"compile_s": compile_s, "name": scorers["compiled"].name,
                              "by_candidates": results["compiled"],
                              "max_score_difference": max_difference(scorers, work, max(sizes),
                                                                     retriever.document)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for size, r in results["eager"].items():
        line = f"{size} candidates: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms"
        if args.compile:
            c = results["compiled"][size]
            line += (f"; compiled p50 {c['p50_ms']:.1f} ms, p95 {c['p95_ms']:.1f} ms "
                     f"({c['p50_ms'] / r['p50_ms']:.2f}x eager)")
        print(line)  # noqa: T201
    if args.compile:
        c = report["compiled"]
        print(f"compiled: {c['name']}; compiling and warm-up took {c['compile_s']:.1f} s; "  # noqa: T201
              f"scores differ from eager by at most {c['max_score_difference']:.1e}")
    for name, p in parts.items():
        print(f"  {name}: p50 {p['p50_ms']:.1f} ms for {p['tokens_p50']:.0f} padded tokens; "  # noqa: T201
              f"floor {p['floor_ms_p50']:.1f} ms at {p['gflops']:.0f} GFLOP/s "
              f"({p['p50_ms'] / p['floor_ms_p50']:.1f}x it)")
    print(f"target: 8 candidates <= 60 ms; wrote {args.out}")  # noqa: T201


def max_difference(scorers, work, size: int, documents) -> float:
    """The largest difference between two scorers' scores of the same candidates."""
    eager, other = scorers.values()
    return max(abs(a.score - b.score)
               for question, cands in work
               for a, b in zip(eager.score(question, cands[:size], documents),
                               other.score(question, cands[:size], documents), strict=True))


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
