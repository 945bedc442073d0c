"""Soak test of the real server: `citeqa serve` in a subprocess, N concurrent clients for M minutes,
the server's memory sampled all along. Does a long run leak?

    python benchmarks/soak.py                                  # real models, 16 clients, 10 min
    python benchmarks/soak.py --preset tiny --minutes 0.5 --sample-s 5 --warmup-s 5  # quick check

Starts the server on 127.0.0.1 over --index (built from index/corpus first when missing), waits
for /readyz, then runs --clients threads asking questions back to back (httpx) for --minutes.
Every --sample-s seconds (default a minute) it reads the server's RSS (VmRSS in
/proc/PID/status) and the statuses answered since the last sample. Prints a table, the totals
by status and the memory verdict, and writes them to --out (default a scratch file,
.cache/bench/soak.json; the committed run is evals/results/soak.json).

Verdict: memory is flat when no sample after the warm-up (--warmup-s, default the first minute)
exceeds the first sample at or after it by more than 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._args import above, at_least  # noqa: E402
from benchmarks.load_test import (  # noqa: E402
    PRESETS,
    ask_until,
    free_port,
    index_for,
    proc_memory_kb,
    start_server,
    stop_server,
    wait_ready,
)
from citeqa.evals.metrics import percentile  # noqa: E402

GROWTH_LIMIT = 0.10  # more RSS growth than this after the warm-up is a leak


@dataclass
class Sample:
    t_s: float  # seconds since the clients started
    rss_kb: int
    statuses: dict[str, int]  # answered since the previous sample, by status


@dataclass
class Tally:
    """What the clients saw, shared between their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)  # since the last sample
    total: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # successful answers, seconds

    def add(self, status: str, seconds: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.total[status] += 1
            if status == "200":
                self.latencies.append(seconds)

    def take(self) -> dict[str, int]:
        """The statuses since the last call."""
        with self.lock:
            out, self.statuses = dict(self.statuses), Counter()
        return out


def memory_verdict(samples: list[tuple[float, int]], warmup_s: float,
                   limit: float = GROWTH_LIMIT) -> tuple[bool | None, float | None, str]:
    """(flat, growth, sentence) from (seconds, RSS) samples: the baseline is the first sample at
    or after ``warmup_s``; flat when no later sample exceeds it by more than ``limit``. ``flat``
    and ``growth`` are None when the run has no sample after its baseline."""
    after = [rss for t, rss in samples if t >= warmup_s]
    if len(after) < 2:
        return None, None, (f"no verdict: fewer than two samples after the {warmup_s:g} s "
                            "warm-up; run longer")
    base, peak = after[0], max(after[1:])
    growth = peak / base - 1
    flat = growth <= limit
    what = "flat" if flat else "GROWING"
    return flat, growth, (f"memory {what}: peak {peak / 1024:.0f} MiB after the warm-up is "
                          f"{growth:+.1%} over the {base / 1024:.0f} MiB baseline "
                          f"(limit {limit:+.0%})")


def soak(url: str, pid: int, *, clients: int, seconds: float, sample_s: float) -> tuple[
        list[Sample], Tally]:
    """Run ``clients`` threads for ``seconds``, sampling the server's RSS every ``sample_s``."""
    tally = Tally()
    start = time.monotonic()
    stop_at = start + seconds
    def record(status: str, dt: float, _declined: bool) -> None:
        tally.add(status, dt)

    threads = [threading.Thread(target=ask_until, args=(url, i, clients, stop_at, record),
                                daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    samples = [Sample(0.0, proc_memory_kb(pid)["VmRSS"], {})]
    print_row(samples[0])
    while (now := time.monotonic()) < stop_at:
        time.sleep(min(sample_s, stop_at - now))
        samples.append(Sample(time.monotonic() - start, proc_memory_kb(pid)["VmRSS"],
                              tally.take()))
        print_row(samples[-1])
    for t in threads:
        t.join()
    return samples, tally


def print_row(s: Sample) -> None:
    errors = {k: v for k, v in s.statuses.items() if k != "200"}
    print(f"{s.t_s:8.0f} s  RSS {s.rss_kb / 1024:8.1f} MiB  answers {s.statuses.get('200', 0):6d}"
          f"  other {errors or '-'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=above(0), default=10.0, help="how long the clients ask")
    ap.add_argument("--clients", type=at_least(1), default=16, help="concurrent clients")
    ap.add_argument("--index", type=Path, help="index directory; default index/default (built "
                    "when missing), or a temporary one for another preset")
    ap.add_argument("--preset", default="default", choices=PRESETS,
                    help="default (real models) or tiny")
    ap.add_argument("--port", type=int, default=0, help="server port; 0 = a free one")
    ap.add_argument("--sample-s", type=at_least(0.1, float), default=60.0,
                    help="seconds between RSS samples")
    ap.add_argument("--warmup-s", type=at_least(0, float), default=60.0,
                    help="warm-up before the baseline")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "soak.json",
                    help="where to write the figures (default: a scratch file; evals/results/ "
                    "holds the committed ones)")
    args = ap.parse_args(argv)

    args.index, scratch = index_for(args.index, args.preset)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    # Enough queue for every client, so 503s mean real overload, not a small default.
    env = {**os.environ, "CITEQA_MAX_QUEUE": str(max(32, 2 * args.clients))}
    log = Path(tempfile.mkstemp(prefix="citeqa-soak-", suffix=".log")[1])
    proc = start_server(args.index, args.preset, port, env, log)
    print(f"server log: {log}", flush=True)
    try:
        ready_s = wait_ready(url, proc, args.ready_timeout, log)
        print(f"server pid {proc.pid} ready in {ready_s:.1f} s; {args.clients} clients for "
              f"{args.minutes:g} min", flush=True)
        samples, tally = soak(url, proc.pid, clients=args.clients, seconds=args.minutes * 60,
                              sample_s=args.sample_s)
        peak_kb = proc_memory_kb(proc.pid)["VmHWM"]
    finally:
        stop_server(proc)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    flat, growth, verdict = memory_verdict([(s.t_s, s.rss_kb) for s in samples], args.warmup_s)
    total = dict(tally.total)
    p50, p95 = ((percentile(tally.latencies, q) for q in (50, 95)) if tally.latencies
                else (None, None))
    print(f"statuses: {total}")
    print(f"answers: {total.get('200', 0)}, p50 {p50 or 0:.2f} s, p95 {p95 or 0:.2f} s; "
          f"peak RSS (VmHWM) {peak_kb / 1024:.0f} MiB")
    print(verdict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "preset": args.preset, "index": str(args.index), "clients": args.clients,
        "minutes": args.minutes, "sample_s": args.sample_s, "warmup_s": args.warmup_s,
        "ready_s": ready_s,
        "samples": [{"t_s": round(s.t_s, 1), "rss_kb": s.rss_kb, "statuses": s.statuses}
                    for s in samples],
        "statuses": total, "p50_s": p50, "p95_s": p95, "rss_peak_kb": peak_kb,
        "growth": growth, "flat": flat, "verdict": verdict,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
