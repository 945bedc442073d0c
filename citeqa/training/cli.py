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
from typing import TYPE_CHECKING, Annotated, Any

import typer

from citeqa.atomic import atomic_open, write_text_atomic
from citeqa.cli_errors import (
    ProgressOpt,
    TrainCpuDtypeOpt,
    a_torch_device,
    check_answer_mode,
    check_out,
    check_preset,
    command_group,
    fail,
    float_option,
    interruptible,
    path_option,
    settings_from,
    shown_progress,
)
from citeqa.config import MAX_CANDIDATES, preset
from citeqa.errors import CiteqaError, ConfigError
from citeqa.journal import file_lock, run_lock
from citeqa.logs import setup_logging
from citeqa.training.cards import stats_path

if TYPE_CHECKING:
    from citeqa.evals.squad import QAItem

app = command_group(help="Train models: the generator's LoRA adapter, and training data.",
                    no_args_is_help=True)
log = logging.getLogger(__name__)

PresetOpt = Annotated[
    str, typer.Option("--preset", help="Settings preset whose generation config shapes prompts.")
]
# --targets shorthands (Llama-architecture layer names, as in citeqa/training/lora.py).
TARGETS: dict[str, tuple[str, ...]] = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}
TARGETS["all"] = (*TARGETS["attention"], "gate_proj", "up_proj", "down_proj")
AnswerModeOpt = Annotated[
    str | None,
    typer.Option("--answer-mode", help="span | free: the answer mode recorded with the data "
                 "(its .stats.json) and adapter (default: the preset's). Both teach one "
                 "layout: the answer, then a quote that holds it."),
]


@app.command("generator-data")
def generator_data(
    dataset: Annotated[Path, path_option("--dataset", help="SQuAD JSON or JSONL questions.")],
    index: Annotated[Path, path_option("--index", "-i", help="Index holding the paragraphs.")],
    out: Annotated[Path, path_option("--out", "-o", help="Demonstrations file to write.")],
    split: Annotated[
        str, typer.Option("--split", help="train: the project's train articles (of qa.json); "
                          "all: every article of the file (a file of your own). The "
                          "calibration and eval articles are never trained on.")
    ] = "train",
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many demonstrations.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Question order (spreads --limit).")] = 0,
    preset_name: PresetOpt = "default",
    answer_mode: AnswerModeOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Write demonstrations (question, retrieved passages, answer, quote) as JSON lines."""
    progress = shown_progress(progress)  # default: on a terminal only
    check_out(out, folder=False, inputs={"--dataset": dataset, "--index": index})
    from citeqa.evals.squad import (
        HELD_OUT_SPLITS,
        articles_for_split,
        check_not_held_out,
        load_questions,
    )
    from citeqa.retrieval import HybridRetriever
    from citeqa.training.demos import (
        build_demos,
        passages_by_context,
        sample_items,
        squad_answer_starts,
        write_demos,
    )

    try:
        cfg = _with_mode(preset(preset_name).generation, answer_mode)
        articles = None if split == "all" else articles_for_split(split, also=("all",))
        if split in HELD_OUT_SPLITS:  # demonstrations are only ever trained on
            raise ConfigError(f"--split {split}: the {split} articles are held out, never "
                              "trained on (the decline threshold and `citeqa eval` would "
                              "report better than the truth); use --split train")
        items = load_questions(dataset, articles)
        if split == "all":
            check_not_held_out(items, f"--dataset {dataset} (--split all: every article)")
        items = sample_items(items, seed)
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
        "articles": sorted({i.article for i in items} - {""}),  # for the model card
        "answer_mode": cfg.answer_mode,  # the layout is one; the mode the data was made for
        "questions_seen": stats.questions,
        "written": stats.written,
        "gold_retrieved": stats.gold_retrieved,
        "skipped": stats.skipped,
        "command": shlex.join(["citeqa", *sys.argv[1:]]),
    }
    write_text_atomic(stats_path(out), json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary))


@app.command("generator")
@interruptible()
def generator(
    data: Annotated[Path, path_option("--data", help="Demonstrations (generator-data output).")],
    out: Annotated[Path, path_option("--out", "-o", help="Adapter directory to write (resumed).")],
    model: Annotated[
        str | None, typer.Option("--model", help="Base generator (default: the preset's).")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        path_option("--cache-dir", help="Converted base model cache (default: CITEQA_CACHE_DIR)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", callback=a_torch_device,
                                 help="cpu | cuda (default: cuda if available).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    lr: Annotated[float, float_option("--lr", min=0.0)] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    micro_batch_size: Annotated[
        int, typer.Option("--micro-batch-size", min=1,
                          help="Examples per forward pass; a resumed run may change it."),
    ] = 1,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank r.")] = 8,
    alpha: Annotated[float, float_option("--alpha", min=0.0, help="LoRA alpha.")] = 16.0,
    targets: Annotated[
        str, typer.Option("--targets", help="attention | all | comma-separated layer names.")
    ] = "attention",
    first_layer: Annotated[
        int, typer.Option("--first-layer", min=0,
                          help="Adapt only blocks from this one up (faster: backward stops there).")
    ] = 0,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1,
                                 help="Stop at this step of the data order (--start-step's "
                                      "skipped steps count).")
    ] = None,
    save_every: Annotated[
        int, typer.Option("--save-every", min=1, help="Steps between checkpoints in --out.")
    ] = 25,
    init_adapter: Annotated[
        Path | None,
        path_option("--init-adapter",
                    help="Train this adapter further (same base model, --rank, --alpha and "
                         "layers), with fresh optimizer moments; e.g. citeqa/generation/weights."),
    ] = None,
    start_step: Annotated[
        int, typer.Option("--start-step", min=0,
                          help="Skip this many steps of the data order: those --init-adapter "
                               "was trained on (same data, --seed and --batch-size).")
    ] = 0,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    cpu_dtype: TrainCpuDtypeOpt = "auto",
    base_bf16: Annotated[
        bool, typer.Option("--base-bf16/--no-base-bf16",
                           help="With bf16 on a CPU, keep the frozen base weights in bf16 as "
                                "well (faster steps; the residual stream runs in bf16).")
    ] = False,
    preset_name: PresetOpt = "default",
    answer_mode: AnswerModeOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Fine-tune the generator on demonstrations: writes a LoRA adapter, log and model card.

    Saves a checkpoint in --out every --save-every steps; rerun the same command after an
    interruption and it continues from there."""
    progress = shown_progress(progress)  # default: on a terminal only
    import torch

    from citeqa.generation.models import fp16_only_gpu, load_model, pick_device
    from citeqa.training.demos import read_demos
    from citeqa.training.lora import LoRAConfig
    from citeqa.training.sft import TrainConfig, run_sft

    check_out(out, folder=True, inputs={"--data": data, "--model": model,
                                        "--init-adapter": init_adapter})
    if start_step and init_adapter is None:
        raise fail("--start-step needs --init-adapter: the steps it skips are those that "
                   "adapter was trained on")
    if threads is not None:
        torch.set_num_threads(threads)
    target_layers = TARGETS.get(targets) or tuple(t.strip() for t in targets.split(",") if t)
    train = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size,
        micro_batch_size=min(micro_batch_size, batch_size), max_steps=max_steps, seed=seed,
        cpu_dtype=cpu_dtype, save_every=save_every, start_step=start_step, base_bf16=base_bf16,
    )
    lora = LoRAConfig(r=rank, alpha=alpha, targets=target_layers, first_layer=first_layer)
    try:
        gen = _with_mode(preset(preset_name).generation, answer_mode)
        if model:
            gen = replace(gen, model=model)
        if gen.model == "fake":
            raise fail("the fake generator has no weights to train; pass --model")
        _check_demos_trainable(data)
        demos = read_demos(data)
        if cache_dir is None:
            cache_dir = settings_from().cache_dir
        target = pick_device(device)
        # a GPU without bf16 trains in fp32: fp16 without loss scaling loses most gradients to
        # underflow, and fp16 weights fingerprint unlike the fp32 ones serving checks
        fp32_on_gpu = fp16_only_gpu(target)
        base, tokenizer, model_id = load_model(gen.model, cache_dir,
                                               device="cpu" if fp32_on_gpu else target)
        if fp32_on_gpu:
            log.warning("%s has no bf16: training in fp32 there", target)
            base.to(target)
        with run_lock(out, "citeqa train generator"):  # its checkpoint has fixed names
            record = run_sft(
                base, tokenizer, model_id, demos, out, gen, train, lora,
                meta={"data": str(data), "command": shlex.join(["citeqa", *sys.argv[1:]])},
                progress=progress, init_adapter=init_adapter,
            )
    except (CiteqaError, ValueError) as e:
        raise fail(str(e)) from None
    # (a rerun after a crash between the last checkpoint and the adapter trains no step, yet
    # writes the adapter)
    done = "already trained (nothing to do): " if record.get("nothing_to_do") else ""
    typer.echo(
        f"{done}trained {record['steps']} steps on {record['examples']} examples in "
        f"{record['seconds']:.1f} s ({record['seconds_per_step']:.2f} s/step, peak RSS "
        f"{record['peak_rss_mb']:.0f} MiB); loss {record['first_loss']:.3f} -> "
        f"{record['last_loss']:.3f}; adapter in {out}"
    )



@app.command("export-generator")
def export_generator_cmd(
    out: Annotated[Path, path_option("--out", "-o", help="Model directory to write.")],
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
        path_option("--cache-dir", help="Converted base model cache (default: CITEQA_CACHE_DIR)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    preset_name: PresetOpt = "default",
) -> None:
    """Write the generator, its adapter merged, as a model directory a serving engine loads
    (scripts/vllm_cpu.sh serve DIR; CITEQA_GENERATOR_URL then points citeqa at it)."""
    from citeqa.generation.export import export_generator

    check_out(out, folder=True, inputs={"--model": model, "--adapter": adapter})
    try:
        gen = preset(preset_name).generation
        if model:
            gen = replace(gen, model=model)
        if adapter is not None:
            gen = replace(gen, adapter=adapter)
        if cache_dir is None:
            cache_dir = settings_from().cache_dir
        record = export_generator(gen, cache_dir, out, dtype=dtype, overwrite=overwrite)
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(f"wrote {out} ({json.dumps(record)}); serve it with "
               f"`scripts/vllm_cpu.sh serve {out}` and answer in "
               f"CITEQA_ANSWER_MODE={record['answer_mode']}")


@app.command("reward-data")
@interruptible("--from generator keeps the questions it finished and resumes them; the other "
               "sources write their file whole at the end: run the same command again")
def reward_data(
    dataset: Annotated[Path, path_option("--dataset", help="SQuAD JSON or JSONL questions.")],
    out: Annotated[Path, path_option("--out", "-o", help="JSONL to write (generator: resumed).")],
    source: Annotated[
        str, typer.Option("--from", help="generator: the served generator's candidates; "
                          "synthetic: gold answers against made negatives; redteam: made "
                          "unanswerable questions with the original answer.")
    ] = "generator",
    index: Annotated[
        Path | None, path_option("--index", "-i", help="Index over the dataset's text "
                                 "(generator, synthetic).")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="train | calibration | eval articles (default: "
                                 "every article of a file that holds none held out).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many questions.")
    ] = None,
    n_candidates: Annotated[
        int, typer.Option("--n-candidates", "-n", min=1, max=MAX_CANDIDATES,
                          help="Candidates per question (generator).")
    ] = 3,
    preset_name: Annotated[str, typer.Option("--preset", help="default | tiny.")] = "default",
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Question order and choices.")] = 0,
    progress: ProgressOpt = None,
) -> None:
    """Build verifier training (or calibration) data from a question set; see
    citeqa/training/verifier_data.py for what each --from makes."""
    progress = shown_progress(progress)  # default: on a terminal only
    check_out(out, folder=False, inputs={"--dataset": dataset, "--index": index})
    from citeqa.evals.squad import articles_for_split, check_not_held_out, load_questions

    if source not in ("generator", "synthetic", "redteam"):
        raise fail(f"--from must be generator, synthetic or redteam, not {source!r}")
    if source != "redteam" and index is None:
        raise fail(f"--from {source} needs --index")
    check_preset(preset_name)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        items = load_questions(dataset, articles_for_split(split) if split else None)
        if split is None:  # every article: training data, so none held out for calibration
            check_not_held_out(items, f"--dataset {dataset} (no --split: every article)")
        random.Random(seed).shuffle(items)  # a limit then samples every article
        items = items[:limit] if limit else items
        record = {"command": shlex.join(["citeqa", *sys.argv[1:]]), "split": split or "all",
                  "articles": sorted({q.article for q in items} - {""})}  # ("": not said)
        if source == "generator":  # it adds to what --out holds: the record covers both,
            record = _resumed_record(out, record)  # written before a question is asked
            write_text_atomic(stats_path(out), json.dumps(record, indent=2) + "\n")
            summary = _generator_data(items, index, out, n_candidates, preset_name, progress)
        elif source == "synthetic":
            summary = _synthetic_data(items, dataset, index, out, seed, progress)
        else:
            summary = _redteam_data(items, out, seed)
    except (CiteqaError, ValueError) as e:
        raise fail(str(e)) from None
    # what training and calibration check the data against (training/reward_cli.py: data_articles)
    summary.update(record)
    write_text_atomic(stats_path(out), json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary))


def _resumed_record(out: Path, record: dict) -> dict:
    """``record`` (command, split, articles) for an --out that a run resumes: its articles with
    those the file holds already (a run killed or finished before), so that the held-out
    checks see every article in it; ConfigError when one of the file's split and this run's is
    held out (calibration, eval) and the other is not: that would mix them in one file."""
    from citeqa.evals.squad import HELD_OUT_SPLITS
    from citeqa.training.cards import data_stats

    before = data_stats(out) if out.is_file() and out.stat().st_size else {}
    was, now = before.get("split"), record["split"]
    if was is not None and was != now:
        if was in HELD_OUT_SPLITS or now in HELD_OUT_SPLITS:
            raise ConfigError(
                f"--out {out} holds reward data of --split {was}; adding --split {now} to it "
                "would mix held-out and training articles in one file: choose another --out")
        now = "all"  # train and all: training data of both
    return {**record, "split": now, "articles": sorted(set(before.get("articles") or [])
                                                       | set(record["articles"]))}


def _generator_data(items, index, out, n, preset_name, progress) -> dict:
    from citeqa.pipeline import Pipeline
    from citeqa.training.verifier_data import generator_examples

    pipeline = Pipeline.from_settings(settings_from(preset=preset_name, index=index))
    with file_lock(out, "citeqa train reward-data"):  # two appending would lose lines
        stats = generator_examples(pipeline, items, out, n=n, progress=progress)
    return {"questions": stats.questions, "already_done": stats.skipped,
            "examples": stats.examples, "right": stats.right, "seconds": round(stats.seconds)}


def _synthetic_data(items, dataset, index, out, seed, progress) -> dict:
    from tqdm.auto import tqdm

    from citeqa.retrieval import HybridRetriever
    from citeqa.training.demos import squad_answer_starts
    from citeqa.training.verifier_data import plausible_answers, stats_of, synthetic_examples

    retriever = HybridRetriever.open(index)  # searched by BM25 alone: no embedder to load
    starts = squad_answer_starts(dataset)
    plausible = plausible_answers(dataset)  # by content: a .squad2 or .json.gz name too
    rng = random.Random(seed)
    made = []
    for item in tqdm(items, desc="synthetic data", disable=not progress):
        if not item.context.strip():
            continue
        start = starts.get(item.id, {}).get(item.answers[0]) if item.answers else None
        hits = retriever.search(item.question, k=4, mode="bm25")
        made += [replace(ex, article=item.article) for ex in synthetic_examples(
            item, start, item.article.replace("_", " "), hits, rng, plausible.get(item.id, ()))]
    _write_all(out, made)
    return {"questions": len(items), "examples": len(made), "by_source": stats_of(made)}


def _redteam_data(items: list[QAItem], out: Path, seed: int) -> dict[str, Any]:
    """Red-team variants of ``items``' answerable questions, and the verifier examples they
    make, into ``out`` (the variants beside it); their counts."""
    from collections import Counter

    from citeqa.redteam import Corpus, Seed, make_variants
    from citeqa.training.verifier_data import redteam_examples

    seeds = [Seed(q.question, q.context, q.answers[0], q.id) for q in items
             if q.answerable and q.context.strip()]
    if not seeds:  # as `citeqa redteam` refuses
        raise ConfigError("no answerable question with its paragraph ('context') to make "
                          "variants of; give SQuAD JSON, or JSONL records with a 'context'")
    title_of = {q.context: q.article.replace("_", " ") for q in items}
    corpus = Corpus.build(dict.fromkeys(q.context for q in items if q.context.strip()))
    article_of = {q.id: q.article for q in items}  # kept in each variant and example
    variants = [replace(v, article=article_of.get(v.seed_id, ""))
                for v in make_variants(seeds, corpus, seed=seed)]
    made = list(redteam_examples(variants, title_of.get))
    variants_out = out.with_name(out.name + ".variants.jsonl")
    with atomic_open(variants_out) as f:
        for v in variants:
            f.write(json.dumps(v.to_json(), ensure_ascii=False) + "\n")
    _write_all(out, made)
    kinds = Counter(v.kind for v in variants)
    return {"seeds": len(seeds), "variants": len(variants), "by_kind": dict(sorted(kinds.items())),
            "unanswerable": sum(not v.answerable for v in variants), "examples": len(made)}


def _check_demos_trainable(data: Path) -> None:
    """ConfigError when the ``.stats.json`` beside demonstrations says they were made from
    the calibration or eval articles (their records do not name an article)."""
    from citeqa.evals.squad import HELD_OUT_SPLITS, check_training_articles
    from citeqa.training.cards import data_stats

    stats = data_stats(data)
    split = stats.get("split")
    if split in HELD_OUT_SPLITS:
        raise ConfigError(f"--data {data} was made from --split {split} (its .stats.json): "
                          f"the {split} articles are held out, never trained on; make the "
                          "demonstrations with --split train")
    articles = stats.get("articles")
    check_training_articles([a for a in articles if isinstance(a, str)]
                            if isinstance(articles, list) else [], f"--data {data}")


def _with_mode(gen, answer_mode: str | None):
    if answer_mode is None:
        return gen
    check_answer_mode(answer_mode)
    return replace(gen, answer_mode=answer_mode)


def _write_all(out: Path, examples) -> None:
    """Write ``out`` whole or not at all (a rerun sees a finished file or none)."""
    from citeqa.reward.data import write_examples

    with atomic_open(out) as f:
        write_examples(f, examples)


if __name__ == "__main__":  # python -m citeqa.training.cli ... (before `citeqa train` exists)
    setup_logging()
    app()
