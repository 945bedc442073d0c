"""The ``citeqa`` command line end to end: index build, search, ask, serve's argument checks.

User mistakes must end in exit status 2 with one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from citeqa.cli import app, format_answer, quote_in_context, snippet
from citeqa.retrieval import Index
from citeqa.types import Answer, Candidate, Document, Hit, Passage, Quote

EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.\r\n"
    "It opened in 1889 as the entrance arch to the World's Fair.\n"
    "Gustave Eiffel's company designed and built the tower.\n"
)
SEINE = ("The Seine is a river in northern France. "
         "It flows through Paris into the English Channel.\n")
# A third document: with two, rank-bm25's IDF of a word found in one of them is log(1) = 0.
LOUVRE = "The Louvre is the world's most-visited art museum, on the Right Bank in Paris.\n"


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "eiffel.txt").write_bytes(EIFFEL.encode())
    (d / "sub" / "seine.md").write_text(SEINE, encoding="utf-8")
    (d / "louvre.txt").write_text(LOUVRE, encoding="utf-8")
    (d / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    return d


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def build(corpus: Path, out: Path, preset: str = "tiny"):
    return run("index", "build", str(corpus), "--out", str(out), "--preset", preset,
               "--no-progress")


def test_build_search_and_offsets_point_into_the_files(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="citeqa")
    out = tmp_path / "index"
    result = build(corpus, out)
    assert result.exit_code == 0, result.output
    assert "indexed 3 documents" in result.output
    assert "blob.bin" in result.output  # skipped, with its reason

    result = run("search", "When did the tower open?", "--index", str(out), "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert f"loading the index {out}" in caplog.text  # said before the seconds of loading
    assert hits and {"text", "doc_id", "title", "source", "start", "end", "score"} <= set(hits[0])
    for hit in hits:  # offsets index the file's own text, byte-for-byte decoded
        text = Path(hit["source"]).read_bytes().decode("utf-8")
        assert text[hit["start"] : hit["end"]] == hit["text"]
    assert "1889" in hits[0]["text"]

    text_out = run("search", "Seine river", "--index", str(out), "--mode", "bm25")
    assert text_out.exit_code == 0 and "1." in text_out.output and "seine.md" in text_out.output


def test_ask_with_the_tiny_preset_returns_a_verified_quote(
        corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="citeqa")
    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    result = run("ask", "When did the Eiffel Tower open?", "--index", str(out),
                 "--preset", "tiny", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert f"loading the index {out} and the models (preset tiny)" in caplog.text
    assert re.search(r"loaded in \d+\.\d s", caplog.text)
    assert answer["declined"] is False
    q = answer["quote"]
    text = Path(q["source"]).read_bytes().decode("utf-8")
    assert text[q["start"] : q["end"]] == q["text"]
    assert {"question", "answer", "score", "timings_ms", "candidates"} <= set(answer)
    assert answer["index_version"] == Index.load(out).version and "passages" not in answer
    passages = json.loads(run("ask", "When did the Eiffel Tower open?", "--index", str(out),
                              "--preset", "tiny", "--json", "--with-passages").stdout)["passages"]
    for hit in passages:  # each with offsets into its document
        text = Path(hit["source"]).read_bytes().decode("utf-8")
        assert text[hit["start"]:hit["end"]] == hit["text"]
    assert passages and run("ask", "q?", "--index", str(out), "--preset", "tiny",
                            "--with-passages").exit_code == 2

    plain = run("ask", "When did the Eiffel Tower open?", "--index", str(out), "--preset", "tiny")
    assert plain.exit_code == 0 and "quote:" in plain.output and "source:" in plain.output


def test_ask_marks_its_answer_on_a_terminal_unless_no_color(corpus: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    args = ["ask", "When did the Eiffel Tower open?", "--index", str(out), "--preset", "tiny"]
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert "\x1b[1m" in CliRunner().invoke(app, args, color=True).output  # as on a terminal
    for env in ({"NO_COLOR": "1"}, {"TERM": "dumb"}):
        shown = CliRunner().invoke(app, args, color=True, env=env)
        assert shown.exit_code == 0 and "\x1b[" not in shown.output, env


def test_ask_closes_its_pipeline_however_it_ends(corpus: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing was closed: on Ctrl-C a remote engine's calls in flight held the process until
    their timeout (~2 min)."""
    from citeqa.pipeline import Pipeline

    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    closed: list[bool] = []
    monkeypatch.setattr(Pipeline, "close", lambda self: closed.append(True))
    assert run("ask", "When did it open?", "--index", str(out), "--preset", "tiny").exit_code == 0
    assert closed == [True]

    def interrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "ask", interrupted)
    assert run("ask", "When did it open?", "--index", str(out), "--preset",
               "tiny").exit_code != 0
    assert closed == [True, True]


def test_ask_generator_beats_a_remote_generator_in_the_environment(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--generator lost to CITEQA_GENERATOR_URL: the engine there was asked (refused: nothing
    listens) and the flag ignored unsaid, though a flag beats the environment."""
    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    monkeypatch.setenv("CITEQA_GENERATOR_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CITEQA_GENERATOR_WAIT_S", "0")
    result = run("ask", "When did the Eiffel Tower open?", "--index", str(out), "--preset",
                 "tiny", "--generator", "fake", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["question"] == "When did the Eiffel Tower open?"


def test_ask_explains_a_decline_with_the_best_guess_and_the_passages(corpus: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    result = run("ask", "When did the Eiffel Tower open?", "--index", str(out), "--preset", "tiny",
                 "--min-score", "1.0")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(r"declined: best score \d\.\d{3} is below the threshold 1\.000 .*",
                        lines[0])
    assert lines[1] == "best guess (not confident enough to answer):"
    assert lines[2].startswith("  answer: ") and lines[3].startswith("  quote:  ")
    assert "eiffel.txt, characters" in lines[4] and re.fullmatch(r"  score:  \d\.\d{3}", lines[5])
    assert lines[6] == "passages retrieval found:"
    assert re.fullmatch(r"  1\. \S.* \(.*, characters \d+-\d+\)  score \d\.\d{3}", lines[7])
    assert "\x1b" not in result.output  # no styling when not on a terminal


Q_TEXT = "Alpha beta. The tower opened in 1889 as an arch. Gamma delta epsilon zeta eta theta."
Q_START = Q_TEXT.index("The tower")
Q_END = Q_TEXT.index(" Gamma")
QUOTE = Quote(Q_TEXT[Q_START:Q_END], "d", "Tower", "t.txt", Q_START, Q_END)
AT = Q_TEXT.index("1889")
DOC = Document("d", "Tower", "t.txt", Q_TEXT)


def documents(doc_id: str) -> Document:
    if doc_id != "d":
        raise KeyError(doc_id)
    return DOC


def test_an_answer_reads_with_its_quote_in_context_and_the_answer_marked() -> None:
    answer = Answer("When?", False, "1889", QUOTE, 0.8766, answer_start=AT, answer_end=AT + 4)
    text = format_answer(answer, documents, mark=lambda s: f"[{s}]")
    assert text.splitlines() == [
        "answer: 1889",
        "quote:  Alpha beta. \u201cThe tower opened in [1889] as an arch.\u201d Gamma delta "
        "epsilon zeta eta theta.",
        f"source: Tower (t.txt, characters {Q_START}-{Q_END})",
        "score:  0.877"]


def test_context_is_cut_at_words_and_whitespace_is_collapsed() -> None:
    text = "one two three\n\nfour five " + QUOTE.text + "  six\nseven eight nine"
    start = text.index(QUOTE.text)
    quote = Quote(QUOTE.text, "d", "T", "s", start, start + len(QUOTE.text))
    cand = Candidate("x", quote)  # no answer offsets (free mode): nothing marked
    assert quote_in_context(text, cand, chars=12) == (
        "\u2026four five \u201cThe tower opened in 1889 as an arch.\u201d six seven\u2026")
    assert quote_in_context(None, cand) == "\u201cThe tower opened in 1889 as an arch.\u201d"
    outside = replace(cand, answer_start=0, answer_end=3)  # not inside the quote: not marked
    assert "[" not in quote_in_context(text, outside, mark=lambda s: f"[{s}]")
    # a document's escape sequences never reach the terminal
    hostile = replace(cand, quote=replace(quote, title="T\x1b[2J", source="s\x07"))
    shown = format_answer(Answer("q", False, "x", hostile.quote, 0.5), lambda d: Document(
        "d", "T", "s", text.replace("one", "\x1b]0;pwn\x07")))
    assert "\x1b" not in shown and "\x07" not in shown and "T\ufffd[2J" in shown


def test_a_decline_reads_with_its_reason_best_guess_and_passages() -> None:
    guess = Candidate("1889", QUOTE, score=0.3, answer_start=AT, answer_end=AT + 4)
    unquoted = Candidate("nothing", None, score=0.9)
    hits = [Hit(Passage(i, "d", 0, len(Q_TEXT), Q_TEXT), "Tower", "t.txt", 0.5 - i / 10)
            for i in range(4)]
    answer = Answer("When?", True, None, None, 0.3, reason="best score 0.300 is below 0.500",
                    candidates=[unquoted, guess], passages=hits)
    lines = format_answer(answer, documents).splitlines()
    assert lines[:2] == ["declined: best score 0.300 is below 0.500",
                         "best guess (not confident enough to answer):"]
    assert lines[2:6] == ["  answer: 1889",
                          "  quote:  Alpha beta. \u201cThe tower opened in 1889 as an arch.\u201d "
                          "Gamma delta epsilon zeta eta theta.",
                          f"  source: Tower (t.txt, characters {Q_START}-{Q_END})",
                          "  score:  0.300"]
    assert lines[6] == "passages retrieval found:"
    assert lines[7] == f"  1. Tower (t.txt, characters 0-{len(Q_TEXT)})  score 0.500"
    assert lines[8] == "     " + Q_TEXT
    assert len(lines) == 7 + 2 * 3  # three passages shown
    bare = Answer("q", True, None, None, None, reason="no passages were retrieved")
    assert format_answer(bare, documents) == "declined: no passages were retrieved"
    # a document without a source (a library caller's, a REST text) names its characters only
    nowhere = replace(answer, candidates=[replace(guess, quote=replace(QUOTE, source=""))],
                      passages=[replace(hits[0], source="")])
    lines = format_answer(nowhere, documents).splitlines()
    assert lines[4] == f"  source: Tower (characters {Q_START}-{Q_END})"
    assert lines[7] == f"  1. Tower (characters 0-{len(Q_TEXT)})  score 0.500"


@pytest.mark.parametrize(
    "args, message",
    [
        (("search", "tower", "--index", "{missing}"), "index"),
        (("search", "   ", "--index", "{index}"), "empty"),
        (("search", "tower " * 200, "--index", "{index}"), "1000 at most"),
        (("search", "tower", "--index", "{index}", "--mode", "fuzzy"), "--mode"),
        (("ask", "", "--index", "{index}", "--preset", "tiny"), "empty"),
        (("ask", "tower?", "--index", "{index}", "--preset", "nope"), "preset"),
        (("ask", "tower?", "--index", "{index}", "--preset", "tiny", "--min-score", "0.5",
          "--target-accuracy", "0.8"), "not both"),
        (("ask", "tower?", "--index", "{index}", "--preset", "tiny", "--target-accuracy", "0.8"),
         "reward model"),
        (("ask", "tower?", "--index", "{index}", "--preset", "tiny", "--target-accuracy", "1"),
         "between 0 and 1 (exclusive)"),
        (("ask", "tower?", "--index", "{index}", "--answer-mode", "bogus"), "--answer-mode"),
        (("serve", "--index", "{index}", "--host", " "), "--host is empty"),
        (("serve", "--index", "{index}", "--host", "no.such.host.invalid"),
         "cannot bind --host no.such.host.invalid"),
        (("serve", "--index", "{missing}"), "error: index "),  # (not "not an index directory:")
        (("index", "build", "{missing}", "--out", "{new}", "--no-progress"),
         "no such file or folder"),
        # nan passed click's range checks: refused after the models loaded, or a traceback
        (("ask", "tower?", "--index", "{index}", "--min-score", "nan"), "nan is not a number"),
        (("eval", "-d", "{missing}", "-i", "{index}", "-o", "{new}", "--min-score", "nan"),
         "nan is not a number"),
        (("calibrate", "--data", "{missing}", "--reward", "{new}", "--delta", "nan"),
         "nan is not a number"),
        (("calibrate", "--data", "{missing}", "--reward", "{new}", "--target", "nan"),
         "nan is not a number"),
        (("train", "generator", "--data", "{missing}", "--out", "{new}", "--lr", "inf"),
         "inf is not a number"),
        # an empty path ("$DIR" unset) was the current folder
        (("search", "tower", "--index", ""), "--index' / '-i': is empty"),
        (("index", "build", "{index}", "--out", " "), "--out' / '-o': is empty"),
        (("eval", "-d", "{missing}", "-i", "{index}", "-o", ""), "--out' / '-o': is empty"),
        # an --out under a file failed after all the reading, in the OS's words
        (("index", "build", "{index}", "--out", "{index}/manifest.json/x", "--bm25-only"),
         "manifest.json is a file, not a folder"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(corpus, tmp_path, args, message) -> None:
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    paths = {"missing": str(tmp_path / "nowhere"), "index": str(index), "new": str(tmp_path / "n")}
    result = run(*(a.format(**paths) for a in args))
    assert result.exit_code == 2, result.output
    assert message.lower() in result.output.lower()
    assert "Traceback" not in result.output


@pytest.mark.parametrize("question", ["  ", "why " * 300])
def test_ask_refuses_a_bad_question_before_loading_any_model(
        corpus, tmp_path, monkeypatch, question) -> None:
    from citeqa.pipeline import Pipeline

    def load(*_a, **_k):
        raise AssertionError("models loaded for a question that cannot be asked")

    monkeypatch.setattr(Pipeline, "from_settings", load)
    assert build(corpus, tmp_path / "index").exit_code == 0
    result = run("ask", question, "--index", str(tmp_path / "index"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("empty" if not question.strip() else "1000 at most") in result.output


def test_an_interrupted_build_says_the_index_is_unchanged(corpus, tmp_path, monkeypatch) -> None:
    import citeqa.retrieval

    out = tmp_path / "index"
    result = build(corpus, out)
    assert result.exit_code == 0 and "documents as 3 passages" in result.output
    assert "(1 skipped)" in result.output  # blob.bin
    before = (out / "manifest.json").read_text()

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(citeqa.retrieval, "build_index", interrupted)
    result = build(corpus, out)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"interrupted: {out} is not left half-written" in result.output
    assert (out / "manifest.json").read_text() == before


def test_ctrl_c_while_the_command_still_imports_ends_quietly() -> None:
    """The ``citeqa`` entry point imports the CLI inside its own guard: a KeyboardInterrupt
    raised by that import (Ctrl-C in its first moment) is one line and status 130."""
    import subprocess
    import sys

    child = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'citeqa.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from citeqa.__main__ import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "interrupted"
    # and while typer builds the commands from their signatures (a traceback, before)
    child = ("import sys, typer.main\n"
             "def interrupt(*args, **kwargs):\n"
             "    raise KeyboardInterrupt\n"
             "typer.main.get_command = interrupt\n"
             "sys.argv = ['citeqa', 'index', 'info']\n"
             "from citeqa.__main__ import main\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted", done.stderr


def test_what_the_system_refuses_is_one_line_and_a_traceback_with_verbose(
        tmp_path: Path) -> None:
    """A path under a file (``--out afile/sub``, a run directory that is a file, ...) ended
    in a traceback from deep inside the command."""
    import os
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "citeqa", "eval", "compare", str(afile), str(afile)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: Not a directory: {afile}/metrics.json"
    for loud_args in (args[:3] + ["--verbose"] + args[3:], args + ["-v"]):  # either place
        loud = subprocess.run(loud_args, capture_output=True, text=True, timeout=120, env=env)
        assert loud.returncode == 1 and "Traceback" in loud.stderr, loud_args


def test_closed_streams_and_a_locale_without_utf8_neither_stop_a_command(
        tmp_path: Path) -> None:
    """In an ASCII (C) locale without Python's UTF-8 mode the index's vocabulary was written in
    the locale's encoding (a UnicodeEncodeError after all the work; in Latin-1, a vocabulary
    other locales could not read, or read as mojibake: BM25 found no accented word); with its
    stderr closed (``2>&-``) a build ended silently with status 1 (a progress bar asked
    stderr.isatty()), and with stdout closed serve never started (uvicorn's formatter did)."""
    import os
    import subprocess
    import sys

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cafe.md").write_text("The café in 東京 is run by Zoë since 1999.\n",
                                               encoding="utf-8")
    for name in ("rail", "sea", "hill"):  # (with two documents every BM25 score is 0)
        (tmp_path / "docs" / f"{name}.md").write_text(f"Trains stop at the {name} station.\n",
                                                      encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k != "LANG"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), LC_ALL="C",
               PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    cmd = (f"'{sys.executable}' -m citeqa index build docs --out idx --preset tiny "
           "--no-progress")
    done = subprocess.run(["bash", "-c", cmd + " 2>&-"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "indexed 4 documents" in done.stdout, done
    from citeqa.retrieval import HybridRetriever

    hits = HybridRetriever.open(tmp_path / "idx").search("Zoë café", 1, mode="bm25")
    assert hits and hits[0].title == "cafe.md" and hits[0].bm25 > 0
    # stdout closed: the next file opened took its number, and what was printed went there
    probe = ("import os, sys\n"
             "from citeqa.__main__ import usable_streams\n"
             "usable_streams()\n"
             "print('\\u6771\\u4eac', flush=True)\n"
             "sys.stderr.write(str(sys.stdout.isatty()) + ' ' + str(os.open(os.devnull, 0)))\n")
    done = subprocess.run(["bash", "-c", f"'{sys.executable}' -c \"{probe}\" >&-"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.split()[0] == "False", done
    assert int(done.stderr.split()[1]) > 2


def test_json_output_escapes_what_stdout_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from citeqa.cli_errors import json_text

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="latin-1"))
    assert json_text({"t": "東京 😀"}) == '{\n  "t": "\\u6771\\u4eac \\ud83d\\ude00"\n}'
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert json.loads(json_text({"t": "東京 😀"})) == {"t": "東京 😀"}
    assert "東京" in json_text({"t": "東京"})


def test_verbose_is_taken_after_the_subcommand_too() -> None:
    from citeqa.__main__ import verbose_first

    assert verbose_first(["ask", "q", "-v"]) == ["-v", "ask", "q"]
    assert verbose_first(["index", "build", "--verbose", "d", "-v"]) == [
        "--verbose", "index", "build", "d"]
    assert verbose_first(["ask", "--", "-v"]) == ["ask", "--", "-v"]  # a question "-v"
    assert verbose_first(["-v", "ask", "q", "--", "-v"]) == ["-v", "ask", "q", "--", "-v"]
    assert verbose_first(["ask", "q"]) == ["ask", "q"]


def test_reward_data_that_is_no_file_of_lines_says_so(tmp_path: Path) -> None:
    from citeqa.errors import SourceError
    from citeqa.reward.data import load_verifier_data

    (latin := tmp_path / "latin1.jsonl").write_bytes(b'{"q": "caf\xe9"}\n')
    (empty := tmp_path / "empty.jsonl").write_text("")
    for path, message in ((tmp_path, "is a folder; give reward data"),
                          (latin, "is not UTF-8 text (byte 10)"),
                          (empty, "empty.jsonl: no candidates in the reward data; build it")):
        with pytest.raises(SourceError, match=re.escape(message)):
            load_verifier_data(path)


def test_a_failed_build_keeps_the_previous_index(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    before = (out / "manifest.json").read_text()
    assert run("index", "build", str(tmp_path / "nowhere"), "--out", str(out)).exit_code == 2
    assert (out / "manifest.json").read_text() == before
    assert run("search", "tower", "--index", str(out)).exit_code == 0
    # a mistyped path beside good ones is a mistake too: it used to be skipped, and the index
    # rebuilt without its documents (exit 0)
    mistyped = run("index", "build", str(corpus), str(tmp_path / "corpsu"), "--out", str(out),
                   "--preset", "tiny", "--no-progress")
    assert mistyped.exit_code == 2 and "no such file or folder" in mistyped.output
    assert "nothing was built" in mistyped.output
    assert (out / "manifest.json").read_text() == before
    # but a start script's --if-missing over an index that is there builds nothing and reads
    # no source: a container whose corpus folder went away still starts
    kept = run("index", "build", str(tmp_path / "corpsu"), "--out", str(out), "--if-missing")
    assert kept.exit_code == 0 and "not rebuilt" in kept.output, kept.output


def test_if_missing_builds_only_where_no_index_is_not_even_one_a_crash_left(
        corpus: Path, tmp_path: Path) -> None:
    """A start script's --if-missing: an index a crash left mid-swap (only its backup there)
    is restored with what was added to it, not rebuilt from the sources (that lost it)."""
    out = tmp_path / "index"
    first = build(corpus, out)
    assert first.exit_code == 0 and "indexed 3 documents" in first.output
    manifest = (out / "manifest.json").read_text()
    (corpus / "more.txt").write_text("A fourth document about the Pantheon.\n")
    again = run("index", "build", str(corpus), "--out", str(out), "--preset", "tiny",
                "--no-progress", "--if-missing")
    assert again.exit_code == 0 and "holds an index already; not rebuilt" in again.output
    assert (out / "manifest.json").read_text() == manifest
    typo = run("index", "build", str(corpus), "--out", str(out), "--preset", "tinyy",
               "--no-progress", "--if-missing")  # said "not rebuilt", exit 0
    assert typo.exit_code == 2 and "unknown preset 'tinyy'" in typo.output
    out.rename(tmp_path / f".index.old-{2**30}")  # killed between its two renames
    again = run("index", "build", str(corpus), "--out", str(out), "--preset", "tiny",
                "--no-progress", "--if-missing")
    assert again.exit_code == 0 and "not rebuilt" in again.output
    assert (out / "manifest.json").read_text() == manifest
    fresh = tmp_path / "fresh"
    made = run("index", "build", str(corpus), "--out", str(fresh), "--preset", "tiny",
               "--no-progress", "--if-missing")
    assert made.exit_code == 0 and "indexed 4 documents" in made.output
    # a damaged index, or a folder with another program's manifest.json, is not "an index
    # already": the start script stops there (it said "not rebuilt" and exited 0, and the
    # server then failed on it)
    with (fresh / "documents.jsonl").open("a") as f:
        f.write("junk\n")
    damaged = run("index", "build", str(corpus), "--out", str(fresh), "--preset", "tiny",
                  "--no-progress", "--if-missing")
    assert damaged.exit_code == 2 and "does not match its checksum" in damaged.output
    assert "nothing was built" in damaged.output and "not rebuilt" not in damaged.output
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "webapp"}')
    foreign = run("index", "build", str(corpus), "--out", str(webapp), "--preset", "tiny",
                  "--no-progress", "--if-missing")
    assert foreign.exit_code == 2 and "its manifest.json is not a citeqa index's" in foreign.output
    for command in (["index", "info"], ["index", "list"], ["search", "x"]):
        said = run(*command, "--index", str(webapp))  # not "format version None; rebuild it"
        assert said.exit_code == 2 and "is not an index" in said.output, said.output
        assert "format version" not in said.output


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
def test_if_missing_leaves_an_index_another_build_swapped_in_while_it_ran(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resumable: bool) -> None:
    """Two start scripts on one volume: the slower --if-missing build found no index, and the
    faster one's index (a document added to it since) was there when it came to swap: it swapped
    its own over it, and the added document was gone without a word."""
    import citeqa.retrieval.store as store

    out = tmp_path / "index"
    pause = store.test_pause
    other: list[str] = []

    def the_other_build_wins(stage: str) -> None:
        if stage == "before_swap" and not other:
            other.append(stage)
            assert build(corpus, out).exit_code == 0  # the faster start script's build
            (tmp_path / "added.txt").write_text("A document added to the first index.\n")
            assert run("index", "add", str(tmp_path / "added.txt"), "--index", str(out),
                       "--no-progress").exit_code == 0
        pause(stage)

    monkeypatch.setattr(store, "test_pause", the_other_build_wins)
    slow = run("index", "build", str(corpus), "--out", str(out), "--preset", "tiny",
               "--no-progress", "--if-missing", *(["--resumable"] if resumable else []))
    assert other, "the build never came to its swap"
    assert slow.exit_code == 0, slow.output
    assert "another build wrote an index there while this one ran" in slow.output
    assert "not rebuilt (--if-missing)" in slow.output
    listed = run("index", "list", "--index", str(out))
    assert "added" in listed.output  # the index with the added document is the one there
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")]
    assert leftovers == [], leftovers  # its temporary index (and shards) went


def test_a_build_the_file_system_refuses_says_so_in_one_line(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import citeqa.retrieval.store as store

    out = tmp_path / "index"
    assert build(corpus, out).exit_code == 0
    manifest = (out / "manifest.json").read_text()

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_documents", full)
    r = build(corpus, out)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"could not build the index into {out}: [Errno 28] No space left on device; the "
        "index there, if any, is as it was")
    assert (out / "manifest.json").read_text() == manifest


@pytest.mark.slow
def test_ask_with_the_default_models(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert build(corpus, out, preset="default").exit_code == 0
    result = run("ask", "When did the Eiffel Tower open?", "--index", str(out), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["candidates"], answer
    if not answer["declined"]:
        q = answer["quote"]
        text = Path(q["source"]).read_bytes().decode("utf-8")
        assert text[q["start"] : q["end"]] == q["text"] and 0.0 <= answer["score"] <= 1.0
    for key in ("retrieve_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert answer["timings_ms"][key] >= 0


# -- settings: flag > environment > default; no open server by mistake; recovery (issue #16) ----


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> list:
    """``citeqa serve`` builds its app, but uvicorn does not run: the apps are collected here."""
    import citeqa.api.server as server

    apps: list = []
    def run(app: object, **kw: object) -> None:
        app.state.uvicorn_run = kw  # type: ignore[attr-defined]
        apps.append(app)

    monkeypatch.setattr(server, "run", run)
    for name in ("CITEQA_PRESET", "CITEQA_INDEX", "CITEQA_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return apps


def test_serve_takes_preset_and_index_from_the_environment(corpus, tmp_path, served) -> None:
    index, other = tmp_path / "index", tmp_path / "other"
    assert build(corpus, index).exit_code == 0 and build(corpus, other).exit_code == 0
    env = {"CITEQA_PRESET": "tiny", "CITEQA_INDEX": str(index), "CITEQA_RETRY_AFTER_S": "5"}
    cases = [
        ([], env, ("tiny", index)),  # the environment beats the defaults
        (["--preset", "default", "--index", str(other)], env, ("default", other)),  # flags win
        (["--index", str(index)], {}, ("default", index)),  # the default preset
    ]
    for flags, environ, (preset_name, path) in cases:
        result = CliRunner().invoke(app, ["serve", *flags], env=environ)
        assert result.exit_code == 0, result.output
        served_app = served.pop()
        settings = served_app.state.citeqa.settings
        assert (settings.preset, settings.index) == (preset_name, path), flags
        # a request head that trickles in is bounded (api/protocol.py), by the setting
        protocol = served_app.state.uvicorn_run["http"]
        assert protocol.timeout_s == settings.client_timeout_s
        assert protocol.on_close == served_app.state.citeqa.metrics.observe_closed  # counted
        assert protocol.max_per_client == settings.max_connections_per_client == 64
        # its 503 past that cap asks for the service's Retry-After (it was always 1 s)
        assert protocol.retry_after_s == settings.retry_after_s == (5 if environ else 2)


def test_ask_and_search_take_preset_and_index_from_the_environment(
        corpus, tmp_path, monkeypatch) -> None:
    import sys
    import types

    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    env = {"CITEQA_PRESET": "tiny", "CITEQA_INDEX": str(index)}
    result = CliRunner().invoke(app, ["search", "Seine river", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "seine.md" in result.output

    seen: list = []

    class Pipeline:  # stands in for citeqa.pipeline.Pipeline: no model is loaded
        @classmethod
        def from_settings(cls, settings):  # type: ignore[no-untyped-def]
            seen.append((settings.preset, settings.index))
            raise SystemExit(0)

    from citeqa.pipeline import asked_text

    module = types.ModuleType("citeqa.pipeline")
    module.Pipeline = Pipeline  # type: ignore[attr-defined]
    module.asked_text = asked_text  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "citeqa.pipeline", module)
    CliRunner().invoke(app, ["ask", "Where is the Seine?"], env=env)
    CliRunner().invoke(app, ["ask", "Where?", "--preset", "default", "--index", "x"], env=env)
    assert seen == [("tiny", index), ("default", Path("x"))]


def test_serve_warns_when_other_machines_reach_it_without_a_key(corpus, tmp_path, served,
                                                                 caplog) -> None:
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    for host, env, warned in (("0.0.0.0", {}, True), ("127.0.0.1", {}, False),
                              ("0.0.0.0", {"CITEQA_API_KEYS": "k1"}, False),
                              ("0.0.0.0", {"CITEQA_READ_API_KEYS": "r1"}, False),
                              ("localhost", {"CITEQA_ALLOWED_HOSTS": "a.example"}, False)):
        caplog.clear()
        result = CliRunner().invoke(app, ["serve", "--index", str(index), "--host", host],
                                    env=env)
        assert result.exit_code == 0, result.output
        said = [r.getMessage() for r in caplog.records if "no API key" in r.getMessage()]
        assert bool(said) == warned, (host, env, said)
        served.pop()


def test_serve_refuses_api_keys_that_list_no_key(corpus, tmp_path, served) -> None:
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    result = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--index", str(index)],
                                env={"CITEQA_API_KEYS": ","})
    assert result.exit_code == 2 and served == []
    assert "CITEQA_API_KEYS" in result.output and "lists no key" in result.output
    assert "Traceback" not in result.output


def test_serve_recovers_an_index_left_mid_swap(corpus, tmp_path, served) -> None:
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    index.rename(tmp_path / f".index.old-{2**30}")  # a rebuild killed between its renames
    result = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--index", str(index)])
    assert result.exit_code == 0, result.output
    assert (index / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "docs", "index"]


def test_an_unknown_citeqa_variable_is_warned_about(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """pydantic-settings ignores unknown environment names: a typo was silently ignored."""
    from citeqa.config import Settings, unknown_environment

    monkeypatch.setenv("CITEQA_INDEXX", "elsewhere")
    monkeypatch.setenv("CITEQA_TOPK", "3")  # like no setting: no suggestion (was API_KEYS)
    monkeypatch.setenv("CITEQA_VLLM_VENV", "/opt/vllm")  # the vLLM script's, not a setting
    assert unknown_environment({"CITEQA_INDEXX": "", "CITEQA_PORT": "", "CITEQA_INDEX": "",
                                "OTHER": ""}) == ["CITEQA_INDEXX"]
    with caplog.at_level("WARNING", logger="citeqa.config"):
        Settings()
    assert sorted(r.getMessage() for r in caplog.records) == [
        "CITEQA_INDEXX is not a citeqa setting and is ignored (did you mean CITEQA_INDEX?)",
        "CITEQA_TOPK is not a citeqa setting and is ignored"]


def test_an_invalid_setting_is_named_as_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITEQA_MAX_BATCH", "abc")
    result = run("search", "q", "--index", "nowhere")
    assert result.exit_code == 2
    assert "invalid max_batch (CITEQA_MAX_BATCH)" in result.output


@pytest.mark.parametrize("command", ["eval", "redteam", "reward-data", "export-generator"])
def test_every_command_that_reads_settings_names_an_invalid_one_in_one_line(
        command: str, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval and reward-data printed pydantic's four-line dump; redteam and export-generator a
    traceback (status 1)."""
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "Where is the Eiffel Tower?",
                                     "answers": ["Paris"]}) + "\n")
    args = {
        "eval": ["eval", "-d", str(questions), "-i", str(index), "-o", str(tmp_path / "run"),
                 "--preset", "tiny", "--no-progress"],
        "redteam": ["redteam", "-i", str(index), "-o", str(tmp_path / "rt"), "--preset", "tiny",
                    "--n", "1", "--no-progress"],
        "reward-data": ["train", "reward-data", "--dataset", str(questions), "-o",
                        str(tmp_path / "rd.jsonl"), "-i", str(index), "--preset", "tiny",
                        "--no-progress"],
        "export-generator": ["train", "export-generator", "-o", str(tmp_path / "exported")],
    }[command]
    monkeypatch.setenv("CITEQA_MAX_BATCH", "abc")
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "error: invalid max_batch (CITEQA_MAX_BATCH):" in result.output
    assert "validation error" not in result.output and "pydantic" not in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(
        result.exception, SystemExit)


@pytest.mark.parametrize("command", ["eval", "redteam"])
def test_a_run_is_not_written_into_the_index_it_reads(
        command: str, corpus: Path, tmp_path: Path) -> None:
    """The index's next change swaps its whole folder: the run (resumable) went with it."""
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    before = sorted(p.name for p in index.iterdir())
    for out, said in ((index, "is also the --index"), (index / "run", "is inside the --index")):
        args = {"eval": ["eval", "-d", str(tmp_path / "q.jsonl")],
                "redteam": ["redteam", "--n", "1"]}[command]
        result = run(*args, "-i", str(index), "-o", str(out), "--preset", "tiny",
                     "--no-progress")
        assert result.exit_code == 2 and said in result.output, result.output
    assert sorted(p.name for p in index.iterdir()) == before


@pytest.mark.parametrize(("name", "value"), [("CITEQA_FP32_KERNEL", "bogus"),
                                             ("CITEQA_KEEP_FREED_MEMORY", "of")])
def test_settings_read_outside_settings_are_checked_as_a_command_starts(
        name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad CITEQA_FP32_KERNEL was a traceback once an encoder loaded; a mistyped
    CITEQA_KEEP_FREED_MEMORY was read as on."""
    monkeypatch.setenv(name, value)
    result = run("search", "q", "--index", "nowhere")
    assert result.exit_code == 2
    assert f"error: {name} must be one of" in result.output and repr(value) in result.output


def test_an_invalid_option_is_named_by_its_flag_not_a_variable_never_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run("ask", "q", "--index", str(tmp_path), "--preset", "tiny", "--generator",
                 str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "invalid generator (--generator): --generator '" in result.output, result.output
    assert "CITEQA_GENERATOR" not in result.output
    monkeypatch.setenv("CITEQA_GENERATOR", str(tmp_path / "nope"))  # set so: named so
    result = run("ask", "q", "--index", str(tmp_path), "--preset", "tiny")
    assert result.exit_code == 2
    assert "invalid generator (CITEQA_GENERATOR): CITEQA_GENERATOR='" in result.output


def test_the_defaults_the_readme_states_are_the_settings_defaults() -> None:
    """docs/deploy.md sends readers to README for every setting's default: each "`CITEQA_X` (N"
    there is X's default, and the batching and waiting settings state theirs."""
    from citeqa.config import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    stated = [(m.group(1).lower(), float(m.group(2).replace(",", "")))
              for m in re.finditer(r"`CITEQA_([A-Z0-9_]+)` \((?:default )?(\d[\d.,]*\d|\d)",
                                   readme)]
    assert len(stated) >= 10, stated
    for name, value in stated:
        assert name in Settings.model_fields, name
        assert Settings.model_fields[name].default == value, (name, value)
    named = {name for name, _ in stated}
    assert {"window_ms", "disconnect_poll_s", "max_queue", "request_timeout_s",
            "retry_after_s", "index_reload_s"} <= named


def test_a_setting_set_empty_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """CITEQA_INDEX= served the folder "." and CITEQA_MAX_BATCH= failed to parse (a compose file's
    ${VAR:-} sets them so)."""
    from citeqa.config import Settings

    for name in ("INDEX", "MAX_BATCH", "CACHE_DIR", "CPU_DTYPE", "ANSWER_MODE",
                 "REQUEST_TIMEOUT_S"):
        monkeypatch.setenv(f"CITEQA_{name}", "")
    read = Settings()
    assert (read.index, read.max_batch, read.cpu_dtype, read.answer_mode) == (
        Path("index/default"), None, None, None)  # the defaults
    assert read.request_timeout_s == 120.0 and read.cache_dir.name == "citeqa"


@pytest.mark.parametrize("name", ["SHUTDOWN_GRACE_S", "REQUEST_TIMEOUT_S", "GENERATOR_WAIT_S",
                                  "WINDOW_MS", "DISCONNECT_POLL_S"])
@pytest.mark.parametrize("value", ["inf", "nan", "1e309", "1e12"])
def test_a_wait_no_timer_can_hold_is_refused(monkeypatch: pytest.MonkeyPatch, name: str,
                                             value: str) -> None:
    """CITEQA_SHUTDOWN_GRACE_S=inf was taken, and shutting down failed with an OverflowError."""
    monkeypatch.setenv(f"CITEQA_{name}", value)
    result = run("search", "q", "--index", "nowhere")
    assert result.exit_code == 2 and f"(CITEQA_{name})" in result.output, result.output


@pytest.mark.parametrize("kind", [["--dense-index", "flat"], ["--hnsw"], [], ["--dense-index",
                                  "ivf", "--bm25-only"]])
def test_ivf_options_without_ivf_are_refused(corpus: Path, tmp_path: Path, kind: list[str]
                                             ) -> None:
    for option in (["--nprobe", "4"], ["--nlist", "8"]):
        result = run("index", "build", str(corpus), "--out", str(tmp_path / "idx"), "--preset",
                     "tiny", "--no-progress", *kind, *option)
        assert result.exit_code == 2, result.output
        assert "--nprobe and --nlist only apply with --dense-index ivf" in result.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("kind", [["--hnsw"], ["--dense-index", "flat"]])
def test_a_dense_index_kind_with_bm25_only_is_refused(corpus: Path, tmp_path: Path,
                                                      kind: list[str]) -> None:
    result = run("index", "build", str(corpus), "--out", str(tmp_path / "idx"), "--preset",
                 "tiny", "--no-progress", "--bm25-only", *kind)
    assert result.exit_code == 2 and "--bm25-only builds no dense index" in result.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("command", [["index", "build"], ["ask"], ["serve"], ["eval"]])
def test_help_shows_flags_without_a_value_and_arguments_by_name(command: list[str]) -> None:
    """--help reads as usual: a flag takes no value, an argument is named in capitals (typer
    0.27-0.29 printed ``<bool>`` after flags and ``{sources}...`` in the usage line)."""
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage
    text = " ".join(result.output.replace("\u2502", " ").split())
    assert "<bool>" not in text
    assert "--help Show this message and exit." in text, text


def test_every_option_is_named_whole_in_help_at_80_columns() -> None:
    """rich's option tables cut long names to fit (``--allow-private…``): help is plain."""
    import typer.main

    def commands(cmd, path: list[str]):  # type: ignore[no-untyped-def]
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, [*path, name])

    seen = 0
    for path, cmd in commands(typer.main.get_command(app), []):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"},
                                    terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        for param in cmd.params:
            if param.param_type_name != "option":
                continue
            for name in (*param.opts, *param.secondary_opts):
                seen += 1
                whole = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output)
                assert whole, (path, name, result.output)
    assert seen > 100  # every command's every option


def test_the_private_url_hint_names_options_that_exist() -> None:
    from citeqa.config import Settings
    from citeqa.ingest.fetch import OPT_IN

    [(option, where)] = re.findall(r"with (--[a-z-]+) \(([^)]*)\)", OPT_IN)
    commands = re.findall(r"`(?:citeqa )?([a-z ]+)`", where)
    assert commands == ["index build", "index add"]
    for command in commands:
        cmd = typer.main.get_command(app)
        for name in command.split():
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        assert any(option in p.opts for p in cmd.params), command
    [setting] = re.findall(r"CITEQA_([A-Z_]+)=1", OPT_IN)
    assert setting.lower() in Settings.model_fields


def test_search_names_a_document_without_a_source_by_its_id(tmp_path: Path) -> None:
    from citeqa.config import RetrievalConfig
    from citeqa.retrieval import build_index_from_documents

    posted = Document("k1", "Birds", "", "Kestrels hover over the old mill at dawn.")  # as POSTed
    build_index_from_documents([posted], tmp_path / "idx", RetrievalConfig(embedder="hash"),
                               progress=False)
    result = run("search", "kestrels", "--index", str(tmp_path / "idx"))
    assert result.exit_code == 0 and "1. Birds  [k1 0:41]" in result.output, result.output


def test_search_prints_no_escape_sequence_a_document_holds(tmp_path: Path) -> None:
    from citeqa.config import RetrievalConfig
    from citeqa.retrieval import build_index_from_documents

    doc = Document("e1", "Reset\x1b]0;pwned\x07", "notes\x1b[31m.md",
                   "Password reset \x1b[2J\x1b[31mhappens on the settings page.")
    build_index_from_documents([doc], tmp_path / "idx", RetrievalConfig(embedder="hash"),
                               progress=False)
    result = run("search", "password reset", "--index", str(tmp_path / "idx"))
    assert result.exit_code == 0 and "\x1b" not in result.output and "\x07" not in result.output
    assert "Reset\ufffd]0;pwned\ufffd" in result.output, result.output


def test_the_command_line_starts_without_importing_torch():
    """`citeqa --help` and the one-line refusals answer in well under a second: only the
    commands that run a model import torch (~1.5 s), and they do so themselves."""
    import subprocess
    import sys

    code = "import sys, citeqa.cli; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]  # faiss: its loader logs before -v is read
    # the packages that serve their names lazily list them, still without torch
    code = ("import sys, citeqa.reward as r, citeqa.training as t; "
            "print('load_scorer' in dir(r), 'LoRAConfig' in dir(t), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False"]
    # the top level serves the entry points the same way
    code = ("import sys, citeqa; print('Pipeline' in dir(citeqa), 'torch' in sys.modules); "
            "import citeqa.pipeline, citeqa.client; "
            "print(citeqa.Pipeline is citeqa.pipeline.Pipeline, "
            "citeqa.CiteqaClient is citeqa.client.CiteqaClient)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True", "True"]


def test_progress_bars_show_on_a_terminal_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build into a log file wrote every redraw of every bar (146 in a 52 s build)."""
    import io
    import sys

    from citeqa.cli_errors import shown_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert shown_progress(None) is False and shown_progress(True) is True

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert shown_progress(None) is True and shown_progress(False) is False


def test_version_is_the_installed_packages() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"citeqa {version('citeqa')}"


def test_serve_on_a_port_in_use_says_so_before_anything_loads(corpus, tmp_path, served) -> None:
    """It started whole (models loaded), then ended with uvicorn's log lines and status 3."""
    import socket

    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run("serve", "--index", str(index), "--preset", "tiny", "--port", port)
    assert result.exit_code == 2 and served == [], result.output
    assert (f"error: cannot listen on 127.0.0.1 port {port}: another process listens there; "
            "give another --port, or stop that one") in result.output
    assert run("serve", "--index", str(index), "--preset", "tiny", "--port",
               port).exit_code == 0 and len(served) == 1  # free again


def test_path_options_show_as_paths_in_help() -> None:
    help_text = run("index", "build", "--help").output
    assert "-o, --out PATH" in help_text and "A_PATH" not in help_text


def test_search_and_ask_interrupted_say_so(corpus, tmp_path, monkeypatch) -> None:
    """Both ended with status 130 and no word, unlike every other command."""
    from citeqa.pipeline import Pipeline
    from citeqa.retrieval import HybridRetriever

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    assert build(corpus, tmp_path / "index").exit_code == 0
    monkeypatch.setattr(Pipeline, "ask", interrupted)
    monkeypatch.setattr(HybridRetriever, "search", interrupted)
    for command in ("search", "ask"):
        result = run(command, "tower?", "--index", str(tmp_path / "index"), *(
            ["--preset", "tiny"] if command == "ask" else []))
        assert result.exit_code == 130, result.output
        assert result.output.endswith("\ninterrupted: nothing was changed\n"), result.output


def test_search_cuts_a_long_passage_at_a_word_with_an_ellipsis(tmp_path: Path) -> None:
    from citeqa.config import ChunkConfig, RetrievalConfig
    from citeqa.retrieval import build_index_from_documents

    text = "Kestrels hover over the old mill at dawn. " * 12  # 504 characters, one passage
    build_index_from_documents([Document("k", "Birds", "birds.txt", text)], tmp_path / "idx",
                               RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=600)),
                               progress=False)
    result = run("search", "kestrels", "--index", str(tmp_path / "idx"))
    shown = result.output.splitlines()[1]
    # 7 sentences are 293 characters with their spaces; the 8th's first word is cut at 300
    assert shown == "   " + ("Kestrels hover over the old mill at dawn. " * 7).strip() + "\u2026"
    # text without a space in the last half of the limit is cut where it reaches (a Japanese
    # passage under a two-word heading showed the heading alone)
    assert snippet("\u6982\u8981 " + "\u6587" * 400, 30) == (
        "\u6982\u8981 " + "\u6587" * 27 + "\u2026")
    assert snippet("a " + "x" * 400, 20) == "a " + "x" * 18 + "\u2026"
    assert snippet("short text", 20) == "short text"
    assert snippet("The quick brown fox jumps", 19) == "The quick brown fox\u2026"  # whole


def test_the_port_probe_binds_as_the_server_does() -> None:
    """Every address a name gives, IPv6 for IPv6 alone (as asyncio's create_server): `--host
    ::` was refused where another process held the port on IPv4 only."""
    import socket

    from citeqa.cli import _probe_bind

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            _probe_bind(socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM))
        both = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
        if any(a[0] == socket.AF_INET for a in both):
            with pytest.raises(OSError):  # its IPv4 address is taken
                _probe_bind(both)
        try:  # (has_ipv6 says how Python was built, not whether the kernel has IPv6)
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6_socket:
                v6_socket.bind(("::", 0))
        except OSError:
            return
        _probe_bind(socket.getaddrinfo("::", port, type=socket.SOCK_STREAM))


def test_the_port_probe_passes_over_a_family_the_machine_lacks(monkeypatch) -> None:
    """With IPv6 disabled, `localhost` (::1 and 127.0.0.1) was refused, though the server
    serves on 127.0.0.1 (asyncio passes over a socket it cannot make)."""
    import errno
    import socket

    from citeqa.cli import _probe_bind

    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))
    v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))
    elsewhere = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0))  # not ours
    for version in ((3, 12, 9), (3, 13, 0)):  # both branches, whichever Python runs this
        monkeypatch.setattr(sys, "version_info", version)
        if version >= (3, 13):  # an address not on this machine: asyncio passes it over
            _probe_bind([elsewhere, v4])
        else:  # ... and fails on it before 3.13: refused here, before the start, not after it
            with pytest.raises(OSError):
                _probe_bind([elsewhere, v4])
        with pytest.raises(OSError):
            _probe_bind([elsewhere])
    monkeypatch.undo()
    monkeypatch.setattr(socket, "socket", no_ipv6)
    _probe_bind([v6, v4])
    with pytest.raises(OSError, match="not supported"):  # nothing could be made at all
        _probe_bind([v6])


def test_serve_hands_an_ipv6_host_to_the_server_without_brackets(corpus, tmp_path,
                                                                  served) -> None:
    """--host [::1] passed the checks, then the server could not resolve "[::1]" (status 3)."""
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    index = tmp_path / "index"
    assert build(corpus, index).exit_code == 0
    result = run("serve", "--index", str(index), "--preset", "tiny", "--host", "[::1]",
                 "--port", "8781")
    if result.exit_code == 2 and "::1" in result.output:  # no IPv6 loopback in this sandbox
        pytest.skip(result.output)
    assert result.exit_code == 0, result.output
    assert served[0].state.uvicorn_run["host"] == "::1"
