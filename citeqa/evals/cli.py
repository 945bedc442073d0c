"""The ``citeqa eval`` command group: run an evaluation, or compare two runs.

    citeqa eval --dataset FILE --index DIR --out DIR [--limit N | --sample N] [--split eval] ...
    citeqa eval compare RUN_A RUN_B [--out FILE.png]

Register it on the main app with ``app.add_typer(eval_app, name="eval")``. Every user mistake
ends in a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from citeqa.cli_errors import (
    ProgressOpt,
    check_run_options,
    command_group,
    fail,
    float_option,
    interruptible,
    path_argument,
    path_option,
    settings_from,
    shown_progress,
    start_command,
)
from citeqa.config import MAX_CANDIDATES
from citeqa.errors import CiteqaError
from citeqa.logs import setup_logging

eval_app = command_group(
    help="Evaluate answer/decline accuracy on a question set, or compare two runs.",
    # a run takes no command ("citeqa eval --dataset F --index D --out R"); compare is one
    subcommand_metavar="[compare RUN_A RUN_B]",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@eval_app.callback(invoke_without_command=True)
@interruptible()
def run(
    ctx: typer.Context,
    dataset: Annotated[
        Path | None,
        path_option("--dataset", "-d",
                    help="SQuAD v1/v2 JSON or JSONL {id, question, answers} (required)."),
    ] = None,
    index: Annotated[
        Path | None, path_option("--index", "-i", help="Index directory to search (required).")
    ] = None,
    out: Annotated[
        Path | None, path_option("--out", "-o",
                                 help="Run directory (created; resumed) (required).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the first N questions.")
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=1,
                     help="A seeded random sample of N questions spread over the dataset."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --sample.")] = 0,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Only the articles of a split: eval | train | calibration."),
    ] = None,
    preset_name: Annotated[
        str, typer.Option("--preset", help="Settings preset: default | tiny (fakes).")
    ] = "default",
    min_score: Annotated[
        float | None,
        float_option("--min-score", min=0.0, max=1.0, help="Decline below this score."),
    ] = None,
    n_candidates: Annotated[
        int | None, typer.Option("--n-candidates", min=1, max=MAX_CANDIDATES,
                                 help="Candidates per question.")
    ] = None,
    answer_mode: Annotated[
        str | None, typer.Option("--answer-mode", help="span | free (default: "
                                 "$CITEQA_ANSWER_MODE, else the preset's).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Discard a previous run in --out (its own files) "
                           "and start over.")
    ] = False,
    progress: ProgressOpt = None,
) -> None:
    """Ask every question, write predictions.jsonl, metrics.json, report.md and figures."""
    progress = shown_progress(progress)  # default: on a terminal only
    if ctx.invoked_subcommand is not None:
        return
    missing = [
        flag
        for flag, v in (("--dataset", dataset), ("--index", index), ("--out", out))
        if v is None
    ]
    if missing:
        raise fail(f"missing {', '.join(missing)} (see citeqa eval --help)")
    assert dataset is not None and index is not None and out is not None
    check_run_options(preset=preset_name, out=out, index=index, answer_mode=answer_mode)
    settings_from(preset=preset_name, index=index)  # an invalid setting: one line, before work
    from citeqa.evals.runner import RunSpec, run_eval

    spec = RunSpec(
        dataset=dataset,
        index=index,
        preset=preset_name,
        split=split,
        min_score=min_score,
        n_candidates=n_candidates,
        answer_mode=answer_mode,
    )
    try:
        result = run_eval(spec, out, limit=limit, sample=sample, seed=seed, force=force,
                          progress=progress)
    except CiteqaError as e:
        raise fail(str(e)) from None
    except ValueError as e:  # pydantic validation of settings
        raise fail(str(e)) from None
    m = result.metrics
    acc = m["at_threshold"]["answered_accuracy"]
    typer.echo(
        f"{result.questions} questions ({result.resumed} resumed, {result.answered_now} asked): "
        f"SQuAD F1 {100 * m['squad']['f1']:.1f}, answered accuracy "
        f"{'n/a' if acc is None else f'{100 * acc:.1f} %'} at coverage "
        f"{100 * m['at_threshold']['coverage']:.1f} %, AURC {m['selective']['rm']['aurc']:.3f}"
    )
    if m.get("refused"):
        typer.echo(f"warning: {m['refused']} question{'' if m['refused'] == 1 else 's'} "
                   "refused by citeqa (empty or too long) or failed by its generator, counted "
                   "as declines; see "
                   "predictions.jsonl ('reason')", err=True)
    typer.echo(f"report: {result.out / 'report.md'}")


@eval_app.command("compare")
def compare(
    run_a: Annotated[Path, path_argument(help="Baseline run directory (A).")],
    run_b: Annotated[Path, path_argument(help="Run directory to compare with it (B).")],
    out: Annotated[
        Path | None,
        path_option("--out", "-o", help="Also write an overlay PNG of both accuracy–coverage "
                                        "curves to this path (none without it)."),
    ] = None,
) -> None:
    """Print key metrics of two runs side by side (B - A deltas); --out overlays their curves."""
    from citeqa.evals.compare import compare_runs

    if out is not None and out.suffix.lower() != ".png":
        raise fail(f"--out {out}: the overlay is a PNG image, so give a .png path "
                   "(the table goes to stdout: redirect it to keep it)")
    try:
        table = compare_runs(run_a, run_b, out)
    except CiteqaError as e:
        raise fail(str(e)) from None
    typer.echo(table)
    if out is not None:
        typer.echo(f"overlay: {out}")


def main() -> None:
    """Run the group on its own (``python -m citeqa.evals.cli``), before it is registered."""
    from citeqa.__main__ import guarded

    setup_logging()
    try:
        start_command()  # as the citeqa command does
    except typer.Exit as e:  # its one line is out
        raise SystemExit(e.exit_code) from None
    guarded(lambda: eval_app(prog_name="citeqa eval"))  # what the OS refuses: one line


if __name__ == "__main__":
    main()
