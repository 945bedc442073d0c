"""The ``citeqa index`` commands: build an index from sources, add and remove documents in
place, list what it holds and describe it.

A change (``add``, ``remove``) writes the whole index beside it and swaps it in atomically, as a
build does (retrieval/store.py): a failed or killed change leaves the index as it was. A server
serving that index serves the changed one within ``CITEQA_INDEX_RELOAD_S``
(``Pipeline.reload_index``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from citeqa.atomic import disk_full
from citeqa.cli_errors import (
    IndexDir,
    JsonOpt,
    PresetOpt,
    ProgressOpt,
    command_group,
    fail,
    json_text,
    open_index_dir,
    path_option,
    plural,
    settings_from,
    shown_progress,
    squash,
)
from citeqa.config import preset
from citeqa.errors import BusyError, CiteqaError, IndexChangedError, IndexExistsError

if TYPE_CHECKING:
    from citeqa.ingest import LoadResult, Skipped
    from citeqa.retrieval.store import Index
    from citeqa.retrieval.updates import AddPlan

log = logging.getLogger(__name__)

index_app = command_group(help="Build document indexes, and add, remove and list documents.",
                          no_args_is_help=True)

SourcesArg = Annotated[list[str], typer.Argument(help=(
    "Files, folders (recursive) and http(s) URLs. Of a folder, its text, Markdown, "
    "reStructuredText, HTML, JSON and JSONL files are read (by extension), and README, NEWS, "
    "COPYING... without one; a file named here is read as plain text whatever its name."))]
PrivateUrlsOpt = Annotated[bool, typer.Option(
    "--allow-private-urls", help="Allow fetching private/intranet addresses.")]
ChangedIndexOpt = Annotated[Path, path_option(
    "--index", "-i", help="Index directory to change (built by `citeqa index build`).")]


def _check_sources_exist(sources: list[str], then: str) -> None:
    """Fail for a path named on the command line that is not there: a mistake, not a source to
    skip (files inside a named folder that cannot be read are still skipped)."""
    from citeqa.ingest.sources import is_url

    missing = [s for s in sources if not is_url(s) and not _there(s)]
    if missing:
        raise fail(f"no such file or folder: {', '.join(map(squash, missing))}; {then}")


def _there(path: str) -> bool:
    """Whether ``path`` names something (a broken link too); one this process may not look at
    (in a folder without x permission) is there, and is skipped with its reason."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:  # permission denied, a name too long...: reading it says what
        pass
    return True


SKIPS_NAMED = 5  # at most this many files skipped for their type or for redirecting: each said


def _echo_skipped(skipped: Sequence[Skipped]) -> None:
    """Each skipped source and why; where more than ``SKIPS_NAMED`` of a folder's files are
    of types no reader takes or pages that only redirect, those in a line each, by type, and
    where more than ``SKIPS_NAMED`` records of one file are skipped for one reason, those in
    one line (``citeqa -v`` logs each as it is skipped)."""
    from collections import Counter

    from citeqa.ingest.sources import (
        UNSUPPORTED_HELP,
        bad_record,
        redirects_only,
        unsupported_type,
    )

    kinds = [unsupported_type(s) or ("" if redirects_only(s) else None) for s in skipped]
    few = sum(kind is not None for kind in kinds) <= SKIPS_NAMED  # (a few are named, each)
    records = [bad_record(s) for s in skipped]
    alike: dict[tuple[str, str, str], list[int]] = {}  # (file, "line", why) -> the numbers
    for s, record in zip(skipped, records, strict=True):
        if record is not None:
            alike.setdefault((s.source, record[0], record[2]), []).append(record[1])
    types: Counter[str] = Counter()
    redirects = 0
    for s, kind, record in zip(skipped, kinds, records, strict=True):
        numbers = alike.get((s.source, record[0], record[2]), []) if record else []
        if len(numbers) > SKIPS_NAMED:
            if record is not None and numbers[0] == record[1]:  # said once, at the first
                shown = ", ".join(map(str, numbers[:3]))
                typer.echo(f"skipped {squash(s.source)}: {len(numbers):,} {record[0]}s ({shown}, "
                           f"…): {squash(record[2])}", err=True)
        elif few or kind is None:
            typer.echo(f"skipped {squash(s.source)}: {squash(s.reason)}", err=True)
        elif kind:
            types[kind] += 1
        else:
            redirects += 1
    if redirects:
        typer.echo(f"skipped {plural(redirects, 'page')} that only redirect to another (a meta "
                   "refresh): the pages they name are indexed where they are among the "
                   "sources; `citeqa -v` lists each", err=True)
    if types:
        shown = ", ".join(f"{n} {kind}" for kind, n in types.most_common())
        typer.echo(f"skipped {plural(types.total(), 'file')} in folders, of types citeqa does "
                   f"not read ({shown}) {UNSUPPORTED_HELP[:-1]}; `citeqa -v` lists each)",
                   err=True)


@index_app.command("build")
def index_build(
    sources: SourcesArg,
    out: Annotated[Path, path_option("--out", "-o", help="Index directory to (re)write.")],
    preset_name: PresetOpt = "default",
    bm25_only: Annotated[bool, typer.Option("--bm25-only", help="Skip the dense index.")] = False,
    hnsw: Annotated[
        bool, typer.Option("--hnsw", help="Same as --dense-index hnsw.")
    ] = False,
    dense_index: Annotated[
        str,
        typer.Option("--dense-index", help="flat (exact) | hnsw (approximate, for millions of "
                     "passages) | ivf (approximate, quicker to build, slower to search) | auto "
                     "(flat below 100k passages, else hnsw)."),
    ] = "auto",
    nprobe: Annotated[
        int | None,
        typer.Option("--nprobe", min=1,
                     help="IVF: cells searched per query (recall vs speed; default 128)."),
    ] = None,
    nlist: Annotated[
        int | None,
        typer.Option("--nlist", min=1, help="IVF: cells; default about sqrt(passages)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="Build on Ray: 'local' (this machine) or a cluster address "
                     "(HEAD:6379, ray://HEAD:10001, auto); resumable. Needs citeqa[ray]."),
    ] = None,
    resumable: Annotated[
        bool,
        typer.Option("--resumable", help="Build in shards, in this process, kept in --work-dir "
                     "until the end: run again after a crash or Ctrl-C, it embeds only the "
                     "shards not yet finished (as --ray does)."),
    ] = False,
    work_dir: Annotated[
        Path | None,
        path_option("--work-dir", help="--ray or --resumable: where shards wait for the merge "
                    "(default .OUT.build beside OUT); on a cluster, storage every node mounts."),
    ] = None,
    embedders: Annotated[
        int | None,
        typer.Option("--embedders", min=1, help="--ray: embedding actors (default: one per "
                     "GPU, else one per CPU)."),
    ] = None,
    shard_chars: Annotated[
        int | None,
        typer.Option("--shard-chars", min=1, help="--ray or --resumable: characters of "
                     "documents per shard (the unit of work and of resuming; default "
                     "2,000,000); each file or page is one shard at least."),
    ] = None,
    max_chars: Annotated[
        int | None, typer.Option("--max-chars", help="Maximum passage length in characters.")
    ] = None,
    allow_private_urls: PrivateUrlsOpt = False,
    if_missing: Annotated[
        bool,
        typer.Option("--if-missing", help="Build only when --out holds no index (one a crash "
                     "left mid-swap is restored, not rebuilt, and one another build swaps in "
                     "meanwhile is kept); for start scripts."),
    ] = False,
    progress: ProgressOpt = None,
) -> None:
    """Build (or atomically rebuild) an index from SOURCES into --out."""
    progress = shown_progress(progress)  # default: on a terminal only
    from citeqa.atomic import siblings
    from citeqa.retrieval import build_index
    from citeqa.retrieval.dense import KINDS, DenseSpec
    from citeqa.retrieval.store import check_index, real_path, recover_index, swaps_into

    if hnsw and dense_index not in ("auto", "hnsw"):
        raise fail(f"--hnsw contradicts --dense-index {dense_index}; give one of them")
    if dense_index not in KINDS:
        raise fail(f"--dense-index must be one of {', '.join(KINDS)}, not {dense_index!r}")
    if ray is None and embedders:
        raise fail("--embedders only applies with --ray")
    if ray is None and not resumable and (work_dir or shard_chars):
        raise fail("--work-dir and --shard-chars only apply with --ray or --resumable")
    if (nprobe or nlist) and (dense_index != "ivf" or bm25_only):
        raise fail("--nprobe and --nlist only apply with --dense-index ivf")
    if bm25_only and (hnsw or dense_index != "auto"):
        raise fail("--bm25-only builds no dense index: drop --hnsw / --dense-index")
    try:  # a mistyped preset is an error with --if-missing too, whatever is at --out
        cfg = preset(preset_name).retrieval
    except CiteqaError as e:
        raise fail(str(e)) from None
    if if_missing:
        try:
            recover_index(out)
        except CiteqaError:
            pass  # no index there: build it
        else:  # a damaged index, or another program's manifest.json, is not "an index already"
            try:
                check_index(out)
            except CiteqaError as e:
                raise fail(f"{e}; nothing was built (--if-missing builds only where no index "
                           "is)") from None
            typer.echo(f"{out} holds an index already; not rebuilt (--if-missing)")
            return
    # a rebuild would swap in an index without the documents of a mistyped path
    _check_sources_exist(sources, f"nothing was built (an index at {out}, if any, is as it was)")
    sharded = ray is not None or resumable  # resumable: its shards outlive a stop
    swaps = swaps_into(out)  # (a folder changed there may be another writer's swap)
    try:
        if bm25_only:
            cfg = replace(cfg, dense=False)
        if hnsw:
            cfg = replace(cfg, faiss_index="hnsw")
        if max_chars is not None:
            if max_chars < 50:
                raise fail("--max-chars must be at least 50")
            cfg = replace(cfg, chunk=replace(cfg.chunk, max_chars=max_chars))
        spec = DenseSpec(kind="hnsw" if hnsw else dense_index,  # type: ignore[arg-type]
                         hnsw_m=cfg.hnsw_m, nlist=nlist,
                         **({"nprobe": nprobe} if nprobe is not None else {}))
        if sharded:
            from citeqa.distributed import build_index_sharded
            from citeqa.retrieval.shards import SHARD_CHARS

            summary = build_index_sharded(
                sources, out, cfg, executor=_shard_executor(ray, embedders),
                work_dir=work_dir, shard_chars=shard_chars or SHARD_CHARS, dense_spec=spec,
                allow_private_urls=allow_private_urls, progress=progress,
                only_if_missing=if_missing,
            )
        else:
            summary = build_index(sources, out, cfg, allow_private_urls=allow_private_urls,
                                  progress=progress, dense_spec=spec, only_if_missing=if_missing)
    except IndexExistsError as e:  # --if-missing, and another build won the race: its index
        typer.echo(f"{e}; not rebuilt (--if-missing)")
        return
    except CiteqaError as e:  # (shards another build is writing are that build's to keep)
        kept = _kept_shards(out, work_dir) if sharded and not isinstance(e, BusyError) else ""
        raise fail(f"{e}{kept}") from None
    except OSError as e:  # the output's file system: read-only, full, ...
        kept = _kept_shards(out, work_dir, full=disk_full(e)) if sharded else ""
        raise fail(f"could not build the index into {out}: {e}; the index there, if any, is "
                   f"as it was{kept}") from None
    except KeyboardInterrupt:
        if swaps_into(out) > swaps:  # cut short after its own swap
            _forget_replaced(out, work_dir)
            left = (" (what is left of the old one goes at the next command)"
                    if siblings(real_path(out), "old") else "")
            typer.echo(f"\ninterrupted once the new index was in: {out} holds it{left}",
                       err=True)
            raise typer.Exit(130) from None
        again = ("; run the same command again to build it" + (
            "" if sharded else " (with --resumable, a build cut short keeps what it finished)"))
        kept = _kept_shards(out, work_dir) if sharded else ""
        typer.echo(f"\ninterrupted: {out} is not left half-written (a build swaps a finished "
                   f"index in whole){kept or again}", err=True)
        raise typer.Exit(130) from None
    _echo_skipped(summary.skipped)
    _echo_twins(summary.twins)
    _forget_replaced(out)
    reused = (f", {summary.shards_reused} reused from an interrupted run"
              if summary.shards_reused else "")
    shards = f"; {plural(summary.shards, 'shard')}{reused}" if sharded else ""
    typer.echo(
        f"indexed {plural(summary.documents, 'document')} as "
        f"{plural(summary.passages, 'passage')} into {squash(str(summary.out))} in "
        f"{summary.seconds:.1f} s "
        f"({len(summary.skipped)} skipped{shards})"  # files, pages, or a JSONL's lines
    )


def _echo_twins(groups: Sequence[tuple[str, ...]]) -> None:
    """A warning for each group of documents indexed with one text (at most ``SKIPS_NAMED``
    groups, then how many documents more): all are indexed; a search shows one copy of a
    passage (``HybridRetriever``), but the copies take room and skew BM25's word counts."""
    for sources in groups[:SKIPS_NAMED]:
        n = len(sources)
        if len(set(sources)) == 1:  # records of one file, or naming one source
            which = f"{n} documents of {squash(sources[0])} have one text"
        elif n == 2:
            which = f"{squash(sources[1])} has the text of {squash(sources[0])}"
        else:
            shown = ", ".join(squash(s) for s in sources[:3])
            which = (f"{n} documents have one text ({shown}"
                     + (f" and {n - 3} more" if n > 3 else "") + ")")
        typer.echo(f"warning: {which}; {'both' if n == 2 else 'all'} are indexed, and a search "
                   "shows one of each of their passages, but copies take room and skew BM25's "
                   f"word counts (leave {'one out' if n == 2 else 'one in'} and build again)",
                   err=True)
    if (more := sum(len(g) - 1 for g in groups[SKIPS_NAMED:])) > 0:
        typer.echo(f"warning: {plural(more, 'more document')} {'has' if more == 1 else 'have'} "
                   "the text of another, and each is indexed beside it", err=True)


def _forget_replaced(out: Path, work_dir: Path | None = None) -> None:
    """Remove what interrupted commands kept for the index a build has replaced at ``out``
    (a rerun of them would undo the build): an add's embeddings, a sharded build's shards
    (in ``work_dir`` too, a build's own --work-dir, cut short after its swap)."""
    from citeqa.distributed.sharded import default_work_dir, discard_work
    from citeqa.retrieval.kept import discard, kept_dir

    discard(kept_dir(out))
    for work in dict.fromkeys([default_work_dir(out), *([Path(work_dir)] if work_dir else [])]):
        discard_work(work)


def _finished_shards(work: Path) -> int:
    """How many finished shards the work directory of a sharded build holds (none where no
    build's marker is: a folder of the user's that happens to be called shards/)."""
    from citeqa.retrieval.shards import MARKER

    if not (work / MARKER).is_file():
        return 0
    try:
        return sum(1 for _ in (work / "shards").iterdir())
    except OSError:
        return 0


def _kept_shards(out: Path, work_dir: Path | None, *, full: bool = False) -> str:
    """What a sharded build that stopped keeps for the next run ("" when nothing); ``full``:
    it stopped on a full disk, where what it keeps takes room the finished index needs."""
    from citeqa.distributed.sharded import default_work_dir

    work = Path(work_dir) if work_dir else default_work_dir(out)
    finished = _finished_shards(work)
    if not finished:
        return ""
    are = "is" if finished == 1 else "are"
    if full:
        return (f"; the {plural(finished, 'shard')} finished so far {are} kept in {work} "
                f"({_megabytes(work)}): the finished index needs about as much room again "
                "beside them, so free that much and run the same command again to reuse them "
                "(or delete that folder to start over)")
    return (f"; the {plural(finished, 'shard')} finished so far {are} kept in {work}: run the "
            "same command again to reuse them (or delete it to start over)")


def _name_fits(directory: Path) -> None:
    """A change of the index at ``directory`` refused before any work where its name leaves
    no room for the siblings a write makes (an add failed there after all its embedding)."""
    from citeqa.retrieval.store import check_name_fits

    try:
        check_name_fits(directory)
    except CiteqaError as e:
        raise fail(f"{e}; the index is as it was") from None


def _megabytes(folder: Path) -> str:
    """The size of the files under ``folder``, as "12.3 MB"."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return f"{total / 1e6:.1f} MB"


def _room_for_a_change(directory: Path) -> str:
    """What a change of the index at ``directory`` needs room for, said when the disk is full:
    the index written anew beside itself, and what an interrupted add kept there for a rerun
    (room the write needs: kept, a rerun on the same disk fails the same way)."""
    from citeqa.retrieval.kept import kept_dir

    said = (f" (the disk is full: a change writes the index ({_megabytes(directory)}) anew "
            "beside the old one")
    kept = kept_dir(directory)
    if kept.is_dir() and any(kept.iterdir()):
        said += (f"; the embeddings an add kept for its rerun take {_megabytes(kept)} of that "
                 f"disk in {kept}: delete that folder to free them, and a rerun embeds again")
    return said + ")"


def _shard_executor(ray: str | None, embedders: int | None) -> Any:
    """Where a sharded build makes its shards: on Ray at ``ray``, else in this process."""
    if ray is None:
        from citeqa.distributed import InProcessExecutor

        return InProcessExecutor()
    from citeqa.distributed import RayExecutor, RayOptions

    return RayExecutor(RayOptions(ray, embedders=embedders))


T = TypeVar("T")


def _retried(change: Callable[[], T]) -> T:
    """``change()``, run again once when another writer changed the index while it ran (it
    then works on the index as the other left it)."""
    try:
        return change()
    except IndexChangedError:
        log.info("another writer changed the index meanwhile; changing it as it is now")
        return change()


@contextlib.contextmanager
def _changing(directory: Path, rerun: str = "run the same command again to finish it",
              ) -> Iterator[None]:
    """How ``index add`` and ``index remove`` fail: one line, and the index as it was;
    ``rerun``: what finishes a change a Ctrl-C cut short."""
    try:
        yield
    except IndexChangedError:
        raise fail(f"other writers changed the index at {directory} twice while this command "
                   "ran; nothing was changed: run the command again") from None
    except CiteqaError as e:
        raise fail(str(e)) from None
    except OSError as e:  # the index's file system: read-only, full, ...
        room = _room_for_a_change(directory) if disk_full(e) else ""
        raise fail(f"could not write the index at {directory}: {e}; it is as it was{room}"
                   ) from None
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: the index at {directory} holds all of this change or none "
                   f"of it; {rerun}", err=True)
        raise typer.Exit(130) from None


def _load_sources(sources: list[str], *, allow_private_urls: bool,
                  progress: bool) -> LoadResult:
    from citeqa.ingest import Fetcher, FetchPolicy, load_sources

    fetcher = Fetcher(FetchPolicy(allow_private=allow_private_urls))
    return load_sources(sources, fetcher=fetcher, progress=progress)


@index_app.command("add")
def index_add(
    sources: SourcesArg,
    index: ChangedIndexOpt,
    replace_changed: Annotated[bool, typer.Option(
        "--replace", help="Replace a document the index holds under the same id with other "
        "content (an edited file); without it such a document stops the command and nothing "
        "changes.")] = False,
    allow_private_urls: PrivateUrlsOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Add the documents of SOURCES to the index at --index, in place (atomically, chunked and
    embedded as it was built). Documents it already holds as they are are left alone, so the
    same command can run again."""
    progress = shown_progress(progress)
    directory = open_index_dir(index)
    _name_fits(directory)
    unchanged_index = f"the index at {directory} is as it was"
    _check_sources_exist(sources, unchanged_index)
    from citeqa.retrieval.builder import no_documents

    with _changing(directory):
        loaded = _load_sources(sources, allow_private_urls=allow_private_urls, progress=progress)
        _echo_skipped(loaded.skipped)
        if not loaded.documents:
            raise no_documents(len(sources), loaded.skipped)
        written: list[str] = []  # the kept parts this command's attempts wrote
        plan, version, passages, reused, warnings = _retried(lambda: _add(
            directory, loaded, replace=replace_changed, progress=progress,
            unchanged=unchanged_index, written=written))
    _echo_skipped(_pages_held(loaded, plan.same_page))
    for line in warnings:  # of the attempt that was made, once
        typer.echo(f"warning: {line}", err=True)
    kept = (f"; {plural(len(plan.unchanged), 'document')} already indexed as given"
            if plan.unchanged else "")
    if not plan.update.add:
        typer.echo(f"nothing to add to {directory}{kept} (index version {version})")
        return
    done = [f"{verb} {plural(len(ids), 'document')}"
            for verb, ids in (("added", plan.new), ("replaced", plan.replaced)) if ids]
    again = (f"; the embeddings of {plural(reused, 'passage')} were kept from an interrupted "
             "run" if reused else "")
    typer.echo(f"{' and '.join(done)} ({plural(passages, 'passage')}) in {directory}{kept} "
               f"(index version {version}){again}")


def _pages_held(loaded: LoadResult, same_page: Sequence[tuple[str, str]]) -> list[Skipped]:
    """The URLs ``index add`` left out as pages the index holds under another URL's id."""
    from citeqa.ingest import Skipped, page_key

    source = {d.doc_id: d.source for d in loaded.documents}
    return [Skipped(loaded.fetched[new], f"its page ({page_key(source[new])}) is indexed, as "
                    f"document {holder}; a page's id hashes its URL as given: add it by the URL "
                    "it was indexed with (with --replace to take its text of today)")
            for new, holder in same_page]


def _add(directory: Path, loaded: LoadResult, *, replace: bool, progress: bool,
         unchanged: str, written: list[str]) -> tuple[AddPlan, str, int, int, list[str]]:
    """Plan and apply one ``index add`` of ``loaded`` on the index at ``directory`` as it is
    now: the plan, the index's version after it, the passages added, those of them whose
    embeddings an earlier run had kept (``kept.kept_dir``), and what to warn about
    (IndexChangedError: another writer changed the index between the two; what was embedded
    stays kept for the next attempt, and ``written`` names the parts the attempts wrote)."""
    from citeqa.retrieval import HybridRetriever
    from citeqa.retrieval.kept import KeptEmbedder, discard, kept_dir
    from citeqa.retrieval.updates import apply_update, plan_additions

    retriever = HybridRetriever.open(directory)
    documents = loaded.documents
    plan = plan_additions(retriever.index.documents, documents, replace=replace,
                          fetched=loaded.fetched)
    given, held = {d.doc_id: d for d in documents}, retriever.index.documents
    if plan.conflicts:
        shown = plan.conflicts[:5]
        retitled = {i for i in shown
                    if (given[i].text, given[i].source) == (held[i].text, held[i].source)}
        named = ", ".join(f"{squash(i)} ({squash(given[i].source)}"
                          f"{': its title only' if i in retitled else ''})" for i in shown)
        why = ("; a title alone differs where a text is as indexed (its source retitled, or an "
               "older citeqa that titled it otherwise)" if retitled else "")
        raise fail(f"the index holds {plural(len(plan.conflicts), 'document')} with other "
                   f"content: {named}{', ...' if len(plan.conflicts) > 5 else ''}{why}; pass "
                   f"--replace to replace them; {unchanged}")
    warnings = [f"{squash(given[new].source)} holds the text of indexed document "
                 f"{squash(twin)} ({squash(held[twin].source)}), and is added beside it: "
                 + (f"the same page by another URL? A page's id hashes its URL as given "
                    f"({squash(loaded.fetched[new])}): name pages as when they were indexed"
                    if new in loaded.fetched else
                    "the same file named by another path? A file's id hashes its path as given: "
                    "name files as when they were indexed") for new, twin in plan.lookalikes]
    if not plan.update.add:  # what an earlier run kept went in (it was killed after its swap)
        discard(kept_dir(directory))
        return plan, retriever.index.version, 0, 0, warnings
    if retriever.index.dense is None:
        result = apply_update(retriever.index, plan.update, directory, progress=progress)
        return plan, result.index.version, sum(result.added_passages.values()), 0, warnings
    with KeptEmbedder(retriever.embedder, kept_dir(directory), written=written) as kept:
        result = apply_update(retriever.index, plan.update, directory, embedder=kept,
                              progress=progress)
    kept.discard()
    return (plan, result.index.version, sum(result.added_passages.values()), kept.reused,
            warnings)


@index_app.command("remove")
def index_remove(
    doc_ids: Annotated[list[str], typer.Argument(
        help="Ids of the documents to remove (`citeqa index list` shows them).")],
    index: ChangedIndexOpt,
    missing_ok: Annotated[bool, typer.Option(
        "--missing-ok", help="An id the index does not hold is no error (the same command can "
        "run again).")] = False,
) -> None:
    """Remove documents from the index at --index, in place (atomically)."""
    directory = open_index_dir(index)
    _name_fits(directory)
    held: set[str] = set()  # the ids an earlier attempt found: gone since is not "missing"
    # a rerun of a removal that went in finds the ids gone: without --missing-ok, an error
    rerun = ("run the same command again to finish it" if missing_ok else
             "run the same command again with --missing-ok to finish it")
    with _changing(directory, rerun):
        gone, missing, left = _retried(lambda: _remove(
            directory, list(dict.fromkeys(doc_ids)), missing_ok=missing_ok, held=held))
    by_other = [i for i in held if i not in gone and i not in left.documents]
    others = f" ({len(by_other)} by another writer meanwhile)" if by_other else ""
    absent = f"; {len(missing)} not in it" if missing else ""
    typer.echo(f"removed {plural(len(gone) + len(by_other), 'document')}{others} from "
               f"{directory}{absent}; "
               f"{plural(len(left.documents), 'document')} left (index version "
               f"{left.version})")


def _remove(directory: Path, wanted: list[str], *, missing_ok: bool, held: set[str],
            ) -> tuple[list[str], list[str], Index]:
    """One ``index remove`` on the index at ``directory`` as it is now: the ids removed, those
    it did not hold (nor did an earlier attempt: ``held``, added to), and the index after."""
    from citeqa.retrieval.store import Index
    from citeqa.retrieval.updates import IndexUpdate, apply_update

    loaded = Index.load(directory)
    missing = [i for i in wanted if i not in loaded.documents and i not in held]
    held.update(i for i in wanted if i in loaded.documents)
    if missing and not missing_ok:
        raise fail(f"the index at {directory} holds no document with id "
                   f"{', '.join(map(squash, missing))} (`citeqa index list` shows the ids); "
                   "nothing was removed")
    gone = [i for i in wanted if i in loaded.documents]
    if gone:
        loaded = apply_update(loaded, IndexUpdate(remove=tuple(gone)), directory).index
    return gone, missing, loaded


def _read_index(index: Path | None) -> Index:
    """The index ``index`` names (default: $CITEQA_INDEX, else index/default), checksums
    verified; fails the command when there is none or it is damaged."""
    from citeqa.retrieval.store import Index

    directory = open_index_dir(settings_from(index=index).index)
    try:
        return Index.load(directory)
    except CiteqaError as e:
        raise fail(str(e)) from None


@index_app.command("list")
def index_list(index: IndexDir = None, as_json: JsonOpt = False) -> None:
    """List the documents of an index in index order: id, passages, title and source
    (tab-separated, after a header line)."""
    loaded = _read_index(index)
    passages: dict[str, int] = dict.fromkeys(loaded.documents, 0)
    for p in loaded.passages:
        passages[p.doc_id] += 1
    if as_json:
        typer.echo(json_text({
            "index": str(loaded.directory), "version": loaded.version,
            "total": len(loaded.documents),
            "documents": [{"doc_id": d.doc_id, "title": d.title, "source": d.source,
                           "length": len(d.text), "passages": passages[d.doc_id]}
                          for d in loaded.documents.values()],
        }))
        return
    typer.echo("doc_id\tpassages\ttitle\tsource")
    for d in loaded.documents.values():  # untrusted text: one line each, no control characters
        typer.echo("\t".join([squash(d.doc_id), str(passages[d.doc_id]),
                              squash(d.title).replace("\t", " "), squash(d.source)]))
    typer.echo(f"{plural(len(loaded.documents), 'document')}, "
               f"{plural(len(loaded.passages), 'passage')}", err=True)


MEASURE_TRIES = 3  # index info: loads of an index whose files a swap took away while measured


def index_facts(loaded: Index) -> dict[str, Any]:
    """What ``citeqa index info`` shows of an index: its identity, size and how it was built."""
    assert loaded.directory is not None, "an index read from disk"
    from citeqa.distributed.sharded import default_work_dir
    from citeqa.retrieval.kept import kept_dir, kept_passages

    files = [p for p in Path(loaded.directory).rglob("*") if p.is_file()]
    m = loaded.manifest
    return {
        "index": str(loaded.directory),
        "version": loaded.version,
        "created": m.get("created"),
        "documents": len(loaded.documents),
        "passages": len(loaded.passages),
        "vocabulary": (m.get("counts") or {}).get("vocabulary"),
        "embedding": m.get("embedding"),  # None: BM25 only
        # (a manifest written before it recorded the spec: read from the FAISS index itself)
        "dense_index": (m.get("dense_index") or loaded.dense.spec.to_json()
                        if loaded.dense is not None else None),
        # rows of deleted passages an HNSW graph keeps (skipped; built again past a tenth)
        "dense_removed_rows": len(loaded.dense.removed) if loaded.dense is not None else None,
        "chunk": (m.get("settings") or {}).get("chunk"),
        "bytes": sum(p.stat().st_size for p in files),
        "checksums": "ok",  # Index.load verified every file against the manifest
        # what interrupted commands left beside it for their rerun (`index add`, a sharded build)
        "kept_passages": kept_passages(kept_dir(Path(loaded.directory))),
        "kept_shards": _finished_shards(default_work_dir(Path(loaded.directory))),
    }


def _dense_line(spec: dict[str, Any] | None, removed_rows: int | None) -> str:
    if spec is None:
        return "none (BM25 only)"
    kind = spec.get("kind", "flat")
    if kind == "hnsw":
        removed = (f"; {plural(removed_rows, 'row')} of deleted passages kept, skipped"
                   if removed_rows else "")
        return f"hnsw (M {spec.get('hnsw_m')}, efSearch {spec.get('ef_search')}{removed})"
    if kind == "ivf":
        nlist, nprobe = spec.get("nlist"), spec.get("nprobe")
        if not nlist:
            return f"ivf (auto cells, {nprobe} probed)"
        probed = "all" if nprobe is not None and nprobe >= nlist else nprobe  # FAISS caps it
        return f"ivf ({plural(nlist, 'cell')}, {probed} probed)"
    return str(kind)


@index_app.command("info")
def index_info(index: IndexDir = None, as_json: JsonOpt = False) -> None:
    """Describe an index (version, counts, embedder, dense index, size, and what interrupted
    commands keep beside it for their rerun) after checking every file against its manifest."""
    for attempt in range(1, MEASURE_TRIES + 1):
        loaded = _read_index(index)
        try:
            facts = index_facts(loaded)
            break
        except FileNotFoundError as e:  # a writer swapped another index in while its files
            if attempt == MEASURE_TRIES:  # were measured (after the load): measure that one
                raise fail(f"the index at {loaded.directory} kept changing while it was "
                           f"measured ({e.filename} went); run the command again") from None
    if as_json:
        typer.echo(json_text(facts))
        return
    emb = facts["embedding"]
    chunk = facts["chunk"] or {}
    rows = {
        "index": facts["index"],
        "version": facts["version"],
        "created": facts["created"],
        "documents": facts["documents"],
        "passages": facts["passages"],
        "vocabulary": facts["vocabulary"],
        "embedding": (f"{emb.get('name')} ({emb.get('model_id')}, {emb.get('dim')} dims, "
                      f"{emb.get('dtype', 'fp32')})" if emb else "none (BM25 only)"),
        "dense index": _dense_line(facts["dense_index"], facts["dense_removed_rows"]),
        "chunking": f"passages of at most {chunk.get('max_chars')} characters",
        "size": f"{facts['bytes'] / 1e6:.1f} MB",
        "checksums": facts["checksums"],
    }
    from citeqa.distributed.sharded import default_work_dir
    from citeqa.retrieval.kept import kept_dir

    if facts["kept_passages"]:
        rows["kept (add)"] = (f"the embeddings of {plural(facts['kept_passages'], 'passage')} an "
                        f"interrupted `index add` made ({kept_dir(Path(facts['index']))}): run "
                        "it again to use them")
    if facts["kept_shards"]:
        rows["kept (build)"] = (f"{plural(facts['kept_shards'], 'shard')} of an interrupted build "
                         f"({default_work_dir(Path(facts['index']))}): run it again to use them")
    for name, value in rows.items():
        typer.echo(f"{name:<12} {value}")
