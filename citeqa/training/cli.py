"""``citeqa train ...`` commands: build generator demonstrations, fine-tune the generator.

The main CLI registers ``app`` under ``train``; logging is configured by its callback.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from citeqa.cli_errors import fail
from citeqa.config import MAX_CANDIDATES, Settings, preset
from citeqa.errors import CiteqaError

app = typer.Typer(help="Train models: the generator's LoRA adapter, and training data.",
                  no_args_is_help=True)
log = logging.getLogger(__name__)

PresetOpt = Annotated[
    str, typer.Option("--preset", help="Settings preset whose generation config shapes prompts.")
]
# --targets shorthands (Llama-architecture layer names, as in citeqa/training/lora.py).
TARGETS: dict[str, tuple[str, ...]] = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
TARGETS["all"] = (*TARGETS["attention"], "gate_proj", "up_proj", "down_proj")


@app.command("generator-data")
def generator_data(
    dataset: Annotated[Path, typer.Option("--dataset", help="SQuAD JSON or JSONL questions.")],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index holding the paragraphs.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Demonstrations file to write.")],
    split: Annotated[
        str, typer.Option("--split", help="Article split: train | calibration | eval | all.")
    ] = "train",
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many demonstrations.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Question order (spreads --limit).")] = 0,
    preset_name: PresetOpt = "default",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Write demonstrations (question, retrieved passages, answer, quote) as JSON lines."""
    from citeqa.evals.squad import articles_for_split, load_questions
    from citeqa.retrieval import HybridRetriever
    from citeqa.training.demos import (
        build_demos,
        passages_by_context,
        sample_items,
        squad_answer_starts,
        write_demos,
    )

    try:
        cfg = preset(preset_name).generation
        articles = None if split == "all" else articles_for_split(split)
        items = sample_items(load_questions(dataset, articles), seed)
        retriever = HybridRetriever.open(index)
        by_context = passages_by_context(
            retriever.index.documents.values(), retriever.index.passages
        )
        demos, stats = build_demos(
            items, retriever, by_context, squad_answer_starts(dataset), cfg,
            limit=limit, progress=progress,
        )
    except CiteqaError as e:
        raise fail(str(e)) from None
    if not demos:
        raise fail(f"no demonstrations could be built: {stats.skipped}")
    write_demos(out, demos)
    summary = {
        "out": str(out),
        "split": split,
        "questions_seen": stats.questions,
        "written": stats.written,
        "gold_retrieved": stats.gold_retrieved,
        "skipped": stats.skipped,
        "command": shlex.join(["citeqa", *sys.argv[1:]]),
    }
    out.with_name(out.name + ".stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary))


@app.command("generator")
def generator(
    data: Annotated[Path, typer.Option("--data", help="Demonstrations (generator-data output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Base generator (default: the preset's).")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Converted base model cache (default: CITEQA_CACHE_DIR)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu | cuda (default: cuda if available).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    micro_batch_size: Annotated[
        int, typer.Option("--micro-batch-size", min=1, help="Examples per forward pass.")
    ] = 1,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, help="LoRA alpha.")] = 16.0,
    targets: Annotated[
        str, typer.Option("--targets", help="attention | all | comma-separated layer names.")
    ] = "attention",
    first_layer: Annotated[
        int, typer.Option("--first-layer", min=0,
                          help="Adapt only blocks from this one up (faster: backward stops there).")
    ] = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1)] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    cpu_dtype: Annotated[
        str, typer.Option("--cpu-dtype", help="auto | bf16 | fp32: bf16 autocast on a CPU.")
    ] = "auto",
    preset_name: PresetOpt = "default",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fine-tune the generator on demonstrations: writes a LoRA adapter, log and model card."""
    import torch

    from citeqa.generation.models import load_model
    from citeqa.training.demos import read_demos
    from citeqa.training.lora import LoRAConfig
    from citeqa.training.sft import TrainConfig, run_sft

    if threads is not None:
        torch.set_num_threads(threads)
    target_layers = TARGETS.get(targets) or tuple(t.strip() for t in targets.split(",") if t)
    train = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size,
        micro_batch_size=min(micro_batch_size, batch_size), max_steps=max_steps, seed=seed,
        cpu_dtype=cpu_dtype,
    )
    lora = LoRAConfig(r=rank, alpha=alpha, targets=target_layers, first_layer=first_layer)
    try:
        gen = preset(preset_name).generation
        if model:
            gen = replace(gen, model=model)
        if gen.model == "fake":
            raise fail("the fake generator has no weights to train; pass --model")
        demos = read_demos(data)
        if cache_dir is None:
            cache_dir = Settings().cache_dir  # type: ignore[call-arg]
        base, tokenizer, model_id = load_model(gen.model, cache_dir, device=device)
        record = run_sft(
            base, tokenizer, model_id, demos, out, gen, train, lora,
            meta={"data": str(data), "command": shlex.join(["citeqa", *sys.argv[1:]])},
            progress=progress,
        )
    except (CiteqaError, ValueError) as e:
        raise fail(str(e)) from None
    typer.echo(
        f"trained {record['steps']} steps on {record['examples']} examples in "
        f"{record['seconds']:.1f} s ({record['seconds_per_step']:.2f} s/step, peak RSS "
        f"{record['peak_rss_mb']:.0f} MiB); loss {record['first_loss']:.3f} -> "
        f"{record['last_loss']:.3f}; adapter in {out}"
    )



@app.command("export-generator")
def export_generator_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Base generator (default: the preset's).")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="packaged | none | an adapter directory "
                                 "(default: the preset's).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16 | float16 | float32.")
                     ] = "bfloat16",
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Converted base model cache (default: CITEQA_CACHE_DIR)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    preset_name: PresetOpt = "default",
) -> None:
    """Write the generator, its adapter merged, as a model directory a serving engine loads
    (scripts/vllm_cpu.sh serve DIR; CITEQA_GENERATOR_URL then points citeqa at it)."""
    from citeqa.generation.export import export_generator

    try:
        gen = preset(preset_name).generation
        if model:
            gen = replace(gen, model=model)
        if adapter is not None:
            gen = replace(gen, adapter=adapter)
        if cache_dir is None:
            cache_dir = Settings().cache_dir  # type: ignore[call-arg]
        record = export_generator(gen, cache_dir, out, dtype=dtype, overwrite=overwrite)
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(f"wrote {out} ({json.dumps(record)}); serve it with "
               f"`scripts/vllm_cpu.sh serve {out}` and answer in "
               f"CITEQA_ANSWER_MODE={record['answer_mode']}")


@app.command("reward-data")
def reward_data(
    dataset: Annotated[Path, typer.Option("--dataset", help="SQuAD JSON or JSONL questions.")],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index over the dataset's text.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL to append to (resumable).")],
    split: Annotated[
        str | None, typer.Option("--split", help="train | calibration | eval articles.")
    ] = "train",
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many questions.")
    ] = None,
    n_candidates: Annotated[
        int, typer.Option("--n-candidates", "-n", min=1, max=MAX_CANDIDATES)
    ] = 4,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Also one greedy (n=1) generation per question.")
    ] = False,
    preset_name: Annotated[str, typer.Option("--preset", help="default | tiny.")] = "default",
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Order of the sampled questions.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate candidates for the dataset's questions and label them against the golds."""
    from citeqa.config import Settings
    from citeqa.evals.squad import articles_for_split, load_questions
    from citeqa.pipeline import Pipeline
    from citeqa.training.reward_data import build_reward_data

    try:
        articles = articles_for_split(split) if split else None
        items = load_questions(dataset, articles)
        random.Random(seed).shuffle(items)  # a limit then samples every article
        items = items[:limit] if limit else items
        settings = Settings(preset=preset_name, index=index)  # type: ignore[arg-type]
        pipeline = Pipeline.from_settings(settings)
        if threads:
            import torch

            torch.set_num_threads(threads)
        stats = build_reward_data(
            pipeline, items, out, n=n_candidates, greedy=greedy, progress=progress
        )
    except CiteqaError as e:
        raise fail(str(e)) from None
    except ValueError as e:
        raise fail(str(e)) from None
    typer.echo(
        f"{stats.questions} questions ({stats.skipped} already done): {stats.candidates} "
        f"candidates, {stats.correct} correct, {stats.pairs} pairs in {stats.seconds:.0f} s "
        f"-> {out}"
    )


if __name__ == "__main__":  # python -m citeqa.training.cli ... (before `citeqa train` exists)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    app()
