"""Mutation-testing round (citeqa/redteam/ and citeqa/distributed/): the red team's rules that
tests/test_redteam.py leaves open (the corpus check's edges, the makers' value choices, the
template writer's limits, a run's records and summary, the --questions seeds and run identity),
the sharded build's merge order and the Ray engine's parts that run without a cluster."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from test_redteam import PASSAGES as REDTEAM_PASSAGES
from typer.testing import CliRunner

from citeqa.redteam.corpus import Corpus, name_kind
from citeqa.redteam.maker import (
    Seed,
    _number_like,
    absent_subject,
    date_swap,
    impossible_condition,
    make_variants,
    negation,
    number_swap,
)
from citeqa.redteam.run import Probe, ask_all, probes, result_record, sample_seeds, summarize
from citeqa.redteam.writer import write_questions
from citeqa.text import term
from citeqa.types import Answer, Candidate, Quote

PASSAGES = REDTEAM_PASSAGES[:4]  # (test_redteam's, without Yale)
CORPUS = Corpus.build(PASSAGES)
QUOTE = Quote(text="the duke", doc_id="d", title="T", source="s", start=0, end=8)


# -- the corpus --

def test_a_value_with_no_other_question_term_is_taken_as_answerable() -> None:
    """Nothing else in the question tells passages apart: the check must assume a passage
    holding the value answers it (a swap to it is no unanswerable question)."""
    assert CORPUS.could_answer("Harvard University", "Harvard University?")
    assert not CORPUS.could_answer("Oxford", "Oxford?")  # in no passage at all


def test_names_alike_are_sorted_and_the_usual_context_is_the_top_three_words() -> None:
    people = ["Adams", "Brown", "Clark", "Davis", "Evans", "Flynn", "Grant", "Hughes",
              "Irwin", "Jones", "Kelly", "Lopez"]
    corpus = Corpus.build([f"The land was given by {p} to the town." for p in reversed(people)])
    found = corpus.names_alike("Adams")
    assert found == tuple(sorted(found)) and set(people) <= set(found)
    ctx = Corpus.build(["it stood in Paris.", "it stood in Paris.", "it stood in Paris.",
                        "the kings of Paris.", "the kings of Paris.", "the road to Paris.",
                        "the road to Paris.", "built by Paris."])
    assert ctx.name_context["Paris"] == {"in": 3, "of": 2, "to": 2, "by": 1}
    assert ctx.usual_context("Paris") == {"in", "of", "to"}


def test_a_name_kind_is_its_length_and_a_kind_word_only_after_another_word() -> None:
    assert name_kind("Harvard University") == (2, "University")
    assert name_kind("University") == (1, "")
    assert name_kind("Henry Dunster") == (2, "")


# -- the makers --

def test_a_swapped_number_never_stands_in_the_seeds_own_passage() -> None:
    """The corpus need not hold the seed's passage (a --questions context): the passage check
    alone keeps the answer's own numbers out."""
    passage = "The counts were " + ", ".join(str(n) for n in range(9, 37) if n != 23) + "."
    seed = Seed("How many volumes did the 18 libraries hold?", passage)
    for i in range(20):
        v = number_swap(seed, CORPUS, random.Random(i))
        assert v is None or v.change == "18 -> 23", v.change


def test_a_swapped_name_never_stands_in_the_seeds_own_passage() -> None:
    from citeqa.redteam.maker import entity_swap

    corpus = Corpus.build(["Oxford University has many old colleges.",
                           "Harvard University was founded in 1636.",
                           "Yale University is in New Haven."])
    seed = Seed("When was Harvard University founded?",
                "Harvard University was founded in 1636. Yale University came later.")
    made = [entity_swap(seed, corpus, random.Random(i)) for i in range(20)]
    assert any(made)
    for v in made:
        assert v is None or v.change == "Harvard University -> Oxford University", v.change


def test_a_small_number_becomes_another_and_thousands_keep_their_comma() -> None:
    for i in range(60):
        assert _number_like("5", random.Random(i)) != "5"
        big = _number_like("8,180", random.Random(i))
        assert re.fullmatch(r"\d{1,3}(,\d{3})+", big) and big != "8,180", big


def test_a_swapped_year_stays_within_sixty_years_and_a_month_changes() -> None:
    seed = Seed("Who built the castle of Rouen in 1066?", PASSAGES[0])  # corpus: none near 1066
    for i in range(20):
        v = date_swap(seed, CORPUS, random.Random(i))
        assert v is not None
        old, new = (int(x) for x in v.change.split(" -> "))
        assert old == 1066 and 0 < abs(new - old) <= 60, v.change
    month = Seed("What happened in March?", PASSAGES[2])
    for i in range(60):
        v = date_swap(month, CORPUS, random.Random(i))
        assert v is not None and v.change.split(" -> ")[1] != "March", v.change


def test_a_negative_question_is_not_negated_again() -> None:
    for q in ("Why was the duke not crowned?", "Who was never crowned by the duke?",
              "Why did no duke build a castle?"):
        assert negation(Seed(q, PASSAGES[0]), CORPUS, random.Random(0)) is None, q


def test_a_question_about_a_time_gets_no_impossible_condition() -> None:
    for q in ("When was the castle of Rouen built?", "Which century saw the castle built?"):
        assert impossible_condition(Seed(q, PASSAGES[0]), CORPUS, random.Random(0)) is None


def test_an_impossible_condition_keeps_thirty_years_from_every_year_the_passage_names() -> None:
    seed = Seed("Who opened the tower?", "The tower was opened in 1880 by the city.")
    made = [impossible_condition(seed, CORPUS, random.Random(i)) for i in range(30)]
    assert any(made)
    for v in made:
        assert v is None or abs(int(v.change.split()[-1]) - 1880) > 30, v.change


NOUN_PASSAGES = [
    "The tower of the town was old.",  # tower: 1 time
    *["The harbour of the town was busy."] * 6,  # harbour: common
    "The wagon of the farm was red.", "The orchard of the farm was green.",
    "The towers of the north were old.",  # the plural of tower
]


def test_absent_subject_replaces_the_rarest_noun_with_another_word_not_its_plural() -> None:
    corpus = Corpus.build(NOUN_PASSAGES)
    # its passage (a --questions context, not in the corpus) holds "wagon": not absent there
    seed = Seed("Who saw the harbour near the tower?", "The wagon stood near the tower.")
    made = [absent_subject(seed, corpus, random.Random(i)) for i in range(20)]
    assert any(made)
    for v in made:
        assert v is None or (v.change.startswith("tower -> ")
                             and v.change.split(" -> ")[1] not in ("wagon", "towers")), v.change
    assert term("towers") == term("tower") and "towers" in corpus.nouns


def test_absent_subject_never_puts_a_word_ending_in_e_for_its_own_plural() -> None:
    """term("castles") was "castl", term("castle") "castle": the plural guard let "castle ->
    castles" through, a variant labelled unanswerable that asks the same thing."""
    corpus = Corpus.build(["The castle of the town was old.",
                           "The castles of the region were old."])
    seed = Seed("Who built the castle of the town?", "The castle of the town was old.")
    for i in range(20):
        v = absent_subject(seed, corpus, random.Random(i))
        assert v is None or v.change != "castle -> castles", v.change


def test_make_variants_follows_its_seed_and_gives_controls_the_seeds_answer() -> None:
    seeds = [Seed("Who built the castle of Rouen?", PASSAGES[0], "the duke"),
             Seed("When was Harvard University founded?", PASSAGES[1], "1636")]
    runs = {json.dumps([v.question for v in make_variants(seeds, CORPUS, seed=s)])
            for s in range(6)}
    assert len(runs) > 1  # --seed changes the variants' choices
    [control] = make_variants(seeds[:1], CORPUS, kinds=["paraphrase"])
    assert control.answers == ("the duke",) and control.answer == "the duke"


# -- the template writer --

def test_template_questions_skip_questions_and_too_short_or_long_sentences() -> None:
    assert write_questions([("q", "Who built the castle of Rouen for the duke in 1066?")]) == []
    assert write_questions([("s", "Rollo came in 911.")]) == []
    long = "The duke built " + "a wall and " * 20 + "the castle of Rouen in 1066."
    assert write_questions([("l", long)]) == []


def test_a_name_that_opens_a_sentence_is_not_asked_about() -> None:
    assert write_questions([("k", "King Charles ruled the western lands for many long years.")]) \
        == []


def test_per_passage_ids_and_the_seed_of_template_questions() -> None:
    made = write_questions([("p0", PASSAGES[0]), ("p3", PASSAGES[3])], per_passage=1)
    assert [s.id for s in made] == ["p0#0", "p3#0"]
    two = write_questions([("p0", PASSAGES[0])], per_passage=2)
    assert [s.id for s in two] == ["p0#0", "p0#1"]
    runs = {tuple(s.question for s in write_questions([(f"p{i}", p) for i, p in
                                                       enumerate(PASSAGES)], seed=k))
            for k in range(6)}
    assert len(runs) > 1  # --seed changes the questions written


def test_a_wrapped_line_is_one_sentence_as_unwrapped() -> None:
    flat = "The duke built the castle of Rouen with 1200 men from the farms of the region."
    wrapped = flat.replace(" with ", "\nwith ")
    a, b = write_questions([("p", flat)], seed=3), write_questions([("p", wrapped)], seed=3)
    assert [s.question for s in a] == [s.question for s in b] and a


# -- a run's records and summary --

def answer(text: str | None, *, declined: bool = False, quote: Quote | None = QUOTE,
           candidates: list[Candidate] | None = None, score: float | None = 0.9) -> Answer:
    return Answer("Q?", declined, text, quote, score,
                  candidates=candidates if candidates is not None else
                  ([Candidate(text, quote, score=score)] if text else []))


def test_a_result_is_right_only_for_an_answered_control_with_a_verified_quote() -> None:
    control = Probe("Who built it?", "original", True, "Who built it?", "the duke")
    made = Probe("Who didn't build it?", "negation", False, "Who built it?", "the duke")
    assert result_record(control, answer("the duke"))["right"]
    assert not result_record(made, answer("the duke"))["right"]  # the original's answer
    assert not result_record(made, answer("the duke"))["best_right"]
    assert not result_record(control, answer("the duke", quote=None, candidates=[]))["right"]
    unverified = answer("the duke", candidates=[Candidate("the duke", None, score=0.8)])
    rec = result_record(control, unverified)
    assert rec["best_score"] is None and not rec["best_right"]
    best_first = answer("the duke", candidates=[Candidate("the duke", QUOTE, score=0.9),
                                                 Candidate("Rollo", QUOTE, score=0.1)])
    rec = result_record(control, best_first)
    assert rec["best_score"] == 0.9 and rec["best_answer"] == "the duke"


def test_a_seed_and_a_variant_with_the_same_question_are_asked_once() -> None:
    seed = Seed("Who built it?", "p", "the duke")
    from citeqa.redteam.maker import Variant

    same = Variant("Who built it?", "paraphrase", True, "Who built it?", "the duke", "p", "x")
    other = Variant("Who made it?", "paraphrase", True, "Who built it?", "the duke", "p", "x")
    assert [(p.question, p.kind) for p in probes([seed], [same, other])] == [
        ("Who built it?", "original"), ("Who made it?", "paraphrase")]


def test_ask_all_returns_only_the_records_of_the_probes_asked(tmp_path: Path) -> None:
    old = Probe("Who made thing 0?", "paraphrase", True, "Who?", "x")
    new = Probe("Who made thing 1?", "paraphrase", True, "Who?", "x")

    def ask(args):  # type: ignore[no-untyped-def]
        return [Answer(a.question, True, None, None, None, reason="fake") for a in args]

    ask_all([old], ask, tmp_path, progress=False)
    records = ask_all([new], ask, tmp_path, progress=False)
    assert [r["question"] for r in records] == [new.question]


def record(kind: str, answerable: bool, *, declined: bool, score: float | None,
           right: bool = False, best_right: bool = False) -> dict:
    return {"kind": kind, "answerable": answerable, "declined": declined, "score": score,
            "best_score": score, "right": right, "best_right": best_right, "question": kind,
            "original": "o", "change": "c", "answer": None if declined else "a",
            "quote": None, "source": None}


def test_the_summary_ranks_the_worst_by_score_and_counts_a_score_at_the_threshold() -> None:
    records = [record("negation", False, declined=False, score=s) for s in (0.2, 0.9, 0.5)]
    records += [record("original", True, declined=False, score=0.9, right=True),
                record("original", True, declined=False, score=0.9, right=False)]
    s = summarize(records, 0.5)
    assert [w["score"] for w in s["worst"]] == [0.9, 0.5, 0.2]
    assert s["curves"]["thresholds"][50] == 0.5
    assert s["curves"]["negation"][50] == pytest.approx(2 / 3)  # 0.5 >= 0.5 answers
    assert s["curves"]["controls answered right"][50] == 0.0  # best_right is False for both
    assert s["kinds"]["original"]["false_answer_rate"] is None
    assert s["kinds"]["original"]["accuracy"] == 0.5
    assert s["kinds"]["negation"]["accuracy"] is None
    assert s["kinds"]["negation"]["false_answer_rate"] == 1.0


def test_sampled_seeds_keep_their_order() -> None:
    seeds = [Seed(f"Q{i}?", "p") for i in range(30)]
    for k in range(5):
        kept = sample_seeds(seeds, 7, k)
        assert len(kept) == 7 and kept == sorted(kept, key=seeds.index)


# -- `citeqa redteam --questions` --

@pytest.fixture
def index(tmp_path: Path) -> Path:
    from citeqa.config import preset
    from citeqa.retrieval import build_index_from_documents
    from citeqa.types import Document

    docs = [Document(f"d{i}", f"T{i}", f"s{i}", p) for i, p in enumerate(PASSAGES)]
    build_index_from_documents(docs, tmp_path / "idx", preset("tiny").retrieval, progress=False)
    return tmp_path / "idx"


def test_questions_without_a_worded_answer_or_a_context_are_no_seeds(tmp_path: Path,
                                                                      index: Path) -> None:
    from citeqa.cli import app

    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "Who built the castle?", "answers": ["", "the"],
         "context": PASSAGES[0]},
        {"id": "b", "question": "Who built the castle?", "answers": ["the duke"],
         "context": "  "}]) + "\n")
    r = CliRunner().invoke(app, ["redteam", "--index", str(index), "--out",
                                 str(tmp_path / "rt"), "--no-progress", "--questions", str(q)])
    assert r.exit_code == 2 and "no answerable seed questions" in r.output, r.output


def test_a_questions_run_resumes_whatever_per_passage_says_but_not_other_questions(
        tmp_path: Path, index: Path, monkeypatch) -> None:
    from citeqa.cli import app
    from citeqa.client import CiteqaClient

    asked: list[str] = []

    def ask(self, question, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(question)
        return Answer(question, True, None, None, None, reason="fake")

    monkeypatch.setattr(CiteqaClient, "answer", ask)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "question": "Who built the castle of Rouen?",
                             "answers": ["the duke"], "context": PASSAGES[0]}) + "\n")
    args = ["redteam", "--index", str(index), "--out", str(tmp_path / "rt"), "--no-progress",
            "--questions", str(q), "--url", "http://127.0.0.1:8650"]
    assert CliRunner().invoke(app, args).exit_code == 0 and asked
    n = len(asked)
    again = CliRunner().invoke(app, [*args, "--per-passage", "5"])  # (no template questions)
    assert again.exit_code == 0 and len(asked) == n, again.output
    q.write_text(json.dumps({"id": "a", "question": "Who built the castle of Paris?",
                             "answers": ["the duke"], "context": PASSAGES[0]}) + "\n")
    other = CliRunner().invoke(app, args)
    assert other.exit_code == 2 and "questions_sha256" in other.output, other.output


# -- the sharded build (citeqa.distributed.sharded) --

def _sources(directory: Path) -> list[str]:
    directory.mkdir()
    for i, topic in enumerate(("stars and comets", "bread and ovens", "ships and sails",
                               "rocks and fossils")):
        (directory / f"{i}.txt").write_text(
            "\n\n".join(f"Part {k} of the notes on {topic}: {topic} again." for k in range(6)))
    return [str(directory)]


def test_a_sharded_build_merges_shards_in_item_order_whatever_order_they_come_in(
        tmp_path: Path) -> None:
    """An executor may return its shards in any order (Ray's do): the index is the same."""
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded
    from citeqa.retrieval import Index, build_index

    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))

    class Shuffled(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            results = super().run(items, job, progress=progress)
            return results[::-1]

    sources = _sources(tmp_path / "src")
    build_index(sources, tmp_path / "local", cfg, progress=False)
    summary = build_index_sharded(sources, tmp_path / "sharded", cfg, progress=False,
                                  executor=Shuffled(), shard_chars=120)
    assert summary.shards > 2
    a, b = Index.load(tmp_path / "local"), Index.load(tmp_path / "sharded")
    assert list(a.documents) == list(b.documents) and a.passages == b.passages


def test_a_shard_the_executor_reports_but_the_work_dir_lacks_is_a_config_error(
        tmp_path: Path) -> None:
    """On a cluster whose nodes do not share --work-dir, the worker's shard is elsewhere."""
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded
    from citeqa.errors import ConfigError
    from citeqa.retrieval.shards import ShardResult

    class Elsewhere(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            done = super().run(items, job, progress=progress)
            return [*done, ShardResult(0, 99, "not-here", 1, True)]

    with pytest.raises(ConfigError, match="shard not-here was written by a worker but is not"):
        build_index_sharded(_sources(tmp_path / "src"), tmp_path / "idx",
                            RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60)),
                            progress=False, executor=Elsewhere(), shard_chars=120)
    assert not (tmp_path / "idx").exists()


def test_a_given_work_dir_an_interrupted_build_left_is_resumed(tmp_path: Path) -> None:
    """Its own shards (the marker says so) are no user's files: the rerun goes on with them."""
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded

    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=60))

    class Killed(InProcessExecutor):
        def run(self, items, job, *, progress):  # type: ignore[no-untyped-def]
            super().run(items, job, progress=progress)
            raise KeyboardInterrupt

    sources, work = _sources(tmp_path / "src"), tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        build_index_sharded(sources, tmp_path / "idx", cfg, progress=False, executor=Killed(),
                            work_dir=work, shard_chars=120)
    summary = build_index_sharded(sources, tmp_path / "idx", cfg, progress=False,
                                  executor=InProcessExecutor(), work_dir=work, shard_chars=120)
    assert summary.shards > 2 and summary.shards_reused == summary.shards


def test_two_urls_to_one_page_are_one_document_in_a_sharded_build(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """The merge is told which items are URLs: an address that redirects to a page another
    source names is that page, as in a plain build."""
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded
    from citeqa.types import Document

    page = "https://example.org/page"

    def load_item(item, fetcher):  # type: ignore[no-untyped-def]
        return [Document(f"id-{item[-4:]}", "Page", page, "The page text of the example.")]

    monkeypatch.setattr("citeqa.distributed.sharded.load_item", load_item)
    summary = build_index_sharded(["https://example.org/from", page], tmp_path / "idx",
                                  RetrievalConfig(embedder="hash",
                                                  chunk=ChunkConfig(max_chars=60)),
                                  progress=False, executor=InProcessExecutor())
    assert summary.documents == 1 and len(summary.skipped) == 1, summary.skipped


def test_a_shard_size_below_one_is_refused_first(tmp_path: Path) -> None:
    from citeqa.config import RetrievalConfig
    from citeqa.distributed import InProcessExecutor, build_index_sharded
    from citeqa.errors import ConfigError

    with pytest.raises(ConfigError, match="shard_chars must be at least 1, got 0"):
        build_index_sharded([str(tmp_path / "missing.txt")], tmp_path / "idx",
                            RetrievalConfig(embedder="hash"), progress=False,
                            executor=InProcessExecutor(), shard_chars=0)


# -- ray_engine's parts that need no Ray --

def test_a_cpu_actor_uses_no_more_threads_than_its_whole_cpus() -> None:
    from citeqa.distributed.ray_engine import RayOptions, plan_pool

    pool = plan_pool(RayOptions(cpus_per_embedder=2.5), cpus=10, gpus=0, dense=True)
    assert (pool["threads"], pool["actors"], pool["actor_cpus"]) == (2, 4, 2.5)


def test_a_worker_error_row_is_raised_as_its_own_citeqa_type() -> None:
    from citeqa.distributed.ray_engine import _raise_row_error
    from citeqa.errors import CiteqaError, ConfigError

    with pytest.raises(ConfigError, match="no such model"):
        _raise_row_error({"error": "ConfigError", "message": "no such model"})
    for name in ("OSError", "Path", "NoSuchName"):  # no citeqa error: the base one
        with pytest.raises(CiteqaError) as raised:
            _raise_row_error({"error": name, "message": "m"})
        assert type(raised.value) is CiteqaError


def _fake_ray(calls: list[str]):  # type: ignore[no-untyped-def]
    import types

    return types.SimpleNamespace(is_initialized=lambda: bool(calls.count("init")),
                                 init=lambda **kw: calls.append("init"),
                                 shutdown=lambda: calls.append("shutdown"))


def test_connected_shuts_down_only_the_ray_it_started(monkeypatch) -> None:
    from citeqa.distributed.ray_engine import RayOptions, connected

    calls: list[str] = []
    fake = _fake_ray(calls)
    monkeypatch.setattr("citeqa.distributed.ray_engine.require_ray", lambda: fake)
    with connected(RayOptions("local")) as ray:
        assert ray is fake and calls == ["init"]
        with connected(RayOptions("local")) as inner:  # running already: reused, left running
            assert inner is fake
        assert calls == ["init"]
    assert calls == ["init", "shutdown"]


def test_connected_checks_a_cluster_address_before_ray_init(monkeypatch) -> None:
    import socket

    from citeqa.distributed.ray_engine import RayOptions, connected
    from citeqa.errors import ConfigError

    calls: list[str] = []
    monkeypatch.setattr("citeqa.distributed.ray_engine.require_ray", lambda: _fake_ray(calls))
    for port in range(8660, 8700):  # a port nothing listens on (bound here, then closed)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        break
    with pytest.raises(ConfigError, match=f"nothing answers at 127.0.0.1:{port}"), \
            connected(RayOptions(f"127.0.0.1:{port}")):
        pass
    assert calls == []
