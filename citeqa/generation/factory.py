"""The one place a generation backend is built from settings (serving, evaluation, training
data, benchmarks): the fake extractive stand-in, a remote engine (``gen.url``), or a local
transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from citeqa.config import GenerationConfig
from citeqa.generation.backend import Backend


def build_backend(gen: GenerationConfig, cache_dir: Path, *, api_key: str | None = None,
                  **overrides: Any) -> Backend:
    """The backend ``gen`` names (never downloads). ``api_key``: a remote engine's bearer token;
    ``overrides`` go to the backend's constructor (e.g. ``reuse_prefix=False`` for an ablation
    of the local one)."""
    if gen.url:
        from citeqa.generation.remote import RemoteBackend

        return RemoteBackend(gen.url, gen.served_model, api_key=api_key,
                             concurrency=gen.concurrency, **overrides)
    if gen.model == "fake":
        from citeqa.generation.extractive import extractive_responder
        from citeqa.generation.fake import FakeBackend

        return FakeBackend(extractive_responder, model_id="extractive")
    from citeqa.generation.adapter import resolve_adapter
    from citeqa.generation.hf import HFBackend

    return HFBackend.load(
        gen.model,
        cache_dir,
        adapter=resolve_adapter(gen.adapter, gen.model),
        cpu_dtype=gen.cpu_dtype,
        speculative_tokens=gen.speculative_quote_tokens,
        threads=gen.threads,
        **overrides,
    )
