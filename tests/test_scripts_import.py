"""The scripts in evals/ and benchmarks/ import: a script whose imports broke fails here, not
in a user's hands."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("evals", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if not p.name.startswith("_"))  # (__init__.py, and helpers such as _args.py)


def test_the_scripts_are_found() -> None:
    assert {p.parent.name for p in SCRIPTS} == {"evals", "benchmarks"}, SCRIPTS
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"script_{script.parent.name}_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would (dataclasses)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the repository first
    spec.loader.exec_module(module)  # its top level only: main runs under __main__
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
