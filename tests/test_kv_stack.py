"""KV-cache helpers of the local backend: stacking single-prompt prefills into one decoding batch,
and calling a decoder with its cache by the keyword it takes."""

from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache, LlamaConfig

from citeqa.generation.kv import stack_prefills, with_cache_keyword

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     hidden_size=8, intermediate_size=16, vocab_size=32)


def prefill(length: int, fill: float) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    cache = DynamicCache(config=CONFIG)
    for layer in cache.layers:
        kv = torch.full((1, 1, length, 4), fill)
        layer.update(kv, kv + 0.5)
    return cache, torch.ones((1, length), dtype=torch.long), torch.full((1, 8), fill)


def test_rows_are_left_padded_to_the_longest_and_the_padding_is_masked():
    cache, mask, hidden = stack_prefills([prefill(3, 1.0), prefill(5, 2.0), prefill(1, 3.0)],
                                         CONFIG)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert hidden[:, 0].tolist() == [1.0, 2.0, 3.0]
    for layer in cache.layers:
        assert layer.keys.shape == (3, 1, 5, 4)
        real = mask.bool()[:, None, :, None].expand_as(layer.keys)
        assert torch.all(layer.keys[~real] == 0)
        assert layer.keys[0, 0, 2:].unique().tolist() == [1.0]
        assert layer.values[2, 0, 4:].unique().tolist() == [3.5]
    assert cache.get_seq_length() == 5


def test_the_cache_goes_by_the_keyword_the_decoder_takes():
    seen = []

    def old(input_ids, past_key_values=None, use_cache=False):
        seen.append(("past_key_values", past_key_values))

    def new(input_ids, cache=None, use_cache=False):
        seen.append(("cache", cache))

    with_cache_keyword(old)(input_ids=1, cache="c1", use_cache=True)
    with_cache_keyword(new)(input_ids=1, cache="c2", use_cache=True)
    assert seen == [("past_key_values", "c1"), ("cache", "c2")]


def test_a_real_decoder_fills_the_cache_without_a_deprecation_warning():
    from transformers import LlamaModel

    torch.manual_seed(0)
    decoder = LlamaModel(CONFIG).eval()
    cache = DynamicCache(config=CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            with_cache_keyword(decoder)(input_ids=torch.tensor([[1, 2, 3]]), cache=cache,
                                        use_cache=True)
    assert cache.get_seq_length() == 3
