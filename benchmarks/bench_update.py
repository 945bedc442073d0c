"""The cost of one live document update (POST / DELETE /v1/documents), before and after
updates reused the index's stored term counts, extended their dense index and (HNSW) marked a
removed passage's rows instead of building the graph again.

One run: a synthetic corpus of ``--documents`` documents (two passages each, random words),
hash embedder (no model: embedding the new passages costs the same either way); for each dense
kind, the time of

1. adding one document the way updates did before (every passage tokenized again for BM25,
   the dense index built again from every vector: this release's code with the stored counts
   dropped and the dense index's ``extended`` replaced by a rebuild of all its vectors);
2. adding the same document to the same index now (``apply_update``);
3. removing one document the way updates did before (the dense index refilled from the
   surviving vectors: an HNSW graph built again; this release's code with
   ``DenseIndex.without`` replaced by that rebuild);
4. removing the same document now (BM25 from the stored counts; HNSW marks the rows removed,
   flat and IVF are refilled);
5. for scale, a full build of the corpus plus the new document (embedding every passage).

    python benchmarks/bench_update.py --documents 20000 --kinds flat hnsw ivf --out FILE.json

Prints each figure and the ratios before / now, and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's citeqa, not the one installed (a worktree's)

from citeqa.config import ChunkConfig, RetrievalConfig  # noqa: E402
from citeqa.retrieval import HashEmbedder, Index, build_index_from_documents  # noqa: E402
from citeqa.retrieval.dense import DenseIndex, DenseSpec  # noqa: E402
from citeqa.retrieval.updates import IndexUpdate, apply_update  # noqa: E402
from citeqa.types import Document  # noqa: E402

CFG = RetrievalConfig(embedder="hash", chunk=ChunkConfig(max_chars=600))


def corpus(n: int, seed: int = 0) -> list[Document]:
    """``n`` documents of ~120 random words in two paragraphs (two passages each)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"word{i}" for i in range(30_000)])

    def paragraph() -> str:
        return " ".join(rng.choice(words, 60)) + "."

    return [Document(f"d{i}", f"Title {i}", f"s{i}.txt", paragraph() + "\n\n" + paragraph())
            for i in range(n)]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw"],
                        choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    docs = corpus(args.documents)
    new = Document("new", "New", "new.txt", "The Zorblax telescope sits on Mount Quillon.")
    results: dict[str, dict[str, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    try:
        for kind in args.kinds:
            spec = DenseSpec(kind=kind)  # type: ignore[arg-type]
            out, before, ref = work / kind, work / f"{kind}-before", work / f"{kind}-ref"
            build_index_from_documents(docs, out, CFG, progress=False, dense_spec=spec)
            shutil.copytree(out, before)
            passages = len(Index.load(out).passages)
            old_index = Index.load(before)
            old_index.bm25.counts = None  # tokenize every passage again, as before
            extended = DenseIndex.extended
            DenseIndex.extended = lambda self, v: self.rebuilt(  # type: ignore[method-assign]
                np.concatenate([self.vectors(), v]))
            try:
                before_s = timed(lambda: apply_update(  # noqa: B023
                    old_index, IndexUpdate(add=(new,)), before,  # noqa: B023
                    embedder=HashEmbedder()))
            finally:
                DenseIndex.extended = extended  # type: ignore[method-assign]
            index = Index.load(out)
            add_s = timed(lambda: apply_update(index, IndexUpdate(add=(new,)), out,  # noqa: B023
                                               embedder=HashEmbedder()))
            shutil.rmtree(before)
            shutil.copytree(out, before)
            old_index = Index.load(before)
            without = DenseIndex.without
            DenseIndex.without = lambda self, p: self.rebuilt(  # type: ignore[method-assign]
                np.delete(self.vectors(), p, axis=0))
            try:
                remove_before_s = timed(lambda: apply_update(  # noqa: B023
                    old_index, IndexUpdate(remove=("d0",)), before))  # noqa: B023
            finally:
                DenseIndex.without = without  # type: ignore[method-assign]
            index = Index.load(out)
            remove_s = timed(lambda: apply_update(index, IndexUpdate(remove=("d0",)),  # noqa: B023
                                                  out))  # noqa: B023
            build_s = timed(lambda: build_index_from_documents(  # noqa: B023
                [*docs, new], ref, CFG, progress=False, dense_spec=spec))  # noqa: B023
            results[kind] = {"passages": passages, "add_one_before_s": before_s,
                             "add_one_s": add_s, "before_over_now": before_s / add_s,
                             "remove_one_before_s": remove_before_s, "remove_one_s": remove_s,
                             "remove_before_over_now": remove_before_s / remove_s,
                             "full_build_s": build_s}
            print(f"{kind:5s} {passages:,} passages: add one document {before_s:.2f} s before, "
                  f"{add_s:.2f} s now ({before_s / add_s:.1f}x); remove one "
                  f"{remove_before_s:.2f} s before, {remove_s:.2f} s now "
                  f"({remove_before_s / remove_s:.1f}x); "
                  f"a full build {build_s:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"documents": args.documents, "machine":
                                        platform.processor() or platform.machine(),
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
