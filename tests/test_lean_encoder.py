"""LeanEncoder: transformers' BERT forward over real tokens only, in CPU bf16 and in fp32 (tiny
random models; nothing downloaded)."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from citeqa import lean_encoder
from citeqa.generation.cpu_linear import (
    OnednnLinear,
    cast_parameters,
    install_cpu_linears,
    install_onednn_linears,
    onednn_available,
)
from citeqa.lean_encoder import ROWS_MULTIPLE, LeanEncoder, use_lean_encoder

SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=96,
             initializer_range=0.2)  # sharp enough attention that a wrong mask shows


def tiny(*, bf16: bool = True, kind=BertModel, config=BertConfig, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = kind(config(**SIZES, **kw)).eval()
    if bf16:
        cast_parameters(model, torch.bfloat16)
        install_cpu_linears(model, int8_decode=False)
    return model


def batch(lengths: list[int], width: int | None = None, seed: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask (right padding) and token types (a second segment from the
    middle), as a tokenizer pads a batch of pairs."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, SIZES["vocab_size"], (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    types = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2:n] = 1
    return ids * mask, mask, types


def reference(model: nn.Module, ids, mask, types) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state


@pytest.mark.parametrize("lengths", [[37], [5, 40, 23, 40], [40, 40], [3, 9, 1]])
def test_real_tokens_match_transformers_and_padding_is_zero(lengths: list[int]) -> None:
    model = tiny()
    ids, mask, types = batch(lengths, width=max(lengths) + 7)  # padding to a multiple, too
    ref = reference(model, ids, mask, types).float()
    lean = LeanEncoder(model)
    with torch.inference_mode():
        out = lean(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    got = out.float()
    assert torch.all(got[~real] == 0)
    cos = nn.functional.cosine_similarity(got[real], ref[real], dim=-1)
    assert cos.min() > 0.9999, cos.min()
    assert (got[real] - ref[real]).abs().max() < 0.05  # bf16 rounding of layer-normed states


def test_without_token_types_or_mask_it_reads_segment_a_and_every_token() -> None:
    model = tiny()
    ids, _, _ = batch([20, 20])
    ref = reference(model, ids, torch.ones_like(ids), None).float()
    with torch.inference_mode():
        out = LeanEncoder(model)(input_ids=ids).last_hidden_state.float()
    assert nn.functional.cosine_similarity(out.reshape(-1, 64), ref.reshape(-1, 64)).min() > 0.999


def test_padding_does_not_change_a_row() -> None:
    """A candidate scores the same alone as beside a longer one: padding neither leaks into
    attention nor into the rows a product reads."""
    model = LeanEncoder(tiny())
    ids, mask, types = batch([12, 33])
    with torch.inference_mode():
        both = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        alone = model(input_ids=ids[:1, :12], attention_mask=mask[:1, :12],
                      token_type_ids=types[:1, :12]).last_hidden_state
    assert torch.allclose(both[0, :12].float(), alone[0].float(), atol=0.05)


def test_a_wrong_mask_fails_the_comparison() -> None:
    """The comparison above can fail: attending to padding keys changes real rows."""
    model = tiny()
    ids, mask, types = batch([5, 40])
    ref = reference(model, ids, mask, types).float()
    with torch.inference_mode():
        out = LeanEncoder(model)(input_ids=ids, attention_mask=torch.ones_like(mask),
                                 token_type_ids=types).last_hidden_state.float()
    cos = nn.functional.cosine_similarity(out[0, :5], ref[0, :5], dim=-1)
    assert cos.min() < 0.9


def test_the_state_dict_keeps_the_models_keys_and_the_fused_weights_share_memory() -> None:
    model = tiny()
    keys = set(model.state_dict())
    lean = LeanEncoder(model)
    assert set(lean.state_dict()) == keys
    query = model.encoder.layer[0].attention.self.query.weight
    assert query.untyped_storage().data_ptr() == lean._qkv[0].weight.untyped_storage().data_ptr()


def test_rows_are_rounded_up_so_few_shapes_reach_the_matrix_units() -> None:
    model = tiny()
    seen: list[int] = []
    dense = model.encoder.layer[0].intermediate.dense
    original = dense.rows
    dense.rows = lambda x: (seen.append(x.shape[0]), original(x))[1]  # type: ignore[method-assign]
    ids, mask, types = batch([7, 30, 2])
    with torch.inference_mode():
        LeanEncoder(model)(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert seen == [ROWS_MULTIPLE * -(-39 // ROWS_MULTIPLE)]


def test_only_cpu_bf16_or_fp32_bert_encoders_are_supported() -> None:
    assert LeanEncoder.supports(tiny())
    assert LeanEncoder.supports(tiny(bf16=False))
    half = tiny(bf16=False).half()  # fp16 nn.Linear: transformers' forward
    assert not LeanEncoder.supports(half)
    assert use_lean_encoder(half) is half
    mixed = tiny(bf16=False)  # one layer's projections swapped for CpuLinear, the other's not
    install_cpu_linears(mixed.encoder.layer[0], int8_decode=False)
    assert not LeanEncoder.supports(mixed)
    assert not LeanEncoder.supports(tiny(kind=RobertaModel, config=RobertaConfig))
    assert not LeanEncoder.supports(tiny(position_embedding_type="relative_key"))
    assert not LeanEncoder.supports(tiny(is_decoder=True))
    supported = tiny()
    assert use_lean_encoder(supported, enabled=False) is supported
    assert isinstance(use_lean_encoder(supported), LeanEncoder)
    with pytest.raises(ValueError, match="not supported"):
        LeanEncoder(half)


def test_it_takes_the_models_mode_and_refuses_to_train() -> None:
    model = tiny()
    assert not LeanEncoder(model).training  # tiny() is in eval mode, as loaded models are
    lean = LeanEncoder(model.train())
    ids, mask, types = batch([4, 9])
    with pytest.raises(RuntimeError, match="inference"):
        lean(input_ids=ids, attention_mask=mask, token_type_ids=types)


def test_a_batch_of_nothing_but_padding_gives_zeros() -> None:
    ids, mask, types = batch([3, 5])
    with torch.inference_mode():
        out = LeanEncoder(tiny())(input_ids=ids, attention_mask=torch.zeros_like(mask),
                                  token_type_ids=types).last_hidden_state
    assert out.shape == (2, 5, 64) and not out.any()


def test_left_padding_matches_transformers_too() -> None:
    model = tiny()
    ids, mask, types = batch([6, 30, 17])
    left = [torch.roll(t, int((m == 0).sum()), dims=0) for t, m in zip(ids, mask, strict=True)]
    masks = [torch.roll(m, int((m == 0).sum()), dims=0) for m in mask]
    kinds = [torch.roll(t, int((m == 0).sum()), dims=0) for t, m in zip(types, mask, strict=True)]
    ids, mask, types = torch.stack(left), torch.stack(masks), torch.stack(kinds)
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # padding on the left
    ref = reference(model, ids, mask, types).float()
    with torch.inference_mode():
        out = LeanEncoder(model)(input_ids=ids, attention_mask=mask,
                                 token_type_ids=types).last_hidden_state.float()
    real = mask.bool()
    assert nn.functional.cosine_similarity(out[real], ref[real], dim=-1).min() > 0.9999


@pytest.mark.parametrize("lengths", [[37], [5, 40, 23, 40], [3, 9, 1]])
def test_fp32_real_tokens_match_transformers_to_float_rounding(lengths: list[int]) -> None:
    """The fp32 path (CPUs without fast bf16): nn.Linear products over the real tokens only."""
    model = tiny(bf16=False)
    ids, mask, types = batch(lengths, width=max(lengths) + 7)
    ref = reference(model, ids, mask, types)
    with torch.inference_mode():
        out = LeanEncoder(model)(input_ids=ids, attention_mask=mask,
                                 token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.all(out[~real] == 0)
    assert (out[real] - ref[real]).abs().max() < 1e-4


def test_fp32_a_wrong_mask_fails_the_comparison() -> None:
    model = tiny(bf16=False)
    ids, mask, types = batch([5, 40])
    ref = reference(model, ids, mask, types)
    with torch.inference_mode():
        out = LeanEncoder(model)(input_ids=ids, attention_mask=torch.ones_like(mask),
                                 token_type_ids=types).last_hidden_state
    assert (out[0, :5] - ref[0, :5]).abs().max() > 1e-2


def test_fp32_rows_are_not_rounded_up_and_the_fused_weights_are_the_layers() -> None:
    model = tiny(bf16=False)
    keys = set(model.state_dict())
    seen: list[int] = []
    dense = model.encoder.layer[0].intermediate.dense
    dense.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    lean = LeanEncoder(model)
    assert set(lean.state_dict()) == keys
    query = model.encoder.layer[0].attention.self.query
    fused = lean._qkv[0]
    assert query.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    with torch.no_grad():  # loading new weights into the layer reaches the fused product
        query.weight.add_(1.0)
    assert torch.equal(fused.weight[:64], query.weight)
    ids, mask, types = batch([7, 30, 2])
    with torch.inference_mode():
        lean(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert seen == []  # the lean forward calls the product without the module
    calls: list[int] = []
    original = F.linear
    with patch.object(lean_encoder.F, "linear",
                      lambda x, w, b=None: (calls.append(x.shape[0]), original(x, w, b))[1]):
        with torch.inference_mode():
            lean(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert calls == [39] * 4 * SIZES["num_hidden_layers"]  # 7 + 30 + 2 real tokens, no more


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_fp32_with_onednn_products_matches_transformers() -> None:
    plain = tiny(bf16=False)
    model = tiny(bf16=False)
    install_onednn_linears(model)
    lean = LeanEncoder(model)
    assert isinstance(lean._qkv[0], OnednnLinear)
    ids, mask, types = batch([5, 40, 23])
    ref = reference(plain, ids, mask, types)
    with torch.inference_mode():
        out = lean(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert torch.all(out[~real] == 0)
    assert (out[real] - ref[real]).abs().max() < 1e-4
