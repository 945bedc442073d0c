"""Decoding speed of the local generator: prefill, per-token decode (with and without the quote
grammar), and end-to-end cited-answer latency with prompt-lookup speculation on and off.

    python benchmarks/bench_decode.py --threads 2

Targets: grammar mask cost < 5 % of a decode step; end-to-end generate() <= 1.5x the prompt's
prefill time with speculation on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's citeqa, not the one installed (a worktree's)

from citeqa.allocator import keep_freed_memory  # noqa: E402
from citeqa.config import Settings  # noqa: E402
from citeqa.generation.backend import GenerationRequest  # noqa: E402
from citeqa.generation.constraint import output_grammar  # noqa: E402
from citeqa.generation.hf import HFBackend, _Stats  # noqa: E402
from citeqa.generation.kv import with_cache_keyword  # noqa: E402
from citeqa.generation.lm_head import choose  # noqa: E402

PASSAGES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
    "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
    "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III of West "
    "Francia. Through generations of assimilation and mixing with the native Frankish and "
    "Roman-Gaulish populations, their descendants would gradually merge with the Carolingian-based "
    "cultures of West Francia. The distinct cultural and ethnic identity of the Normans emerged "
    "initially in the first half of the 10th century, and it continued to evolve.",
    "The Norman dynasty had a major political, cultural and military impact on medieval Europe and "
    "even the Near East. The Normans were famed for their martial spirit and eventually for their "
    "Christian piety, becoming exponents of the Catholic orthodoxy into which they assimilated. "
    "They adopted the Gallo-Romance language of the Frankish land they settled, their dialect "
    "becoming known as Norman, Normaund or Norman French, an important literary language. The "
    "Duchy of Normandy, which they formed by treaty with the French crown, was a great fief.",
    "In the course of the 10th century, the initially destructive incursions of Norse war bands "
    "into the rivers of France evolved into more permanent encampments that included local women "
    "and personal property. The Duchy of Normandy, which began in 911 as a fiefdom, was "
    "established by the treaty of Saint-Clair-sur-Epte between King Charles III of West Francia "
    "and the famed Viking ruler Rollo, and was situated in the former Frankish kingdom of "
    "Neustria. The treaty offered Rollo and his men the French lands between the river Epte.",
]
QUESTION = "In what country is Normandy located?"


def messages() -> tuple[dict[str, str], ...]:
    shown = "\n\n".join(f"[{k}] {p}" for k, p in enumerate(PASSAGES, start=1))
    return (
        {"role": "system", "content": "Answer from the passages. Reply exactly as:\nAnswer: "
                                      "<short answer>\nQuote [k]: <exact words of passage k>"},
        {"role": "user", "content": f"Passages:\n{shown}\n\nQuestion: {QUESTION}"},
    )


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    ap.add_argument("--steps", type=int, default=24, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    keep_freed_memory()  # as the CLI does (citeqa/allocator.py)
    backend = HFBackend.load(args.model, args.cache_dir, threads=args.threads)
    print(f"model {backend.model_id} on {backend.device}, {torch.get_num_threads()} threads")
    prompt = backend.prompt_ids(messages())
    grammar = output_grammar(PASSAGES)
    model = backend.model

    with torch.inference_mode():
        def prefill() -> DynamicCache:
            cache = DynamicCache(config=model.config)
            with_cache_keyword(model)(input_ids=torch.tensor([prompt]), cache=cache,
                                      logits_to_keep=1)
            return cache

        prefill()  # warm-up
        prefill_ms = timed(prefill, args.repeats)
        print(f"prefill: {len(prompt)} tokens in {prefill_ms:.0f} ms "
              f"({len(prompt) / prefill_ms * 1000:.0f} tokens/s)")

        # per-token decode: a plain greedy step vs the same step plus the grammar mask
        from citeqa.generation.constraint import OutputConstraint, ll_tokenizer_for

        ll_tok = ll_tokenizer_for(backend.tokenizer)
        quote = PASSAGES[0][:200]
        target = backend.tokenizer.encode(f"Answer: France\nQuote [1]: {quote}",
                                          add_special_tokens=False)[: args.steps]

        def decode(constrained: bool) -> tuple[float, float]:
            cache = prefill()
            c = OutputConstraint(grammar, ll_tok) if constrained else None
            stats = _Stats()
            mask_ms = 0.0
            t0 = time.perf_counter()
            n_past = len(prompt)
            for tok in target:
                ids = torch.tensor([[tok]])  # [B=1, S=1]
                mask = torch.ones(1, n_past + 1, dtype=torch.long)  # [B, cache + S]
                positions = torch.tensor([[n_past]])  # [B, S]
                hidden = backend._forward(ids, cache, mask, positions, keep=1, stats=stats)[0, -1]
                n_past += 1
                if c is not None:
                    m0 = time.perf_counter()
                    c.allowed_mask()  # the grammar's own cost, measured apart
                    mask_ms += (time.perf_counter() - m0) * 1000
                choose(backend.head.scores(hidden, c), 0.0, None)
                if c is not None:
                    c.consume(tok)
            total = (time.perf_counter() - t0) * 1000
            return total / len(target), mask_ms / len(target)

        free_ms, _ = min(decode(False) for _ in range(args.repeats))
        con_ms, mask_ms = min(decode(True) for _ in range(args.repeats))
        print(f"decode/token: unconstrained {free_ms:.1f} ms, constrained {con_ms:.1f} ms, "
              f"mask {mask_ms:.2f} ms ({100 * mask_ms / con_ms:.1f} % of a step; target < 5 %; "
              "constrained steps only multiply the allowed rows of the LM head)")

    # end to end, the way the pipeline calls it
    req = GenerationRequest(messages=messages(), grammar=grammar, max_tokens=96)
    for spec in (backend.speculative_tokens or 8, 0):
        backend.speculative_tokens = spec
        backend.generate([req])  # warm-up
        runs = []
        for _ in range(args.repeats):
            # The same request again would draft its whole output from the last one: forget it.
            backend._recent = backend._recent[:0]
            t0 = time.perf_counter()
            [[c]] = backend.generate([req])
            runs.append(((time.perf_counter() - t0) * 1000, c))
        wall, c = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        t = c.timings_ms
        print(f"generate speculation={'on ' if spec else 'off'}: {wall:.0f} ms, "
              f"{int(t['forward_passes'])} forward passes for {c.n_tokens} tokens, "
              f"{wall / prefill_ms:.2f}x prefill (target <= 1.5x)  -> {c.text!r}")


if __name__ == "__main__":
    main()
