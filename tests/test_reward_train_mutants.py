"""Mutation round on the reward package (losses, combine, data, provenance, checkpoint, the
training loops, the answerability reader: 63 mutants, 32 survived the suite, 31 killed here):
behaviour the other tests left unpinned."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from citeqa.errors import SourceError
from citeqa.reward.combine import fit, read_combiner, write_combiner
from citeqa.reward.data import load_verifier_data
from citeqa.reward.losses import combined_loss
from citeqa.reward.provenance import calibration_mismatch

GEN = {"model_id": "smollm2+lora-ab12", "prompt_sha256": "cc72", "answer_mode": "span",
       "temperature": 0.7, "top_k_passages": 3, "passage_chars": 600}


def test_pair_logits_without_preferred_is_refused_even_beside_labels() -> None:
    """A preference term half given is an error, not silently dropped for the label term."""
    la, lb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    logits, labels = torch.tensor([0.5, -0.5]), torch.tensor([1, 0])
    with pytest.raises(ValueError, match="pair_logits and preferred together"):
        combined_loss(pair_logits=(la, lb), logits=logits, labels=labels)
    with pytest.raises(ValueError, match="pair_logits and preferred together"):
        combined_loss(preferred=torch.tensor([0, 1]), logits=logits, labels=labels)


def test_a_field_the_calibration_did_not_record_is_no_mismatch() -> None:
    """A calibration written before a fingerprint field existed says nothing of it."""
    older = {k: v for k, v in GEN.items() if k != "passage_chars"}
    assert calibration_mismatch({"generators": [older], "candidates_per_question": 1},
                                GEN, 1) == []


def test_an_input_every_candidate_gave_alike_is_fitted_readable_and_harmless(tmp_path) -> None:
    """A constant input (one retrieval score for all, say) has no spread: its std is taken as
    1, so the file reads back and a candidate off that value still gets a probability."""
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 2, 200), rng.uniform(-3, 0, 200), rng.normal(3, 0.5, 200),
              np.full(200, 0.02)]
    y = (rng.random(200) < 1 / (1 + np.exp(-x[:, 0]))).astype(int)
    c = fit(x, y)
    assert c.std[3] == 1.0 and c.mean[3] == pytest.approx(0.02)
    write_combiner(tmp_path, c)
    assert read_combiner(tmp_path) == c
    p = c(np.array([[1.0, -1.0, 3.0, 0.5], [1.0, -1.0, 3.0, 0.02]]))
    assert np.isfinite(p).all() and 0 < p[0] < 1


def _line(**kw: object) -> str:
    return json.dumps({"question": "Q?", "answer": "A", "quote": "A is so.", "label": 1, **kw})


def test_candidates_without_a_group_are_grouped_by_their_question(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([_line(question="One?"), _line(question="Two?", label=0),
                               _line(question="One?", label=0)]) + "\n")
    groups = load_verifier_data(path).groups()
    assert [[ex.judged.question for ex in g] for g in groups] == [["One?", "One?"], ["Two?"]]


def test_per_file_groups_and_unanswered_questions_tell_the_files_apart(tmp_path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_line(group="q1") + "\n" + json.dumps({"kind": "question", "qid": "q2"}) + "\n")
    b.write_text(_line(group="q1", label=0) + "\n" + _line(group="q2") + "\n"
                 + json.dumps({"kind": "question", "qid": "q2"}) + "\n")
    data = load_verifier_data([a, b])
    assert data.example_files == [0, 1, 1] and data.question_files == [0, 1]
    assert [len(g) for g in data.groups()] == [2, 1]  # q1 of both files is one question
    assert [len(g) for g in data.groups(per_file=True)] == [1, 1, 1]
    # q2 has a candidate, but in the other file: in a's own questions it went unanswered
    assert data.unanswered() == []
    assert data.unanswered(per_file=True) == [{"kind": "question", "qid": "q2"}]


@pytest.mark.parametrize(("bad", "needle"), [
    ({"signals": {"retrieval_fused": True}}, "signals"),
    ({"article": 7}, "article"),
    ({"answer": 3}, "must be strings"),
])
def test_a_candidate_with_a_wrongly_typed_field_is_refused(tmp_path, bad, needle) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(_line(**bad) + "\n")
    with pytest.raises(SourceError, match=rf"d\.jsonl:1: bad reward-data line.*{needle}"):
        load_verifier_data(path)


def test_the_learning_rate_warms_up_from_its_first_step_and_decays_to_its_last() -> None:
    from citeqa.reward.train import lr_scale

    got = [lr_scale(s, 10, 4) for s in range(10)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_scale(0, 3, 0) == 1.0  # no warm-up: full rate at once


def test_a_group_that_fills_a_batch_exactly_shares_it_with_nothing_else() -> None:
    import random

    from citeqa.reward.train import batches

    groups = [[_example(f"g{i}")] * n for i, n in enumerate((4, 1, 3))]
    out = batches(groups, 4, random.Random(0))
    assert sorted(len(b) for b in out) == [4, 4]  # never an empty batch, nothing split


def _example(group: str, label: int = 1):  # type: ignore[no-untyped-def]
    from citeqa.reward.data import Example
    from citeqa.reward.verifier import Judged

    return Example(Judged(question="Q?", answer="A", quote="A."), label, group=group)


@dataclass(frozen=True)
class _Cfg:
    seed: int = 0
    lr: float = 1e-3
    save_every: int = 10
    cpu_dtype: str = "fp32"


def test_how_often_a_training_saves_is_not_part_of_its_run() -> None:
    from citeqa.reward.train import run_key

    key = run_key(_Cfg(), 7, {"data": ["a.jsonl"]})
    assert run_key(_Cfg(save_every=3), 7, {"data": ["a.jsonl"]}) == key
    assert run_key(_Cfg(lr=1e-4), 7, {"data": ["a.jsonl"]}) != key
    assert run_key(_Cfg(), 8, {"data": ["a.jsonl"]}) != key
    assert run_key(_Cfg(), 7, {"data": ["b.jsonl"]}) != key
    assert "save_every" not in key["config"]


def test_another_trainings_directory_is_refused_naming_what_differs(tmp_path) -> None:
    from citeqa.errors import ConfigError
    from citeqa.reward.train import resume_step, run_key

    out = tmp_path / "rm"
    out.mkdir()
    saved = run_key(_Cfg(), 7, None)
    (out / "config.json").write_text(json.dumps({"progress": {"step": 4, "run": saved}}))
    assert resume_step(out, run_key(_Cfg(save_every=2), 7, None)) == 4
    with pytest.raises(ConfigError, match=r"lr was 0\.001, now 0\.0001"):
        resume_step(out, run_key(_Cfg(lr=1e-4), 7, None))
    with pytest.raises(ConfigError, match="total_steps: was 7, now 9"):
        resume_step(out, run_key(_Cfg(), 9, None))
    # an older citeqa's progress.json: its step, no run to compare
    (out / "config.json").write_text(json.dumps({"format": 2}))
    (out / "progress.json").write_text(json.dumps({"step": 3}))
    assert resume_step(out, saved) == 3
    # a "progress" that is not an object is none
    (out / "progress.json").unlink()
    (out / "config.json").write_text(json.dumps({"progress": 5, "training": [1]}))
    assert resume_step(out, saved) == 0


@dataclass(frozen=True)
class _LoopCfg:
    seed: int = 0
    lr: float = 1e-3
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 1
    save_every: int = 3
    cpu_dtype: str = "fp32"


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 1)


def _loop(out, total: int, *, stop_at: int | None = None, cfg: _LoopCfg = _LoopCfg()):  # type: ignore[no-untyped-def]
    """run_training over ``total`` steps whose loss is step + 1 (so the record is known), a
    fake save writing config.json; (record, steps taken, steps saved at)."""
    from citeqa.reward.train import run_training

    model, taken, saved = _Tiny(), [], []

    def loss_of(step: int, item: int):  # type: ignore[no-untyped-def]
        if step == stop_at:
            raise KeyboardInterrupt
        taken.append(step)
        return model.head(model.encoder(torch.ones(1, 2))).sum() * 0 + (item + 1.0), None

    def save(d, meta):  # type: ignore[no-untyped-def]
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(meta))
        saved.append(meta["progress"]["step"])

    record = run_training(model, list(range(total)), loss_of, cfg, save=save, desc="t",
                          out=out, extra={"data": "x"}, progress=False)
    return record, taken, saved


def test_a_training_saves_every_save_every_steps_and_at_its_end(tmp_path) -> None:
    out = tmp_path / "rm"
    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"step": 0}))  # an older citeqa's record
    record, taken, saved = _loop(out, 7)
    assert taken == list(range(7)) and saved == [3, 6, 7]
    assert not (out / "progress.json").exists()  # the step is in config.json now
    assert record["steps"] == record["total_steps"] == 7 and record["data"] == "x"
    assert record["last_losses"] == [1.0, 2, 3, 4, 5, 6, 7] and record["loss_first"] == 1.0
    # finished: a rerun takes no step and reports the saved training
    again, taken, saved = _loop(out, 7)
    assert taken == [] and saved == []
    assert again == {**json.loads((out / "config.json").read_text())["training"],
                     "seconds_this_run": 0.0}


def test_a_resumed_training_reports_the_steps_of_every_run(tmp_path) -> None:
    out = tmp_path / "rm"
    with pytest.raises(KeyboardInterrupt):
        _loop(out, 7, stop_at=4)
    assert json.loads((out / "config.json").read_text())["progress"]["step"] == 3
    record, taken, saved = _loop(out, 7)
    assert taken == [3, 4, 5, 6] and saved == [6, 7]
    assert record["loss_first"] == 1.0  # step 1's, not this run's first (step 4's)
    assert record["steps_timed"] == 7 and record["last_losses"] == [1.0, 2, 3, 4, 5, 6, 7]
    assert record["seconds_all_runs"] >= record["seconds_this_run"]


def test_a_training_record_keeps_its_last_fifty_losses(tmp_path) -> None:
    record, _, _ = _loop(None, 60)
    assert record["last_losses"] == [float(i) for i in range(11, 61)]
    assert record["loss_last50"] == pytest.approx(sum(range(11, 61)) / 50)
    assert record["steps_timed"] == 60 and record["loss_first"] == 1.0


def test_a_fraction_of_an_epoch_trains_that_fraction_of_the_batches(monkeypatch) -> None:
    import citeqa.reward.train as train
    from citeqa.reward.train import TrainConfig, train_verifier

    plans: list[list[list]] = []
    monkeypatch.setattr(train, "run_training",
                        lambda model, plan, *a, **k: plans.append(list(plan)) or {})
    groups = [[_example(f"g{i}")] for i in range(8)]  # 4 batches of 2 an epoch
    for epochs in (0.5, 1.0, 1.5, 2.0):
        train_verifier(None, None, groups, TrainConfig(epochs=epochs, batch_examples=2),
                       progress=False)
    assert [len(p) for p in plans] == [2, 4, 6, 8]
    # each epoch sees every group once, in its own order
    first, second = plans[3][:4], plans[3][4:]
    assert sorted(ex.group for b in first for ex in b) == [f"g{i}" for i in range(8)]
    assert [ex.group for b in first for ex in b] != [ex.group for b in second for ex in b]


def test_the_step_loss_is_the_weighted_label_preference_and_reader_terms() -> None:
    from types import SimpleNamespace

    import torch.nn.functional as F

    from citeqa.reward.train import TrainConfig, step_loss

    examples = [_example("g1", 1), _example("g1", 0), _example("g2", 0)]
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])  # [K=2, N=3]
    torch.manual_seed(0)
    start, end = torch.randn(3, 4), torch.randn(3, 4)
    gold = torch.tensor([[0, 0], [1, 2], [3, 3]])
    weights = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]])
    cfg = TrainConfig(bt_weight=2.0, reader_weight=0.25)
    loss, parts = step_loss(lambda batch: (logits, start, end),  # type: ignore[arg-type]
                            SimpleNamespace(gold_tokens=gold), examples, cfg, weights)
    labels = torch.tensor([1.0, 0.0, 0.0])
    bce = [F.binary_cross_entropy_with_logits(k, labels, reduction="none") for k in logits]
    label = ((bce[0][0] + 2 * bce[0][2]) / 3 + (3 * bce[1][0] + bce[1][1]) / 4) / 2
    bt = (-F.logsigmoid(logits[:, 0] - logits[:, 1])).mean()  # the one pair: 0 over 1
    reader = F.cross_entropy(start, gold[:, 0]) + F.cross_entropy(end, gold[:, 1])
    assert parts == pytest.approx({"label": float(label), "preference": float(bt),
                                   "reader": float(reader)})
    assert float(loss) == pytest.approx(float(label + 2.0 * bt + 0.25 * reader))


def test_each_step_draws_its_own_bootstrap_weights_seeded(monkeypatch) -> None:
    import citeqa.reward.train as train
    from citeqa.reward.train import TrainConfig, train_verifier

    loops, drawn = [], []
    monkeypatch.setattr(train, "run_training", lambda model, plan, loss_of, *a, **k:
                        loops.append(loss_of) or {})
    monkeypatch.setattr(train, "encode", lambda *a, **k: None)
    monkeypatch.setattr(train, "step_loss", lambda m, b, ex, cfg, w: drawn.append(w) or (0, {}))
    groups = [[_example(f"g{i}")] * 5 for i in range(4)]
    for _ in range(2):
        train_verifier(None, None, groups, TrainConfig(members=3, seed=1), progress=False)
    batch = groups[0] * 4
    for loss_of in loops:
        loss_of(0, batch)
        loss_of(1, batch)
    assert drawn[0].shape == (3, 20)
    assert not torch.equal(drawn[0], drawn[1])  # another step, other weights
    assert torch.equal(drawn[0], drawn[2]) and torch.equal(drawn[1], drawn[3])  # seeded


def _labelled(i: int):  # type: ignore[no-untyped-def]
    from citeqa.reward.verifier import Judged
    from citeqa.training.answerability_data import Labelled

    return Labelled(Judged(question=f"Q{i}?", answer="", quote=f"passage {i}."), i % 2, "t")


def test_each_epoch_of_the_reader_is_its_own_shuffle_of_every_example() -> None:
    from citeqa.reward.answerability_train import AnswerabilityConfig, plan

    examples = [_labelled(i) for i in range(12)]
    batches = plan(examples, AnswerabilityConfig(epochs=2, batch=4, seed=3))
    assert [len(b) for b in batches] == [4] * 6
    first = [ex.judged.question for b in batches[:3] for ex in b]
    second = [ex.judged.question for b in batches[3:] for ex in b]
    assert sorted(first) == sorted(second) == sorted(ex.judged.question for ex in examples)
    assert first != second
    assert plan(examples, AnswerabilityConfig(epochs=2, batch=4, seed=3)) == batches  # seeded
    assert plan(examples, AnswerabilityConfig(epochs=2, batch=4, seed=4)) != batches
    assert len(plan(examples, AnswerabilityConfig(epochs=1.5, batch=4))) == 4  # 6 * 1.5 / 2


def test_the_reader_is_trained_on_its_labels_at_its_length(monkeypatch) -> None:
    import torch.nn.functional as F

    import citeqa.reward.answerability_train as at
    from citeqa.reward.answerability_train import AnswerabilityConfig, train_answerability

    loops, lengths = [], []
    monkeypatch.setattr(at, "run_training", lambda model, plan, loss_of, *a, **k:
                        loops.append((plan, loss_of)) or {})
    monkeypatch.setattr(at, "encode", lambda tok, items, n: lengths.append(n) or len(items))
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    train_answerability(lambda n: logits[:n], None,  # type: ignore[arg-type]
                        [_labelled(i) for i in range(4)],
                        AnswerabilityConfig(batch=4, max_tokens=96), progress=False)
    [(batches, loss_of)] = loops
    loss, parts = loss_of(0, batches[0])
    labels = torch.tensor([float(ex.label) for ex in batches[0]])
    assert float(loss) == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, labels)))
    assert parts is None and lengths == [96]


def test_reader_training_needs_both_labels() -> None:
    from citeqa.reward.answerability_train import AnswerabilityConfig, train_answerability

    for examples in ([], [_labelled(1), _labelled(3)], [_labelled(0), _labelled(2)]):
        with pytest.raises(ValueError, match="both labels"):
            train_answerability(None, None, examples, AnswerabilityConfig(),  # type: ignore[arg-type]
                                progress=False)


def test_only_a_whole_step_count_short_of_its_total_is_unfinished(tmp_path) -> None:
    from citeqa.errors import ModelError
    from citeqa.reward.checkpoint import check_finished

    for training in ({"steps": 3, "total_steps": 3}, {"steps": True, "total_steps": 5},
                     {"steps": 2.0, "total_steps": 5}, {"steps": 2}, "3 of 5", None):
        check_finished(tmp_path, {"training": training}, command="c")  # no error
    with pytest.raises(ModelError, match="stopped at step 4 of 5"):
        check_finished(tmp_path, {"training": {"steps": 4, "total_steps": 5}}, command="c")


def test_max_tokens_must_be_a_padded_length_the_encoder_has_positions_for(tmp_path) -> None:
    from types import SimpleNamespace

    from citeqa.compute import PAD_MULTIPLE
    from citeqa.errors import ModelError
    from citeqa.reward.checkpoint import max_tokens_of

    encoder = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))
    assert max_tokens_of(tmp_path, {}, encoder, 224, "r") == 224
    assert max_tokens_of(tmp_path, {"max_tokens": 256}, encoder, 224, "r") == 256
    assert max_tokens_of(tmp_path, {"max_tokens": PAD_MULTIPLE}, encoder, 224, "r") == PAD_MULTIPLE
    for bad in (256 + PAD_MULTIPLE, 224 + 1, 0, True, "224", 224.0):
        with pytest.raises(ModelError, match="max_tokens must be a multiple"):
            max_tokens_of(tmp_path, {"max_tokens": bad}, encoder, 224, "r")


def test_saving_a_reader_keeps_the_files_beside_it_but_no_hidden_folder(
        tiny_encoder, tokenizer, tmp_path) -> None:
    from citeqa.reward.answerability import Answerability, load_answerability, save_answerability

    out = tmp_path / "a"
    model = Answerability(tiny_encoder(len(tokenizer)))
    save_answerability(out, model, tokenizer, {})
    (out / "calibration.json").write_text("{}")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("kept")
    (out / ".scratch").mkdir()
    save_answerability(out, model, tokenizer, {"again": 1})
    assert (out / "calibration.json").read_text() == "{}"
    assert (out / "sub" / "x.txt").read_text() == "kept"
    assert not (out / ".scratch").exists()
    assert load_answerability(out)[2]["again"] == 1


def test_a_reader_whose_heads_lack_a_weight_is_refused(tiny_encoder, tokenizer, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from citeqa.errors import ModelError
    from citeqa.reward.answerability import Answerability, load_answerability, save_answerability
    from citeqa.reward.checkpoint import HEADS

    out = tmp_path / "a"
    save_answerability(out, Answerability(tiny_encoder(len(tokenizer))), tokenizer, {})
    heads = load_file(str(out / HEADS))
    assert sorted(heads) == ["head.bias", "head.weight"]  # the encoder's are not among them
    save_file({"head.weight": heads["head.weight"]}, str(out / HEADS))
    with pytest.raises(ModelError, match=r"missing \['head.bias'\]"):
        load_answerability(out)


def test_only_a_base_encoder_may_lack_its_pooler(tokenizer, tmp_path) -> None:
    from transformers import BertConfig, BertModel

    from citeqa.errors import ModelError
    from citeqa.reward.checkpoint import read_encoder

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64),
              add_pooling_layer=False).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    read_encoder(tmp_path, "hint", base=True)
    with pytest.raises(ModelError, match=r"missing \(pooler"):
        read_encoder(tmp_path, "hint")


def test_a_served_reader_reads_at_the_length_it_was_trained_at(tiny_encoder, tokenizer,
                                                               tmp_path) -> None:
    from citeqa.reward.answerability import (
        BATCH,
        Answerability,
        AnswerabilityReader,
        encode,
        save_answerability,
    )
    from citeqa.reward.verifier import Judged

    out = tmp_path / "a"
    save_answerability(out, Answerability(tiny_encoder(len(tokenizer))), tokenizer, {},
                       max_tokens=96)
    reader = AnswerabilityReader(out, cpu_dtype="fp32", lean=False)
    assert reader.max_tokens == 96
    words = " ".join(f"word{i}" for i in range(150))
    items = [Judged(f"Question {i}?", "", f"Quote {i}.", "T", words, words)
             for i in range(BATCH + 2)]
    with torch.inference_mode():
        expected = reader.model(encode(tokenizer, items, 96)).numpy()
    assert reader.logits(items) == pytest.approx(expected, abs=1e-4)


def test_the_encoder_and_the_heads_learn_at_their_own_rates() -> None:
    from citeqa.reward.train import encoder_optimizer

    model = _Tiny()
    opt = encoder_optimizer(model, 1e-5, 1e-3, 0.01)
    enc, heads = opt.param_groups
    assert enc["lr"] == 1e-5 and heads["lr"] == 1e-3
    assert enc["weight_decay"] == heads["weight_decay"] == 0.01
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.head.parameters()}


def test_a_model_of_another_kind_in_the_same_format_is_refused(tmp_path) -> None:
    from citeqa.errors import ModelError
    from citeqa.reward.checkpoint import read_config

    (tmp_path / "config.json").write_text(json.dumps({"format": 1, "kind": "cross-encoder"}))
    with pytest.raises(ModelError, match=r"has format 1 \(cross-encoder\), this citeqa reads "
                                         r"format 1 \(answerability\)"):
        read_config(tmp_path, fmt=1, kind="answerability")
    assert read_config(tmp_path, fmt=1, kind=None)["kind"] == "cross-encoder"  # format alone


def test_combination_inputs_need_one_signal_per_verifier_probability() -> None:
    """Fewer signals than probabilities filled the rows past them with whatever memory held
    (np.empty): values like 6.9e-310 scored as a generator's log-probability."""
    from citeqa.reward.combine import Signals, features

    with pytest.raises(ValueError, match="3 verifier probabilities but 1 signals"):
        features([0.5, 0.6, 0.7], [Signals(-1.0, 3, 0.1)])
    assert features([0.5], [Signals(-1.0, 3, 0.1)]).shape == (1, 4)
