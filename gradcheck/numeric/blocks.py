"""Full-size host passes run a cache-sized block at a time.

A float32 check of a 1M-parameter model reads each parameter-sized array several
times: the gradient for its norm, the gradient and the Gaussian samples for the
probe direction (numeric.directions.streamed_probe_direction). Each
whole-array NumPy operation streams its operands from memory and writes a
full-size result, and on a 2-core machine those passes are memory-bound: the
direction's three passes took 2.3 ms on warm arrays and 3.4-3.9 ms inside a check
(Intel Xeon, issue 12). Done a block at a time, the block's float64 widening and
intermediate results stay in a core's L2 cache while several things are computed
from them, so each large array is read once and each result written once.

The passes here are NumPy code on host arrays of any floating dtype, read as their
exact float64 widening: a float32 array is never widened whole (no float64 copy),
and no sum accumulates in float32 (whose rounding is as large as the errors a
check looks for). Each thread has its own block buffer (allocated once: a fresh
256 KB array comes from the kernel as untouched pages).
"""

from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["BLOCK", "buffer", "host_norm"]

#: Elements per block (a float64 block: 256 KB, in a core's L2 cache).
BLOCK = 1 << 15
_local = threading.local()


def buffer() -> np.ndarray:
    """This thread's float64 block buffer of BLOCK elements."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size != BLOCK:
        buf = _local.buf = np.empty(BLOCK)
    return buf


def host_norm(x: np.ndarray) -> float:
    """The L2 norm of a host array read as float64: NumPy's own routine for a
    float64 array (bit for bit ``np.linalg.norm``), a float64 sum of squares over
    blocks of its exact widening for a narrower one (a float32 gradient)."""
    if x.dtype == np.float64:
        return float(np.linalg.norm(x))
    flat = np.reshape(x, -1)
    buf = buffer()
    total = 0.0
    for i in range(0, flat.size, BLOCK):
        w = buf[: min(BLOCK, flat.size - i)]
        np.copyto(w, flat[i : i + BLOCK])
        total += float(np.dot(w, w))
    return math.sqrt(total)
