"""The ``citeqa`` command line: build an index, search it, ask cited questions, serve the API.

Every user mistake ends in a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from citeqa.cli_errors import fail
from citeqa.config import MAX_CANDIDATES, MAX_PASSAGES, MAX_SEARCH_K, Settings, preset
from citeqa.errors import CiteqaError

app = typer.Typer(
    name="citeqa",
    help="Cited question answering: answers with verified verbatim quotes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Build document indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
train_app = typer.Typer(help="Train models and build their training data.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def _register_subcommands() -> None:
    """Commands that live beside the code they drive (evaluation, training)."""
    from citeqa.evals.cli import eval_app
    from citeqa.redteam.cli import redteam
    from citeqa.reward.cli import calibrate
    from citeqa.reward.cli import train_app as reward_train_app
    from citeqa.training.cli import app as generator_train_app

    app.add_typer(eval_app, name="eval")
    train_app.registered_commands.extend(generator_train_app.registered_commands)
    train_app.registered_commands.extend(reward_train_app.registered_commands)
    app.command("calibrate")(calibrate)
    app.command("redteam")(redteam)


_register_subcommands()

log = logging.getLogger("citeqa")

# Options that are also service settings default to None: an explicit flag beats the CITEQA_*
# environment, which beats the Settings default (see _settings).
IndexDir = Annotated[
    Path | None,
    typer.Option("--index", "-i", help="Index directory (built by `citeqa index build`); "
                 "default $CITEQA_INDEX, else index/default."),
]
PresetOpt = Annotated[
    str, typer.Option("--preset", help="Named settings preset: default | tiny (fakes, no weights).")
]
SettingsPresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Named settings preset: default | tiny (fakes, no weights); "
                 "default $CITEQA_PRESET, else default."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _settings(**options: Any) -> Settings:
    """Settings from the options given (None = not given) over the CITEQA_* environment over the
    defaults; an invalid value ends the command (status 2) with a line naming the setting."""
    try:
        return Settings(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as e:
        raise fail(_settings_error(e)) from None


def _settings_error(e: ValidationError) -> str:
    """One line for the first invalid setting: its name and what is wrong with it."""
    first = e.errors()[0]
    name = ".".join(str(x) for x in first["loc"]) or "settings"
    return f"invalid {name}: {str(first['msg']).removeprefix('Value error, ')}"


def _open_index(index: Path) -> Path:
    """The index directory, recovered if a rebuild crashed mid-swap (store.recover_index, as
    ``Index.load`` does for search and ask); fails the command when there is no index."""
    from citeqa.retrieval.store import recover_index

    try:
        return recover_index(index)
    except CiteqaError as e:
        raise fail(f"not an index directory: {e}") from None


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@index_app.command("build")
def index_build(
    sources: Annotated[
        list[str], typer.Argument(help="Files, folders (recursive) and http(s) URLs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to (re)write.")],
    preset_name: PresetOpt = "default",
    bm25_only: Annotated[bool, typer.Option("--bm25-only", help="Skip the dense index.")] = False,
    hnsw: Annotated[
        bool, typer.Option("--hnsw", help="HNSW dense index (large corpora) instead of flat.")
    ] = False,
    max_chars: Annotated[
        int | None, typer.Option("--max-chars", help="Maximum passage length in characters.")
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option("--allow-private-urls", help="Allow fetching private/intranet addresses."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Build (or atomically rebuild) an index from SOURCES into --out."""
    from citeqa.retrieval import build_index

    try:
        cfg = preset(preset_name).retrieval
        if bm25_only:
            cfg = replace(cfg, dense=False)
        if hnsw:
            cfg = replace(cfg, faiss_index="hnsw")
        if max_chars is not None:
            if max_chars < 50:
                raise fail("--max-chars must be at least 50")
            cfg = replace(cfg, chunk=replace(cfg.chunk, max_chars=max_chars))
        summary = build_index(
            sources, out, cfg, allow_private_urls=allow_private_urls, progress=progress
        )
    except CiteqaError as e:
        raise fail(str(e)) from None
    for s in summary.skipped:
        typer.echo(f"skipped {s.source}: {s.reason}", err=True)
    typer.echo(
        f"indexed {summary.documents} documents as {summary.passages} passages into "
        f"{summary.out} in {summary.seconds:.1f} s ({len(summary.skipped)} sources skipped)"
    )


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    index: IndexDir = None,
    k: Annotated[int, typer.Option("-k", min=1, max=MAX_SEARCH_K, help="How many hits.")] = 5,
    mode: Annotated[
        str, typer.Option("--mode", help="hybrid | bm25 | dense (hybrid = reciprocal-rank fusion).")
    ] = "hybrid",
    as_json: JsonOpt = False,
) -> None:
    """Search an index; hits best first with document offsets."""
    from citeqa.retrieval import HybridRetriever

    if mode not in ("hybrid", "bm25", "dense"):
        raise fail(f"--mode must be hybrid, bm25 or dense, not {mode!r}")
    if not query.strip():
        raise fail("the query is empty")
    directory = _settings(index=index).index
    try:
        hits = HybridRetriever.open(directory).search(query, k, mode=mode)
    except CiteqaError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps([h.to_json() for h in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        typer.echo("no hits")
    for rank, h in enumerate(hits, 1):
        p = h.passage
        typer.echo(f"{rank}. {h.title}  [{h.source} {p.start}:{p.end}]  score={h.score:.4f}")
        typer.echo("   " + " ".join(p.text.split())[:300])


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    index: IndexDir = None,
    preset_name: SettingsPresetOpt = None,
    generator: Annotated[
        str | None,
        typer.Option("--generator", help="smollm2 | fake | a local Hugging Face model dir."),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", min=1, max=MAX_PASSAGES, help="Passages shown to the generator."),
    ] = None,
    n_candidates: Annotated[
        int | None,
        typer.Option("-n", "--candidates", min=1, max=MAX_CANDIDATES, help="Candidates."),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", min=0.0, max=1.0, help="Decline below this score."),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(
            "--target-accuracy",
            min=0.0,
            max=1.0,
            help="Decline below the calibrated threshold for this answered accuracy.",
        ),
    ] = None,
    answer_mode: Annotated[
        str | None,
        typer.Option("--answer-mode", help="span (the answer is words of its quote) | free."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer QUESTION with a verbatim quote from the index (or decline)."""
    if min_score is not None and target_accuracy is not None:
        raise fail("give --min-score or --target-accuracy, not both")
    from citeqa.pipeline import Pipeline

    settings = _settings(preset=preset_name, index=index, generator=generator)
    try:
        pipeline = Pipeline.from_settings(settings)
        answer = pipeline.ask(question, top_k=top_k, n_candidates=n_candidates,
                              min_score=min_score, target_accuracy=target_accuracy,
                              answer_mode=answer_mode)
    except CiteqaError as e:
        raise fail(str(e)) from None
    except ValueError as e:  # an option value the pipeline refuses
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(answer.to_json(), ensure_ascii=False, indent=2))
        return
    if answer.declined:
        typer.echo(f"declined: {answer.reason}")
        return
    q = answer.quote
    assert q is not None, answer
    score = "n/a" if answer.score is None else f"{answer.score:.3f}"
    typer.echo(f"answer: {answer.answer}")
    typer.echo(f'quote:  "{q.text}"')
    typer.echo(f"source: {q.title} ({q.source}, characters {q.start}-{q.end})")
    typer.echo(f"score:  {score}")


@app.command()
def serve(
    index: IndexDir = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    preset_name: SettingsPresetOpt = None,
) -> None:
    """Serve the REST API (and the page at /) over an index."""
    import uvicorn

    from citeqa.api import create_app

    settings = _settings(preset=preset_name, index=index)
    _open_index(settings.index)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
