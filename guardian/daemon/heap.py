"""The C library's heap, tuned for a daemon that holds a large index: two calls into glibc's malloc.

- :func:`use_few_arenas`, first thing at start: glibc gives each thread that allocates an
  arena of its own (up to eight a core), and each keeps what its thread freed. The
  guardian's worker threads take turns on requests, so each arena grew to hold the
  temporaries of the largest request it had run: at a million memories the peak RSS was
  2-3 MiB higher with them than with two arenas shared by all threads (four runs of
  the same mixed load).
- :func:`give_back_freed_memory`, after each batch of the vector index's load and once
  it is done: the heap pages its batches freed go back to the system instead of staying
  resident (at a million vectors they piled up to 40 MB over the index's own: in process,
  a peak RSS of 325 MB against 366).

Both do nothing where the C library is not glibc (no ``mallopt`` or ``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Final

__all__ = ["give_back_freed_memory", "use_few_arenas"]

#: glibc's M_ARENA_MAX (malloc.h).
_M_ARENA_MAX: Final = -8
#: Arenas shared by every thread: the cores of the machines the bench measures on; Python's
#: GIL keeps the threads from contending for them much.
_ARENAS: Final = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def use_few_arenas() -> None:
    """Have every thread share :data:`_ARENAS` heap arenas; call before the first thread starts."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().mallopt(_M_ARENA_MAX, _ARENAS)


def give_back_freed_memory() -> None:
    """Hand the heap pages freed so far back to the system (glibc keeps them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)
