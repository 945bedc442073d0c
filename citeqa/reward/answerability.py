"""The answerability reader: does this passage answer this question at all?

A second cross-encoder beside the verifier. It reads the question and the passage view around a
candidate's quote, never the answer, and gives one logit: answerable from this passage, or not.
The verifier judges *this answer*; measured on calibration answers it could not tell SQuAD 2.0's
adversarial unanswerables from answerable questions (AUROC 0.64). This reader, trained on those
unanswerables and on red-team variants beside their originals, is one more input of the
combination (``combine.py``), used only when calibration data shows it helps.

    question [SEP] title: before quote after  ->  encoder  ->  [CLS]  ->  linear  ->  logit

It lives in a reward-model directory as ``answerability/`` (the verifier's layout: ``encoder/``
in bf16, ``heads.safetensors``, ``config.json`` with ``kind: answerability``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from citeqa.compute import PAD_MULTIPLE, to_serving_dtype
from citeqa.lean_encoder import use_lean_encoder
from citeqa.reward.checkpoint import (
    ENCODER,
    check_finished,
    load_heads,
    max_tokens_of,
    read_config,
    read_encoder,
    write_encoder_dir,
)
from citeqa.reward.verifier import Judged, fitting_firsts, quotes_in_view

SUBDIR = "answerability"  # where a reward-model directory keeps it
KIND = "answerability"
FORMAT = 1
MAX_TOKENS = 224  # question + a ~700-character passage view
BATCH = 16  # rows encoded together when scoring
RETRAIN = "train one with `citeqa train answerability --out DIR`"


def render(x: Judged) -> tuple[str, str]:
    """(question, passage view) as the reader reads them; the answer is never shown."""
    text = " ".join(p.strip() for p in (x.before, x.quote, x.after) if p.strip())
    return x.question, f"{x.title}: {text}" if x.title else text


def encode(tokenizer: Any, items: Sequence[Judged], max_tokens: int = MAX_TOKENS
           ) -> dict[str, Tensor]:
    """Model inputs for ``items`` (the passage side truncated, and a question too long to leave
    it room: ``verifier.fitting_firsts``; the quote kept in view: ``verifier.quotes_in_view``)."""
    firsts = fitting_firsts(tokenizer, [x.question for x in items], max_tokens)
    pairs = [render(x) for x in quotes_in_view(tokenizer, items, firsts, max_tokens,
                                               with_answer=False)]
    enc = tokenizer(firsts, [b for _, b in pairs], truncation="only_second",
                    max_length=max_tokens, padding=True, pad_to_multiple_of=PAD_MULTIPLE,
                    return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


class Answerability(nn.Module):
    """Encoder + one linear head on the [CLS] state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), 1)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        """Logits [N]: log-odds that the passage answers the question."""
        cls = self.encoder(**inputs).last_hidden_state[:, 0].float()  # [N, H]
        return self.head(cls).float()[:, 0]


def save_answerability(out: Path, model: Answerability, tokenizer: Any,
                       extra: dict[str, Any], *, max_tokens: int = MAX_TOKENS) -> None:
    """Write ``model`` into ``out`` atomically (``checkpoint.write_encoder_dir``), to be
    served at the ``max_tokens`` it was trained at."""
    config = {"format": FORMAT, "kind": KIND, "max_tokens": max_tokens, **extra}
    write_encoder_dir(out, model.encoder, tokenizer, model.state_dict(), config)


def load_answerability(directory: Path) -> tuple[Answerability, Any, dict[str, Any]]:
    """(reader in eval mode, tokenizer, config); ModelError saying what to do when a file is
    missing or corrupt. Never downloads."""
    directory = Path(directory)
    config = read_config(directory, fmt=FORMAT, kind=KIND, retrain=RETRAIN,
                         what="an answerability reader")
    encoder, tokenizer = read_encoder(directory / ENCODER, RETRAIN)
    model = Answerability(encoder)
    load_heads(model, directory, RETRAIN)
    return model.eval(), tokenizer, config


class AnswerabilityReader:
    """The reader as the scorer uses it: logits for passage views, bf16 where it pays."""

    def __init__(self, directory: Path, *, cpu_dtype: str = "auto", lean: bool = True) -> None:
        self.directory = Path(directory)
        self.model, self.tokenizer, self.config = load_answerability(self.directory)
        check_finished(self.directory, self.config, command="citeqa train answerability",
                       what="an answerability reader")
        self.max_tokens = max_tokens_of(self.directory, self.config, self.model.encoder,
                                        MAX_TOKENS, RETRAIN)
        self.dtype = to_serving_dtype(self.model.encoder, cpu_dtype)
        self.model.encoder = use_lean_encoder(self.model.encoder, lean)  # as the verifier's
        self._lock = threading.Lock()

    def logits(self, items: Sequence[Judged]) -> np.ndarray:
        """Log-odds [N] that each item's passage answers its question."""
        out = np.zeros(len(items))
        for at in range(0, len(items), BATCH):
            inputs = encode(self.tokenizer, items[at:at + BATCH], self.max_tokens)
            with self._lock, torch.inference_mode():
                out[at:at + BATCH] = self.model(inputs).float().numpy()
        return out
