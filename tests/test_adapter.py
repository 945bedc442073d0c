"""LoRA adapters: merged weights reproduce the trained model; wrong base models are refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from citeqa.errors import ModelError
from citeqa.generation.adapter import (
    CONFIG,
    PACKAGED,
    PACKAGED_DIR,
    adapter_id,
    apply_adapter,
    base_fingerprint,
    load_adapter,
    lora_delta,
    resolve_adapter,
)
from citeqa.generation.adapter import save_adapter as write_adapter
from citeqa.generation.prompt import prompt_fingerprint
from citeqa.training.lora import ATTENTION, MLP, LoRAConfig, LoRALinear, inject_lora, target_names
from citeqa.training.sft import (
    Example,
    TrainConfig,
    fingerprint_params,
    save_adapter,
    train_lora,
)

VOCAB = 128


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _examples() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        ids = torch.randint(3, VOCAB, (24,), generator=g).tolist()
        out.append(Example(tuple(ids), tuple([-100] * 16 + ids[16:])))
    return out


def _trained(tmp_path: Path, lora: LoRAConfig) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(pristine copy of the base, base trained with LoRA and saved to tmp_path)."""
    model = tiny_model()
    base = copy.deepcopy(model)
    params = fingerprint_params(target_names(model, lora.targets))
    fp = base_fingerprint(model, params)
    cfg = TrainConfig(lr=5e-2, batch_size=2, max_steps=6)
    wrapped, _ = train_lora(model, _examples(), 0, cfg, lora, progress=False)
    save_adapter(tmp_path, wrapped, lora, base_model_id="tiny", fingerprint=fp, params=params,
                 extra={})
    return base, model


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION + MLP])
def test_apply_adapter_reproduces_the_trained_model(tmp_path: Path, targets) -> None:
    base, trained = _trained(tmp_path, LoRAConfig(r=4, alpha=8, targets=targets))
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = base(ids).logits
        want = trained(ids).logits
        assert not torch.allclose(before, want, atol=1e-3)  # training changed something
        apply_adapter(base, tmp_path)
        got = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # plain Linears: no cost
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert size < 200_000  # only A and B are saved


def test_wrong_base_is_refused(tmp_path: Path) -> None:
    _trained(tmp_path, LoRAConfig(r=4))
    other = tiny_model(seed=1)
    with pytest.raises(ModelError, match="fingerprint"):
        apply_adapter(other, tmp_path)


def test_applying_twice_is_refused(tmp_path: Path) -> None:
    base, _ = _trained(tmp_path, LoRAConfig(r=4))
    apply_adapter(base, tmp_path)
    with pytest.raises(ModelError, match="applied once"):
        apply_adapter(base, tmp_path)


def test_missing_or_broken_adapter(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="citeqa train generator"):
        apply_adapter(tiny_model(), tmp_path / "nowhere")
    _trained(tmp_path, LoRAConfig(r=4))
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["version"] = 99
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="retrain"):
        apply_adapter(tiny_model(), tmp_path)
    # a rank or scale no training writes: r = 0 was a ZeroDivisionError traceback, a NaN alpha
    # a generator whose every answer changed, unsaid; a rank the tensors do not have
    for bad in ({"r": 0}, {"r": 2.5}, {"r": True}, {"alpha": float("nan")}, {"r": 8}):
        _trained(tmp_path, LoRAConfig(r=4))
        cfg = json.loads((tmp_path / CONFIG).read_text())
        (tmp_path / CONFIG).write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ModelError, match="retrain"):
            apply_adapter(tiny_model(), tmp_path)
    _trained(tmp_path, LoRAConfig(r=4))  # a good one again
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: was a SafetensorError traceback
    with pytest.raises(ModelError, match="cannot read the adapter"):
        apply_adapter(tiny_model(), tmp_path)


def test_an_adapter_write_that_stops_part_way_leaves_the_old_one_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    _trained(tmp_path, LoRAConfig(r=4))
    before = (tmp_path / "adapter.safetensors").read_bytes()

    def cut_short(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x00" * 10)  # a kill (or a full disk) mid-write
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(OSError):
        _trained(tmp_path, LoRAConfig(r=4))
    assert (tmp_path / "adapter.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_packaged_adapter_says_when_it_does_not_apply(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    from citeqa.generation.adapter import resolve_adapter

    caplog.set_level("INFO", logger="citeqa.generation.adapter")
    assert resolve_adapter("packaged", "/models/qwen") is None
    assert "trained for smollm2, not /models/qwen: none applied" in caplog.text


def test_fingerprint_matches_across_float32_and_bfloat16() -> None:
    model = tiny_model()
    names = fingerprint_params(target_names(model, ATTENTION))
    fp32 = base_fingerprint(model, names)
    assert base_fingerprint(copy.deepcopy(model).to(torch.bfloat16), names) == fp32
    assert base_fingerprint(tiny_model(seed=2), names) != fp32
    with pytest.raises(ModelError, match="no parameter"):
        base_fingerprint(model, ["model.nothing.weight"])


def test_merged_linear_equals_lora_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 7, bias=True)
    wrapper = LoRALinear(copy.deepcopy(linear), r=3, alpha=6)
    with torch.no_grad():
        wrapper.lora_B.normal_()
        merged = copy.deepcopy(linear)
        merged.weight += lora_delta(wrapper.lora_A, wrapper.lora_B, wrapper.scale)
        x = torch.randn(5, 12)
        torch.testing.assert_close(merged(x), wrapper(x), rtol=1e-5, atol=1e-5)


def test_inject_lora_rejects_unknown_targets() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(tiny_model(), LoRAConfig(targets=("nope",)))


def test_prompt_fingerprint_is_stable() -> None:
    assert prompt_fingerprint() == prompt_fingerprint()
    assert len(prompt_fingerprint()) == 64


def test_resolve_adapter_names() -> None:
    for off in (None, "", "none", " None "):
        assert resolve_adapter(off, "smollm2") is None
    assert resolve_adapter("/x/my-adapter", "/models/qwen") == Path("/x/my-adapter")
    assert resolve_adapter(PACKAGED, "/models/qwen") is None  # trained on SmolLM2 only


def test_the_packaged_adapter_is_the_default_and_loads() -> None:
    from citeqa.config import GenerationConfig

    assert GenerationConfig().adapter == PACKAGED
    found = resolve_adapter(PACKAGED, "smollm2")
    if found is None:
        pytest.skip(f"no adapter shipped in {PACKAGED_DIR}")
    cfg, tensors = load_adapter(found)
    assert set(tensors) == {f"{m}.lora_{ab}" for m in cfg.target_modules for ab in "AB"}
    # trained on today's prompt in its answer mode
    mode = GenerationConfig(answer_mode=cfg.answer_mode)
    assert cfg.prompt_fingerprint == prompt_fingerprint(mode)
    assert (found / "MODEL_CARD.md").is_file()


def test_bfloat16_copy_merges_like_the_float32_original(tmp_path: Path) -> None:
    base, _ = _trained(tmp_path / "f32", LoRAConfig(r=4, alpha=8, targets=ATTENTION))
    cfg, tensors = load_adapter(tmp_path / "f32")
    write_adapter(tmp_path / "bf16", tensors, cfg, dtype=torch.bfloat16)
    half = (tmp_path / "bf16" / "adapter.safetensors").stat().st_size
    assert half < 0.6 * (tmp_path / "f32" / "adapter.safetensors").stat().st_size
    assert adapter_id(tmp_path / "bf16") != adapter_id(tmp_path / "f32")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_adapter(a, tmp_path / "f32")
    apply_adapter(b, tmp_path / "bf16")
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0.02, atol=0.02)


@pytest.mark.parametrize(("recorded", "warns"), [
    ({}, False),  # older adapters: free mode, answer first
    ({"answer_mode": "free"}, False),
    ({"answer_mode": "span", "layout": "answer-first"}, False),
    ({"answer_mode": "span"}, True),  # the retired quote-first span format
    ({"answer_mode": "span", "layout": "quote-first"}, True),
])
def test_an_adapter_trained_to_quote_first_is_warned_about(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        recorded: dict[str, str], warns: bool) -> None:
    from citeqa.config import GenerationConfig
    from citeqa.generation import factory, hf

    _trained(tmp_path, LoRAConfig(r=4, alpha=8, targets=ATTENTION))
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta.pop("answer_mode", None)
    meta.pop("layout", None)
    (tmp_path / "adapter.json").write_text(json.dumps({**meta, **recorded}))
    monkeypatch.setattr(hf.HFBackend, "load", classmethod(lambda cls, *a, **k: k["adapter"]))
    for mode in ("span", "free"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="citeqa.generation.factory"):
            got = factory.build_backend(GenerationConfig(adapter=str(tmp_path), answer_mode=mode),
                                        tmp_path)
        assert got == tmp_path
        warned = [r for r in caplog.records if "quote-first" in r.getMessage()]
        assert bool(warned) == warns