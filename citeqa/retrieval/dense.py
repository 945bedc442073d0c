"""The dense index: FAISS inner product over L2-normalised embeddings (so scores are cosines).

Three kinds (``DenseSpec.kind``), all storing the vectors exactly (so updates can read them
back):

- ``flat`` (IndexFlatIP): exact; a query scans every vector (N * dim multiply-adds), which
  passes 10 ms on two cores near ``AUTO_ANN_MIN_PASSAGES`` passages. The default below that.
- ``hnsw`` (IndexHNSWFlat): approximate graph search, the index for large collections. Chosen
  over IVF on measurements (benchmarks/bench_ann.py, figures in docs/ray.md): on MiniLM
  vectors of 200k passages it reached recall@10 0.96 against flat at 0.55 ms a query where IVF
  needed 8 ms for the same recall, because IVF must scan a quarter of its cells when passages
  do not fall into tight clusters, while graph search stays logarithmic. Its costs: a build of
  about 15 minutes per million vectors on two busy cores (graph insertion; FAISS uses every
  core of the machine that merges), and ``2 * M * 4`` bytes per vector of links (+17% at
  M=32, dim 384).
- ``ivf`` (IndexIVFFlat): approximate, k-means cells (``nlist``, on a seeded sample) of which a
  query scans the ``nprobe`` nearest. Builds fastest, adds 8 bytes per vector and keeps its
  centroids through updates (``rebuilt``); for when build time or memory matter more than
  query latency.

Removing passages from an HNSW index leaves their nodes in the graph, marked removed (the
sorted row numbers in ``DenseIndex.removed``, which searches skip with a FAISS ID selector),
so that a deletion costs no graph build; once more than ``MAX_REMOVED_FRACTION`` of the rows
are removed the graph is built again from the rest. The other kinds are refilled with the
surviving vectors (cheap: flat copies, IVF keeps its centroids).

``auto`` picks ``flat`` below ``AUTO_ANN_MIN_PASSAGES`` passages and ``hnsw`` above. The
resolved spec (concrete kind and parameters) is recorded in the index manifest under
``dense_index`` and applied at load (``efSearch`` and ``nprobe`` are query-time settings); an
index without it (built before specs existed) is described from its FAISS type. Saved with
``faiss.write_index`` (FAISS's own binary format, no pickle), through a Python file: FAISS opens
a path by its UTF-8 bytes, whatever the file system's encoding (a folder named in Latin-1, or
with bytes that are no UTF-8, could not be written or read).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from citeqa.config import MAX_HNSW_M
from citeqa.errors import ConfigError, IndexError_

log = logging.getLogger(__name__)

DenseKind = Literal["flat", "ivf", "hnsw", "auto"]
KINDS = ("flat", "ivf", "hnsw", "auto")
# Search breadths: bench_ann.py reports the smallest value reaching recall@10 >= 0.95 against
# flat (HNSW: efSearch 64 at 200k MiniLM vectors); the defaults keep a margin for larger
# collections at well under the 10 ms target (figures in docs/ray.md).
HNSW_EF_SEARCH = 128  # HNSW search breadth: recall vs speed (FAISS default is 16)
HNSW_EF_CONSTRUCTION = 80  # HNSW build breadth
IVF_NPROBE = 128  # IVF cells scanned per query (0.96 at 200k with 512 cells)
IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns that k-means is unreliable below this
# "auto" switches from flat to HNSW here: a flat scan of 384-dim vectors passes ~10 ms a query
# on two cores at about this size (bench_ann.py prints the flat p50).
AUTO_ANN_MIN_PASSAGES = 100_000
# An HNSW graph is built again once more than this share of its rows are removed passages: they
# cost memory (their vectors and links) and recall near them (benchmarks/bench_removed.py: whole
# documents removed, recall@100 of queries near them as a fresh graph's at a tenth, 0.76 vs
# 0.84 at a quarter).
MAX_REMOVED_FRACTION = 0.1


# the most each DenseSpec number may be (a search breadth of 2**31 failed every search on a
# bad_alloc, 2**26 took 600 MB for one search of 30 passages)
_MOST = {"nlist": 1 << 24, "nprobe": 1 << 24, "train_per_list": 1 << 16, "hnsw_m": MAX_HNSW_M,
         "ef_construction": 1 << 16, "ef_search": 1 << 16}


@dataclass(frozen=True)
class DenseSpec:
    """How the dense index is organised; stored in the manifest (``dense_index``)."""

    kind: DenseKind = "flat"  # flat | hnsw | ivf | auto (flat when small, else hnsw)
    # IVF: cells of the k-means partition; None = ivf_nlist(N) at build time
    nlist: int | None = None
    nprobe: int = IVF_NPROBE  # IVF: cells scanned per query (recall vs latency; query-time)
    train_per_list: int = 64  # IVF: k-means training vectors sampled per cell
    seed: int = 1234  # IVF: k-means initialisation and training sample
    hnsw_m: int = 32  # HNSW: graph degree
    ef_construction: int = HNSW_EF_CONSTRUCTION  # HNSW: build breadth
    ef_search: int = HNSW_EF_SEARCH  # HNSW: search breadth (query-time)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown dense index kind {self.kind!r}; use one of {KINDS}")
        for name, most in _MOST.items():
            value = getattr(self, name)
            if value is None and name == "nlist":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ConfigError(f"dense index {name} must be a whole number from 1 to "
                                  f"{most}, got {value!r}")

    def resolved(self, n_vectors: int) -> DenseSpec:
        """This spec for ``n_vectors`` vectors: ``auto`` made concrete, IVF's nlist chosen and
        capped so that k-means has enough points per cell."""
        kind = self.kind
        if kind == "auto":
            kind = "hnsw" if n_vectors >= AUTO_ANN_MIN_PASSAGES else "flat"
        if kind != "ivf":
            return replace(self, kind=kind, nlist=None)
        nlist = min(self.nlist or ivf_nlist(n_vectors), max_nlist(n_vectors))
        return replace(self, kind=kind, nlist=nlist)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DenseSpec:
        """The spec a manifest records (keys from newer versions dropped)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def ivf_nlist(n_vectors: int) -> int:
    """Cells for ``n_vectors``: the power of two nearest ``sqrt(N)``, at least 1. At 200k
    vectors 512 cells trained 12x faster than 2048 (FAISS's 4 sqrt(N)) and searched as fast at
    the same recall, so training stays short at a million (bench_ann.py)."""
    if n_vectors < 1:
        return 1
    return int(2 ** round(math.log2(max(1.0, math.sqrt(n_vectors)))))


def max_nlist(n_vectors: int) -> int:
    """The most cells k-means can place reliably with ``n_vectors`` points."""
    return max(1, n_vectors // IVF_MIN_POINTS_PER_LIST)


def spec_of(index: faiss.Index) -> DenseSpec:
    """Describe a loaded FAISS index (for indexes whose manifest has no ``dense_index``)."""
    if isinstance(index, faiss.IndexHNSW):
        return DenseSpec(kind="hnsw", hnsw_m=int(index.hnsw.nb_neighbors(1)),
                         ef_construction=int(index.hnsw.efConstruction),
                         ef_search=max(int(index.hnsw.efSearch), HNSW_EF_SEARCH))
    if isinstance(index, faiss.IndexIVF):
        return DenseSpec(kind="ivf", nlist=int(index.nlist), nprobe=int(index.nprobe))
    return DenseSpec(kind="flat")


class DenseIndex:
    """A FAISS index of passage vectors: passage ``p`` is the ``p``-th of its rows that is not
    in ``removed`` (sorted FAISS row numbers of removed passages, HNSW only; usually none, and
    then row ``i`` is passage ``i``)."""

    def __init__(self, index: faiss.Index, spec: DenseSpec | None = None,
                 removed: np.ndarray | None = None) -> None:
        self.index = index
        self.spec = spec if spec is not None else spec_of(index)
        self.removed = _checked_removed(removed, int(index.ntotal))
        if len(self.removed) and not isinstance(index, faiss.IndexHNSW):
            raise IndexError_("only an HNSW dense index keeps removed rows")
        self._skip: tuple[np.ndarray, faiss.IDSelector] | None = None
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.spec.ef_search
            if len(self.removed):
                self._skip = _skipping(self.removed, int(index.ntotal))
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = min(self.spec.nprobe, int(index.nlist))

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        *,
        kind: DenseKind = "flat",
        hnsw_m: int = 32,
        spec: DenseSpec | None = None,
    ) -> DenseIndex:
        """Index ``vectors`` (float32 [N, dim], L2-normalised) as ``spec`` says (default: a
        spec of ``kind`` and ``hnsw_m``, the RetrievalConfig fields)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if spec is None:
            if kind not in KINDS:
                raise ValueError(f"unknown FAISS index kind {kind!r}; use one of {KINDS}")
            spec = DenseSpec(kind=kind, hnsw_m=hnsw_m)
        asked, spec = spec, spec.resolved(len(vectors))
        if asked.nlist is not None and spec.nlist is not None and spec.nlist < asked.nlist:
            log.warning("IVF: %d cells instead of the %d asked: %d vectors give k-means at "
                        "most %d", spec.nlist, asked.nlist, len(vectors), spec.nlist)
        index = _empty(spec, vectors.shape[1])
        if isinstance(index, faiss.IndexIVF):
            _train_ivf(index, vectors, spec)
        index.add(vectors)
        return cls(index, spec)

    def rebuilt(self, vectors: np.ndarray) -> DenseIndex:
        """An index of the same kind and settings holding ``vectors`` instead. IVF keeps its
        trained centroids (no k-means again: updates stay cheap); its cell count stays that of
        the original build, so a collection that grew manyfold is better rebuilt."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not isinstance(self.index, faiss.IndexIVF):
            return DenseIndex.build(vectors, spec=self.spec)
        index = faiss.clone_index(self.index)
        index.reset()
        index.add(vectors)
        return DenseIndex(index, self.spec)

    def without(self, passages: np.ndarray) -> DenseIndex:
        """This index without the passages ``passages`` (ids; those after them move up), the
        others unchanged (searches of this one may go on meanwhile). HNSW marks their rows
        removed and shares this index's graph, unless more than ``MAX_REMOVED_FRACTION`` of
        its rows would then be removed: then, as for the other kinds, ``rebuilt`` of the rest."""
        passages = np.unique(np.asarray(passages, dtype=np.int64))
        if len(passages) and (passages[0] < 0 or passages[-1] >= self.size):
            raise ValueError(f"passage ids outside 0..{self.size - 1}")
        if not len(passages):
            return self
        rows = self._rows()
        removed = np.union1d(self.removed, rows[passages])
        if (isinstance(self.index, faiss.IndexHNSW)
                and len(removed) <= MAX_REMOVED_FRACTION * self.index.ntotal):
            return DenseIndex(self.index, self.spec, removed)
        keep = np.ones(self.size, dtype=bool)
        keep[passages] = False
        return self.rebuilt(self.vectors()[keep])

    def extended(self, vectors: np.ndarray) -> DenseIndex:
        """A copy of this index with ``vectors`` added after its rows (searches of this one
        may go on meanwhile): what ``rebuilt`` of all the vectors gives, without building the
        old rows again (HNSW inserts only the new ones into a copy of its graph)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.clone_index(self.index)
        if isinstance(index, faiss.IndexHNSW):
            # HNSW draws each new node's level at random, and its generator is not saved with the
            # index: reloaded, it starts from its seed again, and the passages added after every
            # restart got the same levels. Seeded by the size, each extension draws afresh.
            index.hnsw.rng = faiss.RandomGenerator(int(index.ntotal))
        if len(vectors):
            index.add(vectors)
        return DenseIndex(index, self.spec, self.removed)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        """The number of passages (rows not removed)."""
        return int(self.index.ntotal) - len(self.removed)

    def _rows(self) -> np.ndarray:
        """int64 [size]: the FAISS row of each passage."""
        if not len(self.removed):
            return np.arange(self.size, dtype=np.int64)
        return np.flatnonzero(_live(self.removed, int(self.index.ntotal))).astype(np.int64)

    def vectors(self) -> np.ndarray:
        """float32 [size, dim]: every passage's stored vector in passage order (all kinds
        store them exactly)."""
        if self.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if isinstance(self.index, faiss.IndexIVF):
            self.index.make_direct_map()  # IVF stores by cell; the map finds row i
        every = self.index.reconstruct_n(0, int(self.index.ntotal))
        if len(self.removed):
            every = every[self._rows()]
        return np.ascontiguousarray(every, dtype=np.float32)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Passage ids int64 [Q, k] and cosines float32 [Q, k], best first, ties by lower id
        (as BM25's: FAISS's heap gave the higher first, e.g. a passage's duplicate before it);
        id -1 pads missing rows."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        k = max(1, min(k, self.size))
        if self._skip is None:
            scores, ids = self.index.search(vectors, k)
            return _ties_by_id(ids, scores)
        # parameters replace the index's own: they carry its search breadth as it is now
        params = faiss.SearchParametersHNSW(sel=self._skip[1],
                                            efSearch=int(self.index.hnsw.efSearch))
        scores, rows = self.index.search(vectors, k, params=params)
        ids = np.where(rows >= 0, rows - np.searchsorted(self.removed, rows), -1)
        return _ties_by_id(ids.astype(np.int64), scores)

    def save(self, path: Path) -> None:
        """The FAISS index to ``path``; its removed rows, if any, are the caller's to save.
        OSError when it cannot be written (FAISS says so with a RuntimeError, which every
        caller's "could not write" handling missed: a full disk ended in a traceback)."""
        try:
            with open(path, "wb") as f:
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        except RuntimeError as e:
            raise OSError(f"could not write the dense index {path}: {e}") from e

    @classmethod
    def load(cls, path: Path, spec: DenseSpec | None = None,
             removed: np.ndarray | None = None) -> DenseIndex:
        try:
            with open(path, "rb") as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except (RuntimeError, OSError, MemoryError) as e:  # (bad_alloc: sizes it read)
            raise IndexError_(f"cannot read the dense index {path}: {e!r}; rebuild the "
                              "index") from e
        if (why := _unlike_ours(index)) is not None:
            raise IndexError_(f"the dense index {path} cannot be searched as citeqa's: {why}; "
                              "rebuild the index")
        try:
            return cls(index, spec, removed)
        except IndexError_ as e:
            raise IndexError_(f"the dense index {path}: {e}; rebuild the index") from e


def _unlike_ours(index: faiss.Index) -> str | None:
    """What makes a FAISS index read from a file other than the kinds ``_empty`` makes (flat,
    HNSW over flat vectors, IVF over flat cells, each by inner product, vectors of finite
    numbers), or None. Another kind (one that maps ids, measures L2, or keeps no vectors to
    rebuild from) ranked the wrong passages, or aborted an update, and an update wrote it into
    the new index."""
    kinds = {faiss.IndexFlatIP: None, faiss.IndexHNSWFlat: "storage",
             faiss.IndexIVFFlat: "quantizer"}
    if type(index) not in kinds:
        return (f"it is a FAISS {type(index).__name__} (citeqa writes flat, HNSW and IVF "
                "indexes)")
    parts = [index] + ([faiss.downcast_index(getattr(index, part))]
                       if (part := kinds[type(index)]) else [])
    if any(p.metric_type != faiss.METRIC_INNER_PRODUCT for p in parts):
        return "it measures by another metric than inner product"
    if part and not isinstance(parts[1], faiss.IndexFlat) or any(p.d != index.d for p in parts):
        return f"it is a FAISS {type(index).__name__} over a {type(parts[-1]).__name__}"
    flat = parts[0] if part is None else parts[1] if part == "storage" else None
    if flat is not None and flat.ntotal and not np.isfinite(
            faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)).all():
        return "a vector in it is not all finite numbers"
    return _unlike_our_cells(index) if part == "quantizer" else None


def _unlike_our_cells(index: faiss.IndexIVFFlat) -> str | None:
    """What makes an IVF index's cells other than citeqa's, or None: each row 0..ntotal-1
    in exactly one cell (rows are passage numbers: another id cited another passage, or none),
    every vector finite numbers."""
    cells = index.invlists
    ids, finite = [], True
    for cell in range(cells.nlist):
        if n := cells.list_size(cell):
            ids.append(faiss.rev_swig_ptr(cells.get_ids(cell), n).copy())
            codes = faiss.rev_swig_ptr(cells.get_codes(cell), n * cells.code_size)
            finite = finite and bool(np.isfinite(np.frombuffer(codes, np.float32)).all())
    rows = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(rows) != index.ntotal or len(rows) and (
            rows.min() < 0 or rows.max() >= len(rows)
            or not (np.bincount(rows, minlength=len(rows)) == 1).all()):
        return "its cells do not hold each row once"
    return None if finite else "a vector in it is not all finite numbers"


def _ties_by_id(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of a search's ``ids`` and ``scores`` ordered best first and, among equal
    scores, by lower id (padding, id -1, last)."""
    padded = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((padded, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)


def _checked_removed(removed: np.ndarray | None, n_rows: int) -> np.ndarray:
    """``removed`` as sorted, distinct int64 row numbers below ``n_rows`` (IndexError_ if not)."""
    if removed is None:
        return np.zeros(0, dtype=np.int64)
    rows = np.asarray(removed)
    if rows.ndim != 1 or (len(rows) and rows.dtype.kind not in "iu"):
        raise IndexError_(f"removed rows must be a list of row numbers, got shape {rows.shape} "
                          f"of {rows.dtype}")
    rows = rows.astype(np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= n_rows or np.any(np.diff(rows) <= 0)):
        raise IndexError_(f"removed rows must be distinct, sorted and below {n_rows}")
    return rows


def _live(removed: np.ndarray, n_rows: int) -> np.ndarray:
    """bool [n_rows]: which rows are not ``removed``."""
    live = np.ones(n_rows, dtype=bool)
    live[removed] = False
    return live


def _skipping(removed: np.ndarray, n_rows: int) -> tuple[np.ndarray, faiss.IDSelector]:
    """A FAISS selector of the rows not in ``removed``, and the bitmap it reads (both must
    outlive every search that uses the selector: the caller keeps the pair)."""
    bits = np.packbits(_live(removed, n_rows), bitorder="little")
    return bits, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # its size in bytes


def _empty(spec: DenseSpec, dim: int) -> faiss.Index:
    if spec.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        return index
    assert spec.kind == "ivf" and spec.nlist is not None, spec
    # the quantizer is handed to the IVF index, which must own it (else it is freed early)
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.own_fields = True
    quantizer.this.disown()
    return ivf


def _train_ivf(index: faiss.IndexIVF, vectors: np.ndarray, spec: DenseSpec) -> None:
    """Spherical k-means (centroids kept unit length: the metric is cosine) on a seeded sample
    of ``train_per_list`` vectors per cell."""
    n = len(vectors)
    n_train = min(n, spec.train_per_list * index.nlist)
    rng = np.random.default_rng(spec.seed)
    sample = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
    index.cp.spherical = True
    index.cp.seed = spec.seed
    index.cp.max_points_per_centroid = spec.train_per_list + 1  # we sampled already
    index.cp.min_points_per_centroid = 1  # max_nlist keeps >= 39 points per cell anyway
    log.info("training IVF: %d cells on %d of %d vectors", index.nlist, n_train, n)
    index.train(sample)
