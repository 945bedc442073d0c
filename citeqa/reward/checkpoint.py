"""A verifier on disk: its directory format, writing it atomically and loading it with checks.

    rm/
      config.json        {"format": 2, "kind": "cross-encoder", "members", "hidden",
                          "max_tokens", "base": the encoder it started from, ...training facts}
      encoder/           the fine-tuned encoder as a Hugging Face directory (config.json,
                         model.safetensors in bfloat16, tokenizer files)
      heads.safetensors  the reader and the verifier heads (float32)
      calibration.json   optional, written by ``citeqa calibrate`` (scorer.py)
      MODEL_CARD.md

Plain data only (JSON, safetensors); loading never downloads and says what to do when a file is
missing or corrupt.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from citeqa.atomic import discard_tmp_dir, fresh_tmp_dir, recover_dir, replace_dir
from citeqa.compute import PAD_MULTIPLE
from citeqa.errors import ModelError
from citeqa.logs import quiet_weight_loading, without_load_report
from citeqa.reward.verifier import MAX_TOKENS, Verifier

FORMAT = 2  # format 1 was the feature-based ensemble of earlier releases
KIND = "cross-encoder"
CONFIG, HEADS, ENCODER = "config.json", "heads.safetensors", "encoder"
RETRAIN = "train one with `citeqa train reward --out DIR`"


def save_verifier(out: Path, model: Verifier, tokenizer: Any, extra: dict[str, Any], *,
                  max_tokens: int = MAX_TOKENS) -> None:
    """Write ``model`` into ``out`` (see ``write_encoder_dir``); it scores candidates cut to
    the ``max_tokens`` it was trained on."""
    config = {"format": FORMAT, "kind": KIND, "members": model.members,
              "hidden": model.hidden, "max_tokens": max_tokens, **extra}
    write_encoder_dir(out, model.encoder, tokenizer, model.state_dict(), config)


def write_encoder_dir(out: Path, encoder: torch.nn.Module, tokenizer: Any,
                      state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write an encoder (bf16 safetensors, with its tokenizer) and the heads of ``state`` (every
    tensor not under ``encoder.``, fp32) into ``out``: a temporary sibling first, then renamed
    over it. Files beside them that training does not write (calibration, card, combine.json,
    a subdirectory such as answerability/) are kept."""
    out = Path(out)
    tmp = fresh_tmp_dir(out)
    try:
        # a bf16 copy: rounding the encoder itself to bf16 and back changed the weights a run
        # goes on training from at every save (it trains in fp32)
        with quiet_weight_loading():  # its "Writing model shards" bar, under --no-progress too
            copy.deepcopy(encoder).to(torch.bfloat16).save_pretrained(tmp / ENCODER,
                                                                       safe_serialization=True)
        tokenizer.save_pretrained(tmp / ENCODER)
        heads = {k: v.detach().float().contiguous().cpu() for k, v in state.items()
                 if not k.startswith("encoder.")}
        save_file(heads, str(tmp / HEADS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            for keep in out.iterdir():
                if keep.name not in (CONFIG, HEADS, ENCODER) and not (tmp / keep.name).exists():
                    if keep.is_file():
                        shutil.copy2(keep, tmp / keep.name)
                    elif keep.is_dir() and not keep.name.startswith("."):
                        shutil.copytree(keep, tmp / keep.name)
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        replace_dir(tmp, out)
    finally:
        discard_tmp_dir(tmp)


def read_config_json(directory: Path, *, retrain: str = RETRAIN,
                     what: str = "a reward model") -> dict[str, Any]:
    """config.json of a model directory, of any format, or ModelError saying what is wrong
    (no such directory, no config.json, not a JSON object) and ``retrain``."""
    directory = recover_dir(Path(directory))  # a save killed mid-swap: restored
    path = directory / CONFIG
    if directory.exists() and not directory.is_dir():
        raise ModelError(f"{directory} is a file, not a model directory; {retrain}")
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist; {retrain}")
    if not path.is_file():
        raise ModelError(f"{directory} has no {CONFIG}, so it is not {what}; {retrain}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        raise ModelError(f"{path} is corrupt ({e}); {retrain}") from None
    return config


def read_config(directory: Path, *, fmt: int = FORMAT, kind: str | None = KIND,
                retrain: str = RETRAIN, what: str = "a reward model") -> dict[str, Any]:
    """config.json of a model directory (a verifier by default; ``fmt`` and ``kind`` name
    another, ``kind=None`` checks the format alone, ``what`` says what it is, article
    included), or ModelError saying what is wrong and ``retrain``, what to do about it."""
    config = read_config_json(directory, retrain=retrain, what=what)
    path = Path(directory) / CONFIG
    if config.get("format") != fmt or (kind is not None and config.get("kind") != kind):
        def named(f: Any, k: Any) -> str:
            return f"format {f!r}" + (f" ({k})" if kind is not None else "")
        raise ModelError(
            f"{path} is not {what} this citeqa reads: it has "
            f"{named(config.get('format'), config.get('kind'))}, this citeqa reads "
            f"{named(fmt, kind)}; {retrain}")
    return config


def check_finished(directory: Path, config: dict[str, Any], *, command: str,
                   what: str = "a reward model") -> None:
    """ModelError when ``config``'s training record says its training stopped short (a run
    killed after a save leaves a model trained part of the way, saved where the finished one
    goes): serving one would answer and decline by a model half-trained. ``command`` is the
    training's (``citeqa train reward``), run again to finish it."""
    training = config.get("training")
    steps = training.get("steps") if isinstance(training, dict) else None
    total = training.get("total_steps") if isinstance(training, dict) else None
    if (isinstance(steps, int) and isinstance(total, int) and not isinstance(steps, bool)
            and steps < total):
        raise ModelError(f"{directory} holds {what} whose training stopped at step {steps} of "
                         f"{total} (interrupted): run the same `{command}` command again to "
                         f"finish it (it resumes from step {steps})")


def load_verifier(directory: Path) -> tuple[Verifier, Any, dict[str, Any]]:
    """(verifier in eval mode, its tokenizer, config) from a directory ``save_verifier`` wrote.
    Never downloads."""
    directory = Path(directory)
    config = read_config(directory)
    encoder, tokenizer = read_encoder(directory / ENCODER, RETRAIN)
    try:
        members, hidden = int(config["members"]), int(config["hidden"])
        if members < 1 or hidden < 1:
            raise ValueError(f"members {members} and hidden {hidden} must be 1 or more")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ModelError(f"{directory / CONFIG} lacks a valid 'members' or 'hidden' ({e!r}); "
                         f"{RETRAIN}") from None
    model = Verifier(encoder, members=members, hidden=hidden)
    load_heads(model, directory, RETRAIN)
    return model.eval(), tokenizer, config


def max_tokens_of(directory: Path, config: dict[str, Any], encoder: Any, default: int,
                  retrain: str) -> int:
    """The ``max_tokens`` of a model directory's config.json (``default`` when absent),
    checked: a multiple of ``PAD_MULTIPLE`` (the padding tokenizers are asked for) no longer
    than the encoder's positions; ModelError ending in ``retrain``."""
    value = config.get("max_tokens", default)
    limit = int(getattr(encoder.config, "max_position_embeddings", default))
    if (isinstance(value, bool) or not isinstance(value, int) or value % PAD_MULTIPLE
            or not PAD_MULTIPLE <= value <= limit):
        raise ModelError(f"{Path(directory) / CONFIG}: max_tokens must be a multiple of "
                         f"{PAD_MULTIPLE} from {PAD_MULTIPLE} to {limit} (its encoder's "
                         f"positions), not {value!r}; {retrain}")
    return value


def read_encoder(path: Path, hint: str, *, base: bool = False) -> tuple[Any, Any]:
    """(fp32 encoder, tokenizer) of the Hugging Face encoder directory ``path`` (a model
    directory's ``encoder/``, or with ``base`` a base to fine-tune); ModelError ending in
    ``hint``. Never downloads. Every weight the encoder has must be in the files (of a base,
    all but its pooler's), and a model directory's must hold no other: transformers fills a
    missing one with random numbers, and scores were then noise without a word."""
    from transformers import AutoModel, AutoTokenizer

    try:
        # safetensors only: never a pickled .bin; the weights are checked below
        with quiet_weight_loading(), without_load_report():
            # (mismatched shapes then reach ``info``, named in citeqa's error below)
            encoder, info = AutoModel.from_pretrained(
                path, local_files_only=True, dtype=torch.float32, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:  # (a size mismatch)
        raise ModelError(f"cannot load the encoder in {path} ({e}); {hint}") from None
    wrong = {"missing": sorted(k for k in info.get("missing_keys", ())
                               if not (base and k.startswith("pooler."))),
             "unexpected": [] if base else sorted(info.get("unexpected_keys", ())),
             "of another shape": sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                        for k in info.get("mismatched_keys", ()))}
    if any(wrong.values()):
        said = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})"
                         for kind, keys in wrong.items() if keys)
        raise ModelError(f"the encoder in {path} does not match its config.json: weights {said} "
                         f"(an incomplete or edited copy); {hint}")
    # (transformers makes a tokenizer of a handful of special tokens from tokenizer_config.json
    # alone: without its vocabulary every word would be [UNK], every score meaningless)
    vocabulary = int(getattr(encoder.config, "vocab_size", 0) or 0)
    if len(tokenizer) < vocabulary // 2:
        raise ModelError(f"the tokenizer in {path} has {len(tokenizer)} tokens for an encoder of "
                         f"{vocabulary} (is its tokenizer.json or vocabulary file missing?); "
                         f"{hint}")
    return encoder, tokenizer


def load_heads(model: torch.nn.Module, directory: Path, retrain: str) -> None:
    """Load ``directory/heads.safetensors`` into every part of ``model`` but its encoder."""
    try:
        heads = load_file(str(directory / HEADS))
    except (SafetensorError, OSError, ValueError, FileNotFoundError) as e:
        raise ModelError(f"{directory / HEADS} is missing or corrupt ({e}); {retrain}") from None
    try:
        missing, unexpected = model.load_state_dict(heads, strict=False)
    except RuntimeError as e:  # shapes that config.json does not give (strict=False or not)
        raise ModelError(f"{directory / HEADS} does not match {CONFIG} ({e}); {retrain}") from None
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ModelError(f"{directory / HEADS} does not match {CONFIG} (missing {missing}, "
                         f"unexpected {unexpected}); {retrain}")
