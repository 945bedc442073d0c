"""Choosing the CPU compute format: by a (faked) matmul probe, with explicit overrides."""

from __future__ import annotations

import pytest

from citeqa.compute import BF16_MIN_SPEEDUP, ProbeResult, cpu_dtype, probe_matmul


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
