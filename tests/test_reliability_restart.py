"""Crash and restart: a writer (``citeqa index build``, ``citeqa index add``, or ``citeqa serve``
adding a document) is SIGKILLed at every state of the atomic swap (store.py's pause points), then
``serve``, ``search``, ``ask``, ``index build`` and ``index add`` each start on what it left and
work, on a complete index.

Tiny preset throughout: no weights. Each command gets its own copy of the crashed directory, so
each one meets the crash itself rather than a directory another command already repaired.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers import THREE_DOCS, free_port
from typer.testing import CliRunner

from citeqa.cli import app
from citeqa.config import preset
from citeqa.retrieval import Index, build_index_from_documents

CLI = [sys.executable, "-c", "from citeqa.cli import main; main()"]
STAGES = ["before_swap", "mid_swap", "after_swap"]
NEW_TEXT = ("The Zorblax telescope was installed on Mount Quillon in 1921. "
            "Its mirror was ground by Hedda Vantrum over eleven winters.")
READY_S = 60.0
Child = subprocess.Popen[str]


def _read_until(child: Child, line: str) -> None:
    """Block until ``child`` writes ``line`` to stderr (the pause it reports)."""
    assert child.stderr is not None
    for got in child.stderr:
        if got.strip() == line:
            return
    pytest.fail(f"the writer exited without writing {line!r} (rc {child.wait()})")


def _wait_ready(child: Child, url: str) -> None:
    deadline = time.monotonic() + READY_S
    while True:
        assert child.poll() is None, f"the server exited with rc {child.returncode}"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


@contextmanager
def _serving(index: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, Child]]:
    """``citeqa serve --preset tiny`` over ``index`` in a child process, ready."""
    port = free_port()
    child = subprocess.Popen([*CLI, "serve", "--preset", "tiny", "--index", str(index),
                              "--port", str(port)],
                             env=env or os.environ.copy(), stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(child, url)
        yield url, child
    finally:
        child.kill()
        child.wait()


def _kill_cli(args: list[str], stage: str) -> None:
    """Run ``citeqa ARGS`` and SIGKILL it when it pauses at ``stage``."""
    env = {**os.environ, "CITEQA_TEST_PAUSE_AT": stage, "CITEQA_TEST_PAUSE_S": "60"}
    child = subprocess.Popen([*CLI, *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(child, f"citeqa-test-pause {stage}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def _kill_server_update(index: Path, stage: str) -> None:
    env = {**os.environ, "CITEQA_TEST_PAUSE_AT": stage, "CITEQA_TEST_PAUSE_S": "60"}
    with _serving(index, env) as (url, child):
        body = {"text": NEW_TEXT, "doc_id": "zorblax", "title": "Zorblax"}

        def post() -> None:  # answered never: the server dies mid-update
            try:
                httpx.post(url + "/v1/documents", json=body, timeout=90)
            except httpx.TransportError:
                pass

        threading.Thread(target=post, daemon=True).start()
        _read_until(child, f"citeqa-test-pause {stage}")
        child.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module",
                params=[(w, s) for w in ("build", "add", "serve") for s in STAGES],
                ids=lambda p: f"{p[0]}-killed-{p[1]}")
def crashed(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """(a directory holding ``idx`` as a killed writer left it, whether the new index is in)."""
    writer, stage = request.param
    root = tmp_path_factory.mktemp(f"{writer}-{stage}")
    crash = root / "crash"
    build_index_from_documents(THREE_DOCS, crash / "idx", preset("tiny").retrieval,
                               progress=False)
    src = root / "src"
    src.mkdir()
    (src / "zorblax.txt").write_text(NEW_TEXT, encoding="utf-8")
    if writer == "build":
        _kill_cli(["index", "build", str(src), "--out", str(crash / "idx"), "--preset", "tiny",
                   "--no-progress"], stage)
    elif writer == "add":
        _kill_cli(["index", "add", str(src), "--index", str(crash / "idx"), "--no-progress"],
                  stage)
    else:
        _kill_server_update(crash / "idx", stage)
    debris = [p.name for p in crash.iterdir() if p.name.startswith(".idx.")]
    assert debris, "the writer left no sibling: it was not killed inside the swap"
    return crash, stage == "after_swap"


def _copy(crashed: tuple[Path, bool], tmp_path: Path) -> tuple[Path, bool]:
    crash, new = crashed
    shutil.copytree(crash, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy" / "idx", new


def _assert_recovered(index: Path, new: bool) -> None:
    """``index`` is a complete index again, at its own path, with no debris beside it but the
    embeddings a killed ``index add`` keeps for its rerun (``.idx.add``: whole parts and the
    lock its runs share)."""
    loaded = Index.load(index)
    assert loaded.directory == index
    assert any("Zorblax" in d.text for d in loaded.documents.values()) == new
    assert sorted(p.name for p in index.parent.iterdir()) in (["idx"], [".idx.add", "idx"])
    kept = index.parent / ".idx.add"
    assert all((p.suffix == ".npz" and not p.name.startswith(".")) or p.name == ".lock"
               for p in (kept.iterdir() if kept.exists() else []))


def test_serve_starts_and_works(crashed: tuple[Path, bool], tmp_path: Path) -> None:
    index, new = _copy(crashed, tmp_path)
    with _serving(index) as (url, _):
        hits = httpx.post(url + "/v1/search", json={"query": "Zorblax telescope mirror", "k": 3},
                          timeout=30).json()["hits"]
        assert any("Zorblax" in h["text"] for h in hits) == new, hits
        r = httpx.post(url + "/v1/answer", json={"question": "Who gave their name to Normandy?"},
                       timeout=30)
        assert r.status_code == 200, r.text
    _assert_recovered(index, new)


def test_search_starts_and_works(crashed: tuple[Path, bool], tmp_path: Path) -> None:
    index, new = _copy(crashed, tmp_path)
    result = CliRunner().invoke(app, ["search", "Zorblax telescope mirror", "--index",
                                      str(index), "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert any("Zorblax" in h["text"] for h in json.loads(result.stdout)) == new
    _assert_recovered(index, new)


def test_ask_starts_and_works(crashed: tuple[Path, bool], tmp_path: Path) -> None:
    index, new = _copy(crashed, tmp_path)
    result = CliRunner().invoke(app, ["ask", "Who gave their name to Normandy?", "--index",
                                      str(index), "--preset", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    _assert_recovered(index, new)
    if not answer["declined"]:
        q = answer["quote"]
        assert Index.load(index).documents[q["doc_id"]].text[q["start"]:q["end"]] == q["text"]


def test_build_starts_and_works(crashed: tuple[Path, bool], tmp_path: Path) -> None:
    index, _ = _copy(crashed, tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "moths.txt").write_text("Glimmer moths migrate across the Vessik plateau.")
    result = CliRunner().invoke(app, ["index", "build", str(src), "--out", str(index),
                                      "--preset", "tiny", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [d.text for d in Index.load(index).documents.values()] == [
        "Glimmer moths migrate across the Vessik plateau."]
    assert sorted(p.name for p in index.parent.iterdir()) == ["idx"]


def test_add_starts_and_works(crashed: tuple[Path, bool], tmp_path: Path) -> None:
    """``index add`` on what the crash left: it adds its documents (once, however often it
    runs), whether or not the killed writer's change went in."""
    index, new = _copy(crashed, tmp_path)
    held = len(Index.load(_copy(crashed, tmp_path / "peek")[0]).documents)  # what the crash left
    src = tmp_path / "src"
    src.mkdir()
    (src / "moths.txt").write_text("Glimmer moths migrate across the Vessik plateau.")
    for _ in range(2):
        result = CliRunner().invoke(app, ["index", "add", str(src), "--index", str(index),
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
    texts = [d.text for d in Index.load(index).documents.values()]
    assert texts.count("Glimmer moths migrate across the Vessik plateau.") == 1
    assert len(texts) == held + 1
    _assert_recovered(index, new)


def test_a_server_stopped_by_sigterm_exits_0_once_drained(tmp_path: Path) -> None:
    """uvicorn sends the SIGTERM it drained for to the process again: a clean stop ended by the
    signal, status 143 to a shell or a supervisor (Ctrl-C exits 0)."""
    index = tmp_path / "idx"
    build_index_from_documents(THREE_DOCS, index, preset("tiny").retrieval, progress=False)
    with _serving(index) as (url, child):
        assert httpx.post(url + "/v1/search", json={"query": "telescope"}).status_code == 200
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
        assert child.stderr is not None and "Finished server process" in child.stderr.read()
