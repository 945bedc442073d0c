"""End-to-end latency of one question (retrieve -> prefill -> decode -> verify -> score) with the
default models, against the prefill time of the question's own prompt; and batch throughput.

    python benchmarks/bench_ask.py [--threads 2] [--questions 50] [--concurrency 1,4,8]

Questions: a fixed seeded sample of answerable questions of the EVAL articles, asked one at a
time through ``Pipeline.ask`` after ``--warmup`` warm-up questions, with the reward model that
``citeqa ask`` and the service load (``--reward``; ``none`` leaves scoring out). For each
question the prompt it was shown is then prefilled alone (no decoding) by the served model's
weights through transformers' forward (``prefill_own``: not ``LeanDecoder``, which the service
runs for Llama-family models in bf16) and by a plain fp32 transformers model
(``prefill_plain_fp32``); the target is
a p50 total <= 0.8 x the plain fp32 prefill. Throughput: the same questions generated ``c`` at
a time with ``CitedGenerator.generate_many`` (one backend batch), in generated tokens per second.
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
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.compute import CPU_DTYPES  # noqa: E402
from citeqa.config import Config, Settings  # noqa: E402
from citeqa.evals.metrics import percentile  # noqa: E402
from citeqa.generation.cited import CitedGenerator, GenerationItem  # noqa: E402
from citeqa.generation.kv import with_cache_keyword  # noqa: E402
from citeqa.generation.prompt import build_messages  # noqa: E402
from evals.generation_quality import DATA, INDEX, sample_questions  # noqa: E402

# a scratch file by default: the committed figures in evals/results/ change only when --out
# names them
OUT = ROOT / ".cache" / "bench" / "bench_ask.json"


def prefill_only_ms(model, ids: list[int], repeats: int = 1) -> float:
    """Best-of-``repeats`` wall time of one pass of ``model``'s decoder stack over ``ids``."""
    import torch
    from transformers import DynamicCache

    batch = torch.tensor([ids], dtype=torch.long)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            with_cache_keyword(model.get_decoder())(input_ids=batch, cache=cache, use_cache=True)
            best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch/faiss threads (pinned)")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--split", default="eval", choices=("train", "calibration", "eval"),
                    help="articles the questions come from (calibration: to choose settings "
                         "without looking at the eval articles)")
    ap.add_argument("--concurrency", default="1,4,8", help="batch sizes for throughput ('' = skip)")
    ap.add_argument("--throughput-questions", type=int, default=8)
    ap.add_argument("--index", type=Path, default=INDEX)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--speculative", type=int, default=None,
                    help="prompt-lookup draft tokens (default: GenerationConfig's)")
    ap.add_argument("--adapter", default=None, help="packaged | none | a dir (default: config's)")
    ap.add_argument("--cpu-dtype", default=None, choices=CPU_DTYPES,
                    help="CPU compute format (default: config's, auto)")
    ap.add_argument("--reward", default="default",
                    help="reward model as served: default | a dir | none (no scoring)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="prefill the system turn for every prompt instead of reusing its cache")
    ap.add_argument("--no-lean", action="store_true",
                    help="run the decoder with transformers' forward, not citeqa's LeanDecoder")
    ap.add_argument("--no-quote-guess", action="store_true",
                    help="do not draft a span-mode quote from QuoteStage.guess")
    args = ap.parse_args()

    import faiss
    import torch

    from citeqa.allocator import keep_freed_memory
    from citeqa.generation.factory import build_backend
    from citeqa.pipeline import Pipeline
    from citeqa.retrieval import HybridRetriever
    from citeqa.reward.scorer import load_scorer

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    cfg = Config()
    if args.speculative is not None:
        cfg = replace(cfg, generation=replace(cfg.generation,
                                              speculative_quote_tokens=args.speculative))
    if args.adapter is not None:
        cfg = replace(cfg, generation=replace(cfg.generation, adapter=args.adapter))
    if args.cpu_dtype is not None:
        cfg = replace(cfg, generation=replace(cfg.generation, cpu_dtype=args.cpu_dtype),
                      retrieval=replace(cfg.retrieval, cpu_dtype=args.cpu_dtype))
    gen_cfg = cfg.generation
    retriever = HybridRetriever.open(args.index, cfg.retrieval)
    backend = build_backend(replace(gen_cfg, threads=args.threads),
                            Settings().cache_dir,
                            reuse_prefix=not args.no_prefix_cache, lean=not args.no_lean)
    backend.quote_guess = not args.no_quote_guess
    generator = CitedGenerator(backend, gen_cfg)
    from citeqa.generation.models import load_model

    plain_fp32, _, _ = load_model(gen_cfg.model, Settings().cache_dir, device="cpu")
    reward = None if args.reward.lower() == "none" else args.reward
    scorer = load_scorer(reward, cpu_dtype=gen_cfg.cpu_dtype)
    pipeline = Pipeline(retriever, generator, cfg, scorer)
    items = sample_questions(DATA / "qa.json", args.split, args.questions + args.warmup)
    for q in items[: args.warmup]:
        pipeline.ask(q.question)

    rows = []
    for q in tqdm(items[args.warmup :], desc="ask"):
        answer = pipeline.ask(q.question)
        t = answer.timings_ms
        hits = retriever.search(q.question, k=gen_cfg.top_k_passages)
        messages, _ = build_messages(q.question, hits, gen_cfg)
        ids = backend.prompt_ids(messages)
        own = prefill_only_ms(backend.model, ids)
        plain = prefill_only_ms(plain_fp32, ids)
        tokens = t.get("tokens", 0.0)
        rows.append({
            "question": q.question,
            "total_ms": t["total_ms"],
            "retrieve_ms": t["retrieve_ms"],
            "prefill_ms": t.get("prefill_ms", 0.0),
            "decode_ms": t.get("decode_ms", 0.0),
            "score_ms": t.get("score_ms", 0.0),
            "prefill_own_ms": own,
            "ratio": t["total_ms"] / own,
            "prefill_plain_fp32_ms": plain,
            "ratio_over_plain_fp32": t["total_ms"] / plain,
            "prompt_tokens": t.get("prompt_tokens", 0.0),
            "tokens": tokens,
            "forward_passes": t.get("forward_passes", 0.0),
            "passes_per_token": t.get("forward_passes", 0.0) / max(tokens, 1.0),
            "decode_passes_per_token": (t.get("forward_passes", 1.0) - 1) / max(tokens, 1.0),
            "answer": answer.answer,
            "declined": answer.declined,
        })

    total = sum(r["total_ms"] for r in rows)
    shares = {k: sum(r[f"{k}_ms"] for r in rows) / total
              for k in ("retrieve", "prefill", "decode", "score")}
    shares["other"] = 1 - sum(shares.values())
    totals = [r["total_ms"] for r in rows]
    summary = {
        "questions": len(rows),
        "p50_total_ms": percentile(totals, 50),
        "p95_total_ms": percentile(totals, 95),
        "share": shares,
        "median_prefill_own_ms": statistics.median(r["prefill_own_ms"] for r in rows),
        "median_ratio_total_over_prefill": statistics.median(r["ratio"] for r in rows),
        "median_prefill_plain_fp32_ms": statistics.median(r["prefill_plain_fp32_ms"] for r in rows),
        "median_ratio_total_over_plain_fp32_prefill": statistics.median(
            r["ratio_over_plain_fp32"] for r in rows),
        "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in rows),
        "median_generated_tokens": statistics.median(r["tokens"] for r in rows),
        "forward_passes_per_generated_token": sum(r["forward_passes"] for r in rows)
        / max(sum(r["tokens"] for r in rows), 1.0),
        "decode_passes_per_generated_token": sum(r["forward_passes"] - 1 for r in rows)
        / max(sum(r["tokens"] for r in rows), 1.0),
    }

    throughput = {}
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    pool = items[args.warmup : args.warmup + args.throughput_questions]
    hits_of = {q.id: retriever.search(q.question, k=gen_cfg.top_k_passages) for q in pool}
    for c in levels:
        t0 = time.perf_counter()
        tokens = 0.0
        for at in range(0, len(pool), c):
            gens = generator.generate_many(
                [GenerationItem(q.question, hits_of[q.id], retriever.document, 1)
                 for q in pool[at : at + c]]
            )
            tokens += sum(cand.n_tokens for g in gens for cand in g.candidates)
        wall = time.perf_counter() - t0
        throughput[str(c)] = {"questions": len(pool), "wall_s": wall,
                              "tokens_per_s": tokens / wall, "questions_per_s": len(pool) / wall}

    report = {
        "task": "end-to-end one-question latency (Pipeline.ask, greedy, default config)",
        "sample": f"fixed seeded sample of {len(rows)} answerable {args.split}-article questions "
                  f"after {args.warmup} warm-up questions",
        "model": backend.model_id,
        "reward": getattr(scorer, "name", None),
        "threads": args.threads,
        "machine": platform.platform(),
        "generation_config": asdict(gen_cfg),
        "prefix_cache": not args.no_prefix_cache,
        "lean_decoder": getattr(backend, "lean", False),
        "quote_guess": bool(getattr(backend, "quote_guess", False)
                            and getattr(backend, "speculative_tokens", 0)),
        "summary": summary,
        "throughput_by_concurrency": throughput,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    s = summary
    print(f"p50 total {s['p50_total_ms']:.0f} ms, p95 {s['p95_total_ms']:.0f} ms; median own "  # noqa: T201
          f"prefill {s['median_prefill_own_ms']:.0f} ms; median total/prefill "
          f"{s['median_ratio_total_over_prefill']:.2f}")
    print(f"plain fp32 prefill of the same prompts: median "  # noqa: T201
          f"{s['median_prefill_plain_fp32_ms']:.0f} ms; p50 total / that = "
          f"{s['p50_total_ms'] / s['median_prefill_plain_fp32_ms']:.2f} (target <= 0.8); "
          f"median per question {s['median_ratio_total_over_plain_fp32_prefill']:.2f}")
    print("shares " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))  # noqa: T201
    print(f"forward passes per generated token {s['forward_passes_per_generated_token']:.2f}")  # noqa: T201
    for c, tp in throughput.items():
        print(f"concurrency {c}: {tp['tokens_per_s']:.1f} tokens/s, "  # noqa: T201
              f"{tp['questions_per_s']:.2f} questions/s")
    print(f"wrote {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
