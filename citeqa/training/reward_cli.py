"""Reward-model commands: train the verifier, calibrate its decline threshold.

The main CLI registers them (see citeqa/cli.py):

    citeqa train reward --data FILE... --out DIR [--base ENCODER_DIR] ...
    citeqa train answerability --squad FILE... [--redteam VARIANTS] --out DIR/answerability
    citeqa train reward-combine --data FILE... --reward DIR
    citeqa calibrate --data FILE... --reward DIR --target 0.8

``citeqa train reward-data`` (building the data) lives with the other training-data builders in
citeqa/training/cli.py.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import citeqa
from citeqa.atomic import write_text_atomic
from citeqa.cli_errors import (
    ProgressOpt,
    TrainCpuDtypeOpt,
    check_out,
    command_group,
    fail,
    float_option,
    interruptible,
    path_option,
    shown_progress,
)
from citeqa.compute import cpu_dtype_setting
from citeqa.errors import CiteqaError, ConfigError
from citeqa.journal import file_lock
from citeqa.training.cards import data_stats

if TYPE_CHECKING:
    from citeqa.reward.data import Example, VerifierData
    from citeqa.training.answerability_data import Labelled

log = logging.getLogger(__name__)

train_app = command_group(help="Train the reward model.", no_args_is_help=True)


SAVED = ("it is saved every --save-every steps: run the same command again to resume from the "
         "last save (nothing is saved before the first)")


def multiple_of_pad(value: int) -> int:
    """--max-tokens: a multiple of the padding multiple (the tokenizer refuses to cut at a
    length it would pad past: any other value failed at the first step)."""
    from citeqa.compute import PAD_MULTIPLE

    if value % PAD_MULTIPLE:
        raise typer.BadParameter(f"must be a multiple of {PAD_MULTIPLE}, not {value} (e.g. "
                                 f"{value - value % PAD_MULTIPLE})")
    return value


@train_app.command("reward")
@interruptible(SAVED)
def reward(
    data: Annotated[list[Path], path_option("--data", help="Reward-data JSONL (repeatable).")],
    out: Annotated[Path, path_option("--out", "-o", help="Verifier directory (resumed).")],
    base: Annotated[
        Path | None,
        path_option("--base", help="Encoder to start from: any local Hugging Face encoder "
                    "directory (default: the packaged all-MiniLM-L6-v2), or a verifier "
                    "directory to train further (e.g. on another generator's candidates)."),
    ] = None,
    epochs: Annotated[float, float_option("--epochs", min=0.01)] = 1.0,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Examples per step.")] = 32,
    lr: Annotated[float, float_option("--lr", min=0.0)] = 3e-5,
    members: Annotated[int, typer.Option("--members", min=1, max=16)] = 3,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=32, max=512, callback=multiple_of_pad,
        help="Tokens an example is cut to: a multiple of 16 (batches pad to one).")] = 192,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many question groups.")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    cpu_dtype: TrainCpuDtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=1,
                                            help="Steps between saves (resume points).")] = 200,
    progress: ProgressOpt = None,
) -> None:
    """Train the verifier (a cross-encoder with a reader head and an ensemble of heads) on
    labelled candidates; writes --out, and resumes there after an interruption."""
    progress = shown_progress(progress)  # default: on a terminal only
    check_out(out, folder=True, inputs={"--data": data, "--base": base})
    try:
        with file_lock(out, "citeqa train reward"):  # beside it: saves swap the folder itself
            record = train_to_dir(
                data, out, base=base, limit=limit, threads=threads, progress=progress,
                cfg_kw={"epochs": epochs, "batch_examples": batch, "lr": lr,
                        "members": members, "max_tokens": max_tokens, "seed": seed,
                        "cpu_dtype": cpu_dtype, "save_every": save_every},
            )
    except CiteqaError as e:
        raise fail(str(e)) from None
    write_card(out, "reward model (verifier cross-encoder)", record)
    typer.echo(json.dumps({k: record[k] for k in ("steps", "seconds_per_step", "loss_first",
                                                   "loss_last50", "compute")}))
    typer.echo(f"wrote {out}")


def data_articles(questions: list[dict[str, Any]], paths: list[Path],
                  examples: Sequence[Example] = ()) -> list[str]:
    """The articles reward data comes from: its question markers' (generator data), its
    examples' own (every kind `citeqa train reward-data` writes: a copy without its
    ``.stats.json`` keeps them) and those the ``.stats.json`` beside it records (a red-team
    ``X.variants.jsonl`` has ``X.stats.json``). Hand-made data may record none."""
    found = [str(q.get("article") or "") for q in questions]
    found += [ex.article for ex in examples]
    for path in map(Path, paths):
        recorded = data_stats(path).get("articles")
        if isinstance(recorded, list):
            found += [str(a) for a in recorded]
    return found


def _check_trainable(data: VerifierData, paths: list[Path]) -> None:
    """ConfigError when reward data to train on comes from held-out articles."""
    from citeqa.evals.squad import check_training_articles

    check_training_articles(data_articles(data.questions, paths, data.examples),
                            ", ".join(map(str, paths)))


def _check_both_labels(data: VerifierData, names: str) -> None:
    """ConfigError when reward data to train on holds answers of one label only (a verifier
    trained on right answers alone learns nothing to tell them from wrong ones: it trained
    without a word)."""
    labels = {ex.label for ex in data.examples}
    if len(labels) < 2:
        held = f"only label {labels.pop()}" if labels else "no example"
        raise ConfigError(f"{names}: {held} ({len(data.examples)} examples); training needs "
                          "right answers (label 1) and wrong ones (label 0)")


def question_id(ex: Example) -> str:
    """The question an example is of: its group, a red-team one's seed ("rt:SEED:KIND")."""
    return ex.group.split(":")[1] if ex.group.startswith("rt:") else ex.group


def _reader_questions(path: Path) -> set[str]:
    """The ids of the questions an answerability reader's training file holds: a SQuAD file's
    questions, a red-team variants file's seeds (shown beside their made questions)."""
    from citeqa.errors import SourceError
    from citeqa.evals.squad import load_squad_questions

    with Path(path).open("rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if isinstance(row, dict) and "seed_id" in row:  # citeqa.redteam.maker.Variant lines
        rows = []
        for i, line in enumerate(Path(path).read_bytes().splitlines(), 1):
            try:
                rows.append(json.loads(line) if line.strip() else {})
            except ValueError:
                raise SourceError(f"{path}:{i} is not a red-team variant; the answerability "
                                  "reader's training data was changed since") from None
        return {str(r.get("seed_id", "")) for r in rows if isinstance(r, dict)}
    return {item.id for item in load_squad_questions(path)}


def trained_questions(reward_dir: Path) -> tuple[set[str], list[str]]:
    """The ids of the questions the cross-encoders of ``reward_dir`` were trained on: its
    verifier (and those it was trained further from) and its answerability reader, read from
    their recorded training data where those files are here; and the files that are not."""
    from citeqa.reward.answerability import SUBDIR
    from citeqa.reward.checkpoint import HEADS, read_config_json
    from citeqa.reward.data import load_verifier_data

    ids: set[str] = set()
    missing: list[str] = []

    def training_of(directory: Path) -> tuple[dict[str, Any], list[Path]]:
        """(its training record, the files of its training data that are here)"""
        training = read_config_json(directory).get("training")
        training = training if isinstance(training, dict) else {}
        names = [Path(str(n)) for n in training.get("data") or ()]
        missing.extend(str(n) for n in names if not n.is_file())
        return training, [n for n in names if n.is_file()]

    seen: set[Path] = set()
    directory: Path | None = Path(reward_dir)
    while directory is not None and directory.resolve() not in seen:
        seen.add(directory.resolve())
        training, files = training_of(directory)
        for name in files:
            ids |= {question_id(ex) for ex in load_verifier_data(name).examples}
        base = training.get("base")
        directory = Path(base) if isinstance(base, str) and (Path(base) / HEADS).is_file() \
            else None
    if (Path(reward_dir) / SUBDIR / "config.json").is_file():
        for name in training_of(Path(reward_dir) / SUBDIR)[1]:
            ids |= _reader_questions(name)
    return ids - {""}, missing


def _check_unseen(data: VerifierData, reward_dir: Path, names: str) -> None:
    """ConfigError when data to fit the combination on holds questions the verifier or the
    answerability reader was trained on: their scores there are surer than on unseen ones, and
    the fit would lean on them."""
    trained, missing = trained_questions(reward_dir)
    if missing:
        log.info("not found here, so not checked for questions in --data: the cross-encoders' "
                 "training data %s", ", ".join(missing))
    both = sorted({question_id(ex) for ex in data.examples} & trained)
    if both:
        raise ConfigError(
            f"{names} holds {len(both)} question(s) the verifier or answerability reader in "
            f"{reward_dir} was trained on "
            f"(e.g. {', '.join(both[:3])}): its scores there are surer than on unseen "
            "questions, so the combination would lean on them; make the data from other "
            "questions")


def _check_no_other_model(out: Path, what: str) -> None:
    """ConfigError when ``out`` holds a model that is no training of this command to resume
    (a copy of the shipped reward model, a reader in a verifier's place): training there
    wrote a fresh model over it."""
    from citeqa.reward.train import saved_progress

    if (Path(out) / "config.json").is_file() and saved_progress(Path(out)) is None:
        raise ConfigError(
            f"--out {out} holds a model that is not a training of {what} to resume (its "
            "config.json records none); training there would write over it: choose another "
            "--out (a reward directory's answerability reader goes in REWARD_DIR/answerability)")


def train_to_dir(data_paths: list[Path], out: Path, *, base: Path | None = None,
                 limit: int | None = None, threads: int | None = None, progress: bool = True,
                 cfg_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load data, build (or resume) the verifier in ``out``, train it; return its record."""
    import random

    import torch

    from citeqa.retrieval.embed import minilm_dir
    from citeqa.reward.checkpoint import HEADS, load_verifier, read_config
    from citeqa.reward.data import load_verifier_data
    from citeqa.reward.train import TrainConfig, saved_progress, train_verifier
    from citeqa.reward.verifier import Verifier

    _check_no_other_model(out, "a verifier")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**(cfg_kw or {}))
    data = load_verifier_data(data_paths)
    _check_trainable(data, data_paths)
    _check_both_labels(data, ", ".join(map(str, data_paths)))
    groups = data.groups()
    if limit is not None and limit < len(groups):
        groups = random.Random(cfg.seed).sample(groups, limit)
    base_dir = Path(base) if base else minilm_dir()
    if saved_progress(Path(out)) is not None:  # resume what an interrupted run saved
        read_config(Path(out))
        model, tokenizer, _ = load_verifier(Path(out))
        log.info("resuming the verifier in %s", out)
        if (base_dir / HEADS).is_file():  # its heads are the base verifier's, as at its start
            cfg = replace(cfg, members=model.members, hidden=model.hidden)
    elif (base_dir / HEADS).is_file():  # a verifier directory: train it further, heads included
        model, tokenizer, _ = load_verifier(base_dir)
        log.info("continuing from the verifier in %s", base_dir)
        if (model.members, model.hidden) != (cfg.members, cfg.hidden):
            log.warning("the verifier in %s has %d members of %d hidden units: trained as it is "
                        "(--members %d does not apply)", base_dir, model.members, model.hidden,
                        cfg.members)
            cfg = replace(cfg, members=model.members, hidden=model.hidden)
    else:
        encoder, tokenizer = base_encoder(base_dir)
        torch.manual_seed(cfg.seed)
        model = Verifier(encoder, members=cfg.members, hidden=cfg.hidden)
    extra = {
        "base": str(base) if base else "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
        "data": [str(p) for p in data_paths],
        "data_sha256": _digests(data_paths),  # data changed in place is another run
        "groups": len(groups),
        "examples": sum(len(g) for g in groups),
        "generators": data.generators,
    }
    return train_verifier(model, tokenizer, groups, cfg, out=out, extra=extra,
                          progress=progress)


@train_app.command("answerability")
@interruptible(SAVED)
def answerability(
    squad: Annotated[list[Path], path_option(
        "--squad", help="SQuAD 2.0 JSON whose questions (answerable and not) are shown with "
                        "their own paragraphs (repeatable); never calibration or evaluation "
                        "articles.")],
    out: Annotated[Path, path_option("--out", "-o", help="Reader directory (resumed); put it "
                                     "at REWARD_DIR/answerability to use it.")],
    redteam: Annotated[Path | None, path_option(
        "--redteam", help="Red-team variants JSONL (`citeqa train reward-data --from redteam` "
                          "writes OUT.variants.jsonl): each made question beside its original "
                          "on the same passage.")] = None,
    redteam_variants: Annotated[int, typer.Option(
        "--redteam-variants", min=0, help="Variants drawn from --redteam.")] = 2000,
    base: Annotated[Path | None, path_option(
        "--base", help="Local Hugging Face encoder directory (default: the packaged "
                       "all-MiniLM-L6-v2).")] = None,
    epochs: Annotated[float, float_option("--epochs", min=0.01)] = 1.0,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Examples per step.")] = 32,
    lr: Annotated[float, float_option("--lr", min=0.0)] = 5e-5,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    cpu_dtype: TrainCpuDtypeOpt = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=1,
                                            help="Steps between saves (resume points).")] = 100,
    progress: ProgressOpt = None,
) -> None:
    """Train the answerability reader (does this passage answer this question at all?), an
    optional input of the reward model's combination; writes --out and resumes there."""
    progress = shown_progress(progress)  # default: on a terminal only
    check_out(out, folder=True, inputs={"--squad": squad, "--base": base, "--redteam": redteam})
    try:
        with file_lock(out, "citeqa train answerability"):
            record = answerability_to_dir(
                squad, out, redteam=redteam, redteam_variants=redteam_variants, base=base,
                threads=threads, progress=progress,
                cfg_kw={"epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
                        "cpu_dtype": cpu_dtype, "save_every": save_every})
    except CiteqaError as e:
        raise fail(str(e)) from None
    write_card(out, "answerability reader", record)
    typer.echo(json.dumps({k: record[k] for k in ("steps", "seconds_per_step", "loss_first",
                                                   "loss_last50", "compute", "examples")}))
    typer.echo(f"wrote {out}; then `citeqa train reward-combine` with it in the reward directory")


def answerability_to_dir(squad: list[Path], out: Path, *, redteam: Path | None,
                         redteam_variants: int, base: Path | None = None,
                         threads: int | None = None, progress: bool = True,
                         cfg_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the examples, build (or resume) the reader in ``out``, train it; its record."""
    from collections import Counter

    import torch

    from citeqa.retrieval.embed import minilm_dir
    from citeqa.reward.answerability import Answerability, load_answerability
    from citeqa.reward.answerability_train import AnswerabilityConfig, train_answerability
    from citeqa.reward.train import saved_progress

    _check_no_other_model(out, "an answerability reader")
    if threads:
        torch.set_num_threads(threads)
    cfg = AnswerabilityConfig(**(cfg_kw or {}))
    examples = answerability_examples(squad, redteam, redteam_variants, cfg.seed)
    base_dir = Path(base) if base else minilm_dir()
    if saved_progress(Path(out)) is not None:
        model, tokenizer, _ = load_answerability(Path(out))
        log.info("resuming the answerability reader in %s", out)
    else:
        encoder, tokenizer = base_encoder(base_dir)
        torch.manual_seed(cfg.seed)
        model = Answerability(encoder)
    extra = {
        "base": str(base) if base else "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
        "data": [str(p) for p in squad] + ([str(redteam)] if redteam else []),
        "data_sha256": _digests([*squad, *([redteam] if redteam else [])]),
        "examples": len(examples),
        "answerable": sum(ex.label for ex in examples),
        "by_source": dict(sorted(Counter(ex.source for ex in examples).items())),
    }
    return train_answerability(model, tokenizer, examples, cfg, out=out, extra=extra,
                               progress=progress)


def answerability_examples(squad: list[Path], redteam: Path | None, redteam_variants: int,
                           seed: int) -> list[Labelled]:
    """The reader's examples, shuffled: each question of the ``squad`` files on its own
    paragraph, and ``redteam_variants`` variants of ``redteam`` drawn with ``seed`` beside
    their originals (answerability_data.py). ConfigError for held-out articles, SourceError
    for a file that is no variants file or data of one label."""
    import random

    from citeqa.errors import SourceError
    from citeqa.evals.squad import (
        check_not_held_out,
        check_training_articles,
        load_squad_questions,
    )
    from citeqa.redteam.maker import Variant
    from citeqa.training.answerability_data import (
        redteam_examples,
        sample_lines,
        squad_examples,
    )
    from citeqa.training.demos import squad_answer_starts
    from citeqa.training.verifier_data import plausible_answers

    examples: list[Labelled] = []
    for path in squad:
        questions = load_squad_questions(path)
        check_not_held_out(questions, f"--squad {path}")
        # (a question has answers or plausible answers: SQuAD 2.0's unanswerables the second)
        starts = {**squad_answer_starts(path, "plausible_answers"), **squad_answer_starts(path)}
        examples += squad_examples(questions, plausible_answers(path), starts)
    if redteam is not None and redteam_variants:
        try:
            variants = [Variant.from_json(json.loads(line))
                        for line in sample_lines(redteam, redteam_variants, seed)]
        except (OSError, ValueError, TypeError) as e:
            raise SourceError(f"{redteam} is not a red-team variants file ({e}); make one with "
                              "`citeqa train reward-data --from redteam`") from None
        check_training_articles([*data_articles([], [redteam]), *(v.article for v in variants)],
                                str(redteam))
        examples += redteam_examples(variants)
    random.Random(seed).shuffle(examples)
    if len({ex.label for ex in examples}) < 2:
        raise SourceError(f"{[str(p) for p in squad]}: the reader needs answerable and "
                          f"unanswerable questions, got {len(examples)} examples")
    return examples


CARD = "MODEL_CARD.md"


def write_card(out: Path, what: str, record: dict[str, Any]) -> None:
    """A MODEL_CARD.md for a trained directory that has none (one written by hand is kept):
    what it was trained from and on, and the data's licence."""
    from citeqa.training.cards import data_licence

    path = Path(out) / CARD
    if path.exists():
        return
    cfg = record.get("config", {})
    paths = [Path(d) for d in record.get("data", [])]
    articles = sorted(set(filter(None, data_articles([], paths))))
    made = [c for p in paths if isinstance(c := data_stats(p).get("command"), str)]
    shown = ", ".join(articles[:20]) + (f" and {len(articles) - 20} more" if len(articles) > 20
                                        else "")
    distractors = ("" if not any(MORE_TRAIN in str(x) for x in [*paths, *made]) else
                   f"\n  Data from `squad2/{MORE_TRAIN}` holds the questions of the distractor "
                   "articles: a model\n  trained on it has seen the distractor paragraphs of "
                   "the evaluation indexes.")
    licence = ("Apache-2.0 (all-MiniLM-L6-v2)" if "(packaged)" in str(record.get("base"))
               else "{LICENCE: name the base encoder's licence here}")
    text = f"""# citeqa {what}

Trained with citeqa {citeqa.__version__} from `{record.get("base", "?")}`.

## Training
- Data: {", ".join(f"`{d}`" for d in record.get("data", []))} (sha256
  {", ".join(record.get("data_sha256", []))}); {record.get("examples", "?")} examples
- Articles (as the data's .stats.json records them): {shown or "{ARTICLES: not recorded}"};
  made by {"; ".join(f"`{c}`" for c in made) or "{COMMANDS: not recorded}"}.{distractors}
- Steps: {record.get("steps")} of {record.get("total_steps")}, batch
  {cfg.get("batch_examples", cfg.get("batch"))}, lr {cfg.get("lr")}, seed {cfg.get("seed")},
  compute {record.get("compute")}; loss {record.get("loss_first")} -> {record.get("loss_last50")}
  (mean of the last 50 steps)

## Evaluation
{{EVAL: `citeqa calibrate` and `citeqa eval` figures on held-out questions, with their
commands}}

## Licences
The base encoder, `{record.get("base", "?")}`, keeps its own licence: {licence}; this directory
holds a fine-tuned copy of its weights.

{data_licence("Examples")}
"""
    write_text_atomic(path, text)


def _digests(paths: list[Path]) -> list[str]:
    """sha256 of each file, short: part of a training's run key (resuming compares it)."""
    from citeqa.retrieval.store import sha256_file

    return [sha256_file(Path(p))[:16] for p in paths]


def base_encoder(base_dir: Path) -> tuple[Any, Any]:
    """(fp32 encoder, tokenizer) of a local Hugging Face encoder directory to fine-tune."""
    from citeqa.reward.checkpoint import read_encoder

    return read_encoder(base_dir, "pass --base with a local Hugging Face encoder directory",
                        base=True)


@train_app.command("reward-combine")
def reward_combine(
    data: Annotated[list[Path], path_option(
        "--data", help="Generator reward data (with signals) of questions neither the "
                       "verifier nor the answerability reader trained on (repeatable); "
                       "questions of their recorded training data, where those files are "
                       "here, are refused.")],
    reward_dir: Annotated[Path, path_option("--reward", help="Verifier directory.")],
) -> None:
    """Fit how the verifier's score combines with the generator's log-probabilities, the
    retrieval score and, where the reward directory holds answerability/, the answerability
    reader (combine.json); the old calibration is removed: recalibrate after."""
    try:
        summary = combine_dir(data, reward_dir, cpu_dtype=cpu_dtype_setting())
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"now recalibrate: citeqa calibrate --reward {reward_dir} --data CAL.jsonl")


def combine_dir(data_paths: list[Path], reward_dir: Path, *,
                cpu_dtype: str = "auto") -> dict[str, Any]:
    """Score the candidates with the verifier alone (in ``cpu_dtype``, as the service will;
    and the answerability reader, where the directory holds one), fit the combiner, write
    combine.json (removing calibration.json, whose scores it changes); return the fit's
    figures."""
    import numpy as np

    from citeqa.errors import SourceError
    from citeqa.evals.metrics import auroc
    from citeqa.reward.answerability import SUBDIR, AnswerabilityReader
    from citeqa.reward.combine import Signals, features, fit, write_combiner
    from citeqa.reward.data import load_verifier_data
    from citeqa.reward.scorer import CALIBRATION, VerifierScorer

    data = load_verifier_data(data_paths)
    _check_trainable(data, data_paths)  # fitted on: no held-out article either
    names = ", ".join(map(str, data_paths))
    _check_unseen(data, Path(reward_dir), names)
    examples = [ex for ex in data.examples if ex.judged.quote]
    if not any(ex.signals for ex in examples):
        raise SourceError(f"{names}: no candidate carries generator signals; build the data "
                          "with `citeqa train reward-data --from generator`")
    items = [ex.judged for ex in examples]
    p, _ = VerifierScorer(reward_dir, combined=False, cpu_dtype=cpu_dtype).predict(items)
    reader = Path(reward_dir) / SUBDIR
    answerability = (AnswerabilityReader(reader, cpu_dtype=cpu_dtype).logits(items)
                     if reader.is_dir() else None)
    x = features(p, [Signals.of(ex.signals) for ex in examples], answerability)
    y = np.array([ex.label for ex in examples])
    try:
        combiner = fit(x, y, extra={"data": [str(d) for d in data_paths]})
    except ValueError as e:
        raise SourceError(f"{names}: {e}") from None
    figures = {"candidates": len(y), "right": int(y.sum()),
               "auroc_verifier": auroc(p, y), "auroc_combined": auroc(combiner(x), y),
               "weights": dict(zip(combiner.inputs, combiner.weights, strict=True))}
    if answerability is not None:
        figures["auroc_answerability"] = auroc(answerability, y)
    combiner = replace(combiner, extra={**(combiner.extra or {}), **figures})
    # the old calibration goes first: a kill between the two never leaves a threshold beside
    # a combination it was not fitted on (with none, the scorer asks for a calibration)
    (Path(reward_dir) / CALIBRATION).unlink(missing_ok=True)
    write_combiner(reward_dir, combiner)
    return figures


@interruptible("nothing was changed (calibration.json is replaced whole); run it again")
def calibrate(
    data: Annotated[list[Path], path_option(
        "--data", help="Calibration-split reward data (repeatable: each file's questions are "
                       "its own, never merged with another's of the same id).")],
    reward_dir: Annotated[Path, path_option("--reward", help="Reward-model directory.")],
    target: Annotated[
        float | None,
        float_option("--target", min=0.01, max=0.99,
                    help="Answered accuracy to guarantee. [default: 0.8]"),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option("--targets", metavar="T1,T2,...",
                     help="Instead of --target: the highest of these whose threshold answers "
                          "at least --min-coverage of the questions, each tested at "
                          "delta / (their number), so the choice keeps --delta."),
    ] = None,
    min_coverage: Annotated[
        float | None, float_option("--min-coverage", min=0.0, max=1.0,
                                  help="With --targets: the share of questions to answer. "
                                       "[default: 0.25]")
    ] = None,
    delta: Annotated[
        float, float_option("--delta", min=0.001, max=0.5, help="Allowed failure probability.")
    ] = 0.1,
    progress: ProgressOpt = None,
) -> None:
    """Choose the decline threshold on calibration data (Learn-then-Test); write
    calibration.json into the reward-model directory."""
    if target is not None and targets is not None:
        raise fail("give --target or --targets, not both")
    if min_coverage is not None and targets is None:  # (it was ignored)
        raise fail("--min-coverage goes with --targets (the highest of them that answers it)")
    try:
        # scored in the format the service scores in: CITEQA_CPU_DTYPE (was always "auto")
        cpu_dtype = cpu_dtype_setting()
        chosen = parse_targets(targets) if targets is not None else None
        summary = calibrate_dir(data, reward_dir, target=0.8 if target is None else target,
                                delta=delta, targets=chosen,
                                min_coverage=0.25 if min_coverage is None else min_coverage,
                                cpu_dtype=cpu_dtype, progress=shown_progress(progress))
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(summary, indent=2))


def parse_targets(text: str) -> list[float]:
    """Parse "0.40,0.45" into [0.4, 0.45]; each must lie in [0.01, 0.99], as --target."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--targets {text!r}: give numbers separated by commas") from None
    if not values or not all(0.01 <= v <= 0.99 for v in values):  # (NaN fails too)
        raise ConfigError(f"--targets {text!r}: give answered accuracies from 0.01 to 0.99 "
                          "(above 0.99 a request's target_accuracy declines every question)")
    return values


def certified_threshold(reward_dir: Path) -> float | None:
    """The threshold ``reward_dir``'s calibration.json certifies (None: none, or no file)."""
    try:
        value = json.loads((Path(reward_dir) / "calibration.json").read_text(
            encoding="utf-8")).get("threshold")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


MORE_TRAIN = "more-train.json"  # the distractor articles' questions (../shared/data/squad2)
CALIBRATE_CHUNK = 128  # candidates scored between two steps of calibrate's progress bar (8 batches)


def calibrate_dir(data_paths: list[Path], reward_dir: Path, *, target: float, delta: float,
                  targets: list[float] | None = None, min_coverage: float = 0.25,
                  cpu_dtype: str = "auto", progress: bool = False) -> dict[str, object]:
    """Score the calibration candidates (in ``cpu_dtype``, as the service will), run
    Learn-then-Test on each question's best one (at ``target``, or choosing among ``targets``:
    see ``calibrate.choose_target``), write calibration.json; return it without the
    per-question lists. A result that certifies no threshold is written too (it is what this
    data says), with a warning saying so and what it replaced (one question had turned a
    working threshold into none, nothing said)."""
    from tqdm.auto import tqdm

    from citeqa.evals.squad import answerable, check_calibration_articles
    from citeqa.reward.calibrate import calibrate_threshold, choose_target
    from citeqa.reward.combine import Signals
    from citeqa.reward.data import load_verifier_data
    from citeqa.reward.provenance import candidates_per_question
    from citeqa.reward.scorer import VerifierScorer, best_per_question, write_calibration

    seen: set[object] = set()
    for path in data_paths:  # the same file twice (a link too): each question would count twice
        try:
            stat = path.stat()
            same: object = (stat.st_dev, stat.st_ino)
        except OSError:  # (missing: loading says so)
            same = path.resolve()
        if same in seen:
            raise ConfigError(f"--data {path} is a file given before; give each file once")
        seen.add(same)
    data = load_verifier_data(data_paths)
    check_calibration_articles(data_articles(data.questions, data_paths, data.examples),
                               ", ".join(str(p) for p in data_paths))
    # a question in two files (two generators' answers, or two sets reusing ids) is two
    # questions: merged, it was scored as the best of both, certified for neither
    groups = data.groups(per_file=True)
    # questions whose generation gave no candidate at all are declines: keep them in n
    empty = data.unanswered(per_file=True)
    scorer = VerifierScorer(reward_dir, cpu_dtype=cpu_dtype, calibrated=False)  # (replaced)
    flat = [ex for g in groups for ex in g]
    scores: list[float] = []
    with tqdm(total=len(flat), desc="scoring", unit="candidate", disable=not progress) as bar:
        for at in range(0, len(flat), CALIBRATE_CHUNK):  # (1,600 candidates: ~3 min on 2 cores)
            part = flat[at:at + CALIBRATE_CHUNK]
            scored_part, _ = scorer.judge([ex.judged for ex in part],
                                          [Signals.of(ex.signals) for ex in part])
            scores += scored_part.tolist()
            bar.update(len(part))
    it = iter(scores)
    scored = [[(next(it), bool(ex.judged.quote), bool(ex.label)) for ex in g] for g in groups]
    scored += [[] for _ in empty]
    best_scores, correct = best_per_question(scored)
    min_answered = max(1, math.ceil(0.05 * len(scored)))  # fixed in advance (calibrate.py)
    if targets:
        cal = choose_target(best_scores, correct, targets=targets, min_coverage=min_coverage,
                            delta=delta, min_answered=min_answered)
    else:
        cal = calibrate_threshold(best_scores, correct, target_accuracy=target, delta=delta,
                                  min_answered=min_answered)
    if math.isinf(cal.threshold):
        before = certified_threshold(reward_dir)
        log.warning("no threshold is certified at target %s on these %d questions: write more "
                    "of them (docs/calibrate.md: how many), or lower the target; a server "
                    "declines every question with CITEQA_DECLINE_UNCERTIFIED=1, and without it "
                    "answers every one%s", cal.target_accuracy, cal.n,
                    "" if before is None else f" (this replaces {reward_dir / 'calibration.json'}"
                    f", which certified threshold {before:.4g})")
    answered = [answerable(g[0].golds) for g in groups] + [bool(q.get("answerable"))
                                                            for q in empty]
    extra = {
        "data": [str(p) for p in data_paths],
        "answerable_share": sum(answered) / max(len(answered), 1),
        "oracle_accuracy": float(correct.mean()),  # answered accuracy at full coverage
        # the answers certified: a service that differs is warned (provenance.py)
        "generators": data.generators,
        "candidates_per_question": candidates_per_question(data.questions),
    }
    if targets:
        extra["targets_tried"] = sorted(set(targets))
        extra["min_coverage"] = min_coverage
        extra["family_delta"] = delta  # the chosen target's guarantee; `delta` is per target
    path = write_calibration(reward_dir, best_scores, correct, cal, min_answered=min_answered,
                             extra=extra)
    body = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in body.items() if k not in ("scores", "correct")}
