"""keep_freed_memory: glibc's thresholds set once asked, off by environment, nothing elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from citeqa.allocator import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD,
    TRIM_THRESHOLD,
    _glibc,
    keep_freed_memory,
)
from citeqa.errors import ConfigError


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_it_sets_the_mmap_and_trim_thresholds() -> None:
    libc = FakeLibc()
    assert keep_freed_memory({}, libc=lambda: libc)
    assert libc.calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    # glibc's own numbers (malloc.h) and its largest mmap threshold on 64-bit systems
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]


@pytest.mark.parametrize("off", ["0", "false", "off", " NO "])
def test_the_environment_turns_it_off(off: str) -> None:
    libc = FakeLibc()
    assert not keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": off}, libc=lambda: libc)
    assert libc.calls == []


@pytest.mark.parametrize("typo", ["of", "disable", "nein"])
def test_a_mistyped_value_is_refused_not_read_as_on(typo: str) -> None:
    libc = FakeLibc()
    with pytest.raises(ConfigError, match=f"CITEQA_KEEP_FREED_MEMORY must be one of .*'{typo}'"):
        keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": typo}, libc=lambda: libc)
    assert libc.calls == []
    for on in ("", " ", "1", "Yes", "on"):  # unset or empty: on, as by default
        assert keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": on}, libc=lambda: libc)


def test_another_c_library_or_a_refusal_leaves_it_off(caplog) -> None:
    assert not keep_freed_memory({}, libc=lambda: None)
    refusing = FakeLibc(answer=0)
    assert not keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": "1"}, libc=lambda: refusing)
    assert "refused" in caplog.text


MEASURE = """
import ctypes, sys
from citeqa.allocator import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory({})
size = 8 * 1024 * 1024  # an activation's size: above glibc's first mmap threshold (128 KiB)
block = libc.malloc(size)
ctypes.memset(block, 1, size)  # touched, as a tensor is
mapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks while it lives
libc.free(block)
after = libc.mallinfo2()
print(mapped - after.hblkhd, after.arena)  # unmapped by the free; the heap's size after it
"""


def _glibc_with_mallinfo2() -> bool:
    libc = _glibc()
    return libc is not None and hasattr(libc, "mallinfo2")  # glibc >= 2.33


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only: mallopt, mallinfo2")
def test_on_glibc_a_freed_block_stays_in_the_heap_instead_of_going_back() -> None:
    """Measured in fresh processes without torch: by default an 8 MiB block is a mapping of its
    own, unmapped when freed; with freed memory kept it comes from the heap, and the heap keeps
    it after the free (the trim threshold), ready for the next tensor."""
    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    unmapped, _ = run("default")
    assert unmapped >= 8 * 1024 * 1024  # mapped for the block, handed back at the free
    unmapped, heap = run("keep")
    assert unmapped == 0 and heap >= 8 * 1024 * 1024  # never mapped; still in the heap
