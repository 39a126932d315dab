"""How the guardian uses the C library's allocator: large blocks mapped on their own, freed pages handed back.

The vector index keeps its vectors in numpy arrays, a few hundred KiB each (guardian/recall/index.py),
that grow as memories are stored. glibc serves blocks over its mmap threshold with a mapping of their
own, returned to the system the moment they are freed, and rounds the rest out of the heap, where a
grown list leaves its old block behind as a hole. By default that threshold rises (up to 32 MiB) each
time a mapped block is freed, so after the first few the index's arrays all land in the heap: at a
million vectors its holes and the room reserved ahead for the lists came to some 30 MB of resident
memory over the vectors' own (measured in process). Fixed at 128 KiB, a list's array is a mapping:
growing it copies it into a new one and unmaps the old, and pages reserved ahead but never written
are never resident. Nothing changes where the C library has no mallopt (another libc).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Final

__all__ = ["give_back_freed_memory", "map_large_blocks"]

#: glibc's mallopt parameter number for the mmap threshold (M_MMAP_THRESHOLD in malloc.h).
_M_MMAP_THRESHOLD: Final = -3
#: Blocks this large or larger get a mapping of their own (glibc's own starting value, kept from rising).
MMAP_THRESHOLD_BYTES: Final = 128 * 1024


def map_large_blocks() -> bool:
    """Fix the mmap threshold at :data:`MMAP_THRESHOLD_BYTES` (before the threads start); whether it took."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return False


def give_back_freed_memory() -> None:
    """Hand the free pages in the heap back to the system (glibc keeps them otherwise); nothing where the
    C library has no malloc_trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
