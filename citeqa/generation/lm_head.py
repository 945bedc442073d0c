"""Choosing a token: the LM head applied only where the grammar allows, then greedy or sampled.

The decoder stack and the LM head are used apart (``hf.py``), so that logits are computed only
for the tokens the grammar allows: inside a quote that is a handful, which makes the 49k-row
head of a small model nearly free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from citeqa.errors import ModelError
from citeqa.generation.constraint import OutputConstraint

# (ids [A] of the allowed tokens, or None for the full vocabulary; their logits [A] or [V])
Scores = tuple[torch.Tensor | None, torch.Tensor]


class LMHead:
    """A model's output projection, for one hidden state [H] at a time.

    Plain linear heads only: models with logit soft-capping or scaling would need those applied
    here too, and are refused.
    """

    def __init__(self, model: Any) -> None:
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise ModelError(f"{attr} models are not supported by HFBackend yet")
        head = model.get_output_embeddings()
        # [V, H]; on a CPU an fp32 copy (its own memory: the model may be converted later), so
        # logits and log-probabilities are fp32 whatever the decoder computes in
        on_cpu = head.weight.device.type == "cpu"
        self.weight = head.weight.detach().float().clone() if on_cpu else head.weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else (bias.detach().float().clone() if on_cpu
                                               else bias.detach())
        self.vocab_size = int(self.weight.shape[0])
        self.device = self.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [V] (float32) for one hidden state [H]."""
        logits = hidden.to(self.weight.dtype) @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        return logits.float()

    def scores(self, hidden: torch.Tensor, constraint: OutputConstraint | None) -> Scores:
        """Logits at one position (``hidden`` [H]) for the tokens the grammar allows.

        Returns ``(ids, logits)``: ``ids`` [A] and their logits [A] when few tokens are allowed
        (only those rows of the head are multiplied), else ``(None, logits [V])`` with
        disallowed tokens at -inf. Softmax over either is the distribution renormalised over
        the allowed tokens.
        """
        if constraint is None:
            return None, self.logits(hidden)
        allowed = constraint.allowed_mask()[: self.vocab_size]
        ids = np.flatnonzero(allowed)
        if len(ids) <= self.vocab_size // 8:
            idx = torch.from_numpy(ids).to(self.device)
            w = self.weight.index_select(0, idx)  # [A, H]
            logits = w @ hidden.to(w.dtype)
            if self.bias is not None:
                logits = logits + self.bias.index_select(0, idx)
            return idx, logits.float()
        logits = self.logits(hidden)
        full = torch.zeros(logits.shape[-1], dtype=torch.bool)
        full[: len(allowed)] = torch.from_numpy(allowed)
        return None, logits.masked_fill(~full.to(logits.device), float("-inf"))


def choose(scores: Scores, temperature: float,
           generator: torch.Generator | None) -> tuple[int, float]:
    """Pick a token from ``LMHead.scores`` output (argmax at temperature 0, else a sample at
    ``temperature``); return it with its temperature-1 log-probability."""
    ids, logits = scores
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        j = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        j = int(torch.multinomial(probs, 1, generator=generator))
    return (j if ids is None else int(ids[j])), float(logp[j])
