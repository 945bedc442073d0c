"""Making a build's shards on Ray Data: staging tasks, then a pool of embedding actors.

    items (from_items) -> flat_map(_stage_row): CPU tasks read an item, cut it into blocks,
                          chunk and count each block into <work>/staging (retrieval/shards.py)
                       -> map_batches(_FinishShards): an actor pool, one actor per GPU when
                          the cluster has GPUs, else one per ``cpus_per_embedder`` CPUs; each
                          loads the embedder once and finishes shards into <work>/shards
                       -> small rows {item, block, key, passages, embedded} to the driver

Workers write the shards themselves; what flows through Ray is only item names and shard keys,
so the driver is never the bottleneck. On a cluster the work directory must therefore be on
storage that every node mounts at the same path (each task checks, and says so if not). Ray is
an optional extra: without it, ``RayExecutor`` raises ConfigError saying how to install it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from citeqa.errors import CiteqaError, ConfigError
from citeqa.retrieval.shards import ShardJob, ShardResult, Staged, finish_shard, stage_item

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install -e '.[ray]' (in the citeqa checkout)"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray build runs."""

    # "local": start Ray inside this process, on this machine; otherwise the address of a
    # running cluster to join ("auto", "HEAD:6379", "ray://HEAD:10001")
    address: str = "local"
    num_cpus: int | None = None  # local only: CPUs Ray may use (None: all of them)
    embedders: int | None = None  # actors in the pool; None: one per GPU, else per CPUs
    cpus_per_embedder: float = 1.0  # CPUs (torch threads) of an actor on a CPU-only cluster
    gpus_per_embedder: float = 1.0  # GPUs of an actor where the cluster has GPUs
    stage_tasks: int | None = None  # staging tasks at once; None: max(1, CPUs // 8)


def require_ray() -> Any:
    """The ``ray`` module, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a separate part of the wheel's extras)
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray, an optional extra ({e.msg}); install it with: "
                          f"{RAY_INSTALL}") from None
    return ray


@contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """Ray, started for ``local`` or joined at ``options.address``; shut down afterwards when
    this call started it (a Ray already running in this process, e.g. a test's, is reused)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if options.address != "local":
        check_reachable(options.address)
    try:
        if options.address == "local":  # "local": never a cluster that RAY_ADDRESS or a
            # running `ray start` names (Ray looks those up when given no address)
            ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False)
        else:
            ray.init(address=options.address)
    except Exception as e:  # Ray raises bare Exceptions too (a node that timed out starting)
        ray.shutdown()  # (what it started, if anything, goes too)
        raise ConfigError(
            f"could not start or join Ray at {options.address!r} ({e}); for a cluster, give "
            "the address `ray start --head` printed (HEAD:6379 or ray://HEAD:10001), or "
            "'local' for this machine"
        ) from None
    except BaseException:  # Ctrl-C while it starts: what it started so far goes too (its
        ray.shutdown()  # dashboard and runtime-env agents outlived the command)
        raise
    try:
        yield ray
    finally:
        ray.shutdown()


CONNECT_S = 5.0  # how long a cluster's head may take to accept a connection


def check_reachable(address: str, timeout_s: float = CONNECT_S) -> None:
    """ConfigError when nothing accepts a connection at ``address`` (HOST:PORT or
    ray://HOST:PORT; "auto" is Ray's to find): Ray itself retries a wrong address for many
    minutes before it gives up."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # Ray's own message says what is wrong with the form
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"nothing answers at {address} ({e.strerror or e}); give the address `ray start "
            "--head` printed on the cluster's head (HEAD:6379, or ray://HEAD:10001 with "
            "ray[client]), or 'local' for this machine") from None


def plan_pool(options: RayOptions, cpus: float, gpus: float, dense: bool, *,
              node_cpus: float | None = None, node_gpus: float | None = None) -> dict[str, Any]:
    """Actor pool and task sizes for a cluster with ``cpus`` and ``gpus`` in all, ``node_cpus``
    and ``node_gpus`` on its largest node (default: the totals, one node) (pure).

    ConfigError when one actor asks for more than any node has: Ray would wait for such a
    node for ever (it logs "No available node types can fulfill resource request")."""
    node_cpus = cpus if node_cpus is None else node_cpus
    node_gpus = gpus if node_gpus is None else node_gpus
    use_gpu = dense and node_gpus >= options.gpus_per_embedder
    if options.embedders is not None:
        actors = options.embedders
    elif use_gpu:
        actors = int(gpus // options.gpus_per_embedder)
    else:
        actors = int(cpus // options.cpus_per_embedder)
    actors = max(1, actors)
    if not use_gpu and options.cpus_per_embedder > node_cpus:
        raise ConfigError(
            f"an embedding actor asks for {options.cpus_per_embedder:g} CPUs (cpus_per_embedder)"
            f" but the largest node of this Ray cluster has {node_cpus:g}; ask for at most "
            f"{node_cpus:g}")
    stage = options.stage_tasks or max(1, int(cpus // 8))
    return {
        "actors": actors,
        "actor_cpus": 1.0 if use_gpu else options.cpus_per_embedder,
        "actor_gpus": options.gpus_per_embedder if use_gpu else 0.0,
        "threads": 1 if use_gpu else max(1, math.floor(options.cpus_per_embedder)),
        "device": "cuda" if use_gpu else "cpu",
        "stage_tasks": stage,
    }


# Rows carry citeqa's own errors (a source's worker cannot see the work directory, a model is
# missing) as data: Ray Data would wrap a raised one into its own exception and lose its type.
_RESULT = ("item", "block", "key", "passages", "embedded", "error", "message")


_CWD_LOCK = threading.Lock()  # the working directory is the whole process's


@contextmanager
def _in_driver_dir(item: str | Path, job: ShardJob) -> Iterator[None]:
    """Read a relative path from where the command was run (``job.cwd``), as a plain build
    does: a cluster's worker starts elsewhere, and would skip the file as missing. The path
    stays as given, for the documents' sources and ids."""
    if isinstance(item, str) or item.is_absolute() or not job.cwd:
        yield
        return
    with _CWD_LOCK:
        here = os.getcwd()
        try:
            os.chdir(job.cwd)
        except OSError as e:
            raise ConfigError(
                f"{item} is a relative path, and the folder it is relative to, {job.cwd}, is "
                f"not on {os.uname().nodename} ({e.strerror}); give sources on storage every "
                "node mounts at the same path") from None
        try:
            yield
        finally:
            os.chdir(here)


def _error_row(item: Any, e: BaseException) -> dict[str, Any]:
    """A worker's failure as data: citeqa's own errors by type; anything else (a full disk, a
    bug) as a CiteqaError naming the node, so the command ends with one line, not Ray's
    traceback."""
    own = isinstance(e, CiteqaError)
    return {"item": item, "block": -1, "key": "", "staging": "",
            "error": type(e).__name__ if own else "CiteqaError",
            "message": str(e) if own else (f"a build worker on {os.uname().nodename} failed: "
                                           f"{type(e).__name__}: {e}")}


def _stage_row(row: dict[str, Any], job: ShardJob) -> list[dict[str, Any]]:
    """Ray task: one item -> its blocks, staged (``shards.stage_item``)."""
    from citeqa.ingest import Fetcher, FetchPolicy, load_item

    item: str | Path = row["source"] if row["url"] else Path(row["source"])
    fetcher = Fetcher(FetchPolicy(allow_private=job.allow_private_urls))
    try:
        with _in_driver_dir(item, job):
            staged = list(stage_item(int(row["item"]), load_item(item, fetcher), str(item),
                                     job))
    except Exception as e:  # reported as data (_error_row)
        return [_error_row(row["item"], e)]
    return [{"item": s.item, "block": s.block, "key": s.key, "staging": s.staging,
             "error": "", "message": ""} for s in staged]


class _FinishShards:
    """Ray actor: holds one embedder and finishes the shards it is given."""

    def __init__(self, job: ShardJob, device: str, threads: int) -> None:
        from citeqa.allocator import keep_freed_memory
        from citeqa.retrieval.embed import load_embedder

        if job.cfg.dense and device == "cpu":
            import torch

            torch.set_num_threads(threads)
            if job.keep_freed_memory:  # as the driver's process does, by the driver's setting
                keep_freed_memory({})  # (a cluster node's environment is not the driver's)
        self.job = job
        self.embedder = None
        self.error: CiteqaError | None = None
        try:
            if job.cfg.dense:
                self.embedder = load_embedder(job.cfg.embedder, cpu_dtype=job.cfg.cpu_dtype,
                                              device=device)
        except CiteqaError as e:
            self.error = e  # reported with the first shard, as data

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in _RESULT}
        for i in range(len(batch["key"])):
            row = {k: batch[k][i] for k in ("item", "block", "key", "staging", "error",
                                            "message")}
            row["passages"], row["embedded"] = 0, False
            if not row["error"]:
                try:
                    if self.error is not None:
                        raise self.error
                    r = finish_shard(Staged(int(row["item"]), int(row["block"]),
                                            str(row["key"]), str(row["staging"])),
                                     self.job, self.embedder)
                    row["passages"], row["embedded"] = r.passages, r.embedded
                except Exception as e:  # reported as data (_error_row)
                    bad = _error_row(row["item"], e)
                    row["error"], row["message"] = bad["error"], bad["message"]
            for name in _RESULT:
                out[name].append(row[name])
        return out


def _rows_of(ds: Any) -> Generator[dict[str, Any], None, None]:
    """The rows of the Ray dataset ``ds``, fetched as they come, never ahead. Ray Data's
    ``iter_rows`` prefetches: its prefetching thread outlives the iteration, holding the last
    blocks it fetched, and when it let go of them after ``ray.shutdown()`` Ray ended the whole
    process (exit status 1, no message: the build's error was never told). Close the generator
    (``contextlib.closing``) so that Ray Data stops its executor before Ray is shut down."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            yield {name: batch[name][i] for name in names}


def _raise_row_error(row: dict[str, Any]) -> None:
    """Raise the citeqa error a worker reported in ``row`` as its own type."""
    import citeqa.errors

    cls = getattr(citeqa.errors, str(row["error"]), None)
    if not (isinstance(cls, type) and issubclass(cls, CiteqaError)):
        cls = CiteqaError
    raise cls(str(row["message"]))


class RayExecutor:
    """Makes shards on Ray Data (see the module docstring)."""

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        require_ray()  # fail before any work when Ray is missing

    def run(self, items: Sequence[str | Path], job: ShardJob, *,
            progress: bool) -> list[ShardResult]:
        with connected(self.options) as ray:
            resources = ray.cluster_resources()
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            pool = plan_pool(self.options, resources.get("CPU", 1.0), resources.get("GPU", 0.0),
                             job.cfg.dense,
                             node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=None),
                             node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=None))
            log.info("Ray build: %d embedding actors on %s, %d staging tasks at once",
                     pool["actors"], pool["device"], pool["stage_tasks"])
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours below counts shards and passages
            rows = [{"item": i, "url": isinstance(item, str), "source": str(item)}
                    for i, item in enumerate(items)]
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 256)))
            # Staging is light next to embedding: it takes no CPU from the actors' budget
            # (which would starve it on a small machine), only a cap on how many run at once.
            ds = ds.flat_map(_stage_row, fn_kwargs={"job": job}, num_cpus=0,
                             compute=ray.data.TaskPoolStrategy(size=pool["stage_tasks"]))
            ds = ds.map_batches(
                _FinishShards,
                fn_constructor_kwargs={"job": job, "device": pool["device"],
                                       "threads": pool["threads"]},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=pool["actors"]),
                num_cpus=pool["actor_cpus"],
                num_gpus=pool["actor_gpus"],
            )
            results: list[ShardResult] = []
            with tqdm(desc="shards", unit="shard", disable=not progress) as bar, \
                    closing(_rows_of(ds)) as rows_out:
                try:
                    for row in rows_out:
                        if row["error"]:
                            _raise_row_error(row)
                        results.append(ShardResult(int(row["item"]), int(row["block"]),
                                                   str(row["key"]), int(row["passages"]),
                                                   bool(row["embedded"])))
                        bar.update()
                        bar.set_postfix(passages=sum(r.passages for r in results))
                except CiteqaError:
                    raise
                except Exception as e:  # Ray's own (a worker or actor died): one line, not
                    # its traceback; the shards finished so far are kept for the rerun
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise CiteqaError(f"the Ray build failed ({type(e).__name__}: {first}); "
                                      "run the same command again to resume") from e
        return results
