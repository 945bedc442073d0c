"""The ``citeqa`` command (and ``python -m citeqa``): the CLI of ``citeqa.cli``, whose imports
take a noticeable moment; Ctrl-C during them (or while the commands are set up) ends as quietly
as during a command. What the
operating system refuses (a path under a file, a full disk, a folder where a file should be)
ends in one ``error:`` line, status 2, as a user's mistake does (a traceback with --verbose).
``--verbose``/``-v`` belongs to ``citeqa`` itself, but is taken after a subcommand too."""

from __future__ import annotations

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
    try:
        from citeqa.cli import app
    except KeyboardInterrupt:
        raise _interrupted() from None
    guarded(lambda: app(args=verbose_first(sys.argv[1:])))


if __name__ == "__main__":
    main()
