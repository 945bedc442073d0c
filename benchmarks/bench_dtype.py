"""What bf16 buys on this CPU, in one run: prefill, a decoding step, embedding, training steps,
and how often bf16 batching changes a greedy answer. On a CPU whose probe says bf16 does not
pay (no AVX-512 BF16 / AMX: bf16 is emulated, ~100x slower) only fp32 and fp16w are timed
unless ``--formats`` asks for bf16.

    python benchmarks/bench_dtype.py [--threads 2] [--rounds 5] [--questions 32] [--formats auto]

Every comparison interleaves its variants round by round and reports medians, so a machine
whose speed drifts (it does, by ~15 % within an hour) hurts both sides alike. Measured:

- prefill: the decoder stack over a 440-token prompt, plain fp32 transformers against citeqa's
  bf16 model (``CpuLinear``) and its fp16w one; target bf16 >= 4x plain fp32;
- decoding: one single-token step with a ~440-token KV cache, per format; target <= 15 ms;
  bf16 is timed through transformers' forward and through ``LeanDecoder`` (``bf16-lean``, the
  path the service runs for Llama-family models), prefill too;
- embedding: MiniLM over eval passages (256 tokens at most), passages/s fp32 vs bf16;
- training: one optimizer step of LoRA SFT on SmolLM2 (4 examples of ~450 tokens) and one of a
  MiniLM cross-encoder (32 pairs of 256 tokens), fp32 against bf16 autocast (``--rounds`` // 2
  rounds, at least 2, after a warm-up step of each);
- bf16 rounding: greedy answers of ``--questions`` eval questions generated alone, 4 at a time,
  and without speculative drafts; how many differ from alone-with-drafts (the default).

The batching check reads the SQuAD eval index (``.cache/squad-eval-index``; build it with
``citeqa index build ../shared/data/squad2/qa.json ../shared/data/squad2/distractors.json --out
.cache/squad-eval-index``, or pass ``--questions 0``). Writes ``--out`` (default a scratch file
under .cache/bench/).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a scratch file by default: the committed figures in evals/results/ change only when --out
# names them
OUT = ROOT / ".cache" / "bench" / "bench_dtype.json"
from benchmarks._args import at_least  # noqa: E402
from citeqa.config import Settings  # noqa: E402

CACHE = Settings().cache_dir  # CITEQA_CACHE_DIR, as the service reads it


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each variant's measurement, the variants taken in turn."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def generator_models(formats: tuple[str, ...]):
    """Plain fp32 transformers, citeqa fp16w and citeqa bf16 models of the packaged SmolLM2
    (those of ``formats``)."""
    import torch

    from citeqa.generation.cpu_linear import cast_parameters, install_cpu_linears
    from citeqa.generation.models import load_model, store_linear_weights_fp16

    plain, tokenizer, _ = load_model("smollm2", CACHE, device="cpu")
    models = {"fp32": plain}
    if "fp16w" in formats:
        models["fp16w"] = copy.deepcopy(plain)
        store_linear_weights_fp16(models["fp16w"])
    if "bf16" in formats:
        models["bf16"] = copy.deepcopy(plain)
        cast_parameters(models["bf16"], torch.bfloat16)
        install_cpu_linears(models["bf16"].get_decoder())
    return models, tokenizer


def prompt_ids(tokenizer, n: int = 440) -> list[int]:
    from evals.generation_quality import DATA, sample_questions

    items = sample_questions(DATA / "qa.json", "eval", 8)
    text = " ".join(q.context for q in items)
    return tokenizer(text)["input_ids"][:n]


def bench_generator(rounds: int, formats: tuple[str, ...]) -> dict[str, object]:
    import torch
    from transformers import DynamicCache

    from citeqa.generation.kv import with_cache_keyword
    from citeqa.generation.lean import LeanDecoder

    models, tokenizer = generator_models(formats)
    ids = torch.tensor([prompt_ids(tokenizer)])
    # each format through transformers' forward; bf16 also through LeanDecoder, as served
    decoders = {name: (m, with_cache_keyword(m.get_decoder())) for name, m in models.items()}
    if "bf16" in models:
        decoders["bf16-lean"] = (models["bf16"], LeanDecoder(models["bf16"].get_decoder()))

    def prefill(name: str) -> Callable[[], float]:
        model, decoder = decoders[name]

        def run() -> float:
            with torch.inference_mode():
                cache = DynamicCache(config=model.config)
                return timed(lambda: decoder(input_ids=ids, cache=cache, use_cache=True))
        return run

    def decode_step(name: str) -> Callable[[], float]:
        model, decoder = decoders[name]
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            decoder(input_ids=ids, cache=cache, use_cache=True)
        length = ids.shape[1]

        def run() -> float:
            nonlocal length
            times = []
            with torch.inference_mode():
                for _ in range(8):
                    step = torch.tensor([[length % 1000 + 100]])
                    where = torch.tensor([[length]])
                    times.append(timed(lambda step=step, where=where: decoder(
                        input_ids=step, cache=cache, use_cache=True,
                        position_ids=where)))
                    length += 1
            cache.crop(-8)  # back to the prompt alone
            length = ids.shape[1]
            return statistics.median(times)
        return run

    for name in decoders:  # warm-up: kernel selection, weight packing
        prefill(name)()
    pre = interleaved({k: prefill(k) for k in decoders}, rounds)
    dec = interleaved({k: decode_step(k) for k in decoders}, rounds)
    lean = "bf16-lean" in pre
    return {
        "prompt_tokens": int(ids.shape[1]),
        "prefill_ms": pre,
        "prefill_speedup_bf16_vs_plain_fp32": pre["fp32"] / pre["bf16"] if "bf16" in pre else None,
        "prefill_speedup_bf16_lean_vs_plain_fp32": pre["fp32"] / pre["bf16-lean"] if lean else None,
        "decode_step_ms": dec,
        "decode_step_lean_vs_transformers_bf16": dec["bf16-lean"] / dec["bf16"] if lean else None,
    }


def bench_embedding(rounds: int, formats: tuple[str, ...]) -> dict[str, object]:
    from citeqa.retrieval.embed import MiniLMEmbedder
    from evals.generation_quality import DATA, sample_questions

    passages = [q.context for q in sample_questions(DATA / "qa.json", "eval", 64)]
    # fp32 as before bf16 (torch's product); both through transformers' forward
    # (bench_retrieval.py times the served embedder, LeanEncoder included, against fp32)
    embedders = {d: MiniLMEmbedder(cpu_dtype=d, fp32_kernel="torch", lean=False)
                 for d in ("fp32", "bf16") if d in formats}
    vectors = {d: e.embed(passages[:8]) for d, e in embedders.items()}  # load + warm up
    ms = interleaved({d: (lambda e=e: timed(lambda: e.embed(passages)))
                      for d, e in embedders.items()}, rounds)
    import numpy as np

    full = {d: e.embed(passages) for d, e in embedders.items()}
    del vectors
    bf16 = "bf16" in full
    return {
        "passages": len(passages),
        "passages_per_s": {d: len(passages) / (v / 1000) for d, v in ms.items()},
        "speedup_bf16": ms["fp32"] / ms["bf16"] if bf16 else None,
        "dtype_loaded": {d: e.dtype for d, e in embedders.items()},
        "min_cosine_fp32_vs_bf16":
            float(np.min((full["fp32"] * full["bf16"]).sum(1))) if bf16 else None,
    }


def bench_training(rounds: int, formats: tuple[str, ...]) -> dict[str, object]:
    import torch

    from citeqa.compute import training_autocast
    from citeqa.generation.models import load_model
    from citeqa.training.lora import LoRAConfig, inject_lora, lora_parameters
    from citeqa.training.sft import IGNORE, target_loss

    model, tokenizer, _ = load_model("smollm2", CACHE, device="cpu")
    wrapped = inject_lora(model, LoRAConfig())
    params = lora_parameters(wrapped)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    ids = torch.tensor([prompt_ids(tokenizer, 450)] * 4)
    labels = ids.clone()
    labels[:, :400] = IGNORE
    mask = torch.ones_like(ids)

    def sft(dtype: str) -> Callable[[], float]:
        def step() -> None:
            opt.zero_grad()
            for i in range(len(ids)):
                with training_autocast("cpu", dtype):
                    loss, n = target_loss(model, ids[i : i + 1], mask[i : i + 1],
                                          labels[i : i + 1])
                (loss / n).backward()
            opt.step()
        return lambda: timed(step)

    from transformers import AutoModel

    from citeqa.retrieval.embed import minilm_dir

    encoder = AutoModel.from_pretrained(minilm_dir(), local_files_only=True)
    head = torch.nn.Linear(384, 1)
    enc_opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-5)
    enc_ids = torch.randint(1000, 20000, (32, 256))

    def cross(dtype: str) -> Callable[[], float]:
        def step() -> None:
            enc_opt.zero_grad()
            with training_autocast("cpu", dtype):
                hidden = encoder(input_ids=enc_ids).last_hidden_state[:, 0]
                logits = head(hidden).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.float(), torch.ones(32))
            loss.backward()
            enc_opt.step()
        return lambda: timed(step)

    kinds = [d for d in ("fp32", "bf16") if d in formats]
    for kind in kinds:  # warm-up of each (the fp32 baseline's first step was half its figure)
        sft(kind)()
        cross(kind)()
    sft_ms = interleaved({d: sft(d) for d in kinds}, rounds)
    cross_ms = interleaved({d: cross(d) for d in kinds}, rounds)
    bf16 = "bf16" in kinds
    return {
        "sft_step_ms (LoRA, 4 x 450 tokens)": sft_ms,
        "sft_speedup_bf16": sft_ms["fp32"] / sft_ms["bf16"] if bf16 else None,
        "cross_encoder_step_ms (MiniLM, 32 x 256 tokens)": cross_ms,
        "cross_encoder_speedup_bf16": cross_ms["fp32"] / cross_ms["bf16"] if bf16 else None,
    }


def bench_batch_divergence(questions: int) -> dict[str, object]:
    """Greedy answers in bf16, alone against 4 at a time, on eval questions."""
    from citeqa.config import Config
    from citeqa.generation.cited import CitedGenerator, GenerationItem
    from citeqa.generation.factory import build_backend
    from citeqa.retrieval import HybridRetriever
    from evals.generation_quality import DATA, INDEX, sample_questions

    cfg = Config()
    retriever = HybridRetriever.open(INDEX, cfg.retrieval)
    gen = CitedGenerator(build_backend(cfg.generation, CACHE), cfg.generation)
    items = sample_questions(DATA / "qa.json", "eval", questions)
    work = [GenerationItem(q.question, retriever.search(q.question, k=3), retriever.document, 1)
            for q in items]
    alone = [gen.generate_many([w])[0].candidates[0].raw for w in work]
    batched = [g.candidates[0].raw for at in range(0, len(work), 4)
               for g in gen.generate_many(work[at : at + 4])]
    backend = gen.backend
    drafts, backend.speculative_tokens = backend.speculative_tokens, 0
    plain = [gen.generate_many([w])[0].candidates[0].raw for w in work]
    backend.speculative_tokens = drafts
    differ = sum(a != b for a, b in zip(alone, batched, strict=True))
    spec = sum(a != b for a, b in zip(alone, plain, strict=True))
    return {"model": backend.model_id, "questions": len(work), "differ": differ,
            "share": differ / len(work), "differ_without_drafts": spec,
            "share_without_drafts": spec / len(work)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=at_least(1), default=2, help="torch threads (pinned)")
    ap.add_argument("--rounds", type=at_least(1), default=5,
                    help="rounds of each comparison (training steps: half as many, at least 2)")
    ap.add_argument("--questions", type=at_least(0), default=32,
                    help="bf16 batching check: questions (0 skips it)")
    ap.add_argument("--formats", default="auto",
                    help="comma list of fp32,fp16w,bf16 to time; auto: all three where the probe "
                         "says bf16 pays, else fp32,fp16w (emulated bf16 takes minutes a pass)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    from citeqa.allocator import keep_freed_memory
    from citeqa.compute import BF16_MIN_SPEEDUP, probe_matmul

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    torch.set_num_threads(args.threads)
    probe = probe_matmul()
    if args.formats == "auto":
        fast = probe.bf16_speedup >= BF16_MIN_SPEEDUP
        formats = ("fp32", "fp16w", "bf16") if fast else ("fp32", "fp16w")
    else:
        formats = tuple(f.strip() for f in args.formats.split(","))
        if "fp32" not in formats or not set(formats) <= {"fp32", "fp16w", "bf16"}:
            ap.error("--formats: a comma list of fp32,fp16w,bf16 that includes fp32 (the baseline)")
    from evals.generation_quality import INDEX

    batching = args.questions and "bf16" in formats
    if batching and not (INDEX / "manifest.json").is_file():  # not after minutes of timings
        ap.error(f"the bf16 batching check reads {INDEX}, which holds no index: build it (see "
                 "this script's --help) or pass --questions 0")
    report: dict[str, object] = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "probe_gflops": {"fp32": probe.fp32_gflops, "bf16": probe.bf16_gflops},
        "formats": list(formats),
    }
    report["generator"] = bench_generator(args.rounds, formats)
    report["embedding"] = bench_embedding(args.rounds, formats)
    report["training"] = bench_training(max(2, args.rounds // 2), formats)
    if batching:
        report["bf16_batching"] = bench_batch_divergence(args.questions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    g, e, t = report["generator"], report["embedding"], report["training"]
    print(f"probe: fp32 {probe.fp32_gflops:.0f}, bf16 {probe.bf16_gflops:.0f} GFLOP/s; "
        f"timed: {', '.join(formats)}")
    ratio = g["prefill_speedup_bf16_vs_plain_fp32"]
    lean = g["prefill_speedup_bf16_lean_vs_plain_fp32"]
    print("prefill ms " + ", ".join(f"{k} {v:.0f}" for k, v in g["prefill_ms"].items())
        + (f"; bf16 = {ratio:.2f}x plain fp32" if ratio else "")
        + (f", bf16-lean (as served) {lean:.2f}x" if lean else "") + " (target >= 4)")
    step = g["decode_step_lean_vs_transformers_bf16"]
    print("decode step ms " + ", ".join(f"{k} {v:.1f}" for k, v in g["decode_step_ms"].items())
        + (f"; bf16-lean / bf16 {step:.2f}" if step else "") + " (target <= 15)")
    per_s = e["passages_per_s"]
    print("embedding passages/s " + ", ".join(f"{k} {v:.1f}" for k, v in per_s.items())
        + (f"; bf16 {e['speedup_bf16']:.2f}x; min cosine {e['min_cosine_fp32_vs_bf16']:.4f}"
           if e["speedup_bf16"] else ""))
    for k, v in t.items():
        if v is not None:
            print(f"{k}: {v}")
    if batching:
        b = report["bf16_batching"]
        print(f"bf16: {b['differ']} of {b['questions']} greedy answers differ batched 4 at a "
            f"time, {b['differ_without_drafts']} without speculative drafts")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
