"""The ``citeqa`` command line: build an index, search it, ask cited questions, serve the API.

Every user mistake ends in a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from citeqa.allocator import keep_freed_memory
from citeqa.cli_errors import (
    ProgressOpt,
    check_answer_mode,
    command_group,
    fail,
    shown_progress,
)
from citeqa.config import MAX_CANDIDATES, MAX_PASSAGES, MAX_SEARCH_K, Settings, preset
from citeqa.errors import CiteqaError
from citeqa.logs import setup_logging
from citeqa.types import Answer, Candidate, Document

app = command_group(
    name="citeqa",
    help="Cited question answering: answers with verified verbatim quotes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = command_group(help="Build document indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
train_app = command_group(help="Train models and build their training data.",
                          no_args_is_help=True)
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


def _count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1 (``1 document``, ``3 documents``)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


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
    if name in Settings.model_fields:  # given as an option or as its environment variable
        name = f"{name} (CITEQA_{name.upper()})"
    return f"invalid {name}: {str(first['msg']).removeprefix('Value error, ')}"


def _open_index(index: Path) -> Path:
    """The index directory, recovered if a rebuild crashed mid-swap (store.recover_index, as
    ``Index.load`` does for search and ask); fails the command when there is no index."""
    from citeqa.retrieval.store import recover_index

    try:
        return recover_index(index)
    except CiteqaError as e:
        raise fail(f"not an index directory: {e}") from None


def _print_version(value: bool) -> None:
    if value:
        import citeqa

        typer.echo(f"citeqa {citeqa.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v",
        help="Log debug details, and what libraries narrate while loading (FAISS's build, "
             "a progress bar per model read).")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print citeqa's version and exit.")] = False,
) -> None:
    setup_logging(verbose)
    keep_freed_memory()


@index_app.command("build")
def index_build(
    sources: Annotated[
        list[str], typer.Argument(help="Files, folders (recursive) and http(s) URLs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to (re)write.")],
    preset_name: PresetOpt = "default",
    bm25_only: Annotated[bool, typer.Option("--bm25-only", help="Skip the dense index.")] = False,
    hnsw: Annotated[
        bool, typer.Option("--hnsw", help="Same as --dense-index hnsw.")
    ] = False,
    dense_index: Annotated[
        str,
        typer.Option("--dense-index", help="flat (exact) | hnsw (approximate, for millions of "
                     "passages) | ivf (approximate, quicker to build, slower to search) | auto "
                     "(flat below 100k passages, else hnsw)."),
    ] = "auto",
    nprobe: Annotated[
        int | None,
        typer.Option("--nprobe", min=1,
                     help="IVF: cells searched per query (recall vs speed; default 128)."),
    ] = None,
    nlist: Annotated[
        int | None,
        typer.Option("--nlist", min=1, help="IVF: cells; default about sqrt(passages)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="Build on Ray: 'local' (this machine) or a cluster address "
                     "(HEAD:6379, ray://HEAD:10001, auto); resumable. Needs citeqa[ray]."),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option("--work-dir", help="--ray: where shards wait for the merge (default "
                     ".OUT.build beside OUT); on a cluster, storage every node mounts."),
    ] = None,
    embedders: Annotated[
        int | None,
        typer.Option("--embedders", min=1, help="--ray: embedding actors (default: one per "
                     "GPU, else one per CPU)."),
    ] = None,
    shard_chars: Annotated[
        int | None,
        typer.Option("--shard-chars", min=1, help="--ray: characters of documents per shard "
                     "(the unit of work and of resuming; default 2,000,000)."),
    ] = None,
    max_chars: Annotated[
        int | None, typer.Option("--max-chars", help="Maximum passage length in characters.")
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option("--allow-private-urls", help="Allow fetching private/intranet addresses."),
    ] = False,
    if_missing: Annotated[
        bool,
        typer.Option("--if-missing", help="Build only when --out holds no index (one a crash "
                     "left mid-swap is restored, not rebuilt); for start scripts."),
    ] = False,
    progress: ProgressOpt = None,
) -> None:
    """Build (or atomically rebuild) an index from SOURCES into --out."""
    progress = shown_progress(progress)  # default: on a terminal only
    from citeqa.retrieval import build_index
    from citeqa.retrieval.dense import KINDS, DenseSpec
    from citeqa.retrieval.store import recover_index

    if hnsw and dense_index not in ("auto", "hnsw"):
        raise fail(f"--hnsw contradicts --dense-index {dense_index}; give one of them")
    if dense_index not in KINDS:
        raise fail(f"--dense-index must be one of {', '.join(KINDS)}, not {dense_index!r}")
    if ray is None and (work_dir or embedders or shard_chars):
        raise fail("--work-dir, --embedders and --shard-chars only apply with --ray")
    if (nprobe or nlist) and (dense_index != "ivf" or bm25_only):
        raise fail("--nprobe and --nlist only apply with --dense-index ivf")
    if bm25_only and (hnsw or dense_index != "auto"):
        raise fail("--bm25-only builds no dense index: drop --hnsw / --dense-index")
    if if_missing:
        with contextlib.suppress(CiteqaError):  # no index there: build it
            recover_index(out)
            typer.echo(f"{out} holds an index already; not rebuilt (--if-missing)")
            return
    from citeqa.ingest.sources import is_url

    # a path named here that is not there is a mistake, not a source to skip: a rebuild would
    # swap in an index without its documents (files inside a named folder are still skipped)
    missing = [s for s in sources if not is_url(s) and not os.path.lexists(s)]
    if missing:
        raise fail(f"no such file or folder: {', '.join(map(_squash, missing))}; nothing was "
                   f"built (an index at {out}, if any, is as it was)")
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
        spec = DenseSpec(kind="hnsw" if hnsw else dense_index,  # type: ignore[arg-type]
                         hnsw_m=cfg.hnsw_m, nlist=nlist,
                         **({"nprobe": nprobe} if nprobe is not None else {}))
        if ray is not None:
            from citeqa.distributed import RayExecutor, RayOptions, build_index_sharded
            from citeqa.retrieval.shards import SHARD_CHARS

            summary = build_index_sharded(
                sources, out, cfg, executor=RayExecutor(RayOptions(ray, embedders=embedders)),
                work_dir=work_dir, shard_chars=shard_chars or SHARD_CHARS, dense_spec=spec,
                allow_private_urls=allow_private_urls, progress=progress,
            )
        else:
            summary = build_index(sources, out, cfg, allow_private_urls=allow_private_urls,
                                  progress=progress, dense_spec=spec)
    except CiteqaError as e:
        raise fail(str(e)) from None
    except OSError as e:  # the output's file system: read-only, full, ...
        raise fail(f"could not build the index into {out}: {e}; the index there, if any, is "
                   "as it was") from None
    except KeyboardInterrupt:
        again = ("run the same command again: it reuses the shards already built"
                 if ray is not None else "run the same command again to build it")
        typer.echo(f"\ninterrupted: {out} is not left half-written (a build swaps a finished "
                   f"index in whole); {again}", err=True)
        raise typer.Exit(130) from None
    for s in summary.skipped:
        typer.echo(f"skipped {_squash(s.source)}: {_squash(s.reason)}", err=True)
    shards = (f"; {_count(summary.shards, 'shard')}, {summary.shards_reused} reused from an "
              "interrupted run" if ray is not None else "")
    typer.echo(
        f"indexed {_count(summary.documents, 'document')} as "
        f"{_count(summary.passages, 'passage')} into {summary.out} in {summary.seconds:.1f} s "
        f"({_count(len(summary.skipped), 'source')} skipped{shards})"
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
    from citeqa.pipeline import asked_text
    from citeqa.retrieval import HybridRetriever

    if mode not in ("hybrid", "bm25", "dense"):
        raise fail(f"--mode must be hybrid, bm25 or dense, not {mode!r}")
    directory = _settings(index=index).index
    try:
        query = asked_text(query, "query")
        log.info("loading the index %s ...", directory)
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
        where = h.source or p.doc_id  # a document posted without a source has none
        # documents are untrusted: no escape sequence of theirs reaches the terminal
        typer.echo(f"{rank}. {_squash(h.title)}  [{_squash(where)} {p.start}:{p.end}]  "
                   f"score={h.score:.4f}")
        typer.echo("   " + _squash(" ".join(p.text.split()))[:300])


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
            help="Decline below the calibrated threshold for this answered accuracy, between 0 "
            "and 1 (a target "
            "that no threshold certifies declines every question; the reason says up to which "
            "target the calibration certifies).",
        ),
    ] = None,
    answer_mode: Annotated[
        str | None,
        typer.Option("--answer-mode", help="span (the quote holds the answer) | free."),
    ] = None,
    as_json: JsonOpt = False,
    with_passages: Annotated[
        bool, typer.Option("--with-passages", help="--json: add the passages retrieval found "
                           "(REST's with_passages).")
    ] = False,
) -> None:
    """Answer QUESTION with a verbatim quote from the index (or decline)."""
    if with_passages and not as_json:
        raise fail("--with-passages adds to --json; the text output lists passages under a "
                   "decline")
    if min_score is not None and target_accuracy is not None:
        raise fail("give --min-score or --target-accuracy, not both")
    if target_accuracy is not None and not 0.0 < target_accuracy < 1.0:
        raise fail(f"--target-accuracy must be between 0 and 1 (exclusive), got {target_accuracy}")
    check_answer_mode(answer_mode)  # before the models load (seconds), not after
    from citeqa.pipeline import Pipeline, asked_text

    settings = _settings(preset=preset_name, index=index, generator=generator)
    try:
        asked_text(question)  # refused before any model loads
        pipeline = Pipeline.from_settings(settings)
        answer = pipeline.ask(question, top_k=top_k, n_candidates=n_candidates,
                              min_score=min_score, target_accuracy=target_accuracy,
                              answer_mode=answer_mode)
    except CiteqaError as e:
        raise fail(str(e)) from None
    except ValueError as e:  # an option value the pipeline refuses
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(answer.to_json(with_passages=with_passages),
                              ensure_ascii=False, indent=2))
        return
    # Bold and underlined on a terminal; typer.echo drops the styling when piped.
    typer.echo(format_answer(answer, pipeline.document,
                             mark=lambda s: typer.style(s, bold=True, underline=True)))


# -- ask's text output ------------------------------------------------------------------------

CONTEXT_CHARS = 80  # characters of the document shown either side of a quote
PASSAGES_SHOWN = 3  # passages listed under a decline
PASSAGE_CHARS = 160  # characters of each listed passage


def _squash(text: str) -> str:
    """``text`` on one line, with control characters shown as U+FFFD: documents are untrusted,
    and an escape sequence in one must not drive the reader's terminal."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "\ufffd", re.sub(r"\s+", " ", text))


def quote_in_context(text: str | None, candidate: Candidate, *, chars: int = CONTEXT_CHARS,
                     mark: Callable[[str], str] = str) -> str:
    """The candidate's quote in curly quotes, with its answer passed through ``mark`` and up to
    ``chars`` characters of the document either side (whole words, whitespace collapsed), so
    that a reader sees where it stands. ``text`` None (document unknown): the quote alone."""
    q = candidate.quote
    assert q is not None, candidate
    a, b = candidate.answer_start, candidate.answer_end
    quote = q.text
    if a is not None and b is not None and q.start <= a <= b <= q.end:
        a, b = a - q.start, b - q.start
        quote = _squash(quote[:a]) + mark(_squash(quote[a:b])) + _squash(quote[b:])
    else:
        quote = _squash(quote)
    if text is None:
        return f"\u201c{quote.strip()}\u201d"
    before, after = text[max(0, q.start - chars):q.start], text[q.end:q.end + chars]
    if q.start > chars:  # cut inside the document: drop the broken word, show the cut
        before = "\u2026" + re.sub(r"^\S*\s+", "", before)
    if q.end + chars < len(text):
        after = re.sub(r"\s+\S*$", "", after) + "\u2026"
    return f"{_squash(before).lstrip()}\u201c{quote}\u201d{_squash(after).rstrip()}"


def _cited_lines(candidate: Candidate, text: str | None, indent: str,
                 mark: Callable[[str], str]) -> list[str]:
    q = candidate.quote
    assert q is not None, candidate
    score = "n/a" if candidate.score is None else f"{candidate.score:.3f}"
    return [f"{indent}answer: {_squash(candidate.answer)}",
            f"{indent}quote:  {quote_in_context(text, candidate, mark=mark)}",
            f"{indent}source: {_squash(q.title)} ({_squash(q.source)}, characters "
            f"{q.start}-{q.end})",
            f"{indent}score:  {score}"]


def format_answer(answer: Answer, document: Callable[[str], Document], *,
                  mark: Callable[[str], str] = str) -> str:
    """``citeqa ask``'s text: the answer with its quote in context, source and score; or, on a
    decline, why, the best guess (marked as not confident) and the passages retrieval found,
    so the reader can judge for themselves. ``document`` looks up a quote's document."""

    def text_of(doc_id: str) -> str | None:
        try:
            return document(doc_id).text
        except KeyError:
            return None

    if not answer.declined:
        assert answer.quote is not None, answer
        given = Candidate(answer.answer or "", answer.quote, score=answer.score,
                          answer_start=answer.answer_start, answer_end=answer.answer_end)
        return "\n".join(_cited_lines(given, text_of(answer.quote.doc_id), "", mark))
    lines = [f"declined: {_squash(answer.reason or 'no reason given')}"]
    best = next((c for c in answer.candidates if c.quote is not None), None)
    if best is not None:
        assert best.quote is not None
        lines += ["best guess (not confident enough to answer):",
                  *_cited_lines(best, text_of(best.quote.doc_id), "  ", mark)]
    if answer.passages:
        lines.append("passages retrieval found:")
    for i, hit in enumerate(answer.passages[:PASSAGES_SHOWN], 1):
        p = hit.passage
        snippet = _squash(p.text).strip()
        if len(snippet) > PASSAGE_CHARS:
            snippet = snippet[:PASSAGE_CHARS].rsplit(" ", 1)[0] + "\u2026"
        lines += [f"  {i}. {_squash(hit.title)} ({_squash(hit.source)}, characters "
                  f"{p.start}-{p.end})  "
                  f"score {hit.score:.3f}", f"     {snippet}"]
    return "\n".join(lines)


@app.command()
def serve(
    index: IndexDir = None,
    host: Annotated[str, typer.Option(help="Interface to bind. On a loopback address the "
                                      "service answers only to localhost names in Host (see "
                                      "CITEQA_ALLOWED_HOSTS).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    preset_name: SettingsPresetOpt = None,
) -> None:
    """Serve the REST API (and the page at /) over an index."""
    import socket

    import uvicorn

    if not host.strip():  # e.g. --host "$HOST" with HOST unset: it bound every interface
        raise fail("--host is empty: give the interface to bind (127.0.0.1: this machine only; "
                   "0.0.0.0: every interface)")
    try:  # a name that does not resolve failed only after the models loaded
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise fail(f"cannot bind --host {host}: {e}") from None

    from citeqa.api import create_app
    from citeqa.api.middleware import LOOPBACK_HOSTS

    settings = _settings(preset=preset_name, index=index)
    _open_index(settings.index)
    if not settings.allowed_hosts.strip() and _is_loopback(host):
        bound = f"[{host.strip('[]')}]" if ":" in host else host  # clients name it so in Host
        names = dict.fromkeys([*LOOPBACK_HOSTS, bound])
        settings = settings.model_copy(update={"allowed_hosts": ",".join(names)})
    # a stop waits for requests in flight at most the grace (uvicorn waited for every one, up to
    # its own timeout: a container's stop period passed and it was killed mid-answer); what is
    # still queued then is cancelled, and the running batch stops at its next step
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)))


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to bind) is this machine only."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
