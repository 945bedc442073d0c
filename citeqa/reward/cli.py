"""Reward-model commands: train, calibrate (``citeqa train reward-data`` lives with the other
training-data builders in citeqa/training/cli.py).

The main CLI registers them (see citeqa/cli.py):

    app.add_typer(train_app, name="train")        # citeqa train reward
    app.command("calibrate")(calibrate)           # citeqa calibrate
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from citeqa.cli_errors import fail
from citeqa.errors import CiteqaError

if TYPE_CHECKING:
    from citeqa.reward.train import TrainConfig

log = logging.getLogger(__name__)

train_app = typer.Typer(help="Train models (the reward model and its data).", no_args_is_help=True)


@train_app.command("reward")
def reward(
    data: Annotated[list[Path], typer.Option("--data", help="Reward-data JSONL (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the reward model.")],
    embedder: Annotated[str, typer.Option("--embedder", help="minilm | hash.")] = "minilm",
    scalars_only: Annotated[
        bool, typer.Option("--scalars-only", help="No embedding features.")
    ] = False,
    members: Annotated[int, typer.Option("--members", min=1, max=64)] = 5,
    hidden: Annotated[int, typer.Option("--hidden", min=0, help="0 = logistic.")] = 32,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 300,
    uncertainty_penalty: Annotated[
        float, typer.Option("--uncertainty-penalty", min=0.0, help="score = mean - c * std.")
    ] = 0.0,
    soft_labels: Annotated[
        bool, typer.Option("--soft-labels", help="Label term on F1 targets (graded).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train the reward ensemble on labelled candidates and/or pairs; write --out."""
    from citeqa.reward.train import TrainConfig

    try:
        metrics = train_to_dir(
            data, out, embedder=embedder, embeddings=not scalars_only,
            cfg=TrainConfig(
                members=members, hidden=hidden, epochs=epochs, seed=seed, soft_labels=soft_labels
            ),
            uncertainty_penalty=uncertainty_penalty,
        )
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"wrote {out}")


def train_to_dir(
    data_paths: list[Path],
    out: Path,
    *,
    embedder: str = "minilm",
    embeddings: bool = True,
    cfg: TrainConfig | None = None,
    uncertainty_penalty: float = 0.0,
) -> dict[str, object]:
    """Load data, train, save model.safetensors + config.json into ``out``; return metrics."""
    from citeqa.retrieval.embed import load_embedder
    from citeqa.reward.data import load_reward_data
    from citeqa.reward.features import FeatureSpec
    from citeqa.reward.model import save_model
    from citeqa.reward.train import train_reward

    data = load_reward_data(data_paths)
    emb = load_embedder(embedder)
    spec = FeatureSpec(embedder=embedder, embedding_dim=emb.dim, embeddings=embeddings)
    model, metrics = train_reward(data, spec, emb if embeddings else None, cfg)
    extra = {
        "embedder_id": emb.model_id,
        "uncertainty_penalty": uncertainty_penalty,
        "generators": data.generators,
        "data": [str(p) for p in data_paths],
        "metrics": metrics,
    }
    save_model(out, model, spec, extra)
    return metrics


def calibrate(
    data: Annotated[list[Path], typer.Option("--data", help="Calibration-split reward data.")],
    reward_dir: Annotated[Path, typer.Option("--reward", help="Reward-model directory.")],
    target: Annotated[
        float, typer.Option("--target", min=0.01, max=0.99, help="Answered accuracy to guarantee.")
    ] = 0.8,
    delta: Annotated[
        float, typer.Option("--delta", min=0.001, max=0.5, help="Allowed failure probability.")
    ] = 0.1,
    n: Annotated[
        int | None, typer.Option("-n", help="Use generations of n samples (default: largest).")
    ] = None,
) -> None:
    """Choose the decline threshold on calibration data (Learn-then-Test); write
    calibration.json into the reward-model directory."""
    try:
        summary = calibrate_dir(data, reward_dir, target=target, delta=delta, n=n)
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(summary, indent=2))


def calibrate_dir(
    data_paths: list[Path],
    reward_dir: Path,
    *,
    target: float,
    delta: float,
    n: int | None = None,
) -> dict[str, object]:
    """Score the calibration data, run Learn-then-Test, write calibration.json; return it
    without the per-question lists."""
    import math

    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.data import group_by_question, load_reward_data
    from citeqa.reward.scorer import RewardScorer, best_per_question, write_calibration

    data = load_reward_data(data_paths)
    scorer = RewardScorer(reward_dir)
    n = n or max((item.n for item in data.labelled), default=1)
    groups = group_by_question(data.labelled, n)
    if not groups:
        raise CiteqaError(f"no labelled candidates from generations of n={n} in {data_paths}")
    flat = [item for g in groups for item in g]
    scores, _ = scorer.predict([item.input for item in flat])
    it = iter(scores.tolist())
    scored = [[(next(it), x.input.quote_valid, bool(x.label)) for x in g] for g in groups]
    best_scores, correct = best_per_question(scored)
    min_answered = max(1, math.ceil(0.05 * len(groups)))  # fixed in advance (calibrate.py)
    cal = calibrate_threshold(
        best_scores, correct, target_accuracy=target, delta=delta, min_answered=min_answered
    )
    answerable = [g[0].answerable for g in groups]
    extra = {
        "data": [str(p) for p in data_paths],
        "n_candidates": n,
        "answerable_share": sum(answerable) / len(answerable),
        "oracle_accuracy": float(correct.mean()),  # answered accuracy at full coverage
        "generators": data.generators,
    }
    path = write_calibration(
        reward_dir, best_scores, correct, cal, min_answered=min_answered, extra=extra
    )
    body = json.loads(path.read_text())
    return {k: v for k, v in body.items() if k not in ("scores", "correct")}
