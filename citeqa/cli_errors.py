"""How every ``citeqa`` command reports a user's mistake: one ``error:`` line on stderr, exit 2."""

from __future__ import annotations

import typer


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr; ``raise fail(...)`` ends the command with status 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)
