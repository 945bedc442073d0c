"""The evaluation run: ask every question of a dataset, append predictions, resume after a crash.

An output directory holds::

    run.json           what the run is: settings, dataset sha256, index manifest, models, git rev
    predictions.jsonl  one line per question, appended (flushed and fsynced) as it is answered
    metrics.json       the aggregated metrics (citeqa/evals/report.py)
    report.md          the report, with the figures below
    *.png              accuracy–coverage, reliability diagram, retrieval recall@k

A run restarted on the same ``--out`` skips the questions already in predictions.jsonl (a
truncated last line is dropped and redone). It refuses to resume into a directory made with
other settings or another dataset: ``force=True`` starts over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from citeqa.atomic import write_text_atomic
from citeqa.config import MAX_PASSAGES
from citeqa.errors import CiteqaError, ConfigError, EngineUnavailableError
from citeqa.evals.metrics import REFUSED, threshold_json
from citeqa.evals.squad import QAItem, articles_for_split, load_questions, split_warning
from citeqa.journal import (
    append_record,
    check_identity,
    has_records,
    read_records,
    resume,
    run_lock,
)
from citeqa.pipeline import STAND_IN_NOTE, Pipeline
from citeqa.retrieval.store import MANIFEST, how_to_build, sha256_file
from citeqa.reward.provenance import digests_aside
from citeqa.types import Answer, Document, Hit

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
REPORT = "report.md"
RETRIEVAL_DEPTH = MAX_PASSAGES  # passages retrieved per question for the gold-paragraph rank
STAND_IN_SCORER = "generator confidence (stand-in)"
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunSpec:
    """What defines a run: resuming is allowed only into a directory with the same spec."""

    dataset: Path  # SQuAD v1/v2 JSON or JSONL questions
    index: Path  # index directory the pipeline searches
    preset: str = "default"  # named settings preset (citeqa/config.py)
    split: str | None = None  # restrict to the articles of a project split; None = all
    min_score: float | None = None  # decline threshold; None = the pipeline's configured one
    n_candidates: int | None = None  # samples per question; None = the preset's
    answer_mode: str | None = None  # "span" | "free"; None = the preset's


@dataclass(frozen=True)
class RunResult:
    """What one invocation did."""

    out: Path
    questions: int  # questions selected (after --split and --limit / --sample)
    answered_now: int  # questions asked in this invocation
    resumed: int  # questions found already done in predictions.jsonl
    metrics: dict[str, Any]


# --- run.json ---------------------------------------------------------------------------------


def identity(spec: RunSpec, dataset_sha256: str, manifest_sha256: str) -> dict[str, Any]:
    """The part of run.json that must match to resume (``--limit``/``--sample`` are not)."""
    return {
        "dataset_sha256": dataset_sha256,
        "index_manifest_sha256": manifest_sha256,
        "preset": spec.preset,
        "split": spec.split,
        "min_score": spec.min_score,
        "n_candidates": spec.n_candidates,
        # None (the preset's) when not given, as runs from before the option stored it (absent)
        "answer_mode": spec.answer_mode,
    }


def check_resumable(out: Path, ident: dict[str, Any]) -> None:
    """Raise ConfigError when ``out`` holds a run made with another identity."""
    from citeqa.evals.report import FIGURES

    check_identity(Path(out) / RUN_JSON, Path(out) / PREDICTIONS, ident,
                   remedy="pass --force to start over there, or choose another --out",
                   outputs=(METRICS, REPORT, *FIGURES.values()))


def git_revision(root: Path = _ROOT) -> str:
    """``git rev-parse HEAD`` of the source tree, or "unknown": also where ``root`` is no
    checkout's top (an installed citeqa, in a venv inside a user's own repository, recorded
    that repository's commit)."""
    if not (root / ".git").exists():  # (a file in a worktree)
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = done.stdout.strip()
    return rev if done.returncode == 0 and rev else "unknown"


def scorer_name(pipeline: Pipeline) -> str:
    """Which scorer produced ``Answer.score``."""
    if pipeline.scorer is None:
        return STAND_IN_SCORER
    return str(getattr(pipeline.scorer, "name", None) or type(pipeline.scorer).__name__)


def describe_pipeline(pipeline: Pipeline, min_score: float | None,
                      n_candidates: int | None = None,
                      answer_mode: str | None = None) -> dict[str, Any]:
    """Models, scorer and threshold of a pipeline asked with these options, for run.json and
    the report."""
    scorer = scorer_name(pipeline)
    return {
        "generator_model_id": pipeline.generator.backend.model_id,
        "scorer": scorer,
        "scorer_note": STAND_IN_NOTE if pipeline.scorer is None else None,
        # the pipeline's own rule, not a copy
        "threshold": threshold_json(pipeline.decline_threshold(min_score)),
        "calibration_note": pipeline.calibration_warning(n_candidates=n_candidates,
                                                         answer_mode=answer_mode),
        "config": _without_secrets(_resolved_paths(_finite_json(asdict(pipeline.cfg)))),
    }


# What must match between a run's invocations besides its identity: the models and the
# decline rule, which come from CITEQA_* settings (adapter, reward model, generator) as well as
# from options. Settings of speed alone change no output, and a model directory may be named by
# other paths (the model id holds the adapter's hash). A remote engine's address and the name
# it serves the model under are in the generator's id as what they resolve to (the name, and
# where the engine loaded it): an engine restarted on another port, or its one model named,
# serves the same system.
_SYSTEM_KEYS = ("generator_model_id", "scorer", "threshold")
_NOT_COMPARED = frozenset({"threads", "concurrency", "compile", "url", "served_model"})
_PATHS = frozenset({"model", "adapter"})  # recorded resolved: one directory, one name
_COMPILED = ", compiled"  # a compiled scorer's name ends so (reward/scorer.py)
_DTYPES = re.compile(r"bf16-int8w|fp16-linear|fp16w|bf16|fp32")  # in model ids and scorer names


def check_same_system(out: Path, stored: dict[str, Any], now: dict[str, Any], *,
                      remedy: str = "pass --force to start over there, or choose another --out",
                      ) -> None:
    """Raise ConfigError when the run in ``out`` was made by another system than ``now``
    (``describe_pipeline``'s): resuming would mix two systems' answers in one run."""
    def system(desc: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for name, part in (desc.get("config") or {}).items():
            if isinstance(part, dict):  # a copy: ``desc`` is written to run.json as it is
                part = {k: v for k, v in part.items() if k not in _NOT_COMPARED}
            config[name] = part
        found = {k: desc.get(k) for k in _SYSTEM_KEYS}
        found["scorer"] = str(found["scorer"]).removesuffix(_COMPILED)  # speed alone
        return {**found, "config": config}

    before, after = system(stored), system(now)
    if isinstance(before["generator_model_id"], str) and isinstance(
            after["generator_model_id"], str):  # a run made before folders' ids had a digest
        before["generator_model_id"], after["generator_model_id"] = digests_aside(
            before["generator_model_id"], after["generator_model_id"])
    diff = [k for k in (*_SYSTEM_KEYS, "config") if before[k] != after[k]]
    if diff:
        what = "; ".join(
            f"{k}: was {before[k]!r}, now {after[k]!r}" if k != "config" else
            "config: " + ", ".join(_config_changes(before[k], after[k])) for k in diff)
        dtype_only = all(_DTYPES.sub("", str(before[k])) == _DTYPES.sub("", str(after[k]))
                         for k in ("generator_model_id", "scorer"))
        probe = ("; with CITEQA_CPU_DTYPE=auto (the default) a timed probe picks the compute "
                 "type at start, so pin it (e.g. CITEQA_CPU_DTYPE=bf16) to resume on a busy "
                 "machine" if dtype_only and {"generator_model_id", "scorer"} & set(diff)
                 else "")
        raise ConfigError(
            f"{out} holds a run made by another system ({what}): a CITEQA_* setting (adapter, "
            f"reward model, generator, compute type) or the code changed since{probe}; {remedy}"
        )


def _config_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} was {a!r}, now {b!r}")
    return out


def _without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a remote generator's ``user:password@`` left out of its URL: run.json is
    a file people share."""
    from citeqa.text import without_userinfo

    generation = config.get("generation")
    if isinstance(generation, dict) and isinstance(generation.get("url"), str):
        config = {**config, "generation": {**generation,
                                           "url": without_userinfo(generation["url"])}}
    return config


def _resolved_paths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its model and adapter directories as absolute, resolved paths, so that
    a run names them the same from any working directory."""
    return {name: {k: os.path.realpath(v) if k in _PATHS and isinstance(v, str)
                   and os.path.isdir(v) else v for k, v in part.items()}
            if isinstance(part, dict) else part for name, part in config.items()}


def _finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float as a string ("inf", "-inf", "nan"): JSON has none."""
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The index manifest without its file checksums."""
    return {k: v for k, v in manifest.items() if k != "files"}


# --- predictions.jsonl ------------------------------------------------------------------------


_PREDICTION = {"what": "prediction record", "remedy": "pass --force to start over"}


def read_predictions(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a predictions file and the byte length they span (a cut last
    line dropped; a bad line before it raises ConfigError: ``journal.read_records``)."""
    return read_records(path, **_PREDICTION)


# --- one question -------------------------------------------------------------------------------


def passage_matches_context(hit: Hit, document: Document | None, context: str) -> bool:
    """Whether a retrieved passage is (part of) the gold paragraph ``context``.

    True when the passage's whole document is the context, or the passage text lies inside the
    context, or the context lies inside the passage (all after stripping outer whitespace).
    """
    ctx = context.strip()
    text = hit.passage.text.strip()
    if not ctx or not text:
        return False
    if document is not None and document.text.strip() == ctx:
        return True
    return text in ctx or ctx in text


def gold_rank(hits: Sequence[Hit], context: str, document: Callable[[str], Document]) -> int | None:
    """1-based rank of the first hit from the gold paragraph, None if none (or no context)."""
    if not context.strip():
        return None
    for rank, hit in enumerate(hits, 1):
        try:
            doc = document(hit.passage.doc_id)
        except KeyError:
            doc = None
        if passage_matches_context(hit, doc, context):
            return rank
    return None


def prediction_record(item: QAItem, answer: Answer, rank: int | None) -> dict[str, Any]:
    """One predictions.jsonl line: the dataset's id and golds, then ``Answer.to_json()``."""
    return {
        "id": item.id,
        "gold_answers": list(item.answers),
        "answerable": item.answerable,
        "article": item.article,
        **answer.to_json(with_candidates=True),
        "gold_rank": rank,
        "has_context": bool(item.context.strip()),
    }


def ask_one(pipeline: Pipeline, item: QAItem, n_candidates: int | None, min_score: float | None,
            answer_mode: str | None = None) -> dict[str, Any]:
    """Ask one question; a question the pipeline refuses (or its generator fails) becomes a
    recorded decline. A generator that cannot be reached now stops the run
    (EngineUnavailableError): recorded so, every later question would be a decline for good."""
    try:
        answer = pipeline.ask(item.question, n_candidates=n_candidates, min_score=min_score,
                              search_k=RETRIEVAL_DEPTH, answer_mode=answer_mode)
    except EngineUnavailableError:
        raise
    except CiteqaError as e:  # e.g. an over-long question: record it, keep going
        answer = Answer(
            question=item.question,
            declined=True,
            answer=None,
            quote=None,
            score=None,
            reason=f"{REFUSED}{e}",
        )
    rank = gold_rank(answer.passages, item.context, pipeline.document)
    return prediction_record(item, answer, rank)


# --- the run ------------------------------------------------------------------------------------


def load_items(spec: RunSpec) -> list[QAItem]:
    """The dataset's questions, restricted to ``spec.split`` when given."""
    articles = articles_for_split(spec.split) if spec.split else None
    items = load_questions(Path(spec.dataset), articles)
    warning = split_warning(items) if spec.split is None else None
    if warning:
        log.warning("%s", warning)
    return items


def prepare_out(out: Path, ident: dict[str, Any], *, force: bool) -> None:
    """Create ``out``, wiping a previous run when ``force``, else checking it is resumable."""
    out = Path(out)
    if force:
        from citeqa.evals.report import FIGURES

        for name in (RUN_JSON, PREDICTIONS, METRICS, REPORT, *FIGURES.values()):
            (out / name).unlink(missing_ok=True)  # (the run's own: a holiday.png is kept)
    else:
        check_resumable(out, ident)
    out.mkdir(parents=True, exist_ok=True)


def select_items(
    items: Sequence[QAItem], *, limit: int | None = None, sample: int | None = None, seed: int = 0
) -> list[QAItem]:
    """The questions a run asks: the first ``limit``, or a seeded random ``sample`` spread over
    the whole dataset (kept in dataset order). Samples nest: with the same seed, a larger sample
    holds every question of a smaller one, so a run resumes after growing it."""
    if limit is not None and sample is not None:
        raise ConfigError("pass --limit or --sample, not both")
    for flag, n in (("--limit", limit), ("--sample", sample)):
        if n is not None and n < 1:
            raise ConfigError(f"{flag} must be at least 1, got {n}")
    if limit is not None:
        return list(items[:limit])
    if sample is None:
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:sample])]


def run_eval(
    spec: RunSpec,
    out: Path,
    *,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    pipeline: Pipeline | None = None,
) -> RunResult:
    """Evaluate ``spec`` into ``out`` (resuming what is there) and write metrics, report, plots.

    ``limit`` / ``sample`` / ``seed``: which questions (after the split; see ``select_items``).
    ``pipeline``: use this one instead of loading ``Pipeline.from_settings`` (tests). Raises
    CiteqaError subclasses on bad input.
    """
    select_items([], limit=limit, sample=sample)  # check the flags before loading anything
    items = select_items(load_items(spec), limit=limit, sample=sample, seed=seed)
    manifest_path = Path(spec.index) / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{spec.index} {how_to_build(Path(spec.index))}")
    ident = identity(spec, sha256_file(spec.dataset), sha256_file(manifest_path))
    with run_lock(Path(out), "citeqa eval"):
        return _run_eval(spec, Path(out), items, ident, force=force, progress=progress,
                         pipeline=pipeline)


def _run_eval(spec: RunSpec, out: Path, items: list[QAItem], ident: dict[str, Any], *,
              force: bool, progress: bool, pipeline: Pipeline | None) -> RunResult:
    """``run_eval``'s work, with ``out`` held."""
    prepare_out(out, ident, force=force)

    if pipeline is None:
        from citeqa.config import Settings

        settings = Settings(preset=spec.preset, index=spec.index)  # type: ignore[arg-type,call-arg]
        pipeline = Pipeline.from_settings(settings)
        try:  # a remote engine's calls in flight end with it (Ctrl-C waited out their timeout)
            return _ask_all(spec, out, items, ident, pipeline, progress=progress)
        finally:
            pipeline.close()
    return _ask_all(spec, out, items, ident, pipeline, progress=progress)


def _ask_all(spec: RunSpec, out: Path, items: list[QAItem], ident: dict[str, Any],
             pipeline: Pipeline, *, progress: bool) -> RunResult:
    """``_run_eval``'s questions, asked of ``pipeline`` (the run's files prepared)."""
    from citeqa.evals.report import write_outputs

    manifest_path = Path(spec.index) / MANIFEST
    index_manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    run_info: dict[str, Any] = {
        "identity": ident,
        "dataset": str(spec.dataset),
        "index": str(spec.index),
        "index_manifest": manifest_summary(index_manifest),
        "pipeline": describe_pipeline(pipeline, spec.min_score, spec.n_candidates,
                                      spec.answer_mode),
        "git_revision": git_revision(),
        "started": _now(),
    }
    run_path = out / RUN_JSON
    if run_path.is_file():
        previous = json.loads(run_path.read_text(encoding="utf-8"))
        if isinstance(previous.get("pipeline"), dict) and has_records(out / PREDICTIONS):
            check_same_system(out, previous["pipeline"], run_info["pipeline"])
        run_info["started"] = previous.get("started", run_info["started"])
    run_info["updated"] = _now()
    _write_json(run_path, run_info)

    pred_path = out / PREDICTIONS
    records = resume(pred_path, **_PREDICTION)
    done = {r["id"] for r in records}
    todo = [item for item in items if item.id not in done]
    resumed = len(items) - len(todo)
    if resumed:
        log.info("resuming: %d of %d questions already in %s", resumed, len(items), pred_path)
    with pred_path.open("a", encoding="utf-8") as f:
        bar = tqdm(
            total=len(items), initial=resumed, desc="questions", unit="q", disable=not progress
        )
        for item in todo:
            try:
                row = ask_one(pipeline, item, spec.n_candidates, spec.min_score,
                              spec.answer_mode)
            except EngineUnavailableError as e:
                raise EngineUnavailableError(
                    f"{e}. The run stopped: the {len(records)} questions answered so far are "
                    f"kept in {pred_path}; run the same command again once the generator is "
                    "back, and it goes on from there") from e
            append_record(f, row)
            records.append(row)
            bar.update(1)
        bar.close()

    wanted = {item.id for item in items}
    selected = list({r["id"]: r for r in reversed(records) if r["id"] in wanted}.values())
    order = {item.id: i for i, item in enumerate(items)}
    selected.sort(key=lambda r: order[r["id"]])
    metrics = write_outputs(out, selected, run_info, pipeline.document)
    return RunResult(
        out=out, questions=len(items), answered_now=len(todo), resumed=resumed, metrics=metrics
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
