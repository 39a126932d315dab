"""The C library's heap, tuned for a daemon that holds a large index: a few calls into glibc's malloc.

- :func:`tune_heap`, first thing at start:
  - glibc gives each thread that allocates an arena of its own (up to eight a core), and
    each keeps what its thread freed. The guardian's worker threads take turns on
    requests, so each arena grew to hold the temporaries of the largest request it had
    run: at a million memories the peak RSS was 2-3 MiB higher with them than with two
    arenas shared by all threads (four runs of the same mixed load).
  - Blocks of 1 MiB or more are mappings of their own, always. glibc's threshold moves
    otherwise: each large block freed raises it (up to 32 MiB), so the load's large
    temporaries came from the heap and left it holes that later requests' temporaries
    brought back into RSS (at 1M, 15 s of searches: a peak 3-4 MiB higher, two runs each).
    A search's temporaries stay under it (guardian/recall/index.py scores 768 KiB of
    float32 at a time), so they are reused heap, never fresh mappings faulted in page by
    page (a lower threshold made a search at 1M take 30 ms instead of 11).
- :func:`give_back_freed_memory`, after each batch of the vector index's load and once
  it is done: the heap pages its batches freed go back to the system instead of staying
  resident (at a million vectors they piled up to 40 MB over the index's own: in process,
  a peak RSS of 325 MB against 366).

Each does nothing where the C library is not glibc (no ``mallopt`` or ``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Final

__all__ = ["give_back_freed_memory", "tune_heap"]

#: glibc's M_ARENA_MAX and M_MMAP_THRESHOLD (malloc.h).
_M_ARENA_MAX: Final = -8
_M_MMAP_THRESHOLD: Final = -3
#: Blocks at least this large are mapped on their own (and unmapped when freed).
_MMAP_THRESHOLD_BYTES: Final = 1024 * 1024
#: Arenas shared by every thread: the cores of the machines the bench measures on; Python's
#: GIL keeps the threads from contending for them much.
_ARENAS: Final = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def tune_heap() -> None:
    """Every thread shares :data:`_ARENAS` heap arenas, and blocks of :data:`_MMAP_THRESHOLD_BYTES` or more are
    mappings of their own; call before the first thread starts."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(_M_ARENA_MAX, _ARENAS)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def give_back_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (glibc keeps them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)
