"""Parameter-sized host arrays reused from one check to the next.

A check of a 1M-parameter model allocates a few float64 arrays of 8 MB (the
probe direction, the gradients read from the framework). Fresh allocations of
that size come from the kernel as untouched pages, and writing them costs a page
fault per 4 KB: on the bench's MLP more than the arithmetic done in them. A check
run again (a test suite, an audit, a training loop checking every N steps) asks
for the same shapes, so :func:`empty` hands back an array it gave out before,
once nothing else refers to it any more.

"Nothing else refers to it" is read from CPython's reference count: the array is
reused only when the workspace's own list holds the sole reference (no view, no
tensor sharing its memory through ``torch.from_numpy``, no report keeping it).
Where reference counts cannot be read, nothing is reused. The values are never
reused: the caller writes every element before reading it, as with np.empty.
What is kept is bounded by :data:`LIMIT_BYTES`, so a large model holds nothing
between checks.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

#: Most bytes kept between checks.
LIMIT_BYTES = 256 * 2**20
#: Arrays below this size come from NumPy directly (its allocator reuses them).
MIN_BYTES = 1 << 18

_lock = threading.Lock()
_kept: list[np.ndarray] = []
_refcount = getattr(sys, "getrefcount", None)


def empty(shape: tuple[int, ...], dtype: np.dtype | type = np.float64) -> np.ndarray:
    """np.empty(shape, dtype), from an array handed out before and no longer
    referenced where there is one of that shape and dtype."""
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or nbytes > LIMIT_BYTES or _refcount is None:
        return np.empty(shape, dtype)
    with _lock:
        for i in range(len(_kept)):  # (enumerate's tuple would hold a reference)
            a = _kept[i]
            # unreferenced elsewhere: the list's reference, the local variable's
            # and getrefcount's argument are all there is
            if a.shape == shape and a.dtype == dtype and _refcount(a) <= 3:
                del _kept[i]  # (by position: == on arrays compares elements)
                _kept.append(a)  # most recently used last
                return a
        out = np.empty(shape, dtype)
        _kept.append(out)
        total = sum(a.nbytes for a in _kept)
        while total > LIMIT_BYTES and _kept:
            total -= _kept.pop(0).nbytes  # the oldest first; in use, it lives on
    return out


def held_bytes() -> int:
    with _lock:
        return sum(a.nbytes for a in _kept)


def clear() -> None:
    with _lock:
        _kept.clear()
