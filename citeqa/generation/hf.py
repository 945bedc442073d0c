"""The local generator: a transformers causal LM decoded under the quote grammar.

One prefill per request; the ``n`` samples of a request share it (the KV cache is repeated to
``n`` rows and the rows are decoded as one batch). Requests in one ``generate`` call are run one
after another (no cross-request padding yet).

Constrained decoding: every step the row's ``OutputConstraint`` masks the logits to the tokens
the grammar allows. Two shortcuts make a quote cost little more than the prompt's prefill:

- jump-forward: tokens the grammar forces (``Answer:``, ``Quote [``, ``]:``) are appended in the
  same forward pass as the token before them, without a decoding step each;
- prompt-lookup speculation (greedy rows only): a quote copies prompt text, so when the last
  generated tokens occur in the prompt, the prompt tokens after them are drafted, cut to the
  prefix the grammar allows, checked in one forward pass, and kept while the greedy choice
  agrees; the KV cache is cropped back over the rest. Outputs are therefore the same as plain
  greedy decoding (up to float ties between batched and single-token matmuls).

Sampled rows (n > 1) skip speculation (the greedy acceptance test would not preserve the
sampling distribution) and decode in lockstep, one token per row per step.

``Completion.logprob`` sums, over the tokens the model chose, the log-probability at temperature 1
renormalised over the grammar-allowed tokens (the unmasked distribution when there is no grammar).
Tokens forced by the grammar (jump-forward) count 0: they were the only continuation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from citeqa.errors import InvalidRequestError
from citeqa.generation.backend import Completion, GenerationRequest
from citeqa.generation.constraint import OutputConstraint, ll_tokenizer_for
from citeqa.generation.models import load_model

logger = logging.getLogger(__name__)

MAX_NGRAM = 3  # longest suffix of the output looked up in the prompt for a draft


@dataclass
class _Row:
    """Decoding state of one output row."""

    constraint: OutputConstraint | None
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    done: bool = False


@dataclass
class _Stats:
    prefill_ms: float = 0.0
    forward_passes: int = 0


class HFBackend:
    """Backend over a local transformers model (see module docstring for the decoding scheme)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        *,
        speculative_tokens: int = 8,
        threads: int | None = None,
    ) -> None:
        """``speculative_tokens``: prompt-lookup draft length (0 = off); ``threads``: torch CPU
        threads (None = torch's default)."""
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.speculative_tokens = max(int(speculative_tokens), 0)
        self.device = next(model.parameters()).device
        # The decoder stack and the LM head are used apart, so that logits are only computed
        # for the tokens the grammar allows (see _scores). Plain linear heads only: models with
        # logit soft-capping or scaling would need those applied here too.
        self._decoder = model.get_decoder()
        head = model.get_output_embeddings()
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise InvalidRequestError(f"{attr} models are not supported by HFBackend yet")
        self._head_weight = head.weight  # [V, H]
        self._head_bias = getattr(head, "bias", None)
        self.vocab_size = int(self._head_weight.shape[0])
        self._stop = self._stop_tokens()

    @classmethod
    def load(
        cls, name: str, cache_dir: Path, *, device: str | None = None, **kw: Any
    ) -> HFBackend:
        """Load ``name`` ("smollm2" or a local HF dir) and wrap it; ``kw`` go to ``__init__``."""
        model, tokenizer, model_id = load_model(name, cache_dir, device=device)
        return cls(model, tokenizer, model_id, **kw)

    # -- public ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        with torch.inference_mode():
            return [self._generate_one(r) for r in requests]

    # -- prompt -----------------------------------------------------------------------------

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, ending with the assistant turn's opening."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(
                list(messages), add_generation_prompt=True, return_dict=True
            )
            ids = out["input_ids"]
        else:  # a base model: plain text turns
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
            ids = tok(text, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    def _stop_tokens(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for name in ("<|im_end|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.add(tid)
        return frozenset(int(i) for i in ids)

    # -- one request ---------------------------------------------------------------------------

    def _generate_one(self, req: GenerationRequest) -> list[Completion]:
        if req.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {req.n}")
        temperature = req.temperature
        if req.n > 1 and temperature <= 0:
            logger.warning("n=%d at temperature 0 would repeat one output; sampling at 1", req.n)
            temperature = 1.0
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))

        first = self._new_constraint(req.grammar)
        rows = [_Row(first)] + [
            _Row(first.copy() if first else None) for _ in range(req.n - 1)
        ]
        prompt = self.prompt_ids(req.messages)
        forced = self._jump_forward(rows[0], req.max_tokens)
        for row in rows[1:]:
            if row.constraint is not None:
                row.constraint.consume_many(forced)
            row.tokens = list(forced)

        stats = _Stats()
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        hidden = self._forward(prompt + forced, cache, keep=1, stats=stats)  # [1, 1, H]
        stats.prefill_ms = (time.perf_counter() - t0) * 1000
        next_hidden = hidden[:, -1, :]  # [1, H]

        t1 = time.perf_counter()
        if req.n == 1:
            self._decode_single(rows[0], next_hidden[0], cache, prompt, req, temperature,
                                generator, stats)
        else:
            cache.batch_repeat_interleave(req.n)
            self._decode_batch(rows, next_hidden.expand(req.n, -1), cache, req, temperature,
                               generator, stats)
        decode_ms = (time.perf_counter() - t1) * 1000

        completions = []
        for row in rows:
            timings = {
                "prefill_ms": stats.prefill_ms,
                "decode_ms": decode_ms,
                "forward_passes": float(stats.forward_passes),
                "tokens": float(len(row.tokens)),
                "prompt_tokens": float(len(prompt)),
            }
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            completions.append(Completion(text, row.logprob, len(row.tokens), timings))
        return completions

    def _new_constraint(self, grammar: str | None) -> OutputConstraint | None:
        if grammar is None:
            return None
        return OutputConstraint(grammar, ll_tokenizer_for(self.tokenizer))

    # -- model calls -----------------------------------------------------------------------------

    def _forward(self, ids: list[int] | torch.Tensor, cache: DynamicCache, *, keep: int,
                 stats: _Stats) -> torch.Tensor:
        """Run ``ids`` ([B, S] or one row) through the decoder; return the last ``keep`` final
        hidden states [B, keep, H]. Logits are computed later, only for tokens that matter."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor([ids], dtype=torch.long)
        out = self._decoder(input_ids=ids.to(self.device), past_key_values=cache, use_cache=True)
        stats.forward_passes += 1
        return out.last_hidden_state[:, -keep:, :]

    # -- choosing tokens --------------------------------------------------------------------------

    def _scores(self, hidden: torch.Tensor,
                constraint: OutputConstraint | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits at one position (``hidden`` [H]) for the tokens the grammar allows.

        Returns ``(ids, logits)``: ``ids`` [A] and their logits [A] when few tokens are allowed
        (only those rows of the LM head are multiplied: inside a quote that is a handful, which
        makes the 49k-row head nearly free), else ``(None, logits [V])`` with disallowed tokens
        at -inf. Softmax over either is the distribution renormalised over allowed tokens.
        """
        if constraint is None:
            return None, self._head(hidden)
        allowed = constraint.allowed_mask()[: self.vocab_size]
        ids = np.flatnonzero(allowed)
        if len(ids) <= self.vocab_size // 8:
            idx = torch.from_numpy(ids).to(self.device)
            w = self._head_weight.index_select(0, idx)  # [A, H]
            logits = w @ hidden
            if self._head_bias is not None:
                logits = logits + self._head_bias.index_select(0, idx)
            return idx, logits.float()
        logits = self._head(hidden)
        full = torch.zeros(logits.shape[-1], dtype=torch.bool)
        full[: len(allowed)] = torch.from_numpy(allowed)
        return None, logits.masked_fill(~full.to(logits.device), float("-inf"))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [V] (float32) for one hidden state [H]."""
        logits = hidden @ self._head_weight.T
        if self._head_bias is not None:
            logits = logits + self._head_bias
        return logits.float()

    def _choose(self, scores: tuple[torch.Tensor | None, torch.Tensor], temperature: float,
                generator: torch.Generator | None) -> tuple[int, float]:
        """Pick a token from ``_scores`` output; return it with its temperature-1 logprob."""
        ids, logits = scores
        logp = torch.log_softmax(logits, dim=-1)
        if temperature <= 0:
            j = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            j = int(torch.multinomial(probs, 1, generator=generator))
        return (j if ids is None else int(ids[j])), float(logp[j])

    def _jump_forward(self, row: _Row, max_tokens: int) -> list[int]:
        """Consume the tokens the grammar forces now; return them (also appended to the row)."""
        c = row.constraint
        if c is None or c.is_stopped():
            return []
        forced = c.forced_tokens()[: max(max_tokens - len(row.tokens), 0)]
        if forced and not c.consume_many(forced):
            raise AssertionError(f"grammar rejected its own forced tokens {forced}: {c.error}")
        row.tokens.extend(forced)
        return forced

    def _accept(self, row: _Row, tok: int, lp: float, max_tokens: int) -> None:
        """Append a chosen token to a row and mark the row done when it ends."""
        if tok in self._stop:
            row.done = True
            return
        row.tokens.append(tok)
        row.logprob += lp
        c = row.constraint
        if c is not None:
            if not c.consume(tok):
                raise AssertionError(f"grammar rejected allowed token {tok}: {c.error}")
            if c.is_stopped():
                row.done = True
        if len(row.tokens) >= max_tokens:
            row.done = True

    # -- decoding loops ---------------------------------------------------------------------------

    def _decode_single(self, row: _Row, next_hidden: torch.Tensor, cache: DynamicCache,
                       prompt: list[int], req: GenerationRequest, temperature: float,
                       generator: torch.Generator | None, stats: _Stats) -> None:
        """One row: jump-forward always, prompt-lookup speculation when greedy."""
        greedy = temperature <= 0
        prompt_arr = np.asarray(prompt, dtype=np.int64)
        while not row.done and len(row.tokens) < req.max_tokens:
            if row.constraint is not None and row.constraint.is_stopped():
                break
            scores = self._scores(next_hidden, row.constraint)
            tok, lp = self._choose(scores, temperature, generator)
            self._accept(row, tok, lp, req.max_tokens)
            if row.done:
                break
            feed = [tok] + self._jump_forward(row, req.max_tokens)
            if len(row.tokens) >= req.max_tokens or (
                row.constraint is not None and row.constraint.is_stopped()
            ):
                break
            room = req.max_tokens - len(row.tokens)
            draft: list[int] = []
            if greedy and self.speculative_tokens and room > 0:
                draft = self._draft(prompt_arr, row.tokens, min(self.speculative_tokens, room))
                if draft and row.constraint is not None:
                    draft = draft[: row.constraint.valid_prefix(draft)]
            hidden = self._forward(feed + draft, cache, keep=len(draft) + 1, stats=stats)[0]
            # hidden[i] predicts the token after feed + draft[:i]  # [len(draft)+1, H]
            accepted = 0
            for i, d in enumerate(draft):
                tok, lp = self._choose(self._scores(hidden[i], row.constraint), 0.0, None)
                if tok != d:
                    break
                self._accept(row, d, lp, req.max_tokens)
                accepted += 1
                if row.done:
                    break
            if len(draft) > accepted:
                cache.crop(-(len(draft) - accepted))
            next_hidden = hidden[accepted]

    def _draft(self, prompt: np.ndarray, generated: list[int], k: int) -> list[int]:
        """Prompt lookup: the ``k`` prompt tokens after the latest occurrence of the longest
        suffix (<= MAX_NGRAM tokens) of ``generated``; stops before any stop token."""
        for n in range(min(MAX_NGRAM, len(generated)), 0, -1):
            if len(prompt) <= n:
                continue
            suffix = np.asarray(generated[-n:], dtype=np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(prompt[:-1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                draft = [int(t) for t in prompt[start : start + k]]
                for j, t in enumerate(draft):
                    if t in self._stop:
                        return draft[:j]
                return draft
        return []

    def _decode_batch(self, rows: list[_Row], next_hidden: torch.Tensor, cache: DynamicCache,
                      req: GenerationRequest, temperature: float,
                      generator: torch.Generator | None, stats: _Stats) -> None:
        """n sampled rows in lockstep: one token per live row per forward pass."""
        live = list(range(len(rows)))  # row index of each cache row
        for r in rows:
            if len(r.tokens) >= req.max_tokens or (r.constraint and r.constraint.is_stopped()):
                r.done = True
        while True:
            step = []
            for pos, ri in enumerate(live):
                row = rows[ri]
                if row.done:
                    continue
                tok, lp = self._choose(self._scores(next_hidden[pos], row.constraint),
                                       temperature, generator)
                self._accept(row, tok, lp, req.max_tokens)
                step.append((pos, ri, tok))
            keep = [(pos, ri, tok) for pos, ri, tok in step if not rows[ri].done]
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from the cache
                cache.batch_select_indices(torch.tensor([p for p, _, _ in keep],
                                                        device=self.device))
            live = [ri for _, ri, _ in keep]
            ids = torch.tensor([[tok] for _, _, tok in keep], dtype=torch.long)  # [B, 1]
            next_hidden = self._forward(ids, cache, keep=1, stats=stats)[:, -1, :]
