"""Mutation-testing round (citeqa/evals runner, cli, compare, plots, squad): tests that kill
mutants of the evaluation runner, its command, run comparison, figures and question loading
which the other tests let survive.

Each test pins one behaviour a plausible slip would silently change.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from citeqa.evals import compare as C
from citeqa.evals import plots
from citeqa.evals import runner as R
from citeqa.evals.squad import QAItem
from citeqa.types import Answer, Hit, Passage


def _hit(text: str, doc_id: str = "d") -> Hit:
    return Hit(Passage(0, doc_id, 0, len(text), text), "t", "s", 1.0)


# --- runner -------------------------------------------------------------------------------------


def test_a_blank_passage_is_never_the_gold_paragraph() -> None:
    """An empty passage text lies inside every context ("" in ctx): it must not match."""
    assert not R.passage_matches_context(_hit("  \n"), None, "Alpha beta gamma.")


def test_a_whitespace_context_is_no_context_in_the_record() -> None:
    item = QAItem("q1", "Who?", ("Rollo",), "Normans", " \n\t")
    answer = Answer(question="Who?", declined=True, answer=None, quote=None, score=None)
    row = R.prediction_record(item, answer, None)
    assert row["has_context"] is False
    assert row["answerable"] is True and row["article"] == "Normans"
    assert row["gold_answers"] == ["Rollo"] and row["gold_rank"] is None


def test_the_scorer_is_named_by_its_name_else_its_class() -> None:
    class Scorer:
        name = "reward-model (bf16)"

    class Unnamed:
        pass

    assert R.scorer_name(SimpleNamespace(scorer=Scorer())) == "reward-model (bf16)"  # type: ignore[arg-type]
    assert R.scorer_name(SimpleNamespace(scorer=Unnamed())) == "Unnamed"  # type: ignore[arg-type]
    assert R.scorer_name(SimpleNamespace(scorer=None)) == R.STAND_IN_SCORER  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers import THREE_DOCS

    from citeqa.config import preset
    from citeqa.retrieval import build_index_from_documents

    out = tmp_path_factory.mktemp("evalnew") / "index"
    build_index_from_documents(THREE_DOCS, out, preset("tiny").retrieval, progress=False)
    return out


def _dataset(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"When was thing {i}?",
                                        "answers": []}) + "\n" for i in range(n)))
    return path


def test_a_resumed_run_keeps_when_it_started_and_says_when_it_was_updated(
        tiny_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(f"2026-01-01T00:00:{s:02d}+00:00" for s in range(60))
    monkeypatch.setattr(R, "_now", lambda: next(clock))
    spec = R.RunSpec(dataset=_dataset(tmp_path), index=tiny_index, preset="tiny")
    out = tmp_path / "run"
    R.run_eval(spec, out, limit=1, progress=False)
    first = json.loads((out / R.RUN_JSON).read_text())
    R.run_eval(spec, out, progress=False)
    second = json.loads((out / R.RUN_JSON).read_text())
    assert second["started"] == first["started"]
    assert second["updated"] > first["updated"]


def test_metrics_cover_the_questions_in_dataset_order_after_a_sample_grows(
        tiny_index: Path, tmp_path: Path) -> None:
    spec = R.RunSpec(dataset=_dataset(tmp_path), index=tiny_index, preset="tiny")
    out = tmp_path / "run"
    small = R.run_eval(spec, out, sample=2, seed=1, progress=False)
    asked_first = [json.loads(line)["id"] for line in
                   (out / R.PREDICTIONS).read_text().splitlines()]
    assert small.metrics["question_ids"] == asked_first
    full = R.run_eval(spec, out, progress=False)
    in_file = [json.loads(line)["id"] for line in (out / R.PREDICTIONS).read_text().splitlines()]
    assert in_file != [f"q{i}" for i in range(5)]  # (the sample was not the first two)
    assert full.metrics["question_ids"] == [f"q{i}" for i in range(5)]


def test_only_model_and_adapter_directories_are_resolved(tmp_path: Path) -> None:
    """A hub model id is no directory: it is recorded as named (and other keys never are)."""
    (tmp_path / "ad").mkdir()
    config = {"generation": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "adapter": f"{tmp_path}/./ad",
                             "cache": str(tmp_path / "ad")}, "seed": 1}
    assert R._resolved_paths(config) == {
        "generation": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "adapter": str(tmp_path / "ad"),
                       "cache": str(tmp_path / "ad")}, "seed": 1}


def test_a_run_with_no_answers_yet_resumes_under_another_system(
        tiny_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of the other system's is kept, so nothing could be mixed: the run goes on and
    records the system now."""
    spec = R.RunSpec(dataset=_dataset(tmp_path, 2), index=tiny_index, preset="tiny")
    out = tmp_path / "run"
    R.run_eval(spec, out, limit=1, progress=False)
    (out / R.PREDICTIONS).write_text("")  # stopped before its first answer
    monkeypatch.setenv("CITEQA_ANSWER_MODE", "free")
    assert R.run_eval(spec, out, progress=False).answered_now == 2
    run = json.loads((out / R.RUN_JSON).read_text())
    assert run["pipeline"]["config"]["generation"]["answer_mode"] == "free"


def test_the_stand_in_scorer_is_noted(tiny_index: Path) -> None:
    from citeqa.config import Settings
    from citeqa.pipeline import STAND_IN_NOTE, Pipeline

    pipe = Pipeline.from_settings(Settings(preset="tiny", index=tiny_index))
    assert pipe.scorer is None
    desc = R.describe_pipeline(pipe, None)
    assert desc["scorer"] == R.STAND_IN_SCORER and desc["scorer_note"] == STAND_IN_NOTE


# --- compare ------------------------------------------------------------------------------------


def test_a_boolean_is_no_metric_value() -> None:
    assert C._get({"quotes": {"valid": True}}, ("quotes", "valid")) is None
    assert C._get({"quotes": {"valid": 1}}, ("quotes", "valid")) == 1.0


def test_the_best_candidate_is_the_first() -> None:
    def rec(*answers: str) -> dict:
        return {"answer": None, "declined": True,
                "candidates": [{"answer": a} for a in answers]}

    changes = C.prediction_changes({"q": rec("x", "y")}, {"q": rec("x", "z")})
    assert changes == {"questions_in_both": 1, "given_answer_changed": 0,
                       "decline_changed": 0, "best_candidate_changed": 0}
    assert C.prediction_changes({"q": rec("x")}, {"q": rec("w", "x")})[
        "best_candidate_changed"] == 1


def test_a_gzipped_predictions_file_named_itself_is_read(tmp_path: Path) -> None:
    import gzip

    rows = [{"id": "a", "answer": "x"}, {"id": "b", "answer": None}]
    gz = tmp_path / "predictions.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert C.covered_predictions(gz) == {"a": rows[0], "b": rows[1]}
    (tmp_path / "metrics.json").write_text(json.dumps({"question_ids": ["b"]}))
    assert C.covered_predictions(gz) == {"b": rows[1]}  # the metrics beside it
    with pytest.raises(C.ConfigError, match="is not a file"):
        C.covered_predictions(tmp_path / "gone.jsonl.gz")


def test_two_runs_of_one_folder_name_are_told_apart(tmp_path: Path) -> None:
    for parent in ("x", "y"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "metrics.json").write_text(json.dumps({"questions": 2}))
    table = C.compare_runs(tmp_path / "x" / "run", tmp_path / "y" / "run")
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert f"A: {tmp_path / 'x' / 'run'}" in header and f"B: {tmp_path / 'y' / 'run'}" in header


def test_a_run_without_run_json_is_not_called_another_dataset(tmp_path: Path) -> None:
    for name, sha in (("a", "abc"), ("b", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"questions": 2}))
        if sha:
            (tmp_path / name / "run.json").write_text(
                json.dumps({"identity": {"dataset_sha256": sha}}))
    table = C.compare_runs(tmp_path / "a", tmp_path / "b")
    assert table.startswith("note: a run has no predictions") and "different" not in table


# --- the command --------------------------------------------------------------------------------


def _app():  # type: ignore[no-untyped-def]
    import typer

    from citeqa.evals.cli import eval_app

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A stand-in for citeqa's main app."""

    app.add_typer(eval_app, name="eval")
    return app


def test_compare_takes_an_upper_case_png_suffix(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list = []
    monkeypatch.setattr(C, "compare_runs", lambda a, b, png: asked.append(png) or "TABLE")
    png = tmp_path / "Overlay.PNG"
    r = CliRunner().invoke(_app(), ["eval", "compare", str(tmp_path), str(tmp_path),
                                    "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert asked == [png] and r.stdout == f"TABLE\noverlay: {png}\n"


def test_one_refused_question_is_said_in_the_singular(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {"at_threshold": {"answered_accuracy": None, "coverage": 0.0},
               "squad": {"f1": 0.0}, "selective": {"rm": {"aurc": 0.5}}, "refused": 1}
    monkeypatch.setattr(R, "run_eval", lambda *a, **k: R.RunResult(
        out=tmp_path / "run", questions=3, answered_now=3, resumed=0, metrics=metrics))
    (tmp_path / "index").mkdir()
    r = CliRunner().invoke(_app(), ["eval", "--dataset", str(tmp_path / "q.jsonl"), "--index",
                                    str(tmp_path / "index"), "--out", str(tmp_path / "run"),
                                    "--preset", "tiny", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "answered accuracy n/a at coverage 0.0 %" in r.stdout
    assert "warning: 1 question refused by citeqa" in r.stderr


# --- figures ------------------------------------------------------------------------------------


def test_a_curve_steps_from_coverage_zero_at_its_first_accuracy() -> None:
    assert plots._steps({"coverage": [0.25, 1.0], "accuracy": [0.9, 0.6]}) == (
        [0.0, 0.25, 1.0], [0.9, 0.9, 0.6])


def _axes(monkeypatch: pytest.MonkeyPatch) -> list:
    made: list = []
    subplots = plots.plt.subplots

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        fig, ax = subplots(*args, **kwargs)
        made.append(ax)
        return fig, ax

    monkeypatch.setattr(plots.plt, "subplots", recording)
    return made


def test_reliability_draws_only_the_bins_that_hold_questions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _axes(monkeypatch)
    bins = [{"lo": 0.0, "hi": 0.5, "count": 0, "accuracy": None, "mean_confidence": None},
            {"lo": 0.5, "hi": 1.0, "count": 4, "accuracy": 0.75, "mean_confidence": 0.7}]
    plots.reliability(bins, tmp_path / "rel.png", title="t")
    assert (tmp_path / "rel.png").read_bytes()[:4] == b"\x89PNG"
    ax = made[0]
    assert [p.get_x() for p in ax.patches] == [0.5]
    assert [t.get_text() for t in ax.texts] == ["4"]


def test_recall_leaves_out_depths_with_no_value(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    made = _axes(monkeypatch)
    plots.recall_at_k({1: None, 5: 0.5, 10: 0.75}, tmp_path / "r.png", title="t")
    assert list(made[0].get_xticks()) == [5, 10]


# --- questions ----------------------------------------------------------------------------------


def test_squad_objects_keeps_only_objects() -> None:
    from citeqa.evals.squad import squad_objects

    assert squad_objects({"qas": [{"id": 1}, "x", None, [2]]}, "qas") == [{"id": 1}]
    assert squad_objects({"qas": {"id": 1}}, "qas") == squad_objects([], "qas") == []


def test_a_null_article_or_title_is_no_article_not_the_text_none(tmp_path: Path) -> None:
    """``"article": null`` (JSONL) or ``"title": null`` (SQuAD) was the article "None": written
    so into predictions.jsonl and selected by ``--articles None``; a number there is refused."""
    from citeqa.errors import SourceError
    from citeqa.evals.squad import load_questions

    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"id": "a", "question": "Q?", "answers": ["x"], "article": null}\n')
    [item] = load_questions(jsonl)
    assert item.article == ""
    with pytest.raises(SourceError, match="no questions found"):
        load_questions(jsonl, ["None"])
    squad = tmp_path / "s.json"
    qa = {"id": "b", "question": "Q?", "answers": [{"text": "x", "answer_start": 0}]}
    squad.write_text(json.dumps(
        {"data": [{"title": None, "paragraphs": [{"context": "x y", "qas": [qa]}]}]}))
    [item] = load_questions(squad)
    assert item.article == ""
    jsonl.write_text('{"id": "a", "question": "Q?", "answers": ["x"], "article": 7}\n')
    with pytest.raises(SourceError, match="'article' is int, not a string"):
        load_questions(jsonl)
