"""Comparing two evaluation runs: a side-by-side table of key metrics with deltas, how many of
the questions both asked changed their given answer, decline or best candidate, and an overlay
of their accuracy–coverage curves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from citeqa.errors import ConfigError
from citeqa.evals.runner import METRICS, PREDICTIONS, RUN_JSON, read_predictions

# (label, path into metrics.json, "pct" | "num" | "ms", higher is better)
KEY_METRICS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("questions", ("questions",), "int", True),
    ("SQuAD EM", ("squad", "exact"), "pct", True),
    ("SQuAD F1", ("squad", "f1"), "pct", True),
    ("accuracy (all)", ("accuracy",), "pct", True),
    ("answered accuracy @ threshold", ("at_threshold", "answered_accuracy"), "pct", True),
    ("coverage @ threshold", ("at_threshold", "coverage"), "pct", True),
    ("unanswerable declined", ("unanswerable_declined",), "pct", True),
    ("AURC (RM score)", ("selective", "rm", "aurc"), "num", False),
    ("acc @ 50% cov (RM)", ("selective", "rm", "accuracy_at_coverage", "50%"), "pct", True),
    ("cov @ 80% acc (RM)", ("selective", "rm", "coverage_at_accuracy", "80%"), "pct", True),
    ("cov @ 90% acc (RM)", ("selective", "rm", "coverage_at_accuracy", "90%"), "pct", True),
    ("quote validity", ("quotes", "valid"), "pct", True),
    ("quote contains gold", ("quotes", "contains_gold"), "pct", True),
    ("ECE", ("calibration", "ece"), "num", False),
    ("recall@5", ("retrieval", "recall@5"), "pct", True),
    ("latency p50", ("latency_ms", "p50"), "ms", False),
    ("latency p95", ("latency_ms", "p95"), "ms", False),
)


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, run_info)`` of a finished run directory; ConfigError when it is not one."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (run_dir / RUN_JSON).is_file():  # begun by `citeqa eval`, never finished
            raise ConfigError(
                f"{run_dir} is a run that has not finished (no {METRICS} yet); run the same "
                "`citeqa eval` command again to finish it") from None
        raise ConfigError(
            f"{run_dir} has no {METRICS}; pass a directory written by `citeqa eval --out`"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{run_dir / METRICS} is not valid JSON ({e}); rerun the eval") from e
    if not isinstance(metrics, dict) or not all(
            isinstance(metrics.get(path[0], {}), dict) for _, path, *_ in KEY_METRICS[1:]
            if len(path) > 1):
        raise ConfigError(f"{run_dir / METRICS} is not the metrics `citeqa eval` writes (a JSON "
                          "object of sections); rerun the eval")
    try:
        run = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        run = {}
    return metrics, run


def _get(m: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(m, dict) or key not in m:
            return None
        m = m[key]
    # (a value that is no number is not shown: a hand-edited file, or another tool's)
    return float(m) if isinstance(m, int | float) and not isinstance(m, bool) else None


def _fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * x:.1f}%"
    if kind == "ms":
        return f"{x:.0f} ms"
    if kind == "int":
        return f"{x:.0f}"
    return f"{x:.3f}"


def _delta(a: float | None, b: float | None, kind: str, higher_better: bool) -> str:
    if a is None or b is None:
        return ""
    d = b - a
    text = {"pct": f"{100 * d:+.1f} pt", "ms": f"{d:+.0f} ms", "int": f"{d:+.0f}"}.get(
        kind, f"{d:+.3f}"
    )
    if not any(c in "123456789" for c in text):  # no change at this precision: "+0", unmarked
        return text.replace("-", "+", 1)
    if kind == "int":
        return text
    return text + (" (better)" if (d > 0) == higher_better else " (worse)")


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """A plain-text table: metric, run A, run B, B - A (with better/worse)."""
    rows = [("metric", name_a, name_b, "delta (B - A)")]
    for label, path, kind, higher in KEY_METRICS:
        va, vb = _get(a, path), _get(b, path)
        rows.append((label, _fmt(va, kind), _fmt(vb, kind), _delta(va, vb, kind, higher)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def covered_predictions(run_dir: Path, metrics: dict[str, Any] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """A run's prediction records by question id, of the questions its metrics cover
    (``question_ids`` of ``metrics``, read from metrics.json when not given):
    predictions.jsonl, or the .gz copy that evals/regenerate.sh commits (empty when it has
    neither). ``run_dir`` may also name a predictions file (.jsonl or .jsonl.gz) itself, read
    as it is (ConfigError when it is not there): the metrics are then those beside it."""
    named = Path(run_dir)
    if named.suffix in (".jsonl", ".gz"):
        if not named.is_file():
            raise ConfigError(f"{named} is not a file; pass a run's predictions.jsonl")
        path, run_dir = named, named.parent
    else:
        path = named / PREDICTIONS
        if not path.is_file():
            path = path.with_suffix(".jsonl.gz")  # the copy evals/regenerate.sh commits
    if path.suffix == ".gz" and path.is_file():
        import gzip
        import zlib

        from citeqa.journal import records_in

        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as e:  # (BadGzipFile is an OSError)
            raise ConfigError(f"{path} is not a whole gzip file ({e}); gzip the run's "
                              f"{PREDICTIONS} again") from e
        records, _ = records_in(data, path, what="prediction record",
                                remedy=f"gzip the run's {PREDICTIONS} again")
    elif path.is_file():
        records, _ = read_predictions(path)
    else:
        return {}
    by_id = {str(r["id"]): r for r in records}
    if metrics is None:
        try:
            metrics = json.loads((Path(run_dir) / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = None
    # the questions its metrics cover (runs before this was recorded: all of them)
    ids = metrics.get("question_ids") if isinstance(metrics, dict) else None
    if isinstance(ids, list):
        by_id = {k: by_id[k] for k in map(str, ids) if k in by_id}
    return by_id


def prediction_changes(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]
                       ) -> dict[str, int]:
    """Over the questions both runs' records (``covered_predictions``) hold: how many changed
    their given answer, their decline and their best candidate's answer."""
    common = sorted(set(a) & set(b))

    def best(r: dict[str, Any]) -> str | None:
        first = (r.get("candidates") or [None])[0]
        return first.get("answer") if isinstance(first, dict) else None

    return {
        "questions_in_both": len(common),
        "given_answer_changed": sum(a[k].get("answer") != b[k].get("answer") for k in common),
        "decline_changed": sum(a[k].get("declined") != b[k].get("declined") for k in common),
        "best_candidate_changed": sum(best(a[k]) != best(b[k]) for k in common),
    }


def compare_runs(run_a: Path, run_b: Path, png: Path | None = None) -> str:
    """The comparison table of two run directories; writes the curve overlay to ``png`` if
    one is given."""
    from citeqa.evals import plots

    ma, info_a = load_run(run_a)
    mb, info_b = load_run(run_b)
    name_a, name_b = Path(run_a).name or str(run_a), Path(run_b).name or str(run_b)
    if name_a == name_b:
        name_a, name_b = f"A: {run_a}", f"B: {run_b}"
    if png is not None:
        curves = {}
        for name, m in ((name_a, ma), (name_b, mb)):
            rm = m.get("selective", {}).get("rm")
            curve = rm.get("curve") if isinstance(rm, dict) else None
            if curve:
                curves[f"{name} (RM score)"] = curve
        plots.accuracy_coverage(curves, None, png,
                                title="Accuracy–coverage: RM score, two runs")
    records = covered_predictions(run_a, ma), covered_predictions(run_b, mb)  # read once
    changes = prediction_changes(*records)
    have = [bool(r) for r in records]
    lines = [compare_table(ma, mb, name_a, name_b)]
    shas = [(info.get("identity") or {}).get("dataset_sha256") for info in (info_a, info_b)]
    counts = [int(_get(m, ("questions",)) or 0) for m in (ma, mb)]
    if None not in shas and shas[0] != shas[1]:
        lines.insert(0, "warning: the two runs asked different datasets (their run.json "
                        "sha256 differ), so the deltas compare different questions\n")
    elif not all(have):
        lines.insert(0, "note: a run has no predictions beside its metrics, so which questions "
                        "both asked is unknown\n")
    elif (both := changes["questions_in_both"]) < max(counts):
        lines.insert(0, f"warning: the runs share only {both} question{'' if both == 1 else 's'} "
                        f"({counts[0]} and {counts[1]} asked; another --split, --limit or "
                        "--sample?), so the deltas compare different questions\n")
    if changes["questions_in_both"]:
        lines.append(
            f"\nof {changes['questions_in_both']} questions in both: given answer changed "
            f"{changes['given_answer_changed']}, decline changed {changes['decline_changed']}, "
            f"best candidate changed {changes['best_candidate_changed']}"
        )
    n = max(counts)
    lines.append(
        "\n(better) / (worse) give a delta's direction, not its significance"
        + (f": over {n} questions one question moves a share by {100 / n:.2f} pt or more (a "
           "share of fewer, e.g. the answered ones, by more)" if n else "")
        + "; evals/eval_paired.py gives paired 95 % intervals")
    return "\n".join(lines)
