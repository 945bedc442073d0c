"""What every model card citeqa writes says about its training data: its licence, and what the
data's ``.stats.json`` records (the ``train ...-data`` commands write one beside their output:
the command, the split and the articles, which the held-out checks read too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stats_path(data: Path) -> Path:
    """Where the record of the data at ``data`` is written: ``DATA.stats.json``."""
    return data.with_name(data.name + ".stats.json")


def data_stats(data: str | Path | None) -> dict[str, Any]:
    """The record beside ``data`` (for a red-team ``X.variants.jsonl``, ``X``'s), or {}."""
    if not data:
        return {}
    path = Path(data)
    for stats in (stats_path(path),
                  stats_path(path.with_name(path.name.removesuffix(".variants.jsonl")))):
        try:
            found = json.loads(stats.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):
            return found
    return {}


def data_licence(made_from: str) -> str:
    """The card's licence paragraph for a model trained on ``made_from`` ("Demonstrations",
    "Examples"): SQuAD's attribution, which must stay, or a placeholder for other data."""
    return (f"{made_from} made from SQuAD (1.1 or 2.0: Rajpurkar et al. 2016; Rajpurkar, Jia, "
            "Liang 2018) carry its licence, CC BY-SA 4.0, and this attribution must stay; for "
            "other data, name its licence here: {DATA_LICENCE}.")
