"""The local generator: a transformers causal LM decoded under the quote grammar, in batches.

``generate(requests)`` runs all requests as ONE batch: the prompts (after the system turn they
share, see below) are left-padded to a common length and prefilled together (attention mask +
explicit position ids; on a CPU each prompt alone, the caches then stacked with the same left
padding), the KV cache rows are then repeated so each request's ``n`` samples share its
prefill, and every output row (all requests x their samples) is decoded in lockstep with its
own grammar matcher. A finished row
drops out of the batch (its cache row is removed), so a long answer never holds short ones back
beyond the step they finish in.

Constrained decoding: every step a row's ``OutputConstraint`` masks its logits to the tokens the
grammar allows. Two shortcuts make a quote cost little more than the prompt's prefill:

- jump-forward: tokens the grammar forces (``Answer:``, ``Quote [``, ``]:``) are appended in the
  same forward pass as the token before them, without a decoding step each;
- prompt-lookup speculation (greedy rows only): a quote copies prompt text, so when the last
  generated tokens occur in the prompt, the prompt tokens after them are drafted (of up to
  MAX_DRAFTS occurrences, the one whose continuation the grammar accepts furthest; then the
  same lookup in the last greedy output, which holds ``Quote [1]:`` when no prompt does), cut
  to the prefix the grammar allows, checked in the same forward pass, and kept while the
  greedy choice agrees. Outputs are therefore those of plain greedy decoding (up to float ties
  between batched and single-token matmuls). Sampled rows skip speculation (the greedy
  acceptance test would not preserve the sampling distribution). The live rows of a batch
  share a budget of ``speculative_tokens`` drafted tokens per pass (one row: all of it; 16
  rows: one each).

The system turn is the same in every prompt, and keys and values at a position depend only on
the tokens up to it: they are computed once per distinct system text and copied into each
batch's cache, so a prefill covers only the rest of the prompt (``_prefix_cache``).

Rows feed different numbers of tokens per step (a sampled token, forced tokens, a draft), so a
step's input is right-padded to its longest row, and padded or rejected positions stay in the KV
cache as holes, masked out by the attention mask; position ids count only each row's real
tokens. Columns that are holes in every row (e.g. a single row's rejected draft) are cropped.

``Completion.logprob`` sums, over the tokens the model chose, the log-probability at temperature 1
renormalised over the grammar-allowed tokens (the unmasked distribution when there is no grammar).
Tokens forced by the grammar (jump-forward) count 0: they were the only continuation.
Timings (``prefill_ms``, ``decode_ms``, ``forward_passes``) are those of the whole batch.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from citeqa.errors import InvalidRequestError
from citeqa.generation.backend import Completion, GenerationRequest
from citeqa.generation.constraint import OutputConstraint, ll_tokenizer_for
from citeqa.generation.models import CPU_WEIGHTS, load_model, store_linear_weights_fp16

logger = logging.getLogger(__name__)

MAX_NGRAM = 3  # longest suffix of the output looked up in the prompt for a draft
MAX_DRAFTS = 8  # prompt-lookup candidates checked against the grammar per draft
MIN_PREFIX = 8  # shortest shared prompt prefix worth copying from the system-turn cache


@dataclass
class _Row:
    """Decoding state of one output row (one sample of one request)."""

    constraint: OutputConstraint | None
    prompt: np.ndarray  # the request's prompt token ids, for prompt-lookup drafts
    max_tokens: int
    temperature: float = 0.0
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    done: bool = False
    length: int = 0  # real (unmasked) tokens of this row in the KV cache = next position id

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def finished(self) -> bool:
        c = self.constraint
        return self.done or len(self.tokens) >= self.max_tokens or (
            c is not None and c.is_stopped()
        )


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
        reuse_prefix: bool = True,
        batch_prefill: bool | None = None,
    ) -> None:
        """``speculative_tokens``: prompt-lookup draft length (0 = off); ``threads``: torch CPU
        threads (None = torch's default); ``reuse_prefix``: copy the system turn's keys and
        values from a cache instead of prefilling them for every prompt; ``batch_prefill``:
        prefill a batch's prompts together, left-padded (None: on a GPU only). A CPU prefill is
        compute-bound, so padding costs real time there and batching saves none: its prompts
        are prefilled one by one and then stacked for decoding together."""
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.speculative_tokens = max(int(speculative_tokens), 0)
        self.device = next(model.parameters()).device
        self.reuse_prefix = reuse_prefix
        self.batch_prefill = (self.device.type != "cpu") if batch_prefill is None else batch_prefill
        # Only plain growing caches can be copied and stacked (sliding-window layers drop keys).
        self._plain_cache = all(
            type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers
        )
        # (system text, (tokens, keys, values)) of the last system turn seen; see _system_prefix
        self._prefix: tuple[str, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] | None
        self._prefix = None
        # Tokens of the last greedy output: a second source of drafts, for the text every
        # output repeats that no prompt contains (``Quote [1]:`` after a quote's ``Quote [``).
        self._recent = np.zeros(0, dtype=np.int64)
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
        pad = tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else min(self._stop, default=0))

    @classmethod
    def load(
        cls,
        name: str,
        cache_dir: Path,
        *,
        device: str | None = None,
        adapter: str | Path | None = None,
        cpu_weights: str = "fp16",
        **kw: Any,
    ) -> HFBackend:
        """Load ``name`` ("smollm2" or a local HF dir) and wrap it; ``kw`` go to ``__init__``.

        ``adapter``: a LoRA adapter dir (``citeqa train generator``), merged into the weights so
        decoding costs nothing extra; the model id then names it. ``cpu_weights``: "fp16" stores
        a CPU model's decoder Linear weights in fp16 (see ``store_linear_weights_fp16``; the
        model id then ends in ``+fp16-linear``), "fp32" keeps them as loaded.
        """
        if cpu_weights not in CPU_WEIGHTS:
            raise InvalidRequestError(f"cpu_weights must be one of {CPU_WEIGHTS}: {cpu_weights!r}")
        model, tokenizer, model_id = load_model(name, cache_dir, device=device)
        if adapter is not None:
            from citeqa.generation.adapter import adapter_id, apply_adapter

            apply_adapter(model, Path(adapter))
            model_id = f"{model_id}+{adapter_id(Path(adapter))}"
        on_cpu = next(model.parameters()).device.type == "cpu"
        if on_cpu and cpu_weights == "fp16" and store_linear_weights_fp16(model):
            model_id = f"{model_id}+fp16-linear"  # outputs differ (slightly): reports say so
        return cls(model, tokenizer, model_id, **kw)

    # -- public ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Complete every request, all in one batch; result[i] holds request i's completions."""
        if not requests:
            return []
        with torch.inference_mode():
            return self._generate_batch(list(requests))

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

    # -- one batch -------------------------------------------------------------------------------

    def _rows(self, req: GenerationRequest, prompt: list[int]) -> list[_Row]:
        """The ``n`` rows of one request, with the tokens the grammar forces first consumed."""
        if req.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {req.n}")
        temperature = req.temperature
        if req.n > 1 and temperature <= 0:
            logger.warning("n=%d at temperature 0 would repeat one output; sampling at 1", req.n)
            temperature = 1.0
        generator = None
        if temperature > 0:  # one generator per request: its samples do not depend on the batch
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**31))
        first = self._new_constraint(req.grammar)
        prompt_arr = np.asarray(prompt, dtype=np.int64)
        rows = [
            _Row(first if i == 0 or first is None else first.copy(), prompt_arr, req.max_tokens,
                 temperature, generator)
            for i in range(req.n)
        ]
        forced = self._jump_forward(rows[0])
        for row in rows[1:]:
            if row.constraint is not None:
                row.constraint.consume_many(forced)
            row.tokens = list(forced)
        return rows

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        prompts = [self.prompt_ids(r.messages) for r in requests]
        per_request = [self._rows(r, p) for r, p in zip(requests, prompts, strict=True)]

        stats = _Stats()
        t0 = time.perf_counter()
        seqs = [p + rows[0].tokens for p, rows in zip(prompts, per_request, strict=True)]
        if self.batch_prefill or len(seqs) == 1 or not self._plain_cache:
            cache, mask, hidden = self._prefill(requests, seqs, stats)
        else:  # one prompt at a time: no compute spent on padding (see __init__)
            cache, mask, hidden = stack_prefills(
                [self._prefill(requests[i : i + 1], seqs[i : i + 1], stats)
                 for i in range(len(seqs))],
                self.model.config,
            )
        stats.prefill_ms = (time.perf_counter() - t0) * 1000

        # One cache row per output row: request i's prefill repeated n_i times.
        rows = [row for rs in per_request for row in rs]
        owner = [i for i, rs in enumerate(per_request) for _ in rs]
        for row, i in zip(rows, owner, strict=True):
            row.length = len(seqs[i])
        if owner != list(range(len(requests))):
            index = torch.tensor(owner, device=self.device)
            cache.batch_select_indices(index)
            mask, hidden = mask[owner], hidden[index]

        t1 = time.perf_counter()
        self._decode(rows, hidden, cache, mask, stats)
        decode_ms = (time.perf_counter() - t1) * 1000
        greedy = [row for row in rows if row.greedy and row.tokens]
        if greedy:
            self._recent = np.asarray(greedy[-1].tokens, dtype=np.int64)

        out: list[list[Completion]] = []
        for rs, prompt in zip(per_request, prompts, strict=True):
            completions = []
            for row in rs:
                timings = {
                    "prefill_ms": stats.prefill_ms,
                    "decode_ms": decode_ms,
                    "forward_passes": float(stats.forward_passes),
                    "tokens": float(len(row.tokens)),
                    "prompt_tokens": float(len(prompt)),
                    "batch_rows": float(len(rows)),
                }
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                completions.append(Completion(text, row.logprob, len(row.tokens), timings))
            out.append(completions)
        return out

    # -- the system turn's KV cache, computed once and reused --------------------------------

    def _prefix_cache(self, requests: Sequence[GenerationRequest], seqs: list[list[int]],
                      ) -> tuple[DynamicCache, int]:
        """A fresh cache for a batch whose rows are ``seqs``, holding the keys and values of their
        common system turn when that can be reused; returns it with how many tokens it holds.

        Keys and values at a position depend only on the tokens up to it, so those of a token
        prefix shared by every row are the same in every prompt: they are computed once per
        distinct system text (the first time it is seen) and copied into each batch.
        """
        cache = DynamicCache(config=self.model.config)
        prefix = self._system_prefix(requests[0].messages)
        if prefix is None:
            return cache, 0
        tokens, keys, values = prefix
        shared = min(min(common_prefix_length(tokens, s), len(s) - 1) for s in seqs)
        if shared < MIN_PREFIX:  # e.g. another system text; every row prefills >= 1 token
            return cache, 0
        rows = len(seqs)
        for layer, k, v in zip(cache.layers, keys, values, strict=True):
            layer.update(k[:, :, :shared].expand(rows, -1, -1, -1),
                         v[:, :, :shared].expand(rows, -1, -1, -1))
        return cache, shared

    def _system_prefix(self, messages: Sequence[dict[str, str]],
                       ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]] | None:
        """``(tokens, keys, values)`` of the system turn of ``messages`` alone (keys and values
        per layer, [1, heads, tokens, head_dim]), or None when there is none to reuse."""
        if not (self.reuse_prefix and messages and messages[0].get("role") == "system"):
            return None
        if not self._plain_cache:
            return None  # sliding-window layers drop old keys: nothing stable to copy
        text = messages[0]["content"]
        cached = self._prefix
        if cached is not None and cached[0] == text:
            return cached[1]
        tokens = self._turn_ids(messages[0])
        if tokens is None or len(tokens) < MIN_PREFIX:
            return None
        fresh = DynamicCache(config=self.model.config)
        self._decoder(input_ids=torch.tensor([tokens], device=self.device),
                      past_key_values=fresh, use_cache=True)
        prefix = (tokens, [layer.keys for layer in fresh.layers],
                  [layer.values for layer in fresh.layers])
        self._prefix = (text, prefix)
        return prefix

    def _turn_ids(self, message: dict[str, str]) -> list[int] | None:
        """Token ids of one message rendered alone, as it begins a prompt (None: the chat
        template does not render it alone)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return [int(i) for i in tok(message["content"], add_special_tokens=True)["input_ids"]]
        try:
            out = tok.apply_chat_template([message], add_generation_prompt=False,
                                          return_dict=True)
        except Exception:  # noqa: BLE001 - some templates refuse a lone system turn
            logger.debug("chat template does not render a lone system turn", exc_info=True)
            return None
        return [int(i) for i in out["input_ids"]]

    def _prefill(self, requests: Sequence[GenerationRequest], seqs: list[list[int]],
                 stats: _Stats) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill ``seqs`` (one per request) as one batch, left-padded after their shared
        system turn; return the cache, its mask [R, T] (1 = real token) and each row's last
        hidden state [R, H]."""
        cache, shared = self._prefix_cache(requests, seqs)  # shared: tokens already in cache
        rests = [s[shared:] for s in seqs]
        width = max(len(s) for s in rests)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)  # [R, L] left-padded
        mask = torch.zeros((len(seqs), shared + width), dtype=torch.long)  # [R, T] 1 = real
        mask[:, :shared] = 1
        for i, s in enumerate(rests):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, shared + width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # [R, L]
        hidden = self._forward(ids, cache, mask, positions, keep=1, stats=stats)[:, -1, :]
        return cache, mask, hidden

    def _new_constraint(self, grammar: str | None) -> OutputConstraint | None:
        if grammar is None:
            return None
        return OutputConstraint(grammar, ll_tokenizer_for(self.tokenizer))

    # -- model calls -----------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
                 positions: torch.Tensor, *, keep: int, stats: _Stats) -> torch.Tensor:
        """Run ``ids`` [B, S] through the decoder; return the last ``keep`` final hidden states
        [B, keep, H]. ``mask`` [B, cache + S] marks real tokens, ``positions`` [B, S] their
        position ids. Logits are computed later, only for the tokens that matter."""
        attention = None if bool(mask.all()) else mask.to(self.device)  # None: the fast path
        out = self._decoder(
            input_ids=ids.to(self.device),
            attention_mask=attention,
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
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

    def _jump_forward(self, row: _Row) -> list[int]:
        """Consume the tokens the grammar forces now; return them (also appended to the row)."""
        c = row.constraint
        if c is None or c.is_stopped():
            return []
        forced = c.forced_tokens()[: max(row.max_tokens - len(row.tokens), 0)]
        if forced and not c.consume_many(forced):
            raise AssertionError(f"grammar rejected its own forced tokens {forced}: {c.error}")
        row.tokens.extend(forced)
        return forced

    def _accept(self, row: _Row, tok: int, lp: float) -> None:
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
        if len(row.tokens) >= row.max_tokens:
            row.done = True

    # -- the decoding loop ------------------------------------------------------------------------

    def _step_input(self, row: _Row, hidden: torch.Tensor) -> list[int] | None:
        """Choose a row's next token from ``hidden`` [H]; return what to feed the model next
        (the token and the tokens the grammar forces after it), or None when the row is done."""
        tok, lp = self._choose(self._scores(hidden, row.constraint), row.temperature,
                               row.generator)
        self._accept(row, tok, lp)
        if row.done:
            return None
        feed = [tok] + self._jump_forward(row)
        if row.finished():
            row.done = True
            return None
        return feed

    def _draft_for(self, row: _Row, budget: int) -> list[int]:
        """A draft of at most ``budget`` tokens for a greedy row, looked up in its prompt and in
        the last greedy output, cut to what its grammar allows (see ``best_draft``)."""
        room = min(row.max_tokens - len(row.tokens), budget)
        if not (row.greedy and room > 0):
            return []
        candidates = itertools.chain(  # the prompt first, then the last output
            prompt_lookup_drafts(row.prompt, row.tokens, room, self._stop),
            prompt_lookup_drafts(self._recent, row.tokens, room, self._stop),
        )
        c = row.constraint
        return best_draft(candidates, room, None if c is None else c.valid_prefix)

    def _decode(self, rows: list[_Row], next_hidden: torch.Tensor, cache: DynamicCache,
                mask: torch.Tensor, stats: _Stats) -> None:
        """Decode all rows in lockstep until each is done; ``next_hidden`` [B, H] holds each
        row's last hidden state, ``mask`` [B, T] the real tokens of its cache row."""
        live = list(range(len(rows)))  # row index of each cache row
        for r in rows:
            r.done = r.finished()
        while True:
            # 1. every live row picks its token (and forced tokens, and a draft)
            steps: list[tuple[int, list[int], list[int]]] = []  # (cache row, feed, draft)
            # The rows share one draft budget per pass: a lone row's pass is memory-bound (it
            # streams every weight for one token or seventeen alike), a full batch's is
            # compute-bound, where drafts that get rejected cost real time.
            budget = self.speculative_tokens // max(sum(not rows[ri].done for ri in live), 1)
            for pos, ri in enumerate(live):
                row = rows[ri]
                feed = None if row.done else self._step_input(row, next_hidden[pos])
                if feed is not None:
                    steps.append((pos, feed, self._draft_for(row, budget)))
            if not steps:
                return
            # 2. drop finished rows from the batch
            if len(steps) < len(live):
                keep = [pos for pos, _, _ in steps]
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                mask = mask[keep]
                live = [live[p] for p in keep]
            # 3. one forward pass over every row's feed + draft, right-padded to the longest
            width = max(len(f) + len(d) for _, f, d in steps)
            ids = torch.full((len(steps), width), self._pad, dtype=torch.long)  # [B, S]
            new = torch.zeros((len(steps), width), dtype=torch.long)  # [B, S]
            offsets = torch.tensor([rows[ri].length for ri in live])[:, None]  # [B, 1]
            positions = offsets + torch.arange(width)[None, :]  # [B, S]
            for b, (_, feed, draft) in enumerate(steps):
                seq = feed + draft
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                new[b, : len(seq)] = 1
            start = mask.shape[1]
            mask = torch.cat([mask, new], dim=1)
            hidden = self._forward(ids, cache, mask, positions, keep=width, stats=stats)
            # hidden[b, len(feed) - 1 + i] predicts the token after feed + draft[:i]
            # 4. keep each draft's agreeing prefix; the rest become holes
            picks = []
            for b, (_, feed, draft) in enumerate(steps):
                row = rows[live[b]]
                base = len(feed) - 1
                accepted = 0
                for i, d in enumerate(draft):
                    tok, lp = self._choose(self._scores(hidden[b, base + i], row.constraint),
                                           0.0, None)
                    if tok != d:
                        break
                    self._accept(row, d, lp)
                    accepted += 1
                    if row.done:
                        break
                real = len(feed) + accepted
                mask[b, start + real:] = 0
                row.length += real
                picks.append(base + accepted)
            next_hidden = hidden[torch.arange(len(steps)), torch.tensor(picks)]  # [B, H]
            # 5. crop columns that are holes in every row (a lone row's rejected draft)
            used = mask[:, start:].any(dim=0).nonzero()
            holes = width - (int(used.max()) + 1 if used.numel() else 0)
            if holes:
                cache.crop(-holes)
                mask = mask[:, :-holes]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prompt_lookup_drafts(prompt: np.ndarray, generated: Sequence[int], k: int,
                         stop: frozenset[int] = frozenset()) -> Iterator[list[int]]:
    """Prompt-lookup draft candidates, best first: the ``k`` prompt tokens after each
    occurrence of a suffix of ``generated``, longest suffix (<= MAX_NGRAM tokens) first and
    latest occurrence first; at most MAX_DRAFTS of them (one per prompt position), each cut
    before any ``stop`` token."""
    seen: set[int] = set()  # draft start positions already yielded
    for n in range(min(MAX_NGRAM, len(generated)), 0, -1):
        if len(prompt) <= n:
            continue
        suffix = np.asarray(generated[-n:], dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(prompt[:-1], n)
        for hit in np.flatnonzero((windows == suffix).all(axis=1))[::-1]:
            start = int(hit) + n
            if start in seen:  # a longer suffix matched here already
                continue
            seen.add(start)
            draft = [int(t) for t in prompt[start : start + k]]
            for j, t in enumerate(draft):
                if t in stop:
                    draft = draft[:j]
                    break
            yield draft
            if len(seen) == MAX_DRAFTS:
                return


def best_draft(candidates: Iterable[list[int]], room: int,
               valid_prefix: Callable[[list[int]], int] | None) -> list[int]:
    """The first of ``candidates`` with the longest prefix that ``valid_prefix`` (the grammar)
    accepts, cut to that prefix; stops looking once one fills ``room``.

    Without a grammar the first candidate wins, as in plain prompt lookup; in a free-text part
    of a grammar, so does the first that fills ``room``. Inside a quote the grammar allows only
    continuations of the quoted passage, which rules out lookalike occurrences of the last
    tokens elsewhere in the prompt (a name that is also in the question, say)."""
    if valid_prefix is None:
        return next(iter(candidates), [])
    best: list[int] = []
    for draft in candidates:
        draft = draft[: valid_prefix(draft)]
        if len(draft) > len(best):
            best = draft
        if len(best) >= room:
            break
    return best


def stack_prefills(parts: Sequence[tuple[DynamicCache, torch.Tensor, torch.Tensor]],
                   config: Any) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """One batch from prefills of one or more rows each ``(cache, mask [r, T_i], hidden
    [r, H])``: keys, values and masks are left-padded to the longest (the padding is masked
    out, as left padding in a batched prefill would be) and stacked row after row."""
    width = max(mask.shape[1] for _, mask, _ in parts)
    stacked = DynamicCache(config=config)
    pads = [(0, 0, width - mask.shape[1], 0) for _, mask, _ in parts]  # [.., T, D]: pad T left
    caches = [c for c, _, _ in parts]
    for i, layer in enumerate(stacked.layers):
        layer.update(
            torch.cat([F.pad(c.layers[i].keys, p) for c, p in zip(caches, pads, strict=True)]),
            torch.cat([F.pad(c.layers[i].values, p) for c, p in zip(caches, pads, strict=True)]),
        )
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m, _ in parts])
    return stacked, mask, torch.cat([h for _, _, h in parts])
