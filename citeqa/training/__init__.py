"""citeqa.training: teaching the generator to cite (demonstrations -> LoRA fine-tuning).

    SQuAD question + index -> demos.build_demos -> demonstrations (JSONL)
    demonstrations -> sft.render_examples (serving prompt + target, loss on target only)
                   -> sft.train_lora (LoRA from lora.py) -> adapter dir (generation/adapter.py)

Names are imported lazily, so ``citeqa.training.cli`` (loaded by every ``citeqa`` command)
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Demo": "demos",
    "DemoPassage": "demos",
    "build_demos": "demos",
    "read_demos": "demos",
    "write_demos": "demos",
    "LoRAConfig": "lora",
    "LoRALinear": "lora",
    "inject_lora": "lora",
    "Example": "sft",
    "TrainConfig": "sft",
    "encode_example": "sft",
    "run_sft": "sft",
    "train_lora": "sft",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
