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


@pytest.mark.parametrize("off", ["0", "false", "off", " NO "])
def test_the_environment_turns_it_off(off: str) -> None:
    libc = FakeLibc()
    assert not keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": off}, libc=lambda: libc)
    assert libc.calls == []


def test_another_c_library_or_a_refusal_leaves_it_off(caplog) -> None:
    assert not keep_freed_memory({}, libc=lambda: None)
    refusing = FakeLibc(answer=0)
    assert not keep_freed_memory({"CITEQA_KEEP_FREED_MEMORY": "1"}, libc=lambda: refusing)
    assert "refused" in caplog.text


MEASURE = """
import ctypes, sys
import torch
from citeqa.allocator import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory({})
mapped = []
for _ in range(3):  # a 4 MiB tensor made and freed, as an activation is
    t = torch.ones(1024, 1024)
    mapped.append(libc.mallinfo2().hblkhd)
    del t
print(max(mapped) - libc.mallinfo2().hblkhd, libc.mallinfo2().hblks)
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc only: mallopt and mallinfo2")
def test_on_glibc_a_freed_activation_is_no_longer_mapped_and_unmapped() -> None:
    """Measured in fresh processes: by default each 4 MiB tensor is a fresh mapping (mapped
    bytes rise while it lives); with freed memory kept it comes from the heap."""
    def run(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0])

    assert run("default") >= 4 * 1024 * 1024  # the first tensor was mapped, then unmapped
    assert run("keep") == 0
