"""Load test of the real server: `citeqa serve` in a subprocess, 1, 4 and 16 concurrent clients.

    python benchmarks/load_test.py                       # default preset, index/default, 60 s/level
    python benchmarks/load_test.py --seconds 10 --levels 1 4 16 --index /tmp/idx
    python benchmarks/load_test.py --generator-url http://127.0.0.1:8100 --burst 8  # via vLLM

Starts the server on 127.0.0.1 (the `default` preset: SmolLM2 + MiniLM, unless --preset), waits
for /readyz, then for each concurrency level runs that many client threads (httpx), each asking
questions back to back for --seconds. Prints, per level: answers/s, p50/p95 latency of
successful answers, errors by status (503s, the deliberate overload answer, apart), and the
server's RSS; then peak RSS (VmHWM), RSS at start vs end, and throughput(N)/throughput(1) at the
largest level N of --levels
(the batching target is >= 2). The index is built from index/corpus first when missing.

``--generator-url`` serves through a remote engine (scripts/vllm_cpu.sh serve DIR; the
server's CITEQA_GENERATOR_URL); ``--burst N`` first times N requests sent one after another
against the same N sent at once (target with an engine: concurrent <= 0.5x sequential). The
server's log goes to --server-log (default: a temporary file), never to an unread pipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._args import above, at_least  # noqa: E402

PRESETS = ("default", "tiny")  # citeqa.config's (not imported: the server runs apart)
QUESTIONS = [
    "What does citeqa return with an answer?",
    "When does citeqa decline to answer?",
    "How are passages retrieved?",
    "Which models does citeqa use?",
    "How is a quote checked against its source?",
    "What is reciprocal rank fusion?",
    "How are documents split into passages?",
    "What does the reward model score?",
]


@dataclass
class LevelResult:
    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # successful answers only
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "503", "timeout", ...
    declines: int = 0
    rss_kb: int = 0

    @property
    def answers(self) -> int:
        return self.statuses["200"]

    @property
    def throughput(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]): the smallest value with at least q % of the
    values at or below it; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` from /proc, in kB (psutil is not needed)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def index_for(index: Path | None, preset: str) -> tuple[Path, Path | None]:
    """(the index to serve, a scratch directory to delete afterwards or None): ``index`` when
    given; else index/default for the default preset, or a temporary one for another preset
    (never a tiny index where the real one belongs). Built from index/corpus when missing."""
    scratch = None
    if index is None:
        if preset == "default":
            index = ROOT / "index" / "default"
        else:
            scratch = Path(tempfile.mkdtemp(prefix="citeqa-bench-"))
            index = scratch / "index"
    try:
        ensure_index(index, preset)
    except BaseException:
        if scratch is not None:  # (it was left behind)
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return index, scratch


def cpu_model() -> str | None:
    """The CPU's model name (Linux), for the record of a run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def own_checkout(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child that runs this checkout's citeqa, not the one installed (a
    worktree's before/after would measure the same code)."""
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path}


def ensure_index(index: Path, preset: str) -> None:
    if (index / "manifest.json").is_file():
        return
    print(f"building {index} from index/corpus ({preset} preset) ...", flush=True)
    subprocess.run([sys.executable, "-m", "citeqa.cli", "index", "build",
                    str(ROOT / "index" / "corpus"), "--out", str(index), "--preset", preset],
                   check=True, env=own_checkout(dict(os.environ)))


def start_server(index: Path, preset: str, port: int, env: dict[str, str], log: Path,
                 ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "citeqa.cli", "serve", "--index", str(index), "--host",
           "127.0.0.1", "--port", str(port), "--preset", preset]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=own_checkout(env), stdout=out,
                                stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful drain), then a kill after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n"
                             f"{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s")


def burst(url: str, n: int) -> tuple[float, float, list[int]]:
    """(seconds for ``n`` questions one after another, seconds for the same ``n`` at once,
    the statuses of both)."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    with httpx.Client(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        statuses = [http.post("/v1/answer", json={"question": q}).status_code
                    for q in questions]
        sequential = time.perf_counter() - t0

    def one(q: str) -> int:
        with httpx.Client(base_url=url, timeout=600) as http:
            return http.post("/v1/answer", json={"question": q}).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        threads_out = list(pool.map(one, questions))
    concurrent = time.perf_counter() - t0
    return sequential, concurrent, statuses + threads_out


def ask_until(url: str, first: int, step: int, stop_at: float,
              record: Callable[[str, float, bool], None]) -> None:
    """Ask QUESTIONS[first], [first + step], ... back to back until ``stop_at`` and ``record``
    each outcome (status, seconds, declined). A 503 waits a little, as a client should."""
    with httpx.Client(base_url=url, timeout=300) as http:
        n = first
        while time.monotonic() < stop_at:
            question = QUESTIONS[n % len(QUESTIONS)]
            n += step
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/answer", json={"question": question})
                status = str(r.status_code)
                declined = r.status_code == 200 and bool(r.json().get("declined"))
            except httpx.TimeoutException:
                status, declined = "timeout", False
            except httpx.TransportError as e:
                status, declined = type(e).__name__, False
            record(status, time.perf_counter() - t0, declined)
            if status == "503":
                time.sleep(0.2)


def run_level(url: str, clients: int, seconds: float, pid: int) -> LevelResult:
    result = LevelResult(clients, seconds)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def record(status: str, dt: float, declined: bool) -> None:
        with lock:
            result.statuses[status] += 1
            if status == "200":
                result.latencies.append(dt)
                result.declines += int(declined)

    def client(i: int) -> None:
        ask_until(url, i, clients, stop_at, record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - t0  # includes the last in-flight requests
    result.rss_kb = proc_memory_kb(pid)["VmRSS"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, help="index directory; default index/default (built "
                    "when missing), or a temporary one for another preset")
    ap.add_argument("--preset", default="default", choices=PRESETS,
                    help="default (real models) or tiny")
    ap.add_argument("--seconds", type=above(0), default=60.0, help="per concurrency level")
    ap.add_argument("--levels", type=at_least(1), nargs="+", default=[1, 4, 16])
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--generator-url", help="serve through this remote engine (vLLM)")
    ap.add_argument("--burst", type=int, default=0,
                    help="first time N requests sequential vs concurrent (0 = skip)")
    ap.add_argument("--server-log", type=Path, help="the server's log (default: a temp file)")
    ap.add_argument("--port", type=int, help="the server's port (default: a free one)")
    args = ap.parse_args(argv)

    args.index, scratch = index_for(args.index, args.preset)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    # Enough queue for the biggest level, so 503s mean real overload, not a small default.
    env = {**os.environ, "CITEQA_MAX_QUEUE": str(max(32, 2 * max(args.levels)))}
    if args.generator_url:
        env["CITEQA_GENERATOR_URL"] = args.generator_url
    log = args.server_log or Path(tempfile.mkstemp(prefix="citeqa-load-", suffix=".log")[1])
    print(f"server log: {log}", flush=True)
    proc = start_server(args.index, args.preset, port, env, log)
    bursts = None
    try:
        ready_s = wait_ready(url, proc, args.ready_timeout, log)
        index_version = httpx.get(url + "/readyz", timeout=30).json().get("index_version")
        start_mem = proc_memory_kb(proc.pid)
        print(f"server pid {proc.pid} ready in {ready_s:.1f} s; RSS {start_mem['VmRSS'] / 1024:.0f}"
              f" MiB", flush=True)
        httpx.post(url + "/v1/answer", json={"question": QUESTIONS[0]}, timeout=300)  # warm-up
        if args.burst:
            seq, conc, statuses = burst(url, args.burst)
            bursts = {"n": args.burst, "sequential_s": seq, "concurrent_s": conc,
                      "ratio": conc / seq, "statuses": dict(Counter(map(str, statuses)))}
            print(f"{args.burst} requests: one after another {seq:.1f} s, at once {conc:.1f} s "
                  f"-> {conc / seq:.2f}x (statuses {bursts['statuses']})", flush=True)
        results = []
        for clients in args.levels:
            r = run_level(url, clients, args.seconds, proc.pid)
            results.append(r)
            errors = {k: v for k, v in r.statuses.items() if k not in ("200", "503")}
            print(f"{clients:>3} clients: {r.throughput:6.2f} answers/s  "
                  f"p50 {percentile(r.latencies, 50):6.2f} s  "
                  f"p95 {percentile(r.latencies, 95):6.2f} s  answers {r.answers} "
                  f"(declined {r.declines})  503 {r.statuses['503']}  errors {errors or 0}  "
                  f"RSS {r.rss_kb / 1024:.0f} MiB", flush=True)
        end_mem = proc_memory_kb(proc.pid)
    finally:
        stop_server(proc)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    base = next((r.throughput for r in results if r.clients == 1), float("nan"))
    top = max(results, key=lambda r: r.clients)  # the largest level, wherever it was listed
    ratio = top.throughput / base if base else float("nan")
    print(f"RSS start {start_mem['VmRSS'] / 1024:.0f} MiB, end {end_mem['VmRSS'] / 1024:.0f} MiB, "
          f"peak (VmHWM) {end_mem['VmHWM'] / 1024:.0f} MiB")
    target = "target >= 2" if top.clients == 16 else "the target, >= 2, is at 16 clients"
    print(f"throughput({top.clients}) / throughput(1) = {ratio:.2f} ({target})")
    if args.json:
        args.json.write_text(json.dumps({
            "levels": [{"clients": r.clients, "seconds": r.seconds,
                        "answers_per_s": r.throughput, "p50_s": percentile(r.latencies, 50),
                        "p95_s": percentile(r.latencies, 95), "statuses": dict(r.statuses),
                        "declines": r.declines, "rss_kb": r.rss_kb} for r in results],
            "rss_start_kb": start_mem["VmRSS"], "rss_end_kb": end_mem["VmRSS"],
            "rss_peak_kb": end_mem["VmHWM"], "ratio": ratio, "ready_s": ready_s,
            "burst": bursts, "generator_url": args.generator_url,
            # what was measured: a tiny preset's figures must not pass for the real models'
            "preset": args.preset, "index": str(args.index), "index_version": index_version,
            "generator": env.get("CITEQA_GENERATOR"), "cpu": cpu_model(),
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
