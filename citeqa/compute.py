"""Which number format a CPU computes in: bf16 where its matrix units make it pay, by measurement.

Recent x86 server CPUs (AVX-512 BF16, AMX) multiply bf16 matrices several times faster than
fp32; older ones emulate bf16 and are slower at it. ``cpu_dtype("auto")`` times a small matmul
in both formats (once per process, well under a second on a quiet machine) and takes bf16
only where it is at least ``BF16_MIN_SPEEDUP`` times faster. Where an x86 CPU's flags list no
bf16 hardware, bf16 is not timed (``bf16_hardware``: emulated, it took seconds to probe).
Settings (``CITEQA_CPU_DTYPE``):

- ``bf16``: weights and activations in bfloat16 (prefill, embedding, training via autocast);
  log-probabilities and scores are still computed in fp32;
- ``fp16w``: a generator's Linear weights stored in fp16 and computed in fp32 (halves the bytes
  a decoding step streams; for everything else, the same as fp32);
- ``fp32``: as loaded;
- ``auto``: ``bf16`` where the probe says it pays, else ``fp16w`` for the generator and
  ``fp32`` for the rest.

Encoders served in fp32 (the reward model's, the embedder; on CPUs without fast bf16, or
where fp32 is asked for) take their products from ``fp32_kernel()``: oneDNN with prepacked
weights (``cpu_linear.OnednnLinear``) where a second short probe finds it at least
``ONEDNN_MIN_SPEEDUP`` times faster than torch's own fp32 product, else torch's.
``CITEQA_FP32_KERNEL`` (``auto``, the default | ``onednn`` | ``torch``) overrides.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from citeqa.errors import ConfigError

logger = logging.getLogger(__name__)

CpuDtype = Literal["auto", "bf16", "fp16w", "fp32"]  # CITEQA_CPU_DTYPE's values (config.py)
CPU_DTYPES: tuple[str, ...] = get_args(CpuDtype)
# What a local generator's model id gains for its CPU serving format (generation/hf.py): answers
# differ slightly from the same weights in fp32, and reports say which format made them.
MODEL_ID_SUFFIX = {"bf16": "+bf16-int8w", "fp16w": "+fp16-linear"}
BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this factor on the probe to be chosen
PROBE_SHAPE = (256, 576, 1536)  # M x K x N: a slice of a small model's prefill
ONEDNN_MIN_SPEEDUP = 1.1  # oneDNN's fp32 product must beat torch's by this factor to be chosen
FP32_KERNEL_ENV = "CITEQA_FP32_KERNEL"
CPU_DTYPE_ENV = "CITEQA_CPU_DTYPE"  # (a service setting: config.py reads it for the others)
FP32_KERNELS = ("auto", "onednn", "torch")
# Encoder batches (embedding, the reward model's cross-encoders) are padded to a multiple of
# this many tokens. In bf16, oneDNN builds a kernel for each new matrix shape it meets (on the
# AMX Xeon one 1536 x 576 product with an unseen row count took 2.7 ms instead of 0.54), and
# sequence lengths vary per batch; padding to 16 leaves few shapes and suits the matrix units'
# tiles. Padding is masked, so results are the same up to rounding.
PAD_MULTIPLE = 16


@dataclass(frozen=True)
class ProbeResult:
    fp32_gflops: float
    bf16_gflops: float

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_gflops / max(self.fp32_gflops, 1e-9)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of bf16 hardware (Linux names)


def bf16_hardware(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """False only where it is known that the CPU has no bf16 hardware: an x86 CPU whose Linux
    flags (``/proc/cpuinfo``, or ``cpuinfo``) list none of ``BF16_CPU_FLAGS``. There torch
    emulates bf16 (an AVX2-only AMD EPYC did 1 GFLOP/s), so timing it only costs seconds. True
    elsewhere (other architectures, flags unreadable): the probe decides."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return not flags or any(f in flags for f in BF16_CPU_FLAGS)


def probe_matmul(rounds: int = 30, budget_s: float = 2.0, *, bf16: bool = True) -> ProbeResult:
    """GFLOP/s of a ``PROBE_SHAPE`` matmul in fp32 and in bf16: the best of up to ``rounds``
    alternating pairs within ``budget_s``. Alternating and keeping the best make the ratio
    robust to other processes competing for the cores: one quiet moment for each suffices.
    With ``bf16=False`` only fp32 is timed and bf16 reported as 0 GFLOP/s."""
    import torch

    m, k, n = PROBE_SHAPE
    flops = 2.0 * m * k * n
    pairs = {dt: (torch.randn(m, k).to(dt), torch.randn(k, n).to(dt))
             for dt in ((torch.float32, torch.bfloat16) if bf16 else (torch.float32,))}
    best = _best_seconds({dt: functools.partial(torch.matmul, a, b)
                          for dt, (a, b) in pairs.items()}, rounds, budget_s)
    return ProbeResult(flops / best[torch.float32] / 1e9,
                       flops / best[torch.bfloat16] / 1e9 if bf16 else 0.0)


def _best_seconds(runs: dict[Any, Callable[[], object]], rounds: int, budget_s: float
                  ) -> dict[Any, float]:
    """The fastest of up to ``rounds`` timings of each run, alternating, within ``budget_s``
    (after one warm-up call each: kernel selection, packing)."""
    import torch

    with torch.no_grad():
        for run in runs.values():
            run()
        best = dict.fromkeys(runs, float("inf"))
        stop = time.perf_counter() + budget_s
        for _ in range(rounds):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - t0)
            if time.perf_counter() > stop:
                break
    return best


_probed: ProbeResult | None = None
_probe_lock = threading.Lock()


def _cached_probe() -> ProbeResult:
    global _probed
    with _probe_lock:
        if _probed is None:
            hardware = bf16_hardware()
            _probed = probe_matmul(bf16=hardware)
            if hardware:
                logger.info("matmul probe: fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s (%.1fx)",
                            _probed.fp32_gflops, _probed.bf16_gflops, _probed.bf16_speedup)
            else:
                logger.info("matmul probe: fp32 %.0f GFLOP/s; bf16 not timed: the CPU flags "
                            "list no bf16 hardware (%s)", _probed.fp32_gflops,
                            " or ".join(BF16_CPU_FLAGS))
        return _probed


def cpu_dtype(requested: str, *, for_generator: bool = False,
              probe: Callable[[], ProbeResult] = _cached_probe,
              fp16_products: Callable[[], bool] | None = None) -> str:
    """The format to compute in on this CPU: "bf16", "fp16w" or "fp32".

    ``requested`` is a ``CPU_DTYPES`` value; "auto" asks ``probe``, and takes fp16w only where
    this torch computes its products (``fp16_products``, default ``fp16_linear_available``),
    else fp32. ``fp16w`` only means something for a generator's decoding; elsewhere it
    computes as fp32. ConfigError for fp16w asked of a generator where it cannot run.
    """
    if requested not in CPU_DTYPES:
        raise ValueError(f"cpu dtype must be one of {CPU_DTYPES}, got {requested!r}")
    if requested == "auto":
        result = probe()
        requested = "bf16" if result.bf16_speedup >= BF16_MIN_SPEEDUP else "fp16w"
        if requested == "fp16w" and for_generator and not (fp16_products
                                                            or fp16_linear_available)():
            return "fp32"
    elif requested == "bf16":
        _warn_if_emulated()
    if requested == "fp16w" and not for_generator:
        return "fp32"
    if requested == "fp16w" and not (fp16_products or fp16_linear_available)():
        raise ConfigError("CITEQA_CPU_DTYPE=fp16w needs fbgemm's fp16 products, which this "
                          f"torch's quantized engine ({_quantized_engine()}) lacks (an ARM "
                          "build, say); use fp32, or auto")
    return requested


def _quantized_engine() -> str:
    import torch

    return str(torch.backends.quantized.engine)


def fp16_linear_available() -> bool:
    """Whether this torch computes fp16w's products: fbgemm's prepacked fp16 linear, which the
    x86 builds' engines have and ARM's (QNNPACK, oneDNN) lack (loading a generator in fp16w
    failed there). Tried once per quantized engine."""
    return _fp16_linear_on(_quantized_engine())


@functools.cache
def _fp16_linear_on(engine: str) -> bool:
    import torch

    try:
        torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
    except (RuntimeError, NotImplementedError, AttributeError):
        logger.info("the quantized engine %s computes no fp16 products: fp16w is off", engine)
        return False
    return True


_warned_emulated = False


def _warn_if_emulated() -> None:
    """Warn once per process when bf16 is asked for on a CPU known to emulate it."""
    global _warned_emulated
    if not _warned_emulated and not bf16_hardware():
        _warned_emulated = True
        logger.warning("bf16 was asked for, but this CPU's flags list no bf16 hardware (%s): "
                       "torch emulates it, 60-90x slower than fp32 (measured on an AVX2-only "
                       "EPYC); `auto` would pick the faster format", " or ".join(BF16_CPU_FLAGS))


def probe_fp32_linear(rounds: int = 30, budget_s: float = 1.0) -> tuple[float, float]:
    """GFLOP/s of a ``PROBE_SHAPE`` fp32 product through torch's ``F.linear`` and through
    oneDNN with a prepacked weight (``OnednnLinear``), timed as ``probe_matmul`` times."""
    import torch
    import torch.nn.functional as F

    from citeqa.generation.cpu_linear import OnednnLinear

    m, k, n = PROBE_SHAPE
    x, linear = torch.randn(m, k), torch.nn.Linear(k, n)
    onednn = OnednnLinear(linear)
    best = _best_seconds({"torch": lambda: F.linear(x, linear.weight, linear.bias),
                          "onednn": lambda: onednn.rows(x)}, rounds, budget_s)
    flops = 2.0 * m * k * n
    return flops / best["torch"] / 1e9, flops / best["onednn"] / 1e9


_fp32_kernel: str | None = None


def checked_kernel(requested: str, name: str = "the fp32 kernel") -> str:
    """``requested`` as one of ``FP32_KERNELS`` (any case, spaces around; empty: "auto");
    ConfigError naming ``name`` for anything else."""
    kernel = requested.strip().lower() or "auto"
    if kernel not in FP32_KERNELS:
        raise ConfigError(f"{name} must be one of {', '.join(FP32_KERNELS)}, got {requested!r}")
    return kernel


def cpu_dtype_setting(environ: Mapping[str, str] | None = None) -> str:
    """``CITEQA_CPU_DTYPE`` of ``environ`` (default ``os.environ``; unset or empty: "auto"),
    checked: for the commands that score as the service will but read no other setting
    (``calibrate``, ``train reward-combine``: a bad setting of the server's stopped them)."""
    value = (os.environ if environ is None else environ).get(CPU_DTYPE_ENV) or "auto"
    if value not in CPU_DTYPES:
        raise ConfigError(f"{CPU_DTYPE_ENV} must be one of {', '.join(CPU_DTYPES)}, "
                          f"got {value!r}")
    return value


def fp32_kernel_setting(environ: Mapping[str, str] | None = None) -> str:
    """``CITEQA_FP32_KERNEL`` of ``environ`` (default ``os.environ``; unset: "auto"), checked
    (``checked_kernel``): commands check it as they start, not when an encoder loads."""
    value = (os.environ if environ is None else environ).get(FP32_KERNEL_ENV, "auto")
    return checked_kernel(value, FP32_KERNEL_ENV)


def fp32_kernel(requested: str | None = None, *, environ: Mapping[str, str] | None = None,
                probe: Callable[[], tuple[float, float]] | None = None) -> str:
    """"onednn" or "torch": whose product fp32 encoders use (see the module docstring).
    ``requested``: one of ``FP32_KERNELS``, or None for ``CITEQA_FP32_KERNEL`` in ``environ``
    (default ``os.environ``), else "auto". "auto" asks ``probe`` ((torch, oneDNN) GFLOP/s), by
    default ``probe_fp32_linear`` once per process; a probe that fails means "torch"."""
    global _fp32_kernel
    requested = fp32_kernel_setting(environ) if requested is None else checked_kernel(requested)
    from citeqa.generation.cpu_linear import onednn_available

    if requested == "torch":
        return "torch"
    if not onednn_available():
        if requested == "onednn":
            logger.warning("%s=onednn, but this torch build has no oneDNN fp32 linear: torch's "
                           "product is used", FP32_KERNEL_ENV)
        return "torch"
    if requested == "onednn":
        return "onednn"
    if probe is not None:
        return _faster(probe)
    with _probe_lock:
        if _fp32_kernel is None:
            _fp32_kernel = _faster(probe_fp32_linear)
        return _fp32_kernel


def _faster(probe: Callable[[], tuple[float, float]]) -> str:
    try:
        torch_rate, onednn_rate = probe()
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot even be probed is not used
        logger.warning("probing oneDNN's fp32 product failed (%s): torch's product is used", exc)
        return "torch"
    kernel = "onednn" if onednn_rate >= ONEDNN_MIN_SPEEDUP * torch_rate else "torch"
    logger.info("fp32 product probe: torch %.0f GFLOP/s, oneDNN %.0f GFLOP/s: %s",
                torch_rate, onednn_rate, kernel)
    return kernel


def cuda_bf16(device=None) -> bool:  # device: a torch device or its name; None: the current
    """Whether a CUDA device computes bf16 in hardware (compute capability 8 or above: Ampere
    on). torch's ``is_bf16_supported()`` also says yes to T4 and V100 cards, which only emulate
    it (slowly), and looks at the current device only."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def cuda_half_dtype(device=None):  # -> torch.dtype
    """What models compute in on a CUDA device: bf16 where the GPU has it, else fp16."""
    import torch

    return torch.bfloat16 if cuda_bf16(device) else torch.float16


def to_serving_dtype(model, requested: str, *, kernel: str | None = None) -> str:
    """Put a model (a torch.nn.Module) on the CPU into bf16, with the matrix-unit linears
    (generation/cpu_linear.py), where ``requested`` resolves to bf16 there; return the format
    it computes in. Where it resolves to fp32, its fp32 linears take oneDNN's product where
    ``fp32_kernel(kernel)`` says so. A model on another device is left as it is ("fp32")."""
    if next(model.parameters()).device.type != "cpu":
        return "fp32"
    if cpu_dtype(requested) != "bf16":
        if fp32_kernel(kernel) == "onednn":
            from citeqa.generation.cpu_linear import install_onednn_linears

            install_onednn_linears(model)
        return "fp32"
    import torch

    from citeqa.generation.cpu_linear import cast_parameters, install_cpu_linears

    cast_parameters(model, torch.bfloat16)
    install_cpu_linears(model, int8_decode=False)
    return "bf16"


def compiled(module):  # torch.nn.Module -> torch.nn.Module
    """``module`` compiled for inference with ``torch.compile`` (inductor): dynamic shapes, so
    that a new batch size or sequence length does not compile again, and weight freezing, which
    folds the weights into the graph and prepacks them for the matrix units. The compiling
    happens at its first calls (tens of seconds for a MiniLM-sized encoder, and it needs a C++
    compiler on a CPU): callers warm it up and keep the eager module for when that fails
    (``VerifierScorer.compile``)."""
    import torch
    import torch._inductor.config as inductor_config

    # Process-wide: inductor reads it when it compiles, at a first call, after this returns
    # (options={"freezing": True} to torch.compile did not take effect: 0.82x eager vs 0.61x).
    inductor_config.freezing = True
    return torch.compile(module, dynamic=True)


def training_autocast(device_type: str, requested: str):  # -> a context manager
    """Mixed precision for a training step: bf16 autocast on a CPU whose format resolves to
    bf16 (weights, optimizer state and the loss stay fp32), and on a CUDA device with bf16;
    otherwise a context that changes nothing."""
    import contextlib

    import torch

    if device_type == "cpu" and cpu_dtype(requested) == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device_type == "cuda" and cuda_bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
