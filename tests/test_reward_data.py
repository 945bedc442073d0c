"""Building reward data with the tiny preset (hashed embedder + extractive stand-in generator):
labels follow is_correct, unanswerable questions get only zeros, building resumes; and the
default reward model declines a clearly unanswerable question (slow, real models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from citeqa.config import Settings, preset
from citeqa.evals.metrics import is_correct
from citeqa.evals.squad import QAItem
from citeqa.pipeline import Pipeline
from citeqa.retrieval import build_index_from_documents
from citeqa.reward.data import load_reward_data
from citeqa.reward.scorer import DEFAULT_DIR, load_scorer
from citeqa.training.reward_data import build_reward_data
from citeqa.types import Document

DOCS = [
    Document("e", "Eiffel Tower", "e.txt",
             "The Eiffel Tower is a wrought-iron lattice tower in Paris. "
             "It opened in 1889 as the entrance to the World's Fair."),
    Document("h", "Harvard", "h.txt",
             "Harvard University was founded in 1636 in Cambridge, Massachusetts. "
             "It is the oldest institution of higher learning in the United States."),
]
ITEMS = [
    QAItem("q1", "When did the Eiffel Tower open as the entrance to the World's Fair?",
           ("1889",), "Eiffel", ""),
    QAItem("q2", "In which year was Harvard University founded in Cambridge?", ("1636",),
           "Harvard", ""),
    QAItem("q3", "When did the Eiffel Tower close to the public forever?", (), "Eiffel", ""),
    QAItem("q4", "Which wrought-iron lattice tower stands in Paris?", ("Shard",), "Eiffel", ""),
]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Pipeline:
    index = tmp_path_factory.mktemp("idx") / "index"
    build_index_from_documents(DOCS, index, preset("tiny").retrieval, progress=False)
    return Pipeline.from_settings(Settings(preset="tiny", index=index))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_builder_labels_candidates_like_is_correct(tiny_pipeline, tmp_path):
    out = tmp_path / "data.jsonl"
    stats = build_reward_data(tiny_pipeline, ITEMS, out, n=2, greedy=True, progress=False)
    assert stats.questions == 4 and stats.skipped == 0
    rows = _rows(out)
    cands = [r for r in rows if r["kind"] == "candidate"]
    assert len(cands) == 4 * (2 + 1)  # n=2 plus one greedy per question
    golds = {it.id: it.answers for it in ITEMS}
    for r in cands:
        assert r["label"] == int(is_correct(r["answer"], golds[r["qid"]],
                                            quote_valid=r["quote_valid"]))
    assert [r["label"] for r in cands if r["qid"] == "q3"] == [0, 0, 0]  # unanswerable
    assert [r["label"] for r in cands if r["qid"] == "q4"] == [0, 0, 0]  # wrong gold
    labels = {r["qid"]: r["label"] for r in cands}
    assert labels["q1"] == 1 and labels["q2"] == 1  # the extractive model finds these years
    markers = [r for r in rows if r["kind"] == "question"]
    assert [m["qid"] for m in markers] == ["q1", "q2", "q3", "q4"]
    fp = markers[0]["generator"]
    assert fp["model_id"] == "extractive" and len(fp["prompt_sha256"]) == 16
    assert set(markers[0]["generate_ms"]) == {"2", "1"}
    data = load_reward_data(out)
    assert len(data.labelled) == 12 and data.generators == [fp]
    for pair in data.pairs:  # every pair prefers the correct answer
        assert pair.preferred == 0


def test_builder_resumes_and_drops_an_interrupted_question(tiny_pipeline, tmp_path):
    out = tmp_path / "data.jsonl"
    build_reward_data(tiny_pipeline, ITEMS[:2], out, n=1, progress=False)
    with out.open("a") as f:  # an interrupted third question: a candidate, a cut line, no marker
        f.write(json.dumps({"kind": "candidate", "qid": "q3", "question": "x", "answer": "a",
                            "quote": "", "label": 0}) + "\n{\"kind\": \"cand")
    stats = build_reward_data(tiny_pipeline, ITEMS, out, n=1, progress=False)
    assert (stats.questions, stats.skipped) == (2, 2)
    rows = _rows(out)
    assert [r["qid"] for r in rows if r["kind"] == "question"] == ["q1", "q2", "q3", "q4"]
    assert sum(r["kind"] == "candidate" and r["qid"] == "q3" for r in rows) == 1


@pytest.mark.slow
def test_default_reward_model_declines_a_clearly_unanswerable_question(tmp_path):
    if not (DEFAULT_DIR / "config.json").is_file():
        pytest.skip("the default reward model has not been trained yet (citeqa/reward/weights)")
    scorer = load_scorer("default")
    assert scorer is not None and scorer.threshold is not None
    index = tmp_path / "index"
    build_index_from_documents(DOCS, index, preset("default").retrieval, progress=False)
    pipeline = Pipeline.from_settings(Settings(preset="default", index=index))
    assert pipeline.scorer is not None  # the default preset loads the shipped reward model
    # 80 % answered accuracy is far above what the shipped calibration can certify for a 135M
    # generator (see its model card), so threshold_for(0.8) is inf and every answer is declined.
    answer = pipeline.ask(
        "What is the recommended daily dose of vitamin K for infant goats?",
        min_score=pipeline.threshold_for(0.8),
    )
    assert answer.declined and "below the threshold" in answer.reason, answer
    assert answer.candidates and all(  # the reward model scored them
        c.score is not None and 0.0 <= c.score <= 1.0 and c.uncertainty is not None
        for c in answer.candidates
    )


def test_cli_builds_trains_and_calibrates(tmp_path):
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.reward.scorer import RewardScorer

    index = tmp_path / "index"
    build_index_from_documents(DOCS, index, preset("tiny").retrieval, progress=False)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(
        json.dumps({"id": it.id, "question": it.question, "answers": list(it.answers)}) + "\n"
        for it in ITEMS
    ))
    data, model = tmp_path / "d.jsonl", tmp_path / "rm"
    runner = CliRunner()
    r = runner.invoke(app, ["train", "reward-data", "--dataset", str(questions), "--index",
                            str(index), "--out", str(data), "--split", "", "--preset", "tiny",
                            "-n", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "4 questions (0 already done)" in r.output
    r = runner.invoke(app, ["train", "reward", "--data", str(data), "--out", str(model),
                            "--embedder", "hash", "--members", "2", "--hidden", "0",
                            "--epochs", "20"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["calibrate", "--data", str(data), "--reward", str(model),
                            "--target", "0.5"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] == 4
    assert RewardScorer(model).calibration is not None
    r = runner.invoke(app, ["train", "reward", "--data", str(tmp_path / "none.jsonl"),
                            "--out", str(model)])
    assert r.exit_code == 2 and "citeqa train reward-data" in r.output
