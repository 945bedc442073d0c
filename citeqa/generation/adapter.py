"""A trained LoRA adapter on disk, and merging it into a loaded generator's weights.

Layout of an adapter directory (plain data, never pickle)::

    adapter/
      adapter.safetensors   ``<module>.lora_A`` [r, in] and ``<module>.lora_B`` [out, r]
                            (float32 as trained; bfloat16 in the shipped copy)
      adapter.json          format, r, alpha, target modules, base model id, base fingerprint,
                            prompt fingerprint (see ``AdapterConfig``)

``apply_adapter`` adds ``alpha / r * B @ A`` to each target ``nn.Linear``'s weight in place, so a
fine-tuned generator decodes exactly as fast as the base one. It first checks the base weights'
fingerprint: deltas trained on other weights would silently produce nonsense.

The fingerprint hashes a few whole base tensors rounded to bfloat16, so the same base model
loaded in float32 (CPU) or bfloat16 (CUDA) matches; a float16 load may not, and is refused
(so ``HFBackend.load``, on a GPU without bf16, merges into an fp32 load, then casts to fp16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from citeqa.atomic import atomic_path, write_text_atomic
from citeqa.errors import ModelError
from citeqa.generation.models import DEFAULT_MODEL
from citeqa.generation.prompt import prompt_fingerprint

logger = logging.getLogger(__name__)

FORMAT = "citeqa-lora"
VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"
PACKAGED = "packaged"  # GenerationConfig.adapter naming the project's trained adapter
PACKAGED_DIR = Path(__file__).parent / "weights"  # ... for the default generator, "smollm2"


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter.json`` records about a LoRA adapter."""

    r: int  # rank of each A/B pair
    alpha: float  # the delta is scaled by alpha / r
    target_modules: tuple[str, ...]  # full module names (model.named_modules) of adapted Linears
    base_model_id: str  # the generator's model_id when trained (informational)
    base_fingerprint: str  # sha256 of the fingerprint_params, rounded to bfloat16
    fingerprint_params: tuple[str, ...]  # parameter names hashed into base_fingerprint
    prompt_fingerprint: str = ""  # prompt_fingerprint() at training time; "" = unknown
    extra: dict[str, Any] = field(default_factory=dict)  # training settings, for the record
    answer_mode: str = "free"  # the answer mode it was trained for (older adapters: free)
    # Its output's line order: "answer-first" (format.py), or "quote-first" for adapters
    # trained for the retired span format (quote line, then answer line; recorded as
    # answer_mode "span" with no layout).
    layout: str = "answer-first"
    format: str = FORMAT
    version: int = VERSION

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        out["fingerprint_params"] = list(self.fingerprint_params)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AdapterConfig:
        """ValueError for a rank below 1 or an alpha that is not a finite number."""
        if isinstance(obj["r"], bool) or int(obj["r"]) < 1 or int(obj["r"]) != obj["r"]:
            raise ValueError(f"r must be a whole number of at least 1, not {obj['r']!r}")
        if not math.isfinite(float(obj["alpha"])):
            raise ValueError(f"alpha must be a finite number, not {obj['alpha']!r}")
        return cls(
            r=int(obj["r"]),
            alpha=float(obj["alpha"]),
            target_modules=tuple(obj["target_modules"]),
            base_model_id=str(obj["base_model_id"]),
            base_fingerprint=str(obj["base_fingerprint"]),
            fingerprint_params=tuple(obj["fingerprint_params"]),
            prompt_fingerprint=str(obj.get("prompt_fingerprint", "")),
            extra=dict(obj.get("extra", {})),
            answer_mode=str(obj.get("answer_mode", "free")),
            layout=str(obj.get("layout", "quote-first" if obj.get("answer_mode") == "span"
                               else "answer-first")),
            format=str(obj["format"]),
            version=int(obj["version"]),
        )


def base_fingerprint(model: nn.Module, param_names: Sequence[str]) -> str:
    """sha256 over ``param_names`` (name, shape, bfloat16 bytes) of ``model``'s parameters."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in param_names:
        if name not in params:
            raise ModelError(
                f"the generator has no parameter {name!r}; the adapter was trained on another "
                "architecture: use its base model or retrain the adapter"
            )
        t = params[name].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def resolve_adapter(adapter: str | None, model: str) -> Path | None:
    """The adapter directory that ``GenerationConfig(adapter=..., model=...)`` means, or None.

    ``"packaged"`` (the default) is the project's trained adapter for the default generator: it
    applies to ``model == "smollm2"`` only, and is skipped with a warning when not installed.
    ``None``, ``""`` and ``"none"`` mean the plain base model; anything else is a directory.
    """
    if adapter is None or adapter.strip().lower() in ("", "none"):
        return None
    if adapter != PACKAGED:
        return Path(adapter)
    if model != DEFAULT_MODEL:  # trained on SmolLM2's weights; another generator has its own
        logger.info("the packaged adapter is trained for smollm2, not %s: none applied (set "
                    "CITEQA_ADAPTER to one trained for it)", model)
        return None
    if not (PACKAGED_DIR / CONFIG).is_file():
        logger.warning("no packaged generator adapter in %s; using the base model", PACKAGED_DIR)
        return None
    return PACKAGED_DIR


def adapter_id(directory: Path) -> str:
    """A short content id of an adapter (sha256 of its weights file), for model ids in reports."""
    h = hashlib.sha256()
    with open(Path(directory) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"lora-{h.hexdigest()[:10]}"


def save_adapter(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    cfg: AdapterConfig,
    *,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``tensors`` (``<module>.lora_A`` / ``.lora_B``) as ``dtype`` and ``cfg`` into
    ``directory`` (bfloat16 halves a shipped adapter; merging computes in float32 anyway)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = {f"{m}.lora_{ab}" for m in cfg.target_modules for ab in "AB"}
    assert set(tensors) == expected, f"adapter tensors {sorted(set(tensors) ^ expected)} mismatch"
    cpu = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    with atomic_path(directory / WEIGHTS) as tmp:  # a kill mid-write leaves the old file whole
        save_file(cpu, str(tmp), metadata={"format": FORMAT})
    write_text_atomic(directory / CONFIG, json.dumps(cfg.to_json(), indent=2) + "\n")


def load_adapter(directory: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory; ModelError saying what to do when it is missing or broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise ModelError(
            f"{directory} is not a generator adapter (needs {CONFIG} and {WEIGHTS}); "
            "train one with `citeqa train generator --data FILE --out DIR`"
        )
    try:
        cfg = AdapterConfig.from_json(json.loads((directory / CONFIG).read_text(encoding="utf-8")))
        tensors = load_file(str(directory / WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ModelError(f"cannot read the adapter in {directory}: {e}; retrain it") from e
    if cfg.format != FORMAT or cfg.version != VERSION:
        raise ModelError(
            f"{directory} holds a {cfg.format!r} v{cfg.version} adapter; this citeqa reads "
            f"{FORMAT!r} v{VERSION}: retrain it with this version"
        )
    return cfg, tensors


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one LoRA pair: ``scale * B @ A`` [out, in], in float32."""
    return scale * (b.float() @ a.float())


@torch.no_grad()
def merge_adapter(
    model: nn.Module, cfg: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Add each LoRA delta to its ``nn.Linear`` weight in place (no fingerprint check)."""
    modules = dict(model.named_modules())
    for name in cfg.target_modules:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ModelError(
                f"the adapter targets {name!r}, which is not a Linear layer of this generator; "
                "use the adapter's base model or retrain the adapter"
            )
        try:
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        except KeyError as e:
            raise ModelError(f"the adapter lacks {e.args[0]}; retrain it") from None
        w = module.weight  # [out, in]
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or not a.shape[0] == b.shape[1] == cfg.r:
            raise ModelError(
                f"adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit {name} "
                f"{tuple(w.shape)} at rank {cfg.r}; use the adapter's base model or retrain "
                "the adapter"
            )
        delta = lora_delta(a.to(w.device), b.to(w.device), cfg.scale)
        w.copy_((w.float() + delta).to(w.dtype))


def apply_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Merge the LoRA adapter in ``adapter_dir`` into ``model``'s weights, in place.

    Raises ModelError when the adapter is missing or broken, or when ``model`` is not the base
    model it was trained on (fingerprint mismatch; also when it was already applied once).
    """
    cfg, tensors = load_adapter(adapter_dir)
    found = base_fingerprint(model, cfg.fingerprint_params)
    if found != cfg.base_fingerprint:
        raise ModelError(
            f"the adapter in {adapter_dir} was trained on {cfg.base_model_id!r} (weights "
            f"fingerprint {cfg.base_fingerprint[:12]}) but the loaded generator's weights differ "
            f"({found[:12]}); load that base model (an adapter is applied once, to unmodified "
            "weights) or retrain the adapter on this one"
        )
    trained_on = prompt_fingerprint()
    if cfg.prompt_fingerprint and cfg.prompt_fingerprint != trained_on:
        logger.warning(
            "the prompt code changed since the adapter in %s was trained; it may do worse "
            "than measured: retrain it with `citeqa train generator`",
            adapter_dir,
        )
    merge_adapter(model, cfg, tensors)
    logger.info(
        "applied adapter %s (r=%d, %d modules) to %s",
        adapter_dir, cfg.r, len(cfg.target_modules), cfg.base_model_id,
    )
