"""Answer quality of the cited generator on SQuAD 2.0, constrained vs unconstrained quotes.

For a fixed, seeded sample of the answerable questions of the EVAL articles (never tuned on),
retrieves passages with the hybrid index, generates one greedy cited answer per question with
the default config, and reports per mode:

- answer EM / F1 (official SQuAD normalisation, ``citeqa.evals.metrics``);
- quote_has_answer: share whose verified quote contains a gold answer (normalised substring);
- quote_valid: share of returned quotes with ``document.text[start:end] == quote.text`` (must be
  1.0: the verifier only returns such quotes);
- verified: share of questions with a verified quote; format_ok: share whose output parses;
- raw_not_verbatim (unconstrained mostly): share of parsed outputs whose raw quote is not a
  substring of the passage window it cites.

    python evals/generation_quality.py [--limit 100] [--threads 2] [--batch 4]

Writes evals/results/generation_quality.json and prints a table. Importable: ``evaluate``
runs one mode over given questions and returns per-question records plus a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from citeqa.compute import CPU_DTYPES  # noqa: E402
from citeqa.config import GenerationConfig, RetrievalConfig, Settings  # noqa: E402
from citeqa.errors import OutputFormatError  # noqa: E402
from citeqa.evals.metrics import exact_match, f1, is_correct  # noqa: E402
from citeqa.evals.squad import QAItem, articles_for_split, load_squad_questions  # noqa: E402
from citeqa.generation.cited import CitedGenerator, GenerationItem  # noqa: E402
from citeqa.generation.parse import parse_output  # noqa: E402
from citeqa.generation.prompt import build_messages  # noqa: E402
from citeqa.text import normalize_answer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "squad2"
INDEX = ROOT / ".cache" / "squad-eval-index"
OUT = ROOT / "evals" / "results" / "generation_quality.json"
SEED = 13


@dataclass(frozen=True)
class Record:
    """One question's outcome in one mode."""

    id: str
    question: str
    golds: list[str]
    answer: str
    raw: str
    em: float
    f1: float
    format_ok: bool
    verified: bool  # a verified quote came back
    quote_valid: bool | None  # document.text[start:end] == quote.text (None: no quote)
    quote_has_answer: bool
    raw_verbatim: bool | None  # parsed raw quote is inside its cited window (None: unparsed)
    latency_ms: float  # this question's share of its batch's wall time
    supported: bool = False  # the answer stands verbatim in its verified quote
    right: bool = False  # the correctness rule: F1 >= 0.5 with a gold answer, verified quote


def sample_questions(path: Path, split: str, limit: int, seed: int = SEED) -> list[QAItem]:
    """A fixed seeded sample of ``limit`` answerable questions of ``split``'s articles."""
    items = [q for q in load_squad_questions(path, articles_for_split(split)) if q.answerable]
    items.sort(key=lambda q: q.id)
    return random.Random(seed).sample(items, min(limit, len(items)))


def contains_answer(text: str, golds: Sequence[str]) -> bool:
    """A gold answer (normalised) occurs in ``text`` (normalised)."""
    norm = f" {normalize_answer(text)} "
    return any(g.strip() and f" {normalize_answer(g)} " in norm for g in golds)


def _raw_verbatim(raw: str, windows: list[str], multiline: bool) -> bool | None:
    try:
        parsed = parse_output(raw, len(windows), multiline_quote=multiline)
    except OutputFormatError:
        return None
    return parsed.quote.strip() in windows[parsed.passage_number - 1]


def evaluate(
    generator: CitedGenerator,
    retriever,
    questions: Sequence[QAItem],
    *,
    constrain: bool,
    batch: int = 1,
    progress: bool = True,
) -> tuple[list[Record], dict[str, float]]:
    """Run one mode over ``questions``; return per-question records and their summary."""
    cfg = generator.cfg
    records: list[Record] = []
    bar = tqdm(total=len(questions), disable=not progress, desc=f"constrain={constrain}")
    for at in range(0, len(questions), batch):
        chunk = questions[at : at + batch]
        hits = [retriever.search(q.question, k=cfg.top_k_passages) for q in chunk]
        t0 = time.perf_counter()
        gens = generator.generate_many(
            [GenerationItem(q.question, h, retriever.document, 1)
             for q, h in zip(chunk, hits, strict=True)],
            constrain=constrain,
        )
        share = (time.perf_counter() - t0) * 1000 / len(chunk)
        for q, h, g in zip(chunk, hits, gens, strict=True):
            windows = [p.text for p in build_messages(q.question, h, cfg)[1]]
            c = g.candidates[0] if g.candidates else None
            right = c is not None and is_correct(c.answer, q.answers,
                                                 quote_valid=c.quote is not None)
            answer = c.answer if c else ""
            quote = c.quote if c else None
            valid = None
            if quote is not None:
                valid = retriever.document(quote.doc_id).text[quote.start : quote.end] == quote.text
            records.append(Record(
                id=q.id, question=q.question, golds=list(q.answers), answer=answer,
                raw=c.raw if c else "", em=exact_match(answer, q.answers),
                f1=f1(answer, q.answers), format_ok=bool(answer), verified=quote is not None,
                quote_valid=valid,
                quote_has_answer=quote is not None and contains_answer(quote.text, q.answers),
                raw_verbatim=(_raw_verbatim(c.raw, windows, constrain)
                              if c else None),
                supported=bool(c) and c.supported, right=right,
                latency_ms=share,
            ))
        bar.update(len(chunk))
    bar.close()
    return records, summarize(records)


def summarize(records: Sequence[Record]) -> dict[str, float]:
    n = max(len(records), 1)
    quotes = [r for r in records if r.quote_valid is not None]
    parsed = [r for r in records if r.raw_verbatim is not None]
    return {
        "questions": len(records),
        "em": sum(r.em for r in records) / n,
        "f1": sum(r.f1 for r in records) / n,
        "quote_has_answer": sum(r.quote_has_answer for r in records) / n,
        "supported": sum(r.supported for r in records) / n,
        "right": sum(r.right for r in records) / n,
        "verified": sum(r.verified for r in records) / n,
        "quote_valid": sum(bool(r.quote_valid) for r in quotes) / len(quotes) if quotes else 1.0,
        "format_ok": sum(r.format_ok for r in records) / n,
        "raw_not_verbatim": (
            sum(not r.raw_verbatim for r in parsed) / len(parsed) if parsed else 0.0
        ),
        "median_ms_per_question": statistics.median(r.latency_ms for r in records)
        if records else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--index", type=Path, default=INDEX)
    ap.add_argument("--split", default="eval", help="article split (eval; never tune on it)")
    ap.add_argument("--limit", type=int, default=100, help="questions (a fixed seeded sample)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="questions generated per batch")
    ap.add_argument("--modes", default="constrained,unconstrained")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--cpu-dtype", default=GenerationConfig.cpu_dtype,
                    choices=CPU_DTYPES, help="CPU compute format")
    ap.add_argument("--answer-mode", default=GenerationConfig.answer_mode,
                    choices=("span", "free"), help="output format (span: answer from its quote)")
    ap.add_argument("--adapter", default="packaged",
                    help="generator adapter: packaged (the shipped one), none (base), or a dir")
    args = ap.parse_args()

    import faiss
    import torch

    from citeqa.generation.factory import build_backend
    from citeqa.retrieval import HybridRetriever

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    qa_path = args.data / "qa.json"
    if not qa_path.is_file():
        sys.exit(f"no SQuAD data at {args.data} (expected ../shared/data/squad2 beside the repo)")
    if not (args.index / "manifest.json").is_file() and not args.index.is_dir():
        sys.exit(f"no index at {args.index}; build it with: citeqa index build {qa_path} "
                 f"{args.data / 'distractors.json'} --out {args.index}")
    cfg = GenerationConfig(adapter=args.adapter, cpu_dtype=args.cpu_dtype, threads=args.threads,
                           answer_mode=args.answer_mode)
    retriever = HybridRetriever.open(args.index, RetrievalConfig())
    backend = build_backend(cfg, Settings().cache_dir)
    questions = sample_questions(qa_path, args.split, args.limit, args.seed)
    sample_note = (f"fixed seeded sample (seed {args.seed}) of {len(questions)} answerable "
                   f"questions of the {args.split} articles {list(articles_for_split(args.split))}")
    print(sample_note)  # noqa: T201

    report: dict = {
        "task": "cited generation quality on SQuAD 2.0 answerable questions (greedy, n=1)",
        "sample": sample_note,
        "model": backend.model_id,
        "index": str(args.index),
        "generation_config": asdict(cfg),
        "threads": args.threads,
        "batch": args.batch,
        "machine": platform.platform(),
        "modes": {},
    }
    for mode in args.modes.split(","):
        constrain = mode == "constrained"
        gen = CitedGenerator(backend, replace(cfg, constrain_quote=constrain))
        records, summary = evaluate(gen, retriever, questions, constrain=constrain,
                                    batch=args.batch)
        report["modes"][mode] = {"summary": summary, "records": [asdict(r) for r in records]}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    keys = ["em", "f1", "right", "quote_has_answer", "supported", "verified", "quote_valid",
            "format_ok", "raw_not_verbatim", "median_ms_per_question"]
    print(f"{'mode':<14}" + "".join(f"{k:>24}" for k in keys))  # noqa: T201
    for mode, res in report["modes"].items():
        s = res["summary"]
        print(f"{mode:<14}" + "".join(f"{s[k]:>24.3f}" for k in keys))  # noqa: T201
    print(f"wrote {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
