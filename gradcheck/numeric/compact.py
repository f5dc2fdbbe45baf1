"""Per-tensor arrays held in a narrower dtype and read as float64.

A directional check of a large model holds two full-size sets of arrays on the
host besides the model: its gradients and its probe direction. In float64 each set
is twice the size of a float32 model (BERT-base: 0.88 GB each), which made a check's
peak memory 1.7x that of an Adam training step (issue 17: "a check's peak memory
stays near an Adam step's"). Two facts let both sets live in float32 at no cost in
accuracy:

* a float32 model's gradient *is* float32: widening it to float64 adds nothing
  but memory, and widening it again on demand gives the same float64 numbers to
  the last bit;
* a probe direction is any vector the check chooses: rounding it to float32 once,
  before anything uses it, gives another direction, which every later use (the
  perturbed points x + t d, the dot products <g, d>, blame's bisection) then shares
  exactly.

:class:`Widened` is the container: a sequence of per-tensor arrays that hands out
float64 arrays (fresh ones for narrow entries, at most one tensor's worth at a
time for a caller that iterates), so code written for lists of float64 arrays runs
unchanged and computes in float64 (no float32 dot product or norm, whose rounding
would be as large as the errors the check looks for). Backends that can use the
narrow arrays directly (to form x + t d in float64 without a float64 copy of d)
read :attr:`Widened.narrow`.

Only what the caller asks for is compact: the finite-difference engine uses it for
models of at least ``finite_difference.COMPACT_MIN_ELEMENTS`` elements, where the
memory matters and one float64 copy per tensor per pass costs little next to a
forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from gradcheck.numeric.arrays import Array, as_float64, namespace

__all__ = ["PIECE", "Widened", "narrow", "piece_sum", "pieces", "subset"]


class Widened(Sequence[Any]):
    """Per-tensor arrays (None for "no array") read as float64 arrays.

    ``narrow`` holds the arrays as stored (float32, or float64 where a tensor is
    float64 already: handed out as is, no copy). Indexing and iteration widen one
    entry at a time; a slice is a Widened of the same arrays."""

    __slots__ = ("narrow",)

    def __init__(self, arrays: Iterable[Array | None]):
        self.narrow: list[Array | None] = list(arrays)

    def __len__(self) -> int:
        return len(self.narrow)

    @overload
    def __getitem__(self, i: int) -> Array | None: ...

    @overload
    def __getitem__(self, i: slice) -> Widened: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return Widened(self.narrow[i])
        return _wide(self.narrow[i])

    def __iter__(self) -> Iterator[Array | None]:
        for a in self.narrow:
            yield _wide(a)

    def shapes(self) -> list[tuple[int, ...] | None]:
        """Each entry's shape (None for a None entry), without widening."""
        return [None if a is None else tuple(a.shape) for a in self.narrow]

    def sizes(self) -> list[int]:
        """Each entry's number of elements (0 for a None entry), without widening."""
        return [
            0 if a is None else int(np.prod(a.shape, dtype=np.int64))
            for a in self.narrow
        ]

    def nbytes(self) -> int:
        return sum(int(getattr(a, "nbytes", 0)) for a in self.narrow if a is not None)

    def __repr__(self) -> str:
        dtypes = sorted({str(a.dtype) for a in self.narrow if a is not None})
        return f"Widened({len(self.narrow)} arrays, stored as {', '.join(dtypes)})"


def _wide(a: Array | None) -> Array | None:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a if a.dtype == np.float64 else a.astype(np.float64)
    return as_float64(a, namespace(a))


def narrow(arrays: Sequence[Array | None]) -> list[Array | None]:
    """The arrays as stored: a Widened's narrow list, a plain sequence as a list."""
    return list(arrays.narrow) if isinstance(arrays, Widened) else list(arrays)


def subset(
    arrays: Sequence[Array | None], keep: Iterable[int]
) -> Widened | list[Array | None]:
    """``arrays`` with every entry not in ``keep`` set to None, of the same kind
    (a Widened stays compact: nothing is widened here)."""
    keep = set(keep)
    if isinstance(arrays, Widened):
        return Widened(a if t in keep else None for t, a in enumerate(arrays.narrow))
    return [a if t in keep else None for t, a in enumerate(arrays)]


#: Elements per piece of a piecewise pass (8 MB per float64 operand).
PIECE = 1 << 20


def pieces(*arrays: Array | None) -> Iterator[tuple[int, list[Array | None]]]:
    """Host arrays of the same number of elements (None stays None), read flat a
    PIECE of elements at a time as float64: (offset, pieces). A pass over one
    tensor's arrays then holds a few float64 pieces, not a float64 copy of each
    whole operand and of every intermediate (BERT-base's 23M-element embedding:
    188 MB per float64 operand)."""
    flats = [None if a is None else np.reshape(np.asarray(a), -1) for a in arrays]
    n = max((f.size for f in flats if f is not None), default=0)
    for i in range(0, n, PIECE):
        yield (
            i,
            [
                None if f is None else f[i : i + PIECE].astype(np.float64, copy=False)
                for f in flats
            ],
        )


def piece_sum(fn: Any, *arrays: Array | None) -> float:
    """sum of ``fn(*pieces)`` over :func:`pieces` of ``arrays``, in float64."""
    return sum((float(fn(*p)) for _, p in pieces(*arrays)), 0.0)
