"""The ``citeqa`` command (and ``python -m citeqa``): the CLI of ``citeqa.cli``, whose imports
take a noticeable moment; Ctrl-C during them ends as quietly as during a command."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from citeqa.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
    app()


if __name__ == "__main__":
    main()
