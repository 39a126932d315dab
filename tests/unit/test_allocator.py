"""guardian/daemon/allocator.py: with the mmap threshold fixed, freed index-sized arrays leave no resident memory.

Each case runs in a fresh interpreter: the threshold is process-wide and only rises once a mapped block is freed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from guardian.daemon.allocator import map_large_blocks

#: Frees a large array (which raises glibc's dynamic threshold), keeps 400 arrays of a list's size
#: (192 KiB) with a small block after each, frees every list's array, and prints how much resident
#: memory that gave back, in MiB.
_PROBE = """
import sys
import numpy as np
from guardian.daemon.allocator import map_large_blocks
if sys.argv[1] == "fixed":
    assert map_large_blocks()
def rss_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
big = np.ones(64 * 1024 * 1024, dtype=np.int8)
del big
lists, smalls = [], []
for _ in range(400):
    lists.append(np.ones(192 * 1024, dtype=np.int8))
    smalls.append(np.ones(4096, dtype=np.int8))
before = rss_kib()
del lists
print((before - rss_kib()) // 1024)
"""


def _given_back_mib(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(result.stdout)


def test_freed_list_sized_arrays_go_back_to_the_system_at_once() -> None:
    if not map_large_blocks():
        pytest.skip("this C library has no mallopt (not glibc)")
    assert _given_back_mib("default") < 10  # holes in the heap, still resident
    assert _given_back_mib("fixed") >= 70  # 400 x 192 KiB, each its own mapping
