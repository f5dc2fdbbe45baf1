"""Host float64 work buffers kept from one check to the next.

A float32 check evaluates fn twice more on float64 copies of the parameters
(``TorchSession._as64``) at x + t d (``TorchSession._scratch``). Each copy is a
fresh parameter-sized allocation, and on the host a fresh allocation of a few MB
comes from the kernel as untouched pages: writing them costs a page fault per
4 KB, more than the conversion itself (1M parameters: ~1 ms of faults for a
~0.2 ms copy into memory already touched). A check that runs again (a test suite,
an audit, a benchmark, a training loop that checks every N steps) gets the same
shapes again, so its buffers are handed back here when a session closes and
reused by the next one.

Only the storage is reused, never the values: every session fills each buffer
from the tensor it copies before reading it (``copy_``), so a parameter changed
in place between two checks, through ``p.data`` or an optimizer step, is seen
exactly; no version counter or pointer has to prove a cached copy fresh.

What is kept is bounded (:data:`LIMIT_BYTES`, oldest dropped first) and host only:
a CUDA caching allocator reuses device memory by itself, and holding device memory
between checks would take it from the user's model. A model whose buffers exceed
the bound keeps none (a 110M-parameter BERT would otherwise hold ~1.8 GB of
float64 copies between checks).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

#: Most bytes kept between checks (all shapes together).
LIMIT_BYTES = 256 * 2**20

_lock = threading.Lock()
#: (dtype, shape) -> free buffers, least recently released first overall
_free: OrderedDict[tuple[torch.dtype, tuple[int, ...], int], torch.Tensor] = (
    OrderedDict()
)
_serial = 0
_held = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def take(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialised contiguous tensor: a released one of this shape and dtype
    where there is one (host only), else a new one. The caller owns it until it
    gives it back with :func:`give`."""
    global _held
    shape = tuple(shape)
    if torch.device(device).type == "cpu":
        with _lock:
            for key in _free:
                if key[0] == dtype and key[1] == shape:
                    buf = _free.pop(key)
                    _held -= _nbytes(buf)
                    return buf
    return torch.empty(shape, dtype=dtype, device=device)


def give(bufs: list[torch.Tensor]) -> None:
    """Hand buffers back for later sessions (host ones, within LIMIT_BYTES; the
    oldest are dropped first). The caller must not use them afterwards."""
    global _serial, _held
    with _lock:
        for buf in bufs:
            size = _nbytes(buf)
            if buf.device.type != "cpu" or size > LIMIT_BYTES or size == 0:
                continue
            _serial += 1
            _free[(buf.dtype, tuple(buf.shape), _serial)] = buf
            _held += size
        while _held > LIMIT_BYTES and _free:
            _, old = _free.popitem(last=False)
            _held -= _nbytes(old)


def held_bytes() -> int:
    """Bytes kept for later sessions now."""
    with _lock:
        return _held


def clear() -> None:
    """Drop every kept buffer."""
    global _held
    with _lock:
        _free.clear()
        _held = 0
