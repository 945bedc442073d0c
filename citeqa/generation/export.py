"""The generator as one Hugging Face model directory, its adapter merged: what a serving engine
(vLLM, SGLang) loads to serve citeqa's generator (``citeqa train export-generator``).

The directory is written next to its target and renamed into place, with ``citeqa-export.json``
(what was merged, and the answer mode the prompts must use) written before the rename, so an
interrupted export leaves no half-written model where a server would look.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from citeqa.atomic import discard_tmp_dir, fresh_tmp_dir, replace_dir
from citeqa.config import GenerationConfig
from citeqa.errors import ModelError

EXPORT_MARKER = "citeqa-export.json"
DTYPES = ("bfloat16", "float16", "float32")


def export_generator(gen: GenerationConfig, cache_dir: Path, out: Path, *,
                     dtype: str = "bfloat16", overwrite: bool = False) -> dict[str, Any]:
    """Write ``gen``'s model with its adapter merged into ``out``; return the export record."""
    import torch

    from citeqa.generation.adapter import adapter_id, apply_adapter, load_adapter, resolve_adapter
    from citeqa.generation.models import load_model

    if gen.model == "fake":
        raise ModelError("the fake generator has no weights to export; name a model")
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} exists; pass --overwrite to replace it")
    model, tokenizer, model_id = load_model(gen.model, cache_dir, device="cpu")
    adapter = resolve_adapter(gen.adapter, gen.model)
    record: dict[str, Any] = {"base": model_id, "adapter": None, "dtype": dtype,
                              "answer_mode": gen.answer_mode}
    if adapter is not None:
        apply_adapter(model, adapter)
        cfg, _ = load_adapter(adapter)
        record.update(adapter=adapter_id(adapter), answer_mode=cfg.answer_mode)
    model.to(getattr(torch, dtype))
    tmp = fresh_tmp_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)  # a kill never leaves a half-deleted export at out
    finally:
        discard_tmp_dir(tmp)
    return record

