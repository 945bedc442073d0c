"""How the commands log: FAISS's narration of which build it loaded shows only with --verbose."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from citeqa.logs import QUIET_UNLESS_VERBOSE, setup_logging


def test_setup_quiets_the_narrators_unless_verbose() -> None:
    try:
        setup_logging()
        assert all(logging.getLogger(n).level == logging.WARNING for n in QUIET_UNLESS_VERBOSE)
        setup_logging(verbose=True)
        assert all(logging.getLogger(n).level == logging.NOTSET for n in QUIET_UNLESS_VERBOSE)
    finally:
        for n in QUIET_UNLESS_VERBOSE:
            logging.getLogger(n).setLevel(logging.NOTSET)


def build(tmp_path: Path, *flags: str) -> str:
    """stderr of `citeqa [flags] index build` over one small file (tiny preset: FAISS is
    imported for its dense index)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The comet returns every seventy-six years. Halley predicted it.")
    out = tmp_path / f"index{len(flags)}"
    r = subprocess.run([sys.executable, "-c", "from citeqa.cli import main; main()", *flags,
                        "index", "build", str(doc), "--out", str(out), "--preset", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").is_file()
    return r.stderr


def test_a_command_does_not_narrate_faiss_loading(tmp_path: Path) -> None:
    assert "faiss.loader" not in build(tmp_path)
    assert "faiss.loader" in build(tmp_path, "--verbose")  # still there when asked for
