"""The one place a generation backend is built from settings (serving, evaluation, training
data, benchmarks): the fake extractive stand-in, a remote engine (``gen.url``), or a local
transformers model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from citeqa.config import GenerationConfig
from citeqa.generation.backend import Backend

logger = logging.getLogger(__name__)


def build_backend(gen: GenerationConfig, cache_dir: Path, *, api_key: str | None = None,
                  timeout_s: float | None = None, **overrides: Any) -> Backend:
    """The backend ``gen`` names (never downloads). ``api_key`` and ``timeout_s``: a remote
    engine's bearer token, and how long one question's calls to it may take (the service's
    request timeout: a hung engine held the one generation worker 120 s whatever it was);
    ``overrides`` go to the backend's constructor (e.g. ``reuse_prefix=False`` for an ablation
    of the local one)."""
    if gen.url:
        from citeqa.generation.remote import RemoteBackend

        if timeout_s is not None:
            overrides.setdefault("timeout_s", timeout_s)
        return RemoteBackend(gen.url, gen.served_model, api_key=api_key,
                             concurrency=gen.concurrency, **overrides)
    if gen.model == "fake":
        from citeqa.generation.extractive import extractive_responder
        from citeqa.generation.fake import FakeBackend

        return FakeBackend(extractive_responder, model_id="extractive")
    from citeqa.generation.adapter import load_adapter, resolve_adapter
    from citeqa.generation.hf import HFBackend

    adapter = resolve_adapter(gen.adapter, gen.model)
    if adapter is not None and (layout := load_adapter(adapter)[0].layout) != "answer-first":
        logger.warning("the adapter %s was trained to write its lines %s, not answer first as "
                       "the generator now reads them: expect much worse answers (retrain it "
                       "with `citeqa train generator`)", adapter, layout)
    return HFBackend.load(
        gen.model,
        cache_dir,
        adapter=adapter,
        cpu_dtype=gen.cpu_dtype,
        speculative_tokens=gen.speculative_quote_tokens,
        threads=gen.threads,
        **overrides,
    )
