"""The ``citeqa`` command (and ``python -m citeqa``): the CLI of ``citeqa.cli``, whose imports
take a noticeable moment; Ctrl-C during them ends as quietly as during a command. What the
operating system refuses (a path under a file, a full disk, a folder where a file should be)
ends in one ``error:`` line, status 2, as a user's mistake does (a traceback with --verbose)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from citeqa.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
    try:
        app()
    except OSError as e:
        from citeqa import logs

        if logs.verbose():
            raise
        where = f": {e.filename}" if e.filename is not None else ""
        sys.stderr.write(f"error: {e.strerror or e}{where}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
