"""Package names re-exported lazily (PEP 562), so that importing one submodule, such as a
command's, does not import what the others need (torch):

    __getattr__ = lazy_exports(__name__, {"Verifier": "verifier", ...})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.homes[name]`` for ``name`` on first use."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__


def lazy_dir(package: str, homes: Mapping[str, str]) -> Callable[[], list[str]]:
    """A module ``__dir__`` listing the names ``lazy_exports`` serves beside those loaded."""
    module = importlib.import_module(package)

    def __dir__() -> list[str]:
        return sorted({*vars(module), *homes})

    return __dir__
