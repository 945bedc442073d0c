"""The red-team question maker (each kind on fixed examples, the corpus check, determinism), the
template question writer, and `citeqa redteam` end to end on the tiny preset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from citeqa.redteam.corpus import Corpus, names_in
from citeqa.redteam.maker import (
    KINDS,
    UNANSWERABLE_KINDS,
    Seed,
    absent_subject,
    antonym,
    date_swap,
    entity_swap,
    impossible_condition,
    make_variants,
    negation,
    number_swap,
    paraphrase,
)
from citeqa.redteam.writer import write_questions

PASSAGES = [
    "The Normans gave their name to Normandy, a region in France. Their leader Rollo swore "
    "fealty to King Charles III of West Francia in 911. The castle of Rouen was built by the "
    "duke in 1066, and the largest army of the region marched from it.",
    "Harvard University was founded in 1636 in Cambridge. The library of Harvard University "
    "holds 18 million volumes, and the first president of the college was Henry Dunster.",
    "The Eiffel Tower in Paris opened in 1889 as the entrance to the fair. The tower of Paris "
    "was built by the company of Gustave Eiffel, and the height of the tower is 330 metres.",
    "Stanford University was founded in 1885 in California. Leland Stanford gave the land. "
    "The campus of Stanford University covers 8,180 acres; the first president was David Jordan.",
    "Yale University moved to New Haven in 1716. The library of Yale University holds 15 "
    "million volumes; the second library was built in 1931 by James Rogers.",
]
CORPUS = Corpus.build(PASSAGES)
SEED = Seed("Who swore fealty to King Charles III in 911?", PASSAGES[0], "Rollo", "q1")


def rng() -> random.Random:
    return random.Random(0)


def test_names_skip_sentence_initial_words_and_leading_function_words() -> None:
    text = "Their leader Rollo met King Charles III. In September the University of Chicago met."
    assert [n for _, _, n in names_in(text)] == ["Rollo", "King Charles", "University of Chicago"]


def test_the_corpus_check_finds_co_occurrence() -> None:
    q = "When was Harvard University founded?"
    assert CORPUS.could_answer("Harvard University", q)  # it says so: 1636
    assert not CORPUS.could_answer("Yale University", q)  # "founded" never near Yale
    assert not CORPUS.could_answer("Stanford", "How many volumes does the library hold?")


def test_entity_swap_uses_a_corpus_name_that_never_meets_the_question() -> None:
    seed = Seed("When was Harvard University founded?", PASSAGES[1], "1636")
    v = entity_swap(seed, CORPUS, rng())
    assert v is not None and not v.answerable and v.kind == "entity_swap"
    new = v.change.split(" -> ")[1]
    assert new in CORPUS.names and new not in PASSAGES[1]
    assert not CORPUS.could_answer(new, v.question) and new in v.question


def test_number_and_date_swaps_change_the_value_and_keep_the_form() -> None:
    v = number_swap(Seed("How many million volumes does the library hold, 18?", PASSAGES[1]),
                    CORPUS, rng())
    assert v is not None and "18" not in v.question.split("hold, ")[1]
    d = date_swap(Seed("Who built the castle of Rouen in 1066?", PASSAGES[0]), CORPUS, rng())
    assert d is not None and "1066" not in d.question
    year = d.change.split(" -> ")[1]
    assert year.isdigit() and year not in PASSAGES[0]
    month = date_swap(Seed("What happened in March?", PASSAGES[2]), CORPUS, rng())
    assert month is not None and "March" not in month.question


def test_negation_antonym_absent_subject_and_impossible_condition() -> None:
    n = negation(SEED, CORPUS, rng())
    assert n is None  # "Who swore": no auxiliary to negate
    n = negation(Seed("Who did the duke build the castle for?", PASSAGES[0]), CORPUS, rng())
    assert n is not None and n.question == "Who didn't the duke build the castle for?"
    a = antonym(Seed("Who was the first president of the college?", PASSAGES[1]), CORPUS, rng())
    assert a is not None and "last president" in a.question
    s = absent_subject(Seed("Who built the castle of Rouen?", PASSAGES[0]), CORPUS, rng())
    assert s is not None and "castle" not in s.question
    assert s.change.split(" -> ")[1] not in PASSAGES[0]
    c = impossible_condition(Seed("Who built the castle of Rouen?", PASSAGES[0]), CORPUS, rng())
    assert c is not None and c.question.startswith("Who built the castle of Rouen ")
    year = int(c.question.rstrip("?").split()[-1])
    assert all(abs(year - y) > 30 for y in (911, 1066))
    assert impossible_condition(SEED, CORPUS, rng()) is None  # it already asks about a year


def test_an_impossible_condition_cannot_hold() -> None:
    """"before" a year later than everything the passage tells of (or "after" an earlier one)
    holds, and the seed's answer still fits: "Who built the castle of Rouen before 1889?"."""
    seed = Seed("Who built the castle of Rouen?", PASSAGES[0], "the duke")
    seen = set()
    for i in range(60):
        v = impossible_condition(seed, CORPUS, random.Random(i))
        assert v is not None
        condition, year = v.change.split()[1], int(v.change.split()[2])
        seen.add(condition)
        assert condition != "before" or year < 911, v.question
        assert condition != "after" or year > 1066, v.question
    assert "in" in seen and seen & {"before", "after"}
    undated = Seed("Who leads the college?", "The college is led by its president.", "x")
    corpus = Corpus.build([undated.passage, *PASSAGES])
    for i in range(20):  # a passage naming no year: only "in" cannot hold for sure
        v = impossible_condition(undated, corpus, random.Random(i))
        assert v is None or v.change.split()[1] == "in"


def test_antonym_and_negation_make_no_answerable_or_broken_question() -> None:
    """An antonym another passage says ("the last president ... was John Smith") was kept;
    "will"/"can" as nouns were negated ("the won't of", "tin can't"); "long" -> "short" is
    answered as well ("How short is the tower?" by its height), and "more" -> "fewer" broke
    "more difficult"."""
    corpus = Corpus.build([*PASSAGES, "The last president of the college was John Smith."])
    seed = Seed("Who was the first president of the college?", PASSAGES[1])
    assert antonym(seed, corpus, rng()) is None and antonym(seed, CORPUS, rng()) is not None
    assert antonym(Seed("How long is the Eiffel Tower?", PASSAGES[2]), CORPUS, rng()) is None
    more = antonym(Seed("Why was it more difficult to build?", PASSAGES[2]), CORPUS, rng())
    assert more is not None and more.question == "Why was it less difficult to build?"
    for noun in ("Who read the will of Leland Stanford?", "Who invented the tin can in 1810?"):
        assert negation(Seed(noun, PASSAGES[3]), CORPUS, rng()) is None
    verb = negation(Seed("Who can vote in the college?", PASSAGES[1]), CORPUS, rng())
    assert verb is not None and verb.question == "Who can't vote in the college?"
    shows = paraphrase(Seed("How many shows did the tower host?", PASSAGES[2]), CORPUS, rng())
    assert shows is None or "demonstrates" not in shows.question


def test_absent_subject_fits_a_or_an_to_its_new_word() -> None:
    passages = [*PASSAGES] + [f"The {w} of the town was named in the {w} of the year."
                              for w in ("engine", "island", "harbour", "wagon", "orchard")]
    corpus = Corpus.build(passages)
    made = [absent_subject(Seed("Who drew a castle of Rouen?", PASSAGES[0]), corpus,
                           random.Random(i)) for i in range(30)]
    words = {v.question.split()[2:4][1]: v.question.split()[2] for v in made if v}
    assert words and all(article == ("an" if new[0] in "aeiou" else "a")
                         for new, article in words.items()), words


def test_names_and_years_beyond_ascii_and_decimals() -> None:
    """"São Paulo" became "São William" (only "Paulo" was a name); a decimal's digits were a
    year ("3.1415" -> "3.1422"); "1200 men" was asked as "what year men"."""
    from citeqa.redteam.corpus import YEAR

    names = [n for _, _, n in names_in("How many people did São Paulo and Zürich have?")]
    assert names == ["São Paulo", "Zürich"]
    assert YEAR.findall("pi is 3.1415, 1,500.25 people; in 1066, and 2019.") == ["1066", "2019"]
    assert YEAR.findall("(1990,1991), 1999.5 and 1990,000") == ["1990", "1991"]
    [seed] = write_questions([("p", "The army of 1200 men marched from the castle to the sea "
                                    "of the north.")], per_passage=1)
    assert "how many men" in seed.question and seed.answer == "1200"


def test_paraphrase_is_an_answerable_control() -> None:
    p = paraphrase(Seed("Who built the castle of Rouen?", PASSAGES[0], "the duke"), CORPUS, rng())
    assert p is not None and p.answerable and p.answer == "the duke"
    assert p.question == "Who constructed the castle of Rouen?"


def test_variants_are_deterministic_and_none_is_answerable_by_the_makers_check() -> None:
    seeds = [SEED, Seed("When was Harvard University founded?", PASSAGES[1], "1636"),
             Seed("Who built the tower of Paris?", PASSAGES[2], "the company of Gustave Eiffel")]
    first = make_variants(seeds, CORPUS, seed=7)
    assert first == make_variants(seeds, CORPUS, seed=7)
    assert {v.kind for v in first} <= set(KINDS) and len(first) >= 6
    for v in first:
        assert v.question != v.original
        if v.kind in ("entity_swap", "number_swap", "date_swap", "absent_subject"):
            assert not CORPUS.could_answer(v.change.split(" -> ")[1], v.question)
    with pytest.raises(ValueError, match="unknown"):
        make_variants(seeds, CORPUS, kinds=["typo"])
    assert set(UNANSWERABLE_KINDS) < set(KINDS)


def test_template_questions_hold_their_answer() -> None:
    seeds = write_questions([("p0", PASSAGES[0]), ("p3", PASSAGES[3])], per_passage=3)
    assert seeds == write_questions([("p0", PASSAGES[0]), ("p3", PASSAGES[3])], per_passage=3)
    assert 2 <= len(seeds) <= 6
    for s in seeds:
        assert s.question.endswith("?") and s.answer in s.passage
        assert any(w in s.question for w in ("what year", "how many", "what"))


def test_a_control_is_right_with_any_gold_answer_and_no_controls_make_no_nan() -> None:
    """Controls were graded against the first gold answer only ("Epte" wrong where the golds
    are "Seine" and "Epte"); with no control, summary.json held NaN."""
    from citeqa.redteam.run import Probe, result_record, summarize
    from citeqa.types import Answer, Candidate, Quote

    quote = Quote(text="the Epte", doc_id="d", title="T", source="s", start=0, end=8)
    answer = Answer("Q?", False, "Epte", quote, 0.9,
                    candidates=[Candidate("Epte", quote, score=0.9)])
    probe = Probe("Q?", "original", True, "Q?", "Seine", answers=("Seine", "Epte"))
    record = result_record(probe, answer)
    assert record["right"] and record["best_right"]
    unanswerable = {**record, "kind": "negation", "answerable": False, "right": False}
    json.dumps(summarize([unanswerable], 0.5), allow_nan=False)
    seed = Seed("Where is the river?", PASSAGES[0], "Seine", "q", answers=("Seine", "Epte"))
    [control] = [v for v in make_variants([seed], CORPUS, kinds=["paraphrase"])] or [None]
    assert control is None or control.answers == ("Seine", "Epte")


def test_redteam_command_on_the_tiny_preset(tmp_path: Path, monkeypatch) -> None:
    from citeqa.cli import app
    from citeqa.config import preset
    from citeqa.pipeline import Pipeline
    from citeqa.retrieval import build_index_from_documents
    from citeqa.types import Document

    docs = [Document(f"d{i}", f"T{i}", f"s{i}", p) for i, p in enumerate(PASSAGES)]
    build_index_from_documents(docs, tmp_path / "idx", preset("tiny").retrieval, progress=False)
    args = ["redteam", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "rt"),
            "--preset", "tiny", "--no-progress", "--per-passage", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rt" / "summary.json").read_text())
    assert summary["unanswerable"] > 0 and summary["controls"] > 0
    assert 0 <= summary["false_answer_rate"] <= 1
    lines = (tmp_path / "rt" / "results.jsonl").read_text().splitlines()
    assert len(lines) == summary["questions"]
    assert (tmp_path / "rt" / "false_answers_vs_threshold.png").read_bytes()[:4] == b"\x89PNG"
    assert "false-answer rate" in (tmp_path / "rt" / "report.md").read_text()
    asked: list[str] = []
    ask_many = Pipeline.ask_many
    monkeypatch.setattr(Pipeline, "ask_many", lambda self, items: (
        asked.extend(a.question for a in items), ask_many(self, items))[1])
    again = CliRunner().invoke(app, args)  # resumed: nothing is asked twice
    assert again.exit_code == 0 and asked == []
    assert (tmp_path / "rt" / "results.jsonl").read_text().splitlines() == lines
    # a run cut short (here: its last two results lost) asks only what is missing
    (tmp_path / "rt" / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert sorted(asked) == sorted(json.loads(line)["question"] for line in lines[-2:])
    assert len((tmp_path / "rt" / "results.jsonl").read_text().splitlines()) == len(lines)
    # an engine gone mid-run stops it saying what is kept and what goes on from there (it said
    # only that the engine could not be reached), and the pipeline is closed (a remote
    # engine's calls in flight end with it: Ctrl-C waited out their timeout)
    from citeqa.errors import EngineUnavailableError

    closed: list[bool] = []
    monkeypatch.setattr(Pipeline, "close", lambda self: closed.append(True))

    def engine_gone(self, items):  # type: ignore[no-untyped-def]
        raise EngineUnavailableError("the generator at http://e cannot be reached")

    monkeypatch.setattr(Pipeline, "ask_many", engine_gone)
    (tmp_path / "rt" / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and closed, r.output
    assert (f"cannot be reached. The run stopped: the {len(lines) - 2} questions answered so "
            "far are kept in") in " ".join(r.output.split())
    monkeypatch.setattr(Pipeline, "ask_many", ask_many)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len((tmp_path / "rt" / "results.jsonl").read_text().splitlines()) == len(lines)
    # resuming with other seeds (or another index, model, threshold) would mix two runs
    other = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert other.exit_code == 2 and "seed: was 0, now 1" in other.output, other.output
    assert len((tmp_path / "rt" / "results.jsonl").read_text().splitlines()) == len(lines)
    other = CliRunner().invoke(app, args, env={"CITEQA_ANSWER_MODE": "free"})  # another system
    assert other.exit_code == 2 and "answer_mode was 'span', now 'free'" in other.output
    assert "delete that run's files" in other.output
    # an --n above the seeds asks what no --n asks: the same run, resumed
    assert CliRunner().invoke(app, [*args, "--n", "100000"]).exit_code == 0
    assert len((tmp_path / "rt" / "results.jsonl").read_text().splitlines()) == len(lines)
    # a second red team writing there at the same time is refused at once
    from citeqa.journal import run_lock

    with run_lock(tmp_path / "rt", "citeqa redteam"):
        busy = CliRunner().invoke(app, args)
    assert busy.exit_code == 2 and "another citeqa redteam is writing" in busy.output
    # a run that recorded no result yet may start again with other options
    (tmp_path / "rt" / "results.jsonl").write_text("")
    assert CliRunner().invoke(app, [*args, "--seed", "1"]).exit_code == 0
    # mistakes end in one line before any work: an unknown preset, an --out that is a file
    for bad, message in ((["--preset", "bogus"], "unknown preset"),
                         (["--out", str(tmp_path / "rt" / "report.md")], "is a file"),
                         (["--url", "ftp://x"], "http(s) address"),
                         (["--api-key", "k"], "--api-key goes with --url"),
                         (["--split", "bogus"], "--split picks the articles of a --questions")):
        r = CliRunner().invoke(app, args + bad)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_resuming_a_red_team_run_keeps_what_follows_a_damaged_line(tmp_path) -> None:
    """A cut last line is a crash's: dropped and redone. A bad line before it is not, so the
    run stops and says so, where it used to cut the file there and lose every later result."""
    from citeqa.errors import ConfigError
    from citeqa.redteam.run import done_ids

    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "p1"}\n{"id": "p2"}\n{"id": "p3", "ki')
    assert done_ids(path) == {"p1", "p2"}
    assert path.read_text() == '{"id": "p1"}\n{"id": "p2"}\n'
    path.write_text('{"id": "p1"}\nnot json\n{"id": "p3"}\n')
    with pytest.raises(ConfigError, match=r"results.jsonl:2 is not a red-team result.*--out"):
        done_ids(path)
    assert path.read_text() == '{"id": "p1"}\nnot json\n{"id": "p3"}\n'


def test_a_question_citeqa_refuses_is_left_out_not_the_end_of_the_run(tmp_path, caplog) -> None:
    """A seed question over the length limit made its probe's batch fail: the run stopped
    there ("the question is 1420 characters"), and every rerun stopped at the same place."""
    from citeqa.redteam.run import Probe, ask_all
    from citeqa.types import Answer

    long = Probe("Why " * 400, "paraphrase", True, "Why?", "x")
    fine = [Probe(f"Who made thing {i}?", "paraphrase", True, "Who?", "x") for i in range(3)]
    asked: list[str] = []

    def ask(args):  # type: ignore[no-untyped-def]
        from citeqa.pipeline import asked_text

        for a in args:
            asked_text(a.question)  # what the pipeline (or the server: 422) refuses
            asked.append(a.question)
        return [Answer(a.question, True, None, None, None, reason="fake") for a in args]

    with caplog.at_level("WARNING", logger="citeqa.redteam.run"):
        records = ask_all([fine[0], long, *fine[1:]], ask, tmp_path, batch=2, progress=False)
    assert asked == [p.question for p in fine] and len(records) == 3
    [warning] = caplog.messages
    assert warning.startswith(f"1 question not asked, as citeqa refuses it: {long.id} (the "
                              "question is 1600 characters; 1000 at most)")


def test_redteam_against_a_server_sends_batch_requests_at_once_and_closes_its_client(
        tmp_path: Path, monkeypatch) -> None:
    """With --url the questions went one after another (one request each, waiting for each
    answer), so --batch did nothing and the server had nothing to batch; the client was never
    closed."""
    import threading
    import time

    from citeqa.cli import app
    from citeqa.client import CiteqaClient
    from citeqa.config import preset
    from citeqa.retrieval import build_index_from_documents
    from citeqa.types import Answer, Document

    docs = [Document(f"d{i}", f"T{i}", f"s{i}", p) for i, p in enumerate(PASSAGES)]
    build_index_from_documents(docs, tmp_path / "idx", preset("tiny").retrieval, progress=False)
    lock, asked, closed = threading.Lock(), [], []
    active, most = [0], [0]

    def answer(self, question, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            asked.append(question)
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)  # long enough for the batch's other requests to start
        with lock:
            active[0] -= 1
        return Answer(question, True, None, None, None, reason="fake")

    monkeypatch.setattr(CiteqaClient, "answer", answer)
    monkeypatch.setattr(CiteqaClient, "close", lambda self: closed.append(True))
    r = CliRunner().invoke(app, [
        "redteam", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "rt"),
        "--no-progress", "--url", "http://127.0.0.1:9", "--batch", "3", "--n", "2",
        "--per-passage", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rt" / "summary.json").read_text())
    assert summary["questions"] == len(asked) >= 3 and most[0] == 3
    assert closed == [True]
    assert summary["threshold"].startswith("the server's own")  # not None: "answers all"


def test_ctrl_c_of_a_redteam_against_a_server_waits_for_no_answer_in_flight(
        tmp_path: Path) -> None:
    """Ctrl-C ended the run only once the server had answered every question in flight: the
    pool's threads were joined at exit (55 s against a slow server)."""
    import http.server
    import signal
    import subprocess
    import sys
    import threading
    import time

    from citeqa.config import preset
    from citeqa.retrieval import build_index_from_documents
    from citeqa.types import Document

    docs = [Document(f"d{i}", f"T{i}", f"s{i}", p) for i, p in enumerate(PASSAGES)]
    build_index_from_documents(docs, tmp_path / "idx", preset("tiny").retrieval, progress=False)
    asked, release = threading.Event(), threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # a server that takes its time to answer
            self.rfile.read(int(self.headers.get("content-length", 0)))
            asked.set()
            release.wait(60)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["redteam", "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "rt"),
            "--no-progress", "--per-passage", "1", "--n", "2",
            "--url", f"http://127.0.0.1:{server.server_port}"]
    # Ctrl-C as a terminal sends it, whatever this run inherited (a job started in the
    # background of a script ignores SIGINT, and so would the command)
    child = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
             "; sys.argv = ['citeqa', *sys.argv[1:]]; runpy.run_module('citeqa', "
             "run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", child, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert asked.wait(60), proc.communicate(timeout=10)
        start = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.perf_counter() - start
    finally:
        release.set()
        proc.kill()
        server.shutdown()
    assert proc.returncode == 130 and "interrupted" in err, err
    assert took < 10, took


def test_at_once_keeps_the_order_and_raises_the_first_items_error() -> None:
    import time

    from citeqa.redteam.cli import at_once

    def call(x: int) -> int:
        time.sleep(0.05 * (3 - x))  # the last ends first
        if x in (1, 2):
            raise ValueError(f"item {x}")
        return x * 10

    assert at_once(call, [0, 3]) == [0, 30] and at_once(call, []) == []
    with pytest.raises(ValueError, match="item 1"):
        at_once(call, [0, 1, 2, 3])
