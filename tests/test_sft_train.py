"""Supervised fine-tuning: loss only on the target, the serving prompt, a tiny run that learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import packaged_tokenizer, tiny_llama

from citeqa.config import GenerationConfig
from citeqa.generation.adapter import adapter_id
from citeqa.generation.hf import HFBackend
from citeqa.training.demos import Demo, DemoPassage, render_target
from citeqa.training.lora import LoRAConfig, inject_lora, lora_tensors
from citeqa.training.sft import (
    IGNORE,
    Example,
    TrainConfig,
    collate,
    encode_example,
    micro_batches,
    render_examples,
    run_sft,
    target_loss,
    train_lora,
)

GEN = GenerationConfig(answer_mode="span")  # the format evals/train_generator.sh trains


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer (converted once from the packaged GGUF: its tests are slow)."""
    return packaged_tokenizer()


tiny_model = tiny_llama


def _demo(i: int) -> Demo:
    facts = [
        ("Lyon", "silk", "The city of Lyon was famous for silk weaving in the 1800s."),
        ("Bergen", "fish", "Bergen grew rich on the dried fish trade with the Hanseatic League."),
        ("Porto", "wine", "Porto gave its name to the fortified wine shipped from its quays."),
        ("Ghent", "cloth", "Ghent was a centre of the medieval cloth industry of Flanders."),
    ]
    city, answer, sentence = facts[i]
    other = "Rivers carry boats. Markets sell bread and cheese on Saturdays."
    text = f"{city} lies on a river. {sentence} It has a large old town."
    return Demo(
        id=f"d{i}",
        question=f"What was {city} known for?",
        passages=(DemoPassage("Other", other, "o", 0), DemoPassage(city, text, city, 10)),
        gold=1,
        answer=answer,
        quote=sentence,
    )


DEMOS = [_demo(i) for i in range(4)]


@pytest.mark.slow
def test_only_target_tokens_carry_labels(tokenizer) -> None:
    messages, target = render_target(DEMOS[0], GEN)
    ex = encode_example(tokenizer, messages, target)
    labelled = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    start = labelled[0]
    assert labelled == list(range(start, len(ex.input_ids)))  # one contiguous tail
    reply = tokenizer(target, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    assert list(ex.labels[start:]) == reply == list(ex.input_ids[start:])
    assert tokenizer.decode(ex.input_ids[start:]) == target + "<|im_end|>"
    assert target == "Answer: silk\nQuote [2]: " + DEMOS[0].quote  # both modes: answer first
    # Everything before the target is exactly the prompt the serving backend feeds the model.
    backend = HFBackend(tiny_model(len(tokenizer)), tokenizer, "tiny")
    assert list(ex.input_ids[:start]) == backend.prompt_ids(messages)
    assert tokenizer.decode(ex.input_ids[:start]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_special_tokens_text_in_a_reply_is_learnt_as_text(tokenizer) -> None:
    """A quote holding '<|im_end|>' was tokenized as the end token mid-reply: it taught the
    model to stop inside quotes (the grammar makes it write that text as plain tokens)."""
    messages, _ = render_target(DEMOS[0], GEN)
    ex = encode_example(tokenizer, messages, "Answer: x\nQuote [1]: a <|im_end|> b")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = [label for label in ex.labels if label != IGNORE]
    assert reply.count(end) == 1 and reply[-1] == end
    assert tokenizer.decode(reply[:-1]) == "Answer: x\nQuote [1]: a <|im_end|> b"


def test_collate_pads_without_labels() -> None:
    from citeqa.training.sft import Example

    a = Example((5, 6, 7), (IGNORE, 6, 7))
    b = Example((5,), (5,))
    ids, mask, labels = collate([a, b], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]


@pytest.mark.slow
def test_target_loss_matches_transformers_loss(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    examples, _ = render_examples(DEMOS[:2], tokenizer, GEN, max_tokens=4096)
    for ex in examples:
        ids, mask, labels = collate([ex], pad_id=2)
        with torch.no_grad():
            total, n = target_loss(model, ids, mask, labels)
            reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert n == ex.target_tokens  # every target token is predicted once
        torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_padding_does_not_change_the_loss(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    examples, _ = render_examples(DEMOS[:2], tokenizer, GEN, max_tokens=4096)
    with torch.no_grad():
        alone = sum(target_loss(model, *collate([ex], 2))[0] for ex in examples)
        together, _ = target_loss(model, *collate(examples, 2))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fresh_lora_is_the_base_model(tokenizer) -> None:
    model = tiny_model(len(tokenizer))
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        inject_lora(model, LoRAConfig(r=4))
        after = model(ids).logits
    torch.testing.assert_close(after, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_tiny_training_lowers_the_loss(tokenizer) -> None:
    torch.set_num_threads(1)
    model = tiny_model(len(tokenizer))
    examples, dropped = render_examples(DEMOS, tokenizer, GEN, max_tokens=4096)
    assert len(examples) == 4 and not dropped
    cfg = TrainConfig(lr=2e-2, batch_size=4, micro_batch_size=2, max_steps=20, epochs=100)
    _, log = train_lora(model, examples, 2, cfg, LoRAConfig(r=8, alpha=16), progress=False)
    losses = [s["loss"] for s in log.steps]
    assert len(losses) == 20
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_run_sft_writes_adapter_log_and_card(tokenizer, tmp_path: Path) -> None:
    model = tiny_model(len(tokenizer))
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=2)
    record = run_sft(model, tokenizer, "tiny", DEMOS, tmp_path, GEN, cfg, LoRAConfig(r=4),
                     meta={"data": "inline"}, progress=False)
    assert record["steps"] == 2 and record["peak_rss_mb"] > 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter.safetensors", "adapter.json", "training_log.json", "MODEL_CARD.md"} <= files
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert len(log["history"]) == 2 and log["prompt"]["passage_chars"] == GEN.passage_chars
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "EVAL_METRICS" in card
    assert "keeps its own licence: " in card  # as NOTICE says every card does
    assert not any(p.suffix in {".pt", ".pkl", ".bin"} for p in tmp_path.iterdir())


@pytest.mark.slow
def test_cli_trains_a_local_model_whose_adapter_loads(tokenizer, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from citeqa.generation.adapter import apply_adapter
    from citeqa.generation.models import load_model
    from citeqa.training.cli import app
    from citeqa.training.demos import write_demos

    base_dir = tmp_path / "base"
    tiny_model(len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    write_demos(tmp_path / "demos.jsonl", DEMOS)
    made = "citeqa train generator-data --dataset my-squad1.json"
    (tmp_path / "demos.jsonl.stats.json").write_text(json.dumps(
        {"command": made, "split": "train", "articles": ["Normans", "Huguenot"]}))
    result = CliRunner().invoke(app, [
        "generator", "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "ad"),
        "--model", str(base_dir), "--device", "cpu", "--max-steps", "3", "--epochs", "5",
        "--batch-size", "2", "--lr", "0.02", "--threads", "1", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("trained 3 steps")
    rerun = CliRunner().invoke(app, [  # finished: it says so (it read as trained again)
        "generator", "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "ad"),
        "--model", str(base_dir), "--device", "cpu", "--max-steps", "3", "--epochs", "5",
        "--batch-size", "2", "--lr", "0.02", "--threads", "1", "--no-progress",
    ])
    assert rerun.exit_code == 0 and "already trained (nothing to do): trained 3 steps" in (
        rerun.output), rerun.output
    model, _, model_id = load_model(str(base_dir), tmp_path, device="cpu")
    ids = torch.arange(5, 30).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        apply_adapter(model, tmp_path / "ad")
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    card = (tmp_path / "ad" / "MODEL_CARD.md").read_text()
    assert model_id in card and "max steps 3" in card
    assert f"made by `{made}`" in card and "SQuAD 2.0 development set" not in card
    # the split the data says, not a placeholder whose example named the train articles
    assert "split: the train articles: Normans, Huguenot" in card and "{SPLIT" not in card
    assert f"CITEQA_ADAPTER={tmp_path / 'ad'}" in card  # (how the README serves one)
    assert oct((tmp_path / "ad" / "adapter.safetensors").stat().st_mode & 0o044) == oct(
        (tmp_path / "ad" / "adapter.json").stat().st_mode & 0o044)  # (it was owner-only)
    from citeqa.training.sft import _split_line

    (tmp_path / "demos.jsonl.stats.json").write_text(json.dumps(
        {"split": "all", "articles": ["Honey_bee"]}))  # (it read "the all articles")
    assert _split_line(str(tmp_path / "demos.jsonl")) == "every article of the data file: Honey_bee"

    served = HFBackend.load(str(base_dir), tmp_path, device="cpu", adapter=tmp_path / "ad",
                            cpu_dtype="fp32")  # exactly the merged weights
    assert served.model_id == f"{model_id}+{adapter_id(tmp_path / 'ad')}"
    assert adapter_id(tmp_path / "ad").startswith("lora-")
    with torch.no_grad():
        assert torch.allclose(served.model(ids).logits, after, atol=1e-5)

    missing = CliRunner().invoke(app, ["generator", "--data", str(tmp_path / "none.jsonl"),
                                       "--out", str(tmp_path / "x"), "--model", str(base_dir)])
    assert missing.exit_code == 2 and "generator-data" in missing.output
    from citeqa.cli import app as main_app

    skipping = CliRunner().invoke(app, ["generator", "--data", str(tmp_path / "none.jsonl"),
                                        "--out", str(tmp_path / "y"), "--start-step", "3"])
    assert skipping.exit_code == 2 and "--start-step needs --init-adapter" in skipping.output
    # an --out that is an input, or of the wrong kind, is refused before any work
    demos = tmp_path / "demos.jsonl"
    demos.write_text("{}\n")
    for args, said in (
            (["generator-data", "--dataset", str(demos), "--index", str(tmp_path),
              "--out", str(demos)], "is also the --dataset"),
            (["reward-data", "--from", "synthetic", "--dataset", str(demos), "--index",
              str(tmp_path), "--out", str(demos)], "is also the --dataset"),
            (["generator", "--data", str(demos), "--out", str(demos)], "is a file"),
            (["reward", "--data", str(demos), "--base", str(base_dir), "--out", str(base_dir)],
             "is also the --base"),
            (["answerability", "--squad", str(demos), "--out", str(demos)], "is a file"),
            (["generator-data", "--dataset", str(demos), "--index", str(tmp_path),
              "--out", str(tmp_path)], "is a folder"),
            # a file inside the index it reads (its manifest, say) was written over
            (["generator-data", "--dataset", str(tmp_path / "none.json"), "--index",
              str(tmp_path), "--out", str(tmp_path / "manifest.json")],
             "is inside the --index folder"),
            (["reward-data", "--from", "synthetic", "--dataset", str(tmp_path / "none.json"),
              "--index", str(tmp_path), "--out", str(tmp_path / "documents.jsonl")],
             "is inside the --index folder"),
            # under a file: it said so only after all the work
            (["generator-data", "--dataset", str(tmp_path / "none.json"), "--index",
              str(tmp_path / "none"), "--out", str(demos / "d.jsonl")],
             f"cannot be made: {demos} is a file")):
        r = CliRunner().invoke(main_app, ["train", *args])
        assert r.exit_code == 2 and said in r.output, (args, r.output)
    assert demos.read_text() == "{}\n"
    # refused as the command line is read, not after loading (tracebacks before)

    for args, said in ((["generator", "--device", "gpu0"], "'gpu0' is no torch device"),
                       (["generator", "--cpu-dtype", "fp16w"], "must be one of auto, bf16, fp32"),
                       (["reward", "--cpu-dtype", "bogus"], "not 'bogus'"),
                       (["answerability", "--cpu-dtype", "bf32"], "not 'bf32'")):
        r = CliRunner().invoke(main_app, ["train", *args, "--out", str(tmp_path / "z")])
        assert r.exit_code == 2 and said in r.output, (args, r.output)


def _trained(tokenizer, checkpoint_dir=None, max_steps=5, init_tensors=None, **kw):
    torch.set_num_threads(1)
    model = tiny_model(len(tokenizer))
    examples, _ = render_examples(DEMOS, tokenizer, GEN, max_tokens=4096)
    cfg = TrainConfig(**{"lr": 1e-2, "batch_size": 2, "max_steps": max_steps, "epochs": 10,
                         "save_every": 2, **kw})
    wrapped, log = train_lora(model, examples, 2, cfg, LoRAConfig(r=4), progress=False,
                              checkpoint_dir=checkpoint_dir, init=init_tensors)
    return {n: t.clone() for n, t in lora_tensors(wrapped).items()}, log


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_adapter(tokenizer, tmp_path: Path,
                                                        monkeypatch) -> None:
    from citeqa.training import sft

    straight, straight_log = _trained(tokenizer)
    calls = {"n": 0}
    real = sft.collate

    def crash_in_step_3(*args, **kwargs):  # 2 forward passes a step
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "collate", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        _trained(tokenizer, tmp_path)
    monkeypatch.setattr(sft, "collate", real)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # saved every 2 steps; step 3 never finished
    resumed, log = _trained(tokenizer, tmp_path)
    assert [s["step"] for s in log.steps] == [1, 2, 3, 4, 5]
    assert [s["loss"] for s in log.steps] == pytest.approx([s["loss"] for s in straight_log.steps])
    for name, t in straight.items():
        assert torch.allclose(resumed[name], t, atol=1e-6), name
    with pytest.raises(ValueError, match="other data or settings"):
        _trained(tokenizer, tmp_path, lr=5e-3)  # the finished run's checkpoint, other settings
    with pytest.raises(ValueError, match="other data or settings"):  # other base weights
        train_lora(tiny_model(len(tokenizer), seed=1), render_examples(
            DEMOS, tokenizer, GEN, max_tokens=4096)[0], 2, TrainConfig(
            lr=1e-2, batch_size=2, max_steps=5, epochs=10, save_every=2), LoRAConfig(r=4),
            progress=False, checkpoint_dir=tmp_path, base="another-base")


@pytest.mark.slow
def test_a_run_resumes_with_another_micro_batch_size(tokenizer, tmp_path: Path) -> None:
    # micro-batches only regroup a step's examples (padding changes float rounding, which
    # Adam's first steps amplify on this tiny model): a resumed run may change them
    _, first = _trained(tokenizer, tmp_path, max_steps=2, micro_batch_size=1)
    _, log = _trained(tokenizer, tmp_path, micro_batch_size=2)
    assert [s["step"] for s in log.steps] == [1, 2, 3, 4, 5]
    assert log.steps[:2] == first.steps  # read back from the checkpoint, not trained again
    _, straight = _trained(tokenizer, micro_batch_size=1)
    assert [s["loss"] for s in log.steps] == pytest.approx(
        [s["loss"] for s in straight.steps], rel=1e-2)


@pytest.mark.slow
def test_a_checkpoint_cut_mid_swap_is_still_read(tokenizer, tmp_path: Path) -> None:
    _trained(tokenizer, tmp_path, max_steps=2)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # killed between renames
    _, log = _trained(tokenizer, tmp_path, max_steps=3)
    assert [s["step"] for s in log.steps] == [1, 2, 3] and log.steps[0]["seconds"] <= 60


@pytest.mark.slow
def test_a_max_steps_below_the_saved_step_is_refused(tokenizer, tmp_path: Path) -> None:
    """It trained 0 steps and wrote the checkpoint's adapter as one of 3 steps."""
    _trained(tokenizer, tmp_path, max_steps=4)  # cut short: its checkpoint (step 4) is kept
    with pytest.raises(ValueError, match="at step 4, past the 3 steps this run trains"):
        _trained(tokenizer, tmp_path, max_steps=3)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_said_to_be_so(tokenizer, tmp_path: Path) -> None:
    _trained(tokenizer, tmp_path, max_steps=2)
    lora = tmp_path / "checkpoint" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:50])  # was a SafetensorError traceback
    with pytest.raises(ValueError, match="checkpoint in .* is damaged .* remove it"):
        _trained(tokenizer, tmp_path, max_steps=3)


@pytest.mark.slow
def test_a_finished_adapter_is_neither_retrained_nor_replaced_by_another_run(
        tokenizer, tmp_path: Path) -> None:
    """The checkpoint is gone once a run is done: a later run into the same --out trained from
    scratch and replaced the adapter, whatever its data or settings."""
    def run(lr: float) -> dict:
        return run_sft(tiny_model(len(tokenizer)), tokenizer, "tiny", DEMOS, tmp_path, GEN,
                       TrainConfig(lr=lr, batch_size=2, epochs=1), LoRAConfig(r=4),
                       progress=False)

    first = run(1e-2)
    weights = (tmp_path / "adapter.safetensors").read_bytes()
    again = run(1e-2)  # the same run: nothing to do, the same record
    assert again["run_key"] == first["run_key"] and again["history"] == first["history"]
    assert first["trained_now"] == len(first["history"]) and again["trained_now"] == 0
    with pytest.raises(ValueError, match="holds an adapter trained by another run"):
        run(5e-2)
    assert (tmp_path / "adapter.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_a_rerun_after_a_crash_before_the_adapter_writes_it_and_says_so(
        tokenizer, tmp_path: Path, monkeypatch) -> None:
    """Killed after its last checkpoint but before the adapter was saved, a rerun trains no
    step and writes the adapter: it was reported "already trained (nothing to do)"."""
    import citeqa.training.sft as sft

    def run() -> dict:
        return run_sft(tiny_model(len(tokenizer)), tokenizer, "tiny", DEMOS, tmp_path, GEN,
                       TrainConfig(lr=1e-2, batch_size=2, max_steps=3, save_every=1),
                       LoRAConfig(r=4), progress=False)

    saving = sft.save_adapter

    def killed(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "save_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert not (tmp_path / "adapter.safetensors").exists()
    monkeypatch.setattr(sft, "save_adapter", saving)
    record = run()
    assert record["trained_now"] == 0 and not record.get("nothing_to_do")
    assert (tmp_path / "adapter.safetensors").is_file() and record["steps"] == len(
        record["history"]) > 0
    assert run()["nothing_to_do"]


@pytest.mark.slow
def test_run_sft_removes_its_checkpoint_when_done(tokenizer, tmp_path: Path) -> None:
    model = tiny_model(len(tokenizer))
    run_sft(model, tokenizer, "tiny", DEMOS, tmp_path, GEN,
            TrainConfig(lr=1e-2, batch_size=2, max_steps=3, save_every=1), LoRAConfig(r=4),
            progress=False)
    assert (tmp_path / "adapter.safetensors").is_file()
    assert not any(p.name.startswith("checkpoint") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_cut_short_by_max_steps_keeps_its_checkpoint_to_go_on(tokenizer,
                                                                      tmp_path: Path) -> None:
    def run(max_steps: int) -> dict:
        return run_sft(tiny_model(len(tokenizer)), tokenizer, "tiny", DEMOS, tmp_path, GEN,
                       TrainConfig(lr=1e-2, batch_size=2, epochs=2, max_steps=max_steps,
                                   save_every=1), LoRAConfig(r=4), progress=False)

    assert run(2)["steps"] == 2 and (tmp_path / "checkpoint").is_dir()  # 4 steps scheduled
    log = (tmp_path / "training_log.json").read_bytes()
    again = run(2)  # the same cut-short run again: nothing trained, its record kept as it was
    assert again["trained_now"] == 0 and (tmp_path / "training_log.json").read_bytes() == log
    record = run(4)
    assert [h["step"] for h in record["history"]] == [1, 2, 3, 4]
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.slow
def test_an_adapter_trained_further_starts_where_it_stopped(tokenizer, tmp_path: Path) -> None:
    straight, straight_log = _trained(tokenizer, max_steps=5)
    first, _ = _trained(tokenizer, max_steps=2)
    further, log = _trained(tokenizer, max_steps=5, start_step=2, init="first",
                            init_tensors=first)
    assert [s["step"] for s in log.steps] == [3, 4, 5]  # the order's first 2 steps skipped
    # step 3 starts from the same weights on the same batch: the same loss; only AdamW's
    # moments are fresh, so later steps differ
    assert log.steps[0]["loss"] == pytest.approx(straight_log.steps[2]["loss"], rel=1e-5)
    assert any(not torch.allclose(further[n], first[n]) for n in first)  # it trained

    with pytest.raises(ValueError, match="other layers"):
        _trained(tokenizer, init_tensors={k: v for k, v in list(first.items())[1:]})
    with pytest.raises(ValueError, match="--rank"):
        _trained(tokenizer, init_tensors={k: v[:2] if k.endswith("lora_A") else v[:, :2]
                                          for k, v in first.items()})


@pytest.mark.slow
def test_run_sft_from_an_adapter_checks_it_and_records_it(tokenizer, tmp_path: Path) -> None:
    def run(out: Path, lora: LoRAConfig, max_steps: int, init: Path | None = None,
            start_step: int = 0) -> dict:
        return run_sft(tiny_model(len(tokenizer)), tokenizer, "tiny", DEMOS, out, GEN,
                       TrainConfig(lr=1e-2, batch_size=2, epochs=2, max_steps=max_steps,
                                   save_every=1, start_step=start_step), lora,
                       progress=False, init_adapter=init)

    run(tmp_path / "a", LoRAConfig(r=4), 2)
    init = tmp_path / "a"
    record = run(tmp_path / "b", LoRAConfig(r=4), 4, init, start_step=2)
    assert [h["step"] for h in record["history"]] == [3, 4]
    assert record["train"]["init"] == adapter_id(tmp_path / "a")
    assert record["train"]["start_step"] == 2
    with pytest.raises(ValueError, match="--rank 4 --alpha 16"):
        run(tmp_path / "c", LoRAConfig(r=8), 4, init, start_step=2)
    for start, most in ((4, 4), (3, 2)):  # nothing left to train: no untrained adapter written
        with pytest.raises(ValueError, match=f"--start-step {start} skips all {most} steps"):
            run(tmp_path / "e", LoRAConfig(r=4), most, init, start_step=start)
        assert not (tmp_path / "e" / "adapter.safetensors").exists()
    with pytest.raises(ValueError, match="other base weights"):
        run_sft(tiny_model(len(tokenizer), seed=1), tokenizer, "tiny", DEMOS, tmp_path / "d",
                GEN, TrainConfig(lr=1e-2, batch_size=2, max_steps=2), LoRAConfig(r=4),
                progress=False, init_adapter=init)


def test_micro_batches_group_similar_lengths_and_keep_every_example() -> None:
    lengths = [7, 2, 9, 3, 8, 1]
    batch = [Example(tuple(range(n)), tuple([IGNORE] * n)) for n in lengths]
    parts = micro_batches(batch, 2)
    assert [[len(e.input_ids) for e in m] for m in parts] == [[1, 2], [3, 7], [8, 9]]
    assert micro_batches(batch, 4)[-1] == parts[2]  # the last one may be short
    assert sorted(map(id, sum(parts, []))) == sorted(map(id, batch))


@pytest.mark.slow
def test_grouping_by_length_leaves_the_batch_gradient_alone(tokenizer) -> None:
    torch.manual_seed(0)
    model = tiny_model(len(tokenizer))
    examples, _ = render_examples(DEMOS, tokenizer, GEN, max_tokens=4096)
    assert len({len(e.input_ids) for e in examples}) > 1  # the grouping has something to do
    wrapped = inject_lora(model, LoRAConfig(r=4))
    for w in wrapped.values():
        torch.nn.init.normal_(w.lora_B, std=0.02)  # a non-zero update, so A gets gradients too
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(parts: list[list[Example]]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for part in parts:
            target_loss(model, *collate(part, 2))[0].backward()
        return [p.grad.clone() for p in params]

    given = [examples[i : i + 2] for i in range(0, len(examples), 2)]
    for a, b in zip(grads(given), grads(micro_batches(examples, 2)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_base_bf16_keeps_the_base_in_bf16_and_lora_in_fp32(tokenizer, monkeypatch) -> None:
    import citeqa.training.sft as sft

    monkeypatch.setattr(sft, "cpu_dtype", lambda requested: "bf16")  # as on a bf16 CPU
    torch.set_num_threads(1)
    model = tiny_model(len(tokenizer))
    examples, _ = render_examples(DEMOS, tokenizer, GEN, max_tokens=4096)
    cfg = TrainConfig(lr=2e-2, batch_size=4, micro_batch_size=2, max_steps=20, epochs=100,
                      base_bf16=True)
    wrapped, log = train_lora(model, examples, 2, cfg, LoRAConfig(r=8, alpha=16),
                              progress=False)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for w in wrapped.values() for p in (w.lora_A, w.lora_B)}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    # its buffers stay as served: rotary frequencies rounded to bf16 turned positions ~1,000
    # by more than a radian from the base the adapter then serves on
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    losses = [s["loss"] for s in log.steps]
    assert losses[-1] < 0.8 * losses[0], losses
    # off (the default), the base stays float32 whatever the compute format
    model = tiny_model(len(tokenizer))
    train_lora(model, examples, 2, replace(cfg, base_bf16=False, max_steps=1),
               LoRAConfig(r=8, alpha=16), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("stats", [{"split": "eval"}, {"split": "calibration"},
                                   {"split": "all", "articles": ["Normans", "harvard university"]}])
def test_train_generator_refuses_demonstrations_of_held_out_articles(tmp_path: Path,
                                                                     stats: dict) -> None:
    """As `train reward` does: the .stats.json beside the demonstrations (their records name
    no article) saying the calibration or eval articles is refused before any model loads (the
    adapter was trained, its card naming the eval articles)."""
    from typer.testing import CliRunner

    from citeqa.evals.squad import split_of_article
    from citeqa.training.cli import app
    from citeqa.training.demos import write_demos

    assert split_of_article("Harvard_University") == "eval"
    write_demos(tmp_path / "demos.jsonl", DEMOS)
    (tmp_path / "demos.jsonl.stats.json").write_text(json.dumps(stats))
    result = CliRunner().invoke(app, [
        "generator", "--data", str(tmp_path / "demos.jsonl"), "--out", str(tmp_path / "ad"),
        "--model", str(tmp_path / "no-model"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert ("held out" in said if "articles" not in stats else "(harvard university)" in said), said
    assert not (tmp_path / "ad").exists()
