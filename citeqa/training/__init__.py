"""citeqa.training: teaching the generator to cite (demonstrations -> LoRA fine-tuning).

    SQuAD question + index -> demos.build_demos -> demonstrations (JSONL)
    demonstrations -> sft.render_examples (serving prompt + target, loss on target only)
                   -> sft.train_lora (LoRA from lora.py) -> adapter dir (generation/adapter.py)

Names are imported lazily, so ``citeqa.training.cli`` (loaded by every ``citeqa`` command)
does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from citeqa.lazy import lazy_dir, lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see; at run time, the lazy import below
    from citeqa.training.demos import Demo, DemoPassage, build_demos, read_demos, write_demos
    from citeqa.training.lora import LoRAConfig, LoRALinear, inject_lora
    from citeqa.training.sft import Example, TrainConfig, encode_example, run_sft, train_lora

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
__all__ = [  # a literal list: type checkers read no other (checked: tests/test_package.py)
    "Demo", "DemoPassage", "Example", "LoRAConfig", "LoRALinear", "TrainConfig", "build_demos",
    "encode_example", "inject_lora", "read_demos", "run_sft", "train_lora", "write_demos",
]
__getattr__ = lazy_exports(__name__, _EXPORTS)
__dir__ = lazy_dir(__name__, _EXPORTS)
