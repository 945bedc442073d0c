"""Linear layers for bf16 inference on a CPU: bf16 matrix multiplies, and int8 weights for the
one to four rows of a decoding step.

Measured on 2 cores of an AVX-512/AMX Xeon, one 576 x 1536 projection of SmolLM2-135M
(microseconds, median of 3; ``python benchmarks/bench_dtype.py`` has the whole-model figures):

    rows          1     2     4     8    17    32    68
    int8 weights  39    51    71   167   308   540  1236   (torch._weight_int8pack_mm)
    bf16          100   82    88    99   133   176   291   (a 2-D GEMM)
    fp32          51    48    89   161   328   450   712

One row streams every weight once and does little arithmetic with it, so the bytes decide:
int8 weights (one scale per output channel; activations stay bf16: weight-only quantization)
are fastest. From ~8 rows on the matrix units decide, and bf16 wins by far. ``CpuLinear`` picks
by the number of rows (``INT8_ROWS``). A row's result depends only on itself within either
kernel (checked in tests), but a row computed in a 1-row step and in a 17-row step goes
through different kernels and may round differently: in bf16, speculative drafts and batching
can change a near-tie greedy token (``bench_dtype.py`` measures how often). ``nn.Linear`` on
a 3-D bf16 input takes a slower path than on 2-D rows, hence the reshape.

``install_cpu_linears(module)`` swaps every ``nn.Linear`` below ``module`` for a ``CpuLinear``;
``fused_linear(parts)`` computes several of them with one product (``lean.py``,
``citeqa/lean_encoder.py``).

CPUs without fast bf16 compute encoders in fp32, where the kernel matters too: on an AVX2-only
AMD EPYC (Zen 2), 2 threads, torch's fp32 ``F.linear`` (MKL) ran encoder-sized products at
99-125 GFLOP/s and oneDNN's, with the weight prepacked once for it, at 141-168 GFLOP/s.
``OnednnLinear`` is that product (``fused_fp32`` fuses several, as ``fused_linear`` does in
bf16); ``compute.fp32_kernel`` decides by measurement where it is used
(``install_onednn_linears``). There the generator's decoder stores its weights in fp16 and
computes in fp32 (``Fp16Linear``, fbgemm's packed fp16 product; ``install_fp16_linears``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

INT8_ROWS = 4  # at most this many rows read the int8 weights; more use the bf16 GEMM
# torch's int8 product reads past rows of in_features not a multiple of 16 (garbage, NaN, or a
# segfault, measured at 7, 24, 40, 50, 100); such a layer keeps the bf16 GEMM (margin: 32)
INT8_IN_MULTIPLE = 32


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights [out, in] and one fp32 scale per output channel [out]:
    ``weight ~= q * scale[:, None]`` with |q| <= 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class CpuLinear(nn.Module):
    """``nn.Linear`` for CPU inference in bf16: a bf16 GEMM, or int8 weights for at most
    ``INT8_ROWS`` rows (see the module docstring). Output is bf16."""

    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear, *, int8_decode: bool = True) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16).contiguous(),
                                   requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(torch.bfloat16), requires_grad=False)
        int8_decode = int8_decode and linear.in_features % INT8_IN_MULTIPLE == 0
        q, scale = quantize_per_channel(linear.weight) if int8_decode else (None, None)
        self.register_buffer("qweight", q, persistent=False)  # [out, in] int8, or None
        self.register_buffer("scales", None if scale is None else scale.to(torch.bfloat16),
                             persistent=False)  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, in]
        return self.rows(rows).reshape(*x.shape[:-1], self.out_features)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The product for bf16 ``rows`` [M, in] -> [M, out], through the kernel their number
        picks (callers on a hot path use it to skip the module call)."""
        if self.qweight is not None and rows.shape[0] <= INT8_ROWS:
            assert self.scales is not None
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scales)  # [M, out]
            return y if self.bias is None else y + self.bias
        return F.linear(rows, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8_decode={self.qweight is not None}")


def fused_linear(parts: list[CpuLinear]) -> CpuLinear:
    """One ``CpuLinear`` computing ``parts`` side by side (outputs concatenated in order): int8
    rows, scales and bf16 rows concatenated, so each output is still its own dot product and
    equals the part's. The parts' weights become views of its own: they keep working and cost
    no memory."""
    fused = CpuLinear.__new__(CpuLinear)
    nn.Module.__init__(fused)
    fused.in_features = parts[0].in_features
    fused.out_features = sum(p.out_features for p in parts)
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    biases = [p.bias for p in parts]
    fused.bias = None if all(b is None for b in biases) else nn.Parameter(torch.cat([
        b if b is not None else torch.zeros(p.out_features, dtype=torch.bfloat16)
        for b, p in zip(biases, parts, strict=True)]), requires_grad=False)
    int8 = all(p.qweight is not None for p in parts)
    fused.register_buffer("qweight", torch.cat([p.qweight for p in parts]) if int8 else None,
                          persistent=False)
    fused.register_buffer("scales", torch.cat([p.scales for p in parts]) if int8 else None,
                          persistent=False)
    # the parts become views of the fused tensors: no second copy of the weights
    start = 0
    for p in parts:
        rows = slice(start, start + p.out_features)
        p.weight = nn.Parameter(fused.weight[rows], requires_grad=False)
        if p.bias is not None:
            assert fused.bias is not None  # some part has a bias
            p.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
        if int8:
            p.qweight, p.scales = fused.qweight[rows], fused.scales[rows]
        start += p.out_features
    return fused


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module``'s floating parameters (not its buffers) to ``dtype`` (bf16 or fp16),
    in place.

    ``module.to(torch.bfloat16)`` would also round the float buffers, among them a rotary
    embedding's ``inv_freq``: its frequencies would be off by up to 0.4 %, which at position
    400 turns the fastest ones by whole radians. Models loaded in bf16 keep it in fp32 too.
    """
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)


def install_cpu_linears(module: nn.Module, *, int8_decode: bool = True) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a ``CpuLinear`` (with int8 weights for
    few rows when ``int8_decode``); return how many were replaced. Other parameters should
    already be bf16."""
    found = linears_below(module, lambda child: isinstance(child, nn.Linear))
    for parent, name, child in found:
        setattr(parent, name, CpuLinear(child, int8_decode=int8_decode))
    return len(found)


def linears_below(module: nn.Module, keep: Callable[[nn.Module], bool]
                  ) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` for every child module below ``module`` that ``keep`` accepts,
    in module order: what the ``install_*_linears`` functions replace."""
    return [(parent, name, child) for parent in module.modules()
            for name, child in parent.named_children() if keep(child)]


def onednn_available() -> bool:
    """True when this torch build has oneDNN's fp32 linear kernel (``OnednnLinear``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OnednnLinear(nn.Module):
    """``nn.Linear`` for fp32 inference on a CPU through oneDNN, with the weight prepacked into
    oneDNN's blocked layout (an opaque copy, ``packed``, made at the first product and kept
    outside the state dict; copies and pickles leave it out and pack again). Results equal
    ``F.linear``'s up to fp32 rounding (another order of summation). Inference only: a change to
    ``weight`` after the first product does not reach ``packed``. Under ``torch.compile`` it is
    a plain ``F.linear`` (inductor's weight freezing packs the weights itself)."""

    PACK_ROWS = 256  # the row count oneDNN is told to expect when packing (any count works)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().float().contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        return self.rows(rows).reshape(*x.shape[:-1], self.out_features)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The product for fp32 ``rows`` [M, in] -> [M, out]."""
        packed = self.__dict__.get("packed")
        if packed is None:
            if self.weight.dtype != torch.float32 or self.weight.device.type != "cpu":
                raise TypeError(f"OnednnLinear computes in fp32 on the CPU; its weight is "
                                f"{self.weight.dtype} on {self.weight.device}")
            # an MKL-DNN tensor: not a buffer (state_dict, .to() and copies cannot hold it);
            # two threads packing at once both get the same result
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                             self.PACK_ROWS)
            self.__dict__["packed"] = packed
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, self.bias,
                                                  "none", [], "")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "packed"}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def fused_fp32(parts: list[nn.Module]) -> nn.Module:
    """One fp32 linear computing ``parts`` (``nn.Linear`` or ``OnednnLinear``) side by side
    (outputs concatenated in order), as ``fused_linear`` does for ``CpuLinear``: each output is
    its own dot product (equal to the part's up to fp32 rounding), and the parts' weights and
    biases become views of its own (no second copy; a change to either shows in both). It is an
    ``OnednnLinear`` when the parts all are."""
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts])
        has_bias = any(p.bias is not None for p in parts)
        fused = nn.Linear(parts[0].in_features, len(weight), bias=has_bias, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        fused.bias = nn.Parameter(torch.cat([  # type: ignore[assignment]  # torch: bias=False is None
            p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts
        ]), requires_grad=False) if has_bias else None
        start = 0
        for p in parts:
            at = slice(start, start + p.out_features)
            p.weight = nn.Parameter(fused.weight[at], requires_grad=p.weight.requires_grad)
            if p.bias is not None:
                p.bias = nn.Parameter(fused.bias[at], requires_grad=p.bias.requires_grad)
            start += p.out_features
    return OnednnLinear(fused) if all(isinstance(p, OnednnLinear) for p in parts) else fused


def install_onednn_linears(module: nn.Module) -> int:
    """Replace every fp32 ``nn.Linear`` under ``module`` by an ``OnednnLinear``; return how many
    were replaced (for a model on the CPU in fp32, served, never trained afterwards)."""
    found = linears_below(module, lambda child: type(child) is nn.Linear
                          and child.weight.dtype == torch.float32)
    for parent, name, child in found:
        setattr(parent, name, OnednnLinear(child))
    return len(found)


class Fp16Linear(nn.Module):
    """``nn.Linear`` for inference on a CPU from weights stored in fp16, computed in fp32:
    fbgemm's packed fp16 product, the one ``torch.ao``'s dynamic fp16 ``Linear`` calls (outputs
    equal to its). The weight exists only packed (``packed``, an opaque object outside the state
    dict): the module has no parameters, so a state dict leaves it out and ``.to()`` leaves it
    where it is; it cannot be trained, cast or moved."""

    def __init__(self, in_features: int, out_features: int, packed: object) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.__dict__["packed"] = packed

    @classmethod
    def of(cls, linear: nn.Linear) -> Fp16Linear:
        """``linear``'s weight and bias rounded to fp16 and packed (one thread's work). Weights
        beyond fp16's range are clamped to it, in ``linear``'s own tensor too (as torch.ao's)."""
        bias = None if linear.bias is None else linear.bias.detach().float()
        packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        return cls(linear.in_features, linear.out_features, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights"


def install_fp16_linears(module: nn.Module, *, threads: int | None = None) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an ``Fp16Linear``; return how many were
    replaced. The weights pack on ``threads`` threads (default: torch's CPU threads): packing
    SmolLM2-135M's 210 projections took 1.1 s on one thread of an AVX2 EPYC, 0.5 s on two
    (``torch.ao.quantization.quantize_dynamic``, which this replaces, packed each weight three
    times: 2.0 s)."""
    found = linears_below(module, lambda child: type(child) is nn.Linear)
    with ThreadPoolExecutor(max(1, threads or torch.get_num_threads())) as pool:
        packed = list(pool.map(Fp16Linear.of, [child for _, _, child in found]))
    for (parent, name, _), linear in zip(found, packed, strict=True):
        setattr(parent, name, linear)
    return len(found)
