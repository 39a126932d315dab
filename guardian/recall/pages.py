"""Arrays of zeros that, when large, are pages mapped for them alone: freed, they go back to the system at once.

The vector index keeps each list's vectors in an array of a few hundred KiB that is
copied into a larger one as the list grows (guardian/recall/index.py). From glibc's
heap, every such copy left the old array behind as a hole that later arrays seldom
fit, and glibc maps a block of its own only above a threshold that rises as soon as
mapped blocks are freed (guardian/daemon/heap.py now fixes it at 1 MiB); at a million
vectors the holes and the room reserved ahead came to some 30 MB of resident memory
over the vectors' own (measured in process). An array of :data:`MAPPED_MIN_BYTES` or
more made here is an anonymous mapping of its own: unmapped when the array is
collected, and its pages resident only once written, so room reserved ahead costs
nothing until used. Smaller ones come from numpy as usual (a mapping per small list
would use up the process's map count with many namespaces). Only the index's
long-lived arrays are made here: a search's temporaries stay in the heap, where they
reuse warm pages (a mapping per temporary cost a search at a million vectors 3 times
its time in page faults, measured).
"""

from __future__ import annotations

import math
import mmap
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["MAPPED_MIN_BYTES", "zeros"]

#: Arrays this large or larger get pages of their own (a list of some 340 vectors or more).
MAPPED_MIN_BYTES: Final = 64 * 1024


def zeros(shape: tuple[int, ...], dtype: type[Any]) -> npt.NDArray[Any]:
    """A writable array of zeros, in a mapping of its own when it takes MAPPED_MIN_BYTES or more."""
    count = math.prod(shape)
    size = count * np.dtype(dtype).itemsize
    if size < MAPPED_MIN_BYTES:
        return np.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # anonymous, zero-filled; unmapped with its last reference
    return np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)
