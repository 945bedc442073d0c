"""citeqa.atomic: a write that fails part-way leaves the old file whole and no litter."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from citeqa.atomic import atomic_open, atomic_path, full_disk_named, write_text_atomic


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")
    path.chmod(0o664)  # e.g. a run directory shared with a group
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.stat(path).st_mode & 0o777 == 0o664  # kept
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    fresh = tmp_path / "fresh.json"
    umask = os.umask(0o027)
    try:
        write_text_atomic(fresh, "{}")
    finally:
        os.umask(umask)
    assert os.stat(fresh).st_mode & 0o777 == 0o640  # as any write under that umask


def test_a_writer_that_replaces_the_temporary_file_keeps_the_umasks_mode(tmp_path: Path) -> None:
    """safetensors' save_file writes a file of its own (0600) and renames it over the path it
    is given: adapters and exported generators came out owner-only whatever the umask, and the
    Docker image's user could not read them."""
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "adapter.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "adapter.safetensors").st_mode & 0o777 == 0o644


def test_a_private_file_stays_private_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{}")
    path.chmod(0o600)
    with atomic_path(path) as tmp:
        assert os.stat(tmp).st_mode & 0o777 == 0o600  # while the new content is written
        tmp.write_text('{"k": 1}')
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(FileNotFoundError, match=r"cannot write .*missing/run.json: no directory"):
        write_text_atomic(tmp_path / "missing" / "run.json", "{}")


def test_a_symbolic_link_is_written_through(tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_a_write_that_fails_part_way_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("finished work\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("half of the new")
        raise KeyboardInterrupt  # Ctrl-C in the middle
    assert path.read_text() == "finished work\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_a_path_writer_sees_a_sibling_in_the_same_directory(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not path.exists()
        tmp.write_bytes(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_resuming_generator_data_rewrites_its_file_atomically(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Dropping an interrupted question's lines rewrites the data file: a crash then must not
    lose the questions already finished (it truncated the file first before)."""
    import citeqa.atomic
    from citeqa.training.verifier_data import _done_qids

    out = tmp_path / "gen.jsonl"
    example = ('{"group": "%s", "question": "q", "answer": "x", "label": 0, '
               '"source": "generator"}\n')
    out.write_text(example % "a" + '{"qid": "a", "kind": "question"}\n'
                   + example % "b" + '{"qid": "b", "ki')  # b was cut short
    before = out.read_text()

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(citeqa.atomic.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _done_qids(out)
    assert out.read_text() == before  # nothing lost
    monkeypatch.undo()
    assert _done_qids(out) == {"a"}
    assert out.read_text() == example % "a" + '{"qid": "a", "kind": "question"}\n'


# --- directories ------------------------------------------------------------------------------


def _dead_pid() -> int:
    """A pid no process has (a child that has exited and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_replace_dir_swaps_a_whole_directory_in(tmp_path: Path) -> None:
    from citeqa.atomic import fresh_tmp_dir, replace_dir

    out = tmp_path / "model"
    for version in ("one", "two"):
        tmp = fresh_tmp_dir(out)
        (tmp / "weights").write_text(version)
        replace_dir(tmp, out)
        assert (out / "weights").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no debris


def test_a_writer_killed_between_the_renames_is_undone_by_the_next_reader(tmp_path: Path) -> None:
    """The only copy of ``out`` sat in ``.out.old`` and every reader called it missing (a reward
    model's calibration was lost for good on the next save)."""
    from citeqa.atomic import fresh_tmp_dir, recover_dir

    out = tmp_path / "rm"
    pid = _dead_pid()
    backup = tmp_path / f".rm.old-{pid}"
    backup.mkdir()
    (backup / "calibration.json").write_text("{}")
    (tmp_path / f".rm.tmp-{pid}").mkdir()  # its half-written new copy
    assert recover_dir(out) == out and (out / "calibration.json").is_file()
    assert not backup.exists()
    tmp = fresh_tmp_dir(out)  # the next writer clears the dead writer's debris
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "rm"]
    # a backup whose writer still runs (between its renames right now) is left alone
    os.rmdir(tmp)
    live = tmp_path / f".other.old-{os.getppid()}"
    live.mkdir()
    assert not recover_dir(tmp_path / "other").exists() and live.is_dir()
    # a backup of this very pid with its folder missing: a dead writer's whose pid this
    # process has now (a restarted container's pid 1); it was called alive, never restored,
    # then deleted by this process's next write as its own debris
    own = tmp_path / f".mine.old-{os.getpid()}"
    own.mkdir()
    (own / "progress.json").write_text("{}")
    tmp = fresh_tmp_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "progress.json").is_file() and not own.exists()
    os.rmdir(tmp)


def test_a_temporary_directory_is_stale_once_no_writer_holds_it_whatever_its_pid(
        tmp_path: Path) -> None:
    """After a container's restart the pid in ``.out.tmp-<pid>`` names some other live process
    (pid 1 always runs): the dead writer's half-written copy stayed for ever."""
    import subprocess
    import sys

    from helpers import flock_held_elsewhere

    from citeqa.atomic import (
        CLAIM_GRACE_S,
        _claims,
        fresh_tmp_dir,
        remove_stale_siblings,
        replace_dir,
    )

    out = tmp_path / "model"
    left = tmp_path / ".model.tmp-1"  # its writer died; pid 1 is alive
    left.mkdir()
    (left / "weights").write_text("half")
    mine = tmp_path / f".model.tmp-{os.getpid()}"  # this pid's, from before a restart
    mine.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    new = tmp_path / f".model.tmp-{alive.pid}"  # just made: its writer (a live pid, perhaps
    new.mkdir()  # in another namespace) is about to lock it (the parent's pid was 1 under nohup)
    past = time.time() - CLAIM_GRACE_S - 5
    for path in (left, mine):
        os.utime(path, (past, past))
    held = tmp_path / ".model.tmp-2"  # a writer of another pid namespace, writing now
    held.mkdir()
    try:
        with flock_held_elsewhere(held):
            remove_stale_siblings(out, writing=False)
            assert not left.exists() and not mine.exists() and held.is_dir()
            assert new.is_dir()  # unlocked, but only just made
    finally:
        alive.kill()
        alive.wait()
    os.utime(held, (past, past))
    remove_stale_siblings(out, writing=False)  # its writer gone: stale now
    assert not held.exists()
    # this process's own writes hold their directory while they write, and let go after
    tmp = fresh_tmp_dir(out)
    assert str(tmp) in _claims
    probe = subprocess.run([sys.executable, "-c", (
        "import fcntl, os\n"
        f"fd = os.open({str(tmp)!r}, os.O_RDONLY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except BlockingIOError:\n    print('held')\n")], capture_output=True, text=True)
    assert probe.stdout.strip() == "held"
    replace_dir(tmp, out)
    assert str(tmp) not in _claims  # no descriptor kept for each write


def test_a_reward_directory_left_mid_swap_is_found_by_its_setting(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from citeqa.config import Settings

    backup = tmp_path / f".rm.old-{_dead_pid()}"
    backup.mkdir()
    monkeypatch.setenv("CITEQA_REWARD", str(tmp_path / "rm"))
    assert Settings().reward == str(tmp_path / "rm") and (tmp_path / "rm").is_dir()


def test_a_reward_training_killed_mid_save_resumes_from_what_it_saved(tmp_path: Path) -> None:
    """`train reward` asked for the saved step before anything restored the directory a save
    left mid-swap: it trained from step 0 and then wrote over the backup."""
    import json

    from citeqa.reward.train import saved_progress

    backup = tmp_path / f".rm.old-{_dead_pid()}"
    backup.mkdir()
    (backup / "config.json").write_text(json.dumps({"progress": {"step": 200, "key": {}}}))
    assert saved_progress(tmp_path / "rm") == {"step": 200, "key": {}}
    assert (tmp_path / "rm" / "config.json").is_file() and not backup.exists()


def test_a_write_error_without_errno_on_a_full_disk_is_enospc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's "N requested and M written" and FAISS's write error carry no errno: a full disk
    read as a read-only one (REST 503 index_not_writable, not 507)."""
    import numpy as np

    def disk(free: int):  # type: ignore[no-untyped-def]
        return lambda path: shutil._ntuple_diskusage(10 << 20, (10 << 20) - free, free)

    def cut_save(path, array):  # type: ignore[no-untyped-def]
        raise OSError("12235 requested and 5088 written")  # as np.save says it

    monkeypatch.setattr(np, "save", cut_save)
    monkeypatch.setattr("citeqa.atomic.shutil.disk_usage", disk(4096))
    with pytest.raises(OSError) as err, full_disk_named(tmp_path):
        np.save(tmp_path / "a.npy", np.zeros(3))
    assert err.value.errno == errno.ENOSPC and str(err.value.strerror) == "No space left on device"
    assert "requested and" in str(err.value.__cause__)
    monkeypatch.setattr("citeqa.atomic.shutil.disk_usage", disk(5 << 20))  # room: not full
    with pytest.raises(OSError) as err, full_disk_named(tmp_path):
        np.save(tmp_path / "a.npy", np.zeros(3))
    assert err.value.errno is None
    monkeypatch.setattr("citeqa.atomic.shutil.disk_usage", disk(0))  # an errno is kept
    with pytest.raises(PermissionError), full_disk_named(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_a_stale_sibling_that_cannot_be_removed_is_not_said_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """On a read-only file system every command logged "removing stale ..." and removed
    nothing."""
    import logging

    from citeqa.atomic import remove_stale_siblings

    out = tmp_path / "idx"
    out.mkdir()
    stale = tmp_path / ".idx.old-999999999"  # no such process
    stale.mkdir()
    caplog.set_level(logging.INFO, logger="citeqa.atomic")

    def refused(code: int):  # type: ignore[no-untyped-def]
        def rmtree(path, onerror=None, onexc=None):  # type: ignore[no-untyped-def]
            error = OSError(code, os.strerror(code))  # (onexc from Python 3.12 on)
            if onexc is not None:
                onexc(os.rmdir, str(path), error)
            else:
                onerror(os.rmdir, str(path), (OSError, error, None))
        return rmtree

    monkeypatch.setattr("citeqa.atomic.shutil.rmtree", refused(errno.EROFS))
    remove_stale_siblings(out, writing=False)
    assert stale.is_dir() and "stale" not in caplog.text and "remove" not in caplog.text
    monkeypatch.setattr("citeqa.atomic.shutil.rmtree", refused(errno.EACCES))  # root's copy
    remove_stale_siblings(out, writing=False)
    assert f"could not remove {stale}, a copy an interrupted writer left" in caplog.text
    assert "Permission denied" in caplog.text and "removed stale" not in caplog.text
    monkeypatch.undo()
    remove_stale_siblings(out, writing=False)
    assert not stale.exists() and f"removed stale {stale}" in caplog.text


def test_a_writer_of_the_same_pid_in_another_container_keeps_its_temporary_directory(
        tmp_path: Path) -> None:
    """Replicas in two containers over one volume both write as pid 1: each took the other's
    temporary directory, being written right then, for its own debris (``.idx.tmp-1``), and
    deleted it; the other then swapped in what was left there (201s lost, once the whole
    index). A writer's names carry a token of its own beside its pid."""
    from helpers import flock_held_elsewhere

    from citeqa.atomic import (
        CLAIM_GRACE_S,
        fresh_tmp_dir,
        tmp_dir_for,
        writer_alive,
        writer_name,
    )

    out = tmp_path / "idx"
    pid = os.getpid()
    assert writer_name().startswith(f"{pid}-") and tmp_dir_for(out).name.endswith(writer_name())
    other = tmp_path / f".idx.tmp-{pid}-0123abcd"  # the other container's writer, writing
    other.mkdir()
    (other / "documents.jsonl").write_text("its work")
    with flock_held_elsewhere(other):
        assert writer_alive(other, writing=True)
        mine = fresh_tmp_dir(out)  # this writer's own: another name, and the other's kept
        assert mine != other and (other / "documents.jsonl").is_file()
    os.rmdir(mine)
    # an older citeqa's name (the pid alone) is never this process's: its lock says (an older
    # replica's of the same pid, writing, was deleted as this one's own debris)
    legacy = tmp_path / f".idx.tmp-{pid}"
    legacy.mkdir()
    with flock_held_elsewhere(legacy):
        assert writer_alive(legacy, writing=True)
    past = time.time() - CLAIM_GRACE_S - 5
    os.utime(legacy, (past, past))
    assert not writer_alive(legacy, writing=True)  # unlocked, and not just made: dead


def test_a_build_removes_a_backup_a_dead_writer_of_its_pid_left(tmp_path: Path) -> None:
    """A restarted container's pid 1 with another token: the dead writer's backup, a whole
    index copy, was kept by every build (only a load removed it)."""
    from citeqa.config import preset
    from citeqa.retrieval import build_index_from_documents
    from citeqa.retrieval.store import prepare
    from citeqa.types import Document

    out = tmp_path / "idx"
    build_index_from_documents([Document("d", "t", "s", "Some text here.")], out,
                               preset("tiny").retrieval, progress=False)
    backup = tmp_path / f".idx.old-{os.getpid()}-aaaaaaaa"
    shutil.copytree(out, backup)
    tmp = prepare(out)
    assert not backup.exists() and tmp.is_dir()


def test_of_two_backups_dead_writers_left_the_newest_is_restored(tmp_path: Path) -> None:
    """Two interrupted swaps: the older backup holds what the newer one replaced."""
    from citeqa.atomic import recover_dir

    for content, mtime in (("old", 1000), ("new", 2000)):
        backup = tmp_path / f".rm.old-{_dead_pid()}"
        backup.mkdir()
        (backup / "weights").write_text(content)
        os.utime(backup, (mtime, mtime))
    assert (recover_dir(tmp_path / "rm") / "weights").read_text() == "new"


def test_a_swap_killed_between_its_renames_is_undone_after_a_restart_of_the_same_pid(
        tmp_path: Path, monkeypatch) -> None:
    """A container's pid 1 killed between replace_dir's renames, restarted as pid 1 again (a
    writer token of its own): its backup must read as dead and be restored (named by pid and
    token, it read as a live writer's of pid 1, and ``out`` stayed missing)."""
    from citeqa import atomic

    out = tmp_path / "export"
    out.mkdir()
    (out / "weights").write_text("saved")
    renames = 0
    real = os.rename

    def killed_at_the_second(a: object, b: object) -> None:
        nonlocal renames
        renames += 1
        if renames == 2:
            raise KeyboardInterrupt  # the process dies here
        real(a, b)

    monkeypatch.setattr(atomic.os, "rename", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(atomic.fresh_tmp_dir(out), out)
    monkeypatch.setattr(atomic.os, "rename", real)
    assert not out.exists()
    monkeypatch.setattr(atomic, "_WRITER_TOKEN", "0123abcd")  # the restarted process
    assert (atomic.recover_dir(out) / "weights").read_text() == "saved"


def test_a_file_and_a_swapped_directory_are_flushed_to_disk_before_they_count(
        tmp_path: Path, monkeypatch) -> None:
    """Durability, not just atomicity: the new file's bytes are fsynced before the rename
    puts them in place, and a swapped-in directory's parent entry after it (a power cut could
    otherwise leave an empty file, or the old directory, under the new name)."""
    import citeqa.atomic as atomic

    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace",
                        lambda a, b: (events.append("replace"), replace(a, b))[1])
    write_text_atomic(tmp_path / "f.txt", "x")
    assert events == ["fsync", "replace"]

    events.clear()
    out = tmp_path / "out"
    tmp = atomic.fresh_tmp_dir(out)
    (tmp / "a").write_text("a")
    atomic.replace_dir(tmp, out)
    assert events == ["fsync"] and (out / "a").read_text() == "a"


def test_a_quota_exceeded_is_a_full_disk() -> None:
    from citeqa.atomic import disk_full

    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not disk_full(OSError(errno.EROFS, "Read-only file system"))


def test_a_temporary_directory_gets_exactly_the_mode_asked_whatever_the_umask(
        tmp_path: Path) -> None:
    from citeqa.atomic import discard_tmp_dir, new_tmp_dir

    umask = os.umask(0o077)
    try:
        tmp = new_tmp_dir(tmp_path / "out", 0o775)
    finally:
        os.umask(umask)
    try:
        assert os.stat(tmp).st_mode & 0o777 == 0o775
    finally:
        discard_tmp_dir(tmp)

