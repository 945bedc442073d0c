"""Supervised fine-tuning of the generator on demonstrations: render, mask, train LoRA, save.

An example is the serving prompt (``prompt.build_messages`` -> ``chat.prompt_ids``, the same
function that builds what the local backend feeds the model) followed by
the target reply (``demos.render_target``) and the end-of-turn token. Only the target tokens
carry labels; the prompt's are -100, so the model learns to answer and quote, not to write
prompts.

Training: AdamW on the LoRA parameters only, constant learning rate, ``batch_size`` examples
per optimizer step processed ``micro_batch_size`` at a time (gradient accumulation). The loss
is the mean cross-entropy over the batch's target tokens; logits are computed for those
positions only (the 49k-row LM head is a fifth of SmolLM2's compute per token). Seeded:
the same data, settings and device give the same adapter, also when a run is interrupted and
rerun: it saves a checkpoint in its output directory and continues from it (``checkpoint.py``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from citeqa.atomic import write_text_atomic
from citeqa.compute import cpu_dtype, training_autocast
from citeqa.config import GenerationConfig
from citeqa.generation.adapter import WEIGHTS, AdapterConfig, base_fingerprint
from citeqa.generation.adapter import save_adapter as _save_adapter
from citeqa.generation.chat import end_token_id, prompt_ids
from citeqa.generation.cpu_linear import cast_parameters
from citeqa.generation.prompt import prompt_fingerprint
from citeqa.training.cards import data_licence, data_stats
from citeqa.training.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    run_key,
    save_checkpoint,
)
from citeqa.training.demos import Demo, render_target
from citeqa.training.lora import LoRAConfig, LoRALinear, inject_lora, lora_parameters, lora_tensors

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions that carry no loss (torch cross_entropy's ignore_index)
LOG_FILE = "training_log.json"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1  # passes over the examples
    lr: float = 2e-4  # AdamW learning rate (constant)
    weight_decay: float = 0.0  # AdamW weight decay on A and B
    batch_size: int = 8  # examples per optimizer step
    micro_batch_size: int = 1  # examples per forward/backward (gradient accumulation)
    max_steps: int | None = None  # stop after this many optimizer steps (None = all epochs)
    max_tokens: int = 1536  # examples longer than this (prompt + target) are dropped
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0  # LoRA init and example order
    cpu_dtype: str = "auto"  # compute format on a CPU: bf16 autocast where it pays (compute.py)
    # With bf16 on a CPU: keep the frozen base weights in bf16 too (LoRA A/B and AdamW stay
    # fp32). Saves the per-step weight casts (~17 % a step here) but runs the residual stream
    # in bf16, so it is not the shipped adapter's recipe; off by default.
    base_bf16: bool = False
    save_every: int = 25  # optimizer steps between checkpoints (when training into a directory)
    # Training an adapter further: its content id (``adapter_id``; "" = LoRA's fresh init) and
    # the steps of this data order it was trained on, which are skipped (max_steps counts them)
    init: str = ""
    start_step: int = 0


@dataclass(frozen=True)
class Example:
    """Token ids of one prompt + target, and labels (-100 on the prompt)."""

    input_ids: tuple[int, ...]  # [S]
    labels: tuple[int, ...]  # [S]: input_ids on the target tokens, IGNORE elsewhere

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class TrainLog:
    steps: list[dict[str, float]] = field(default_factory=list)  # step, loss, tokens, seconds
    seconds: float = 0.0
    examples: int = 0
    trained_now: int = 0  # steps this run trained (the rest were resumed from a checkpoint)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(len(self.steps), 1)


# -- rendering ---------------------------------------------------------------------------------


def encode_example(tokenizer: Any, messages: Sequence[dict[str, str]], target: str) -> Example:
    """Prompt tokens (labels -100), then the target's tokens and the end token (labelled)."""
    prompt = prompt_ids(tokenizer, messages)
    # a special token's text in the reply (a quote holding "<|im_end|>") as plain text, as the
    # grammar makes the model write it: read as the token, it taught stopping mid-quote
    reply = [int(i) for i in tokenizer(target, add_special_tokens=False,
                                       split_special_tokens=True)["input_ids"]]
    reply.append(end_token_id(tokenizer))
    return Example(tuple(prompt + reply), tuple([IGNORE] * len(prompt) + reply))


def render_examples(
    demos: Sequence[Demo], tokenizer: Any, cfg: GenerationConfig, *, max_tokens: int
) -> tuple[list[Example], dict[str, int]]:
    """Examples for ``demos`` and the counts of those dropped, by reason."""
    examples: list[Example] = []
    dropped: dict[str, int] = {}
    for demo in demos:
        rendered = render_target(demo, cfg)
        if rendered is None:
            dropped["quote outside the prompt's window"] = (
                dropped.get("quote outside the prompt's window", 0) + 1
            )
            continue
        ex = encode_example(tokenizer, *rendered)
        if len(ex.input_ids) > max_tokens:
            dropped[f"longer than {max_tokens} tokens"] = (
                dropped.get(f"longer than {max_tokens} tokens", 0) + 1
            )
            continue
        examples.append(ex)
    return examples, dropped


def collate(
    examples: Sequence[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each [B, S]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def padding_id(tokenizer: Any) -> int:
    """The token that pads a micro-batch: the tokenizer's pad token, else its end token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)


def micro_batches(batch: Sequence[Example], size: int) -> list[list[Example]]:
    """``batch`` split into micro-batches of ``size``, similar lengths together.

    The batch's gradient is the sum over its examples, so grouping by length changes nothing
    but the padding (here 1.31x the real tokens in the given order, 1.19x sorted).
    """
    ordered = sorted(batch, key=lambda e: len(e.input_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


# -- loss and training ---------------------------------------------------------------------------


def target_loss(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are."""
    device = next(model.parameters()).device
    hidden = model.get_decoder()(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
    ).last_hidden_state  # [B, S, H]
    targets = labels[:, 1:].to(device)  # position t predicts token t + 1
    keep = targets != IGNORE  # [B, S-1]
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [T, V]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def scheduled_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps of all ``cfg.epochs`` over ``n_examples`` (before ``max_steps``)."""
    return math.ceil(n_examples / cfg.batch_size) * cfg.epochs


def steps_to_run(n_examples: int, cfg: TrainConfig) -> int:
    """The steps a run trains: the schedule, cut at ``cfg.max_steps``."""
    total = scheduled_steps(n_examples, cfg)
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def train_lora(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    cfg: TrainConfig,
    lora: LoRAConfig,
    *,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    init: dict[str, torch.Tensor] | None = None,
    base: str = "",
) -> tuple[dict[str, LoRALinear], TrainLog]:
    """Wrap ``model``'s target layers with LoRA (in place) and train them on ``examples``.

    ``base`` (the base model's fingerprint) is part of the checkpoint's run key: a checkpoint
    made on other base weights is refused, not resumed. ``init`` (``<module>.lora_A`` /
    ``.lora_B`` tensors, as ``lora_tensors`` gives them) starts the LoRA layers from a trained
    adapter instead of LoRA's init, with fresh AdamW moments; the first ``cfg.start_step``
    steps of the data order are skipped.

    With ``checkpoint_dir``, the run is saved there every ``cfg.save_every`` steps and at the
    end (``checkpoint.py``), and a rerun with the same examples and settings continues from
    the saved step: same data order, LoRA tensors and AdamW moments, so the same adapter.
    """
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    device_type = next(model.parameters()).device.type
    if cfg.base_bf16 and device_type == "cpu" and cpu_dtype(cfg.cpu_dtype) == "bf16":
        # before the LoRA layers, which stay float32 (and the rotary frequencies, as served: a
        # model's .to(bf16) rounded them too)
        cast_parameters(model, torch.bfloat16)
    wrapped = inject_lora(model, lora)
    if init is not None:
        load_lora_tensors(wrapped, init)
    params = lora_parameters(wrapped)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps_to_run(len(examples), cfg)
    key = run_key(examples, cfg, lora, base=base)
    done, history = (0, []) if checkpoint_dir is None else load_checkpoint(
        checkpoint_dir, wrapped, optimizer, key=key)
    if done > total:  # it would write the saved adapter as one of `total` steps
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {done}, past the {total} "
                         "steps this run trains; raise --max-steps, or choose another --out")
    if done:
        logger.info("resuming from step %d of %d saved in %s", done, total, checkpoint_dir)
    model.train()
    log = TrainLog(steps=history, examples=len(examples))
    earlier = history[-1]["seconds"] if history else 0.0  # seconds of the runs resumed
    t0 = time.perf_counter()
    skip = max(done, cfg.start_step)  # steps trained by the run resumed or the init adapter
    bar = tqdm(total=total, initial=min(skip, total), desc="training", disable=not progress)
    step = 0
    rng = random.Random(cfg.seed)
    while step < total:
        order = list(range(len(examples)))
        rng.shuffle(order)  # every epoch's order is drawn, resumed or not: the same sequence
        for b in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            if step < skip:
                step += 1
                continue
            batch = [examples[i] for i in order[b : b + cfg.batch_size]]
            n_tokens = sum(e.target_tokens for e in batch)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in micro_batches(batch, cfg.micro_batch_size):
                ids, mask, labels = collate(micro, pad_id)
                with training_autocast(device_type, cfg.cpu_dtype):
                    loss, _ = target_loss(model, ids, mask, labels)
                (loss / n_tokens).backward()  # the batch's token mean, accumulated
                loss_sum += float(loss.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            log.trained_now += 1
            mean = loss_sum / n_tokens
            log.steps.append(
                {"step": step, "loss": mean, "tokens": n_tokens,
                 "seconds": earlier + time.perf_counter() - t0}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}")
            if checkpoint_dir is not None and (step % cfg.save_every == 0 or step == total):
                save_checkpoint(checkpoint_dir, wrapped, optimizer, step=step,
                                history=log.steps, key=key)
    bar.close()
    model.eval()
    log.seconds = earlier + time.perf_counter() - t0
    return wrapped, log


def load_lora_tensors(wrapped: dict[str, LoRALinear], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the wrappers' A and B; ValueError naming what does not match."""
    want = lora_tensors(wrapped)
    if set(tensors) != set(want):
        diff = sorted(set(tensors) ^ set(want))
        raise ValueError(f"the adapter to start from adapts other layers ({len(diff)} tensors "
                         f"differ, e.g. {diff[0]}); pass the --rank/--targets/--first-layer "
                         "it was trained with")
    with torch.no_grad():
        for name, w in wrapped.items():
            for ab, param in (("A", w.lora_A), ("B", w.lora_B)):
                t = tensors[f"{name}.lora_{ab}"]
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{name}.lora_{ab} has shape {tuple(t.shape)}, this run "
                                     f"{tuple(param.shape)}: pass the adapter's --rank")
                param.copy_(t.to(param.dtype))


def init_from_adapter(directory: Path, lora: LoRAConfig, fingerprint: str
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """(LoRA tensors, content id) of the adapter in ``directory``, checked against this run's
    LoRA settings and base model; ValueError saying what differs."""
    from citeqa.generation.adapter import adapter_id, load_adapter

    cfg, tensors = load_adapter(directory)
    if cfg.base_fingerprint != fingerprint:
        raise ValueError(f"{directory} was trained on other base weights; start from an "
                         "adapter of this base model")
    if (cfg.r, cfg.alpha) != (lora.r, lora.alpha):
        raise ValueError(f"{directory} has rank {cfg.r} and alpha {cfg.alpha:g}; pass "
                         f"--rank {cfg.r} --alpha {cfg.alpha:g}")
    return tensors, adapter_id(directory)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss: KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# -- outputs -------------------------------------------------------------------------------------


def fingerprint_params(targets: Sequence[str]) -> list[str]:
    """Parameters hashed into the base fingerprint: the first and last target layers' weights."""
    first, last = targets[0], targets[-1]
    return [f"{first}.weight"] + ([f"{last}.weight"] if last != first else [])


def save_adapter(
    out: Path,
    wrapped: dict[str, LoRALinear],
    lora: LoRAConfig,
    *,
    base_model_id: str,
    fingerprint: str,
    params: Sequence[str],
    extra: dict[str, Any],
    gen: GenerationConfig | None = None,
) -> AdapterConfig:
    """Write the trained A/B tensors and ``adapter.json`` into ``out`` (``gen``: the
    generation settings whose prompt it was trained on)."""
    gen = gen or GenerationConfig()
    cfg = AdapterConfig(
        r=lora.r,
        alpha=lora.alpha,
        target_modules=tuple(wrapped),
        base_model_id=base_model_id,
        base_fingerprint=fingerprint,
        fingerprint_params=tuple(params),
        prompt_fingerprint=prompt_fingerprint(gen),
        extra=extra,
        answer_mode=gen.answer_mode,
    )
    _save_adapter(out, lora_tensors(wrapped), cfg)
    return cfg


def finished_run(out: Path) -> dict[str, Any] | None:
    """The training log of the finished adapter in ``out`` (one written, no checkpoint left to
    resume), or None."""
    out = Path(out)
    if not (out / LOG_FILE).is_file() or has_checkpoint(out):
        return None
    try:
        record = json.loads((out / LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: another run's for all we can tell
    return record if isinstance(record, dict) else {}


def _trained_to(out: Path, key: str, steps: int) -> dict[str, Any] | None:
    """The training log in ``out`` when its adapter is this run's (``key``) trained to
    ``steps`` steps (a run cut short by --max-steps keeps its checkpoint to go on), else None."""
    try:
        record = json.loads((Path(out) / LOG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    history = record.get("history") if isinstance(record, dict) else None
    if (isinstance(history, list) and history and isinstance(history[-1], dict)
            and history[-1].get("step") == steps and record.get("run_key") == key
            and (Path(out) / WEIGHTS).is_file()):
        return record
    return None


def write_log(out: Path, log: TrainLog, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``training_log.json``: per-step losses, timings, peak memory, settings."""
    record = {
        **meta,
        "steps": len(log.steps),
        "trained_now": log.trained_now,
        "examples": log.examples,
        "seconds": round(log.seconds, 3),
        "seconds_per_step": round(log.seconds_per_step, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "first_loss": round(log.steps[0]["loss"], 4) if log.steps else None,
        "last_loss": round(log.steps[-1]["loss"], 4) if log.steps else None,
        "history": log.steps,
    }
    if str(meta.get("device", "")).startswith("cuda"):  # the training's own device
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(meta["device"]) / 2**20,
                                       1)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out) / LOG_FILE, json.dumps(record, indent=2) + "\n")
    return record


def _made_by(data: str | None) -> str:
    """", made by `COMMAND`" from the data's .stats.json, or ""."""
    command = data_stats(data).get("command")
    return f", made by `{command}`" if isinstance(command, str) else ""


def _split_line(data: str | None) -> str:
    """What the card says of the data's articles: the split and articles its .stats.json
    records, else a placeholder to fill in."""
    stats = data_stats(data)
    split, articles = stats.get("split"), stats.get("articles")
    if not isinstance(split, str):
        return ("{SPLIT (e.g. SQuAD 2.0 train articles: Normans, Computational_complexity_theory, "
                "Huguenot, Steam_engine, 1973_oil_crisis)}")
    named = (f": {', '.join(map(str, articles))}" if isinstance(articles, list) and articles
             else "")
    if split == "all":
        return f"every article of the data file{named}"
    return f"the {split} articles{named}"


def write_model_card(out: Path, record: dict[str, Any]) -> None:
    """Write ``MODEL_CARD.md``: what is known now, with placeholders for evaluation results."""
    train = record.get("train", {})
    lora = record.get("lora", {})
    licence = ("Apache-2.0" if "smollm2" in str(record.get("base_model_id", "")).lower()
               else "{LICENCE: name the base model's licence here}")
    text = f"""# citeqa generator adapter (LoRA on {record.get("base_model_id", "?")})

A LoRA adapter teaching the base generator to answer in citeqa's cited format
(`Answer: ...` / `Quote [k]: ...`, a verbatim quote of a shown passage). Serve it with
`CITEQA_ADAPTER={out}` (from Python: `GenerationConfig(adapter="{out}")`); it is merged into
the weights at load time (no extra decoding cost) and refuses any other base model (weights
fingerprint).

## Training
- Data: `{record.get("data", "?")}` ({record.get("examples", "?")} examples rendered,
  dropped: {json.dumps(record.get("dropped", {}))}); split: {_split_line(record.get("data"))}
- Unanswerable questions were excluded on purpose (declining is the reward model's job).
- Command: `{record.get("command", "?")}`
- LoRA: r={lora.get("r")}, alpha={lora.get("alpha")}, targets={lora.get("targets")}
- Optimiser: AdamW lr={train.get("lr")}, batch {train.get("batch_size")}, epochs
  {train.get("epochs")}, max steps {train.get("max_steps")}, seed {train.get("seed")}
- Steps: {record.get("steps")}, loss {record.get("first_loss")} -> {record.get("last_loss")}
- Time: {record.get("seconds")} s ({record.get("seconds_per_step")} s/step) on
  {record.get("device")}, peak RSS {record.get("peak_rss_mb")} MiB

## Evaluation
{{EVAL_METRICS: base vs fine-tuned on the SQuAD 2.0 eval articles (Harvard_University,
Scottish_Parliament, Imperialism, French_and_Indian_War): answer EM/F1, quote verified rate,
supported rate, with the command that produced them}}

## Limitations
{{LIMITATIONS: e.g. trained on 11 Wikipedia articles' style of question; English only}}

## Licences
The base model, {record.get("base_model_id", "?")}, keeps its own licence: {licence}; the adapter
holds none of its weights.

Trained on the demonstrations in `{record.get("data", "?")}`{_made_by(record.get("data"))}.
{data_licence("Demonstrations")}
"""
    write_text_atomic(Path(out) / CARD_FILE, text)


def settings_record(train: TrainConfig, lora: LoRAConfig, gen: GenerationConfig) -> dict[str, Any]:
    """The settings that made an adapter, as JSON-ready dicts."""
    return {
        "train": asdict(train),
        "lora": {**asdict(lora), "targets": list(lora.targets)},
        "prompt": {
            k: getattr(gen, k)
            for k in ("top_k_passages", "passage_chars", "min_quote_chars", "max_quote_chars",
                      "answer_mode")
        },
    }


def run_sft(
    model: Any,
    tokenizer: Any,
    base_model_id: str,
    demos: Sequence[Demo],
    out: Path,
    gen: GenerationConfig,
    train: TrainConfig,
    lora: LoRAConfig,
    *,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    init_adapter: Path | None = None,
) -> dict[str, Any]:
    """Render ``demos``, train a LoRA adapter on ``model`` and write adapter, log and card.

    With ``init_adapter`` the LoRA layers start from that adapter (``train_lora``'s ``init``),
    recorded in ``train.init``. Returns the training log record. ``model`` is left wrapped
    with the trained LoRA layers.
    """
    from citeqa.training.lora import target_names

    examples, dropped = render_examples(demos, tokenizer, gen, max_tokens=train.max_tokens)
    if dropped:
        logger.warning("dropped %s of %d demonstrations", dropped, len(demos))
    if not examples:
        raise ValueError(f"none of the {len(demos)} demonstrations could be rendered: {dropped}")
    total = steps_to_run(len(examples), train)
    if train.start_step >= total:  # would write an untrained adapter, as if trained
        raise ValueError(f"--start-step {train.start_step} skips all {total} steps this run "
                         "trains; raise --max-steps or --epochs, or lower --start-step")
    targets = target_names(model, lora.targets, lora.first_layer)
    if not targets:
        raise ValueError(f"the model has no Linear layer named like {list(lora.targets)}")
    params = fingerprint_params(targets)
    fingerprint = base_fingerprint(model, params)  # before training touches anything
    pad_id = padding_id(tokenizer)
    init = None
    if init_adapter is not None:
        init, init_id = init_from_adapter(init_adapter, lora, fingerprint)
        train = replace(train, init=init_id)
    key = run_key(examples, train, lora, base=fingerprint)
    finished = finished_run(out)
    if finished is not None:  # no checkpoint left: the adapter there is done
        if finished.get("run_key") == key:  # (the key holds the base model's fingerprint)
            logger.info("%s already holds this run's adapter: nothing to train", out)
            return {**finished, "trained_now": 0, "nothing_to_do": True}
        raise ValueError(f"{out} holds an adapter trained by another run (other data, settings "
                         "or base model); choose another --out, or delete it to train afresh")
    if (done := _trained_to(out, key, total)) is not None:  # cut short by --max-steps, as now
        logger.info("%s already holds this run's adapter of %d steps: nothing to train", out,
                    total)  # (rewriting it recorded this process's peak memory and timings)
        return {**done, "trained_now": 0, "nothing_to_do": True}
    if next(model.parameters()).is_cuda:  # this training's peak, not an earlier one's
        torch.cuda.reset_peak_memory_stats(next(model.parameters()).device)
    wrapped, log = train_lora(model, examples, pad_id, train, lora, progress=progress,
                              checkpoint_dir=out, init=init, base=fingerprint)
    settings = settings_record(train, lora, gen)
    save_adapter(
        out, wrapped, lora, base_model_id=base_model_id, fingerprint=fingerprint,
        params=params, extra=settings, gen=gen,
    )
    device = str(next(model.parameters()).device)
    record = write_log(
        out,
        log,
        {
            **(meta or {}),
            **settings,
            "base_model_id": base_model_id,
            "device": device,
            "compute": (cpu_dtype(train.cpu_dtype) if device == "cpu" else "cuda " + str(
                next(model.parameters()).dtype).removeprefix("torch.")),
            "torch_threads": torch.get_num_threads(),
            "dropped": dropped,
            "target_tokens": sum(e.target_tokens for e in examples),
            "run_key": key,  # what a rerun into this --out is compared with
            "base_fingerprint": fingerprint,
        },
    )
    write_model_card(out, record)
    if train.max_steps is None or train.max_steps >= scheduled_steps(len(examples), train):
        remove_checkpoint(out)  # the schedule is done: nothing left to resume
    # else: a run cut short by --max-steps keeps its checkpoint; a larger --max-steps continues
    return record
