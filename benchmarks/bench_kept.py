"""What keeping embeddings costs `citeqa index add` (citeqa/retrieval/kept.py), and what a rerun
saves: one run over ``--passages`` random 120-word passages, with the hash embedder (no model:
its own cost is small, so the figures are the keeping's overhead, not hidden by MiniLM's
~30 ms a passage on two CPU cores):

1. embedding every passage plainly;
2. the same through ``KeptEmbedder`` into an empty directory (hashing, writing the parts);
3. the same again, every passage found kept (hashing, reading the parts back).

    python benchmarks/bench_kept.py --passages 20000 --out FILE.json
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

from citeqa.retrieval import HashEmbedder  # noqa: E402
from citeqa.retrieval.kept import KeptEmbedder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    words = np.array([f"word{i}" for i in range(30_000)])
    texts = [" ".join(rng.choice(words, 120)) for _ in range(args.passages)]
    embedder = HashEmbedder()
    work = Path(tempfile.mkdtemp(prefix="bench-kept-"))
    try:
        t = time.perf_counter()
        plain = embedder.embed(texts)
        plain_s = time.perf_counter() - t
        with KeptEmbedder(embedder, work / "kept") as kept:
            t = time.perf_counter()
            first = kept.embed(texts)
            kept_s = time.perf_counter() - t
        again = KeptEmbedder(embedder, work / "kept")
        t = time.perf_counter()
        read = again.embed(texts)
        read_s = time.perf_counter() - t
        assert np.array_equal(first, plain) and np.array_equal(read, plain)
        assert again.reused == len(texts)
        size = sum(p.stat().st_size for p in (work / "kept").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(texts)
    row = {"passages": n, "plain_s": plain_s, "kept_s": kept_s, "read_back_s": read_s,
           "overhead_us_per_passage": (kept_s - plain_s) / n * 1e6,
           "read_back_us_per_passage": read_s / n * 1e6, "kept_bytes": size}
    print(f"{n:,} passages, hash embedder: plain {plain_s:.2f} s; kept {kept_s:.2f} s "
          f"({row['overhead_us_per_passage']:.0f} us a passage more); all read back "
          f"{read_s:.2f} s ({row['read_back_us_per_passage']:.0f} us a passage); "
          f"{size / 1e6:.1f} MB kept", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        **row}, indent=2) + "\n")


if __name__ == "__main__":
    main()
