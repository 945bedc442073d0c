"""KV-cache surgery for the local backend: the system turn's keys and values computed once and
copied into each batch, and separately prefilled prompts stacked into one batch.

Keys and values at a position depend only on the tokens up to it, so those of a token prefix
shared by every prompt (the system turn) are the same in every prompt. Only plain growing
caches (``DynamicLayer``) can be copied and stacked: sliding-window layers drop old keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from citeqa.generation.drafts import common_prefix_length

MIN_PREFIX = 8  # shortest shared prompt prefix worth copying from the system-turn cache


def with_cache_keyword(decoder: Callable[..., Any]) -> Callable[..., Any]:
    """``decoder`` called as ``call(cache=..., **kwargs)`` whatever this transformers names the
    keyword: ``cache`` where it was renamed (later 5.x; the old name warns on every call and goes
    in 5.40), ``past_key_values`` before."""
    forward = getattr(decoder, "forward", decoder)
    keyword = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    def call(*, cache: Any, **kwargs: Any) -> Any:
        return decoder(**{keyword: cache}, **kwargs)

    return call


def plain_cache(config: Any) -> bool:
    """True when every layer of ``config``'s cache is a plain growing one (copyable)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


@dataclass(frozen=True)
class Prefix:
    """A system turn's tokens and its keys and values per layer, [1, heads, tokens, head_dim]."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class SystemPrefixCache:
    """The keys and values of the last system turn seen, and fresh caches that start with them.

    ``decoder(input_ids=..., cache=..., use_cache=True)`` runs the decoder stack
    (``with_cache_keyword``);
    ``turn_ids(message)`` renders one message alone (None when the chat template cannot).
    """

    def __init__(self, decoder: Callable[..., Any], config: Any, device: torch.device,
                 turn_ids: Callable[[dict[str, str]], list[int] | None], *,
                 enabled: bool = True) -> None:
        self.decoder = decoder
        self.config = config
        self.device = device
        self.turn_ids = turn_ids
        self.enabled = enabled and plain_cache(config)
        self.last: tuple[str, Prefix] | None = None  # (system text, its prefix)

    def prefix(self, messages: Sequence[dict[str, str]]) -> Prefix | None:
        """The prefix of the system turn of ``messages`` (computed the first time that system
        text is seen), or None when there is none to reuse."""
        if not (self.enabled and messages and messages[0].get("role") == "system"):
            return None
        text = messages[0]["content"]
        if self.last is not None and self.last[0] == text:
            return self.last[1]
        tokens = self.turn_ids(messages[0])
        if tokens is None or len(tokens) < MIN_PREFIX:
            return None
        fresh = DynamicCache(config=self.config)
        self.decoder(input_ids=torch.tensor([tokens], device=self.device),
                     cache=fresh, use_cache=True)
        prefix = Prefix(tokens, [layer.keys for layer in fresh.layers],
                        [layer.values for layer in fresh.layers])
        self.last = (text, prefix)
        return prefix

    def batch_prefix(self, messages: Sequence[dict[str, str]], seqs: Sequence[Sequence[int]],
                     ) -> Prefix | None:
        """The keys and values of the longest token prefix common to every row of a batch
        (candidates that share one prompt and differ only in the passage they must quote),
        computed once from the system turn's; None when it is no longer than that turn."""
        if len(seqs) < 2 or not self.enabled:
            return None
        common = min(min(common_prefix_length(seqs[0], s) for s in seqs[1:]),
                     min(len(s) for s in seqs) - 1)
        system = self.prefix(messages)
        start = min(common_prefix_length(system.tokens, seqs[0]), common) if system else 0
        if common - start < MIN_PREFIX:
            return None
        cache = DynamicCache(config=self.config)
        if system is not None and start:
            for layer, k, v in zip(cache.layers, system.keys, system.values, strict=True):
                layer.update(k[:, :, :start], v[:, :, :start])
        self.decoder(input_ids=torch.tensor([list(seqs[0][start:common])], device=self.device),
                     position_ids=torch.arange(start, common, device=self.device)[None],
                     cache=cache, use_cache=True)
        return Prefix(list(seqs[0][:common]), [layer.keys for layer in cache.layers],
                      [layer.values for layer in cache.layers])

    def fresh_cache(self, messages: Sequence[dict[str, str]], seqs: Sequence[Sequence[int]],
                    prefix: Prefix | None = None) -> tuple[DynamicCache, int]:
        """A fresh cache for a batch whose rows are ``seqs`` (all with the system turn of
        ``messages``), holding the keys and values of their common prefix when that can be
        reused (``prefix``, else the system turn's); returns it with how many tokens it holds
        (every row keeps >= 1 to prefill)."""
        cache = DynamicCache(config=self.config)
        prefix = prefix or self.prefix(messages)
        if prefix is None:
            return cache, 0
        shared = min(min(common_prefix_length(prefix.tokens, s), len(s) - 1) for s in seqs)
        if shared < MIN_PREFIX:  # e.g. another system text
            return cache, 0
        rows = len(seqs)
        for layer, k, v in zip(cache.layers, prefix.keys, prefix.values, strict=True):
            layer.update(k[:, :, :shared].expand(rows, -1, -1, -1),
                         v[:, :, :shared].expand(rows, -1, -1, -1))
        return cache, shared


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
