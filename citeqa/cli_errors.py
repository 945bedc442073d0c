"""What every ``citeqa`` command shares: how it reports a user's mistake (one ``error:`` line on
stderr, exit 2), lists its options (``command_group``), reads its settings and shows untrusted
text on one line."""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from citeqa.atomic import file_above
from citeqa.config import Settings
from citeqa.errors import CiteqaError

F = TypeVar("F", bound=Callable[..., Any])

RESUME = "what was finished is kept; run the same command again to resume"


def command_group(**kwargs: Any) -> typer.Typer:
    """A ``typer.Typer`` whose ``--help`` is click's plain listing: rich's tables cut long
    option names to fit 80 columns (``--allow-private…``), which then cannot be typed."""
    return typer.Typer(rich_markup_mode=None, **kwargs)


# --progress / --no-progress; unset: bars only when stderr is a terminal (a log file got every
# redraw of every bar)
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Show progress bars (default: when stderr is a terminal).")]


def a_path(value: str) -> Path:
    """An option ``parser`` refusing an empty path (``--index "$DIR"`` with DIR unset read as
    ``.``, the current folder: an index there was used without a word)."""
    if not value.strip():
        raise typer.BadParameter("is empty: give a path (. for the current folder)")
    return Path(value)


def path_option(*names: str, **kwargs: Any) -> Any:
    """``typer.Option`` for a path: an empty one refused (``a_path``); shown as PATH."""
    return typer.Option(*names, parser=a_path, **{"metavar": "PATH", **kwargs})


def path_argument(**kwargs: Any) -> Any:
    """``typer.Argument`` for a path: an empty one refused (``a_path``)."""
    return typer.Argument(parser=a_path, **kwargs)


def finite(value: float | None) -> float | None:
    """An option ``callback`` refusing nan and inf (click's range checks let nan by, and it
    failed only after minutes of loading, or in a traceback)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number")
    return value


def float_option(*names: str, **kwargs: Any) -> Any:
    """``typer.Option`` for a number: nan and inf refused (``finite``)."""
    return typer.Option(*names, callback=finite, **kwargs)


# Options that are also service settings default to None: an explicit flag beats the CITEQA_*
# environment, which beats the Settings default (see settings_from).
IndexDir = Annotated[
    Path | None,
    path_option("--index", "-i", help="Index directory (built by `citeqa index build`); "
                "default $CITEQA_INDEX, else index/default."),
]
PresetOpt = Annotated[
    str, typer.Option("--preset", help="Named settings preset: default | tiny (fakes, no weights).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def settings_from(**options: Any) -> Settings:
    """Settings from the options given (None = not given) over the CITEQA_* environment over the
    defaults; an invalid value ends the command (status 2) with a line naming the setting."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        raise fail(_settings_error(e, given)) from None


# the settings commands take as options, by their flags: an invalid one given so is named so
OPTION_FLAGS = {"index": "--index", "preset": "--preset", "generator": "--generator"}


def start_command() -> None:
    """What a command does first: check the CITEQA_* variables read outside Settings
    (``CITEQA_FP32_KERNEL``, ``CITEQA_KEEP_FREED_MEMORY``), so that a bad value ends it in one
    line (status 2) and not in a traceback once a model loads, and keep freed memory as the
    latter says (allocator.py)."""
    from citeqa.allocator import keep_freed_memory
    from citeqa.compute import fp32_kernel_setting

    try:
        fp32_kernel_setting()
        keep_freed_memory()
    except CiteqaError as e:
        raise fail(str(e)) from None


def _settings_error(e: ValidationError, given: dict[str, Any] | None = None) -> str:
    """One line for the first invalid setting: its name and what is wrong with it, named by
    its option's flag where ``given`` (the options given) holds it, else by its variable."""
    first = e.errors()[0]
    name = ".".join(str(x) for x in first["loc"]) or "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    if name in (given or {}) and name in OPTION_FLAGS:
        flag = OPTION_FLAGS[name]
        message = message.replace(f"CITEQA_{name.upper()}=", f"{flag} ", 1)
        name = f"{name} ({flag})"
    elif name in Settings.model_fields:  # read from its environment variable
        name = f"{name} (CITEQA_{name.upper()})"
    return f"invalid {name}: {message}"


def open_index_dir(index: Path) -> Path:
    """The index directory, recovered if a rebuild crashed mid-swap (store.recover_index, as
    ``Index.load`` does for search and ask); fails the command when there is no index."""
    from citeqa.retrieval.store import recover_index

    try:
        return recover_index(index)
    except CiteqaError as e:
        raise fail(str(e)) from None  # ("index X does not exist ...; build one with ...")


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1 (``1 document``, ``3 documents``)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def squash(text: str) -> str:
    """``text`` on one line, with control characters shown as U+FFFD: documents are untrusted,
    and an escape sequence in one must not drive the reader's terminal."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "\ufffd", re.sub(r"\s+", " ", text))


def json_text(data: Any) -> str:
    """``data`` as indented JSON for stdout: text as itself where stdout is UTF-8, else in
    ``\\u`` escapes (on a Latin-1 stream a CJK title would be escaped as Python escapes it,
    which JSON does not read for characters past U+FFFF)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return json.dumps(data, ensure_ascii=encoding != "utf8", indent=2)


def shown_progress(progress: bool | None) -> bool:
    """Whether to show progress bars: as asked, else when stderr is a terminal."""
    return progress if progress is not None else sys.stderr.isatty()


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr; ``raise fail(...)`` ends the command with status 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def check_out(out: Path, *, folder: bool, inputs: dict[str, Any] | None = None) -> None:
    """Refuse, before any work, an ``--out`` of the wrong kind (a file where a ``folder`` is
    written, or a folder where a file is), one under a file (it cannot be made), or one that
    is also an input or inside an input folder (``inputs``: option name -> a path or paths):
    the output would be written over what it is made from (an index's own files, say)."""
    out = Path(out)
    if folder and out.is_file():
        raise fail(f"--out {out} is a file; name a folder to write")
    if not folder and out.is_dir():
        raise fail(f"--out {out} is a folder; name a file to write")
    if blocker := file_above(out):
        raise fail(f"--out {out} cannot be made: {blocker} is a file, not a folder")
    for option, given in (inputs or {}).items():
        paths = given if isinstance(given, list | tuple) else [given]
        for path in paths:
            if path is None or not Path(path).exists():
                continue
            source, target = Path(path).resolve(), out.resolve()
            if source == target:
                raise fail(f"--out {out} is also the {option} it is made from; choose "
                           "another --out")
            if source.is_dir() and source in target.parents:
                raise fail(f"--out {out} is inside the {option} folder it is made from "
                           f"({path}); choose another --out")


def one_of(*allowed: str) -> Callable[[Any], Any]:
    """An option ``callback`` refusing a value not in ``allowed`` while the command line is read
    (usage error, status 2), not after minutes of loading."""
    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}, not {value!r}")
        return value
    return check


def a_torch_device(value: str | None) -> str | None:
    """An option ``callback`` refusing a device name torch does not read (cpu, cuda, cuda:1...)."""
    if value is not None:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise typer.BadParameter(f"{value!r} is no torch device; give cpu, cuda or cuda:N"
                                     ) from None
    return value


def interruptible(then: str = RESUME) -> Callable[[F], F]:
    """A command that Ctrl-C ends with one line saying what happens ``then``, status 130 (it
    ended silently)."""
    def wrap(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                typer.echo(f"\ninterrupted: {then}", err=True)
                raise typer.Exit(130) from None
        return run  # type: ignore[return-value]
    return wrap


def check_preset(name: str) -> None:
    """Fail (status 2) unless ``name`` is a settings preset."""
    from citeqa.config import preset
    from citeqa.errors import ConfigError

    try:
        preset(name)
    except ConfigError as e:
        raise fail(str(e)) from None


def check_run_options(*, preset: str, out: Path, index: Path,
                      answer_mode: str | None = None) -> None:
    """Fail (status 2) before any work for what a run command (eval, redteam) would only trip
    over later: an unknown settings preset, an --out that is a file, an unknown answer mode,
    an --out that is the --index folder or inside it (the index's next change, a swap of the
    whole folder, took the run with it)."""
    check_preset(preset)
    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} is a file; give a run directory (created when missing)")
    check_out(out, folder=True, inputs={"--index": index})
    check_answer_mode(answer_mode)


def check_answer_mode(answer_mode: str | None) -> None:
    """Fail (status 2) for an --answer-mode that is not one of the answer modes (None: the
    preset's)."""
    from citeqa.generation.format import ANSWER_MODES

    if answer_mode is not None and answer_mode not in ANSWER_MODES:
        raise fail(f"--answer-mode must be one of {list(ANSWER_MODES)}, not {answer_mode!r}")


# training's CPU compute format: bf16 autocast, or fp32 (fp16w is a serving format)
TrainCpuDtypeOpt = Annotated[str, typer.Option(
    "--cpu-dtype", callback=one_of("auto", "bf16", "fp32"),
    help="auto | bf16 | fp32: bf16 autocast on a CPU (auto: where it measures fast).")]
