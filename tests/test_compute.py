"""Choosing the CPU compute format: by a (faked) matmul probe, with explicit overrides."""

from __future__ import annotations

import pytest

from citeqa import compute
from citeqa.compute import (
    BF16_MIN_SPEEDUP,
    ONEDNN_MIN_SPEEDUP,
    ProbeResult,
    cpu_dtype,
    fp32_kernel,
    probe_fp32_linear,
    probe_matmul,
    to_serving_dtype,
)
from citeqa.errors import ConfigError
from citeqa.generation.cpu_linear import OnednnLinear, onednn_available


def fast_bf16() -> ProbeResult:
    return ProbeResult(fp32_gflops=150.0, bf16_gflops=1100.0)


def slow_bf16() -> ProbeResult:  # a CPU without bf16 units emulates it
    return ProbeResult(fp32_gflops=150.0, bf16_gflops=60.0)


def test_auto_takes_bf16_only_where_the_probe_says_it_pays() -> None:
    assert cpu_dtype("auto", probe=fast_bf16) == "bf16"
    assert cpu_dtype("auto", for_generator=True, probe=fast_bf16) == "bf16"
    assert cpu_dtype("auto", probe=slow_bf16) == "fp32"
    assert cpu_dtype("auto", for_generator=True, probe=slow_bf16) == "fp16w"  # today's path
    barely = ProbeResult(100.0, 100.0 * BF16_MIN_SPEEDUP * 0.99)
    assert cpu_dtype("auto", probe=lambda: barely) == "fp32"
    exactly = ProbeResult(100.0, 100.0 * BF16_MIN_SPEEDUP)  # "at least" the factor
    assert cpu_dtype("auto", probe=lambda: exactly) == "bf16"


def test_without_fp16_products_auto_takes_fp32_and_fp16w_is_refused_with_what_to_do() -> None:
    """An ARM torch (QNNPACK, oneDNN) has no fbgemm fp16 products: `auto` picked fp16w where
    bf16 did not pay, and the generator failed to load."""
    import torch

    def none() -> bool:
        return False

    assert cpu_dtype("auto", for_generator=True, probe=slow_bf16, fp16_products=none) == "fp32"
    assert cpu_dtype("auto", for_generator=True, probe=fast_bf16, fp16_products=none) == "bf16"
    assert cpu_dtype("fp16w", probe=slow_bf16, fp16_products=none) == "fp32"  # not a generator
    with pytest.raises(ConfigError, match="fp16w needs fbgemm's fp16 products.*use fp32"):
        cpu_dtype("fp16w", for_generator=True, fp16_products=none)
    engine = torch.backends.quantized.engine
    try:  # the real check, per engine
        for other, has in (("qnnpack", False), ("x86", True)):
            if other in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = other
                assert compute.fp16_linear_available() is has, other
    finally:
        torch.backends.quantized.engine = engine


def test_an_explicit_format_is_taken_without_probing() -> None:
    def never() -> ProbeResult:
        raise AssertionError("probed")

    assert cpu_dtype("bf16", probe=never) == "bf16"
    assert cpu_dtype("fp32", probe=never) == "fp32"
    assert cpu_dtype("fp16w", for_generator=True, probe=never) == "fp16w"
    assert cpu_dtype("fp16w", probe=never) == "fp32"  # fp16 weights only mean something to decoding
    with pytest.raises(ValueError, match="cpu dtype"):
        cpu_dtype("int4", probe=never)


def test_the_real_probe_measures_both_formats() -> None:
    result = probe_matmul(rounds=1)
    assert result.fp32_gflops > 0 and result.bf16_gflops > 0


needs_onednn = pytest.mark.skipif(not onednn_available(),
                                  reason="this torch build has no oneDNN fp32 linear kernel")


@needs_onednn
def test_the_fp32_kernel_is_onednn_only_where_its_probe_says_it_pays() -> None:
    assert fp32_kernel(environ={}, probe=lambda: (100.0, 140.0)) == "onednn"
    barely = (100.0, 100.0 * ONEDNN_MIN_SPEEDUP * 0.99)
    assert fp32_kernel(environ={}, probe=lambda: barely) == "torch"
    slow = (150.0, 90.0)
    assert fp32_kernel(environ={"CITEQA_FP32_KERNEL": "auto"}, probe=lambda: slow) == "torch"
    assert fp32_kernel("auto", environ={"CITEQA_FP32_KERNEL": "torch"},
                       probe=lambda: (100.0, 140.0)) == "onednn"  # an argument beats the variable


@needs_onednn
def test_auto_probes_once_per_process_and_a_failing_probe_means_torch(monkeypatch, caplog) -> None:
    calls = []

    def probe() -> tuple[float, float]:
        calls.append(1)
        return 100.0, 140.0

    monkeypatch.setattr(compute, "_fp32_kernel", None)
    monkeypatch.setattr(compute, "probe_fp32_linear", probe)
    assert [fp32_kernel(environ={}) for _ in range(3)] == ["onednn"] * 3 and len(calls) == 1

    def broken() -> tuple[float, float]:
        raise RuntimeError("no primitive descriptor")

    with caplog.at_level("WARNING"):
        assert fp32_kernel(environ={}, probe=broken) == "torch"
    assert "no primitive descriptor" in caplog.text


def test_an_explicit_fp32_kernel_is_taken_without_probing_and_a_typo_is_refused(
        monkeypatch, caplog) -> None:
    def never() -> tuple[float, float]:
        raise AssertionError("probed")

    assert fp32_kernel(environ={"CITEQA_FP32_KERNEL": "torch"}, probe=never) == "torch"
    want = "onednn" if onednn_available() else "torch"  # a build without oneDNN keeps torch's
    assert fp32_kernel(environ={"CITEQA_FP32_KERNEL": " oneDNN "}, probe=never) == want
    with pytest.raises(ConfigError, match="CITEQA_FP32_KERNEL"):
        fp32_kernel(environ={"CITEQA_FP32_KERNEL": "mkl"}, probe=never)
    with pytest.raises(ConfigError, match="the fp32 kernel must be one of auto, onednn, torch"):
        fp32_kernel("mkl", probe=never)
    monkeypatch.setattr("citeqa.generation.cpu_linear.onednn_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert fp32_kernel("onednn", probe=never) == "torch"
    assert "no oneDNN" in caplog.text


@needs_onednn
def test_serving_in_fp32_installs_the_chosen_kernel(monkeypatch) -> None:
    import torch
    from torch import nn

    for kernel, kind in (("onednn", OnednnLinear), ("torch", nn.Linear)):
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 4)))
        x = torch.randn(3, 8)
        want = model(x)
        assert to_serving_dtype(model, "fp32", kernel=kernel) == "fp32"
        assert type(model[0]) is kind and type(model[2][0]) is kind
        with torch.no_grad():
            assert torch.allclose(model(x), want, atol=1e-5)
    monkeypatch.setenv("CITEQA_FP32_KERNEL", "onednn")  # no argument: the variable decides
    model = nn.Sequential(nn.Linear(8, 16))
    to_serving_dtype(model, "fp32")
    assert type(model[0]) is OnednnLinear


@needs_onednn
def test_the_real_fp32_probe_measures_both_kernels() -> None:
    torch_rate, onednn_rate = probe_fp32_linear(rounds=1)
    assert torch_rate > 0 and onednn_rate > 0


AVX2_ONLY = ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
             "processor\t: 1\nflags\t\t: fpu avx2\n")


def test_bf16_is_known_absent_only_from_x86_flags_without_it() -> None:
    from citeqa.compute import bf16_hardware

    assert not bf16_hardware(AVX2_ONLY, "x86_64")  # an AVX2-only EPYC: emulated bf16
    assert not bf16_hardware(AVX2_ONLY, "AMD64")  # (Windows' name for x86_64)
    assert bf16_hardware(AVX2_ONLY.replace("fma", "fma avx512_bf16"), "x86_64")  # Zen 4
    assert bf16_hardware(AVX2_ONLY.replace("fma", "fma amx_bf16 amx_tile"), "AMD64")  # AMX
    assert bf16_hardware(AVX2_ONLY, "aarch64")  # other flags there: the probe decides
    assert bf16_hardware("processor\t: 0\n", "x86_64")  # no flags read: the probe decides


def test_without_bf16_hardware_the_probe_times_fp32_only(monkeypatch) -> None:
    asked = []

    def fake_probe(rounds: int = 30, budget_s: float = 2.0, *, bf16: bool = True):
        asked.append(bf16)
        return ProbeResult(100.0, 900.0 if bf16 else 0.0)

    monkeypatch.setattr(compute, "probe_matmul", fake_probe)
    for hardware, want in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(compute, "_probed", None)
        monkeypatch.setattr(compute, "bf16_hardware", lambda hardware=hardware: hardware)
        assert cpu_dtype("auto") == want
        assert asked[-1] is hardware
    assert len(asked) == 2


def test_the_real_probe_can_skip_bf16() -> None:
    result = probe_matmul(rounds=1, bf16=False)
    assert result.fp32_gflops > 0 and result.bf16_gflops == 0.0 and result.bf16_speedup == 0.0


def test_asking_for_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(compute, "_warned_emulated", False)
    monkeypatch.setattr(compute, "bf16_hardware", lambda: False)
    with caplog.at_level("WARNING"):
        assert cpu_dtype("bf16") == "bf16" and cpu_dtype("bf16") == "bf16"  # still honoured
    assert caplog.text.count("no bf16 hardware") == 1
    monkeypatch.setattr(compute, "_warned_emulated", False)
    monkeypatch.setattr(compute, "bf16_hardware", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING"):
        cpu_dtype("bf16")
    assert "no bf16 hardware" not in caplog.text


def test_a_gpu_computes_in_bf16_only_where_its_hardware_has_it(monkeypatch) -> None:
    """torch's is_bf16_supported() says yes to T4 and V100 cards, which only emulate bf16:
    everything ran emulated there, and the fp16 fallback never did. The device asked about is
    the one looked at, not the current one."""
    import torch

    from citeqa.compute import cuda_half_dtype

    asked: list[object] = []
    for capability, dtype in (((7, 5), torch.float16), ((7, 0), torch.float16),
                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: asked.append(device) or c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert cuda_half_dtype("cuda:1") == dtype, capability
    assert set(asked) == {"cuda:1"}


def test_lora_training_on_a_gpu_without_bf16_loads_fp32(monkeypatch, tmp_path) -> None:
    """It trained fp16 weights without loss scaling (most gradients lost to underflow), and
    fingerprinted fp16 weights, which no serving load matches."""
    from typer.testing import CliRunner

    import citeqa.generation.models as models
    from citeqa.training.cli import app

    loads: list[str | None] = []

    class Stop(Exception):
        pass

    def load_model(name, cache_dir, *, device=None):  # type: ignore[no-untyped-def]
        loads.append(device)
        raise Stop

    (tmp_path / "demos.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(models, "load_model", load_model)
    import citeqa.training.demos as demos

    monkeypatch.setattr(demos, "read_demos", lambda path: [])
    for fp16_only, loads_on in ((True, "cpu"), (False, "cuda")):
        monkeypatch.setattr(models, "fp16_only_gpu", lambda device, v=fp16_only: v)
        r = CliRunner().invoke(app, ["generator", "--data", str(tmp_path / "demos.jsonl"),
                                     "--out", str(tmp_path / "ad"), "--device", "cuda",
                                     "--model", str(tmp_path / "model"), "--no-progress"])
        assert isinstance(r.exception, Stop) and loads.pop() == loads_on, r.output


def test_an_empty_cpu_dtype_setting_is_auto() -> None:
    from citeqa.compute import CPU_DTYPE_ENV, cpu_dtype_setting

    assert cpu_dtype_setting({CPU_DTYPE_ENV: ""}) == "auto"  # (a compose file's "X=" line)
    assert cpu_dtype_setting({}) == "auto"


def test_a_model_off_the_cpu_is_left_as_it_is(monkeypatch) -> None:
    """to_serving_dtype converts CPU models only: a model on another device keeps its weights
    (here the meta device, with bf16 said to pay)."""
    import torch

    monkeypatch.setattr(compute, "cpu_dtype", lambda requested: "bf16")
    model = torch.nn.Linear(4, 4, device="meta")
    assert to_serving_dtype(model, "auto") == "fp32"
    assert model.weight.dtype == torch.float32 and type(model) is torch.nn.Linear


def test_training_autocasts_on_the_cpu_only_in_bf16() -> None:
    import torch

    from citeqa.compute import training_autocast

    with training_autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with training_autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_the_probe_keeps_each_runs_fastest_round_within_its_budget() -> None:
    """Best of the rounds (one quiet moment suffices), and no round past the budget."""
    import time

    from citeqa.compute import _best_seconds

    calls: list[int] = []

    def fast_then_slow() -> None:
        calls.append(1)
        time.sleep(0.05 if len(calls) == 4 else 0.0)  # (call 1 is the warm-up; 4 the last)

    best = _best_seconds({"x": fast_then_slow}, rounds=3, budget_s=10.0)
    assert len(calls) == 4 and best["x"] < 0.04
    calls.clear()
    _best_seconds({"x": fast_then_slow}, rounds=5, budget_s=0.0)
    assert len(calls) == 2  # the warm-up and one round

