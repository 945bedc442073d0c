"""The wheel holds what the installed package needs: the packaged weights (every file under the
weights folders, new subfolders too), the page, py.typed, the licences; and no tests or data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_weights_the_page_and_the_licences(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    # from a copy of the files git knows (an in-tree build leaves build/ behind, whose stale
    # files a later wheel would pick up)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    source = tmp_path / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("citeqa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [n for n in filter(None, listed) if n.startswith("citeqa/")]
    needed = [n for n in tracked if "/weights/" in n or n.startswith("citeqa/api/static/")]
    assert needed and not [n for n in needed if n not in names]
    assert "citeqa/py.typed" in names
    assert {"citeqa-0.1.0.dist-info/licenses/LICENSE",
            "citeqa-0.1.0.dist-info/licenses/NOTICE"} <= names
    assert not [n for n in names if n.startswith(("tests/", "index/", "evals/", ".cache"))]
    meta = zipfile.ZipFile(wheel).read("citeqa-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0 AND CC-BY-SA-4.0" in meta
