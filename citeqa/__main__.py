"""The ``citeqa`` command (and ``python -m citeqa``): the CLI of ``citeqa.cli``, whose imports
take a noticeable moment; Ctrl-C during them (or while the commands are set up) ends as quietly
as during a command. What the
operating system refuses (a path under a file, a full disk, a folder where a file should be)
ends in one ``error:`` line, status 2, as a user's mistake does (a traceback with --verbose).
``--verbose``/``-v`` belongs to ``citeqa`` itself, but is taken after a subcommand too.
It writes to whatever standard streams it was started with (``usable_streams``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

VERBOSE_FLAGS = ("-v", "--verbose")


def verbose_first(args: list[str]) -> list[str]:
    """``args`` with ``--verbose``/``-v`` moved before the subcommand, where the command
    group reads it (``citeqa ask Q -v`` said "No such option: -v"); anything after a ``--``
    stays as it is (``citeqa ask -- -v`` asks "-v")."""
    end = args.index("--") if "--" in args else len(args)
    head = args[:end]
    flags = [a for a in head if a in VERBOSE_FLAGS]
    return flags[:1] + [a for a in head if a not in VERBOSE_FLAGS] + args[end:]


def usable_streams() -> None:
    """Standard streams every command can use: one started closed (``2>&-``) is /dev/null
    (tqdm and uvicorn's log formatter ask it isatty(): a build ended silently with status 1,
    serve never started; and a file opened next took its number), and text the stream's
    encoding cannot hold (a CJK title on a Latin-1 terminal) is written escaped, not a
    UnicodeEncodeError's traceback."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:  # closed: /dev/null takes its number
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8",  # noqa: SIM115
                                closefd=False))
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and stream.errors == "strict":
            reconfigure(errors="backslashreplace")


def _interrupted() -> SystemExit:
    sys.stderr.write("\ninterrupted\n")
    return SystemExit(130)


def guarded(run: Callable[[], object]) -> None:
    """``run()`` (a command line's app), ending as a command's own errors do: Ctrl-C outside
    any command's handling (while typer builds the commands from their signatures, say) in
    "interrupted", status 130; what the operating system refuses in one ``error:`` line,
    status 2 (a traceback with --verbose)."""
    try:
        run()
    except KeyboardInterrupt:
        raise _interrupted() from None
    except OSError as e:
        from citeqa import logs

        if logs.verbose():
            raise
        where = f": {e.filename}" if e.filename is not None else ""
        sys.stderr.write(f"error: {e.strerror or e}{where}\n")
        raise SystemExit(2) from None


def main() -> None:
    usable_streams()
    try:
        from citeqa.cli import app
    except KeyboardInterrupt:
        raise _interrupted() from None
    guarded(lambda: app(args=verbose_first(sys.argv[1:])))


if __name__ == "__main__":
    main()
