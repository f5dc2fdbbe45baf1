"""The numeric core's array-API glue: which namespace, which device, two reductions.

Every function of the numeric core that takes or returns arrays asks its inputs for
their namespace (``array_api_compat.array_namespace``): NumPy arrays get
``array_api_compat.numpy``, torch tensors ``array_api_compat.torch``, any library
that implements the standard its own namespace. Results are computed with that
namespace and stay on the input's device (a CUDA tensor stays on CUDA). Nothing here
imports a framework: array-api-compat looks a library up in ``sys.modules`` only when
an object of that library is passed in.

NumPy keeps its own routine where the array API's differs in rounding: the L2 norm
and the dot product are ``np.linalg.norm`` / ``np.vdot`` (one BLAS dot) for NumPy
arrays, as before the numeric core moved to the array API, so NumPy results are the
same to the last bit; other namespaces use ``linalg.vector_norm`` / ``vecdot``
(the same numbers up to the order of the summation).

NumPy arrays get NumPy itself as their namespace where NumPy's main namespace is the
array API (2.1 and later: 2023.12, with ``astype`` and ``asarray(device=)``), and
``array_api_compat.numpy`` only on older NumPy. The wrapper copies every NumPy name
at import, which loads numpy.f2py and numpy.testing: 0.4-0.5 s added to
``import gradcheck`` on this project's machine, for functions that are NumPy's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import is_array_api_obj, is_numpy_namespace

from gradcheck.errors import InvalidArgumentError

#: An array of any array-API library (numpy.ndarray, torch.Tensor, ...). The array
#: API has no common base class to annotate with.
Array = Any
#: An array-API namespace (a module such as ``array_api_compat.torch``).
Namespace = Any

__all__ = [
    "Array",
    "Namespace",
    "abs_dot",
    "as_float64",
    "device",
    "is_numpy",
    "namespace",
    "norm",
    "norms",
    "numpy_namespace",
    "size",
    "to_host",
    "to_namespace",
    "vdot",
    "vdots",
]


#: NumPy's main namespace is array-API code (2023.12) from 2.1 on.
_NUMPY_IS_ARRAY_API = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 1)


def numpy_namespace() -> Namespace:
    """The namespace of NumPy arrays (and host values): NumPy itself where it is
    array-API code, else array-api-compat's wrapper (imported on first use)."""
    if _NUMPY_IS_ARRAY_API:
        return np
    import array_api_compat.numpy

    return array_api_compat.numpy


def namespace(*xs: object) -> Namespace:
    """The array-API namespace of the arrays among ``xs``.

    Python and NumPy scalars, lists and None count as NumPy (they are host values and
    combine with any library's arrays); with no array among ``xs`` the answer is
    NumPy's. Arrays of two libraries raise InvalidArgumentError: one numeric call
    works in one namespace."""
    arrays = [x for x in xs if is_array_api_obj(x) and not isinstance(x, np.generic)]
    if all(type(x) is np.ndarray for x in arrays):  # also: no array at all
        return numpy_namespace()
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({f"{type(x).__module__}.{type(x).__name__}" for x in arrays})
        raise InvalidArgumentError(
            f"the numeric core got arrays of more than one library ({', '.join(kinds)}) "
            "in one call; convert them to one library (and one device) first"
        ) from err


def is_numpy(xp: Namespace) -> bool:
    return bool(is_numpy_namespace(xp))


def device(x: Array) -> Any:
    """The device ``x`` lives on ("cpu" for NumPy arrays and host scalars)."""
    if isinstance(x, np.generic) or not is_array_api_obj(x):
        return "cpu"
    return array_api_compat.device(x)


def as_float64(x: object, xp: Namespace, dev: Any = None) -> Array:
    """``x`` (an array of ``xp`` or a host value) as a float64 array of ``xp`` on
    ``dev`` (default: where ``x`` is). The numeric core computes in float64; a
    device without it (Apple's MPS, array_api_strict's "no_float64") raises
    InvalidArgumentError saying so, not the library's own error."""
    try:
        if dev is None:
            return xp.asarray(x, dtype=xp.float64)
        return xp.asarray(x, dtype=xp.float64, device=dev)
    except Exception as err:
        where = device(x) if dev is None else dev
        if _lacks_float64(xp, where):
            raise InvalidArgumentError(
                f"the numeric core computes in float64, which {xp.__name__} does "
                f"not support on device {where}: give it values on a device with "
                "float64 (the CPU), e.g. float64 copies of the outputs and gradients"
            ) from err
        raise


def _lacks_float64(xp: Namespace, dev: Any) -> bool:
    try:
        info = xp.__array_namespace_info__()
        return "float64" not in info.dtypes(device=dev, kind="real floating")
    except Exception:  # no inspection API: nothing to say beyond the error itself
        return False


def to_namespace(host: np.ndarray, like: Array | None) -> Array:
    """A NumPy float64 array moved into ``like``'s namespace and onto its device
    (``host`` itself where ``like`` is None or a NumPy array: no copy)."""
    if like is None:
        return host
    xp = namespace(like)
    if is_numpy(xp):
        return host
    return as_float64(host, xp, device(like))


def to_host(x: Array | None) -> np.ndarray | None:
    """``x`` as a float64 NumPy array on the host (None stays None): ``x`` itself
    for a float64 NumPy array, one copy otherwise (a device-to-host copy for an
    accelerator's array; a float64 CPU tensor may share its memory). For what is
    not on the hot path: a failed check's diagnosis reads its gradients and
    directions on the host."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x if x.dtype == np.float64 else x.astype(np.float64)
    if str(device(x)) != "cpu":
        try:
            x = array_api_compat.to_device(x, "cpu")
        except (TypeError, ValueError, RuntimeError):  # no device named "cpu"
            pass  # (DLPack or NumPy's conversion below may still read it)
    try:  # the array API's exchange protocol: no copy of a CPU array
        host = np.from_dlpack(x)
    except (AttributeError, BufferError, RuntimeError, TypeError):
        host = np.asarray(x)  # (a library without DLPack, or a layout it refuses)
    return host if host.dtype == np.float64 else host.astype(np.float64)


def size(x: Array) -> int:
    """The number of elements of ``x`` (the array API's ``size`` is None for
    some lazy arrays, and torch's ``.size`` is a method)."""
    n = 1
    for s in x.shape:
        n *= int(s)
    return n


def _host_view(x: Array) -> np.ndarray | None:
    """A NumPy array sharing ``x``'s memory where ``x`` is on the CPU and
    exchanges it through DLPack (a torch CPU tensor); None otherwise."""
    if isinstance(x, np.ndarray):
        return x
    if str(device(x)) != "cpu":
        return None
    try:
        return np.from_dlpack(x)
    except (AttributeError, BufferError, RuntimeError, TypeError):
        return None


def norm(x: Array) -> float:
    """The L2 norm of all elements of ``x``, a Python float (a device sync where
    ``x`` lives on an accelerator). Arrays in host memory, NumPy's or another
    library's (read through DLPack, no copy), are reduced by NumPy's own routine:
    a torch CPU tensor gives the bits its NumPy copy gives."""
    return norms([x])[0]


def vdot(a: Array, b: Array) -> float:
    """sum(conj(a) * b) over all elements of two same-size arrays, a Python float
    (host arrays reduced by np.vdot, as ``norm`` says)."""
    return vdots([a], [b])[0]


def norms(
    xs: Sequence[Array | None], *, host: Callable[[np.ndarray], Any] | None = None
) -> list[float]:
    """``norm`` of each array (0.0 for None); arrays off the host are reduced on
    their devices and read together: one transfer of a few scalars per device,
    not a synchronisation per array (a model of hundreds of tensors on a GPU).
    ``host``: the routine for host arrays instead of ``np.linalg.norm`` (a caller
    that reads large arrays a piece at a time)."""
    host = host or np.linalg.norm  # BLAS dot: unchanged NumPy results
    return _scalars(
        [None if x is None else (x,) for x in xs],
        lambda x, xp: xp.linalg.vector_norm(x[0]),
        lambda x: host(x[0]),
    )


def vdots(
    a: Sequence[Array | None],
    b: Sequence[Array | None],
    *,
    host: Callable[[np.ndarray, np.ndarray], Any] | None = None,
) -> list[float]:
    """``vdot`` of each pair (0.0 where either is None), read as ``norms`` reads
    its results; ``host``: the routine for host arrays instead of ``np.vdot``."""
    host = host or np.vdot
    if len(a) != len(b):
        raise InvalidArgumentError(f"vdots of {len(a)} and {len(b)} arrays")
    pairs = [
        None if x is None or y is None else (x, y) for x, y in zip(a, b, strict=True)
    ]
    return _scalars(
        pairs,
        lambda p, xp: xp.vecdot(xp.reshape(p[0], (-1,)), xp.reshape(p[1], (-1,))),
        lambda p: host(p[0], p[1]),
    )


def _scalars(
    items: Sequence[tuple[Array, ...] | None],
    device_op: Callable[[tuple[Array, ...], Namespace], Array],
    numpy_op: Callable[[tuple[np.ndarray, ...]], Any],
) -> list[float]:
    out: list[Any] = [0.0] * len(items)
    groups: dict[tuple[int, str], tuple[Namespace, list[int]]] = {}
    for i, arrays in enumerate(items):
        if arrays is None:
            continue
        xp = namespace(*arrays)
        views = [_host_view(x) for x in arrays]
        if all(v is not None for v in views):
            out[i] = float(numpy_op(tuple(views)))
            continue
        out[i] = device_op(arrays, xp)
        key = (id(xp), str(device(arrays[0])))
        groups.setdefault(key, (xp, []))[1].append(i)
    for xp, where in groups.values():
        stacked = xp.stack([out[i] for i in where])
        try:  # one transfer (torch: "cpu" is the host)
            host = np.asarray(array_api_compat.to_device(stacked, "cpu")).tolist()
        except (TypeError, ValueError, RuntimeError):  # no device named "cpu"
            host = [float(stacked[j]) for j in range(len(where))]
        for i, v in zip(where, host, strict=True):
            out[i] = float(v)
    return out


def abs_dot(a: Array, b: Array) -> float:
    """sum(|a * b|) over all elements, a Python float: the rounding scale of a
    projection <a, b> (the same reduction as NumPy's ``np.abs(a * b).sum()``)."""
    xp = namespace(a, b)
    return float(xp.sum(xp.abs(a * b)))
