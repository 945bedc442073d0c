"""Generator demonstrations: quote choice, gold passage handling, rendering through the prompt."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from citeqa.config import ChunkConfig, GenerationConfig, RetrievalConfig
from citeqa.errors import SourceError
from citeqa.evals.squad import load_questions
from citeqa.generation.parse import parse_output
from citeqa.generation.prompt import build_messages
from citeqa.generation.verify import verify_quote
from citeqa.retrieval import HybridRetriever, build_index_from_documents
from citeqa.training.cli import app
from citeqa.training.demos import (
    MAX_PASSAGES,
    Demo,
    build_demos,
    passage_count,
    passages_by_context,
    quote_span,
    read_demos,
    render_target,
    squad_answer_starts,
    write_demos,
)
from citeqa.types import Hit

GEN = GenerationConfig(answer_mode="span")  # the format evals/train_generator.sh trains

P_OIL = (
    "The 1973 oil crisis began in October 1973. Members of OAPEC proclaimed an oil embargo. "
    "By the end of the embargo in March 1974, the price of oil had risen from US$3 per barrel "
    "to nearly $12 globally."
)
P_STEAM = (
    "A steam engine is a heat engine that performs mechanical work using steam as its working "
    "fluid. Steam engines were used in pumps, locomotives and ships. James Watt improved the "
    "engine in 1776 with a separate condenser."
)
P_NORMANS = (
    "The Normans were the people who gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
)
DISTRACTORS = [
    "Paris is the capital of France and its largest city, on the Seine river.",
    "The embargo of ships in the harbour was lifted in spring after a long winter.",
    "Oil paintings from the period show pumps and locomotives in the countryside.",
]


def _qa(qid: str, question: str, answer: str | None, context: str) -> dict:
    if answer is None:
        return {"id": qid, "question": question, "answers": [], "is_impossible": True}
    return {
        "id": qid,
        "question": question,
        "answers": [{"text": answer, "answer_start": context.index(answer)}],
        "is_impossible": False,
    }


SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "1973_oil_crisis",
            "paragraphs": [
                {
                    "context": P_OIL,
                    "qas": [
                        _qa("q1", "When did the 1973 oil crisis begin?", "October 1973", P_OIL),
                        _qa("q2", "What was the price of oil in March 1974?", "nearly $12", P_OIL),
                        _qa("q3", "Who ended the oil crisis in 1990?", None, P_OIL),
                    ],
                }
            ],
        },
        {
            "title": "Steam_engine",
            "paragraphs": [
                {
                    "context": P_STEAM,
                    "qas": [
                        _qa("q4", "Who improved the steam engine in 1776?", "James Watt", P_STEAM),
                    ],
                }
            ],
        },
        {
            "title": "Normans",
            "paragraphs": [
                {
                    "context": P_NORMANS,
                    "qas": [_qa("q5", "What region is named after the Normans?", "Normandy",
                                P_NORMANS)],
                }
            ],
        },
        {
            "title": "Distractors",
            "paragraphs": [{"context": text, "qas": []} for text in DISTRACTORS],
        },
    ],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SQuAD file and a hash-embedder index over its paragraphs."""
    from citeqa.ingest import load_sources

    root = tmp_path_factory.mktemp("squad")
    path = root / "qa.json"
    path.write_text(json.dumps(SQUAD))
    docs = load_sources([str(path)], progress=False).documents
    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=1000))
    build_index_from_documents(docs, root / "idx", cfg, progress=False)
    return path, root / "idx"


# -- quote_span --------------------------------------------------------------------------------


def test_quote_is_the_sentence_holding_the_answer() -> None:
    a = P_STEAM.index("James Watt")
    s, e = quote_span(P_STEAM, a, a + 10, min_chars=20, max_chars=300)
    assert P_STEAM[s:e] == "James Watt improved the engine in 1776 with a separate condenser."


def test_quote_spanning_two_sentences_keeps_both() -> None:
    text = "It was cold. Snow fell on Monday. Then it rained."
    a = text.index("cold")
    s, e = quote_span(text, a, text.index("Monday") + 6, min_chars=5, max_chars=300)
    assert text[s:e] == "It was cold. Snow fell on Monday."


def test_short_sentence_is_widened_to_min_chars() -> None:
    text = "Born 1900. He lived in Rome for forty years."
    a = text.index("1900")
    s, e = quote_span(text, a, a + 4, min_chars=20, max_chars=300)
    assert text[s:e] == text


def test_long_sentence_is_cut_around_the_answer_at_word_boundaries() -> None:
    words = " ".join(f"word{i}" for i in range(80))
    text = words + " the answer is Zanzibar " + words + "."
    a = text.index("Zanzibar")
    s, e = quote_span(text, a, a + 8, min_chars=20, max_chars=100)
    quote = text[s:e]
    assert "Zanzibar" in quote and len(quote) <= 100
    assert (s == 0 or text[s - 1] == " ") and (e == len(text) or text[e] == " ")


def test_no_quote_when_the_answer_is_longer_than_max() -> None:
    assert quote_span("x" * 50, 0, 50, min_chars=5, max_chars=40) is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.from_regex(r"[A-Za-z0-9]{1,9}", fullmatch=True), min_size=1, max_size=30),
        min_size=1,
        max_size=6,
    ),
    st.data(),
    st.integers(20, 120),
)
def test_quote_span_properties(sentences: list[list[str]], data: st.DataObject, cap: int) -> None:
    text = " ".join(" ".join(words) + "." for words in sentences)
    tokens = [(m, m + len(w)) for m, w in _word_offsets(text)]
    i = data.draw(st.integers(0, len(tokens) - 1))
    j = data.draw(st.integers(i, min(i + 3, len(tokens) - 1)))
    a, b = tokens[i][0], tokens[j][1]
    span = quote_span(text, a, b, min_chars=10, max_chars=cap)
    if span is None:
        return
    s, e = span
    assert s <= a and b <= e  # holds the answer
    assert 10 <= e - s <= cap
    assert text[s:e] == text[s:e].strip()
    assert s == 0 or not text[s - 1].isalnum()  # word-aligned
    assert e == len(text) or not text[e].isalnum()


def _word_offsets(text: str) -> list[tuple[int, str]]:
    import re

    return [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z0-9]+", text)]


# -- building demonstrations -------------------------------------------------------------------


def _build(corpus: tuple[Path, Path], retriever: object = None, **kw: object):
    path, index = corpus
    real = HybridRetriever.open(index)
    by_context = passages_by_context(real.index.documents.values(), real.index.passages)
    return build_demos(
        load_questions(path), retriever or real, by_context, squad_answer_starts(path), GEN,
        progress=False, **kw,
    ), real


def test_demos_hold_gold_passage_and_verbatim_quote(corpus: tuple[Path, Path]) -> None:
    (demos, stats), retriever = _build(corpus)
    assert {d.id for d in demos} == {"q1", "q2", "q4", "q5"}
    assert stats.skipped == {"unanswerable": 1}  # q3: declining is the reward model's job
    for d in demos:
        gold = d.passages[d.gold]
        doc = retriever.document(gold.doc_id)
        assert doc.text[gold.start : gold.start + len(gold.text)] == gold.text
        assert d.quote in gold.text and d.answer in d.quote
        assert 1 <= len(d.passages) <= MAX_PASSAGES
    q2 = next(d for d in demos if d.id == "q2")
    assert q2.answer == "nearly $12"
    assert q2.quote.startswith("By the end of the embargo") and q2.quote.endswith("globally.")


class _MissingGold:
    """A retriever that only ever finds the distractors."""

    def __init__(self, real: HybridRetriever) -> None:
        self.real = real

    def search(self, query: str, k: int = 10) -> list[Hit]:
        hits = self.real.search(query, 50)
        return [h for h in hits if h.title == "Distractors"][:k]

    def document(self, doc_id: str):
        return self.real.document(doc_id)


def test_missed_gold_takes_the_place_of_a_retrieved_passage(corpus: tuple[Path, Path]) -> None:
    path, index = corpus
    real = HybridRetriever.open(index)
    (demos, stats), _ = _build(corpus, retriever=_MissingGold(real), top_k=3)
    assert demos and stats.gold_retrieved == 0
    for d in demos:
        assert len(d.passages) == 3 and 0 <= d.gold < 3
        found = [h.passage.text for h in _MissingGold(real).search(d.question, 3)]
        assert [p.text for i, p in enumerate(d.passages) if i != d.gold] == [
            t for i, t in enumerate(found) if i != d.gold]
        assert d.passages[d.gold].text in {P_OIL, P_STEAM, P_NORMANS}


def test_passage_counts_vary_by_question_and_are_seeded() -> None:
    counts = [passage_count(f"q{i}") for i in range(400)]
    assert counts == [passage_count(f"q{i}") for i in range(400)]
    assert set(counts) == set(range(1, MAX_PASSAGES + 1))
    assert counts.count(3) > counts.count(1) and passage_count("q1", top_k=4) == 4


def test_limit(corpus: tuple[Path, Path]) -> None:
    (demos, _), _ = _build(corpus, limit=2)
    assert len(demos) == 2


def test_target_parses_and_its_quote_verifies(corpus: tuple[Path, Path]) -> None:
    (demos, _), retriever = _build(corpus)
    for d in demos:
        rendered = render_target(d, GEN)
        assert rendered is not None
        messages, target = rendered
        k = len(d.hits())
        assert messages == build_messages(d.question, d.hits(), GEN, top_k=k)[0]  # serving
        _, shown = build_messages(d.question, d.hits(), GEN, top_k=k)
        parsed = parse_output(target, len(shown))
        assert target.startswith("Answer: ") and parsed.answer in parsed.quote  # span mode
        assert parsed.answer == d.answer and parsed.quote == d.quote
        passage = shown[parsed.passage_number - 1]
        assert passage.hit == d.hits()[d.gold]
        document = retriever.document(passage.hit.passage.doc_id)
        quote = verify_quote(parsed.quote, passage.window, document, GEN)
        assert quote is not None and quote.text == d.quote


def test_quote_outside_the_shown_window_is_not_rendered(corpus: tuple[Path, Path]) -> None:
    (demos, _), _ = _build(corpus)
    q4 = next(d for d in demos if d.id == "q4")
    # A 60-character window around the question's best sentence cannot show the whole quote.
    assert render_target(q4, replace(GEN, passage_chars=60)) is None


def test_demos_round_trip_and_bad_lines(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    (demos, _), _ = _build(corpus)
    write_demos(tmp_path / "d.jsonl", demos)
    assert read_demos(tmp_path / "d.jsonl") == demos
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(SourceError, match="bad.jsonl:1"):
        read_demos(tmp_path / "bad.jsonl")
    with pytest.raises(SourceError, match="generator-data"):
        read_demos(tmp_path / "missing.jsonl")


def test_cli_generator_data(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    path, index = corpus
    out = tmp_path / "demos.jsonl"
    result = CliRunner().invoke(
        app,
        ["generator-data", "--dataset", str(path), "--index", str(index), "--out", str(out),
         "--split", "all", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    demos = read_demos(out)
    assert len(demos) == 4 and all(isinstance(d, Demo) for d in demos)
    stats = json.loads((tmp_path / "demos.jsonl.stats.json").read_text())
    assert stats["written"] == 4 and stats["skipped"] == {"unanswerable": 1}
    assert stats["answer_mode"] == "span"  # the preset's, recorded as --help says
    bad = CliRunner().invoke(
        app, ["generator-data", "--dataset", str(path), "--index", str(tmp_path / "none"),
              "--out", str(out)],
    )
    assert bad.exit_code == 2 and "error:" in bad.output
    bad = CliRunner().invoke(
        app, ["generator-data", "--dataset", str(path), "--index", str(index), "--out", str(out),
              "--split", "test"],
    )
    assert bad.exit_code == 2 and "'train', 'all']" in bad.output  # 'all' is a split here
    # demonstrations of held-out articles were written (and then trained on) unasked
    for split in ("eval", "calibration"):
        held = CliRunner().invoke(app, ["generator-data", "--dataset", str(path), "--index",
                                        str(index), "--out", str(tmp_path / "h.jsonl"),
                                        "--split", split])
        assert held.exit_code == 2 and "held out, never trained on" in held.output
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"id": "e1", "question": "Q?", "answers": ["a"],
                                     "article": "Imperialism", "context": "a"}) + "\n")
    held = CliRunner().invoke(app, ["generator-data", "--dataset", str(eval_file), "--index",
                                    str(index), "--out", str(tmp_path / "h.jsonl"),
                                    "--split", "all"])
    assert held.exit_code == 2 and "(Imperialism)" in held.output
    assert not (tmp_path / "h.jsonl").exists()


def test_cli_generator_data_answer_mode(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    path, index = corpus
    args = ["generator-data", "--dataset", str(path), "--index", str(index), "--split", "all",
            "--no-progress"]
    span = CliRunner().invoke(app, [*args, "--answer-mode", "span",
                                    "--out", str(tmp_path / "span.jsonl")])
    assert span.exit_code == 0, span.output
    bad = CliRunner().invoke(app, [*args, "--answer-mode", "quote-first",
                                   "--out", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 2 and "--answer-mode must be one of ['span', 'free']" in bad.output
    assert not (tmp_path / "bad.jsonl").exists()


def test_a_demonstration_whose_parts_do_not_fit_is_a_named_bad_line(
        tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    """A gold no passage has was an IndexError at training; an answer outside its quote
    trained without a word (span mode's grammar never lets the model answer so); a file that
    is not UTF-8 did not name itself."""
    (demos, _), _ = _build(corpus)
    good = demos[0].to_json()
    bad = [{**good, "gold": len(good["passages"])}, {**good, "gold": -1},
           {**good, "passages": [], "gold": 0}, {**good, "answer": "Zanzibar"},
           {**good, "quote": "not in any passage"}, {**good, "quote": " "},
           {**good, "gold": 0.9}, {**good, "gold": "0"}, {**good, "gold": True},
           {**good, "answer": good["quote"].split()[0][1:]},  # (part of a word: never placed)
           # a null where text belongs was the text "None" (a title or question trained on)
           {**good, "question": None}, {**good, "id": None},
           {**good, "passages": [{**good["passages"][0], "title": None}, *good["passages"][1:]]},
           {**good, "passages": [{**good["passages"][0], "doc_id": 7}, *good["passages"][1:]]}]
    for n, obj in enumerate(bad):
        path = tmp_path / f"bad{n}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(obj) + "\n")
        with pytest.raises(SourceError, match=rf"bad{n}.jsonl:2: bad demonstration"):
            read_demos(path)
    spaced = {**good, "answer": good["answer"].replace(" ", "  ")}  # (spacing is not read)
    (tmp_path / "ok.jsonl").write_text(json.dumps(spaced) + "\n")
    assert len(read_demos(tmp_path / "ok.jsonl")) == 1
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(good).replace("?", "\xe9?").encode(
        "latin-1") + b"\n")
    with pytest.raises(SourceError, match=r"latin1.jsonl: it is not UTF-8"):
        read_demos(tmp_path / "latin1.jsonl")


def test_an_answer_start_missing_wrong_or_off_falls_back_to_the_first_occurrence(
        tmp_path: Path) -> None:
    """A SQuAD file whose answer had no answer_start (or "x") was a KeyError's traceback in
    `train generator-data` and `train reward-data`; one pointing off the answer skipped the
    question as "gold paragraph not in the index"."""
    squad = json.loads(json.dumps(SQUAD))
    answers = [qa["answers"] for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]
    answers[0][0].pop("answer_start")
    answers[1][0]["answer_start"] = "x"
    answers[3][0]["answer_start"] = 999
    squad["data"][0]["paragraphs"][0]["qas"][0]["plausible_answers"] = [{"start": 1}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(squad))
    starts = squad_answer_starts(path)
    assert "q1" not in starts and "q2" not in starts and starts["q4"] == {"James Watt": 999}
    from citeqa.training.verifier_data import plausible_answers
    assert plausible_answers(path) == {}
    from citeqa.ingest import load_sources

    docs = load_sources([str(path)], progress=False).documents
    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=1000))
    build_index_from_documents(docs, tmp_path / "idx", cfg, progress=False)
    (demos, stats), _ = _build((path, tmp_path / "idx"))
    assert {d.id for d in demos} == {"q1", "q2", "q4", "q5"}, stats.skipped


def test_an_answer_that_is_part_of_a_word_makes_no_demonstration(tmp_path: Path) -> None:
    """read_demos refuses a demonstration span mode could never place ("Norman" in "The
    Normans"): the builder must not write one, or training would stop at its own data."""
    squad = json.loads(json.dumps(SQUAD))
    qa = squad["data"][2]["paragraphs"][0]["qas"][0]
    qa["answers"] = [{"text": "Norman", "answer_start": P_NORMANS.index("Norman")}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(squad))
    from citeqa.ingest import load_sources

    docs = load_sources([str(path)], progress=False).documents
    cfg = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=1000))
    build_index_from_documents(docs, tmp_path / "idx", cfg, progress=False)
    (demos, stats), _ = _build((path, tmp_path / "idx"))
    assert "q5" not in {d.id for d in demos}
    assert stats.skipped.get("answer is part of a word in its quote") == 1, stats.skipped
    write_demos(tmp_path / "d.jsonl", demos)
    assert read_demos(tmp_path / "d.jsonl") == demos
