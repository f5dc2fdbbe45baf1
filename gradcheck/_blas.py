"""One host BLAS thread while a check runs.

A check's host arithmetic is a few dot products and norms of parameter-sized
float64 vectors per evaluation. NumPy hands each to its OpenBLAS, which splits
a 1M-element dot product over every core and wakes its thread pool for it. The
framework (torch's intra-op pool, TensorFlow's) owns those cores between these
calls, so on a small machine the two pools wait on each other: a helper measured
the float32 check of the bench's 1M-parameter MLP at 13.1x a training step in CPU
time with NumPy's default threads and 4.6x with ``OPENBLAS_NUM_THREADS=1`` (one
torch thread, 2 cores; README "Speed"). A memory-bound dot product gains nothing
from a second thread anyway.

:func:`single_threaded` sets the OpenBLAS that NumPy loaded to one thread for the
duration of a check and puts the previous count back afterwards, also when the
check raises. It finds the library among the process's loaded shared objects and
calls its own ``*_set_num_threads`` / ``*_get_num_threads`` entry points (what
threadpoolctl does, without the dependency). Where no OpenBLAS is loaded (MKL or
Accelerate builds of NumPy, another platform) it does nothing.

The setting is process-wide: NumPy BLAS calls made by other threads during the
check run single-threaded too. gradcheck's checks are not meant to run
concurrently with BLAS-heavy host work; the previous count is always restored.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

#: (get, set) pairs of OpenBLAS builds: scipy-openblas (NumPy >= 2 wheels, 64-bit
#: ints with a suffix), then plain OpenBLAS.
_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)

_lock = threading.Lock()
_depth = 0
_saved: int | None = None
_api: tuple[object, object] | None | bool = False  # False: not looked up yet


def _loaded_openblas() -> list[str]:
    """Paths of the loaded shared objects whose name says OpenBLAS (Linux's
    /proc/self/maps; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {
                line.split(None, 5)[-1].strip()
                for line in maps
                if "openblas" in line.lower() and ".so" in line
            }
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _find() -> tuple[object, object] | None:
    import numpy  # noqa: F401  (loads NumPy's BLAS before the lookup)

    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            get = getattr(lib, get_name, None)
            put = getattr(lib, set_name, None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                return get, put
    return None


def _functions() -> tuple[object, object] | None:
    global _api
    if _api is False:
        _api = _find()
    return _api  # type: ignore[return-value]


def threads() -> int | None:
    """OpenBLAS's current thread count, None where none is found."""
    api = _functions()
    return None if api is None else int(api[0]())  # type: ignore[operator]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """NumPy's OpenBLAS on one thread inside the block (nested blocks share the
    outermost's saved count), the previous count restored on exit."""
    global _depth, _saved
    api = _functions()
    if api is None:
        yield
        return
    get, put = api
    with _lock:
        if _depth == 0:
            _saved = int(get())  # type: ignore[operator]
            if _saved != 1:
                put(1)  # type: ignore[operator]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None and _saved != 1:
                put(_saved)  # type: ignore[operator]
