"""Tests for citeqa.evals.squad: loaders on small inline files, the fixed split, and the shared
SQuAD 2.0 subset when ../shared/data is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from citeqa.errors import CiteqaError, ConfigError, InvalidRequestError, SourceError
from citeqa.evals.squad import (
    CALIBRATION_ARTICLES,
    EVAL_ARTICLES,
    TRAIN_ARTICLES,
    QAItem,
    articles_for_split,
    check_not_held_out,
    held_out_articles,
    load_questions,
    load_squad_questions,
    split_of_article,
)

SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Normans",
            "paragraphs": [
                {
                    "context": "The Normans were in Normandy in the 10th and 11th centuries.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "When were the Normans in Normandy?",
                            "answers": [
                                {"text": "10th and 11th centuries", "answer_start": 34},
                                {"text": "in the 10th and 11th centuries", "answer_start": 27},
                                {"text": "10th and 11th centuries", "answer_start": 34},
                            ],
                            "is_impossible": False,
                        },
                        {
                            "id": "q2",
                            "question": "Who gave Normandy its name?",
                            "answers": [],
                            "plausible_answers": [{"text": "Normans", "answer_start": 4}],
                            "is_impossible": True,
                        },
                    ],
                }
            ],
        },
        {
            "title": "Packet_switching",
            "paragraphs": [
                {
                    "context": "Packets are routed.",
                    "qas": [  # SQuAD v1 style: no is_impossible key
                        {
                            "id": "q3",
                            "question": "What is routed?",
                            "answers": [{"text": "Packets", "answer_start": 0}],
                        }
                    ],
                }
            ],
        },
    ],
}


@pytest.fixture
def squad_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(SQUAD), encoding="utf-8")
    return path


def test_load_squad(squad_file: Path) -> None:
    items = load_squad_questions(squad_file)
    assert [i.id for i in items] == ["q1", "q2", "q3"]
    q1, q2, q3 = items
    # Duplicated gold texts kept once, in file order.
    assert q1.answers == ("10th and 11th centuries", "in the 10th and 11th centuries")
    assert q1.article == "Normans" and q1.context.startswith("The Normans")
    assert q1.answerable
    # Unanswerable: no answers (plausible_answers are not golds).
    assert q2.answers == () and not q2.answerable
    assert q3 == QAItem(
        "q3", "What is routed?", ("Packets",), "Packet_switching", "Packets are routed."
    )


def test_load_squad_article_filter(squad_file: Path) -> None:
    assert [i.id for i in load_squad_questions(squad_file, ["Packet_switching"])] == ["q3"]
    with pytest.raises(SourceError, match="Atlantis"):
        load_squad_questions(squad_file, ["Atlantis"])


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": "a", "question": "Q1?", "answers": ["x", "y", "x"]}\n'
        "\n"
        '{"id": "b", "question": "Q2?", "answers": [], "article": "Normans"}\n',
        encoding="utf-8",
    )
    items = load_questions(path)
    assert items == [
        QAItem("a", "Q1?", ("x", "y"), "", ""),
        QAItem("b", "Q2?", (), "Normans", ""),
    ]
    assert [i.id for i in load_questions(path, ["Normans"])] == ["b"]
    assert [i.answerable for i in items] == [True, False]


def test_an_article_filter_compares_titles_as_the_split_does(squad_file: Path,
                                                            tmp_path: Path) -> None:
    """The mutation review's: a JSONL eval file spelling "Packet switching" was dropped from
    its split's questions in silence (SQuAD files were refused as lacking the article)."""
    assert [i.id for i in load_questions(squad_file, ["packet switching "])] == ["q3"]
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "Q?", "answers": ["x"], "article": '
                    '"Packet switching"}\n', encoding="utf-8")
    assert [i.id for i in load_questions(path, ["Packet_switching"])] == ["a"]
    with pytest.raises(SourceError, match=r"\['Atlantis'\]"):  # named as asked
        load_squad_questions(squad_file, ["Packet_switching", "Atlantis"])


def test_a_question_whose_golds_hold_no_word_is_unanswerable_as_the_report_counts_it() -> None:
    """predictions.jsonl said answerable (a gold of "" or "the"), metrics.json unanswerable."""
    from citeqa.evals.report import judge

    for golds in (("",), ("the",), (" . ",)):
        item = QAItem("q", "Q?", golds, "", "")
        record = {"id": "q", "gold_answers": list(golds), "declined": True, "answer": None,
                  "quote": None}
        assert item.answerable is judge(record, lambda d: None).answerable is False  # type: ignore[arg-type,return-value]
    assert QAItem("q", "Q?", ("the Normans",), "", "").answerable


def test_a_null_context_is_no_context_not_the_text_none(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "question": "Q?", "answers": ["x"], "context": null}\n',
                    encoding="utf-8")
    assert load_questions(path) == [QAItem("a", "Q?", ("x",), "", "")]
    squad = tmp_path / "s.json"
    squad.write_text('{"data": [{"title": "T", "paragraphs": [{"context": null, "qas": [{"id": '
                     '"1", "question": "Q?", "answers": [{"text": "x"}]}]}]}]}', encoding="utf-8")
    assert load_questions(squad) == [QAItem("1", "Q?", ("x",), "T", "")]


def test_load_questions_dispatches_on_content(squad_file: Path, tmp_path: Path) -> None:
    assert [i.id for i in load_questions(squad_file)] == ["q1", "q2", "q3"]
    one_line = tmp_path / "one.txt"  # a single JSONL line is also valid JSON: still JSONL
    one_line.write_text('{"id": "a", "question": "Q?", "answers": ["x"]}', encoding="utf-8")
    assert load_questions(one_line) == [QAItem("a", "Q?", ("x",), "", "")]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "no questions"),
        ("not json at all", ":1: bad question line"),
        ('{"id": "a", "question": "Q?", "answers": ["x"]}\n{"question": "no id"}\n', ":2:"),
        ('{"id": "a", "question": "Q?", "answers": "x"}\n', "list of strings"),
        ('{"id": "a", "question": "Q?"}\n', r"'answers' \(a list; \[\] for a question"),
        ("[1, 2, 3]", "neither a SQuAD file"),
        ('{"data": [{"title": "T", "paragraphs": [{"qas": [{"id": "1"}]}]}]}', "malformed"),
        (
            '{"id": "a", "question": "Q?", "answers": []}\n'
            '{"id": "a", "question": "Q?", "answers": []}\n',
            "twice",
        ),
        # odd types: each crashed later (a TypeError in the red team, an AttributeError), or
        # read as text ("5", a context "None")
        ('{"id": "a", "question": 5, "answers": []}\n', "'question' is int, not a string"),
        ('{"id": "a", "question": "Q?", "answers": [], "context": 3}\n', "'context' is int"),
        ('{"data": [{"title": "T", "paragraphs": [{"context": 7, "qas": []}]}]}',
         "malformed.*a context is int"),
        ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", '
         '"question": null, "answers": []}]}]}]}', "malformed.*a question is NoneType"),
        ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", '
         '"question": "Q?", "answers": [{"text": 7}]}]}]}]}', "an answer's text is int"),
        # the review's: no answers read as unanswerable (a decline scored right), "false" as
        # true, a null id as the id "None", 1 and "1" twice without a word why
        ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", '
         '"question": "Q?"}]}]}]}', r"malformed.*'answers' \(a question the documents"),
        ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "1", '
         '"question": "Q?", "answers": [], "is_impossible": "false"}]}]}]}',
         "is_impossible is 'false', not true or false"),
        ('{"id": null, "question": "Q?", "answers": []}\n', ":1: .*an id is NoneType"),
        ('{"id": true, "question": "Q?", "answers": []}\n', ":1: .*an id is bool"),
        ('{"id": 1, "question": "Q?", "answers": []}\n{"id": "1", "question": "Q?", '
         '"answers": []}\n', r"twice.*1 and \"1\" are one id"),
    ],
)
def test_bad_files_raise_source_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SourceError, match=match) as info:
        load_questions(path)
    assert isinstance(info.value, CiteqaError)
    assert not isinstance(info.value, InvalidRequestError)


def test_a_byte_order_mark_is_read_past_and_unanswerable_forms_load(tmp_path: Path) -> None:
    """A Windows editor's BOM was "bad question line 1" (a SQuAD file's too: told a JSONL
    line); is_impossible true needs no answers, and an integer id is its digits."""
    (tmp_path / "q.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"id": 7, "question": "Q?", "answers": ["x"]}).encode() + b"\r\n")
    assert [(q.id, q.answers) for q in load_questions(tmp_path / "q.jsonl")] == [("7", ("x",))]
    (tmp_path / "qa.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(SQUAD).encode())
    assert len(load_questions(tmp_path / "qa.json")) == 3
    impossible = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "Q?", "is_impossible": True}]}]}]}
    (tmp_path / "v2.json").write_text(json.dumps(impossible))
    assert load_questions(tmp_path / "v2.json")[0].answers == ()


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        load_questions(tmp_path / "nope.json")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SourceError):
        load_questions(binary)
    with pytest.raises(SourceError, match="not a SQuAD file"):
        (tmp_path / "list.json").write_text("[]", encoding="utf-8")
        load_squad_questions(tmp_path / "list.json")


def test_a_gzipped_question_file_is_read_as_it_is(squad_file: Path, tmp_path: Path) -> None:
    """The shared SQuAD 1.1 training file is .json.gz: it failed as "'utf-8' codec can't
    decode byte 0x8b"."""
    import gzip

    from citeqa.training.demos import squad_answer_starts

    packed = tmp_path / "qa.json.gz"
    packed.write_bytes(gzip.compress(squad_file.read_bytes()))
    assert load_questions(packed) == load_questions(squad_file)
    assert squad_answer_starts(packed) == squad_answer_starts(squad_file) != {}
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(packed.read_bytes()[:30])
    with pytest.raises(SourceError, match="cannot read question file"):
        load_questions(cut)


def test_fixed_split() -> None:
    all_articles = TRAIN_ARTICLES + CALIBRATION_ARTICLES + EVAL_ARTICLES
    assert len(all_articles) == len(set(all_articles)) == 11
    assert articles_for_split("calibration") == ("European_Union_law", "Packet_switching")
    assert split_of_article("Imperialism") == "eval"
    assert split_of_article("Normans") == "train"
    assert split_of_article("Atlantis") is None
    # compared as one title, not character for character (each of these got past a check)
    for same in ("Harvard University", "harvard_university", "Harvard_University ",
                 "Harvard\u200b_University", "Ｈａｒｖａｒｄ_University"):
        assert split_of_article(same) == split_of_article("Harvard_University") is not None
    with pytest.raises(ConfigError, match="choose one of"):
        articles_for_split("test")


def test_training_data_of_held_out_articles_is_refused() -> None:
    def item(article: str) -> QAItem:
        return QAItem("q", "Why?", ("because",), article, "")

    check_not_held_out([item("Normans"), item("Atlantis"), item("")], "train.json")  # fine
    with pytest.raises(ConfigError, match=r"train.json holds questions of the calibration or "
                       r"evaluation articles \(Imperialism, Packet_switching\)"):
        check_not_held_out([item("Normans"), item("Packet_switching"), item("Imperialism")],
                           "train.json")


def test_an_eval_over_trained_or_calibrated_articles_is_warned_of(
        squad_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from citeqa.evals.runner import RunSpec, load_items
    from citeqa.evals.squad import split_warning

    def item(article: str) -> QAItem:
        return QAItem("q", "Why?", ("because",), article, "")

    assert split_warning([item("Imperialism"), item("Atlantis"), item("")]) is None
    said = split_warning([item("Normans"), item("Huguenot"), item("Packet_switching"),
                          item("Imperialism")])
    assert said is not None and said.startswith(
        "these questions include 2 questions of the train articles and 1 question of the "
        "calibration articles")
    assert said.endswith("pass --split eval")
    items = load_squad_questions(squad_file)
    with caplog.at_level("WARNING", logger="citeqa.evals.runner"):
        load_items(RunSpec(dataset=squad_file, index=tmp_path))
    assert caplog.messages == [split_warning(items)] and "not held out" in caplog.messages[0]


def test_held_out_articles_are_every_other_sorted_title() -> None:
    titles = ["Eel", "Bee", "Ant", "Dog", "Cat", "Bee"]  # unsorted, one repeated
    assert held_out_articles(titles) == {"Bee", "Dog"}
    assert held_out_articles(reversed(titles)) == held_out_articles(titles)  # order-free
    assert held_out_articles(["Ant"]) == frozenset()
    nineteen = [f"t{i:02d}" for i in range(19)]
    held = held_out_articles(nineteen)
    assert len(held) == 9 and held < set(nineteen) and "t00" not in held


def test_shared_squad_subset(squad_dir: Path) -> None:
    shared_qa = squad_dir / "qa.json"
    items = load_questions(shared_qa)
    assert len(items) == 3928
    assert sum(i.answerable for i in items) == 1826
    assert {i.article for i in items} == set(TRAIN_ARTICLES + CALIBRATION_ARTICLES + EVAL_ARTICLES)
    split_items = {
        name: load_squad_questions(shared_qa, articles_for_split(name))
        for name in ("train", "calibration", "eval")
    }
    assert sum(len(v) for v in split_items.values()) == 3928
    ids = [i.id for v in split_items.values() for i in v]
    assert len(set(ids)) == 3928
    for name, v in split_items.items():
        assert {split_of_article(i.article) for i in v} == {name}
    # Every gold answer of an answerable question occurs in its paragraph.
    assert all(a in i.context for i in items for a in i.answers)
