"""The answerability reader: its training data (labels, views, pairs), the model's directory
round trip and resumed training on a tiny random encoder, and its place in the combination and
the scorer (no download)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from citeqa.compute import PAD_MULTIPLE
from citeqa.errors import ModelError
from citeqa.evals.squad import QAItem
from citeqa.redteam.maker import Variant
from citeqa.reward.answerability import (
    SUBDIR,
    Answerability,
    AnswerabilityReader,
    encode,
    load_answerability,
    render,
    save_answerability,
)
from citeqa.reward.answerability_train import AnswerabilityConfig, plan, train_answerability
from citeqa.reward.checkpoint import save_verifier
from citeqa.reward.combine import (
    ANSWERABILITY,
    INPUTS,
    WITH_ANSWERABILITY,
    Signals,
    features,
    fit,
    read_combiner,
    write_combiner,
)
from citeqa.reward.scorer import VerifierScorer
from citeqa.reward.verifier import Judged, Verifier
from citeqa.training.answerability_data import (
    Labelled,
    redteam_examples,
    sample_lines,
    squad_examples,
    view,
)

CONTEXT = ("The Normans were the people who gave their name to Normandy, a region in France. "
           "They descended from Norse raiders and pirates from Denmark, Iceland and Norway. "
           "Their leader Rollo swore fealty to King Charles III of West Francia in 911. "
           "The distinct cultural and ethnic identity of the Normans emerged in the first half "
           "of the 10th century, and it continued to evolve over the succeeding centuries.")


def test_a_view_is_the_quote_sentence_with_its_surroundings() -> None:
    at = CONTEXT.index("Rollo")
    v = view("Who led?", CONTEXT, "Normans", at, at + 5)
    assert "Rollo" in v.quote and v.answer == "" and v.title == "Normans"
    assert CONTEXT.index(v.quote) > 0 and CONTEXT[:CONTEXT.index(v.quote)].endswith(v.before)
    assert CONTEXT[CONTEXT.index(v.quote) + len(v.quote):].startswith(v.after)


def test_squad_questions_are_labelled_by_answerability_and_centred_on_their_answers() -> None:
    items = [QAItem("a", "Who swore fealty?", ("Rollo",), "Normans", CONTEXT),
             QAItem("u", "Who swore fealty to Rollo?", (), "Normans", CONTEXT),
             QAItem("n", "Who?", (), "Normans", CONTEXT),  # no plausible answer: the middle
             QAItem("x", "No paragraph?", ("x",), "Normans", ""),  # skipped
             # a gold answer that normalises to nothing still answers ("$" was labelled 0)
             QAItem("d", "Which symbol?", ("$",), "Normans", CONTEXT + " It cost $5.")]
    out = list(squad_examples(items, {"u": ["Charles III"]}))
    assert [(e.label, e.source) for e in out] == [
        (1, "squad2:answerable"), (0, "squad2:unanswerable"), (0, "squad2:unanswerable"),
        (1, "squad2:answerable")]
    assert "$5" in out[3].judged.quote
    assert "Rollo" in out[0].judged.quote and "Charles III" in out[1].judged.quote
    # the middle, as said: it was the paragraph's start (an empty span fits no quote)
    middle = CONTEXT.index(out[2].judged.quote)
    assert middle > 0 and middle <= len(CONTEXT) // 2 < middle + len(out[2].judged.quote)
    assert out[2].judged.before
    assert out[0].judged.question == "Who swore fealty?" and out[0].judged.title == "Normans"


# "Dublin" twice, far apart: the question is about the second mention
TWICE = ("Dublin was home to many refugees, and their churches stood in Dublin, Cork and "
         "Youghal in the 17th century. " + "Trade grew along the rivers and the coast. " * 12
         + "Today D'Olier Street in Dublin recalls a Huguenot family of goldsmiths.")
SECOND = TWICE.index("in Dublin recalls") + 3


def test_a_squad_question_is_centred_where_the_file_puts_its_answer() -> None:
    """The answer's first occurrence was taken: 55 of qa.json's answerable questions were
    shown around another mention, 17 of them on a view that cannot answer them, labelled 1."""
    items = [QAItem("a", "Where is D'Olier Street?", ("Dublin",), "Huguenot", TWICE),
             QAItem("u", "Where is D'Olier Lane?", (), "Huguenot", TWICE),
             QAItem("w", "Where is D'Olier Street?", ("Dublin",), "Huguenot", TWICE)]
    starts = {"a": {"Dublin": SECOND}, "u": {"Dublin": SECOND},
              "w": {"Dublin": SECOND + 1}}  # not where the file says: its first occurrence
    answered, unanswered, wrong = squad_examples(items, {"u": ["Dublin"]}, starts)
    for ex in (answered, unanswered):
        assert "D'Olier Street" in ex.judged.quote, ex.judged.quote
    assert "D'Olier" not in wrong.judged.quote + wrong.judged.after
    assert [ex.label for ex in (answered, unanswered, wrong)] == [1, 0, 1]
    first = list(squad_examples(items[:1], {}))[0]  # without starts: the first occurrence
    assert "D'Olier" not in first.judged.quote


def test_answerability_examples_read_each_answers_start_from_the_file(tmp_path: Path) -> None:
    from citeqa.training.reward_cli import answerability_examples

    qas = [{"id": "a", "question": "Where is D'Olier Street?", "is_impossible": False,
            "answers": [{"text": "Dublin", "answer_start": SECOND}]},
           {"id": "u", "question": "Where is D'Olier Lane?", "is_impossible": True, "answers": [],
            "plausible_answers": [{"text": "Dublin", "answer_start": SECOND}]}]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": [
        {"title": "Dublin_streets", "paragraphs": [{"context": TWICE, "qas": qas}]}]}))
    examples = answerability_examples([squad], None, 0, seed=0)
    assert sorted(ex.label for ex in examples) == [0, 1]
    assert all("D'Olier Street" in ex.judged.quote for ex in examples)


@pytest.mark.parametrize("field, value", [("article", None), ("passage", None),
                                          ("question", 3), ("answerable", "no"),
                                          ("answers", [None]), ("answer", 1.5)])
def test_a_variants_file_with_a_wrongly_typed_field_is_a_source_error(
        tmp_path: Path, field: str, value: object) -> None:
    """A null article or passage was a TypeError / AttributeError traceback."""
    from citeqa.errors import SourceError
    from citeqa.training.reward_cli import answerability_examples

    record = {**variant("negation", False).to_json(), field: value}
    (tmp_path / "v.variants.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SourceError, match=f"not a red-team variants file .*'{field}' is "):
        answerability_examples([], tmp_path / "v.variants.jsonl", 5, seed=0)
    assert Variant.from_json(variant("negation", False).to_json()) == variant("negation", False)
    with pytest.raises(ValueError, match="not an object"):
        Variant.from_json([1])


def variant(kind: str, answerable: bool, answer: str | None = "Rollo") -> Variant:
    return Variant(f"{kind} question", kind, answerable, "Who swore fealty to Charles III?",
                   answer, CONTEXT, "x -> y", "s1", article="Norman_conquest")


def test_red_team_variants_stand_beside_their_originals_on_the_same_view() -> None:
    out = list(redteam_examples([variant("negation", False), variant("paraphrase", True),
                                 variant("entity_swap", False, "Paris")]))  # not in the text
    assert [(e.label, e.source) for e in out] == [
        (0, "redteam:negation"), (1, "redteam:original"), (1, "redteam:paraphrase")]
    made, original = out[0].judged, out[1].judged
    assert (made.quote, made.before, made.after) == (original.quote, original.before,
                                                     original.after)
    assert original.question == "Who swore fealty to Charles III?"
    # titled as its served document is (the reader learnt them untitled, and served passages
    # always come with their document's title)
    assert made.title == original.title == "Norman conquest"


def test_sample_lines_is_seeded_uniform_and_keeps_file_order(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(1000)) + "\n")
    a, b = sample_lines(path, 50, 1), sample_lines(path, 50, 1)
    assert a == b and len(a) == 50 and [int(x) for x in a] == sorted(int(x) for x in a)
    assert a != sample_lines(path, 50, 2)
    assert len(sample_lines(path, 5000, 0)) == 1000
    assert np.mean([int(x) for x in sample_lines(path, 400, 3)]) == pytest.approx(500, abs=60)
    # blank lines are no draws: counted, they made later lines less likely
    path.write_text("".join(f"{i}\n" + "\n" * 20 * (i < 500) for i in range(1000)))
    drawn = [int(x) for seed in range(5) for x in sample_lines(path, 400, seed)]
    assert np.mean(drawn) == pytest.approx(500, abs=30)


def test_the_reader_never_sees_the_answer() -> None:
    q, passage = render(Judged("Who led?", "SECRET", "Rollo led.", "Normans", "Before.", "After."))
    assert q == "Who led?" and passage == "Normans: Before. Rollo led. After."
    assert "SECRET" not in passage


def test_inputs_are_padded_to_a_multiple_that_changes_no_logit(tiny_encoder, tokenizer) -> None:
    model = Answerability(tiny_encoder(len(tokenizer))).eval()
    short = Judged("Who led?", "", "Rollo led.", "Normans")
    longer = Judged("Who swore fealty to King Charles III of West Francia?", "", CONTEXT, "Normans")
    natural = len(tokenizer(*render(short))["input_ids"])
    assert natural % PAD_MULTIPLE  # so the padding below is the multiple's doing
    alone, batched = encode(tokenizer, [short]), encode(tokenizer, [short, longer])
    assert alone["input_ids"].shape[1] == -(-natural // PAD_MULTIPLE) * PAD_MULTIPLE
    assert batched["input_ids"].shape[1] % PAD_MULTIPLE == 0
    assert batched["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(alone)[0], model(batched)[0], atol=1e-5, rtol=0)


def toy(n: int = 48) -> list[Labelled]:
    """Answerable iff the question is about Rollo: learnable from the question alone."""
    at = CONTEXT.index("Rollo")
    out = []
    for i in range(n):
        q = "Who was Rollo?" if i % 2 else "Who was Napoleon?"
        out.append(Labelled(view(q, CONTEXT, "Normans", at, at + 5), i % 2, "test"))
    return out


def config_step(directory: Path) -> int:
    """The step a training saved in ``directory`` (with its weights, in config.json)."""
    return json.loads((directory / "config.json").read_text())["progress"]["step"]


def test_training_learns_saves_resumes_and_reloads(tiny_encoder, tokenizer,
                                                   tmp_path: Path) -> None:
    examples = toy()
    cfg = AnswerabilityConfig(epochs=6, batch=8, lr=1e-3, head_lr=1e-2, warmup_steps=1,
                              save_every=10, cpu_dtype="fp32")
    assert len(plan(examples, cfg)) == 36 and len(plan(examples, AnswerabilityConfig(
        epochs=0.5, batch=8))) == 3
    model = Answerability(tiny_encoder(len(tokenizer)))
    record = train_answerability(model, tokenizer, examples, cfg, out=tmp_path / "a",
                                 extra={"examples": len(examples)}, progress=False)
    assert record["steps"] == 36 and record["examples"] == 48
    short = train_answerability(Answerability(tiny_encoder(len(tokenizer))), tokenizer,
                                examples, replace(cfg, epochs=0.5, max_tokens=96),
                                out=tmp_path / "short", progress=False)
    assert short["steps"] == 3  # served at the length it was trained at (it was 224 always)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["max_tokens"] == 96
    assert config_step(tmp_path / "a") == 36
    loaded, tok, config = load_answerability(tmp_path / "a")
    assert config["kind"] == "answerability" and config["training"]["steps"] == 36
    with torch.inference_mode():
        logits = loaded(encode(tok, [e.judged for e in examples[:8]]))
    assert (logits[1::2].min() > logits[0::2].max()).item()  # Rollo above Napoleon
    again = train_answerability(loaded, tok, examples, cfg, out=tmp_path / "a",
                                extra={"examples": len(examples)}, progress=False)
    # finished: a rerun trains no step again, and reports the training (it reported nulls)
    assert again == {**config["training"], "seconds_this_run": 0.0}
    assert again["loss_first"] == record["loss_first"]
    assert again["steps_timed"] == 36 and again["seconds_per_step"] is not None
    with pytest.raises(ValueError, match="both labels"):
        train_answerability(loaded, tok, [e for e in examples if e.label], cfg, progress=False)


def test_a_resumed_training_reports_every_step_it_took(tiny_encoder, tokenizer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run reported its own first step's loss as the training's, and its own time per
    step only."""
    examples = toy()
    cfg = AnswerabilityConfig(epochs=6, batch=8, lr=1e-3, head_lr=1e-2, warmup_steps=1,
                              save_every=10, cpu_dtype="fp32")
    whole = train_answerability(Answerability(tiny_encoder(len(tokenizer))), tokenizer,
                                examples, cfg, out=tmp_path / "whole", progress=False)
    clip, steps = torch.nn.utils.clip_grad_norm_, []

    def interrupted_at_25(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 25:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupted_at_25)
    with pytest.raises(KeyboardInterrupt):
        train_answerability(Answerability(tiny_encoder(len(tokenizer))), tokenizer, examples,
                            cfg, out=tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert config_step(tmp_path / "cut") == 20
    loaded, tok, _ = load_answerability(tmp_path / "cut")
    resumed = train_answerability(loaded, tok, examples, cfg, out=tmp_path / "cut",
                                  progress=False)
    assert resumed["steps"] == 36 and resumed["steps_timed"] == 20 + 16
    assert resumed["loss_first"] == pytest.approx(whole["loss_first"])  # step 1's, not 21's
    assert resumed["seconds_all_runs"] > resumed["seconds_this_run"] > 0
    assert len(resumed["last_losses"]) == 36  # (at most 50 kept)


def test_a_missing_or_foreign_reader_says_what_to_do(tiny_encoder, tokenizer,
                                                     tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="citeqa train answerability"):
        load_answerability(tmp_path / "none")
    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    with pytest.raises(ModelError, match="not an answerability reader"):
        load_answerability(tmp_path / "rm")


def test_the_combination_takes_the_reader_as_a_fifth_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 600
    answerable = rng.random(n) < 0.5
    a = np.where(answerable, 1.0, -1.0) + rng.normal(0, 1, n)
    p = rng.uniform(0.05, 0.95, n)
    y = (answerable & (rng.random(n) < p)).astype(int)  # right needs an answerable question
    sig = [Signals(-0.1, 10, 0.2)] * n
    x4, x5 = features(p, sig), features(p, sig, a)
    assert x4.shape == (n, 4) and x5.shape == (n, 5) and np.allclose(x5[:, 4], a)
    c4, c5 = fit(x4, y), fit(x5, y)
    assert c4.inputs == INPUTS and c5.inputs == WITH_ANSWERABILITY and c5.uses_answerability
    assert c5.weights[4] > 0
    write_combiner(tmp_path, c5)
    assert read_combiner(tmp_path) == c5
    assert json.loads((tmp_path / "combine.json").read_text())["inputs"][-1] == ANSWERABILITY


def test_the_scorer_uses_the_reader_its_combination_names(tiny_encoder, tokenizer,
                                                          tmp_path: Path) -> None:
    rm = tmp_path / "rm"
    save_verifier(rm, Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    at = CONTEXT.index("Rollo")
    v = view("Who was Rollo?", CONTEXT, "Normans", at, at + 5)
    items = [Judged(v.question, "Rollo", v.quote, v.title, v.before, v.after),
             Judged("Who was Napoleon?", "Rollo", v.quote, v.title, v.before, v.after),
             Judged("Who?", "", "")]  # no quote: 0, and the reader is not asked
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(size=(40, 4)), rng.normal(size=40)]
    write_combiner(rm, fit(x, (x[:, 4] > 0).astype(int)))  # only the reader matters
    with pytest.raises(ModelError, match="answerability is missing"):
        VerifierScorer(rm, cpu_dtype="fp32")
    save_answerability(rm / SUBDIR, Answerability(tiny_encoder(len(tokenizer))), tokenizer, {})
    scorer = VerifierScorer(rm, cpu_dtype="fp32")
    assert scorer.answerability is not None and "answerability" in scorer.name
    sig = [Signals(-0.1, 10, 0.2)] * 3
    scores, _ = scorer.judge(items, sig)
    logits = AnswerabilityReader(rm / SUBDIR, cpu_dtype="fp32").logits(items[:2])
    assert scores[2] == 0.0 and logits[0] != logits[1]
    assert (scores[0] > scores[1]) == (logits[0] > logits[1])  # the reader decides here


def test_training_never_writes_over_a_model_it_is_not_resuming(tmp_path: Path) -> None:
    """`train answerability --out my-rm`, my-rm the copy of the shipped reward model that
    docs/calibrate.md has users make, trained a reader over its verifier (config.json,
    encoder/, heads.safetensors replaced; combine.json and calibration.json left beside it)."""
    import shutil

    from citeqa.errors import ConfigError
    from citeqa.reward.scorer import DEFAULT_DIR
    from citeqa.training.reward_cli import answerability_to_dir, train_to_dir

    shipped = tmp_path / "my-rm"
    shutil.copytree(DEFAULT_DIR, shipped)
    before = {p: p.read_bytes() for p in shipped.rglob("*") if p.is_file()}
    nothing = tmp_path / "never-read.json"  # refused before any data is read
    for out in (shipped, shipped / "answerability"):
        with pytest.raises(ConfigError, match="holds a model that is not a training of an "
                                              "answerability reader to resume"):
            answerability_to_dir([nothing], out, redteam=None, redteam_variants=0,
                                 progress=False)
        with pytest.raises(ConfigError, match="not a training of a verifier"):
            train_to_dir([nothing], out, progress=False)
    assert {p: p.read_bytes() for p in shipped.rglob("*") if p.is_file()} == before


def test_a_model_whose_training_stopped_short_is_not_served(tiny_encoder, tokenizer,
                                                              tmp_path: Path) -> None:
    """A `train reward` killed after a save left a verifier trained 3 steps of 33 where the
    finished one goes, and `ask` served it without a word (the answerability reader's run,
    trained into a live reward directory as the README says, saves so too)."""
    rm = tmp_path / "rm"
    stopped = {"training": {"steps": 3, "total_steps": 33}}
    save_verifier(rm, Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, stopped)
    with pytest.raises(ModelError, match=r"stopped at step 3 of 33 .*`citeqa train reward`"):
        VerifierScorer(rm, cpu_dtype="fp32", combined=False)
    save_verifier(rm, Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer,
                  {"training": {"steps": 33, "total_steps": 33}})
    VerifierScorer(rm, cpu_dtype="fp32", combined=False)  # finished: served
    reader = rm / SUBDIR
    save_answerability(reader, Answerability(tiny_encoder(len(tokenizer))), tokenizer, stopped)
    with pytest.raises(ModelError, match=r"answerability reader .* step 3 of 33 .*answerab"):
        AnswerabilityReader(reader, cpu_dtype="fp32")
    save_answerability(reader, Answerability(tiny_encoder(len(tokenizer))), tokenizer, {})
    AnswerabilityReader(reader, cpu_dtype="fp32")  # no record (an older citeqa's): served
