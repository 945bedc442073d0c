"""Shared test fixtures: the location of ../shared/data, skipped cleanly where it is absent; the
packaged MiniLM tokenizer, a tiny random encoder for cross-encoder tests and a tiny random
MiniLM-wide encoder directory for embedder tests (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CITEQA_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Property tests draw new examples on every run, except under HYPOTHESIS_PROFILE=ci (.ci/run
# sets it): there each test draws the same examples every time, so that whether a change lands
# never depends on a rare draw. Drawing freely here is how such draws are found.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def squad_dir() -> Path:
    """../shared/data/squad2, or skip: a user's fresh clone does not have the evaluation data."""
    d = SHARED_DATA / "squad2"
    if not (d / "qa.json").is_file():
        pytest.skip(f"evaluation data not found at {d} (it lives in ../shared beside the repo)")
    return d


@pytest.fixture(scope="module")
def tokenizer():
    """The packaged all-MiniLM-L6-v2 tokenizer, or skip where it is not installed."""
    from transformers import AutoTokenizer

    from citeqa.retrieval.embed import minilm_dir

    try:
        path = minilm_dir()
    except Exception as e:  # noqa: BLE001 - the packaged model is a test requirement
        pytest.skip(f"the packaged MiniLM tokenizer is not installed: {e}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture
def tiny_encoder():
    """A factory of tiny random BERT encoders for a vocabulary size (seeded)."""
    import torch
    from transformers import BertConfig, BertModel

    def make(vocab: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=256))

    return make


@pytest.fixture
def tiny_minilm_dir(tmp_path: Path) -> Path:
    """A directory holding a tiny random BERT as wide as MiniLM (384, 6 heads, 2 layers; seeded)
    beside MiniLM's vocabulary (shipped with the reward model), loadable as an embedder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "citeqa" / "reward" / "weights" / "encoder",
                                              local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=2,
                         num_attention_heads=6, intermediate_size=512,
                         max_position_embeddings=512)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path
