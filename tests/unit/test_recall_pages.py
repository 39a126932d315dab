"""guardian/recall/pages.py: the index's large arrays are mappings of their own, given back when dropped."""

from __future__ import annotations

import mmap

import numpy as np

from guardian.recall import pages


def _resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _memory_of(array: np.ndarray) -> object:
    """What holds an array's bytes, down its chain of bases (a memoryview: the object it views)."""
    holder: object = array
    while isinstance(holder, np.ndarray) and holder.base is not None:
        holder = holder.base
    return holder.obj if isinstance(holder, memoryview) else holder


def test_a_large_array_is_zeroed_writable_pages_of_its_own_and_a_small_one_is_ordinary() -> None:
    large = pages.zeros((1000, 192), np.int8)  # a list of a thousand vectors
    assert large.shape == (1000, 192) and large.dtype == np.int8 and not large.any()
    assert isinstance(_memory_of(large), mmap.mmap)
    large[999, 191] = 7
    assert int(large[999, 191]) == 7
    small = pages.zeros((16,), np.float32)
    assert small.flags.owndata and small.dtype == np.float32 and not small.any()


def test_dropped_arrays_go_back_to_the_system_at_once_and_unwritten_room_is_never_resident() -> None:
    before = _resident_kib()
    reserved = [pages.zeros((4096, 192), np.int8) for _ in range(64)]  # 48 MiB of room, nothing written
    assert _resident_kib() - before < 8 * 1024
    for array in reserved:
        array[:] = 1
    written = _resident_kib()
    assert written - before >= 40 * 1024
    del reserved, array
    assert written - _resident_kib() >= 40 * 1024
