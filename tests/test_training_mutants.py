"""Mutation-testing round on the training data builders: behaviour the other tests left open
(view fallbacks, anchors, sampling odds, demonstration checks, resume and held-out guards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from citeqa.evals.squad import QAItem
from citeqa.training.answerability_data import sample_lines, squad_examples, view
from citeqa.training.verifier_data import MAX_QUOTE

S1 = ("The Normans were the people who gave their name to Normandy, a region in northern France "
      "that they held for many generations after the raids ended there.")
S2 = ("Their leader Rollo swore fealty to King Charles III of West Francia in the year 911, and "
      "his descendants ruled the duchy for a long time after that day.")
TWO = S1 + " " + S2  # its middle character is the space between the two sentences


# --- answerability data ------------------------------------------------------------------------


def test_a_view_without_a_quote_is_the_texts_first_max_quote_characters() -> None:
    v = view("Who?", TWO, "Normans", 0, 0)  # an empty span fits no quote
    assert v.quote == TWO[:MAX_QUOTE] and v.before == ""


def test_an_unanswerable_without_anchor_is_centred_on_the_first_word_after_the_middle() -> None:
    assert TWO[len(TWO) // 2] == " "
    item = QAItem("u1", "Who led the Danes?", (), "Normans", TWO)
    [ex] = squad_examples([item], {})
    assert ex.label == 0 and ex.judged.quote == S2  # not the fallback: the text's start


def test_a_squad_view_is_titled_with_spaces_for_underscores() -> None:
    item = QAItem("a1", "Who swore fealty?", ("Rollo",), "Duchy_of_Normandy", TWO)
    [ex] = squad_examples([item], {})
    assert ex.judged.title == "Duchy of Normandy" and ex.label == 1


def test_sample_lines_gives_each_line_its_chance(tmp_path: Path) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_text("first\nsecond\n")
    picks = [sample_lines(path, 1, seed) for seed in range(60)]
    firsts = sum(p == ["first\n"] for p in picks)
    assert 10 <= firsts <= 50, firsts  # about half: neither line always wins


# --- demonstrations ----------------------------------------------------------------------------


def _demo_json(gold: object) -> dict:
    return {"id": "q1", "question": "Who swore fealty?",
            "passages": [{"title": "A", "text": S1, "doc_id": "a", "start": 0},
                         {"title": "B", "text": S2, "doc_id": "b", "start": 0}],
            "gold": gold, "answer": "Rollo", "quote": S2[:60]}


@pytest.mark.parametrize("gold", [-1, True])
def test_a_gold_that_only_python_would_index_is_refused(tmp_path: Path, gold: object) -> None:
    """-1 and true both pick passage 1, which holds the quote: only the index check refuses."""
    from citeqa.errors import SourceError
    from citeqa.training.demos import Demo, read_demos

    assert Demo.from_json(_demo_json(1)).gold == 1
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_demo_json(gold)) + "\n")
    with pytest.raises(SourceError, match="d.jsonl:1: bad demonstration"):
        read_demos(path)


def test_blank_lines_between_demonstrations_are_skipped(tmp_path: Path) -> None:
    from citeqa.training.demos import read_demos

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_demo_json(1)) + "\n\n  \n" + json.dumps(_demo_json(1)) + "\n")
    assert len(read_demos(path)) == 2


def test_an_answer_of_exactly_max_chars_has_its_quote() -> None:
    from citeqa.training.demos import quote_span

    assert quote_span(S2, 0, len(S2), min_chars=20, max_chars=len(S2)) == (0, len(S2))
    assert quote_span(S2, 0, len(S2), min_chars=20, max_chars=len(S2) - 1) is None


def _hit(i: int, doc: str, text: str, start: int = 0, title: str = "T"):
    from citeqa.types import Hit, Passage

    return Hit(Passage(i, doc, start, start + len(text), text), title, "", 0.0)


OTHERS = [f"Paragraph {n} tells of the harbour, the ships and the winter storms of year {n}."
          for n in range(5)]


def test_a_missed_gold_passage_takes_a_seeded_place_not_always_the_first() -> None:
    from citeqa.config import GenerationConfig
    from citeqa.training.demos import make_demo

    gold_hit = _hit(9, "gold", S2)
    hits = [_hit(i, f"d{i}", t) for i, t in enumerate(OTHERS)]
    places = set()
    for n in range(12):
        item = QAItem(f"q{n}", "Who swore fealty?", ("Rollo",), "Normans", S2)
        demo, why = make_demo(item, S2.index("Rollo"), hits, gold_hit, GenerationConfig(),
                              top_k=3)
        assert demo is not None, why
        assert len(demo.passages) == 3 and demo.passages[demo.gold].doc_id == "gold"
        again, _ = make_demo(item, S2.index("Rollo"), hits, gold_hit, GenerationConfig(), top_k=3)
        assert again == demo  # seeded by the question
        places.add(demo.gold)
    assert len(places) > 1, places


def test_an_answer_of_exactly_the_answer_budget_is_kept() -> None:
    from dataclasses import replace

    from citeqa.config import GenerationConfig
    from citeqa.training.demos import make_demo

    answer = "King Charles III"  # 16 characters: 4 tokens' worth
    item = QAItem("q1", "To whom did Rollo swear fealty?", (answer,), "Normans", S2)
    gold_hit = _hit(0, "gold", S2)
    for tokens, kept in ((4, True), (3, False)):
        cfg = replace(GenerationConfig(), max_answer_tokens=tokens)
        demo, why = make_demo(item, S2.index(answer), [gold_hit], gold_hit, cfg, top_k=1)
        assert (demo is not None) is kept, why
        assert kept or why == "answer too long"


def test_a_target_answer_is_written_with_its_spacing_normalised() -> None:
    from citeqa.config import GenerationConfig
    from citeqa.training.demos import Demo, render_target

    demo = Demo.from_json({**_demo_json(1), "answer": "King  Charles\nIII",
                           "quote": S2[:80]})
    rendered = render_target(demo, GenerationConfig())
    assert rendered is not None
    assert rendered[1].startswith("Answer: King Charles III\n"), rendered[1]


class _Retriever:
    """Returns the hits it was given, and records each search's k."""

    def __init__(self, hits: list) -> None:
        self.hits, self.ks = hits, []

    def search(self, query: str, k: int = 10) -> list:
        self.ks.append(k)
        return self.hits[:k]


def _split_build(answer: str, cut: int, **kw: object):
    """build_demos of one question whose paragraph is indexed as two passages split at
    ``cut``; the retriever finds neither."""
    from citeqa.config import GenerationConfig
    from citeqa.training.demos import build_demos

    item = QAItem("q1", "Who is it about?", (answer,), "Normans", TWO)
    parts = [_hit(0, "n", TWO[:cut], 0), _hit(1, "n", TWO[cut:], cut)]
    others = _Retriever([_hit(i + 2, f"d{i}", t) for i, t in enumerate(OTHERS)])
    demos, stats = build_demos([item], others, {TWO: parts}, {}, GenerationConfig(),
                               progress=False, **kw)
    return demos, stats, others


def test_an_answer_at_a_passages_very_start_or_end_is_inside_it() -> None:
    at = TWO.index("Rollo")
    demos, stats, _ = _split_build("Rollo swore fealty", at)  # the second passage's start
    assert len(demos) == 1, stats.skipped
    assert demos[0].passages[demos[0].gold].start == at
    end = TWO.index("Normandy") + len("Normandy")
    demos, stats, _ = _split_build("Normandy", end)  # the first passage's end
    assert len(demos) == 1, stats.skipped
    assert demos[0].passages[demos[0].gold].start == 0


def test_demonstrations_search_for_top_k_passages_when_given() -> None:
    _, _, retriever = _split_build("Rollo", len(S1) + 1, top_k=2)
    assert retriever.ks == [2]
    _, _, retriever = _split_build("Rollo", len(S1) + 1)
    assert retriever.ks == [5]


def test_gold_retrieved_counts_only_a_gold_passage_that_is_shown() -> None:
    from citeqa.config import GenerationConfig
    from citeqa.training.demos import MAX_PASSAGES, build_demos, passage_count

    qid = next(f"q{n}" for n in range(100) if passage_count(f"q{n}") < MAX_PASSAGES)
    gold = _hit(9, "gold", S2)
    found = [*(_hit(i, f"d{i}", t) for i, t in enumerate(OTHERS[:4])), gold]  # gold 5th
    item = QAItem(qid, "Who swore fealty?", ("Rollo",), "Normans", S2)
    demos, stats = build_demos([item], _Retriever(found), {S2: [gold]}, {}, GenerationConfig(),
                               progress=False)
    assert len(demos) == 1 and len(demos[0].passages) < MAX_PASSAGES
    assert stats.gold_retrieved == 0  # put in by hand: retrieval did not show it
    demos, stats = build_demos([item], _Retriever([gold, *found[:4]]), {S2: [gold]}, {},
                               GenerationConfig(), progress=False)
    assert stats.gold_retrieved == 1


def test_answer_starts_keep_an_answers_first_start(tmp_path: Path) -> None:
    from citeqa.training.demos import squad_answer_starts

    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "N", "paragraphs": [{
        "context": "Rollo met Rollo.", "qas": [{"id": "q1", "question": "Who?", "answers": [
            {"text": "Rollo", "answer_start": 0}, {"text": "Rollo", "answer_start": 10}]}]}]}]}))
    assert squad_answer_starts(path) == {"q1": {"Rollo": 0}}


# --- verifier data -----------------------------------------------------------------------------

GEN_ROW = ('{"group": "%s", "question": "q", "answer": "x", "label": 0, '
           '"source": "generator"}\n')


def test_a_bad_line_before_the_last_is_refused_not_dropped(tmp_path: Path) -> None:
    """Only the last line may be a cut one: a damaged line inside the file is someone else's
    file (or a damaged one), never rewritten without it."""
    from citeqa.errors import ConfigError
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "gen.jsonl"
    out.write_text(GEN_ROW % "a" + '{"qid": "a", "kind": "question"}\n' + "not json\n"
                   + '{"qid": "b", "kind": "question"}\n')
    before = out.read_text()
    with pytest.raises(ConfigError, match="line 3"):
        _done_qids(out)
    assert out.read_text() == before


def test_a_cut_last_line_alone_is_dropped_only_when_it_looks_like_ours(tmp_path: Path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "gen.jsonl"
    out.write_text('{"qid": "a", "ki')  # a first line cut short by a kill
    assert _done_qids(out) == set() and out.read_text() == ""
    out.write_text("some notes of mine\n")
    with pytest.raises(ConfigError):
        _done_qids(out)
    assert out.read_text() == "some notes of mine\n"


def test_other_builders_rows_are_not_resumed_over(tmp_path: Path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "syn.jsonl"
    synthetic = GEN_ROW.replace('"generator"', '"synthetic:gold"')
    out.write_text(synthetic % "a")
    with pytest.raises(ConfigError, match="other than this command's reward data"):
        _done_qids(out)


def test_spans_beside_the_answer_are_other_spans() -> None:
    import random

    from citeqa.training.verifier_data import _spans_in

    assert _spans_in("1911 1912", random.Random(0), (0, 5)) == [(5, 9)]
    assert _spans_in("1911 1912", random.Random(0), (5, 9)) == [(0, 4)]


def test_stats_count_right_answers_by_their_label() -> None:
    from citeqa.reward.data import Example
    from citeqa.reward.verifier import Judged
    from citeqa.training.verifier_data import stats_of

    j = Judged("q", "a", "quote", "t", "", "")
    exs = [Example(j, 1, ("a",), "g", "s"), Example(j, 0, ("a",), "g", "s"),
           Example(j, 0, (), "h", "r")]
    assert stats_of(exs) == {"s": {"examples": 2, "right": 1}, "r": {"examples": 1, "right": 0}}


# --- LoRA and checkpoints ----------------------------------------------------------------------


def _tiny_model():
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.up_proj = nn.Linear(4, 4), nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(4, 2)

    return Model()


def test_first_layer_adapts_that_block_and_those_above_only() -> None:
    from citeqa.training.lora import target_names

    model = _tiny_model()
    assert target_names(model, ("q_proj",)) == [f"layers.{i}.q_proj" for i in range(3)]
    assert target_names(model, ("q_proj",), 1) == ["layers.1.q_proj", "layers.2.q_proj"]
    assert target_names(model, ("q_proj", "head"), 2) == ["layers.2.q_proj"]  # head: no block


def test_lora_freezes_the_whole_model_and_scales_by_alpha_over_r() -> None:
    import torch

    from citeqa.training.lora import LoRAConfig, LoRALinear, inject_lora, lora_parameters

    model = _tiny_model()
    wrapped = inject_lora(model, LoRAConfig(r=2, alpha=8.0, targets=("q_proj",)))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(wrapped)}  # head, up_proj frozen too
    w = wrapped["layers.0.q_proj"]
    assert w.scale == 4.0
    with torch.no_grad():
        w.lora_B.fill_(1.0)
    x = torch.ones(1, 4)
    expected = w.base(x) + 4.0 * (x @ w.lora_A.T) @ w.lora_B.T
    assert torch.allclose(w(x), expected)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(torch.nn.Linear(4, 4), 0, 1.0)


def test_a_run_key_ignores_micro_batches_but_not_the_base_or_lr() -> None:
    from dataclasses import replace

    from citeqa.training.checkpoint import run_key
    from citeqa.training.lora import LoRAConfig
    from citeqa.training.sft import Example, TrainConfig

    examples = [Example([1, 2, 3], [-100, 2, 3])]
    train, lora = TrainConfig(), LoRAConfig()
    key = run_key(examples, train, lora, base="b")
    for free in (replace(train, micro_batch_size=4), replace(train, max_steps=9),
                 replace(train, save_every=3)):
        assert run_key(examples, free, lora, base="b") == key
    assert run_key(examples, replace(train, lr=1e-3), lora, base="b") != key
    assert run_key(examples, train, lora, base="c") != key
    assert run_key(examples, train, replace(lora, r=4), base="b") != key
    assert run_key([Example([1, 2, 4], [-100, 2, 4])], train, lora, base="b") != key


def _trained_step():
    import torch

    from citeqa.training.lora import LoRAConfig, inject_lora, lora_parameters

    model = _tiny_model()
    wrapped = inject_lora(model, LoRAConfig(r=2, targets=("q_proj",)))
    opt = torch.optim.AdamW(lora_parameters(wrapped), lr=0.1)
    for layer in model.layers:
        layer.q_proj(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, wrapped, opt


def test_a_checkpoint_restores_adamws_moments(tmp_path: Path) -> None:
    import torch

    from citeqa.training.checkpoint import load_checkpoint, save_checkpoint

    _, wrapped, opt = _trained_step()
    save_checkpoint(tmp_path, wrapped, opt, step=1, history=[{"loss": 1.0}], key="k")
    _, fresh, fresh_opt = _trained_step()
    fresh_opt.state.clear()
    assert load_checkpoint(tmp_path, fresh, fresh_opt, key="k") == (1, [{"loss": 1.0}])
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"],
                    strict=True):
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][m], fresh_opt.state[q][m]), m
    with pytest.raises(ValueError, match="other data or settings"):
        load_checkpoint(tmp_path, fresh, fresh_opt, key="other")


def test_the_new_checkpoint_wins_over_an_old_one_and_all_are_removed(tmp_path: Path) -> None:
    import shutil

    from citeqa.training.checkpoint import (
        has_checkpoint,
        load_checkpoint,
        remove_checkpoint,
        save_checkpoint,
    )

    _, wrapped, opt = _trained_step()
    save_checkpoint(tmp_path, wrapped, opt, step=1, history=[], key="k")
    save_checkpoint(tmp_path, wrapped, opt, step=2, history=[], key="k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # the old one gone
    old = tmp_path / "checkpoint.old"
    shutil.copytree(tmp_path / "checkpoint", old)  # a stale step 1 beside it
    (old / "state.json").write_text((old / "state.json").read_text().replace(
        '"step": 2', '"step": 1'))
    assert load_checkpoint(tmp_path, wrapped, opt, key="k")[0] == 2
    (tmp_path / "checkpoint.tmp").mkdir()  # a save cut short
    remove_checkpoint(tmp_path)
    assert not has_checkpoint(tmp_path) and list(tmp_path.iterdir()) == []


def test_a_synthetic_gold_with_an_answer_start_off_its_answer_is_found_by_its_text() -> None:
    import random

    from citeqa.training.verifier_data import synthetic_examples

    item = QAItem("q1", "Who swore fealty to King Charles?", ("Rollo",), "Normans", TWO)
    for start in (0, None, TWO.index("Rollo")):  # off, missing, right
        gold = synthetic_examples(item, start, "Normans", [], random.Random(0))[0]
        assert gold.source == "synthetic:gold" and gold.label == 1
        assert gold.judged.quote == S2, start


# --- commands ----------------------------------------------------------------------------------


def test_train_generator_hands_run_sft_its_settings(tmp_path: Path, monkeypatch) -> None:
    """(no model is loaded: load_model and run_sft are stand-ins)"""
    from typer.testing import CliRunner

    import citeqa.generation.models as models
    import citeqa.training.sft as sft
    from citeqa.training.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_demo_json(1)) + "\n")
    seen: dict = {}

    def run_sft(base, tokenizer, model_id, demos, out, gen, train, lora, **kw):  # noqa: ANN001
        seen.update(train=train, lora=lora, demos=demos)
        return {"steps": 1, "examples": 1, "seconds": 1.0, "seconds_per_step": 1.0,
                "peak_rss_mb": 1.0, "first_loss": 1.0, "last_loss": 1.0}

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None, "m"))
    monkeypatch.setattr(sft, "run_sft", run_sft)
    args = ["generator", "--data", str(data), "--out", str(tmp_path / "o"), "--model", "m",
            "--device", "cpu", "--batch-size", "2", "--micro-batch-size", "4", "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--targets", "all"])
    assert r.exit_code == 0, r.output
    assert seen["train"].micro_batch_size == 2 and seen["train"].batch_size == 2
    assert len(seen["lora"].targets) == 7 and len(seen["demos"]) == 1
    r = CliRunner().invoke(app, [*args, "--targets", "q_proj, v_proj,"])
    assert r.exit_code == 0, r.output
    assert seen["lora"].targets == ("q_proj", "v_proj")
    (tmp_path / "d.jsonl.stats.json").write_text(json.dumps({"split": "calibration"}))
    seen.clear()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "held out, never trained on" in r.output and not seen


def test_a_retrieved_passage_holding_the_answer_is_no_negative() -> None:
    import random

    from citeqa.training.verifier_data import synthetic_examples

    item = QAItem("q1", "Who swore fealty to King Charles?", ("Rollo",), "Normans", S2)
    holds = _hit(0, "r", "Rollo was a Viking leader who became the first ruler of Normandy.",
                 title="Rollo")
    other = _hit(1, "h", OTHERS[0], title="Harbour")
    for seed in range(5):
        made = synthetic_examples(item, None, "Normans", [holds, other], random.Random(seed))
        [retrieved] = [e for e in made if e.source == "synthetic:retrieved"]
        assert retrieved.judged.title == "Harbour" and retrieved.label == 0


def test_a_paraphrase_control_makes_no_verifier_negative() -> None:
    from citeqa.redteam.maker import Variant
    from citeqa.training.verifier_data import redteam_examples

    made = Variant("Who pledged loyalty to King Charles?", "paraphrase", True,
                   "Who swore fealty to King Charles?", "Rollo", S2, "reworded", "q1")
    unanswerable = Variant("Who swore fealty to King Louis?", "swap", False,
                           "Who swore fealty to King Charles?", "Rollo", S2, "Charles -> Louis",
                           "q1", article="Normans")
    [ex] = redteam_examples([made, unanswerable])
    assert ex.judged.question == unanswerable.question and ex.label == 0
    assert (ex.group, ex.source, ex.article) == ("rt:q1:swap", "redteam:swap", "Normans")


def test_a_variants_file_reads_the_record_of_its_data(tmp_path: Path) -> None:
    from citeqa.training.cards import data_stats, stats_path

    data = tmp_path / "rt.jsonl"
    assert stats_path(data) == tmp_path / "rt.jsonl.stats.json"
    stats_path(data).write_text(json.dumps({"split": "train", "articles": ["Normans"]}))
    assert data_stats(tmp_path / "rt.jsonl.variants.jsonl")["articles"] == ["Normans"]
    assert data_stats(None) == {} and data_stats(tmp_path / "other.jsonl") == {}
    stats_path(data).write_text("[1, 2]")  # not a record
    assert data_stats(data) == {}


# --- reward commands' data ---------------------------------------------------------------------

S3 = "Rollo was a Viking leader who became the first ruler of Normandy in northern France."


def _squad2(path: Path, qas: list[dict], context: str = S3 + " " + S2) -> Path:
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Rollo_(Viking)",
                                "paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


def test_a_red_team_examples_question_is_its_seed() -> None:
    from citeqa.reward.data import Example
    from citeqa.reward.verifier import Judged
    from citeqa.training.reward_cli import question_id

    j = Judged("q", "a", "quote", "t", "", "")
    assert question_id(Example(j, 0, (), "rt:q7:swap", "redteam:swap")) == "q7"
    assert question_id(Example(j, 0, (), "q7", "generator")) == "q7"


def test_the_reader_needs_both_labels(tmp_path: Path) -> None:
    from citeqa.errors import SourceError
    from citeqa.training.reward_cli import answerability_examples

    at = (S3 + " " + S2).index("Rollo swore")
    path = _squad2(tmp_path / "a.json", [{"id": "a1", "question": "Who swore fealty?",
                   "is_impossible": False, "answers": [{"text": "Rollo", "answer_start": at}]}])
    with pytest.raises(SourceError, match="needs answerable and unanswerable"):
        answerability_examples([path], None, 0, 0)


def test_an_unanswerables_view_is_where_its_plausible_answer_start_puts_it(
        tmp_path: Path) -> None:
    from citeqa.training.reward_cli import answerability_examples

    context = S3 + " " + S2
    second = context.index("Rollo swore")
    path = _squad2(tmp_path / "a.json", [
        {"id": "u1", "question": "Who swore fealty to King Louis?", "is_impossible": True,
         "answers": [], "plausible_answers": [{"text": "Rollo", "answer_start": second}]},
        {"id": "a1", "question": "Who became the first ruler of Normandy?",
         "is_impossible": False, "answers": [{"text": "Rollo", "answer_start": 0}]}])
    examples = answerability_examples([path], None, 0, 0)
    by_label = {ex.label: ex for ex in examples}
    assert by_label[0].judged.quote == S2 and by_label[1].judged.quote == S3
    assert by_label[0].judged.title == "Rollo (Viking)"


def test_the_readers_examples_are_shuffled_by_seed(tmp_path: Path) -> None:
    from citeqa.training.reward_cli import answerability_examples

    qas = [{"id": f"q{i}", "question": f"Question {i}?", "is_impossible": i % 2 == 1,
            "answers": [] if i % 2 else [{"text": "Rollo", "answer_start": 0}]}
           for i in range(12)]
    path = _squad2(tmp_path / "a.json", qas)
    order = [ex.judged.question for ex in answerability_examples([path], None, 0, 0)]
    assert order == [ex.judged.question for ex in answerability_examples([path], None, 0, 0)]
    assert order != [q["question"] for q in qas] and sorted(order) == sorted(
        q["question"] for q in qas)
    assert order != [ex.judged.question for ex in answerability_examples([path], None, 0, 1)]


def test_a_hand_written_model_card_is_kept(tmp_path: Path) -> None:
    from citeqa.training.reward_cli import CARD, write_card

    write_card(tmp_path, "reward model", {"base": "b", "data": []})
    assert "# citeqa reward model" in (tmp_path / CARD).read_text()
    (tmp_path / CARD).write_text("mine\n")
    write_card(tmp_path, "reward model", {"base": "b", "data": []})
    assert (tmp_path / CARD).read_text() == "mine\n"


def test_a_resumed_record_of_all_and_train_is_all(tmp_path: Path) -> None:
    from citeqa.training.cli import _resumed_record

    out = tmp_path / "rd.jsonl"
    out.write_text('{"kind": "question"}\n')
    for was, now, joined in (("all", "train", "all"), ("train", "train", "train"),
                             ("calibration", "calibration", "calibration")):
        (tmp_path / "rd.jsonl.stats.json").write_text(json.dumps(
            {"split": was, "articles": ["A"]}))
        got = _resumed_record(out, {"command": "c", "split": now, "articles": ["B"]})
        assert got == {"command": "c", "split": joined, "articles": ["A", "B"]}


class _NoHits:
    @classmethod
    def open(cls, index: object) -> _NoHits:
        return cls()

    def search(self, query: str, k: int = 10, mode: str = "hybrid") -> list:
        return []


def test_synthetic_reward_data_keeps_each_examples_article_and_the_limit(
        tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import citeqa.retrieval
    from citeqa.cli import app

    monkeypatch.setattr(citeqa.retrieval, "HybridRetriever", _NoHits)
    context = S3 + " " + S2
    qas = [{"id": f"q{i}", "question": "Who swore fealty to King Charles?",
            "is_impossible": False,
            "answers": [{"text": "Rollo", "answer_start": context.index("Rollo swore")}]}
           for i in range(3)]
    squad = _squad2(tmp_path / "s.json", qas)
    out = tmp_path / "syn.jsonl"
    r = CliRunner().invoke(app, ["train", "reward-data", "--from", "synthetic", "--dataset",
                                 str(squad), "--index", str(tmp_path / "idx"), "--out", str(out),
                                 "--limit", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {row["article"] for row in rows} == {"Rollo_(Viking)"}
    assert len({row["group"] for row in rows}) == 2
    stats = json.loads((tmp_path / "syn.jsonl.stats.json").read_text())
    assert stats["questions"] == 2 and stats["articles"] == ["Rollo_(Viking)"]
    assert stats["split"] == "all"
