"""``citeqa redteam``: how often does citeqa answer questions its corpus cannot answer?

    citeqa redteam --index DIR --out DIR [--questions FILE [--split eval]] [--n N]
                   [--url http://host:port [--api-key KEY]]

Registered on the main app by citeqa/cli.py. Every user mistake ends in a one-line message on
stderr and exit status 2.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from citeqa.cli_errors import (
    ProgressOpt,
    check_run_options,
    fail,
    interruptible,
    path_option,
    settings_from,
    shown_progress,
)
from citeqa.errors import CiteqaError, EngineUnavailableError

T = TypeVar("T")
R = TypeVar("R")


def at_once(call: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[call(x) for x in items]``, each in a thread of its own, all at once; the first
    item's error (in order) is raised after all have ended. Daemon threads: a Ctrl-C, or the
    run ending otherwise, waits for no call in flight (a pool's threads are joined at exit,
    and a server's answer took a minute and more to come)."""
    results: list[R | None] = [None] * len(items)
    errors: dict[int, BaseException] = {}

    def run(i: int, item: T) -> None:
        try:
            results[i] = call(item)
        except BaseException as e:  # (raised in the caller's thread, below)
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i, x), name=f"citeqa-redteam-{i}",
                                daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[min(errors)]
    return results  # type: ignore[return-value]  # (each set: no error)


@interruptible()
def redteam(
    index: Annotated[Path, path_option("--index", "-i", help="The index to probe.")],
    out: Annotated[Path, path_option("--out", "-o", help="Run directory (created; resumed).")],
    questions: Annotated[
        Path | None,
        path_option("--questions", help="Answerable seed questions with their passages: SQuAD "
                    "JSON, or JSONL {id, question, answers, context}. Default: template "
                    "questions written from the indexed passages."),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="With --questions: only these articles "
                                 "(train | calibration | eval; a JSONL line's 'article').")
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", min=1, help="At most this many seeds (a seeded sample).")
    ] = None,
    per_passage: Annotated[
        int, typer.Option("--per-passage", min=1, help="Template questions per passage.")
    ] = 2,
    url: Annotated[
        str | None, typer.Option("--url", help="Ask a running server instead of in process.")
    ] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="With --url.")] = None,
    preset_name: Annotated[str, typer.Option("--preset", help="default | tiny.")] = "default",
    seed: Annotated[int, typer.Option("--seed", help="Sampling and variant choices.")] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Questions asked at once.")] = 4,
    progress: ProgressOpt = None,
) -> None:
    """Make unanswerable variants of answerable questions and report how often citeqa answers
    them anyway (per kind), with answerable controls; writes report.md, results.jsonl,
    summary.json and a plot into --out."""
    progress = shown_progress(progress)  # default: on a terminal only
    check_run_options(preset=preset_name, out=out, index=index)
    if url is not None and not url.lower().startswith(("http://", "https://")):
        raise fail(f"--url must be the server's http(s) address, e.g. http://127.0.0.1:8000, "
                   f"not {url!r}")
    if api_key is not None and url is None:
        raise fail("--api-key goes with --url (a running server); in process no key is needed")
    if split is not None and questions is None:
        raise fail("--split picks the articles of a --questions file; without one the seed "
                   "questions are made from the index's passages")
    from citeqa.evals.metrics import threshold_json
    from citeqa.evals.runner import describe_pipeline
    from citeqa.journal import run_lock
    from citeqa.redteam.corpus import Corpus
    from citeqa.redteam.maker import Seed, make_variants
    from citeqa.redteam.run import (
        RESULTS,
        ask_all,
        done_ids,
        probes,
        sample_seeds,
        start_run,
        summarize,
        write_report,
    )
    from citeqa.redteam.writer import write_questions
    from citeqa.retrieval.store import MANIFEST, Index, sha256_file

    stack = ExitStack()  # with --url: the client, closed however the run ends
    try:
        idx = Index.load(index)
        texts = [p.text for p in idx.passages]
        if questions is not None:
            from citeqa.evals.squad import articles_for_split, load_questions
            from citeqa.text import normalize_answer

            items = load_questions(questions, articles_for_split(split) if split else None)
            seeds = []
            for q in items:  # graded against every gold that holds a word (not "" or "the")
                golds = tuple(a for a in q.answers if normalize_answer(a))
                if golds and q.context.strip():
                    seeds.append(Seed(q.question, q.context, golds[0], q.id, answers=golds))
            seeds_from = f"{questions} ({split or 'all'} articles)"
        else:
            seeds = write_questions(((str(p.passage_id), p.text) for p in idx.passages),
                                    per_passage=per_passage, seed=seed)
            seeds_from = f"template questions from {len(idx.passages)} passages"
        if not seeds:
            raise fail("no answerable seed questions: pass --questions with contexts, or an "
                       "index whose passages hold names, numbers or years")
        sampled = n is not None and n < len(seeds)  # else every seed, whatever --n says
        seeds = sample_seeds(seeds, n, seed)
        corpus = Corpus.build(texts)
        variants = make_variants(seeds, corpus, seed=seed)
        asks = probes(seeds, variants)
        if url:
            from citeqa.client import CiteqaClient

            client = stack.enter_context(CiteqaClient(url, api_key=api_key))

            def ask(items):  # --batch requests at once: the server batches them itself
                return at_once(lambda a: client.answer(a.question), items)

            threshold, service, system = None, url, None
        else:
            from citeqa.pipeline import Pipeline

            pipeline = Pipeline.from_settings(settings_from(preset=preset_name, index=index))
            stack.callback(pipeline.close)  # (a remote engine's calls in flight end with it)
            ask, threshold = pipeline.ask_many, pipeline.decline_threshold()
            service = f"in process ({pipeline.generator.backend.model_id})"
            system = describe_pipeline(pipeline, None)  # checked as the eval's (runner.py)
        with run_lock(out, "citeqa redteam"):
            start_run(out, {
                "index_manifest_sha256": sha256_file(index / MANIFEST),
                "questions_sha256": sha256_file(questions) if questions is not None else None,
                "split": split, "n": n if sampled else None, "seed": seed,
                "per_passage": None if questions is not None else per_passage,
                "url": url, "threshold": threshold_json(threshold)}, system)
            try:
                records = ask_all(asks, ask, out, batch=batch, progress=progress)
            except EngineUnavailableError as e:
                raise EngineUnavailableError(
                    f"{e}. The run stopped: the {len(done_ids(out / RESULTS))} questions "
                    f"answered so far are kept in {out / RESULTS}; run the same command again "
                    "once the generator is back, and it goes on from there") from e
            summary = summarize(records, threshold)
            if url:  # not "no threshold" (every question answered): the server's, unknown here
                summary["threshold"] = "the server's own (not known to the client)"
            setup = {"index": str(index), "seeds_from": seeds_from, "seeds": len(seeds),
                     "service": service, "seed": seed, "made": len(variants)}
            write_report(out, summary, setup)
    except CiteqaError as e:
        raise fail(str(e)) from None
    finally:
        stack.close()
    typer.echo(json.dumps({k: summary[k] for k in ("questions", "unanswerable", "controls",
                                                    "false_answer_rate", "control_accuracy")}))
    typer.echo(f"report: {out / 'report.md'}")
