"""Evaluation figures as PNG files (matplotlib, headless Agg backend).

Each function takes plain data (as stored in metrics.json) and a path, draws one figure and
closes it; nothing is shown on screen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402

DPI = 120
SIZE = (6.4, 4.8)  # inches


def _save(fig: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _steps(curve: Mapping[str, Sequence[float]]) -> tuple[list[float], list[float]]:
    # Start each curve at its first point's accuracy from coverage 0 so short curves show; drawn
    # with where="pre", each stretch (c[i-1], c[i]] shows acc[i]: what the table's "accuracy at
    # coverage c" reads (the smallest point covering c), not the previous point's accuracy
    cov, acc = list(curve["coverage"]), list(curve["accuracy"])
    return [0.0, *cov], [acc[0], *acc]


def accuracy_coverage(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    always_answer: float | None,
    path: Path,
    *,
    title: str = "Accuracy–coverage",
) -> None:
    """Answered accuracy against coverage, one step curve per scorer, plus always-answer."""
    fig, ax = plt.subplots(figsize=SIZE)
    for i, (label, curve) in enumerate(curves.items()):
        if curve["coverage"]:
            x, y = _steps(curve)
            # thinner and dashed in turn, so curves that coincide stay visible
            style = ("-", "-.", ":")[i % 3]
            width = max(3.0 - 0.8 * i, 1.2)
            ax.step(x, y, where="pre", label=label, linewidth=width, linestyle=style)
    if always_answer is not None:
        ax.axhline(always_answer, color="grey", linestyle="--", label="always answer")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.02, 1.02)  # lines at 0 or 1 stay visible
    ax.set_xlabel("coverage (share of questions answered)")
    ax.set_ylabel("answered accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def reliability(bins: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with counts."""
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    full = [b for b in bins if b["count"]]
    if full:
        width = full[0]["hi"] - full[0]["lo"]
        ax.bar(
            [b["lo"] for b in full],
            [b["accuracy"] for b in full],
            width=width,
            align="edge",
            alpha=0.6,
            edgecolor="black",
            label="accuracy in bin",
        )
        ax.plot(
            [b["mean_confidence"] for b in full],
            [b["accuracy"] for b in full],
            "o-",
            color="C3",
            label="mean score vs accuracy",
        )
        for b in full:
            ax.annotate(
                str(b["count"]),
                ((b["lo"] + b["hi"]) / 2, b["accuracy"]),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
            )
    else:
        ax.text(0.5, 0.5, "no scored questions", ha="center", va="center")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("score (predicted probability of correct)")
    ax.set_ylabel("would-be accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def recall_at_k(recall: Mapping[int, float | None], path: Path, *, title: str) -> None:
    """Retrieval recall@k as a line over k."""
    fig, ax = plt.subplots(figsize=SIZE)
    ks = [k for k, v in recall.items() if v is not None]
    if ks:
        ax.plot(ks, [float(recall[k] or 0.0) for k in ks], "o-", label="gold paragraph in top k")
        for k in ks:
            ax.annotate(
                f"{recall[k]:.2f}",
                (k, recall[k]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        ax.set_xticks(ks)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no questions with a known gold paragraph",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("recall@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def rate_vs_threshold(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    marker: float | None = None,
) -> None:
    """One line per name: ``(thresholds, rates)``, e.g. the share of unanswerable questions
    still answered at each decline threshold; ``marker`` draws the served threshold."""
    fig, ax = plt.subplots(figsize=SIZE)
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), label=name, linewidth=1.4)
    if marker is not None:
        ax.axvline(marker, color="grey", linestyle=":", linewidth=1, label="served threshold")
    ax.set_xlabel("decline threshold (answer when score >= threshold)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
