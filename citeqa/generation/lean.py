"""A lean decoder forward for Llama-family models computed in bf16 on a CPU.

A one-row decoding step of SmolLM2-135M streams ~106 MB of int8 weights (``cpu_linear.py``) in
~7-9 ms; transformers' layer code around those products (mask building, output recording,
seven-op RMSNorms, one call per projection) adds about as much again. ``LeanDecoder`` runs the
same layers over the same parameters and the same ``DynamicCache`` with fewer operations:

- the query, key and value projections are one product, and so are the MLP's gate and up
  projections (``cpu_linear.fused_linear``; the result equals the separate products);
- rotary embeddings are applied to the queries and keys in one pass;
- attention is one SDPA call sharing key/value heads (``enable_gqa``) with a boolean mask built
  directly from the 2-D mask of real tokens, or none when every token is real and the pass is
  a single token or a whole fresh prompt.

RMSNorm keeps transformers' numerics (normalised in fp32, rounded to bf16, then scaled), rotary
tables come from the model's own rotary module (so any rope scaling applies), and the cache is
updated through its layers, so the KV surgery in ``kv.py`` and ``hf.py`` is unchanged. Outputs
match transformers' forward up to bf16 rounding (tests compare them).

Only decoders of the classes in ``SUPPORTED`` whose linears are all ``CpuLinear`` (the CPU
bf16 path) and whose cache layers are plain take this path (``LeanDecoder.supports``); every
other model keeps transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from citeqa.generation.cpu_linear import CpuLinear, fused_linear
from citeqa.generation.kv import plain_cache

SUPPORTED = {"LlamaModel": "LlamaDecoderLayer", "Qwen2Model": "Qwen2DecoderLayer"}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RMSNorm in one fused op: normalised in fp32, rounded, then scaled."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)
    return norm.weight * y


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _linear(layer: CpuLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for bf16 ``x`` without the module call's overhead."""
    return layer.rows(x.reshape(-1, layer.in_features)).view(*x.shape[:-1], -1)


def sdpa_mask(mask: torch.Tensor | None, past: int, new: int) -> torch.Tensor | None:
    """SDPA's boolean mask [B, 1, new, past + new] (True = attend) for ``new`` tokens after
    ``past`` cached ones, from ``mask`` [B, past + new] (1 = a real token): causal, real keys
    only, and each position always sees itself (a padding query would otherwise see nothing,
    and its NaN would reach the cache). None when SDPA needs no mask: every token real and
    one new token or no cached ones (then ``is_causal``)."""
    if mask is None or bool(mask.all()):
        if new == 1 or past == 0:
            return None
        mask = None
    total = past + new
    keys = torch.arange(total, device=(mask.device if mask is not None else None))
    queries = past + torch.arange(new, device=keys.device)
    allowed = keys[None, :] <= queries[:, None]  # [new, total]
    if mask is None:
        return allowed[None, None]
    real = mask.bool()[:, None, None, :]  # [B, 1, 1, total]
    return (allowed[None, None] & real) | (keys[None, :] == queries[:, None])[None, None]


@dataclass
class LeanOutput:
    last_hidden_state: torch.Tensor  # [B, S, H]


@dataclass(frozen=True)
class _Layer:
    layer: nn.Module
    qkv: CpuLinear
    gate_up: CpuLinear
    sizes: tuple[int, int, int]  # query heads, key/value heads, head dim
    intermediate: int


class LeanDecoder:
    """Drop-in for ``with_cache_keyword(model.get_decoder())`` (see the module docstring):
    ``decoder(input_ids=, cache=, attention_mask=None, position_ids=None, use_cache=True)``."""

    def __init__(self, decoder: nn.Module) -> None:
        if not self.supports(decoder):
            raise ValueError(f"{type(decoder).__name__} is not supported by LeanDecoder")
        self.decoder = decoder
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = attn.head_dim
            self.layers.append(_Layer(
                layer,
                fused_linear([attn.q_proj, attn.k_proj, attn.v_proj]),
                fused_linear([mlp.gate_proj, mlp.up_proj]),
                (attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim,
                 head_dim),
                mlp.gate_proj.out_features,
            ))

    @staticmethod
    def supports(decoder: nn.Module) -> bool:
        """True for a supported decoder class whose projections are all ``CpuLinear`` and whose
        cache is plain (no sliding window)."""
        layer_class = SUPPORTED.get(type(decoder).__name__)
        layers = getattr(decoder, "layers", None)
        if layer_class is None or not layers:
            return False
        if not all(type(layer).__name__ == layer_class for layer in layers):
            return False
        if not all(isinstance(layer.get_submodule(p), CpuLinear)
                   for layer in layers for p in PROJECTIONS):
            return False
        return plain_cache(decoder.config)

    def __call__(self, *, input_ids: torch.Tensor, cache: Any,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, use_cache: bool = True) -> LeanOutput:
        batch, new = input_ids.shape
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = (past + torch.arange(new, device=input_ids.device))[None].expand(
                batch, -1)
        mask = sdpa_mask(attention_mask, past, new)
        h = self.decoder.embed_tokens(input_ids)
        cos, sin = self.decoder.rotary_emb(h, position_ids)  # [B, S, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, S, 1, D]: over heads
        causal = mask is None and new > 1
        for i, lay in enumerate(self.layers):
            heads, kv_heads, dim = lay.sizes
            x = _rms_norm(lay.layer.input_layernorm, h)
            qkv = _linear(lay.qkv, x).view(batch, new, heads + 2 * kv_heads, dim)
            qk = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
            k, v = cache.layers[i].update(k, v)
            attn = lay.layer.self_attn
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               scale=attn.scaling, enable_gqa=heads != kv_heads)
            h = h + _linear(attn.o_proj, o.transpose(1, 2).reshape(batch, new, -1))
            x = _rms_norm(lay.layer.post_attention_layernorm, h)
            gate, up = _linear(lay.gate_up, x).split((lay.intermediate, lay.intermediate), -1)
            h = h + _linear(lay.layer.mlp.down_proj, lay.layer.mlp.act_fn(gate) * up)
        return LeanOutput(_rms_norm(self.decoder.norm, h))
