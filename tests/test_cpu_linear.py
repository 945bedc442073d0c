"""CpuLinear: a bf16 GEMM for many rows, int8 weights for the few rows of a decoding step;
OnednnLinear: fp32 products through oneDNN; Fp16Linear: fp16 weights computed in fp32."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from citeqa.generation.cpu_linear import (
    INT8_ROWS,
    CpuLinear,
    Fp16Linear,
    OnednnLinear,
    cast_parameters,
    install_cpu_linears,
    install_fp16_linears,
    install_onednn_linears,
    onednn_available,
    quantize_per_channel,
)


def layer(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 96, bias=bias)


def test_quantize_per_channel_bounds_the_error_by_half_a_step() -> None:
    w = layer().weight
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (96,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bias", [True, False])
def test_both_kernels_approximate_the_fp32_layer(bias: bool) -> None:
    lin = layer(bias)
    fast = CpuLinear(lin)
    few = torch.randn(1, INT8_ROWS, 64)  # [B, S, in]: any leading shape
    many = torch.randn(2, 5, 64)
    with torch.no_grad():
        for x in (few, many):
            ref, got = lin(x), fast(x)
            assert got.shape == ref.shape and got.dtype == torch.bfloat16
            assert (got.float() - ref).abs().max() < 0.03 * ref.abs().max()
        # the same rows through the two kernels: they really are two kernels
        rows = many.reshape(-1, 64)
        assert not torch.equal(fast(rows[:INT8_ROWS]), fast(rows)[:INT8_ROWS])


@pytest.mark.parametrize("width", [24, 40, 100])
def test_a_layer_whose_input_width_torchs_int8_product_misreads_keeps_the_bf16_gemm(
        width: int) -> None:
    """torch's int8 product read past rows of in_features not a multiple of 16: a decoding
    step's 1-4 rows came out garbage, NaN, or the process died (widths 7, 24, 40, 50, 100)."""
    torch.manual_seed(0)
    lin = nn.Linear(width, 64)
    fast = CpuLinear(lin)
    assert fast.qweight is None and "int8_decode=False" in fast.extra_repr()
    x = torch.randn(1, width)
    with torch.no_grad():
        ref, got = lin(x), fast(x)
    assert torch.isfinite(got.float()).all()
    assert (got.float() - ref).abs().max() < 0.03 * ref.abs().max()
    assert CpuLinear(nn.Linear(64, 64)).qweight is not None  # (a multiple of 32: int8)


def test_within_a_kernel_a_row_does_not_depend_on_the_other_rows() -> None:
    fast = CpuLinear(layer())
    x = torch.randn(INT8_ROWS, 64)
    with torch.no_grad():
        together = fast(x)
        for i in range(len(x)):
            assert torch.equal(together[i], fast(x[i : i + 1])[0]), i


def test_install_replaces_every_linear() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    assert install_cpu_linears(net) == 2
    assert sum(isinstance(m, CpuLinear) for m in net.modules()) == 2
    assert not any(type(m) is nn.Linear for m in net.modules())
    plain = nn.Sequential(nn.Linear(8, 8))
    install_cpu_linears(plain, int8_decode=False)
    assert plain[0].qweight is None
    with torch.no_grad():  # no int8 weights: one row uses the bf16 GEMM
        assert plain(torch.randn(1, 8)).dtype == torch.bfloat16


def test_parameters_go_to_bf16_and_float_buffers_stay_fp32() -> None:
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2) / 8)))

    m = Rotary()
    exact = m.inv_freq.clone()
    cast_parameters(m, torch.bfloat16)
    assert m.proj.weight.dtype == torch.bfloat16 and m.proj.bias.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, exact)


# --- OnednnLinear: fp32 products through oneDNN (CPUs without fast bf16) ---------------------

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 256, 300])
def test_onednn_linear_equals_nn_linear_to_fp32_rounding(rows: int, bias: bool) -> None:
    ref = layer(bias)
    fast = OnednnLinear(ref)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        want = ref(x)
        assert torch.allclose(fast.rows(x), want, atol=1e-5, rtol=1e-5)
        y = fast(x.view(1, rows, 64))  # any leading dimensions, as nn.Linear
        assert y.shape == (1, rows, 96) and torch.allclose(y[0], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fast.rows(x + 1), want, atol=1e-3)  # the comparison can fail


@needs_onednn
def test_install_onednn_linears_keeps_the_state_dict_and_skips_other_dtypes() -> None:
    model = nn.Sequential(layer(), nn.ReLU(), nn.Sequential(nn.Linear(96, 8)),
                          nn.Linear(8, 8).to(torch.bfloat16))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert install_onednn_linears(model) == 2
    assert isinstance(model[0], OnednnLinear) and isinstance(model[2][0], OnednnLinear)
    assert type(model[3]) is nn.Linear  # bf16: not an fp32 product
    state = model.state_dict()
    assert set(state) == set(keys) and all(torch.equal(state[k], v) for k, v in keys.items())
    assert "oneDNN" in repr(model[0])


@needs_onednn
def test_onednn_linear_packs_at_its_first_product_and_copies_pack_again() -> None:
    fast = OnednnLinear(layer())
    assert "packed" not in fast.__dict__  # nothing packed until used (fused parts never are)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = fast.rows(x)
        assert "packed" in fast.__dict__
        for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert "packed" not in other.__dict__
            assert torch.equal(other.rows(x), want)


@needs_onednn
def test_onednn_linear_is_plain_under_compile_and_refuses_another_dtype(monkeypatch) -> None:
    fast = OnednnLinear(layer())
    x = torch.randn(3, 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: (seen.append(1), real(*a))[1])
    with torch.no_grad():
        assert torch.allclose(fast(x), real(x, fast.weight, fast.bias)) and seen
        assert "packed" not in fast.__dict__  # inductor packs the weights itself
    monkeypatch.undo()
    half = OnednnLinear(layer()).half()
    with pytest.raises(TypeError, match="fp32"):
        half.rows(x.half())


def ao_fp16(linear: nn.Linear) -> nn.Module:
    """``torch.ao``'s dynamic fp16 Linear of ``linear``: what Fp16Linear replaces."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(linear)), {nn.Linear}, dtype=torch.float16)[0]


@pytest.mark.parametrize("bias", [True, False])
def test_fp16_linear_computes_what_torch_ao_dynamic_fp16_linear_computes(bias: bool) -> None:
    ref = layer(bias)
    fast, ao = Fp16Linear.of(ref), ao_fp16(ref)
    assert type(ao).__name__ != "Fp16Linear" and not list(fast.parameters())
    x = torch.randn(2, 7, 64)  # any leading dimensions, as nn.Linear
    with torch.no_grad():
        got, want = fast(x), ao(x)
        assert got.shape == (2, 7, 96) and got.dtype == torch.float32
        assert torch.equal(got, want)
        exact = ref(x)
        assert torch.allclose(got, exact, atol=1e-2) and not torch.equal(got, exact)  # fp16


@pytest.mark.parametrize("threads", [1, 3])
def test_install_fp16_linears_replaces_every_linear_on_any_number_of_threads(threads) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(layer(), nn.ReLU(), nn.Sequential(nn.Linear(96, 8), nn.LayerNorm(8)),
                          nn.Linear(8, 4, bias=False))
    ao = [ao_fp16(m) for m in (model[0], model[2][0], model[3])]
    x = torch.randn(5, 64)
    assert install_fp16_linears(model, threads=threads) == 3
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert [type(m) for m in (model[0], model[2][0], model[3])] == [Fp16Linear] * 3
    with torch.no_grad():  # each layer packed its own weight, whichever thread packed it
        want = ao[2](model[2][1](ao[1](F.relu(ao[0](x)))))
        assert torch.equal(model(x), want)
    assert "fp16 weights" in repr(model[0])
