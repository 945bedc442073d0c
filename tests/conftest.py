"""Shared test fixtures: the location of ../shared/data, skipped cleanly where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CITEQA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    """../shared/data/squad2, or skip: a user's fresh clone does not have the evaluation data."""
    d = SHARED_DATA / "squad2"
    if not (d / "qa.json").is_file():
        pytest.skip(f"evaluation data not found at {d} (it lives in ../shared beside the repo)")
    return d
