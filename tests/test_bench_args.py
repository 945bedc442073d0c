"""The benchmark scripts' shared argument checks and load_test's percentile: a bad value is a
one-line error before any model or server starts (it was a traceback after, or a figure of
nothing), and a percentile is the nearest rank its docstring says."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._args import above, at_least  # noqa: E402
from benchmarks.load_test import percentile  # noqa: E402


def test_at_least_and_above_refuse_what_is_out_of_range() -> None:
    assert at_least(1)("3") == 3 and at_least(0, float)("0.5") == 0.5
    for parse, text in ((at_least(1), "0"), (at_least(1), "2.5"), (at_least(1), "x"),
                        (at_least(0.1, float), "nan"), (above(0), "0"), (above(0), "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_percentile_is_the_nearest_rank() -> None:
    """round() took .5 to the even rank: the p50 of [1, 2] was 2, the p95 of 20 values the
    largest."""
    assert percentile([1, 2], 50) == 1
    assert percentile(list(range(1, 21)), 95) == 19
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([5.0], 50) == 5.0 and percentile([3, 1, 2], 100) == 3


@pytest.mark.parametrize("argv", [
    ["benchmarks/load_test.py", "--levels", "0"],
    ["benchmarks/load_test.py", "--seconds", "-5"],
    ["benchmarks/load_test.py", "--preset", "nosuch"],
    ["benchmarks/soak.py", "--sample-s", "0"],
    ["benchmarks/bench_reward.py", "--candidates", "0,8"],
    ["benchmarks/bench_reward.py", "--rounds", "0"],
    ["benchmarks/bench_removed.py", "--shares", "0.3"],
    ["benchmarks/bench_retrieval.py", "--reference-queries", "0"],
    ["benchmarks/bench_dtype.py", "--threads", "0"],
])
def test_a_bad_option_is_refused_before_anything_starts(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "error: argument" in r.stderr, r.stderr[-500:]
    assert "Traceback" not in r.stderr
