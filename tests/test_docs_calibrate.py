"""docs/calibrate.md runs as written: its commands, in order, on a tiny index with the tiny
generator and a copy of the shipped reward model."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from citeqa.config import Settings, preset
from citeqa.pipeline import Pipeline
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Document

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "calibrate.md"
WEIGHTS = ROOT / "citeqa" / "reward" / "weights"
TEXT = ("The service listens on port 8000 by default. It stores its index in a folder of plain "
        "data files. Backups run every night at two o'clock.")
QUESTIONS = [
    {"id": "c1", "question": "Which port does the service listen on?", "answers": ["8000"]},
    {"id": "c2", "question": "When do backups run?", "answers": ["every night at two o'clock"]},
    {"id": "c3", "question": "Where does the service store its index?",
     "answers": ["in a folder of plain data files"]},
    {"id": "c4", "question": "Who maintains the service?", "answers": []},
    {"id": "c5", "question": "How much does the service cost?", "answers": []},
]


def commands() -> list[str]:
    """The shell lines of the document's bash blocks, comments and blank lines left out."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_calibration_guide_runs_as_written(tmp_path: Path, monkeypatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    if not (WEIGHTS / "encoder").is_dir():
        pytest.skip("the shipped reward model is not in this checkout")
    from citeqa.cli import app

    lines = commands()
    assert [shlex.split(c)[0] for c in lines] == ["cp", "citeqa", "citeqa", "citeqa",
                                                    "CITEQA_REWARD=my-rm"]
    assert shlex.split(lines[4])[2:] == ["citeqa", "serve", "--index", "my-index"]
    for name in [k for k in os.environ if k.startswith("CITEQA_")]:
        monkeypatch.delenv(name)  # the settings are the document's alone
    monkeypatch.chdir(tmp_path)
    build_index_from_documents([Document("s", "Service", "s.txt", TEXT)], tmp_path / "my-index",
                               preset("tiny").retrieval, progress=False)
    (tmp_path / "my-cal.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))

    # 1. the copy of the shipped reward model, by the document's own shell line
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", lines[0]], cwd=tmp_path, env=env, check=True, timeout=120)
    assert (tmp_path / "my-rm" / "calibration.json").is_file()
    shipped = json.loads((WEIGHTS / "calibration.json").read_text())

    runner = CliRunner()
    # 2. answers of the served generator (here the tiny preset's), one candidate a question
    r = runner.invoke(app, [*shlex.split(lines[1])[1:], "--preset", "tiny", "--no-progress"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout[r.stdout.index("{"):])
    assert stats["questions"] == len(QUESTIONS) and stats["examples"] >= 3

    # 3. both ways of choosing the threshold; five questions certify nothing at 80 %
    for line in lines[2:4]:
        r = runner.invoke(app, shlex.split(line)[1:])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout[r.stdout.index("{"):])
        assert {"threshold", "coverage", "accuracy", "n"} <= set(summary)
        assert summary["n"] == len(QUESTIONS)
    written = json.loads((tmp_path / "my-rm" / "calibration.json").read_text())
    assert written["scores"] != shipped["scores"]  # the copy was recalibrated ...
    assert json.loads((WEIGHTS / "calibration.json").read_text()) == shipped  # ... not the original
    assert written["targets_tried"] == [0.6, 0.7, 0.8, 0.9] and written["threshold"] is None
    # what the certified answers were: a server that differs says so when it starts
    assert written["candidates_per_question"] == 1 and len(written["generators"]) == 1

    # 4. served with the document's settings: nothing certified, so every question is declined;
    # without CITEQA_DECLINE_UNCERTIFIED the same server answers (without a threshold)
    question = "Which port does the service listen on?"
    for assignment in shlex.split(lines[4])[:2]:
        monkeypatch.setenv(*assignment.split("=", 1))
    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "my-index"))
    assert pipeline.scorer is not None and pipeline.scorer.directory == Path("my-rm")
    answer = pipeline.ask(question)
    assert answer.declined and answer.candidates
    assert "calibration certified no accuracy target" in answer.reason
    monkeypatch.delenv("CITEQA_DECLINE_UNCERTIFIED")
    with caplog.at_level(logging.WARNING, logger="citeqa.pipeline"):
        lenient = Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "my-index"))
    assert not lenient.ask(question).declined
    assert lenient.ask(question, target_accuracy=0.8).declined
    assert "calibrated on other answers" not in caplog.text  # the generator it was made on
    with caplog.at_level(logging.WARNING, logger="citeqa.pipeline"):
        Pipeline.from_settings(Settings(preset="tiny", index=tmp_path / "my-index",
                                        answer_mode="free"))
    assert "calibrated on other answers than this service gives (answer_mode 'span' -> " \
           "'free'" in caplog.text
