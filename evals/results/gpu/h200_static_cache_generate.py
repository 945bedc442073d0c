"""transformers' own greedy generate (no citeqa code, no grammar) of 64 tokens after a 545-token
prompt, the SmolLM2-135M shape with random bf16 weights on a GPU: the eager forward with a
dynamic cache, then a static cache (generate compiles the forward and replays CUDA graphs).
Three runs each; the first static one includes compiling. What h200_static_cache_generate.txt
holds. Run from the repository root."""

import sys
import time
import traceback

import torch
from transformers import AutoTokenizer

sys.path.insert(0, "benchmarks")
import bench_gpu as b  # noqa: E402

tok = AutoTokenizer.from_pretrained(b.TOKENIZER, local_files_only=True)
model = b.random_model("smollm2-135m", len(tok), "cuda")
ids = torch.randint(100, 4000, (1, 545), device="cuda")
NEW = 64


def timed_generate(**kw):
    out = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kw)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1000)
    return out


with torch.inference_mode():
    print("eager, dynamic cache, ms for 64 tokens:", [round(x) for x in timed_generate()],
          flush=True)
try:
    t = time.perf_counter()
    with torch.inference_mode():
        ms = timed_generate(cache_implementation="static")
    print("static cache (generate compiles its forward), ms for 64 tokens:",
          [round(x) for x in ms], "first includes compile; total",
          round(time.perf_counter() - t), "s", flush=True)
except Exception:
    traceback.print_exc()
