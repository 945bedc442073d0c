"""BM25 with rank-bm25's ``BM25Okapi`` scoring semantics, vectorised over posting lists.

The index is a term-major CSR matrix built with numpy alone: for term ``t`` the passages that
contain it are ``doc_ids[indptr[t]:indptr[t + 1]]`` and ``tf[...]`` holds the precomputed
term-frequency component ``tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))``. A query
score is ``sum over query tokens of idf[t] * column(t)``; a repeated query token counts again,
and a term in more than half of the passages gets the floor ``epsilon * mean(idf)`` (both as in
rank-bm25). Scoring touches only the postings of the query's terms, never loops over passages.

On disk (a directory): ``indptr.npy``, ``doc_ids.npy``, ``tf.npy``, ``idf.npy``,
``doc_len.npy``, ``counts.npy`` (the raw count of each posting's term in its passage: an update
re-derives the index from them without tokenizing every passage again; absent in indexes
written before it, which updates tokenize), ``vocab.json`` (terms in id order) and
``params.json`` (k1, b, epsilon, the statistics, and ``tokenizer``: the ``text.tokenize``
version of the terms, 1 where absent); no pickle, mmap-able.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np

from citeqa.errors import IndexError_
from citeqa.text import TOKENIZER

_ARRAYS = ("indptr", "doc_ids", "tf", "idf", "doc_len")
COUNTS = "counts"  # optional array (indexes written before it lack it)
FILES = (*(f"{name}.npy" for name in (*_ARRAYS, COUNTS)), "vocab.json", "params.json")  # read


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
        counts: np.ndarray | None = None,  # int32 [nnz], raw counts; None in older indexes
    ) -> None:
        self.vocab = vocab
        self.term_ids = {t: i for i, t in enumerate(vocab)}
        self.indptr, self.doc_ids, self.tf, self.idf, self.doc_len = (
            indptr, doc_ids, tf, idf, doc_len
        )
        self.counts = counts
        self.params = params
        self.n_docs = int(params["n_docs"])
        # the text.tokenize version its passages were tokenized with: queries must be too
        self.tokenizer = int(params.get("tokenizer", 1))  # indexes before versions: 1

    @classmethod
    def build(
        cls,
        corpus_tokens: Iterable[Sequence[str]],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
        tokenizer: int = TOKENIZER,
    ) -> BM25Index:
        """Index ``corpus_tokens`` (one token list per passage, made by ``text.tokenize`` of
        version ``tokenizer``) with BM25Okapi parameters.

        An iterator is consumed once and its token lists are not kept (a million passages'
        tokens as Python strings would take gigabytes)."""
        return cls.from_counts(count_terms(corpus_tokens), k1=k1, b=b, epsilon=epsilon,
                               tokenizer=tokenizer)

    @classmethod
    def from_counts(
        cls, counted: TermCounts, *, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
        tokenizer: int = TOKENIZER,
    ) -> BM25Index:
        """Index passages given by their term counts (``count_terms``, or ``concat_counts`` of
        shards a distributed build counted): the same index ``build`` makes from the tokens."""
        n_docs, n_terms = len(counted.doc_len), len(counted.vocab)
        doc_len = counted.doc_len.astype(np.int32)
        docs = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(counted.indptr))
        # one key per (term, passage); sorting them orders the postings term-major, then by doc
        keys = counted.terms.astype(np.int64) * max(n_docs, 1) + docs
        order = np.argsort(keys, kind="stable")
        post_terms, post_docs = np.divmod(keys[order], max(n_docs, 1))
        counts = counted.counts[order]
        df = np.bincount(post_terms, minlength=n_terms)
        indptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])

        avgdl = float(doc_len.sum()) / n_docs if n_docs else 0.0
        tf = counts.astype(np.float64)
        if len(tf):
            norm = k1 * (1 - b + b * doc_len[post_docs] / avgdl)
            tf = tf * (k1 + 1) / (tf + norm)
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        # fsum: rounded once, whatever the vocabulary's order (an index changed in place orders
        # it otherwise than a fresh build, and numpy's mean differed in the last digit)
        average_idf = math.fsum(idf.tolist()) / n_terms if n_terms else 0.0
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
            "tokenizer": tokenizer,
        }
        return cls(
            vocab=list(counted.vocab),
            indptr=indptr,
            doc_ids=post_docs.astype(np.int32),
            tf=tf.astype(np.float32),
            idf=idf.astype(np.float64),
            doc_len=doc_len,
            params=params,
            counts=counts.astype(np.int32),
        )

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """float64 [N]: one score per passage, equal to ``BM25Okapi.get_scores``."""
        return self._scored(query_tokens)[0]

    def _scored(self, query_tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``scores`` and the ids of the passages some query term is in (repeated)."""
        postings, weights = [], []
        for token, count in Counter(query_tokens).items():
            t = self.term_ids.get(token)
            if t is None:
                continue  # unknown terms score 0, as in rank-bm25
            lo, hi = self.indptr[t], self.indptr[t + 1]
            postings.append(self.doc_ids[lo:hi])
            weights.append((count * self.idf[t]) * self.tf[lo:hi].astype(np.float64))
        if not postings:
            return np.zeros(self.n_docs, dtype=np.float64), np.zeros(0, dtype=np.int64)
        # one scatter-add over every query term's postings (faster than one per term)
        docs = np.concatenate(postings)
        return np.bincount(docs, weights=np.concatenate(weights), minlength=self.n_docs), docs

    def top_k(self, query_tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best passages: ids int64 [k'] and scores float64 [k'], best first, ties
        by ascending id; passages no query term is in included (they score 0)."""
        return top_k_of(self.scores(query_tokens), k)

    def search(self, query_tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``top_k``, over the passages some query term is in only. Their score can be 0 or
        below (rank-bm25 floors the idf of a term in more than half of the passages at
        ``epsilon`` times the mean idf, which is negative in a small index), so whether a
        passage matched is read from the postings, not from its score's sign."""
        scores, postings = self._scored(query_tokens)
        holds = np.zeros(self.n_docs, dtype=bool)
        holds[postings] = True
        matched = np.flatnonzero(holds)  # ascending: ties in top_k_of stay by lower id
        at, values = top_k_of(scores[matched], k)
        return matched[at], values

    def save(self, directory: Path) -> None:
        """Write the index as ``.npy`` arrays plus ``vocab.json`` and ``params.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        if self.counts is not None:
            np.save(directory / f"{COUNTS}.npy", np.ascontiguousarray(self.counts))
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False),
                                              encoding="utf-8")
        (directory / "params.json").write_text(json.dumps(self.params, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> BM25Index:
        """Load a saved index; arrays are memory-mapped read-only when ``mmap``."""
        try:
            arrays = {
                name: np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None)
                for name in _ARRAYS
            }
            counts_path = directory / f"{COUNTS}.npy"
            counts = (np.load(counts_path, mmap_mode="r" if mmap else None)
                      if counts_path.is_file() else None)
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            params = json.loads((directory / "params.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IndexError_(
                f"cannot read the BM25 index in {directory}: {e}; rebuild the index"
            ) from e
        if (why := _inconsistent(arrays, counts, vocab, params)) is not None:
            raise IndexError_(f"the BM25 index in {directory} is inconsistent ({why}); rebuild "
                              "the index")
        return cls(vocab=vocab, params=params, counts=counts, **arrays)

    def counts_of(self, rows: np.ndarray) -> TermCounts:
        """The term counts of passages ``rows`` (ascending), renumbered 0..len(rows)-1, read
        from the stored counts (ValueError when this index has none): what ``count_terms`` of
        their tokens gives, up to the order of each passage's terms (here by term id). Of every
        passage, ``concat_counts`` of these and of new passages' counts orders the vocabulary
        exactly as one pass over all of them does (a term's id follows its first occurrence);
        after passages are left out the order may differ, the scores not."""
        if self.counts is None:
            raise ValueError("this BM25 index stores no term counts; tokenize the passages")
        rows = np.asarray(rows, dtype=np.int64)
        renumber = np.full(self.n_docs, -1, dtype=np.int64)
        renumber[rows] = np.arange(len(rows))
        post_rows = renumber[np.asarray(self.doc_ids, dtype=np.int64)]  # -1: not kept
        post_terms = np.repeat(np.arange(len(self.vocab), dtype=np.int64), np.diff(self.indptr))
        live = post_rows >= 0
        post_rows, post_terms = post_rows[live], post_terms[live]
        order = np.lexsort((post_terms, post_rows))  # passage-major, then by term id
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.bincount(post_rows, minlength=len(rows)), out=indptr[1:])
        return TermCounts(list(self.vocab), np.asarray(self.doc_len, np.int32)[rows], indptr,
                          post_terms[order].astype(np.int32),
                          np.asarray(self.counts)[live][order].astype(np.int32))


def _inconsistent(arrays: dict[str, np.ndarray], counts: np.ndarray | None, vocab: object,
                  params: object) -> str | None:
    """What in a saved index's parts does not hold together, or None: shapes, kinds and the
    ranges scoring and updates rely on. Files whose checksums match may still be edited and
    summed again, or taken from two indexes: a posting of passage -1 sent an update's counts
    to the last passage, and a NaN tf ranked by nothing, silently."""
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
        return "vocab.json is not a list of terms"
    if not isinstance(params, dict):
        return "params.json is not an object"
    n_docs, tokenizer = params.get("n_docs"), params.get("tokenizer", 1)
    if not _whole(n_docs) or n_docs < 0:
        return f"n_docs is {n_docs!r}"
    if not _whole(tokenizer) or not 1 <= tokenizer <= TOKENIZER:
        return f"tokenizer version {tokenizer!r}; this citeqa knows 1 to {TOKENIZER}"
    for key in ("k1", "b", "epsilon"):
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0):
            return f"{key} is {value!r}"
    # (signed: a difference of unsigned ones wraps, and a fall reads as a rise)
    kinds = {"indptr": "i", "doc_ids": "i", "tf": "f", "idf": "f", "doc_len": "i", COUNTS: "i"}
    parts = {**arrays, **({COUNTS: counts} if counts is not None else {})}
    for name, a in parts.items():
        if a.ndim != 1 or a.dtype.kind not in kinds[name]:
            return f"{name} holds {a.dtype} of shape {a.shape}"
    indptr, doc_ids = arrays["indptr"], arrays["doc_ids"]
    sizes = {"indptr": (len(indptr), len(vocab) + 1), "idf": (len(arrays["idf"]), len(vocab)),
             "doc_len": (len(arrays["doc_len"]), n_docs), "tf": (len(arrays["tf"]), len(doc_ids)),
             **({COUNTS: (len(counts), len(doc_ids))} if counts is not None else {})}
    if bad := [f"{name} has {n} entries, not {want}" for name, (n, want) in sizes.items()
               if n != want]:
        return "; ".join(bad)
    if indptr[0] != 0 or indptr[-1] != len(doc_ids) or np.any(np.diff(indptr) < 0):
        return "indptr does not delimit the postings"
    if len(doc_ids) and (doc_ids.min() < 0 or doc_ids.max() >= n_docs):
        return f"a posting names a passage outside 0..{n_docs - 1}"
    if not _ascending_within(indptr, doc_ids):
        return "a term's postings are not in passage order"
    if not (np.isfinite(arrays["tf"]).all() and np.isfinite(arrays["idf"]).all()):
        return "a score part is not a finite number"
    if counts is not None and len(counts) and counts.min() < 1:
        return "a term count is below 1"
    return None


def _ascending_within(indptr: np.ndarray, doc_ids: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether each term's postings name distinct passages in ascending order (looking a
    passage's copies up intersects them by binary search), read ``block`` at a time."""
    starts = indptr[1:-1]  # where each term's postings after the first term's begin
    for lo in range(0, max(len(doc_ids) - 1, 0), block):
        hi = min(lo + block, len(doc_ids) - 1)
        rises = np.diff(doc_ids[lo:hi + 1]) > 0  # rises[j]: from posting lo+j to lo+j+1
        first = starts[np.searchsorted(starts, lo, "right"):np.searchsorted(starts, hi, "right")]
        rises[first - lo - 1] = True  # a term's first posting may be below the last one's
        if not rises.all():
            return False
    return True


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def top_k_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids (int64) and values of the ``k`` largest ``scores``, best first, ties by lower id."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=scores.dtype)
    if k < len(scores):  # everything above the k-th value, then the lowest ids tied with it
        kth = -np.partition(-scores, k - 1)[k - 1]
        above = np.flatnonzero(scores > kth)
        cand = np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]])
    else:
        cand = np.arange(len(scores))
    order = np.lexsort((cand, -scores[cand]))
    ids = cand[order].astype(np.int64)
    return ids, scores[ids]


# -- term counts: what a build worker hands to the merge ---------------------------------------


@dataclass
class TermCounts:
    """The distinct terms of each passage of a run of passages, with their counts: all BM25
    needs, as plain arrays. Each passage's terms are in order of first occurrence, so that
    runs counted apart (shards) concatenate into the vocabulary order one pass would give."""

    vocab: list[str]  # term id -> term, in order of first occurrence
    doc_len: np.ndarray  # int32 [N]: tokens per passage
    indptr: np.ndarray  # int64 [N + 1]: passage i's terms are terms[indptr[i]:indptr[i + 1]]
    terms: np.ndarray  # int32 [nnz]: term ids, per passage in order of first occurrence
    counts: np.ndarray  # int32 [nnz]: occurrences of the term in its passage

    def select(self, rows: np.ndarray) -> TermCounts:
        """The passages ``rows`` (ascending), with the vocabulary unchanged."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = self.indptr[rows], self.indptr[rows + 1]
        take = (np.concatenate([np.arange(a, z) for a, z in zip(lo, hi, strict=True)])
                if len(rows) else np.zeros(0, np.int64))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(hi - lo, out=indptr[1:])
        return TermCounts(self.vocab, self.doc_len[rows], indptr, self.terms[take],
                          self.counts[take])


def count_terms(corpus_tokens: Iterable[Sequence[str]]) -> TermCounts:
    """Count the terms of each passage (one token list each), in one pass."""
    vocab: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    lens: list[int] = []
    for tokens in corpus_tokens:
        ids = (vocab.setdefault(t, len(vocab)) for t in tokens)
        chunks.append(np.fromiter(ids, np.int64, len(tokens)))
        lens.append(len(tokens))
    n_docs, n_terms = len(lens), max(len(vocab), 1)
    doc_len = np.asarray(lens, dtype=np.int32)
    occurrences = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    docs = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
    keys, first, counts = np.unique(
        docs * n_terms + occurrences, return_index=True, return_counts=True
    )
    # occurrence positions grow with the passage, so this order is passage-major and, within a
    # passage, by first occurrence
    order = np.argsort(first, kind="stable")
    post_docs, post_terms = np.divmod(keys[order], n_terms)
    indptr = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(np.bincount(post_docs, minlength=n_docs), out=indptr[1:])
    return TermCounts(list(vocab), doc_len, indptr, post_terms.astype(np.int32),
                      counts[order].astype(np.int32))


def concat_counts(parts: Sequence[TermCounts]) -> TermCounts:
    """The passages of ``parts`` one after another, as if counted in one pass: one vocabulary,
    in order of first occurrence among these passages (terms no passage uses are dropped)."""
    provisional: dict[str, int] = {}  # the union of the vocabularies, in part order
    terms, lens, counts, sizes = [], [], [], []
    for part in parts:
        remap = np.fromiter((provisional.setdefault(t, len(provisional)) for t in part.vocab),
                            np.int64, len(part.vocab))
        terms.append(remap[part.terms])
        lens.append(part.doc_len)
        counts.append(part.counts)
        sizes.append(np.diff(part.indptr))
    all_terms = np.concatenate(terms) if terms else np.zeros(0, np.int64)
    used, first = np.unique(all_terms, return_index=True)
    in_order = used[np.argsort(first, kind="stable")]  # provisional ids by first occurrence
    final = np.full(len(provisional), -1, dtype=np.int64)
    final[in_order] = np.arange(len(in_order))
    names = list(provisional)
    per_doc = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    indptr = np.zeros(len(per_doc) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=indptr[1:])
    return TermCounts(
        vocab=[names[i] for i in in_order],
        doc_len=np.concatenate(lens).astype(np.int32) if lens else np.zeros(0, np.int32),
        indptr=indptr,
        terms=final[all_terms].astype(np.int32),
        counts=np.concatenate(counts).astype(np.int32) if counts else np.zeros(0, np.int32),
    )
