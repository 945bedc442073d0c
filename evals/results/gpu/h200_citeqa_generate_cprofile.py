"""cProfile of citeqa's generate on a GPU: three questions, one candidate each, the SmolLM2-135M
shape with random bf16 weights (after one warm-up question): what
h200_citeqa_generate_cprofile.txt holds. Run from the repository root."""

import cProfile
import pstats
import sys

from transformers import AutoTokenizer

sys.argv = ["bench_gpu.py"]
sys.path.insert(0, "benchmarks")
import bench_gpu as b  # noqa: E402

from citeqa.config import GenerationConfig  # noqa: E402
from citeqa.generation.cited import CitedGenerator, GenerationItem  # noqa: E402
from citeqa.generation.hf import HFBackend  # noqa: E402

tok = AutoTokenizer.from_pretrained(b.TOKENIZER, local_files_only=True)
model = b.random_model("smollm2-135m", len(tok), "cuda")
backend = HFBackend(model, tok, "s")
docs = b.documents()
shown = b.hits(docs)[:3]
gen = CitedGenerator(backend, GenerationConfig())


def run(q: str):
    return gen.generate_many([GenerationItem(q, shown, docs.__getitem__, 1, "span")])


run("What does citeqa do with quotes?")
pr = cProfile.Profile()
pr.enable()
for q in ["What does citeqa do with passages?", "What does citeqa do with scores?",
          "What are offsets?"]:
    g = run(q)
    print(g[0].timings_ms)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
