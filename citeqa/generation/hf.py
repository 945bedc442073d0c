"""The local generator: a transformers causal LM decoded under the quote grammar, in batches.

``generate(requests)`` runs all requests as ONE batch: the prompts (after the system turn they
share, see below) are left-padded to a common length and prefilled together (attention mask +
explicit position ids; on a CPU each prompt alone, the caches then stacked with the same left
padding), the KV cache rows are then repeated so each request's ``n`` samples share its
prefill, and every output row (all requests x their samples) is decoded in lockstep with its
own grammar matcher. A finished row drops out of the batch (its cache row is removed), so a
long answer never holds short ones back beyond the step they finish in. In span mode a row
switches grammar once its answer is written (``_next_stage``): the quote's grammar is built from
that answer.


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
  rows: one each);
- the quote's guess (span mode, greedy rows): once a row's answer is written, the quote is
  drafted from ``QuoteStage.guess`` (the passage from the last sentence start before the
  answer), within its own budget of ``GUESS_TOKENS`` per pass, enough for a whole quote: the
  quote's first token has nothing to look up, and a guess is right far more often than a
  lookup. It is checked and kept like any draft, so it changes passes, not outputs (up to
  the float ties above: in bf16 a wider pass rounds its products differently).

The system turn is the same in every prompt, and keys and values at a position depend only on
the tokens up to it: they are computed once per distinct system text and copied into each
batch's cache, so a prefill covers only the rest of the prompt (``kv.SystemPrefixCache``).

Rows feed different numbers of tokens per step (a sampled token, forced tokens, a draft), so a
step's input is right-padded to its longest row, and padded or rejected positions stay in the KV
cache as holes, masked out by the attention mask; position ids count only each row's real
tokens. Columns that are holes in every row (e.g. a single row's rejected draft) are cropped.

``Completion.logprob`` sums, over the tokens the model chose, the log-probability at temperature 1
renormalised over the grammar-allowed tokens (the unmasked distribution when there is no grammar).
Tokens forced by the grammar (jump-forward) count 0: they were the only continuation.
Timings (``prefill_ms``, ``decode_ms``, ``forward_passes``) are those of the whole batch.

Every pass runs the decoder stack alone (the LM head is applied later, ``lm_head.py``): through
``LeanDecoder`` (``lean.py``, fewer operations per layer) for a Llama-family model computed in
bf16 on a CPU, else through transformers' forward.

Why ~570 lines: the decode loop alone is here; drafts (``drafts.py``), the KV cache surgery
(``kv.py``) and the grammar stages live apart. What remains is one loop whose per-row state
(pending tokens, drafts, grammar, finished) must change together in every step.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from citeqa.compute import CPU_DTYPES, MODEL_ID_SUFFIX
from citeqa.compute import cpu_dtype as cpu_dtype_for
from citeqa.errors import ConfigError, ModelError
from citeqa.generation.backend import Completion, GenerationRequest, abandoned_completions
from citeqa.generation.chat import prompt_ids, stop_token_ids, turn_ids
from citeqa.generation.constraint import OutputConstraint, QuoteStage, ll_tokenizer_for
from citeqa.generation.cpu_linear import cast_parameters, install_cpu_linears
from citeqa.generation.drafts import best_draft, prompt_lookup_drafts
from citeqa.generation.kv import (
    Prefix,
    SystemPrefixCache,
    plain_cache,
    stack_prefills,
    with_cache_keyword,
)
from citeqa.generation.lean import LeanDecoder
from citeqa.generation.lm_head import LMHead, choose
from citeqa.generation.models import (
    fp16_only_gpu,
    load_model,
    pick_device,
    store_linear_weights_fp16,
)

logger = logging.getLogger(__name__)



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
    quote_stage: QuoteStage | None = None  # span mode, until the answer is written
    # span mode, once the answer is written: token ids of a guess at the rest of the output
    # (``QuoteStage.guess``), drafted while the row's tokens since ``guess_from`` agree with it
    guess: list[int] | None = None
    guess_from: int = 0
    accepted: int = 0  # tokens up to where the grammar last could end the output
    request: GenerationRequest | None = None  # whose row it is (asked whether it is abandoned)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def finished(self) -> bool:
        c = self.constraint
        return self.done or len(self.tokens) >= self.max_tokens or (
            c is not None and c.is_stopped()
        )


def decoded(tokenizer: Any, tokens: Sequence[int], *, cut: bool) -> str:
    """A row's text. A row ``cut`` by its token budget may end inside a character whose last
    bytes never came (byte-level tokens): that character is left out, not decoded as U+FFFD,
    which no passage holds there (the quote, verbatim up to it, was lost)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    drop = 0
    while cut and text.endswith("\ufffd") and drop < min(3, len(tokens)):  # a UTF-8 tail
        drop += 1
        text = tokenizer.decode(tokens[:-drop], skip_special_tokens=True)
    return text


def kept_tokens(row: _Row) -> list[int]:
    """The tokens of a finished row that its text is made of: all of them, but of a row its
    budget cut where its grammar could not end (inside a quote's word: "2236067977, 26457",
    or a character's bytes), those up to where it last could (``_Row.accepted``)."""
    c = row.constraint
    if len(row.tokens) < row.max_tokens or c is None or c.is_accepting():
        return row.tokens
    return row.tokens[:row.accepted]


@dataclass
class _Stats:
    prefill_ms: float = 0.0
    forward_passes: int = 0


# A pass's budget of drafted tokens for quote guesses (``QuoteStage.guess``), shared by its rows
# like ``speculative_tokens``: enough for a whole 200-character quote. A guess is right far
# more often than a prompt-lookup draft, and a lone row's pass over 64 tokens costs ~1.4x one
# over 17 on 2 AMX cores (bf16 products stream the weights once either way).
GUESS_TOKENS = 64

GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch, read at every attention call


def share_kv_heads_in_cpu_attention() -> None:
    """Let attention on the CPU share key/value heads instead of copying them.

    For a grouped-query model (SmolLM2: 9 query heads, 3 key/value heads) transformers' SDPA
    path copies each key/value head once per query head whenever a mask is passed: on every
    decoding pass that verifies drafted tokens, the whole cache, every layer. PyTorch's CPU
    kernel takes the groups as they are (``enable_gqa``), with the same result to the bit and
    2-2.5x faster (a 7-token pass over 450 cached tokens: 607 -> 297 us in bf16). transformers
    keeps the copy because on CUDA a mask with ``enable_gqa`` falls back to a slow kernel; its
    switch lifts that for the process, so it is set only for a model on the CPU, and a value
    the user set is kept.
    """
    os.environ.setdefault(GQA_SWITCH, "1")


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
        head: LMHead | None = None,
        lean: bool = True,
        quote_guess: bool = True,
    ) -> None:
        """``speculative_tokens``: prompt-lookup draft length (0 = off); ``threads``: torch CPU
        threads (None = torch's default); ``reuse_prefix``: copy the system turn's keys and
        values from a cache instead of prefilling them for every prompt; ``batch_prefill``:
        prefill a batch's prompts together, left-padded (None: on a GPU only). A CPU prefill is
        compute-bound, so padding costs real time there and batching saves none: its prompts
        are prefilled one by one and then stacked for decoding together. ``head``: the LM head
        to score tokens with (default: the model's own); ``lean``: run the decoder with
        ``LeanDecoder`` where it supports the model (a Llama-family model in CPU bf16), else
        with transformers' forward; ``quote_guess``: in span mode, draft a greedy row's quote
        from ``QuoteStage.guess`` once its answer is written (drafts change speed, not output,
        up to float ties)."""
        if not plain_cache(model.config):  # transformers keeps only a window of such layers
            raise ModelError(
                f"{model_id} uses sliding-window attention (its config's sliding_window or "
                "layer_types), which the local generator does not support: rejected drafts are "
                "cut from the cache and padded batches hold gaps, which a window cannot take "
                "(crashes, or answers that change with the batch). Serve it on a serving engine "
                "(CITEQA_GENERATOR_URL) or choose a model without it")
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.speculative_tokens = max(int(speculative_tokens), 0)
        self.quote_guess = quote_guess
        self.device = next(model.parameters()).device
        self.batch_prefill = (self.device.type != "cpu") if batch_prefill is None else batch_prefill
        # The decoder stack and the LM head are used apart, so that logits are only computed
        # for the tokens the grammar allows (see lm_head.py).
        decoder = model.get_decoder()
        self.lean = lean and LeanDecoder.supports(decoder)
        self._decoder = LeanDecoder(decoder) if self.lean else with_cache_keyword(decoder)
        self.head = head or LMHead(model)
        self.prefix_cache = SystemPrefixCache(
            self._decoder, model.config, self.device,
            lambda message: turn_ids(tokenizer, message), enabled=reuse_prefix,
        )
        # Tokens of the last greedy output: a second source of drafts, for the text every
        # output repeats that no prompt contains (``Quote [1]:`` after a quote's ``Quote [``).
        self._recent = np.zeros(0, dtype=np.int64)
        self._stop = frozenset(stop_token_ids(tokenizer))
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
        cpu_dtype: str = "auto",
        **kw: Any,
    ) -> HFBackend:
        """Load ``name`` ("smollm2" or a local HF dir) and wrap it; ``kw`` go to ``__init__``.

        ``adapter``: a LoRA adapter dir (``citeqa train generator``), merged into the weights so
        decoding costs nothing extra; the model id then names it. ``cpu_dtype`` (a CPU only; see
        ``citeqa.compute``): "bf16" computes in bf16, reading int8 weights for steps of up to
        four rows (``CpuLinear``; id ``+bf16-int8w``), "fp16w" stores the decoder's Linear
        weights in fp16 computed in fp32 (id ``+fp16-linear``), "fp32" keeps them as loaded,
        "auto" measures which pays.
        On a CPU, log-probabilities are computed in fp32 from an fp32 copy of the LM head
        whatever the decoder computes in (on a GPU, from the head as loaded).
        """
        if cpu_dtype not in CPU_DTYPES:
            raise ConfigError(f"cpu_dtype must be one of {CPU_DTYPES}: {cpu_dtype!r}")
        target = pick_device(device)
        merge_first = adapter is not None and fp16_only_gpu(target)
        # an adapter's fingerprint reads fp32 and bf16 weights alike, not fp16 ones: on a GPU
        # without bf16 (T4, V100) the model is loaded in fp32 on the CPU, merged, then moved
        model, tokenizer, model_id = load_model(name, cache_dir,
                                                device="cpu" if merge_first else target)
        if adapter is not None:
            from citeqa.generation.adapter import adapter_id, apply_adapter

            apply_adapter(model, Path(adapter))
            model_id = f"{model_id}+{adapter_id(Path(adapter))}"
        if merge_first:  # parameters only (the rotary frequencies stay fp32, as they do in a
            # model loaded in fp16 without an adapter), cast on the CPU: the GPU never holds
            # the fp32 model
            cast_parameters(model, torch.float16)
            model.to(device=target)
        head = LMHead(model)  # before any conversion: fp32 logits from fp32 weights on a CPU
        if next(model.parameters()).device.type == "cpu":
            share_kv_heads_in_cpu_attention()
            resolved = cpu_dtype_for(cpu_dtype, for_generator=True)
            if resolved == "bf16":
                cast_parameters(model, torch.bfloat16)
                install_cpu_linears(model.get_decoder())
                model_id += MODEL_ID_SUFFIX["bf16"]  # outputs differ (slightly): reports say so
            elif resolved == "fp16w" and store_linear_weights_fp16(model, kw.get("threads")):
                model_id += MODEL_ID_SUFFIX["fp16w"]
        return cls(model, tokenizer, model_id, head=head, **kw)

    # -- public ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """Complete every request, all in one batch; result[i] holds request i's completions."""
        if not requests:
            return []
        out = [abandoned_completions(r) if r.is_abandoned() else None for r in requests]
        live = [r for r, o in zip(requests, out, strict=True) if o is None]
        if live:  # an abandoned request costs no prefill
            with torch.inference_mode():
                done = iter(self._generate_batch(live))
            out = [next(done) if o is None else o for o in out]
        return out  # type: ignore[return-value]

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, ending with the assistant turn's opening."""
        return prompt_ids(self.tokenizer, messages)

    # -- one batch -------------------------------------------------------------------------------

    def _rows(self, req: GenerationRequest, prompt: list[int]) -> list[_Row]:
        """The ``n`` rows of one request, with the tokens the grammar forces first consumed."""
        if req.n < 1:
            raise ValueError(f"n must be >= 1, got {req.n}")
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
                 temperature, generator, quote_stage=req.quote_stage, request=req)
            for i in range(req.n)
        ]
        forced = self._jump_forward(rows[0])
        for row in rows[1:]:
            if row.constraint is not None:
                row.constraint.consume_many(forced)
            row.tokens, row.accepted = list(forced), rows[0].accepted
        return rows

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        prompts = [self.prompt_ids(r.messages) for r in requests]
        per_request = [self._rows(r, p) for r, p in zip(requests, prompts, strict=True)]

        stats = _Stats()
        t0 = time.perf_counter()
        seqs = [p + rows[0].tokens for p, rows in zip(prompts, per_request, strict=True)]
        if self.batch_prefill or len(seqs) == 1:
            cache, mask, hidden = self._prefill(requests, seqs, stats)
        else:  # one prompt at a time: no compute spent on padding (see __init__)
            # requests with one prompt (candidates held to different passages) share its prefill
            same: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                same.setdefault(json.dumps(r.messages), []).append(i)
            shared: dict[int, Prefix | None] = {}
            for members in same.values():
                prefix = self.prefix_cache.batch_prefix(requests[members[0]].messages,
                                                        [seqs[i] for i in members])
                shared.update((i, prefix) for i in members)
            parts = {}
            for i in range(len(seqs)):  # one whose client left meanwhile costs no prefill
                if not requests[i].is_abandoned():  # (each took seconds on 2 cores)
                    parts[i] = self._prefill(requests[i : i + 1], seqs[i : i + 1], stats,
                                             shared[i])
            if not parts:
                return [abandoned_completions(r) for r in requests]
            live = sorted(parts)
            done = iter(self._decode_batch(
                [requests[i] for i in live], [prompts[i] for i in live],
                [per_request[i] for i in live], [seqs[i] for i in live],
                stack_prefills([parts[i] for i in live], self.model.config), stats, t0))
            return [next(done) if i in parts else abandoned_completions(r)
                    for i, r in enumerate(requests)]
        return self._decode_batch(requests, prompts, per_request, seqs, (cache, mask, hidden),
                                  stats, t0)

    def _decode_batch(self, requests: list[GenerationRequest], prompts: list[list[int]],
                      per_request: list[list[_Row]], seqs: list[list[int]],
                      prefilled: tuple[DynamicCache, torch.Tensor, torch.Tensor], stats: _Stats,
                      t0: float) -> list[list[Completion]]:
        """Decode the rows of a prefilled batch (``prefilled``: its cache, mask and last hidden
        states, one row per request); ``t0``: when its prefill began."""
        cache, mask, hidden = prefilled
        if self.device.type == "cuda":  # its kernels ran asynchronously: their time is here
            torch.cuda.synchronize(self.device)
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
                text = decoded(self.tokenizer, kept_tokens(row),
                               cut=len(row.tokens) >= row.max_tokens)
                completions.append(Completion(text, row.logprob, len(row.tokens), timings))
            out.append(completions)
        return out

    def _prefill(self, requests: Sequence[GenerationRequest], seqs: list[list[int]],
                 stats: _Stats, prefix: Prefix | None = None,
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill ``seqs`` (one per request) as one batch, left-padded after their shared
        prefix (``prefix``, else the system turn); return the cache, its mask [R, T] (1 = real
        token) and each row's last hidden state [R, H]."""
        # shared: tokens already in the cache (the system turn, or the whole shared prompt)
        cache, shared = self.prefix_cache.fresh_cache(requests[0].messages, seqs, prefix)
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
            cache=cache,
            use_cache=True,
        )
        stats.forward_passes += 1
        return out.last_hidden_state[:, -keep:, :]

    # -- choosing tokens --------------------------------------------------------------------------

    def _jump_forward(self, row: _Row) -> list[int]:
        """Consume the tokens the grammar forces now; return them (also appended to the row)."""
        c = row.constraint
        if c is None or c.is_stopped():
            return []
        forced = c.forced_tokens()[: max(row.max_tokens - len(row.tokens), 0)]
        # forced tokens the grammar refuses (a tokenizer that reads some forced text otherwise
        # than the grammar: ll_tokenizer_for reads a special token's text as text for that
        # reason) are decoded token by token under the mask instead: never a crash, which
        # would fail every request of the batch
        forced = forced[: c.valid_prefix(forced)] if forced else forced
        if forced and not c.consume_many(forced):
            raise AssertionError(f"grammar rejected its own forced tokens {forced}: {c.error}")
        row.tokens.extend(forced)
        if forced and c.is_accepting():
            row.accepted = len(row.tokens)
        if forced and c.is_stopped() and self._next_stage(row):
            forced = forced + self._jump_forward(row)
        return forced

    def _next_stage(self, row: _Row) -> bool:
        """When a span-mode row has written its answer (its first grammar is complete), switch
        it to the quote's grammar, built from that answer; True when it switched."""
        if row.quote_stage is None:
            return False
        stage, row.quote_stage = row.quote_stage, None
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        grammar = stage.grammar(text)
        if grammar is None:
            logger.warning("no passage holds the span-mode answer in %r", text[:80])
            return False
        row.constraint = self._new_constraint(grammar)
        if self.quote_guess and self.speculative_tokens and row.greedy:
            guess = stage.guess(text)
            if guess is not None:  # cut before any stop token, as prompt-lookup drafts are
                tokens = self.tokenizer.encode(guess, add_special_tokens=False)
                end = next((i for i, t in enumerate(tokens) if t in self._stop), len(tokens))
                row.guess, row.guess_from = tokens[:end], len(row.tokens)
        return True

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
            if c.is_accepting():
                row.accepted = len(row.tokens)
            if c.is_stopped() and not self._next_stage(row):
                row.done = True
        if len(row.tokens) >= row.max_tokens:
            row.done = True

    # -- the decoding loop ------------------------------------------------------------------------

    def _step_input(self, row: _Row, hidden: torch.Tensor) -> list[int] | None:
        """Choose a row's next token from ``hidden`` [H]; return what to feed the model next
        (the token and the tokens the grammar forces after it), or None when the row is done."""
        tok, lp = choose(self.head.scores(hidden, row.constraint), row.temperature,
                         row.generator)
        self._accept(row, tok, lp)
        if row.done:
            return None
        feed = [tok] + self._jump_forward(row)
        if row.finished():
            row.done = True
            return None
        return feed

    def _draft_for(self, row: _Row, budget: int, guess_budget: int = 0) -> list[int]:
        """A draft for a greedy row: its quote guess (at most ``guess_budget`` tokens), or
        what follows its last tokens in its prompt or in the last greedy output (at most
        ``budget``), cut to what its grammar allows (see ``best_draft``)."""
        left = row.max_tokens - len(row.tokens)
        room = min(left, budget)
        if not (row.greedy and left > 0):
            return []
        guessed = self._guessed(row, min(left, guess_budget))
        if guessed and row.constraint is not None:
            guessed = guessed[: row.constraint.valid_prefix(guessed)]
        if len(guessed) >= room:
            return guessed
        if room <= 0:
            return []
        candidates = itertools.chain(  # the guess, the prompt, then the last output
            [guessed] if guessed else [],
            prompt_lookup_drafts(row.prompt, row.tokens, room, self._stop),
            prompt_lookup_drafts(self._recent, row.tokens, room, self._stop),
        )
        c = row.constraint
        return best_draft(candidates, room, None if c is None else c.valid_prefix)

    @staticmethod
    def _guessed(row: _Row, room: int) -> list[int]:
        """The next ``room`` tokens of the row's quote guess, while its output since the guess
        was made agrees with it (then none: the model went elsewhere)."""
        if row.guess is None:
            return []
        written = row.tokens[row.guess_from:]
        if row.guess[: len(written)] != written:
            row.guess = None
            return []
        return row.guess[len(written) : len(written) + room]

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
            running = max(sum(not rows[ri].done for ri in live), 1)
            budget = self.speculative_tokens // running
            guess_budget = max(GUESS_TOKENS // running, budget) if self.speculative_tokens else 0
            for pos, ri in enumerate(live):
                row = rows[ri]
                if not row.done and row.request is not None and row.request.is_abandoned():
                    row.done = True  # nobody waits for it: its output comes out cut
                feed = None if row.done else self._step_input(row, next_hidden[pos])
                if feed is not None:
                    steps.append((pos, feed, self._draft_for(row, budget, guess_budget)))
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
                    tok, lp = choose(self.head.scores(hidden[b, base + i], row.constraint),
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
