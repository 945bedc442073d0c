"""The CUDA paths, on a real GPU (marker ``gpu``; skipped where torch sees no CUDA device).

A GPU user brings a local Hugging Face model directory; these tests stand a tiny random Llama
with SmolLM2's tokenizer in for it, and a tiny random BERT with MiniLM's tokenizer for the
embedder, so that no weights need to travel. What they check is the machinery, not quality:
the generator loads in bf16 (fp16 where the GPU has none) on the device and writes cited
candidates whose quotes are verbatim and whose span-mode answers stand in their quotes; fp32
greedy decoding on the device equals the CPU's and a batched row equals the same row alone;
the generator's LoRA training runs on the device and its adapter is served there; the embedder
runs there in bf16 (or fp16) close to the CPU's fp32. ``-s`` prints the share of bf16
candidates that differ from fp32's and the embedder's distance (bf16 rounds differently;
reported, not asserted).

Run: ``python -m pytest -m gpu tests/test_gpu.py -s``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SMOLLM2 = Path.home() / ".cache" / "citeqa" / "smollm2-135m-instruct"  # its tokenizer files

DOCS = {
    "lyon": ("Lyon", "Lyon lies on two rivers. The city of Lyon was famous for silk weaving in "
                     "the 1800s. It has a large old town with narrow covered passages."),
    "bergen": ("Bergen", "Bergen grew rich on the dried fish trade with the Hanseatic League. "
                         "Its wharf, Bryggen, is lined with wooden merchant houses."),
    "note": ("Note", "Answer: Quote [1]: grammar-like text must stay text. \"Quote\" [2]: no."),
}
QUESTIONS = ["What was Lyon famous for?", "What trade made Bergen rich?",
             "What lines the wharf of Bergen?"]


def documents():
    from citeqa.types import Document

    return {k: Document(k, title, f"mem://{k}", text) for k, (title, text) in DOCS.items()}


def hits():
    from citeqa.types import Hit, Passage

    out = []
    for i, d in enumerate(documents().values()):
        out.append(Hit(Passage(i, d.doc_id, 0, len(d.text), d.text), d.title, d.source,
                       1.0 - 0.1 * i))
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (SmolLM2's shape, minus the size) saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2's tokenizer is not at {SMOLLM2} (make install converts it)")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=0.3,  # confident logits: few near-ties
    ))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def generator(backend, **cfg):
    from citeqa.config import GenerationConfig
    from citeqa.generation.cited import CitedGenerator

    return CitedGenerator(backend, GenerationConfig(**cfg))


def run_all(gen, *, n: int, mode: str, questions: list[str] = QUESTIONS):
    """The candidates of ``questions``, generated in one batched backend call."""
    from citeqa.generation.cited import GenerationItem

    docs = documents()
    items = [GenerationItem(q, hits(), docs.__getitem__, n, mode) for q in questions]
    return [g.candidates for g in gen.generate_many(items)]


def assert_cited(per_question, *, span: bool) -> int:
    """Every quote verbatim at its offsets; in span mode every answer inside its quote.
    Returns how many candidates carry a quote."""
    docs, quoted = documents(), 0
    for candidates in per_question:
        for c in candidates:
            if c.quote is None:
                continue
            quoted += 1
            doc = docs[c.quote.doc_id]
            assert doc.text[c.quote.start:c.quote.end] == c.quote.text, c.raw
            if span:
                assert c.answer and c.answer_start is not None, c.raw
                assert c.quote.start <= c.answer_start < c.answer_end <= c.quote.end, c.raw
                assert doc.text[c.answer_start:c.answer_end] == c.answer, c.raw
    return quoted


def test_generator_loads_in_bf16_on_the_gpu_and_writes_cited_candidates(llama_dir, tmp_path):
    from citeqa.generation.hf import HFBackend

    backend = HFBackend.load(str(llama_dir), tmp_path, device="cuda")
    param = next(backend.model.parameters())
    half = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    assert param.device.type == "cuda" and param.dtype == half
    assert backend.batch_prefill  # one padded prefill of several prompts on a GPU
    for mode in ("span", "free"):
        for n in (1, 3):
            per_question = run_all(generator(backend), n=n, mode=mode)
            assert [len(c) for c in per_question] == [n] * len(QUESTIONS)
            assert assert_cited(per_question, span=mode == "span") >= len(QUESTIONS), mode


def outputs(backend, *, n: int, questions: list[str] = QUESTIONS) -> list[list[str]]:
    per_question = run_all(generator(backend), n=n, mode="span", questions=questions)
    return [[c.raw for c in cs] for cs in per_question]


def test_fp32_greedy_decoding_on_the_gpu_equals_the_cpu_and_batching_changes_nothing(
        llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citeqa.generation.hf import HFBackend

    tokenizer = AutoTokenizer.from_pretrained(llama_dir, local_files_only=True)
    fp32 = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    cpu = HFBackend(fp32, tokenizer, "tiny")
    gpu = HFBackend(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
                    .to("cuda").eval(), tokenizer, "tiny")
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; fp32 means fp32 here
    on_cpu, batched = outputs(cpu, n=3), outputs(gpu, n=3)
    assert batched == on_cpu
    alone = [outputs(gpu, n=3, questions=[q])[0] for q in QUESTIONS]  # 3 rows, not 9
    assert alone == batched
    bf16 = outputs(HFBackend.load(str(llama_dir), tmp_path, device="cuda"), n=3)
    pairs = [(a, b) for xs, ys in zip(bf16, batched, strict=True) for a, b in zip(xs, ys,
             strict=True)]
    print(f"\nbf16 vs fp32 on the GPU: {sum(a != b for a, b in pairs)} of {len(pairs)} "
          "greedy candidates differ")


def test_generator_training_runs_on_the_gpu_and_its_adapter_serves_there(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from citeqa.generation.adapter import adapter_id
    from citeqa.generation.hf import HFBackend
    from citeqa.training.cli import app
    from citeqa.training.demos import Demo, DemoPassage, write_demos

    docs = documents()
    facts = [(QUESTIONS[0], "lyon", "silk weaving", "famous for silk weaving in the 1800s"),
             (QUESTIONS[1], "bergen", "dried fish", "rich on the dried fish trade"),
             ("Where does Lyon lie?", "lyon", "two rivers", "Lyon lies on two rivers"),
             ("What is Bergen's wharf called?", "bergen", "Bryggen", "Its wharf, Bryggen, is")]
    demos = [Demo(id=f"d{i}", question=q, gold=1, answer=answer, quote=quote,
                  passages=(DemoPassage(docs["note"].title, docs["note"].text, "note", 0),
                            DemoPassage(docs[k].title, docs[k].text, k, 0)))
             for i, (q, k, answer, quote) in enumerate(facts)]
    for d in demos:
        assert d.answer in d.quote and d.quote in d.passages[1].text, d
    write_demos(tmp_path / "demos.jsonl", demos)
    result = CliRunner().invoke(app, [
        "generator", "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "ad"),
        "--model", str(llama_dir), "--device", "cuda", "--max-steps", "8", "--epochs", "10",
        "--batch-size", "2", "--lr", "0.02", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "trained 8 steps" in result.output
    import json

    log = json.loads((tmp_path / "ad" / "training_log.json").read_text())
    losses = [s["loss"] for s in log["history"]]
    assert len(losses) == 8 and all(x == x and x < 1e4 for x in losses), losses
    print(f"\nLoRA on the GPU: loss {losses[0]:.3f} -> {losses[-1]:.3f} over 8 steps")
    served = HFBackend.load(str(llama_dir), tmp_path, device="cuda", adapter=tmp_path / "ad")
    assert f"+{adapter_id(tmp_path / 'ad')}" in served.model_id
    assert assert_cited(run_all(generator(served), n=2, mode="span"), span=True) >= 1


def test_the_embedder_runs_on_the_gpu_as_on_the_cpu(tiny_minilm_dir):
    import numpy as np

    from citeqa.lean_encoder import LeanEncoder
    from citeqa.retrieval.embed import MiniLMEmbedder

    texts = [text for _, text in DOCS.values()] * 12
    gpu = MiniLMEmbedder(tiny_minilm_dir, device="cuda")
    on_gpu = gpu.embed(texts, batch_size=8)
    assert not isinstance(gpu._model, LeanEncoder)  # a CPU forward: transformers' runs here
    assert gpu.dtype == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16")
    assert next(gpu._model.parameters()).dtype != torch.float32
    on_cpu = MiniLMEmbedder(tiny_minilm_dir, device="cpu", cpu_dtype="fp32",
                            fp32_kernel="torch").embed(texts, batch_size=8)
    assert on_gpu.shape == (len(texts), 384) and on_gpu.dtype == np.float32
    cosine = (on_gpu * on_cpu).sum(1)  # both L2-normalised
    assert np.isfinite(on_gpu).all() and cosine.min() > 0.999, cosine.min()
    print(f"\nembedder on the GPU in {gpu.dtype} vs the CPU in fp32: cosine >= "
          f"{cosine.min():.5f}, max difference {np.abs(on_gpu - on_cpu).max():.2e}")
