"""Building verifier data (citeqa/training/verifier_data.py): the generator's labelled candidates
(resumable), synthetic pairs, red-team unanswerables; and the commands from data to a calibrated
verifier the pipeline loads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from citeqa.config import Settings, preset
from citeqa.evals.metrics import is_correct
from citeqa.evals.squad import QAItem
from citeqa.pipeline import Pipeline
from citeqa.redteam import Corpus, Seed, make_variants
from citeqa.retrieval import build_index_from_documents
from citeqa.reward.data import load_verifier_data
from citeqa.training.verifier_data import (
    generator_examples,
    label,
    redteam_examples,
    stats_of,
    synthetic_examples,
)
from citeqa.types import Document

EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower in Paris. It opened in 1889 as the "
          "entrance to the World's Fair. Gustave Eiffel's company designed and built it.")
HARVARD = ("Harvard University was founded in 1636 in Cambridge, Massachusetts. It is the oldest "
           "institution of higher learning in the United States.")
DOCS = [Document("e", "Eiffel Tower", "e.txt", EIFFEL), Document("h", "Harvard", "h.txt", HARVARD)]
ITEMS = [
    QAItem("q1", "When did the Eiffel Tower open as the entrance to the World's Fair?",
           ("1889",), "Eiffel", EIFFEL),
    QAItem("q2", "In which year was Harvard University founded in Cambridge?", ("1636",),
           "Harvard", HARVARD),
    QAItem("q3", "When did the Eiffel Tower close to the public forever?", (), "Eiffel", EIFFEL),
    QAItem("q4", "Which wrought-iron lattice tower stands in Paris?", ("Shard",), "Eiffel",
           EIFFEL),
]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Pipeline:
    index = tmp_path_factory.mktemp("idx") / "index"
    build_index_from_documents(DOCS, index, preset("tiny").retrieval, progress=False)
    return Pipeline.from_settings(Settings(preset="tiny", index=index))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generator_candidates_are_labelled_by_the_correctness_rule(tiny_pipeline, tmp_path):
    out = tmp_path / "data.jsonl"
    stats = generator_examples(tiny_pipeline, ITEMS, out, n=2, progress=False)
    assert (stats.questions, stats.skipped) == (4, 0)
    rows = _rows(out)
    cands = [r for r in rows if r.get("kind", "candidate") == "candidate"]
    golds = {it.id: it.answers for it in ITEMS}
    assert cands and all(r["label"] == int(bool(r["quote"]) and r["answer"] in r["quote"] and
                                           is_correct(r["answer"], golds[r["group"]],
                                                      quote_valid=True)) for r in cands)
    assert not any(r["label"] for r in cands if r["group"] in ("q3", "q4"))  # no right answer
    assert any(r["label"] for r in cands if r["group"] == "q1")  # the extractive model finds it
    for r in cands:  # the passage around the quote travels with it
        if r["quote"]:
            doc = EIFFEL if r["title"] == "Eiffel Tower" else HARVARD
            assert r["before"] + r["quote"] in doc and r["quote"] + r["after"] in doc
    for r in cands:  # what the generator said travels with the candidate
        sig = r["signals"]
        assert set(sig) == {"logprob", "mean_logprob", "n_tokens", "retrieval_score",
                            "retrieval_fused", "rm_score"}
        assert sig["retrieval_fused"] == 1.0  # the index is hybrid
        assert sig["n_tokens"] > 0 and sig["logprob"] <= 0
        assert sig["mean_logprob"] == pytest.approx(sig["logprob"] / sig["n_tokens"])
    markers = [r for r in rows if r.get("kind") == "question"]
    assert [m["qid"] for m in markers] == ["q1", "q2", "q3", "q4"]
    assert markers[0]["generator"]["model_id"] == "extractive"
    data = load_verifier_data(out)
    assert len(data.examples) == len(cands) and len(data.generators) == 1
    assert [e.signals for e in data.examples] == [r["signals"] for r in cands]


def test_generator_data_resumes_and_drops_an_interrupted_question(tiny_pipeline, tmp_path):
    out = tmp_path / "data.jsonl"
    generator_examples(tiny_pipeline, ITEMS[:2], out, n=1, progress=False)
    with out.open("a") as f:  # an interrupted third question: a candidate, a cut line, no marker
        f.write(json.dumps({"group": "q3", "question": "x", "answer": "a", "quote": "",
                            "label": 0, "source": "generator"}) + "\n{\"group\": \"q")
    stats = generator_examples(tiny_pipeline, ITEMS, out, n=1, progress=False)
    assert (stats.questions, stats.skipped) == (2, 2)
    rows = _rows(out)
    assert [r["qid"] for r in rows if r.get("kind") == "question"] == ["q1", "q2", "q3", "q4"]
    assert not any(r.get("question") == "x" for r in rows)


def test_a_question_the_pipeline_refuses_loses_only_its_own_candidates(tiny_pipeline,
                                                                        tmp_path):
    """An over-long question in a batch of 4 made every question of the batch lose its
    candidates, and all four were marked done (a resume never asked them again)."""
    from citeqa.config import MAX_QUESTION_CHARS

    long_q = QAItem("q_long", "why " * (MAX_QUESTION_CHARS // 4 + 1), ("1889",), "Eiffel", "")
    items = [ITEMS[0], ITEMS[1], long_q, ITEMS[3]]
    out = tmp_path / "data.jsonl"
    generator_examples(tiny_pipeline, items, out, n=2, batch=4, progress=False)
    rows = _rows(out)
    per_question = {r["qid"]: 0 for r in rows if r.get("kind") == "question"}
    for r in rows:
        if r.get("kind") != "question":
            per_question[str(r["group"])] += 1
    assert per_question == {"q1": 2, "q2": 2, "q_long": 0, ITEMS[3].id: 2}, per_question


def test_generator_data_never_rewrites_a_file_that_is_not_its_own(tiny_pipeline, tmp_path):
    """Resuming rewrites --out keeping only finished questions' lines: an --out naming the
    question file itself (or any JSONL) was wiped and refilled, exit 0; a directory crashed."""
    from citeqa.errors import ConfigError

    questions = tmp_path / "mine.jsonl"
    questions.write_text("".join(json.dumps({"id": it.id, "question": it.question,
                                             "answers": list(it.answers)}) + "\n"
                                 for it in ITEMS))
    before = questions.read_text()
    synthetic = tmp_path / "syn.jsonl"  # another builder's examples: no question markers
    synthetic.write_text(json.dumps({"group": "q1", "question": "x", "answer": "a", "quote": "",
                                     "label": 0, "source": "synthetic:span"}) + "\n")
    notes, blob = tmp_path / "notes.txt", tmp_path / "blob.gz"
    notes.write_text("my notes")  # one line that is not JSON: was taken for a cut last line
    blob.write_bytes(b"\x1f\x8b\x08\x00binary\xff\xfe")  # not UTF-8: was wiped as well
    for out in (questions, tmp_path / "list.jsonl", tmp_path / "folder", synthetic, notes, blob):
        if out.name == "list.jsonl":
            out.write_text("[1, 2]\n")
        elif out.name == "folder":
            out.mkdir()
        with pytest.raises(ConfigError, match=r"holds something other than|is not a file"):
            generator_examples(tiny_pipeline, ITEMS, out, n=1, progress=False)
    assert questions.read_text() == before
    assert (tmp_path / "list.jsonl").read_text() == "[1, 2]\n"
    assert "synthetic:span" in synthetic.read_text()
    assert notes.read_text() == "my notes" and blob.read_bytes().startswith(b"\x1f\x8b")


def test_generator_data_resumes_after_a_cut_inside_a_character(tiny_pipeline, tmp_path):
    """A write stopped inside a multi-byte character left a last line that is not UTF-8: the
    whole file was taken for someone else's and every finished question asked again."""
    out = tmp_path / "data.jsonl"
    generator_examples(tiny_pipeline, ITEMS[:2], out, n=1, progress=False)
    with out.open("ab") as f:
        f.write('{"group": "q3", "question": "café'.encode()[:-1])  # half of the é
    stats = generator_examples(tiny_pipeline, ITEMS, out, n=1, progress=False)
    assert (stats.questions, stats.skipped) == (2, 2)
    first = tmp_path / "first.jsonl"  # stopped inside its very first line
    first.write_bytes('{"group": "q1", "question": "caf\u00e9'.encode()[:-1])
    stats = generator_examples(tiny_pipeline, ITEMS[:1], first, n=1, progress=False)
    assert (stats.questions, stats.skipped) == (1, 0)


def test_generator_data_refuses_to_resume_with_other_settings(tiny_pipeline, tmp_path):
    """Resumed with -n 1 after -n 3, a file held questions of 3 candidates and of 1, silently."""
    from dataclasses import replace

    from citeqa.errors import ConfigError

    out = tmp_path / "data.jsonl"
    generator_examples(tiny_pipeline, ITEMS[:2], out, n=2, progress=False)
    before = out.read_text()
    with pytest.raises(ConfigError, match="another generator or settings .*n: was 2, now 1"):
        generator_examples(tiny_pipeline, ITEMS, out, n=1, progress=False)
    cfg = tiny_pipeline.cfg
    tiny_pipeline.cfg = replace(cfg, generation=replace(cfg.generation, temperature=1.3))
    try:
        with pytest.raises(ConfigError, match="generator: was"):
            generator_examples(tiny_pipeline, ITEMS, out, n=2, progress=False)
    finally:
        tiny_pipeline.cfg = cfg
    assert out.read_text() == before  # nothing written, nothing dropped
    # a file from before the markers recorded n resumes with any n
    out.write_text(before.replace(', "n": 2}', "}"))
    stats = generator_examples(tiny_pipeline, ITEMS, out, n=1, progress=False)
    assert (stats.questions, stats.skipped) == (2, 2)


def test_synthetic_pairs_hold_one_right_answer_and_hard_negatives():
    rng = random.Random(0)
    made = []
    for seed in range(20):  # the negatives are drawn at random: look at several draws
        rng = random.Random(seed)
        made += synthetic_examples(ITEMS[0], EIFFEL.index("1889"), "Eiffel Tower", [], rng)
    gold = [e for e in made if e.source == "synthetic:gold"]
    assert len(gold) == 20 and all(e.label == 1 and "1889" in e.judged.quote for e in gold)
    kinds = stats_of(made)
    assert {"synthetic:same_quote", "synthetic:other_sentence"} <= set(kinds)
    for e in made:
        assert e.judged.quote in EIFFEL and e.judged.before + e.judged.quote in EIFFEL
        assert e.golds == ("1889",) and e.group == "q1"
        assert e.label == int(e.judged.answer in e.judged.quote and is_correct(
            e.judged.answer, ("1889",), quote_valid=True))
    assert all(e.label == 0 for e in made if e.source == "synthetic:same_quote")
    unsupported = [e for e in made if e.source == "synthetic:unsupported"]
    assert unsupported and all(e.label == 0 and e.judged.answer == "1889" and "1889" not in
                               e.judged.quote for e in unsupported)
    unanswerable = synthetic_examples(ITEMS[2], None, "Eiffel Tower", [], rng, ["1889"])
    assert [(e.source, e.label, e.judged.answer) for e in unanswerable] == [
        ("synthetic:unanswerable", 0, "1889")]


def test_a_label_needs_a_right_answer_that_stands_in_its_quote():
    assert label("1889", "It opened in 1889 for the fair.", ("1889",)) == 1
    assert label("in  1889", "It opened in 1889 for the fair.", ("1889",)) == 1  # spaces
    assert label("1889", "It was built for the fair.", ("1889",)) == 0  # right, unsupported
    assert label("the fair", "It opened in 1889 for the fair.", ("1889",)) == 0  # supported
    assert label("1889", None, ("1889",)) == 0  # no verified quote
    assert label("1889", "It opened in 1889.", ()) == 0  # unanswerable


def test_redteam_examples_pair_a_made_unanswerable_with_the_original_answer():
    corpus = Corpus.build({EIFFEL: None, HARVARD: None})
    seeds = [Seed(ITEMS[0].question, EIFFEL, "1889", "q1"),
             Seed(ITEMS[1].question, HARVARD, "1636", "q2")]
    variants = make_variants(seeds, corpus, seed=0)
    made = list(redteam_examples(variants))
    assert made and all(e.label == 0 and e.golds == () for e in made)
    for e in made:
        assert e.judged.answer in e.judged.quote and e.source.startswith("redteam:")
        assert e.judged.question not in (ITEMS[0].question, ITEMS[1].question)


@pytest.mark.slow
def test_from_data_to_a_calibrated_verifier_the_pipeline_loads(tmp_path):
    """reward-data -> train reward (a tiny encoder as --base) -> calibrate -> serve it."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.retrieval.embed import minilm_dir
    from citeqa.reward.scorer import VerifierScorer

    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the packaged model is a test requirement
        pytest.skip(f"the packaged MiniLM tokenizer is not installed: {e}")
    base = tmp_path / "base"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    index = tmp_path / "index"
    build_index_from_documents(DOCS, index, preset("tiny").retrieval, progress=False)
    squad = {"version": "v2.0", "data": [{"title": "Eiffel", "paragraphs": [{
        "context": EIFFEL, "qas": [
            {"id": "q1", "question": ITEMS[0].question, "is_impossible": False,
             "answers": [{"text": "1889", "answer_start": EIFFEL.index("1889")}]},
            {"id": "q3", "question": ITEMS[2].question, "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "1889", "answer_start": EIFFEL.index("1889")}]},
        ]}]}, {"title": "Harvard", "paragraphs": [{"context": HARVARD, "qas": [
            {"id": "q2", "question": ITEMS[1].question, "is_impossible": False,
             "answers": [{"text": "1636", "answer_start": HARVARD.index("1636")}]}]}]}]}
    dataset = tmp_path / "squad.json"
    dataset.write_text(json.dumps(squad))
    runner = CliRunner()
    syn, gen, rm = tmp_path / "syn.jsonl", tmp_path / "gen.jsonl", tmp_path / "rm"
    r = runner.invoke(app, ["train", "reward-data", "--from", "synthetic", "--dataset",
                            str(dataset), "--index", str(index), "--out", str(syn),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["examples"] >= 3 and (tmp_path / "syn.jsonl.stats.json").is_file()
    r = runner.invoke(app, ["train", "reward-data", "--from", "generator", "--dataset",
                            str(dataset), "--index", str(index), "--out", str(gen),
                            "--preset", "bogus", "--no-progress"])
    assert r.exit_code == 2 and r.output.strip() == (
        "error: unknown preset 'bogus'; choose one of ['default', 'tiny']")
    generate = ["train", "reward-data", "--from", "generator", "--dataset", str(dataset),
                "--index", str(index), "--out", str(gen), "--preset", "tiny", "-n", "2",
                "--no-progress"]
    from citeqa.journal import file_lock

    with file_lock(gen, "citeqa train reward-data"):  # another run writing that file now
        r = runner.invoke(app, generate)
    assert r.exit_code == 2 and "another citeqa train reward-data is writing" in r.output
    r = runner.invoke(app, generate)
    assert r.exit_code == 0, r.output
    for made in (syn, gen):  # each example names its question's article (the checks read it)
        rows = [json.loads(line) for line in made.read_text().splitlines()]
        assert {r.get("article") for r in rows if r.get("kind") != "question"} == {
            "Eiffel", "Harvard"}, made
    r = runner.invoke(app, ["train", "reward", "--data", str(syn), "--data", str(gen),
                            "--out", str(rm), "--base", str(base), "--epochs", "2",
                            "--batch", "4", "--cpu-dtype", "fp32", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (rm / "config.json").is_file() and (rm / "heads.safetensors").is_file()
    card = (rm / "MODEL_CARD.md").read_text()  # it had none: the data's licence is said
    assert f"`{syn}`" in card and "CC BY-SA 4.0" in card and "reward model" in card
    assert "Articles (as the data's .stats.json records them): Eiffel, Harvard;" in card
    assert "made by `citeqa " in card  # (the command as run; here pytest's argv)
    rows = [json.loads(line) for line in syn.read_text().splitlines()]
    flipped = [{**r, "label": 1 - r["label"]} for r in rows]  # same counts, other data
    syn.write_text("".join(json.dumps(r) + "\n" for r in flipped))
    again = runner.invoke(app, ["train", "reward", "--data", str(syn), "--data", str(gen),
                                "--out", str(rm), "--base", str(base), "--epochs", "2",
                                "--batch", "4", "--cpu-dtype", "fp32", "--no-progress"])
    assert again.exit_code == 2 and "other settings or data" in again.output, again.output
    syn.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["calibrate", "--data", str(gen), "--reward", str(rm),
                            "--target", "0.5"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["n"] == 3
    assert "scoring" not in r.output  # no bar off a terminal, unless asked for
    r = runner.invoke(app, ["calibrate", "--data", str(gen), "--reward", str(rm),
                            "--target", "0.5", "--progress"])
    assert r.exit_code == 0 and "scoring: 100%" in r.output, r.output
    # a bad setting of the server's it does not use stops it no more (it read them all), and
    # a bad CITEQA_CPU_DTYPE, which it uses, is said in one line
    r = runner.invoke(app, ["calibrate", "--data", str(gen), "--reward", str(rm), "--target",
                            "0.5"], env={"CITEQA_MAX_QUEUE": "0", "CITEQA_CPU_DTYPE": "fp32"})
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["calibrate", "--data", str(gen), "--reward", str(rm), "--target",
                            "0.5"], env={"CITEQA_CPU_DTYPE": "int8"})
    assert r.exit_code == 2 and "CITEQA_CPU_DTYPE must be one of auto" in r.output, r.output
    for bad in (["--target", "0.5", "--targets", "0.4,0.5"], ["--targets", "0.4,x"],
                ["--targets", "0.4,1.5"], ["--targets", "0.6,0.995"], ["--targets", "nan"],
                ["--target", "0.5", "--min-coverage", "0.3"]):
        r = runner.invoke(app, ["calibrate", "--data", str(gen), "--reward", str(rm), *bad])
        assert r.exit_code != 0 and "--target" in r.output, r.output
    pipeline = Pipeline.from_settings(Settings(preset="tiny", index=index, reward=str(rm)))
    assert isinstance(pipeline.scorer, VerifierScorer) and pipeline.scorer.calibration
    answer = pipeline.ask(ITEMS[0].question, n_candidates=2)
    assert all(c.score is not None and 0 <= c.score <= 1 for c in answer.candidates)
    r = runner.invoke(app, ["train", "reward", "--data", str(tmp_path / "none.jsonl"),
                            "--out", str(tmp_path / "rm2"), "--base", str(base)])
    assert r.exit_code == 2 and "citeqa train reward-data" in r.output
    # a verifier directory as --base is trained further from its heads, not from fresh ones
    from safetensors.torch import load_file, save_file

    heads = load_file(str(rm / "heads.safetensors"))
    heads["b2"] = torch.full_like(heads["b2"], 5.0)  # no fresh head starts there
    save_file(heads, str(rm / "heads.safetensors"))
    r = runner.invoke(app, ["train", "reward", "--data", str(gen), "--out", str(tmp_path / "rm3"),
                            "--base", str(rm), "--epochs", "0.5", "--batch", "4",
                            "--cpu-dtype", "fp32", "--no-progress", "--members", "5",
                            "--save-every", "1"])
    assert r.exit_code == 0, r.output  # --members 5 against its 3: a RuntimeError at step 1
    with file_lock(tmp_path / "rm4", "citeqa train reward"):  # another run training into it
        r = runner.invoke(app, ["train", "reward", "--data", str(gen), "--out",
                                str(tmp_path / "rm4"), "--base", str(rm), "--epochs", "0.5"])
    assert r.exit_code == 2 and "another citeqa train reward is writing" in r.output
    after = load_file(str(tmp_path / "rm3" / "heads.safetensors"))
    assert after.keys() == heads.keys() and torch.allclose(after["b2"], heads["b2"], atol=0.1)


def test_training_data_of_the_eval_articles_is_refused(tmp_path):
    """reward-data without --split read every article, eval ones included; answerability
    --squad had no filter at all (its help said: never calibration or evaluation articles)."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    squad = tmp_path / "qa.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Imperialism",
        "paragraphs": [{"context": EIFFEL, "qas": [{"id": "q1", "question": "When?",
                        "is_impossible": False,
                        "answers": [{"text": "1889", "answer_start": EIFFEL.index("1889")}]}]}]}]}))
    for args in (["reward-data", "--from", "redteam", "--dataset", str(squad), "--out",
                  str(tmp_path / "rt.jsonl")],
                 ["answerability", "--squad", str(squad), "--out", str(tmp_path / "ans")]):
        r = CliRunner().invoke(app, ["train", *args])
        assert r.exit_code == 2 and "evaluation articles (Imperialism)" in r.output, r.output
    assert not (tmp_path / "rt.jsonl").exists() and not (tmp_path / "ans").exists()


def test_a_copy_of_reward_data_without_its_stats_is_still_checked(tmp_path):
    """Only the .stats.json beside the data named its articles: a copy (cp eval.jsonl x.jsonl)
    trained a model on the eval articles, and one of the train articles calibrated."""
    from typer.testing import CliRunner

    from citeqa.cli import app
    from citeqa.evals.squad import articles_for_split

    runner = CliRunner()
    squad = tmp_path / "qa.json"
    for split in ("train", "eval"):
        squad.write_text(json.dumps({"version": "v2.0", "data": [{"title": article,
            "paragraphs": [{"context": EIFFEL, "qas": [{"id": f"q{i}", "question": "When was "
                            "the tower finished?", "is_impossible": False, "answers": [
                                {"text": "1889", "answer_start": EIFFEL.index("1889")}]}]}]}
            for i, article in enumerate(articles_for_split(split))]}))
        articles = set(articles_for_split(split))
        if split == "train":
            made_from = tmp_path / "train-squad.json"
            made_from.write_text(squad.read_text())
        made = tmp_path / f"{split}.jsonl"
        r = runner.invoke(app, ["train", "reward-data", "--from", "redteam", "--dataset",
                                str(squad), "--out", str(made), "--split", split,
                                "--no-progress"])
        assert r.exit_code == 0, r.output
        copy, variants = tmp_path / f"copy-{split}.jsonl", tmp_path / f"copy-{split}.v.jsonl"
        copy.write_text(made.read_text())
        variants.write_text((tmp_path / f"{split}.jsonl.variants.jsonl").read_text())
        assert {json.loads(x)["article"] for x in copy.read_text().splitlines()} == articles
        if split == "eval":  # (answerability reads the train articles' paragraphs beside)
            for args in (["train", "reward", "--data", str(copy), "--out", str(tmp_path / "rm")],
                         ["train", "reward-combine", "--data", str(copy), "--reward",
                          str(tmp_path)],
                         ["train", "answerability", "--squad", str(made_from),
                          "--redteam", str(variants), "--out", str(tmp_path / "ans")]):
                r = runner.invoke(app, [*args, *(["--no-progress"] if "--out" in args else [])])
                assert r.exit_code == 2 and "evaluation articles (French" in r.output, (
                    args, r.output)
        else:
            r = runner.invoke(app, ["calibrate", "--data", str(copy), "--reward", str(tmp_path)])
            assert r.exit_code == 2 and "training or evaluation articles (1973" in r.output


def test_a_combination_is_not_fitted_on_questions_the_cross_encoders_trained_on(tmp_path):
    """Its help said so, but nothing checked: the combiner leant on scores that were surer
    than they are on unseen questions. The verifiers it was trained further from count too."""
    from citeqa.errors import ConfigError
    from citeqa.reward.checkpoint import HEADS
    from citeqa.reward.data import load_verifier_data
    from citeqa.training.reward_cli import _check_unseen, trained_questions

    def data(name: str, groups: list[str]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"group": g, "question": "Q?", "answer": "a",
                                            "quote": "a b", "label": 1}) + "\n" for g in groups))
        return path

    first, further = tmp_path / "rm-first", tmp_path / "rm-further"
    for folder, made, base in ((first, data("a.jsonl", ["q1", "rt:q2:negation"]), "encoder"),
                               (further, data("b.jsonl", ["q3"]), str(first))):
        folder.mkdir()
        (folder / HEADS).write_bytes(b"")
        (folder / "config.json").write_text(json.dumps({"training": {
            "data": [str(made), str(tmp_path / "gone.jsonl")], "base": base}}))
    assert trained_questions(further) == ({"q1", "q2", "q3"}, [str(tmp_path / "gone.jsonl")] * 2)
    # and the answerability reader beside it: its SQuAD file's questions, its variants' seeds
    # (it was not followed: a combination fitted on the reader's own questions was accepted)
    reader = further / "answerability"
    reader.mkdir()
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{
        "context": "a b", "qas": [{"id": "q7", "question": "Q?", "is_impossible": True,
                                   "answers": []}]}]}]}))
    variants = tmp_path / "made.variants.jsonl"
    variants.write_text(json.dumps({"question": "Q?", "kind": "negation", "seed_id": "q6"}) + "\n")
    (reader / "config.json").write_text(json.dumps({"training": {
        "data": [str(squad), str(variants)]}}))
    assert trained_questions(further)[0] == {"q1", "q2", "q3", "q6", "q7"}
    for groups in (["q9", "q2"], ["q9", "q1"], ["q3"], ["q6"], ["rt:q7:negation"]):
        with pytest.raises(ConfigError, match="1 question.* the verifier or answerability "
                                              "reader in .* was trained on"):
            _check_unseen(load_verifier_data(data("c.jsonl", groups)), further, "c.jsonl")
    _check_unseen(load_verifier_data(data("d.jsonl", ["q9", "q8"])), further, "d.jsonl")
    from typer.testing import CliRunner

    from citeqa.cli import app

    r = CliRunner().invoke(app, ["train", "reward-combine", "--data", str(data("e.jsonl", ["q1"])),
                                 "--reward", str(further)])
    assert r.exit_code == 2 and "was trained on (e.g. q1)" in r.output, r.output


def test_generator_data_made_before_model_id_digests_resumes_with_the_same_folder(tmp_path):
    """A local folder's model id now carries a digest of its weights: data whose markers name
    the folder alone was refused as another generator's."""
    from citeqa.errors import ConfigError
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "gen.jsonl"
    old = {"model_id": "qwen+lora-ab12", "prompt_sha256": "cc72"}
    out.write_text(json.dumps({"qid": "a", "kind": "question", "generator": old, "n": 2}) + "\n")
    assert _done_qids(out, {"generator": {**old, "model_id": "qwen@1a2b3c4d+lora-ab12"},
                            "n": 2}) == {"a"}
    for other in ("mistral@1a2b3c4d+lora-ab12", "qwen@1a2b3c4d"):
        with pytest.raises(ConfigError, match="another generator"):
            _done_qids(out, {"generator": {**old, "model_id": other}, "n": 2})


def test_generator_data_resumes_in_another_cpu_number_format(tmp_path):
    """``auto`` picks bf16 or fp16w by a timed probe, which a busy machine sways: data begun in
    one format was refused as another generator's when resumed in the other (the docs say the
    format of the same weights is not another generator)."""
    from citeqa.errors import ConfigError
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "gen.jsonl"
    made = {"model_id": "smollm2+lora-ab12+fp16-linear", "prompt_sha256": "cc72"}
    out.write_text(json.dumps({"qid": "a", "kind": "question", "generator": made, "n": 1}) + "\n")
    for now in ("smollm2+lora-ab12+bf16-int8w", "smollm2+lora-ab12"):
        assert _done_qids(out, {"generator": {**made, "model_id": now}, "n": 1}) == {"a"}
    with pytest.raises(ConfigError, match="another generator"):
        _done_qids(out, {"generator": {**made, "model_id": "smollm2+lora-ffff+bf16-int8w"},
                         "n": 1})


def test_redteam_data_without_paragraphs_is_refused_not_an_empty_file(tmp_path):
    """JSONL questions without a 'context' made 0 seeds: exit 0 and an empty data file."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "Who?", "answers": ["Rollo"]}) + "\n")
    out = tmp_path / "rt.jsonl"
    r = CliRunner().invoke(app, ["train", "reward-data", "--dataset", str(data), "--from",
                                 "redteam", "--out", str(out), "--no-progress"])
    assert r.exit_code == 2 and "no answerable question with its paragraph" in r.stderr
    assert not out.exists()


def test_plausible_answers_are_read_by_content_whatever_the_file_is_named(tmp_path: Path) -> None:
    """Only a file named *.json gave its unanswerables' plausible answers: the same SQuAD 2.0
    file as .squad2, .JSON or .json.gz made random-span negatives instead."""
    import gzip

    from citeqa.training.verifier_data import plausible_answers

    squad = json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [{
        "context": "Rollo led the Normans.", "qas": [
            {"id": "u1", "question": "Who led the Danes?", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "Rollo", "answer_start": 0}]}]}]}]})
    for name, data in (("a.json", squad.encode()), ("a.squad2", squad.encode()),
                       ("a.JSON", squad.encode()), ("a.json.gz", gzip.compress(squad.encode()))):
        (tmp_path / name).write_bytes(data)
        assert plausible_answers(tmp_path / name) == {"u1": ["Rollo"]}, name
    (tmp_path / "q.jsonl").write_text('{"id": "a", "question": "Q?", "answers": []}\n'
                                      '{"id": "b", "question": "Q?", "answers": []}\n')
    assert plausible_answers(tmp_path / "q.jsonl") == {}


def test_reward_data_of_held_out_articles_is_refused_for_training_and_calibration(
        tmp_path: Path) -> None:
    """`train reward`, `train answerability --redteam` and `train reward-combine` checked
    nothing: data made with --split eval trained a model; `calibrate` checked only generator
    data's question markers, so synthetic or red-team data of any split calibrated."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    line = json.dumps({"group": "g", "question": "Q?", "answer": "a", "quote": "a b",
                       "label": 1, "title": "T"}) + "\n"
    runner = CliRunner()
    for split, articles in (("eval", ["Imperialism"]), ("calibration", ["Packet switching"])):
        data = tmp_path / f"{split}.jsonl"
        data.write_text(line * 4)
        (tmp_path / f"{split}.jsonl.stats.json").write_text(json.dumps(
            {"split": split, "articles": articles}))
        r = runner.invoke(app, ["train", "reward", "--data", str(data), "--out",
                                str(tmp_path / f"rm-{split}"), "--no-progress"])
        assert r.exit_code == 2 and "calibration or evaluation articles" in r.output, r.output
        assert not (tmp_path / f"rm-{split}").exists()
        r = runner.invoke(app, ["train", "reward-combine", "--data", str(data), "--reward",
                                str(tmp_path / "any")])
        assert r.exit_code == 2 and "calibration or evaluation articles" in r.output, r.output
    variants = tmp_path / "rt.jsonl.variants.jsonl"
    variants.write_text("")
    (tmp_path / "rt.jsonl.stats.json").write_text(json.dumps({"articles": ["Imperialism"]}))
    from citeqa.reward.data import VerifierData
    from citeqa.training.reward_cli import _check_trainable, data_articles

    assert data_articles([], [variants]) == ["Imperialism"]
    with pytest.raises(Exception, match="calibration or evaluation articles"):
        _check_trainable(VerifierData(), [variants])
    train = tmp_path / "train.jsonl"
    train.write_text(line * 4)
    (tmp_path / "train.jsonl.stats.json").write_text(json.dumps({"articles": ["Normans"]}))
    r = runner.invoke(app, ["calibrate", "--data", str(train), "--reward", str(tmp_path)])
    assert r.exit_code == 2 and "training or evaluation articles (Normans)" in r.output, r.output


def test_train_reward_max_tokens_must_be_a_multiple_of_the_padding(tmp_path: Path) -> None:
    """Any other --max-tokens (the CLI took 32-512) failed at the first step: the tokenizer
    refuses a cut that padding to a multiple of 16 would pass."""
    from typer.testing import CliRunner

    from citeqa.cli import app

    r = CliRunner().invoke(app, ["train", "reward", "--data", str(tmp_path / "x.jsonl"),
                                 "--out", str(tmp_path / "rm"), "--max-tokens", "200"])
    assert r.exit_code == 2 and "must be a multiple of 16, not 200 (e.g. 192)" in r.output


def test_reward_data_resumed_records_every_article_its_file_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--from generator adds to its --out, but its record named only the last run's articles
    (written at the end): calibration data with train data added after it passed the held-out
    checks of `train reward`; a run killed mid-way left rows and no record at all."""
    from typer.testing import CliRunner

    import citeqa.training.cli as training_cli
    from citeqa.cli import app
    from citeqa.training.cards import data_stats

    def article(title: str, n: int) -> dict:
        return {"title": title, "paragraphs": [{
            "context": f"{title} text {i}. Rollo led the Normans in {911 + i}.",
            "qas": [{"id": f"{title}-{i}", "question": f"When did Rollo lead ({i})?",
                     "answers": [{"text": str(911 + i), "answer_start": 0}],
                     "is_impossible": False}]} for i in range(n)]}

    squad = tmp_path / "squad.json"
    from citeqa.evals.squad import CALIBRATION_ARTICLES, TRAIN_ARTICLES

    squad.write_text(json.dumps({"version": "v2.0", "data": [
        article(title, 1) for title in (*TRAIN_ARTICLES, *CALIBRATION_ARTICLES)]}))
    index = tmp_path / "index"
    runner = CliRunner()
    assert runner.invoke(app, ["index", "build", str(squad), "--out", str(index), "--preset",
                               "tiny", "--no-progress"]).exit_code == 0
    out = tmp_path / "rd.jsonl"

    def reward_data(*extra: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, ["train", "reward-data", "--dataset", str(squad), "-o",
                                   str(out), "-i", str(index), "--preset", "tiny", "-n", "1",
                                   "--no-progress", *extra])

    def killed(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt  # before its first question: a kill leaves no summary

    with monkeypatch.context() as m:
        m.setattr(training_cli, "_generator_data", killed)
        r = reward_data("--split", "train", "--limit", "1")
        assert r.exit_code == 130, r.output
    first = data_stats(out)["articles"]
    assert data_stats(out)["split"] == "train" and len(first) == 1  # recorded before the work
    r = reward_data("--split", "train", "--limit", "1")
    assert r.exit_code == 0, r.output
    r = reward_data("--split", "train")  # resumed: the other train articles added
    assert r.exit_code == 0, r.output
    assert data_stats(out)["articles"] == sorted(TRAIN_ARTICLES)
    r = reward_data("--split", "calibration")  # mixing would hide held-out articles
    assert r.exit_code == 2 and "holds reward data of --split train" in r.output, r.output
    assert data_stats(out)["articles"] == sorted(TRAIN_ARTICLES)


def test_a_resumed_record_joins_training_splits_and_keeps_held_out_ones_apart(
        tmp_path: Path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.training.cli import _resumed_record

    out = tmp_path / "rd.jsonl"
    record = {"command": "c", "split": "all", "articles": ["Other"]}
    assert _resumed_record(out, record) == record  # nothing there yet
    out.write_text('{"kind": "question"}\n')
    (tmp_path / "rd.jsonl.stats.json").write_text(json.dumps(
        {"split": "train", "articles": ["Normans"]}))
    assert _resumed_record(out, record) == {"command": "c", "split": "all",
                                            "articles": ["Normans", "Other"]}
    for held_out in ("calibration", "eval"):
        with pytest.raises(ConfigError, match="would mix held-out and training articles"):
            _resumed_record(out, {**record, "split": held_out})
