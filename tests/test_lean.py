"""LeanDecoder: the same outputs as transformers' forward for Llama-family decoders in CPU bf16,
over every kind of pass the local backend makes (tiny random models; nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from citeqa.generation.cpu_linear import (
    INT8_ROWS,
    CpuLinear,
    cast_parameters,
    install_cpu_linears,
)
from citeqa.generation.kv import with_cache_keyword
from citeqa.generation.lean import LeanDecoder, fused_linear, sdpa_mask

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny(kind: str = "llama", *, bf16: bool = True, **kw) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, **kw))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, **kw))
    else:
        model = MistralForCausalLM(MistralConfig(**SIZES, **kw))
    model.eval()
    if bf16:
        cast_parameters(model, torch.bfloat16)
        install_cpu_linears(model.get_decoder())
    return model


def test_a_fused_linear_equals_its_parts_in_both_kernels_and_shares_their_memory() -> None:
    torch.manual_seed(0)
    parts = [CpuLinear(nn.Linear(32, n, bias=b)) for n, b in ((48, True), (16, False), (16, True))]
    x = torch.randn(INT8_ROWS + 3, 32).bfloat16()
    with torch.no_grad():
        before = [torch.cat([p(rows) for p in parts], -1) for rows in (x[:1], x[:INT8_ROWS], x)]
        fused = fused_linear(parts)
        for rows, ref in zip((x[:1], x[:INT8_ROWS], x), before, strict=True):
            assert torch.equal(fused(rows), ref)  # int8 rows, and the bf16 GEMM
            assert torch.equal(torch.cat([p(rows) for p in parts], -1), ref)  # parts still work
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    assert storage(parts[1].weight) == storage(fused.weight)
    assert storage(parts[2].qweight) == storage(fused.qweight)


def reference_mask(mask: torch.Tensor, past: int, new: int) -> torch.Tensor:
    """The same rule spelt out one position at a time."""
    batch, total = mask.shape
    out = torch.zeros(batch, 1, new, total, dtype=torch.bool)
    for b in range(batch):
        for s in range(new):
            for t in range(total):
                out[b, 0, s, t] = t == past + s or (t <= past + s and bool(mask[b, t]))
    return out


def test_the_attention_mask_is_causal_skips_holes_and_lets_padding_see_itself() -> None:
    assert sdpa_mask(None, 5, 1) is None and sdpa_mask(torch.ones(2, 6), 5, 1) is None
    assert sdpa_mask(torch.ones(1, 4), 0, 4) is None  # a fresh prompt: SDPA's own is_causal
    causal = sdpa_mask(torch.ones(1, 7), 4, 3)  # after cached tokens: offset, so explicit
    assert torch.equal(causal, reference_mask(torch.ones(1, 7), 4, 3))
    # left padding, holes, right padding
    holes = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0]])
    got = sdpa_mask(holes, 4, 3)
    assert torch.equal(got, reference_mask(holes, 4, 3))
    # a padding query sees the real keys before it, and itself
    assert got[0, 0, 2].tolist() == [True, True, False, True, True, False, True]
    prompt = sdpa_mask(torch.tensor([[0, 0, 1, 1]]), 0, 4)  # a left-padded fresh prompt
    assert prompt[0, 0, 0].tolist() == [True, False, False, False]  # padding sees only itself
    assert prompt[0, 0, 3].tolist() == [False, False, True, True]


def hf_and_lean(model: nn.Module):
    decoder = model.get_decoder()
    return with_cache_keyword(decoder), LeanDecoder(decoder)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.isfinite(b).all()
    assert (a.float() - b.float()).abs().max() <= 0.02 * a.float().abs().max() + 1e-3


@pytest.mark.parametrize(("kind", "kw"), [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {}),
])
def test_every_pass_of_the_backend_matches_transformers(kind: str, kw: dict) -> None:
    """Fresh prompt, prompt after a cached prefix, one-token steps, and a multi-row pass with
    left-padded keys, holes and right padding (as ``HFBackend._decode`` makes them)."""
    model = tiny(kind, **kw)
    hf, lean = hf_and_lean(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        outs = [f(input_ids=ids[:, :8], cache=c, use_cache=True)
                for f, c in zip((hf, lean), caches, strict=True)]
        close(outs[0].last_hidden_state, outs[1].last_hidden_state)  # fresh prompt
        outs = [f(input_ids=ids[:, 8:11], position_ids=torch.arange(8, 11)[None], cache=c,
                  use_cache=True) for f, c in zip((hf, lean), caches, strict=True)]
        close(outs[0].last_hidden_state, outs[1].last_hidden_state)  # after a cached prefix
        outs = [f(input_ids=ids[:, 11:], position_ids=torch.tensor([[11]]), cache=c,
                  use_cache=True) for f, c in zip((hf, lean), caches, strict=True)]
        close(outs[0].last_hidden_state, outs[1].last_hidden_state)  # one token
        for c in caches:  # two rows: the second left-padded by 3, with a hole at 6
            c.batch_repeat_interleave(2)
        mask = torch.ones(2, 15, dtype=torch.long)
        mask[1, :3] = 0
        mask[1, 6] = 0
        mask[0, 14] = 0  # the first row feeds 2 tokens, the second 3 (right padding)
        step = torch.randint(0, 97, (2, 3))
        positions = torch.tensor([[12, 13, 14], [8, 9, 10]])
        outs = [f(input_ids=step, attention_mask=mask, position_ids=positions, cache=c,
                  use_cache=True) for f, c in zip((hf, lean), caches, strict=True)]
        close(outs[0].last_hidden_state[0, :2], outs[1].last_hidden_state[0, :2])
        close(outs[0].last_hidden_state[1], outs[1].last_hidden_state[1])
        for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
            # row 0's padding query sees itself here, nothing in transformers: its slot differs
            for rows, end in ((slice(0, 1), 14), (slice(1, 2), 15)):
                close(a.keys[rows, :, :end], b.keys[rows, :, :end])
                close(a.values[rows, :, :end], b.values[rows, :, :end])


def test_only_cpu_bf16_llama_family_decoders_with_plain_caches_are_supported() -> None:
    assert LeanDecoder.supports(tiny("llama").get_decoder())
    assert not LeanDecoder.supports(tiny("llama", bf16=False).get_decoder())  # nn.Linear: fp32
    assert not LeanDecoder.supports(tiny("mistral").get_decoder())  # another class
    sliding = tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not LeanDecoder.supports(sliding.get_decoder())
    with pytest.raises(ValueError, match="not supported"):
        LeanDecoder(tiny("mistral").get_decoder())
