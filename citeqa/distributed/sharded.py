"""The sharded, resumable index build: plan, make shards (an executor), merge, swap in.

    sources --expand_sources--> items --executor: stage_item + finish_shard--> <work>/shards/
            --merge_shards + write_merged--> out (store.save_index: atomic swap)

The executor decides where shards are made: ``InProcessExecutor`` here (tests and the
reference), ``RayExecutor`` on Ray Data (ray_engine.py). Resuming is the shards' doing (content
keys, retrieval/shards.py): a rerun after a kill reads every source again but embeds only the
blocks that have no finished shard. ``out`` is untouched until the final swap, so the previous
index stays loadable throughout. The work directory is removed once the new index is in place.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from citeqa import allocator
from citeqa.config import RetrievalConfig
from citeqa.errors import ConfigError, EmptyCorpusError, IndexError_, IndexExistsError
from citeqa.ingest import Fetcher, FetchPolicy, expand_sources, load_item
from citeqa.ingest.sources import Sources, as_sources, is_url
from citeqa.journal import run_lock
from citeqa.retrieval.builder import BuildSummary, dense_spec_for, twins
from citeqa.retrieval.dense import DenseSpec
from citeqa.retrieval.embed import Embedder, load_embedder
from citeqa.retrieval.merge import merge_shards, write_merged
from citeqa.retrieval.shards import (
    MARKER,
    SHARD_CHARS,
    Shard,
    ShardJob,
    ShardResult,
    finish_shard,
    read_shard,
    stage_item,
    write_marker,
)
from citeqa.retrieval.store import check_replaceable, real_path

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Makes the shards of a build: every block of every item, finished in ``job.shards``."""

    def run(self, items: Sequence[str | Path], job: ShardJob, *,
            progress: bool) -> list[ShardResult]:
        """One result per block, in any order. ``items``: ``ingest.expand_sources``'s."""
        ...


class InProcessExecutor:
    """Makes the shards one after another in this process."""

    def __init__(self, embedder: Embedder | None = None) -> None:
        self.embedder = embedder  # None: the one the job's settings name, loaded when needed

    def run(self, items: Sequence[str | Path], job: ShardJob, *,
            progress: bool) -> list[ShardResult]:
        fetcher = Fetcher(FetchPolicy(allow_private=job.allow_private_urls))
        embedder = self.embedder
        if embedder is None and job.cfg.dense:
            embedder = load_embedder(job.cfg.embedder, cpu_dtype=job.cfg.cpu_dtype)
        results: list[ShardResult] = []
        with tqdm(desc="shards", unit="shard", disable=not progress) as bar:
            for i, item in enumerate(items):
                for staged in stage_item(i, load_item(item, fetcher), str(item), job):
                    results.append(finish_shard(staged, job, embedder, progress=progress))
                    bar.update()
                    bar.set_postfix(passages=sum(r.passages for r in results))
        return results


def default_work_dir(out: Path) -> Path:
    """Where shards wait for the merge: a hidden sibling of ``out`` (``.NAME.build``), or of
    the folder ``out`` links to (where the index is swapped in)."""
    out = real_path(Path(out))
    return out.parent / f".{out.name}.build"


def build_index_sharded(
    sources: Sources,
    out: Path,
    cfg: RetrievalConfig,
    *,
    executor: Executor,
    work_dir: Path | None = None,
    shard_chars: int = SHARD_CHARS,
    dense_spec: DenseSpec | None = None,
    allow_private_urls: bool = False,
    progress: bool = True,
    only_if_missing: bool = False,
) -> BuildSummary:
    """Build the index of ``sources`` at ``out`` from shards made by ``executor``.

    The result equals ``builder.build_index`` of the same sources (documents, passages, BM25;
    vectors up to floating-point noise). Rerun after a failure or a kill, it reuses the shards
    already finished in ``work_dir`` (default ``default_work_dir(out)``; on a cluster, storage
    every node mounts at the same path). ``shard_chars``: characters of documents per shard.
    ``only_if_missing``: see ``store.publish`` (an index found there at the swap: the shards
    are removed, as after a build).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if shard_chars < 1:
        raise ConfigError(f"shard_chars must be at least 1, got {shard_chars}")
    check_replaceable(out)  # before hours of embedding, not at the swap
    sources = as_sources(sources)
    items, skipped = expand_sources(sources)
    work = (Path(work_dir) if work_dir else default_work_dir(out)).resolve()
    if work in (out.resolve(), out.resolve().parent):  # its lock would be the swap lock
        what = "--out" if work == out.resolve() else "the folder --out is in"
        raise ConfigError(f"--work-dir {work_dir} is {what}; give the shards a folder of "
                          "their own (default: .OUT.build beside OUT)")
    if out.resolve() in work.parents:  # the swap would refuse an --out holding it, at the end
        raise ConfigError(f"--work-dir {work_dir} is inside --out; give the shards a folder "
                          "of their own (default: .OUT.build beside OUT)")
    for source in sources:  # a rerun would read the shards back in as documents, unless a
        # hidden folder holds them (a walk leaves those out: the default .OUT.build is one)
        folder = Path(source).resolve() if not is_url(source) else None
        if (folder is not None and folder.is_dir()
                and (folder == work or folder in work.parents)
                and not any(part.startswith(".") for part in work.relative_to(folder).parts)):
            raise ConfigError(f"--work-dir {work} is inside the source folder {source}; a "
                              "rerun would read its shards as documents: give the shards a "
                              "folder of their own (default: .OUT.build beside OUT)")
    job = ShardJob(cfg=cfg, work=str(work), shard_chars=shard_chars,
                   allow_private_urls=allow_private_urls, token=uuid.uuid4().hex,
                   keep_freed_memory=allocator.wanted(),  # a cluster's nodes lack our env
                   cwd=str(Path.cwd()))  # where relative sources are, for the workers
    if work_dir and not (work / MARKER).is_file() and (  # (the default one is citeqa's own)
            taken := [p.name for p in (job.shards, job.staging) if p.exists()]):
        raise ConfigError(f"--work-dir {work_dir} holds {' and '.join(taken)}, which no citeqa "
                          "build left there (the build deletes its own when done): give the "
                          "shards another folder")
    with run_lock(work, "index build", instead="give it another --work-dir"):  # a second
        # build would replace the marker and the shards under the first one
        write_marker(job)
        # blocks an interrupted run staged but did not finish are staged again (reading is
        # cheap next to embedding): each run would otherwise leave another copy of them
        shutil.rmtree(job.staging, ignore_errors=True)
        try:
            results = executor.run(items, job, progress=progress) if items else []
        except BaseException:
            if not any(job.shards.glob("*")):  # nothing finished to resume from
                _clean(job)
            raise
        results.sort(key=lambda r: (r.item, r.block))
        for r in results:
            if not (job.shards / r.key).is_dir():
                raise ConfigError(
                    f"shard {r.key} was written by a worker but is not in {job.shards}; on a "
                    "cluster, pass --work-dir on storage every node mounts at the same path"
                )
        reused = sum(not r.embedded for r in results)
        log.info("%d shards (%d from an earlier run), merging", len(results), reused)
        shards = (_read_or_drop(job.shards / r.key)
                  for r in tqdm(results, desc="reading shards", unit="shard", disable=not progress))
        urls = [item if isinstance(item := items[r.item], str) else None for r in results]
        merged = merge_shards(shards, dense=cfg.dense, urls=urls)
        merged.skipped = [*skipped, *merged.skipped]
        for s in merged.skipped:  # the summary carries them; the CLI prints each once
            log.debug("skipped %s: %s", s.source, s.reason)
        try:
            write_merged(merged, out, cfg, dense_spec_for(cfg, dense_spec), n_sources=len(sources),
                         progress=progress, only_if_missing=only_if_missing)
        except (EmptyCorpusError, IndexExistsError):
            _clean(job)  # nothing worth resuming
            raise
        _clean(job)
        return BuildSummary(
            documents=len(merged.documents),
            passages=len(merged.spans),
            skipped=merged.skipped,
            seconds=time.perf_counter() - t0,
            out=out,
            shards=len(results),
            shards_reused=reused,
            twins=twins(merged.documents),
        )


def _read_or_drop(directory: Path) -> Shard:
    """``read_shard``; a damaged shard (a disk that failed) is deleted, so that the rerun the
    error asks for makes it again rather than stopping on it each time."""
    try:
        return read_shard(directory)
    except IndexError_ as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise IndexError_(f"{e}; it was deleted: run the same command again, and only that "
                          "shard is made again") from e


def _clean(job: ShardJob) -> None:
    """Remove what the build put in its work directory, and the directory if that leaves it
    empty (a --work-dir given by the user may hold other things)."""
    for path in (job.shards, job.staging):
        shutil.rmtree(path, ignore_errors=True)
    (Path(job.work) / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(job.work).rmdir()


def discard_work(work: Path) -> None:
    """Remove what an interrupted sharded build kept in ``work`` once another build replaced
    the index it was for (a rerun of it would replace the new one); nothing while a build runs
    there (it holds the directory's lock)."""
    if not Path(work).is_dir():
        return
    try:
        with run_lock(work, "index build"):
            _clean(ShardJob(RetrievalConfig(), str(work)))  # (a job only for its paths)
    except ConfigError:
        log.info("a build is running in %s; its shards are left alone", work)
