"""The evaluation runner: predictions file format, resumption, run.json refusal, bad input.

Runs the real pipeline with the ``tiny`` preset (hash embedder + weightless extractive
generator) over an index built in tmp_path.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import THREE_DOCS

from citeqa.config import Settings, preset
from citeqa.errors import ConfigError, SourceError
from citeqa.evals.runner import (
    PREDICTIONS,
    RUN_JSON,
    RunSpec,
    gold_rank,
    passage_matches_context,
    read_predictions,
    run_eval,
    select_items,
)
from citeqa.evals.squad import EVAL_ARTICLES, QAItem
from citeqa.pipeline import Pipeline
from citeqa.retrieval import build_index_from_documents
from citeqa.types import Answer, Document, Hit, Passage

DOCS = THREE_DOCS
QUESTIONS = [
    {
        "id": "q1",
        "question": "When was Harvard University founded?",
        "answers": ["1636"],
        "context": DOCS[2].text,
    },
    {
        "id": "q2",
        "question": "Who was the leader of the Normans?",
        "answers": ["Rollo"],
        "context": DOCS[0].text,
    },
    {"id": "q3", "question": "What is the capital city of Mars?", "answers": []},
    {
        "id": "q4",
        "question": "When did the Eiffel Tower open?",
        "answers": ["1889", "in 1889"],
        "context": DOCS[1].text,
    },
    {
        "id": "q5",
        "question": "Which king did Rollo swear fealty to?",
        "answers": ["Charles III"],
        "context": DOCS[0].text,
    },
]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "index"
    build_index_from_documents(DOCS, out, preset("tiny").retrieval, progress=False)
    return out


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def _spec(dataset: Path, index: Path, **kw: object) -> RunSpec:
    return RunSpec(dataset=dataset, index=index, preset="tiny", **kw)  # type: ignore[arg-type]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


def test_predictions_file_format(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_eval(_spec(dataset, index_dir), out, progress=False)
    assert (result.questions, result.answered_now, result.resumed) == (5, 5, 0)
    rows = _lines(out)
    assert [r["id"] for r in rows] == [q["id"] for q in QUESTIONS]
    for row, q in zip(rows, QUESTIONS, strict=True):
        assert row["gold_answers"] == q["answers"]
        assert row["question"] == q["question"]
        assert isinstance(row["declined"], bool)
        assert row["declined"] == (row["answer"] is None)
        cands = row["candidates"]
        assert cands, row
        for c in cands:
            assert {"answer", "quote", "score", "mean_logprob", "retrieval_score"} <= set(c)
        # best first: verified quotes first, then by score, as the pipeline ranks them
        keys = [(c["quote"] is None, -c["score"]) for c in cands]
        assert keys == sorted(keys)
        assert "total_ms" in row["timings_ms"]
    # the same answers as asking the pipeline directly
    pipe = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    for row, q in zip(rows, QUESTIONS, strict=True):
        direct = pipe.ask(q["question"]).to_json()
        assert row["answer"] == direct["answer"]
        assert row["quote"] == direct["quote"]
        assert row["score"] == pytest.approx(direct["score"])
    # gold paragraph ranks: known for questions with a context, None without
    assert rows[2]["gold_rank"] is None and not rows[2]["has_context"]
    assert all(isinstance(r["gold_rank"], int) for i, r in enumerate(rows) if i != 2)
    for name in ("metrics.json", "report.md", RUN_JSON):
        assert (out / name).is_file()
    run = json.loads((out / RUN_JSON).read_text())
    assert run["pipeline"]["generator_model_id"] == "extractive"
    assert run["identity"]["preset"] == "tiny"


def test_resume_after_limit(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_eval(_spec(dataset, index_dir), out, limit=2, progress=False)
    assert (first.questions, first.answered_now) == (2, 2)
    assert first.metrics["questions"] == 2
    assert [r["id"] for r in _lines(out)] == ["q1", "q2"]
    again = run_eval(_spec(dataset, index_dir), out, limit=2, progress=False)
    assert (again.answered_now, again.resumed) == (0, 2)
    full = run_eval(_spec(dataset, index_dir), out, progress=False)
    assert (full.questions, full.answered_now, full.resumed) == (5, 3, 2)
    assert [r["id"] for r in _lines(out)] == [q["id"] for q in QUESTIONS]
    assert full.metrics["questions"] == 5


def test_truncated_last_line_is_redone(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_eval(_spec(dataset, index_dir), out, progress=False)
    path = out / PREDICTIONS
    complete = path.read_text()
    last_start = complete.rstrip("\n").rfind("\n") + 1
    path.write_text(complete[: last_start + 40])  # a crash in the middle of the last write
    records, good = read_predictions(path)
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
    assert good == len(complete[:last_start].encode())
    result = run_eval(_spec(dataset, index_dir), out, progress=False)
    assert (result.answered_now, result.resumed) == (1, 4)
    rows = _lines(out)  # every line parses again
    assert [r["id"] for r in rows] == [q["id"] for q in QUESTIONS]
    before = [json.loads(line) for line in complete.splitlines()]
    for row in (*rows, *before):
        row.pop("timings_ms")
    assert rows == before  # deterministic pipeline: the same last line again


def test_damaged_middle_line_refuses(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_eval(_spec(dataset, index_dir), out, limit=3, progress=False)
    path = out / PREDICTIONS
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"id": "q2", "broken\n'
    path.write_text("".join(lines))
    with pytest.raises(ConfigError, match=r"predictions.jsonl:2.*--force"):
        run_eval(_spec(dataset, index_dir), out, progress=False)
    assert run_eval(_spec(dataset, index_dir), out, force=True, progress=False).resumed == 0


def test_refuses_to_resume_with_other_settings(
    dataset: Path, index_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_eval(_spec(dataset, index_dir), out, limit=1, progress=False)
    with pytest.raises(ConfigError, match=r"min_score.*--force"):
        run_eval(_spec(dataset, index_dir, min_score=0.9), out, progress=False)
    with pytest.raises(ConfigError, match="n_candidates"):
        run_eval(_spec(dataset, index_dir, n_candidates=2), out, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(dataset.read_text().replace("Mars", "Venus"))
    with pytest.raises(ConfigError, match="dataset_sha256"):
        run_eval(_spec(other, index_dir), out, progress=False)
    # a second eval writing there at the same time would ask and count every question twice
    from citeqa.journal import run_lock

    with run_lock(out, "citeqa eval"), pytest.raises(ConfigError, match="another citeqa eval"):
        run_eval(_spec(dataset, index_dir), out, progress=False)
    # an answer mode given now, or given before and not now, is another run
    with pytest.raises(ConfigError, match="answer_mode: was None, now 'free'"):
        run_eval(_spec(dataset, index_dir, answer_mode="free"), out, progress=False)
    free = tmp_path / "free"
    run_eval(_spec(dataset, index_dir, answer_mode="free"), free, limit=1, progress=False)
    with pytest.raises(ConfigError, match="answer_mode: was 'free', now None"):
        run_eval(_spec(dataset, index_dir), free, progress=False)
    # nothing was written by the refused runs
    assert [r["id"] for r in _lines(out)] == ["q1"]
    forced = run_eval(_spec(dataset, index_dir, min_score=0.9), out, force=True, progress=False)
    assert (forced.resumed, forced.answered_now) == (0, 5)
    rows = _lines(out)
    # the tiny preset's scores lie below 0.9 (0.38-0.73): all declined, by that threshold
    assert all(r["declined"] == (r["score"] < 0.9) for r in rows) and rows
    assert all("0.9" in r["reason"] for r in rows), rows
    assert json.loads((out / RUN_JSON).read_text())["identity"]["min_score"] == 0.9


def test_refuses_to_resume_with_another_system(
    dataset: Path, index_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models and settings come from CITEQA_* variables too, which the identity does not hold:
    a run resumed after changing one would mix two systems' answers."""
    out = tmp_path / "run"
    run_eval(_spec(dataset, index_dir), out, limit=1, progress=False)
    monkeypatch.setenv("CITEQA_ANSWER_MODE", "free")
    with pytest.raises(ConfigError, match=r"another system.*answer_mode was 'span', now 'free'"):
        run_eval(_spec(dataset, index_dir), out, progress=False)
    assert [r["id"] for r in _lines(out)] == ["q1"]
    monkeypatch.delenv("CITEQA_ANSWER_MODE")
    tiny = preset("tiny")
    threaded = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
    threaded.cfg = replace(tiny, generation=replace(tiny.generation, threads=3))
    assert run_eval(_spec(dataset, index_dir), out, progress=False,
                    pipeline=threaded).answered_now == 4  # the thread count changes no output
    run = json.loads((out / RUN_JSON).read_text())
    assert run["pipeline"]["config"]["generation"]["threads"] == 3  # recorded, not dropped


def test_the_same_system_named_otherwise_resumes(tmp_path: Path, monkeypatch) -> None:
    """Another path to the same adapter (recorded resolved), or settings of speed alone, are
    the same system; an adapter elsewhere is not, and a changed model id says how to pin the
    compute type only when the compute type is what changed."""
    from citeqa.evals.runner import _resolved_paths, check_same_system

    (tmp_path / "ad").mkdir()
    (tmp_path / "other").mkdir()

    def desc(adapter: str, concurrency: int = 8, model_id: str = "m+bf16",
             compiled: bool = False) -> dict:
        return {"generator_model_id": model_id, "scorer": "s" + (", compiled" * compiled),
                "threshold": 0.3,
                "config": _resolved_paths({
                    "generation": {"adapter": adapter, "concurrency": concurrency,
                                   "threads": None},
                    "reward": {"model": "default", "compile": compiled}})}

    monkeypatch.chdir(tmp_path)
    check_same_system(tmp_path, desc("ad"), desc(f"{tmp_path}/./ad/", 16, compiled=True))
    with pytest.raises(ConfigError, match="generation.adapter was"):
        check_same_system(tmp_path, desc(f"{tmp_path}/ad"), desc("other"))
    with pytest.raises(ConfigError, match="pin it"):
        check_same_system(tmp_path, desc("packaged"), desc("packaged", model_id="m+fp16w"))
    with pytest.raises(ConfigError, match=r"model_id: was 'm\+bf16', now 'n\+bf16'") as info:
        check_same_system(tmp_path, desc("packaged"), desc("packaged", model_id="n+bf16"))
    assert "pin it" not in str(info.value)  # another model, not another compute type
    # a run made before a local folder's id had its weights digest resumes with that folder,
    # not with another model's
    check_same_system(tmp_path, desc("packaged", model_id="qwen+bf16"),
                      desc("packaged", model_id="qwen@1a2b3c4d+bf16"))
    with pytest.raises(ConfigError, match="model_id"):
        check_same_system(tmp_path, desc("packaged", model_id="qwen@1a2b3c4d+bf16"),
                          desc("packaged", model_id="qwen@99999999+bf16"))
    # a remote engine restarted on another port, or its one model named: the generator's id
    # (the name and where the engine loaded it) is the same, and so is the system
    def remote(url: str, served: str | None, model_id: str) -> dict:
        d = desc("packaged", model_id=model_id)
        d["config"]["generation"].update(url=url, served_model=served)
        return d

    same = "remote:gen (/models/a)"
    check_same_system(tmp_path, remote("http://127.0.0.1:8100", None, same),
                      remote("http://localhost:8200", "gen", same))
    with pytest.raises(ConfigError, match="model_id"):
        check_same_system(tmp_path, remote("http://127.0.0.1:8100", None, same),
                          remote("http://127.0.0.1:8100", None, "remote:gen (/models/b)"))


def test_a_threshold_no_score_reaches_is_recorded_and_resumes(
    dataset: Path, index_dir: Path, tmp_path: Path
) -> None:
    """An infinite threshold (CITEQA_DECLINE_UNCERTIFIED over a calibration that certified
    nothing; here the config's) declines every question; JSON has no infinity, so run.json and
    metrics.json record "inf" (writing them raised a ValueError before), and the run resumes."""
    import math

    def declining() -> Pipeline:
        p = Pipeline.from_settings(Settings(preset="tiny", index=index_dir))
        p.cfg = replace(p.cfg, reward=replace(p.cfg.reward, threshold=math.inf))
        return p

    out = tmp_path / "run"
    first = run_eval(_spec(dataset, index_dir), out, limit=2, progress=False, pipeline=declining())
    assert first.metrics["threshold"] == "inf" and first.metrics["at_threshold"]["answered"] == 0
    assert json.loads((out / RUN_JSON).read_text())["pipeline"]["config"]["reward"][
        "threshold"] == "inf"
    again = run_eval(_spec(dataset, index_dir), out, progress=False, pipeline=declining())
    assert (again.resumed, again.answered_now) == (2, 3)
    assert "threshold in effect: inf" in (out / "report.md").read_text()


def test_predictions_without_run_json_refuse(
    dataset: Path, index_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / PREDICTIONS).write_text('{"id": "q1"}\n')
    with pytest.raises(ConfigError, match="--force"):
        run_eval(_spec(dataset, index_dir), out, progress=False)


def test_a_folder_of_the_users_is_not_written_over_and_force_removes_the_runs_files_only(
    dataset: Path, index_dir: Path, tmp_path: Path
) -> None:
    """The review's: --force deleted every *.png of --out (a holiday.png), and a folder that
    held no run had its report.md written over without a word."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    (out / "eval.log").write_text("")  # (a log beside the run: no matter)
    with pytest.raises(ConfigError, match=r"mine holds report.md but no run.json"):
        run_eval(_spec(dataset, index_dir), out, progress=False)
    assert (out / "report.md").read_text() == "my notes\n"
    (out / "report.md").unlink()
    run_eval(_spec(dataset, index_dir), out, limit=1, progress=False)  # beside its log: runs
    run_eval(_spec(dataset, index_dir), tmp_path / "run", limit=2, progress=False)
    run = tmp_path / "run"
    figures = sorted(p.name for p in run.glob("*.png"))
    assert figures, "the run drew no figures"
    (run / "holiday.png").write_bytes(b"png")
    run_eval(_spec(dataset, index_dir), run, limit=2, force=True, progress=False)
    assert (run / "holiday.png").read_bytes() == b"png"
    assert sorted(p.name for p in run.glob("*.png")) == sorted([*figures, "holiday.png"])


def test_bad_input(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        run_eval(_spec(tmp_path / "nope.jsonl", index_dir), tmp_path / "a", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"bad.jsonl:2"):
        run_eval(_spec(bad, index_dir), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="index build"):
        run_eval(_spec(dataset, tmp_path / "no-index"), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="--limit"):
        run_eval(_spec(dataset, index_dir), tmp_path / "d", limit=0, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_samples_are_seeded_spread_and_nested() -> None:
    items = [QAItem(f"q{i}", f"question {i}?", (), "", "") for i in range(200)]
    small = select_items(items, sample=20, seed=3)
    assert len(small) == 20 and small == select_items(items, sample=20, seed=3)
    assert [it.id for it in small] == sorted((it.id for it in small), key=lambda i: int(i[1:]))
    assert {it.id for it in small} <= {it.id for it in select_items(items, sample=50, seed=3)}
    assert small != select_items(items, sample=20, seed=4)
    assert int(small[-1].id[1:]) > 100  # spread over the dataset, not its first questions
    assert select_items(items, sample=500) == items
    assert select_items(items, limit=3) == items[:3]
    with pytest.raises(ConfigError, match="not both"):
        select_items(items, limit=3, sample=3)
    with pytest.raises(ConfigError, match="--sample"):
        select_items(items, sample=0)


def test_resume_after_growing_a_sample(dataset: Path, index_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_eval(_spec(dataset, index_dir), out, sample=2, seed=1, progress=False)
    assert (first.questions, first.answered_now) == (2, 2)
    grown = run_eval(_spec(dataset, index_dir), out, sample=4, seed=1, progress=False)
    assert (grown.questions, grown.answered_now, grown.resumed) == (4, 2, 2)
    assert grown.metrics["questions"] == 4


def test_refused_question_is_recorded_as_decline(index_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    rows = [{"id": "long", "question": "why " * 400, "answers": ["x"]}, QUESTIONS[0]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(_spec(path, index_dir), tmp_path / "run", progress=False)
    first = _lines(tmp_path / "run")[0]
    assert first["declined"] and first["reason"].startswith("refused:")
    assert first["candidates"] == []
    assert result.metrics["questions"] == 2


def test_a_generator_gone_mid_run_stops_it_and_the_rerun_asks_the_rest(
        dataset: Path, index_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Recorded as refusals, the questions asked while a remote engine was down became
    declines for good (a rerun resumed them), and the run ended 'successfully' with F1 0."""
    from citeqa.errors import EngineUnavailableError

    real = Pipeline.ask
    calls = {"n": 0}

    def down_after_two(self, question, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise EngineUnavailableError("the generator at http://gen cannot be reached")
        return real(self, question, **kw)

    monkeypatch.setattr(Pipeline, "ask", down_after_two)
    out = tmp_path / "run"
    with pytest.raises(EngineUnavailableError, match=r"cannot be reached. The run stopped: the "
                                                     r"2 questions answered so far are kept"):
        run_eval(_spec(dataset, index_dir), out, progress=False)
    assert [r["id"] for r in _lines(out)] == ["q1", "q2"]
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(Pipeline, "ask", real)  # the engine is back
    again = run_eval(_spec(dataset, index_dir), out, progress=False)
    assert (again.resumed, again.answered_now) == (2, 3)
    assert not any(r["reason"] and r["reason"].startswith("refused:") for r in _lines(out))


def test_a_calibration_made_on_other_answers_is_said_in_the_report(
        dataset: Path, index_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The service logs it when it starts; an evaluation said it on stderr only, and its
    report gave the threshold in effect as if it certified what it did for other answers."""
    from types import SimpleNamespace

    from citeqa.generation.prompt import generator_fingerprint

    loaded = Pipeline.from_settings

    def with_calibration(settings):
        pipeline = loaded(settings)
        gen = pipeline.cfg.generation
        made_on = generator_fingerprint(pipeline.generator.backend.model_id, gen)
        body = {"generators": [{**made_on, "top_k_passages": gen.top_k_passages + 2}],
                "candidates_per_question": gen.n_candidates, "threshold": 0.5,
                "target_accuracy": 0.8}
        pipeline.scorer = SimpleNamespace(calibration=SimpleNamespace(body=body))
        return pipeline

    monkeypatch.setattr(Pipeline, "from_settings", staticmethod(with_calibration))
    monkeypatch.setattr("citeqa.evals.runner.scorer_name", lambda pipeline: "a stand-in")
    monkeypatch.setattr(Pipeline, "decline_threshold", lambda self, min_score: 0.5)
    monkeypatch.setattr(Pipeline, "ask_many", lambda self, args: [
        Answer(question=a.question, declined=True, answer=None, quote=None, score=None,
               reason="below") for a in args])
    out = tmp_path / "run"
    run_eval(_spec(dataset, index_dir), out, limit=1, progress=False)
    note = json.loads((out / RUN_JSON).read_text())["pipeline"]["calibration_note"]
    assert "top_k_passages" in note and "calibrated on other answers" in note
    assert f"threshold in effect: 0.500 ({note})" in (out / "report.md").read_text()


def test_split_restricts_squad_articles(index_dir: Path, tmp_path: Path) -> None:
    def article(title: str, qid: str) -> dict:
        return {
            "title": title,
            "paragraphs": [
                {
                    "context": DOCS[2].text,
                    "qas": [
                        {
                            "id": qid,
                            "question": "When was Harvard University founded?",
                            "answers": [{"text": "1636", "answer_start": 34}],
                            "is_impossible": False,
                        }
                    ],
                }
            ],
        }

    squad = tmp_path / "squad.json"
    titles = [*EVAL_ARTICLES, "Normans"]
    squad.write_text(
        json.dumps(
            {"version": "v2.0", "data": [article(title, f"q{i}") for i, title in enumerate(titles)]}
        )
    )
    out = tmp_path / "run"
    result = run_eval(_spec(squad, index_dir, split="eval"), out, progress=False)
    assert result.questions == len(EVAL_ARTICLES)
    rows = _lines(out)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(EVAL_ARTICLES))]
    assert [r["article"] for r in rows] == list(EVAL_ARTICLES)
    assert all(r["gold_rank"] == 1 for r in rows)
    with pytest.raises(SourceError, match="lacks articles of the split.*leave --split out; "
                       "`citeqa train generator-data`: --split all"):
        run_eval(_spec(squad, index_dir, split="train"), tmp_path / "run2", progress=False)


def _hit(text: str, doc_id: str = "d", start: int = 0) -> Hit:
    return Hit(Passage(0, doc_id, start, start + len(text), text), "t", "s", 1.0)


def test_passage_matches_context() -> None:
    ctx = "Alpha beta gamma. Delta epsilon zeta."
    doc = Document("d", "t", "s", ctx)
    assert passage_matches_context(_hit("Delta epsilon zeta."), None, ctx)  # inside
    assert passage_matches_context(_hit("Intro. " + ctx + " Outro."), None, ctx)  # contains
    assert passage_matches_context(_hit("something else"), doc, "  " + ctx + "\n")  # whole doc
    assert not passage_matches_context(_hit("Omega."), Document("x", "t", "s", "Omega."), ctx)
    assert not passage_matches_context(_hit("Delta"), None, "")


def test_gold_rank() -> None:
    ctx = "Alpha beta gamma."
    docs = {"a": Document("a", "t", "s", "Other text."), "b": Document("b", "t", "s", ctx)}
    hits = [_hit("Other text.", "a"), _hit("Alpha beta gamma.", "b"), _hit(ctx, "b")]
    assert gold_rank(hits, ctx, docs.__getitem__) == 2
    assert gold_rank(hits[:1], ctx, docs.__getitem__) is None
    assert gold_rank(hits, "", docs.__getitem__) is None
    unknown = [replace(hits[1], passage=replace(hits[1].passage, doc_id="zzz"))]
    assert gold_rank(unknown, ctx, docs.__getitem__) == 1  # text still inside the context


def test_run_json_never_holds_a_generator_password() -> None:
    from citeqa.evals.runner import _without_secrets

    config = {"generation": {"url": "http://admin:hunter2@gen:8100", "model": "m"}, "x": 1}
    assert _without_secrets(config) == {"generation": {"url": "http://gen:8100", "model": "m"},
                                        "x": 1}
    assert _without_secrets({"generation": {"url": None}}) == {"generation": {"url": None}}


def test_eval_help_shows_that_a_run_takes_no_command() -> None:
    """Its usage read "citeqa eval [OPTIONS] COMMAND [ARGS]...": a command seemed required."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    r = CliRunner().invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "Usage: citeqa eval [OPTIONS] [compare RUN_A RUN_B]" in r.output


def test_the_revision_is_citeqas_own_checkouts_or_unknown(tmp_path: Path) -> None:
    """An installed citeqa in a venv inside a user's repository recorded that repository's
    commit as the revision of the code that made the run."""
    import subprocess

    from citeqa.evals.runner import git_revision

    repo = tmp_path / "project"
    (repo / ".venv" / "site-packages").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@x",
                    "commit", "-q", "--allow-empty", "-m", "app"], check=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_revision(repo) == head
    assert git_revision(repo / ".venv" / "site-packages") == "unknown"


def test_each_question_retrieves_as_deep_as_its_gold_rank_is_read() -> None:
    """The gold paragraph's rank (recall@k, MRR) is read over RETRIEVAL_DEPTH passages; asked
    without it, the pipeline retrieves top_k (3) and every rank past that reads as missed."""
    from citeqa.errors import InvalidRequestError
    from citeqa.evals.runner import RETRIEVAL_DEPTH, ask_one
    from citeqa.evals.squad import QAItem

    asked: dict = {}

    class Recording:
        def ask(self, question: str, **kwargs: object) -> None:
            asked.update(kwargs)
            raise InvalidRequestError("recorded as a decline")

        def document(self, doc_id: str) -> None:
            raise KeyError(doc_id)

    row = ask_one(Recording(), QAItem("q1", "Which port?", ("4242",), "A", ""),  # type: ignore[arg-type]
                  None, None)
    assert row["declined"] and asked["search_k"] == RETRIEVAL_DEPTH == 20
