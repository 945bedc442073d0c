"""BM25 with rank-bm25's ``BM25Okapi`` scoring semantics, vectorised over posting lists.

The index is a term-major CSR matrix built with numpy alone: for term ``t`` the passages that
contain it are ``doc_ids[indptr[t]:indptr[t + 1]]`` and ``tf[...]`` holds the precomputed
term-frequency component ``tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))``. A query
score is ``sum over query tokens of idf[t] * column(t)``; a repeated query token counts again,
and a term in more than half of the passages gets the floor ``epsilon * mean(idf)`` (both as in
rank-bm25). Scoring touches only the postings of the query's terms, never loops over passages.

On disk (a directory): ``indptr.npy``, ``doc_ids.npy``, ``tf.npy``, ``idf.npy``,
``doc_len.npy``, ``vocab.json`` (terms in id order) and ``params.json``; no pickle, mmap-able.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from citeqa.errors import IndexError_

_ARRAYS = ("indptr", "doc_ids", "tf", "idf", "doc_len")


class BM25Index:
    """An immutable BM25Okapi index over a tokenized corpus (one row per passage)."""

    def __init__(
        self,
        *,
        vocab: list[str],
        indptr: np.ndarray,  # int64 [V + 1]
        doc_ids: np.ndarray,  # int32 [nnz], ascending within each term
        tf: np.ndarray,  # float32 [nnz], the term-frequency component (module docstring)
        idf: np.ndarray,  # float64 [V], epsilon floor applied
        doc_len: np.ndarray,  # int32 [N], tokens per passage
        params: dict,  # k1, b, epsilon, avgdl, average_idf, n_docs
    ) -> None:
        self.vocab = vocab
        self.term_ids = {t: i for i, t in enumerate(vocab)}
        self.indptr, self.doc_ids, self.tf, self.idf, self.doc_len = (
            indptr, doc_ids, tf, idf, doc_len
        )
        self.params = params
        self.n_docs = int(params["n_docs"])

    @classmethod
    def build(
        cls,
        corpus_tokens: Sequence[Sequence[str]],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
    ) -> BM25Index:
        """Index ``corpus_tokens`` (one token list per passage) with BM25Okapi parameters."""
        n_docs = len(corpus_tokens)
        vocab: dict[str, int] = {}
        term_chunks: list[np.ndarray] = []
        doc_len = np.zeros(n_docs, dtype=np.int32)
        for d, tokens in enumerate(corpus_tokens):
            doc_len[d] = len(tokens)
            ids = (vocab.setdefault(t, len(vocab)) for t in tokens)
            term_chunks.append(np.fromiter(ids, np.int64, len(tokens)))
        n_terms = len(vocab)
        terms = np.concatenate(term_chunks) if term_chunks else np.zeros(0, np.int64)
        docs = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
        # one key per (term, doc) occurrence; unique keys sort term-major then by doc
        keys, counts = np.unique(terms * max(n_docs, 1) + docs, return_counts=True)
        post_terms, post_docs = np.divmod(keys, max(n_docs, 1))
        df = np.bincount(post_terms, minlength=n_terms)
        indptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])

        avgdl = float(doc_len.sum()) / n_docs if n_docs else 0.0
        tf = counts.astype(np.float64)
        if len(tf):
            norm = k1 * (1 - b + b * doc_len[post_docs] / avgdl)
            tf = tf * (k1 + 1) / (tf + norm)
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        average_idf = float(idf.mean()) if n_terms else 0.0
        idf[idf < 0] = epsilon * average_idf
        params = {
            "k1": k1,
            "b": b,
            "epsilon": epsilon,
            "avgdl": avgdl,
            "average_idf": average_idf,
            "n_docs": n_docs,
            "n_terms": n_terms,
            "nnz": int(len(keys)),
        }
        return cls(
            vocab=list(vocab),
            indptr=indptr,
            doc_ids=post_docs.astype(np.int32),
            tf=tf.astype(np.float32),
            idf=idf.astype(np.float64),
            doc_len=doc_len,
            params=params,
        )

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """float64 [N]: one score per passage, equal to ``BM25Okapi.get_scores``."""
        postings, weights = [], []
        for token, count in Counter(query_tokens).items():
            t = self.term_ids.get(token)
            if t is None:
                continue  # unknown terms score 0, as in rank-bm25
            lo, hi = self.indptr[t], self.indptr[t + 1]
            postings.append(self.doc_ids[lo:hi])
            weights.append((count * self.idf[t]) * self.tf[lo:hi].astype(np.float64))
        if not postings:
            return np.zeros(self.n_docs, dtype=np.float64)
        # one scatter-add over every query term's postings (faster than one per term)
        return np.bincount(
            np.concatenate(postings), weights=np.concatenate(weights), minlength=self.n_docs
        )

    def top_k(self, query_tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best passages: ids int64 [k'] and scores float64 [k'], best first.

        Ties are broken by ascending id (within the candidates ``argpartition`` selects).
        """
        return top_k_of(self.scores(query_tokens), k)

    def save(self, directory: Path) -> None:
        """Write the index as ``.npy`` arrays plus ``vocab.json`` and ``params.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        (directory / "params.json").write_text(json.dumps(self.params, indent=2))

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> BM25Index:
        """Load a saved index; arrays are memory-mapped read-only when ``mmap``."""
        try:
            arrays = {
                name: np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None)
                for name in _ARRAYS
            }
            vocab = json.loads((directory / "vocab.json").read_text())
            params = json.loads((directory / "params.json").read_text())
        except (OSError, ValueError) as e:
            raise IndexError_(
                f"cannot read the BM25 index in {directory}: {e}; rebuild the index"
            ) from e
        if len(vocab) + 1 != len(arrays["indptr"]) or len(arrays["doc_len"]) != params["n_docs"]:
            raise IndexError_(f"the BM25 index in {directory} is inconsistent; rebuild the index")
        return cls(vocab=vocab, params=params, **arrays)


def top_k_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (int64) and values of the ``k`` largest ``scores``, best first, ties by lower id."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=scores.dtype)
    if k < len(scores):
        cand = np.argpartition(-scores, k - 1)[:k]
    else:
        cand = np.arange(len(scores))
    order = np.lexsort((cand, -scores[cand]))
    ids = cand[order].astype(np.int64)
    return ids, scores[ids]
