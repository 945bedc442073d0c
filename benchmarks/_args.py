"""Argument types the benchmark scripts share: a value out of range is argparse's one-line
error (exit 2) before any model or server starts, not a traceback (or a figure of nothing)
after."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused below ``low``."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:  # (NaN too)
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, not {text}")
        return value
    return parse


def above(low: float) -> Callable[[str], float]:
    """An argparse ``type``: a float greater than ``low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be more than {low:g}, not {text}")
        return value
    return parse
