"""The ``citeqa`` command line: build an index, search it, ask cited questions, serve the API.

Every user mistake ends in a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from typing import Annotated, Any

import typer

from citeqa.cli_errors import (
    IndexDir,
    JsonOpt,
    check_answer_mode,
    command_group,
    fail,
    float_option,
    interruptible,
    json_text,
    open_index_dir,
    settings_from,
    squash,
    start_command,
)
from citeqa.config import MAX_CANDIDATES, MAX_PASSAGES, MAX_SEARCH_K
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
train_app = command_group(help="Train models and build their training data.",
                          no_args_is_help=True)
app.add_typer(train_app, name="train")


def _register_subcommands() -> None:
    """Commands that live beside the code they drive (evaluation, training)."""
    from citeqa.evals.cli import eval_app
    from citeqa.index_cli import index_app
    from citeqa.redteam.cli import redteam
    from citeqa.training.cli import app as generator_train_app
    from citeqa.training.reward_cli import calibrate
    from citeqa.training.reward_cli import train_app as reward_train_app

    app.add_typer(index_app, name="index")
    app.add_typer(eval_app, name="eval")
    train_app.registered_commands.extend(generator_train_app.registered_commands)
    train_app.registered_commands.extend(reward_train_app.registered_commands)
    app.command("calibrate")(calibrate)
    app.command("redteam")(redteam)


_register_subcommands()

log = logging.getLogger("citeqa")

SettingsPresetOpt = Annotated[
    str | None,
    typer.Option("--preset", help="Named settings preset: default | tiny (fakes, no weights); "
                 "default $CITEQA_PRESET, else default."),
]


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
    start_command()


@app.command()
@interruptible("nothing was changed")
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
    directory = settings_from(index=index).index
    try:
        query = asked_text(query, "query")
        log.info("loading the index %s ...", directory)
        hits = HybridRetriever.open(directory).search(query, k, mode=mode)
    except CiteqaError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json_text([h.to_json() for h in hits]))
        return
    if not hits:
        typer.echo("no hits")
    for rank, h in enumerate(hits, 1):
        p = h.passage
        where = h.source or p.doc_id  # a document posted without a source has none
        # documents are untrusted: no escape sequence of theirs reaches the terminal
        typer.echo(f"{rank}. {squash(h.title)}  [{squash(where)} {p.start}:{p.end}]  "
                   f"score={h.score:.4f}")
        typer.echo("   " + snippet(p.text, HIT_CHARS))


@app.command()
@interruptible("nothing was changed")
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
        float_option("--min-score", min=0.0, max=1.0, help="Decline below this score."),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        float_option(
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

    # --generator beats CITEQA_GENERATOR_URL as it beats CITEQA_GENERATOR ("" = unset)
    settings = settings_from(preset=preset_name, index=index, generator=generator,
                             generator_url="" if generator is not None else None)
    try:
        asked_text(question)  # refused before any model loads
        pipeline = Pipeline.from_settings(settings)
    except (CiteqaError, ValueError) as e:
        raise fail(str(e)) from None
    try:  # (a remote engine's call in flight ends with it: Ctrl-C waited out its timeout)
        answer = pipeline.ask(question, top_k=top_k, n_candidates=n_candidates,
                              min_score=min_score, target_accuracy=target_accuracy,
                              answer_mode=answer_mode)
    except CiteqaError as e:
        raise fail(str(e)) from None
    except ValueError as e:  # an option value the pipeline refuses
        raise fail(str(e)) from None
    finally:
        pipeline.close()
    if as_json:
        typer.echo(json_text(answer.to_json(with_passages=with_passages)))
        return
    # Bold and underlined on a terminal; typer.echo drops the styling when piped, and none is
    # asked where NO_COLOR is set or the terminal is dumb (https://no-color.org)
    plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
    typer.echo(format_answer(answer, pipeline.document, mark=str if plain else
                             lambda s: typer.style(s, bold=True, underline=True)))


# -- ask's text output ------------------------------------------------------------------------

CONTEXT_CHARS = 80  # characters of the document shown either side of a quote
PASSAGES_SHOWN = 3  # passages listed under a decline
PASSAGE_CHARS = 160  # characters of each listed passage
HIT_CHARS = 300  # ... of each hit `citeqa search` lists


def snippet(text: str, chars: int) -> str:
    """``text`` on one line, cut before ``chars`` characters with an ellipsis where it is
    longer: at a space in the last half, else where it reaches (Chinese or Japanese text has
    no spaces, nor does a long URL)."""
    line = squash(text).strip()
    if len(line) <= chars:
        return line
    cut = line[:chars]
    space = line[:chars + 1].rfind(" ")  # (a word ending at the limit is whole)
    return (cut[:space] if space > chars // 2 else cut).rstrip() + "\u2026"


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
        quote = squash(quote[:a]) + mark(squash(quote[a:b])) + squash(quote[b:])
    else:
        quote = squash(quote)
    if text is None:
        return f"\u201c{quote.strip()}\u201d"
    before, after = text[max(0, q.start - chars):q.start], text[q.end:q.end + chars]
    if q.start > chars:  # cut inside the document: drop the broken word, show the cut
        before = "\u2026" + re.sub(r"^\S*\s+", "", before)
    if q.end + chars < len(text):
        after = re.sub(r"\s+\S*$", "", after) + "\u2026"
    return f"{squash(before).lstrip()}\u201c{quote}\u201d{squash(after).rstrip()}"


def _place(source: str, start: int, end: int) -> str:
    """Where a text lies: its document's source (when it has one) and its characters."""
    where = f"characters {start}-{end}"
    return f"{squash(source)}, {where}" if source else where


def _cited_lines(candidate: Candidate, text: str | None, indent: str,
                 mark: Callable[[str], str]) -> list[str]:
    q = candidate.quote
    assert q is not None, candidate
    score = "n/a" if candidate.score is None else f"{candidate.score:.3f}"
    return [f"{indent}answer: {squash(candidate.answer)}",
            f"{indent}quote:  {quote_in_context(text, candidate, mark=mark)}",
            f"{indent}source: {squash(q.title)} ({_place(q.source, q.start, q.end)})",
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
    lines = [f"declined: {squash(answer.reason or 'no reason given')}"]
    best = next((c for c in answer.candidates if c.quote is not None), None)
    if best is not None:
        assert best.quote is not None
        lines += ["best guess (not confident enough to answer):",
                  *_cited_lines(best, text_of(best.quote.doc_id), "  ", mark)]
    if answer.passages:
        lines.append("passages retrieval found:")
    for i, hit in enumerate(answer.passages[:PASSAGES_SHOWN], 1):
        p = hit.passage
        lines += [f"  {i}. {squash(hit.title)} ({_place(hit.source, p.start, p.end)})  "
                  f"score {hit.score:.3f}", f"     {snippet(p.text, PASSAGE_CHARS)}"]
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
    import errno
    import socket

    if not host.strip():  # e.g. --host "$HOST" with HOST unset: it bound every interface
        raise fail("--host is empty: give the interface to bind (127.0.0.1: this machine only; "
                   "0.0.0.0: every interface)")
    try:  # a name that does not resolve failed only after the models loaded
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise fail(f"cannot bind --host {host}: {e}") from None
    try:  # ... and a port in use, after the whole start, in uvicorn's log lines (status 3)
        _probe_bind(addresses)
    except OSError as e:
        in_use = e.errno == errno.EADDRINUSE
        raise fail(f"cannot listen on {host} port {port}: " + (
            "another process listens there; give another --port, or stop that one"
            if in_use else str(e.strerror or e))) from None

    from citeqa.api import create_app, server
    from citeqa.api.middleware import LOOPBACK_HOSTS
    from citeqa.api.protocol import head_timeout_protocol

    settings = settings_from(preset=preset_name, index=index)
    open_index_dir(settings.index)
    if not settings.allowed_hosts.strip() and _is_loopback(host):
        bound = f"[{host.strip('[]')}]" if ":" in host else host  # clients name it so in Host
        names = dict.fromkeys([*LOOPBACK_HOSTS, bound])
        settings = settings.model_copy(update={"allowed_hosts": ",".join(names)})
    if not _is_loopback(host) and not (settings.api_keys or settings.read_api_keys):
        log.warning("serving on %s, not this machine only, with no API key: whoever reaches "
                    "the port can ask and change the index; set CITEQA_API_KEYS (or "
                    "CITEQA_READ_API_KEYS), or bind 127.0.0.1 (docs/deploy.md)", host)
    # a stop waits for requests in flight at most the grace (uvicorn waited for every one, up to
    # its own timeout: a container's stop period passed and it was killed mid-answer); what is
    # still queued then is cancelled, and the running batch stops at its next step, each with a
    # 503 (api/server.py); a request head that trickles in is bounded (uvicorn bounded none:
    # api/protocol.py)
    service = create_app(settings)
    server.run(service, host=host.strip("[]"), port=port,  # uvicorn takes ::1, not [::1]
               http=head_timeout_protocol(settings.client_timeout_s,
                                          service.state.citeqa.metrics.observe_closed,
                                          settings.max_connections_per_client,
                                          settings.retry_after_s))


def _probe_bind(addresses: list[Any]) -> None:
    """Bind every address ``getaddrinfo`` gave, as the server will (each socket with
    SO_REUSEADDR, an IPv6 one for IPv6 alone, an address whose family this machine lacks
    passed over, from Python 3.13 one not on it too: asyncio's ``create_server``), all at
    once, and let go; OSError where one cannot be bound (in use, say), or none could be."""
    import errno
    import socket
    import sys

    unmade: OSError | None = None
    bound = 0
    with contextlib.ExitStack() as held:
        for family, kind, proto, _, address in dict.fromkeys(
                (a[0], a[1], a[2], None, a[4]) for a in addresses):
            try:  # a family this machine lacks (IPv6 disabled) is passed over, as asyncio does
                probe = held.enter_context(socket.socket(family, kind, proto))
            except OSError as e:
                unmade = e
                continue
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:  # an address not on this machine (::1 with IPv6 off by
                # sysctl): asyncio passes it over from Python 3.13, and fails on it before
                if e.errno != errno.EADDRNOTAVAIL or sys.version_info < (3, 13):
                    raise
                unmade = e
                continue
            bound += 1
    if not bound and unmade is not None:
        raise unmade


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
