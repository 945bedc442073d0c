"""The dense index: FAISS inner product over L2-normalised embeddings (so scores are cosines).

``flat`` (IndexFlatIP) is exact and right for up to a few hundred thousand passages; ``hnsw``
(IndexHNSWFlat with the inner-product metric) is approximate and faster on big corpora. Saved
with ``faiss.write_index`` (FAISS's own binary format, no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from citeqa.errors import IndexError_

HNSW_EF_SEARCH = 128  # HNSW search breadth: recall vs speed (FAISS default is 16)
HNSW_EF_CONSTRUCTION = 80  # HNSW build breadth


class DenseIndex:
    """A FAISS index whose row ``i`` is passage ``i``."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = max(index.hnsw.efSearch, HNSW_EF_SEARCH)

    @classmethod
    def build(
        cls, vectors: np.ndarray, *, kind: Literal["flat", "hnsw"] = "flat", hnsw_m: int = 32
    ) -> DenseIndex:
        """Index ``vectors`` (float32 [N, dim], L2-normalised)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if kind == "flat":
            index: faiss.Index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            raise ValueError(f"unknown FAISS index kind {kind!r}; use 'flat' or 'hnsw'")
        index.add(vectors)
        return cls(index)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids int64 [Q, k] and cosines float32 [Q, k], best first; id -1 pads missing rows."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        k = max(1, min(k, self.size))
        scores, ids = self.index.search(vectors, k)
        return ids, scores

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> DenseIndex:
        try:
            return cls(faiss.read_index(str(path)))
        except RuntimeError as e:
            raise IndexError_(f"cannot read the dense index {path}: {e}; rebuild the index") from e
