"""The local generator on a GPU: prefill, constrained decoding and batched cited generation for
Llama-family shapes from 135M to 8B parameters, with random weights; and the embedder's speed
there, as served (bf16) against fp32.

    python benchmarks/bench_gpu.py --shapes smollm2-135m qwen2.5-1.5b llama-3.1-8b

A GPU user brings a Qwen/Llama-class model directory; this measures what citeqa's transformers
backend (``HFBackend``, bf16 on CUDA) does with such a shape without carrying its weights: each
model is initialised at random on the device, with SmolLM2's tokenizer and vocabulary (49,152
tokens; Llama 3's 128k would make its LM head larger). Random weights write random answers
and quotes, held to the grammar as a trained model's are, so the per-token and per-pass times
are a real model's, while how many tokens an answer takes is not: output lengths are printed
beside every figure. A decoding pass can emit several tokens (prompt-lookup drafts, tokens the
grammar forces), so both ms per pass and ms per token are given, each the median over questions
of that question's own ratio. The device's copy bandwidth is measured first: a pass that
streams every weight once cannot beat it. Device work is timed with synchronisation; medians
of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's citeqa, not the one installed (a worktree's)

from citeqa.config import GenerationConfig  # noqa: E402
from citeqa.generation.cited import CitedGenerator, GenerationItem  # noqa: E402
from citeqa.generation.hf import HFBackend  # noqa: E402
from citeqa.generation.prompt import build_messages  # noqa: E402
from citeqa.types import Document, Hit, Passage  # noqa: E402

# (hidden, intermediate, layers, attention heads, key/value heads), as their configs give them
SHAPES = {
    "tiny": (64, 128, 2, 4, 2),
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8),
}


def documents() -> dict[str, Document]:
    """citeqa's own docs (index/corpus/), the passages every question is shown."""
    return {p.stem: Document(p.stem, p.stem, str(p), p.read_text())
            for p in sorted((ROOT / "index" / "corpus").glob("*.md"))}


def hits(docs: dict[str, Document], chars: int = 600) -> list[Hit]:
    out = []
    for i, d in enumerate(docs.values()):
        text = d.text[:chars]
        out.append(Hit(Passage(i, d.doc_id, 0, len(text), text), d.title, d.source, 1.0 / (i + 1)))
    return out


def random_model(shape: str, vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=shape != "llama-3.1-8b")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000, out


def copy_bandwidth(device: str, gib: float = 2.0, repeats: int = 10) -> float:
    """TB/s of a device-to-device copy, bytes read plus bytes written (the ceiling a decoding
    pass that streams every weight once cannot beat)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    ms, _ = timed(device, lambda: [dst.copy_(src) for _ in range(repeats)])
    return 2 * src.numel() * repeats / (ms / 1000) / 1e12


def bench_shape(shape: str, tokenizer, args) -> dict[str, object]:
    model = random_model(shape, len(tokenizer), args.device)
    params = sum(p.numel() for p in model.parameters())
    backend = HFBackend(model, tokenizer, shape)
    docs = documents()
    shown = hits(docs)[: args.passages]
    questions = [f"What does citeqa do with {w}?" for w in
                 ("quotes", "passages", "declines", "scores", "indexes", "models", "requests",
                  "documents", "answers", "offsets", "threads", "grammars")]
    gen = CitedGenerator(backend, GenerationConfig(top_k_passages=args.passages))

    def run(batch: list[str], n: int):
        items = [GenerationItem(q, shown, docs.__getitem__, n, "span") for q in batch]
        return gen.generate_many(items)

    # prefill of one prompt alone: the decoder stack over the prompt, as generate() runs it
    prompt = backend.prompt_ids(build_messages(questions[0], shown, gen.cfg)[0])
    ids = torch.tensor([prompt], device=args.device)
    with torch.inference_mode():
        decoder = model.get_decoder()
        decoder(input_ids=ids)  # warm-up
        prefill = statistics.median(timed(args.device, lambda: decoder(input_ids=ids))[0]
                                    for _ in range(args.repeats))
    run(questions[:1], 1)  # warm-up
    one = []  # per question: wall ms, output tokens, the backend's timings (one request)
    for q in questions[: args.repeats]:
        ms, [g] = timed(args.device, lambda q=q: run([q], 1))
        [c] = g.candidates
        one.append((ms, c.n_tokens, g.timings_ms))

    def median(f) -> float:  # over the questions, each figure from one question's own run
        return round(statistics.median(f(*x) for x in one), 2)

    def decode_passes(t: dict[str, float]) -> float:
        return max(t.get("forward_passes", 1.0) - 1, 1.0)  # the first pass is the prefill
    batch = questions[: args.batch]
    run(batch[:2], args.candidates)  # warm-up of the batched shapes
    batched = []
    for _ in range(args.repeats):
        ms, gens = timed(args.device, lambda: run(batch, args.candidates))
        batched.append((ms, sum(c.n_tokens for g in gens for c in g.candidates)))
    ms_batch, tokens_batch = sorted(batched)[len(batched) // 2]
    cands = len(batch) * args.candidates
    row = {
        "shape": shape, "parameters_m": round(params / 1e6, 1), "prompt_tokens": len(prompt),
        "prefill_ms": round(prefill, 1),
        "one_question_ms": median(lambda ms, n, t: ms),
        "one_question_tokens": median(lambda ms, n, t: n),
        "one_question_prefill_ms": median(lambda ms, n, t: t.get("prefill_ms", 0.0)),
        "one_question_decode_ms": median(lambda ms, n, t: t.get("decode_ms", 0.0)),
        "one_question_decode_passes": median(lambda ms, n, t: decode_passes(t)),
        # per question: its decode time over its tokens, and over its decoding passes (prompt-
        # lookup drafts and grammar-forced tokens put several tokens in one pass)
        "decode_ms_per_token": median(lambda ms, n, t: t.get("decode_ms", 0.0) / max(n, 1)),
        "decode_ms_per_pass": median(lambda ms, n, t: t.get("decode_ms", 0.0) / decode_passes(t)),
        "batch_questions": len(batch), "batch_candidates": cands,
        "batch_ms": round(ms_batch, 1), "batch_tokens": tokens_batch,
        "batch_candidates_per_s": round(cands / ms_batch * 1000, 2),
        "batch_tokens_per_s": round(tokens_batch / ms_batch * 1000, 1),
    }
    if args.device.startswith("cuda"):
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(f"{shape:>14} {row['parameters_m']:>7.0f}M | prefill {len(prompt)} tokens "
          f"{prefill:6.1f} ms | one question {row['one_question_ms']:5.0f} ms, "
          f"{row['one_question_tokens']:.0f} tokens in {row['one_question_decode_passes']:.0f} "
          f"decoding passes: {row['decode_ms_per_pass']:.1f} ms/pass, "
          f"{row['decode_ms_per_token']:.1f} ms/token | {len(batch)} questions x "
          f"{args.candidates} candidates {ms_batch:5.0f} ms: {row['batch_candidates_per_s']:.1f} "
          f"candidates/s, {row['batch_tokens_per_s']:.0f} tokens/s", flush=True)
    return row


def bench_embedder(device: str, passages: int, repeats: int) -> dict[str, object]:
    """Passages/s of ``MiniLMEmbedder`` on ``device`` as served (bf16 on a CUDA GPU) against
    the same model in fp32 (the embedder before this release), for a MiniLM-shaped BERT with
    random weights (6 layers, width 384) and MiniLM's vocabulary, over ~700-character passages
    cut from citeqa's docs."""
    import tempfile

    from transformers import AutoTokenizer, BertConfig, BertModel

    from citeqa.retrieval.embed import MiniLMEmbedder

    vocab = ROOT / "citeqa" / "reward" / "weights" / "encoder"  # MiniLM's tokenizer files
    text = " ".join(d.text for d in documents().values())
    texts = [text[i * 700 % (len(text) - 700):][:700] for i in range(passages)]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(vocab, local_files_only=True)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6,
                             num_attention_heads=12, intermediate_size=1536)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        served = MiniLMEmbedder(Path(tmp), device=device)
        fp32 = MiniLMEmbedder(Path(tmp), device=device)
        served.embed(texts[:64])  # load + warm up
        fp32.embed(texts[:1])
        if device.startswith("cuda"):
            fp32._model = fp32._model.float()  # the embedder before this release on a GPU
            fp32.dtype = "fp32"
        fp32.embed(texts[:64])
        rates, vectors = {}, {}
        for name, e in (("fp32", fp32), ("served", served)):
            ms = statistics.median(timed(device, lambda e=e: e.embed(texts, batch_size=64))[0]
                                   for _ in range(repeats))
            rates[name] = len(texts) / ms * 1000
            vectors[name] = e.embed(texts[:256], batch_size=64)
    cosine = float((vectors["fp32"] * vectors["served"]).sum(1).min())
    row = {"passages": len(texts), "served_dtype": served.dtype,
           "passages_per_s_fp32": round(rates["fp32"], 1),
           "passages_per_s_served": round(rates["served"], 1),
           "speedup": round(rates["served"] / rates["fp32"], 2), "min_cosine_vs_fp32": cosine}
    print(f"embedder ({len(texts)} passages of 700 characters, batch 64): fp32 "
          f"{rates['fp32']:,.0f} passages/s, served ({served.dtype}) {rates['served']:,.0f} "
          f"passages/s: x{row['speedup']:.2f}; cosine to fp32 >= {cosine:.5f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-1.5b"],
                    choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer directory (default: the converted SmolLM2's, converted "
                         "first where it is not yet)")
    ap.add_argument("--passages", type=int, default=3, help="passages shown per question")
    ap.add_argument("--batch", type=int, default=8, help="questions in the batched call")
    ap.add_argument("--candidates", type=int, default=4, help="candidates per batched question")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--embed-passages", type=int, default=4096,
                    help="passages the embedder's speed is measured on (0 = skip)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from citeqa.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py): the host side's allocations

    if args.tokenizer is None:
        from citeqa.config import Settings
        from citeqa.generation.models import resolve_model_dir

        args.tokenizer = resolve_model_dir("smollm2", Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"{where}; torch {torch.__version__}; random weights, SmolLM2's tokenizer "
          f"({len(tokenizer)} tokens); span mode, grammar-constrained")
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    if bandwidth:
        print(f"device-to-device copy: {bandwidth:.2f} TB/s (read + written)")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the copy's buffers are no model's
    embedder = (bench_embedder(args.device, args.embed_passages, args.repeats)
                if args.embed_passages else None)
    rows = []
    for shape in args.shapes:
        rows.append(bench_shape(shape, tokenizer, args))  # its model is freed on return
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__,
                                         "copy_tb_per_s": bandwidth, "embedder": embedder,
                                         "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
