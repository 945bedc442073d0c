"""A lean BERT encoder forward for the CPU: the same layers, over real tokens only.

The reward model's cross-encoders read batches of candidates whose texts differ in length, so
transformers' forward spends about a quarter of its products, layer norms and GELUs on padding
(real tokens were 73-76 % of the padded ones over 8 candidates of eval questions). ``LeanEncoder``
runs the same modules with the same parameters:

- every per-token step (the products, GELU, the residual adds, the layer norms) runs over the
  real tokens only, gathered into rows; in bf16 their count is rounded up to ``ROWS_MULTIPLE``
  with copies of the first, so that the matrix units meet few matrix shapes
  (``compute.PAD_MULTIPLE`` says why); fp32 products are not rounded up;
- the query, key and value projections are one product (``cpu_linear.fused_linear`` in bf16,
  each output equal to the separate product's; ``cpu_linear.fused_fp32`` in fp32, equal up to
  rounding, through oneDNN where ``compute.fp32_kernel`` installed ``OnednnLinear``);
- attention is one SDPA call over the padded layout (gathered from the rows) with a boolean
  key mask (none when every token is real); what padded queries compute is dropped.

Padded positions of the output are zero (transformers leaves whatever their queries attended
to): callers mask them, as the verifier's reader and every [CLS] reader do. Real positions
match transformers' forward up to rounding (tests compare them).

It is an ``nn.Module`` with the wrapped model's ``embeddings``, ``encoder`` and ``pooler`` as its
own, so its ``state_dict`` has the same keys; ``wrapped`` is the model itself (compiling takes
transformers' forward: the lean one's data-dependent shapes do not suit it). Only models that
``LeanEncoder.supports`` take it (a ``BertModel`` encoder with absolute positions on the CPU
whose layers' projections are all ``CpuLinear``, the bf16 path, or all fp32 ``nn.Linear`` or
``OnednnLinear``, the path of CPUs without fast bf16); anything else keeps transformers'
forward. It is for inference only: no dropout, and its fused products are outside the module
tree, so the model must not be cast or moved after wrapping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from citeqa.generation.cpu_linear import CpuLinear, OnednnLinear, fused_fp32, fused_linear

SUPPORTED = ("BertModel",)
ROWS_MULTIPLE = 64  # bf16 row counts are rounded up to this (fp32 ones are not)
PROJECTIONS = ("attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # [N, S, H]; zero at padded positions


def use_lean_encoder(encoder: nn.Module, enabled: bool = True) -> nn.Module:
    """``LeanEncoder(encoder)`` where it supports the model and ``enabled``, else ``encoder``."""
    return LeanEncoder(encoder) if enabled and LeanEncoder.supports(encoder) else encoder


class LeanEncoder(nn.Module):
    """Drop-in for a supported encoder's forward (see the module docstring):
    ``encoder(input_ids=, attention_mask=, token_type_ids=None).last_hidden_state``."""

    def __init__(self, model: nn.Module) -> None:
        if not self.supports(model):
            raise ValueError(f"{type(model).__name__} is not supported by LeanEncoder")
        super().__init__()
        self.train(model.training)  # a new module starts in training mode; take the model's
        self.config = model.config
        self.__dict__["wrapped"] = model  # for transformers' forward (compiling); not a child
        self.embeddings, self.encoder, self.pooler = model.embeddings, model.encoder, model.pooler
        # the fused products, outside the module tree: the layers' own weights become views of
        # theirs, and the state dict keeps the wrapped model's keys
        self.bf16 = isinstance(self.encoder.layer[0].intermediate.dense, CpuLinear)
        fuse = fused_linear if self.bf16 else fused_fp32
        self._qkv = [fuse([layer.attention.self.query, layer.attention.self.key,
                           layer.attention.self.value]) for layer in self.encoder.layer]
        self.rows_multiple = ROWS_MULTIPLE if self.bf16 else 1

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for an encoder-only ``BertModel`` with absolute positions whose layers'
        projections (``PROJECTIONS``) are all ``CpuLinear`` or all fp32 ``nn.Linear`` or
        ``OnednnLinear`` on the CPU."""
        config = getattr(model, "config", None)
        if type(model).__name__ not in SUPPORTED or config is None:
            return False
        if (getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False)
                or getattr(config, "position_embedding_type", "absolute") != "absolute"
                or getattr(config, "chunk_size_feed_forward", 0)):
            return False
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not layers:
            return False
        projections = [layer.get_submodule(p) for layer in layers for p in PROJECTIONS]
        return all(isinstance(m, CpuLinear) for m in projections) or all(
            type(m) in (nn.Linear, OnednnLinear) and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu" for m in projections)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        if self.training:
            raise RuntimeError("LeanEncoder is for inference; train the wrapped model instead")
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # [N, S, H]
        width = h.shape[-1]
        where = real.reshape(-1).nonzero().squeeze(1)  # [T] real tokens in the flat layout
        count = len(where)
        if count == 0:  # nothing but padding (no tokenizer makes such a batch)
            return EncoderOutput(h.new_zeros(batch, length, width))
        rounded = -(-count // self.rows_multiple) * self.rows_multiple
        rows = torch.cat([where, where[:1].expand(rounded - count)])  # copies are never stored
        # each padded position reads row 0: only as a key, which the mask hides, or as a query,
        # whose result is dropped (gathers are several times faster than scatters here)
        back = torch.zeros(batch * length, dtype=torch.long)
        back[where] = torch.arange(count)
        x = h.reshape(-1, width).index_select(0, rows)  # [T', H]
        mask = None if bool(real.all()) else real[:, None, None, :]  # [N, 1, 1, S] keys
        for layer, qkv in zip(self.encoder.layer, self._qkv, strict=True):
            attn = layer.attention.self
            heads, dim = attn.num_attention_heads, attn.attention_head_size
            full = product(qkv)(x).index_select(0, back)  # [N * S, 3H]
            q, k, v = full.view(batch, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, heads, S, dim]
            o = o.transpose(1, 2).reshape(batch * length, width).index_select(0, rows)
            out = layer.attention.output
            x = out.LayerNorm(product(out.dense)(o) + x)
            up = layer.intermediate.intermediate_act_fn(product(layer.intermediate.dense)(x))
            x = layer.output.LayerNorm(product(layer.output.dense)(up) + x)
        hidden = x.new_zeros(batch * length, width).index_copy_(0, where, x[:count])
        return EncoderOutput(hidden.view(batch, length, width))


def product(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The product of ``linear`` over 2-D rows [M, in] -> [M, out]: a ``CpuLinear``'s or an
    ``OnednnLinear``'s own, or an ``nn.Linear``'s without the module call."""
    if isinstance(linear, CpuLinear | OnednnLinear):
        return linear.rows
    return lambda x: F.linear(x, linear.weight, linear.bias)

