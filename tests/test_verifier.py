"""The verifier reward model on a tiny random encoder (no download): rendering, token spans,
the forward pass, a training run, the directory round trip, scoring and calibration."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from citeqa.compute import PAD_MULTIPLE
from citeqa.errors import ConfigError
from citeqa.reward.calibrate import calibrate_threshold
from citeqa.reward.checkpoint import load_verifier, save_verifier
from citeqa.reward.combine import Signals as combine_signals
from citeqa.reward.data import Example, load_verifier_data, write_examples
from citeqa.reward.scorer import VerifierScorer, judged, load_scorer
from citeqa.reward.train import TrainConfig, batches, pair_indices, train_verifier
from citeqa.reward.verifier import (
    Judged,
    Verifier,
    around,
    char_to_tokens,
    encode,
    gold_span,
    quotes_in_view,
    render,
)
from citeqa.types import Candidate, Document, Quote

TEXT = ("The Normans gave their name to Normandy, a region in France. Their leader Rollo swore "
        "fealty to King Charles III of West Francia. The Norman dynasty shaped medieval Europe.")
Q0 = TEXT.index("Their leader")
Q1 = TEXT.index(" The Norman dynasty")
QUOTE = TEXT[Q0:Q1]


def item(answer: str = "Rollo", label: int = 1, group: str = "q1", question: str = "Who led?"
         ) -> Example:
    before, after = around(TEXT, Q0, Q1)
    return Example(Judged(question, answer, QUOTE, "Normans", before, after), label,
                   ("Rollo",), group, "test")


def test_render_marks_the_quote_and_finds_the_answer_in_it() -> None:
    a, b, span = render(item().judged)
    assert a == "Who led?" and "<< " + QUOTE + " >>" in b
    assert b.startswith("Rollo | Normans:") and b[span[0]:span[1]] == "Rollo"
    assert span[0] > b.index("<<")  # inside the quote, not the answer's copy at the start
    assert render(Judged("q", "Paris", QUOTE))[2] is None
    assert gold_span(b, ["Rollo"], "Rollo") == (b.index("Rollo", 6), b.index("Rollo", 6) + 5)
    assert gold_span(b, ["Paris"], "Rollo") is None
    # an answer holding the separator: the gold is looked for after its whole copy, not in it
    _, b, _ = render(Judged("q?", "1 | 2", "the score was 2 to 1", "Game"))
    assert b.startswith("1 | 2 | Game:")
    start, end = gold_span(b, ["2"], "1 | 2")  # was (4, 5), the answer copy's "2"
    assert b[start:end] == "2" and start > b.index("<<")


def test_the_answer_is_marked_where_it_stands_whatever_case_folding_does() -> None:
    """Found case-insensitively in ``quote.lower()``, whose "İ" is two characters, the answer
    was marked one character off: "urkey" for "Turkey"."""
    quote = "İstanbul lies in Turkey, on the Bosphorus."
    _, b, span = render(Judged("Where is it?", "turkey", quote))
    assert span is not None and b[span[0]:span[1]] == "Turkey"
    _, b, span = render(Judged("Where is it?", "TURKEY", "Istanbul lies in Turkey."))
    assert span is not None and b[span[0]:span[1]] == "Turkey"


def test_around_cuts_at_spaces() -> None:
    before, after = around(TEXT, Q0, Q1, chars=20)
    assert TEXT[:Q0].endswith(before) and len(before) <= 20 and not before.startswith("ame")
    assert TEXT[Q1:].startswith(after) and len(after) <= 20


def test_tokens_of_a_span_and_cls_when_truncated(tokenizer) -> None:
    batch = encode(tokenizer, [item().judged], golds=[("Rollo",)])
    first, last = batch.answer_tokens[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[0][first:last + 1].tolist())
    assert "".join(t.lstrip("#") for t in tokens) == "rollo"
    assert batch.gold_tokens is not None and batch.gold_tokens[0].tolist() == [first, last]
    # (what comes before the quote goes first: the quote's start stays in view, its end not)
    short = encode(tokenizer, [item().judged], max_tokens=16)
    assert short.answer_tokens[0].tolist() != [0, 0]
    short = encode(tokenizer, [item("Francia").judged], max_tokens=16)  # the quote's last word
    assert short.answer_tokens[0].tolist() == [0, 0]
    assert char_to_tokens([(0, 0), (0, 3)], [None, 1], None) == (0, 0)


@pytest.mark.parametrize("question", [
    ("Please tell me, in the context of a self-hosted service that answers questions with "
     "verified quotes " * 12)[:994] + " port?",  # 1,000 characters: ~194 tokens
    "\u8bf7\u95ee" + "\u9ed8\u8ba4\u7684\u751f\u6210\u6a21\u578b\u662f\u4ec0\u4e48" * 19,
    # 125 Hangul characters, 366 tokens (a syllable is up to three jamo tokens): under the
    # character count that was taken for a bound on tokens, so never cut, and the tokenizer
    # raised on it
    " ".join(["\ud55c\uad6d" * 16] * 4)[:125],
])
def test_a_question_that_alone_fills_the_budget_is_cut_not_an_error(tokenizer,
                                                                     question: str) -> None:
    """The tokenizer raised "Sequence to truncate too short" for a question the service
    accepts (it truncated only the passage side): no answer at all, a 500 over REST."""
    from citeqa.reward.answerability import encode as encode_answerability
    from citeqa.reward.verifier import MIN_SECOND_TOKENS, fitting_firsts

    short = item(question=question).judged
    long = Judged(question, "Rollo", QUOTE, "Normans", short.before, "Later on. " * 80)
    batch = encode(tokenizer, [long, item().judged], max_tokens=192)
    assert batch.input_ids.shape[1] == 192
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    second = len(row) - 1 - row.index(tokenizer.sep_token_id) - 1  # [SEP] ... [SEP]
    whole = len(tokenizer(render(long)[1], add_special_tokens=False)["input_ids"])
    # (a cut between the jamo tokens of one Hangul syllable backs off to the one before)
    assert len(row) == 192 and second >= min(whole, MIN_SECOND_TOKENS)
    assert 192 - 3 - 64 - 2 <= len(row) - second - 3 <= 192 - 3 - 64
    first, last = batch.answer_tokens[0].tolist()  # the answer is still found in the passage
    assert first > 0 and "".join(t.lstrip("#") for t in tokenizer.convert_ids_to_tokens(
        batch.input_ids[0][first:last + 1].tolist())) == "rollo"
    [cut] = fitting_firsts(tokenizer, [question], 192)
    assert question.startswith(cut) and len(cut) < len(question)
    assert fitting_firsts(tokenizer, ["Who led?"], 192) == ["Who led?"]  # as it was
    assert encode_answerability(tokenizer, [long], 224)["input_ids"].shape[1] == 224
    assert encode(tokenizer, [short], max_tokens=192).input_ids.shape[1] <= 192  # a short view


@pytest.mark.parametrize("title, question", [
    (("Regulation (EU) 2019/1020, Art. 4(2)(a)-(c), 5.1; Annex II 3.4-3.9; " * 8)[:500],
     "Who led?"),
    ("Normans", ("In the long history of the duchy and of the raids along the Seine, " * 15)
     [:981] + " who?"),
])
def test_the_quote_stays_in_view_after_a_long_title_or_question(tokenizer, title: str,
                                                                question: str) -> None:
    """Cut from the end, the passage side lost the quote after a 500-character title or a
    981-character question: a right and a wrong quote read the same, and scored the same."""
    from citeqa.reward.answerability import encode as encode_answerability

    before = "The Normans gave their name to Normandy, a region in France. " * 4
    right = Judged(question, "Rollo", QUOTE, title, before, "Later on. " * 40)
    wrong = Judged(question, "Rollo", QUOTE.replace("swore fealty to", "was killed by"), title,
                   before, "Later on. " * 40)
    batch = encode(tokenizer, [right, wrong], max_tokens=192)
    rows = [tokenizer.decode(ids[mask.bool()]) for ids, mask in
            zip(batch.input_ids, batch.attention_mask, strict=True)]
    assert "swore fealty to king charles iii" in rows[0] and "was killed by" in rows[1]
    assert all("< < their leader rollo" in r and "> >" in r for r in rows)
    assert all(first > 0 for first, _ in batch.answer_tokens.tolist())
    inputs = encode_answerability(tokenizer, [right], 224)
    seen = tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert "swore fealty to king charles iii" in seen
    short = Judged("Who led?", "Rollo", QUOTE, "Normans", "Before. ", "After.")
    assert render(quotes_in_view(tokenizer, [short], ["Who led?"], 192)[0]) == render(short)


def test_the_quote_stays_in_view_when_the_rest_leaves_less_than_a_title_or_cuts_syllables(
        tokenizer) -> None:
    """Its 16 tokens were kept of a title even where question, answer and quote left fewer (a
    long free-mode answer); a Hangul title or passage cut where a syllable's jamo tokens share
    its offsets kept up to two tokens more than counted: the quote's end was cut off."""
    from citeqa.reward.verifier import MAX_TOKENS, fitting_firsts

    def seen(x: Judged) -> str:
        batch = encode(tokenizer, [x], max_tokens=MAX_TOKENS)
        return tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])

    question = ("Which of the districts administered by the metropolitan government of the "
                "capital city lies " * 12)[:1000]
    quote = ("Gangnam District was the richest of the twenty five districts administered by the "
             "metropolitan government of Seoul along the southern bank of the Han River in the "
             "year 2019, ahead of Seocho.")
    title = ("List of districts of Seoul Special City by population, area, and gross regional "
             "domestic product (2019 estimates)")
    x = Judged(question, "Gangnam District, the richest of the twenty five districts", quote,
               title, "In the statistics office's report, ", "Further districts follow.")
    assert "ahead of seocho. > >" in seen(x)
    ko = "서울특별시는 대한민국의 수도이자 최대 도시이며 한강을 끼고 있는 역사적인 도시로 " * 5
    ko_before = "한강 남쪽 강남구 서초구 송파구 강동구 관악구 동작구 영등포구 금천구 " * 5
    ko_quote = "강남구는 서울에서 가장 부유한 구이다"
    for start in range(0, 40, 3):
        for at in range(0, 40, 3):
            x = Judged("강남구는?", "강남구", ko_quote, ko[start:start + 60],
                       ko_before[at:at + 200], "")
            [first] = fitting_firsts(tokenizer, [x.question], MAX_TOKENS)
            [y] = quotes_in_view(tokenizer, [x], [first], MAX_TOKENS)
            assert len(tokenizer(first, render(y)[1])["input_ids"]) <= MAX_TOKENS, (start, at)


def test_forward_shapes_and_ensemble_spread(tiny_encoder, tokenizer) -> None:
    model = Verifier(tiny_encoder(len(tokenizer)), members=3, hidden=8).eval()
    batch = encode(tokenizer, [item().judged, item("Paris", 0).judged])
    logits, start, end = model(batch)
    assert logits.shape == (3, 2) and start.shape == end.shape == batch.input_ids.shape
    mean, std = model.predict(batch)
    assert ((0 < mean) & (mean < 1)).all() and (std > 0).all()


def test_batches_are_padded_to_a_multiple_that_changes_no_score(tiny_encoder, tokenizer) -> None:
    model = Verifier(tiny_encoder(len(tokenizer)), members=3, hidden=8).eval()
    short = item().judged
    longer = Judged("Who swore fealty to King Charles III of West Francia, and when?", "Rollo",
                    TEXT, "Normans", TEXT, TEXT)
    natural = len(tokenizer(*render(short)[:2])["input_ids"])
    assert natural % PAD_MULTIPLE  # so the padding below is the multiple's doing
    alone, batched = encode(tokenizer, [short]), encode(tokenizer, [short, longer])
    assert alone.input_ids.shape[1] == -(-natural // PAD_MULTIPLE) * PAD_MULTIPLE
    assert batched.input_ids.shape[1] % PAD_MULTIPLE == 0
    assert batched.input_ids.shape[1] > alone.input_ids.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.predict(alone)[0][0], model.predict(batched)[0][0],
                                   atol=1e-5, rtol=0)


def test_pairs_and_batches_keep_groups_whole() -> None:
    examples = [item(label=1), item("King", 0), item("Paris", 0), item(group="q2", label=0)]
    assert pair_indices(examples) == ([0, 0], [1, 2])
    # without group ids, pairs stay within a question (they were made across questions)
    ungrouped = [item(label=1, group=""), item("Paris", 0, group=""),
                 item(label=1, group="", question="Q2?"), item("King", 0, group="",
                                                               question="Q2?")]
    assert pair_indices(ungrouped) == ([0, 2], [1, 3])
    # ten groups of 1-3 examples, each its own id, and one of 6 (cut to the batch size)
    groups = [[item(group=f"g{i}", label=j == 0) for j in range(1 + i % 3)] for i in range(10)]
    groups.append([item(group="big", label=j == 0) for j in range(6)])
    out = batches(groups, 4, __import__("random").Random(0))
    assert all(0 < len(b) <= 4 for b in out)
    batch_of: dict[str, set[int]] = {}
    for n, b in enumerate(out):
        for ex in b:
            batch_of.setdefault(ex.group, set()).add(n)
    assert all(len(where) == 1 for where in batch_of.values()), batch_of  # never split
    sizes = {g: sum(ex.group == g for b in out for ex in b) for g in batch_of}
    assert sizes == {**{f"g{i}": 1 + i % 3 for i in range(10)}, "big": 4}


def test_training_learns_a_toy_task_saves_and_reloads(tiny_encoder, tokenizer, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Right when the answer is "Rollo": a few steps move the scores the right way."""
    groups = [[item("Rollo", 1, f"g{i}"), item("Normandy", 0, f"g{i}"),
               item("France", 0, f"g{i}")] for i in range(12)]
    model = Verifier(tiny_encoder(len(tokenizer)), members=3, hidden=8)
    probe = encode(tokenizer, [item("Rollo").judged, item("France", 0).judged])
    cfg = TrainConfig(epochs=10, batch_examples=6, lr=3e-3, head_lr=1e-2, warmup_steps=2,
                      members=3, hidden=8, save_every=7, cpu_dtype="fp32", max_tokens=96)
    record = train_verifier(model, tokenizer, groups, cfg, out=tmp_path / "rm",
                            extra={"base": "tiny"}, progress=False)
    assert record["steps"] == record["total_steps"] == 60
    assert "raise --batch" not in caplog.text  # groups of 3 fit batches of 6
    # served as trained: it scores candidates cut where its training cut them (was always 192)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["max_tokens"] == 96
    right, wrong = model.predict(probe)[0].tolist()
    assert right > wrong + 0.2
    again, tok, config = load_verifier(tmp_path / "rm")
    assert config["kind"] == "cross-encoder" and config["training"]["base"] == "tiny"
    assert torch.allclose(again.predict(probe)[0], model.predict(probe)[0], atol=0.02)
    # the step reached is saved with the weights (one swap), with what run it is
    assert config["progress"]["step"] == 60 and not (tmp_path / "rm" / "progress.json").exists()
    again_record = train_verifier(model, tokenizer, groups, cfg, out=tmp_path / "rm",
                                  extra={"base": "tiny"}, progress=False)
    assert again_record["seconds_this_run"] == 0.0  # the same run, finished: nothing to do
    # other settings or data are another run: it trained nothing and said it was done before
    from dataclasses import replace

    from citeqa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"other settings or data \(config: lr was 0.003, now"):
        train_verifier(model, tokenizer, groups, replace(cfg, lr=1e-3), out=tmp_path / "rm",
                       extra={"base": "tiny"}, progress=False)
    with pytest.raises(ConfigError, match=r"extra: base was 'tiny', now 'other'"):
        train_verifier(model, tokenizer, groups, cfg, out=tmp_path / "rm",
                       extra={"base": "other"}, progress=False)
    assert train_verifier(model, tokenizer, groups, replace(cfg, save_every=3),
                          out=tmp_path / "rm", extra={"base": "tiny"}, progress=False
                          )["seconds_this_run"] == 0.0  # how often it saves is no difference


def test_saving_leaves_the_model_it_saves_as_it_was(tiny_encoder, tokenizer,
                                                    tmp_path: Path) -> None:
    """The encoder is written in bf16, but the model training goes on with stays fp32: saving
    rounded it to bf16 and back at every --save-every."""
    model = Verifier(tiny_encoder(len(tokenizer)), 2, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_verifier(tmp_path / "rm", model, tokenizer, {})
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v)
               for k, v in before.items())
    loaded, _, _ = load_verifier(tmp_path / "rm")
    weight = next(k for k in before if k.startswith("encoder.") and before[k].dim() == 2)
    assert torch.allclose(loaded.state_dict()[weight].float(), before[weight], rtol=1e-2,
                          atol=1e-2)  # the saved copy: bf16


def test_a_damaged_directory_says_what_to_do(tiny_encoder, tmp_path: Path, tokenizer) -> None:
    from citeqa.errors import ModelError

    with pytest.raises(ModelError, match="citeqa train reward"):
        load_verifier(tmp_path / "missing")
    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    (tmp_path / "rm" / "heads.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelError, match="heads.safetensors"):
        load_verifier(tmp_path / "rm")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"format": 7}))
    with pytest.raises(ModelError, match="format"):
        load_verifier(tmp_path / "old")


def test_a_reward_directory_without_its_vocabulary_or_with_a_bad_length_is_refused(
        tiny_encoder, tmp_path: Path, tokenizer) -> None:
    """Without encoder/tokenizer.json, transformers made a tokenizer of 5 special tokens: every
    word [UNK], every score meaningless, and no word said. A max_tokens past the encoder's
    positions failed each long question (a 500); one not a multiple of 16, every question."""
    from citeqa.errors import ModelError

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    VerifierScorer(tmp_path / "rm", cpu_dtype="fp32", combined=False)  # loads
    limit = load_verifier(tmp_path / "rm")[0].encoder.config.max_position_embeddings
    for bad in ("lots", None, 200, 0, limit + 16, True):
        (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "max_tokens": bad}))
        with pytest.raises(ModelError, match="max_tokens must be a multiple of 16"):
            VerifierScorer(tmp_path / "rm", cpu_dtype="fp32", combined=False)
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    vocabulary = [p for p in (tmp_path / "rm" / "encoder").iterdir()
                  if p.name in ("tokenizer.json", "vocab.txt")]
    assert vocabulary
    for p in vocabulary:
        p.unlink()
    with pytest.raises(ModelError, match="tokens for an encoder of"):
        load_verifier(tmp_path / "rm")


def test_scorer_reads_the_passage_around_each_quote_and_calibrates(tiny_encoder, tokenizer,
                                                                   tmp_path: Path) -> None:
    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 3, 8), tokenizer, {})
    scorer = load_scorer(str(tmp_path / "rm"), cpu_dtype="fp32")
    assert isinstance(scorer, VerifierScorer) and scorer.threshold is None
    doc = Document("d", "Normans", "n.txt", TEXT)
    quote = Quote(QUOTE, "d", "Normans", "n.txt", Q0, Q1)
    cands = [Candidate("Rollo", quote), Candidate("", None)]
    out = scorer.score("Who led?", cands, {"d": doc}.__getitem__)
    assert 0 < out[0].score < 1 and out[0].uncertainty is not None and out[1].score == 0.0
    j = judged("Who led?", cands[0], {"d": doc}.__getitem__)
    assert j.before and TEXT.startswith(j.before) and j.after.startswith(" The Norman")
    # calibration with the verifier's scores
    from citeqa.training.reward_cli import calibrate_dir

    data = tmp_path / "cal.jsonl"
    rng = np.random.default_rng(0)
    with data.open("w") as f:
        write_examples(f, [item("Rollo" if rng.random() < 0.6 else "France",
                                label=0, group=f"c{i}") for i in range(40)])
    examples = load_verifier_data(data).examples
    examples = [Example(e.judged, int(e.judged.answer == "Rollo"), e.golds, e.group, "")
                for e in examples]
    with data.open("w") as f:
        write_examples(f, examples)
    summary = calibrate_dir([data], tmp_path / "rm", target=0.55, delta=0.2, cpu_dtype="fp32")
    assert summary["n"] == 40 and (tmp_path / "rm" / "calibration.json").is_file()
    assert VerifierScorer(tmp_path / "rm", cpu_dtype="fp32").calibration is not None
    direct = calibrate_threshold(
        scorer.predict([e.judged for e in examples])[0], [e.label for e in examples],
        target_accuracy=0.55, delta=0.2, min_answered=2)
    assert summary["target_accuracy"] == direct.target_accuracy == 0.55
    # the stored calibration is the one the verifier's own scores give
    assert direct.threshold is not None and 0 < direct.coverage < 1
    assert summary["threshold"] == pytest.approx(direct.threshold)
    assert summary["coverage"] == pytest.approx(direct.coverage)
    # a calibration.json cut short is what calibrate replaces, not what stops it (its error
    # said to run calibrate, which then failed on it)
    cal = tmp_path / "rm" / "calibration.json"
    cal.write_text(cal.read_text()[:100])
    again = calibrate_dir([data], tmp_path / "rm", target=0.55, delta=0.2, cpu_dtype="fp32")
    assert again["threshold"] == summary["threshold"]
    assert VerifierScorer(tmp_path / "rm", cpu_dtype="fp32").calibration is not None
    chosen = calibrate_dir([data], tmp_path / "rm", target=0.8, delta=0.2,
                           targets=[0.5, 0.55], min_coverage=0.0)
    assert chosen["family_delta"] == 0.2 and chosen["delta"] == pytest.approx(0.1)
    assert chosen["targets_tried"] == [0.5, 0.55] and chosen["min_coverage"] == 0.0
    # data of the calibration articles (or of articles outside the split) calibrates; of the
    # training or evaluation articles it is refused before anything is written
    for article, refused in (("Packet_switching", False), ("My_own_notes", False),
                             ("Harvard_University", True), ("Normans", True)):
        marked = tmp_path / f"marked-{article}.jsonl"
        marked.write_text(data.read_text() + json.dumps(
            {"kind": "question", "qid": "c0", "answerable": True, "article": article,
             "generator": "g", "n": 1}) + "\n")
        (tmp_path / "rm" / "calibration.json").unlink()
        if refused:
            with pytest.raises(ConfigError, match=f"training or evaluation articles .{article}"):
                calibrate_dir([marked], tmp_path / "rm", target=0.55, delta=0.2)
            assert not (tmp_path / "rm" / "calibration.json").exists()
            calibrate_dir([data], tmp_path / "rm", target=0.55, delta=0.2)
        else:
            assert calibrate_dir([marked], tmp_path / "rm", target=0.55, delta=0.2)["n"] == 40


@pytest.fixture()
def calibrated(tiny_encoder, tokenizer, tmp_path: Path) -> Path:
    """A tiny verifier directory calibrated on 60 candidates with noisy labels."""
    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 3, 8), tokenizer, {})
    rng = np.random.default_rng(5)
    answers = ["Rollo", "France", "Normandy", "Charles"]
    examples = [Example(item(str(rng.choice(answers))).judged, int(rng.random() < 0.6), (),
                        f"c{i}", "") for i in range(60)]
    with (tmp_path / "cal.jsonl").open("w") as f:
        write_examples(f, examples)
    from citeqa.training.reward_cli import calibrate_dir

    summary = calibrate_dir([tmp_path / "cal.jsonl"], tmp_path / "rm", target=0.55, delta=0.1,
                            cpu_dtype="fp32")
    assert summary["n"] == 60
    return tmp_path / "rm"


def test_two_files_answering_the_same_questions_are_two_sets_of_questions(
        calibrated: Path) -> None:
    """Questions were grouped by id across the --data files: two generators' answers to the
    same questions were scored as one question each, the best of both, certified for neither;
    a file given twice counted its candidate-less questions twice, the others once."""
    from citeqa.training.reward_cli import calibrate_dir

    cal = calibrated.parent / "cal.jsonl"
    other = calibrated.parent / "other.jsonl"  # the same questions, every answer wrong
    examples = load_verifier_data(cal).examples
    with other.open("w") as f:
        write_examples(f, [Example(e.judged, 0, e.golds, e.group, "") for e in examples])
        f.write(json.dumps({"kind": "question", "qid": "none-1", "answerable": True}) + "\n")
    alone = calibrate_dir([cal], calibrated, target=0.55, delta=0.1)
    both = calibrate_dir([cal, other], calibrated, target=0.55, delta=0.1)
    assert both["n"] == 60 + 60 + 1  # the question without a candidate: a decline, counted
    assert both["oracle_accuracy"] == pytest.approx(alone["oracle_accuracy"] * 60 / 121)
    (calibrated.parent / "hard.jsonl").hardlink_to(cal)
    (calibrated.parent / "soft.jsonl").symlink_to(cal)
    for again in ("./cal.jsonl", "hard.jsonl", "soft.jsonl"):
        with pytest.raises(ConfigError, match="a file given before"):
            calibrate_dir([cal, calibrated.parent / again], calibrated, target=0.55, delta=0.1)


def test_a_calibration_certifying_nothing_says_so_and_what_it_replaced(
        calibrated: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The review's: `citeqa calibrate` on one question printed "threshold": null and wrote it
    over a calibration that certified 0.0564 without a word (a server then answered every
    question); its answerable_share counted golds of no word ("", "the") answerable."""
    from citeqa.training.reward_cli import calibrate_dir

    right = calibrated.parent / "right.jsonl"
    with right.open("w") as f:  # 40 questions answered right: certified at 0.8
        write_examples(f, [Example(item().judged, 1, ("Rollo",), f"r{i}", "") for i in range(40)])
    with caplog.at_level("WARNING"):
        calibrate_dir([right], calibrated, target=0.8, delta=0.1, cpu_dtype="fp32")
    assert not caplog.records
    before = json.loads((calibrated / "calibration.json").read_text())["threshold"]
    assert before is not None
    tiny = calibrated.parent / "tiny.jsonl"
    with tiny.open("w") as f:
        write_examples(f, [Example(item().judged, 1, ("the",), "t1", ""),
                           Example(item().judged, 0, ("",), "t2", ""),
                           Example(item().judged, 1, ("Rollo",), "t3", "")])
    with caplog.at_level("WARNING"):
        summary = calibrate_dir([tiny], calibrated, target=0.8, delta=0.1, cpu_dtype="fp32")
    assert summary["threshold"] is None and summary["answerable_share"] == pytest.approx(1 / 3)
    said = caplog.records[-1].getMessage()
    assert said.startswith("no threshold is certified at target 0.8 on these 3 questions")
    assert f"which certified threshold {before:.4g})" in said


def test_calibration_round_trip_and_monotone_threshold_for(calibrated: Path) -> None:
    scorer = VerifierScorer(calibrated, cpu_dtype="fp32")
    body = json.loads((calibrated / "calibration.json").read_text())
    assert len(body["scores"]) == len(body["correct"]) == 60
    thr = scorer.threshold
    assert thr == (math.inf if body["threshold"] is None else body["threshold"])
    values = [scorer.threshold_for(t) for t in (0.5, 0.55, 0.6, 0.7, 0.8, 0.9)]
    assert values == sorted(values), values  # asking for more never answers more
    assert scorer.threshold_for(0.99) == math.inf  # 60 questions cannot certify 99 %
    # an informative calibration (400 questions, right with probability = score), where the
    # targets are certified at distinct, increasing thresholds
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    body.update(scores=scores.tolist(), correct=(rng.random(400) < scores).tolist())
    (calibrated / "calibration.json").write_text(json.dumps(body))
    scorer = VerifierScorer(calibrated, cpu_dtype="fp32")
    values = [scorer.threshold_for(t) for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert all(math.isfinite(v) for v in values[:3]) and len(set(values)) >= 4, values
    assert values == sorted(values), values


def test_a_target_that_fails_at_its_start_does_not_decline_the_targets_above_it() -> None:
    """A walk starts at the fewest answers that can pass its target: here 0.63's walk fails at
    its start (5 answered, 2 wrong) while 0.64's, which must start later, reaches the 50-answer
    block and certifies it. A running maximum carried 0.63's inf up to 0.64 and beyond; now
    0.63 takes 0.64's threshold (certified for 0.64, so for it), monotone."""
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import TARGET_GRID, _grid_thresholds

    scores = (0.9,) * 5 + (0.8,) * 45 + (0.1,) * 50
    correct = (True,) * 3 + (False,) * 2 + (True,) * 45 + (False,) * 50
    grid = _grid_thresholds(scores, correct, 0.1, 1)
    own = [calibrate_threshold(scores, correct, target_accuracy=round(k * TARGET_GRID, 6),
                               delta=0.1).threshold for k in range(1, len(grid) + 1)]
    assert own[62] == math.inf and own[63] == 0.8  # targets 0.63 and 0.64
    assert grid[63] == 0.8 and grid[79] == 0.8
    assert grid[49:64] == (0.8,) * 15  # 0.50 ... 0.64: certified by 0.64's test
    assert list(grid[49:]) == sorted(grid[49:])  # monotone, inf at the top
    assert all(grid[k] == min(own[k:]) for k in range(49, len(grid)))


def test_no_target_is_handed_a_threshold_certified_only_for_a_lower_one() -> None:
    """0.50's walk ends after 4 answers (the 5th is wrong), above a block of 100 tied right
    answers; 0.64's and up start below the block and certify all of it. A running maximum
    gave 0.64-0.96 0.50's threshold: 4 answers, p = 0.41 at 0.80 and 0.66 at 0.90."""
    from citeqa.reward.calibrate import calibrate_threshold
    from citeqa.reward.scorer import TARGET_GRID, _grid_thresholds

    scores = (0.9, 0.89, 0.88, 0.87, 0.86) + (0.5,) * 100
    correct = (True,) * 4 + (False,) + (True,) * 100
    grid = _grid_thresholds(scores, correct, 0.1, 1)
    own = [calibrate_threshold(scores, correct, target_accuracy=round(k * TARGET_GRID, 6),
                               delta=0.1, min_answered=1).threshold
           for k in range(1, len(grid) + 1)]
    assert own[49] == 0.87 and own[79] == own[89] == 0.5  # the walks of 0.50, 0.80, 0.90
    assert grid[49] == grid[79] == grid[89] == 0.5  # 104 of 105 right: certified for all
    assert list(grid[49:]) == sorted(grid[49:])
    assert all(grid[k] in own[k:] for k in range(49, len(grid)))  # each certified for k or above


def test_thresholds_are_searched_once_per_calibration_and_then_looked_up(
        calibrated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import citeqa.reward.scorer as scorer_module

    searches = []
    real = scorer_module.calibrate_threshold
    monkeypatch.setattr(scorer_module, "calibrate_threshold",
                        lambda *a, **k: searches.append(k["target_accuracy"]) or real(*a, **k))
    scorer_module._grid_thresholds.cache_clear()
    scorer = VerifierScorer(calibrated, cpu_dtype="fp32")
    first = [threading.Thread(target=scorer.threshold_for, args=(0.8,)) for _ in range(4)]
    for t in first:
        t.start()
    for t in first:
        t.join()
    assert len(searches) == scorer_module.GRID_POINTS  # once, though four asked at once
    for i in range(40):  # ever new targets: lookups only
        scorer.threshold_for(0.6 + 0.00025 * (i + 1))
    assert len(searches) == scorer_module.GRID_POINTS
    assert scorer.threshold_for(0.5123) == scorer.threshold_for(0.52)  # which certifies it too
    assert scorer.threshold_for(0.995) == math.inf  # no grid point below 1 certifies it
    # a target below the first grid point takes its threshold (it took the last one's, 0.99)
    assert scorer.threshold_for(4e-9) == scorer.threshold_for(0.01)
    for bad in (0.0, 1.0, math.nan, -0.005):
        with pytest.raises(ValueError, match="must be in"):
            scorer.threshold_for(bad)


def test_threshold_for_needs_calibration_and_a_corrupt_one_is_named(tiny_encoder, tokenizer,
                                                                    tmp_path: Path) -> None:
    from citeqa.errors import ModelError

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    with pytest.raises(ModelError, match="citeqa calibrate"):
        VerifierScorer(tmp_path / "rm", cpu_dtype="fp32").threshold_for(0.8)
    (tmp_path / "rm" / "calibration.json").write_text('{"scores": [1]}')
    with pytest.raises(ModelError, match="rerun `citeqa calibrate"):
        VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")
    good = {**calibrate_threshold([0.9, 0.2], [True, False], target_accuracy=0.5).to_json(),
            "scores": [0.9, 0.2], "correct": [True, False], "min_answered": 1}
    (tmp_path / "rm" / "calibration.json").write_text(json.dumps(good))
    VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")  # loads
    # what made every target_accuracy request a 400 blaming the request
    # ... and a threshold that no Learn-then-Test gives, or labels that are not booleans
    # (a NaN threshold declined everything, -0.5 answered everything, "no" read as right)
    # a question no candidate answered is a null score (declined at any threshold): it loads
    (tmp_path / "rm" / "calibration.json").write_text(json.dumps(
        {**good, "scores": [0.9, None, 0.2], "correct": [True, False, False]}))
    record = VerifierScorer(tmp_path / "rm", cpu_dtype="fp32").calibration
    assert record is not None and record.scores == (0.9, -math.inf, 0.2)
    for bad in ({"scores": [float("nan"), 0.2]}, {"delta": 0}, {"min_answered": 0},
                {"scores": [float("inf"), 0.2]}, {"delta": 1}, {"target_accuracy": 1},
                {"target_accuracy": 0}, {"scores": [], "correct": []},
                {"min_answered": float("inf")},  # (1e400 in the file: an OverflowError)
                {"threshold": float("nan")}, {"threshold": -0.5}, {"threshold": 7.0},
                {"threshold": float("-inf")}, {"correct": ["no", False]}):
        (tmp_path / "rm" / "calibration.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(ModelError, match="is corrupt"):
            VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")
    # (the check is a range: the message said "not among the scores' values")
    (tmp_path / "rm" / "calibration.json").write_text(json.dumps({**good, "threshold": 7.0}))
    with pytest.raises(ModelError, match="7.0 lies outside the scores' range"):
        VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")


def test_groups_larger_than_a_batch_are_said_to_be_cut(tiny_encoder, tokenizer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    groups = [[item(a, int(a == "Rollo"), f"g{i}") for a in ("Normandy", "France", "Rollo")]
              for i in range(2)]
    cfg = TrainConfig(epochs=1, batch_examples=2, members=1, hidden=4, cpu_dtype="fp32")
    train_verifier(Verifier(tiny_encoder(len(tokenizer)), members=1, hidden=4), tokenizer,
                   groups, cfg, progress=False)
    assert ("2 question groups hold more candidates than --batch 2: only their first 2 are "
            "trained on; raise --batch to 3") in caplog.text


@pytest.mark.parametrize("damage", ["members", "no_members", "truncated_encoder",
                                    "pickled_encoder", "members_0", "hidden_-1",
                                    "members_1e400", "encoder_wider", "encoder_deeper",
                                    "encoder_layer_missing", "encoder_of_another_model"])
def test_a_damaged_model_directory_is_a_model_error(tiny_encoder, tokenizer, tmp_path: Path,
                                                    damage: str) -> None:
    """Each was a raw RuntimeError / KeyError / SafetensorError ("RuntimeError; see the server
    log" over REST), or a pickle read."""
    from citeqa.errors import ModelError

    rm = tmp_path / "rm"
    save_verifier(rm, Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    config = json.loads((rm / "config.json").read_text())
    weights = rm / "encoder" / "model.safetensors"
    if damage == "members":
        (rm / "config.json").write_text(json.dumps({**config, "members": 5}))
    elif damage == "no_members":
        del config["members"]
        (rm / "config.json").write_text(json.dumps(config))
    elif damage == "truncated_encoder":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage in ("members_0", "hidden_-1", "members_1e400"):  # (a ValueError, a RuntimeError,
        key, value = damage.split("_")  # an OverflowError)
        (rm / "config.json").write_text(json.dumps(config).replace(
            f'"{key}": {config[key]}', f'"{key}": {value}'))
    elif damage.startswith("encoder_"):  # loaded with random weights where they were missing
        from safetensors.torch import load_file, save_file

        encoder_config = json.loads((rm / "encoder" / "config.json").read_text())
        if damage == "encoder_layer_missing":
            tensors = load_file(str(weights))
            save_file({k: v for k, v in tensors.items() if not k.startswith("encoder.layer.0.")},
                      str(weights))
        else:
            change = {"encoder_wider": {"hidden_size": 2 * encoder_config["hidden_size"]},
                      "encoder_deeper": {"num_hidden_layers": 9},
                      "encoder_of_another_model": {"model_type": "gpt2"}}[damage]
            (rm / "encoder" / "config.json").write_text(json.dumps({**encoder_config,
                                                                    **change}))
    else:  # only a pytorch_model.bin (a pickle) where the weights should be
        torch.save(torch.nn.Linear(1, 1).state_dict(), rm / "encoder" / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(ModelError, match="retrain|train"):
        load_verifier(rm)


def test_best_per_question_follows_the_pipeline_choice() -> None:
    from citeqa.reward.scorer import best_per_question

    groups = [
        [(0.9, False, True), (0.4, True, False), (0.6, True, True)],  # best verified: 0.6
        [(0.8, False, True)],  # nothing verified: always declined
    ]
    scores, correct = best_per_question(groups)
    assert scores.tolist() == [0.6, -math.inf] and correct.tolist() == [True, False]
    # a NaN-scored candidate is never given (pipeline._no_nan_scores), wherever it stands: it
    # was picked when it came first (and calibration then stopped on the NaN)
    for group in ([(math.nan, True, False), (0.3, True, True)],
                  [(0.3, True, True), (math.nan, True, False)]):
        assert best_per_question([group])[0].tolist() == [0.3]
    assert best_per_question([[(math.nan, True, True)]])[0].tolist() == [-math.inf]


def test_data_lines_groups_and_errors(tmp_path: Path) -> None:
    from citeqa.errors import SourceError

    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"group": "g1", "question": "Q?", "answer": "A", "quote": "A is so.",
                    "label": 1, "golds": ["A"]}) + "\n\n"
        + json.dumps({"qid": "g1", "question": "Q?", "answer": "B", "quote": "B.",
                      "label": 0}) + "\n"
        + json.dumps({"question": "Other?", "answer": "C", "quote": "C.", "label": False}) + "\n"
        + json.dumps({"kind": "question", "qid": "g1", "generator": {"model_id": "m"}}) + "\n")
    data = load_verifier_data(path)
    assert [len(g) for g in data.groups()] == [2, 1] and data.generators == [{"model_id": "m"}]
    assert data.examples[0].golds == ("A",) and data.examples[2].label == 0
    for bad, needle in [({"question": "Q?", "answer": "A", "quote": "x", "label": 3}, "label"),
                        ({"question": " ", "label": 1}, "question"),
                        ({"kind": "pair", "question": "Q?"}, "unknown kind"),
                        ({"question": "Q?", "label": 1, "golds": "A"}, "golds"),
                        ({"question": "Q?", "label": 1, "signals": {"x": "1"}}, "signals"),
                        ({"question": "Q?", "label": 1, "signals": [1.0]}, "signals")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(SourceError, match=rf"d\.jsonl:1: bad reward-data line.*{needle}"):
            load_verifier_data(path)
    with pytest.raises(SourceError, match="citeqa train reward-data"):
        load_verifier_data(tmp_path / "missing.jsonl")


def test_combined_with_generator_signals_fit_served_and_calibrated(tiny_encoder, tokenizer,
                                                                   tmp_path: Path) -> None:
    from citeqa.training.reward_cli import calibrate_dir, combine_dir

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 3, 8), tokenizer, {})
    rng = np.random.default_rng(3)
    examples = []
    for i in range(80):  # right answers come with confident generations here
        right = int(rng.random() < 0.4)
        lp = float(rng.uniform(-0.5, 0) if right else rng.uniform(-2.5, -0.3))
        examples.append(Example(item("Rollo" if i % 2 else "France").judged, right, (), f"c{i}",
                                "generator", {"mean_logprob": lp, "n_tokens": 12.0,
                                              "retrieval_score": 0.03, "logprob": 12 * lp}))
    data = tmp_path / "gen.jsonl"
    with data.open("w") as f:
        write_examples(f, examples)
    calibrate_dir([data], tmp_path / "rm", target=0.55, delta=0.2)
    figures = combine_dir([data], tmp_path / "rm")
    assert figures["candidates"] == 80 and figures["auroc_combined"] > figures["auroc_verifier"]
    assert figures["weights"]["mean_logprob"] > 0
    assert (tmp_path / "rm" / "combine.json").is_file()
    assert not (tmp_path / "rm" / "calibration.json").exists()  # its scores are stale now
    # a refit needs nothing of what it replaces: a broken combine.json (or one naming a reader
    # that is gone) sent users to `reward-combine`, which then failed on it too
    combined = (tmp_path / "rm" / "combine.json").read_text()
    (tmp_path / "rm" / "combine.json").write_text('{"format": 1, "inputs": ["verifier_logit"]}')
    (tmp_path / "rm" / "calibration.json").write_text("{")
    assert combine_dir([data], tmp_path / "rm") == figures
    assert (tmp_path / "rm" / "combine.json").read_text() == combined
    scorer = VerifierScorer(tmp_path / "rm", cpu_dtype="fp32")
    assert scorer.combiner is not None and "generator signals" in scorer.name
    doc = Document("d", "Normans", "n.txt", TEXT)
    quote = Quote(QUOTE, "d", "Normans", "n.txt", Q0, Q1)
    sure, unsure, silent = scorer.score("Who led?", [
        Candidate("Rollo", quote, logprob=-1.0, n_tokens=10),
        Candidate("Rollo", quote, logprob=-20.0, n_tokens=10),
        Candidate("Rollo", quote)], {"d": doc}.__getitem__)
    assert sure.score > silent.score > unsure.score  # no signal: the fitted mean
    assert scorer.score("Who led?", [Candidate("", None)])[0].score == 0.0
    summary = calibrate_dir([data], tmp_path / "rm", target=0.55, delta=0.2)
    stored = json.loads((tmp_path / "rm" / "calibration.json").read_text())["scores"]
    served, _ = VerifierScorer(tmp_path / "rm").judge(  # the compute type calibration used
        [e.judged for e in examples], [combine_signals.of(e.signals) for e in examples])
    assert summary["n"] == 80 and np.allclose(stored, served, atol=1e-6)


def test_combining_needs_generator_candidates_with_signals(tiny_encoder, tokenizer,
                                                           tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from citeqa.cli import app

    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 2, 4), tokenizer, {})
    data = tmp_path / "syn.jsonl"
    with data.open("w") as f:
        write_examples(f, [item(label=i % 2, group=f"g{i}") for i in range(20)])
    r = CliRunner().invoke(app, ["train", "reward-combine", "--data", str(data), "--reward",
                                 str(tmp_path / "rm")])
    assert r.exit_code == 2 and "reward-data --from generator" in r.output
    assert f"error: {data}: no candidate" in r.output  # the file, not [PosixPath('...')]
    assert not (tmp_path / "rm" / "combine.json").exists()


@pytest.mark.slow
def test_the_shipped_reward_model_is_a_calibrated_combined_verifier_with_a_card() -> None:
    from citeqa.reward.scorer import DEFAULT_DIR

    scorer = load_scorer("default", cpu_dtype="fp32")
    assert isinstance(scorer, VerifierScorer) and scorer.combiner is not None
    assert scorer.answerability is not None and scorer.combiner.uses_answerability
    assert scorer.threshold is not None and 0 < scorer.threshold < 1
    assert scorer.threshold_for(0.8) == math.inf  # 80 % is not certifiable: decline, not pretend
    card = (DEFAULT_DIR / "MODEL_CARD.md").read_text()
    assert "CC BY-SA 4.0" in card and "SQuAD" in card
    doc = Document("d", "Normans", "n.txt", TEXT)
    quote = Quote(QUOTE, "d", "Normans", "n.txt", Q0, Q1)
    out = scorer.score("Who was the leader of the Normans?",
                       [Candidate("Rollo", quote, logprob=-2.0, n_tokens=20, retrieval_score=0.03)],
                       {"d": doc}.__getitem__)
    assert 0 < out[0].score < 1 and out[0].uncertainty is not None


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tolerance", "kernel"),
                         [("bf16", 2e-3, None), ("fp32", 1e-5, "torch"), ("fp32", 1e-5, "onednn")])
def test_the_shipped_scorer_runs_lean_and_scores_as_transformers_forward(
        dtype: str, tolerance: float, kernel: str | None, monkeypatch) -> None:
    """Both cross-encoders take LeanEncoder in CPU bf16 and in fp32 (CPUs without fast bf16,
    with either fp32 product) and give the scores of transformers' forward over a batch with
    padding (candidates whose quotes differ in length)."""
    from citeqa.generation.cpu_linear import OnednnLinear, onednn_available
    from citeqa.lean_encoder import LeanEncoder
    from citeqa.reward.scorer import DEFAULT_DIR

    if kernel == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    if kernel is not None:
        monkeypatch.setenv("CITEQA_FP32_KERNEL", kernel)

    lean = VerifierScorer(DEFAULT_DIR, cpu_dtype=dtype)
    plain = VerifierScorer(DEFAULT_DIR, cpu_dtype=dtype, lean=False)
    assert lean.dtype == plain.dtype == dtype
    dense = plain.model.encoder.encoder.layer[0].output.dense
    assert isinstance(dense, OnednnLinear) == (kernel == "onednn")
    assert lean.answerability is not None and plain.answerability is not None
    assert isinstance(lean.model.encoder, LeanEncoder)
    assert isinstance(lean.answerability.model.encoder, LeanEncoder)
    assert not isinstance(plain.model.encoder, LeanEncoder)
    short = "Rollo led the Normans."  # a much shorter passage view: real padding in the batch
    docs = {"d": Document("d", "Normans", "n.txt", TEXT),
            "s": Document("s", "Rollo", "s.txt", short)}
    quotes = [Quote(TEXT[Q0:Q1], "d", "Normans", "n.txt", Q0, Q1),
              Quote(TEXT[:Q1], "d", "Normans", "n.txt", 0, Q1),
              Quote(short, "s", "Rollo", "s.txt", 0, len(short))]
    cands = [Candidate(answer, quote, logprob=-2.0, n_tokens=20, retrieval_score=0.03)
             for answer, quote in zip(("Rollo", "Normandy", "Rollo"), quotes, strict=True)]
    lengths = [int(n) for n in encode(lean.tokenizer, [judged("Who led the Normans?", c,
                                                              docs.__getitem__) for c in cands]
                                      ).attention_mask.sum(1)]
    assert max(lengths) - min(lengths) >= 20, lengths
    got = [c.score for c in lean.score("Who led the Normans?", cands, docs.__getitem__)]
    want = [c.score for c in plain.score("Who led the Normans?", cands, docs.__getitem__)]
    assert np.allclose(got, want, atol=tolerance, rtol=0), (got, want)
    assert len(set(np.round(got, 3))) == 3  # three different candidates, three scores


@pytest.mark.slow
def test_compiling_a_lean_scorer_compiles_transformers_forward_and_falls_back_to_lean(
        monkeypatch, caplog) -> None:
    from citeqa.lean_encoder import LeanEncoder
    from citeqa.reward.scorer import DEFAULT_DIR

    scorer = VerifierScorer(DEFAULT_DIR, cpu_dtype="bf16")
    lean = scorer.model.encoder
    seen = []

    def broken(module):
        seen.append(module)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr("citeqa.reward.scorer.compiled", broken)
    with caplog.at_level("WARNING"):
        scorer.compile()
    assert seen and not isinstance(seen[0], LeanEncoder) and seen[0] is lean.wrapped
    assert scorer.model.encoder is lean and "scores eagerly" in caplog.text


def _scored(scorer: VerifierScorer) -> list[float]:
    doc = Document("d", "Normans", "n.txt", TEXT)
    quote = Quote(QUOTE, "d", "Normans", "n.txt", Q0, Q1)
    cands = [Candidate(a, quote) for a in ("Rollo", "France", "King Charles III")]
    return [c.score for c in scorer.score("Who led?", cands, {"d": doc}.__getitem__)]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler (g++), and none is here")
def test_compiled_scorers_score_as_their_eager_ones(tiny_encoder, tokenizer,
                                                    tmp_path: Path) -> None:
    # Two encoders of one class in one process: compiled with frozen weights, neither may
    # reuse the other's graph (the shipped scorer compiles the verifier and the reader).
    for name, noise in (("a", 0.0), ("b", 0.5)):
        encoder = tiny_encoder(len(tokenizer))
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(noise * torch.randn_like(p))
        save_verifier(tmp_path / name, Verifier(encoder, 3, 8), tokenizer, {})
    eager = {n: load_scorer(str(tmp_path / n), cpu_dtype="fp32") for n in "ab"}
    fast = {n: load_scorer(str(tmp_path / n), cpu_dtype="fp32", compile=True) for n in "ab"}
    assert not np.allclose(_scored(eager["a"]), _scored(eager["b"]), atol=1e-2)
    for n in "ab":
        assert fast[n].name.endswith(", compiled") and not eager[n].name.endswith(", compiled")
        assert type(fast[n].model.encoder) is not type(eager[n].model.encoder)  # noqa: E721
        assert np.allclose(_scored(fast[n]), _scored(eager[n]), atol=1e-4)


def test_a_scorer_that_fails_to_compile_scores_eagerly_and_says_why(
        tiny_encoder, tokenizer, tmp_path: Path, monkeypatch, caplog) -> None:
    save_verifier(tmp_path / "rm", Verifier(tiny_encoder(len(tokenizer)), 3, 8), tokenizer, {})
    scorer = load_scorer(str(tmp_path / "rm"), cpu_dtype="fp32")
    before, encoder = _scored(scorer), scorer.model.encoder

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr("citeqa.reward.scorer.compiled", lambda module: Broken())
    with caplog.at_level("WARNING"):
        scorer.compile()
    assert "no C++ compiler found" in caplog.text and "scores eagerly" in caplog.text
    assert scorer.model.encoder is encoder and not scorer.name.endswith(", compiled")
    assert _scored(scorer) == before


def test_reward_compile_is_a_setting_off_by_default(monkeypatch) -> None:
    from citeqa.config import Settings

    assert Settings().config().reward.compile is False
    monkeypatch.setenv("CITEQA_REWARD_COMPILE", "1")
    assert Settings().config().reward.compile is True


def test_a_reward_directory_with_a_damaged_config_is_named_not_a_traceback(tmp_path: Path) -> None:
    from citeqa.errors import ModelError
    from citeqa.reward.scorer import load_scorer

    (tmp_path / "file").write_text("x")  # was "does not exist"
    with pytest.raises(ModelError, match="file is a file, not a model directory"):
        load_scorer(str(tmp_path / "file"))
    (tmp_path / "rm").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        load_scorer(str(tmp_path / "rm"))
    (tmp_path / "rm" / "config.json").write_text('{"format": 2, "ki')  # cut short
    with pytest.raises(ModelError, match=r"config.json is corrupt .*citeqa train reward"):
        load_scorer(str(tmp_path / "rm"))
    # a legacy (feature) model naming a feature no code computes: it loaded, and every
    # request then failed
    from citeqa.reward.features import FeatureSpec
    from citeqa.reward.model import RewardEnsemble, save_model

    spec = FeatureSpec(embeddings=False, scalars=("mean_logprob", "answer_lenght"))
    save_model(tmp_path / "legacy", RewardEnsemble(spec.dim, 3, 0), spec, {})
    with pytest.raises(ModelError, match=r"unknown scalar features \['answer_lenght'\]"):
        load_scorer(str(tmp_path / "legacy"))


def test_training_a_verifier_further_resumes_with_the_same_command(tiny_encoder, tokenizer,
                                                                   tmp_path: Path) -> None:
    """From a verifier --base, the run takes the base's heads (not --members); its rerun did
    not, and the same command was refused as "other settings"."""
    from citeqa.training.reward_cli import train_to_dir

    groups = [[item("Rollo", 1, f"g{i}"), item("France", 0, f"g{i}")] for i in range(4)]
    base = tmp_path / "base"
    train_verifier(Verifier(tiny_encoder(len(tokenizer)), members=2, hidden=8), tokenizer,
                   groups, TrainConfig(epochs=1, batch_examples=4, members=2, hidden=8,
                                       cpu_dtype="fp32", max_tokens=96),
                   out=base, extra={"base": "tiny"}, progress=False)
    data = tmp_path / "more.jsonl"
    data.write_text("".join(json.dumps(ex.to_json()) + "\n" for g in groups for ex in g))
    kw = {"epochs": 1, "batch_examples": 4, "cpu_dtype": "fp32", "max_tokens": 96}
    first = train_to_dir([data], tmp_path / "more", base=base, progress=False, cfg_kw=kw)
    again = train_to_dir([data], tmp_path / "more", base=base, progress=False, cfg_kw=kw)
    assert again["steps"] == first["steps"] and again["seconds_this_run"] == 0.0


def test_reward_data_of_one_label_is_refused_and_the_card_names_only_data_used(
        tmp_path: Path) -> None:
    """The training review's: `train reward` on right answers alone trained without a word;
    every card said the data of more-train.json had been seen, used or not."""
    from citeqa.training.reward_cli import train_to_dir, write_card

    data = tmp_path / "right.jsonl"
    with data.open("w") as f:
        write_examples(f, [item("Rollo", 1, f"g{i}") for i in range(4)])
    with pytest.raises(ConfigError, match=r"right.jsonl: only label 1 \(4 examples\); training "
                       r"needs right answers \(label 1\) and wrong ones"):
        train_to_dir([data], tmp_path / "rm", progress=False, cfg_kw={"cpu_dtype": "fp32"})
    assert not (tmp_path / "rm").exists()
    for name, named in (("mine.jsonl", False), ("more-train.json.rm.jsonl", True)):
        (tmp_path / name).with_suffix(".d").mkdir()
        write_card((tmp_path / name).with_suffix(".d"), "verifier",
                   {"data": [str(tmp_path / name)]})
        card = ((tmp_path / name).with_suffix(".d") / "MODEL_CARD.md").read_text()
        assert ("distractor paragraphs" in card) is named, card
        # as NOTICE says every card does: the packaged base's, or a place to write another's
        assert "keeps its own licence: {LICENCE: name the base encoder's licence" in card
    (tmp_path / "packaged.d").mkdir()
    write_card(tmp_path / "packaged.d", "verifier", {
        "data": [], "base": "sentence-transformers/all-MiniLM-L6-v2 (packaged)"})
    assert "keeps its own licence: Apache-2.0 (all-MiniLM-L6-v2)" in (
        tmp_path / "packaged.d" / "MODEL_CARD.md").read_text()


def test_the_reward_package_imports_no_eval_or_prompt_code() -> None:
    """Issue #14's layout: the reward model must not lean on the evaluation (its correctness
    rule, its data) nor on the prompt's heuristics; the commands that read datasets live in
    citeqa/training/ (reward/cli.py imported citeqa.evals while README said it did not, and
    answerability_train.py pulled evals, red-team and prompt code in through a data type)."""
    import subprocess
    import sys

    probe = ("import importlib, pkgutil, sys, citeqa.reward\n"
             "for m in pkgutil.iter_modules(citeqa.reward.__path__):\n"
             "    importlib.import_module('citeqa.reward.' + m.name)\n"
             "print(sorted(n for n in sys.modules if n.startswith(('citeqa.evals', "
             "'citeqa.redteam', 'citeqa.generation.prompt', 'citeqa.training'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # ... nor inside a function, where importing the module does not reach
    import ast
    from pathlib import Path

    import citeqa.reward

    banned = ("citeqa.evals", "citeqa.redteam", "citeqa.generation.prompt")
    found = []
    for path in sorted(Path(citeqa.reward.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative ones read from citeqa.reward
                package = "citeqa.reward".split(".")[:3 - node.level] if node.level else []
                module = ".".join([*package, *([node.module] if node.module else [])])
                names = [module, *(f"{module}.{a.name}" for a in node.names)]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names
                      if any(n == b or n.startswith(b + ".") for b in banned)]
    assert found == []


def test_a_target_between_grid_points_takes_the_next_ones_threshold_up_to_099() -> None:
    """A target off the 0.01 grid must take the threshold of the grid point above it (one
    below certifies less than was asked), and 0.99, the last point, its own (not inf)."""
    import types

    from citeqa.reward.scorer import Calibrated

    rng = np.random.default_rng(0)
    scores = rng.random(5000)
    right = rng.random(5000) < np.minimum(1.0, 1.6 * scores)  # surer the higher the score
    calibrated = Calibrated()
    calibrated.directory = Path("synthetic")
    calibrated.calibration = types.SimpleNamespace(  # type: ignore[assignment]
        scores=tuple(scores.tolist()), correct=tuple(right.tolist()), min_answered=1,
        calibration=types.SimpleNamespace(delta=0.1, threshold=None))
    below, above = calibrated.threshold_for(0.81), calibrated.threshold_for(0.82)
    assert below < above  # (distinct here, so the test can tell them apart)
    assert calibrated.threshold_for(0.8123) == above
    assert math.isfinite(calibrated.threshold_for(0.99))
    assert calibrated.threshold_for(0.985) == calibrated.threshold_for(0.99)
    assert calibrated.threshold_for(0.991) == math.inf
