"""Seeded probe directions and output cotangents.

A directional check compares D = d/dt phi(x + t d) at t=0 (finite differences) with
sum_t <g_t, d_t> (the framework's gradient). Plain Gaussian directions have two
blind spots that this module closes:

* scale: a tensor whose gradient is small next to the others would be drowned by
  their tolerance. Each tensor's direction is divided by its own gradient norm, so
  every tensor contributes O(1) to D and is judged at its own scale.
* unlucky projections: <g, z> ~ N(0, |g|^2) is below 0.1 |g| in 8% of draws, which
  would hide a tensor-wide scaling bug. Each direction gets an extra component
  ``ALIGNED * g/|g|``, so <g_t, d_t> = N(0,1) + 3 and a relative error delta in g_t
  moves D by about 3*delta. The sign is the same for every tensor so that a bug
  scaling several tensors alike (a wrong factor upstream) adds up instead of
  cancelling.

A single wrong element k still moves D by e_k * z_k / |g_t| (Gaussian z_k), which is
why the engine's tolerance is tight and blame bisects down to the element.

Array API: the gradients may be NumPy arrays or tensors of any array-API library
(torch through array-api-compat), each on its own device (a model split over two
GPUs); each direction is built in its gradient's namespace, on its device. The
randomness is the exception: the array API standard defines no random number
generation (no generator, no seeding: every library's RNG differs in algorithm and
state), so the draw is a parameter. A ``numpy.random.Generator`` draws on the host
(Box-Muller, ``gaussian``) and the samples are copied once to the gradient's device:
the same seed gives the same direction bit for bit whatever the library and device,
so a check replays anywhere. A backend that wants no host draw and no copy (a large
model on an accelerator) passes a ``Draw`` instead, e.g. ``torch.randn`` with a
``torch.Generator`` on the device, whose numbers are its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradcheck.errors import InvalidArgumentError
from gradcheck.numeric import blocks, workspace
from gradcheck.numeric.arrays import (
    Array,
    as_float64,
    device,
    namespace,
    norm,
    to_namespace,
)
from gradcheck.numeric.compact import Widened

#: Weight of the gradient-aligned component in units of the Gaussian part.
ALIGNED = 3.0
#: A tensor whose gradient norm is below FLOOR * (largest gradient norm) is
#: normalised by FLOOR * largest instead: its gradient is (close to) zero and its own
#: norm is rounding noise that must not be amplified.
FLOOR = 1e-2

#: Gradient norms between which a compact direction (1/norm in scale) is stored in
#: float32: 1e30 leaves 8 decades to float32's smallest normal number and
#: elements 1e3 below the scale still have full precision.
COMPACT_SCALES = (1e-30, 1e30)

#: A backend's own source of standard normal samples: ``draw(shape, like)`` returns
#: float64 N(0, 1) samples of ``shape`` in ``like``'s namespace and on its device
#: (``like`` is None where there is no array to follow: return NumPy's then).
Draw = Callable[[tuple[int, ...], Any], Array]
#: What the functions below draw from: a NumPy Generator (on the host, then copied
#: to the device) or a backend's Draw.
Random = np.random.Generator | Draw


def gaussian(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    *,
    like: Array | None = None,
    dtype: type = np.float64,
) -> Array:
    """Seeded standard normal samples (float64 array of ``shape``).

    Box-Muller on float32 uniforms: an exact Gaussian transform, ~3x faster than
    NumPy's ziggurat here (2.5 ms vs 7.5 ms per million), which matters when a
    check of a 1M-parameter model should cost a few training steps. The transform
    runs in place on the uniforms (no further full-size temporaries, whose fresh
    pages cost as much as the math). The samples are float32 values, so
    ``dtype=np.float32`` (NumPy only) gives the same numbers without a float64
    array.

    Drawn on the host with NumPy (the array API has no RNG); with ``like`` (an array
    of any array-API library) the samples are returned in its namespace, on its
    device: the same numbers, one host-to-device copy."""
    n = math.prod(int(s) for s in shape)
    half = (n + 1) // 2
    u = rng.random((2, half), dtype=np.float32)
    radius, angle = u[0], u[1]
    # radius = sqrt(-2 log(1 - u0)), angle = 2 pi u1: the same float32 operations
    # as those expressions, written into the uniforms' own storage
    np.negative(radius, out=radius)
    np.log1p(radius, out=radius)  # 1 - u in (0, 1]: log is finite
    np.multiply(radius, np.float32(-2.0), out=radius)
    np.sqrt(radius, out=radius)
    np.multiply(angle, np.float32(2 * np.pi), out=angle)
    if dtype == np.float32:
        low = np.empty(2 * half, dtype=np.float32)
        np.cos(angle, out=low[:half])
        np.sin(angle, out=low[half:])
        low[:half] *= radius
        low[half:] *= radius
        return low[:n].reshape(shape)
    out = np.empty(2 * half, dtype=np.float64)
    trig = np.empty(half, dtype=np.float32)  # float32 products stored in float64
    np.multiply(radius, np.cos(angle, out=trig), out=out[:half])
    np.multiply(radius, np.sin(angle, out=trig), out=out[half:])
    return to_namespace(out[:n].reshape(shape), like)


#: The Gaussian part of the last host probe direction drawn, kept for the next
#: check that starts from the same generator state with the same shapes (a check
#: run again with its seed on the same model: a test suite, an audit, a training
#: loop checking every N steps): (generator state, shapes, samples, state after).
#: Only for at least MEMO_MIN_ELEMENTS and at most MEMO_MAX_ELEMENTS elements
#: (float32: 64 MB), so a large model holds nothing between checks.
MEMO_MIN_ELEMENTS = 1 << 16
MEMO_MAX_ELEMENTS = 1 << 24
_memo: tuple[str, tuple, list[np.ndarray], dict] | None = None


def _gaussian_samples(
    rng: np.random.Generator, shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """gaussian(rng, shape, dtype=np.float32) for each shape in turn; where the
    same draws were made last time from the same generator state, their
    (read-only) samples, with ``rng`` moved to the state the draws leave it in:
    the result and the generator's later draws are the same either way."""
    global _memo
    shapes = tuple(tuple(int(n) for n in s) for s in shapes)
    total = sum(math.prod(s) for s in shapes)
    if not MEMO_MIN_ELEMENTS <= total <= MEMO_MAX_ELEMENTS:
        return [gaussian(rng, s, dtype=np.float32) for s in shapes]
    key = repr(rng.bit_generator.state)
    memo = _memo
    if memo is not None and memo[0] == key and memo[1] == shapes:
        rng.bit_generator.state = memo[3]
        return memo[2]
    samples = [gaussian(rng, s, dtype=np.float32) for s in shapes]
    for z in samples:
        z.setflags(write=False)
    _memo = (key, shapes, samples, rng.bit_generator.state)
    return samples


def normal(rng: Random, shape: tuple[int, ...], *, like: Array | None = None) -> Array:
    """float64 N(0, 1) samples of ``shape`` from a NumPy Generator (``gaussian``) or
    a backend's Draw, in ``like``'s namespace and on its device."""
    shape = tuple(int(s) for s in shape)
    if isinstance(rng, np.random.Generator):
        return gaussian(rng, shape, like=like)
    if not callable(rng):
        raise InvalidArgumentError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)) "
            f"or a draw(shape, like) function, got {type(rng).__name__}"
        )
    z = rng(shape, like)
    if tuple(z.shape) != shape:
        raise InvalidArgumentError(
            f"the draw function returned shape {tuple(z.shape)} for shape {shape}; "
            "it must return samples of the shape it is asked for"
        )
    xp = namespace(z)
    return z if z.dtype == xp.float64 else as_float64(z, xp)


def cotangents(
    shapes: Sequence[tuple[int, ...]], rng: Random, *, like: Array | None = None
) -> list[Array]:
    """Seeded output cotangents v_o: 1 for a scalar, else N(0,1)/sqrt(n_o).

    Unit norm per output keeps outputs of different sizes on the same footing.
    float64 arrays of ``like``'s namespace, on its device (NumPy's without it)."""
    xp = namespace(like)
    dev = None if like is None else device(like)
    out = []
    for shape in shapes:
        n = math.prod(int(s) for s in shape)
        if n == 1:
            out.append(as_float64(np.ones(shape), xp, dev))
        else:
            # math.sqrt(n) is np.sqrt(n): both the correctly rounded root
            out.append(normal(rng, shape, like=like) / math.sqrt(n))
    return out


def _normaliser_floor(gnorms: Sequence[float]) -> float:
    """The least normaliser of a tensor's direction: FLOOR x the largest gradient
    norm (1 where every gradient is 0)."""
    gmax = max(gnorms, default=0.0)
    return FLOOR * gmax if gmax > 0 else 1.0


def probe_direction(
    grads: Sequence[Array],
    rng: Random,
    gnorms: Sequence[float] | None = None,
) -> tuple[list[Array], list[float]]:
    """Direction d_t per tensor (same shapes as ``grads``) and the normaliser used.

    ``grads`` are the analytical gradients (float64 copies; NumPy arrays or
    array-API tensors, each on its own device), ``gnorms`` their L2 norms if the
    caller has them (else computed here, a device sync each). Returns ``(d,
    norms)`` where ``norms[t]`` is what d_t was divided by; d_t is float64 in g_t's
    namespace, on g_t's device."""
    if gnorms is None:
        gnorms = [norm(g) for g in grads]
    floor = _normaliser_floor(gnorms)
    if isinstance(grads, Widened) and isinstance(rng, np.random.Generator):
        return _compact_directions(grads, rng, gnorms, floor)
    if isinstance(rng, np.random.Generator) and all(
        type(g) is np.ndarray and g.dtype == np.float64 for g in grads
    ):
        return _host_directions(grads, rng, gnorms, floor)
    directions, norms = [], []
    for g, gn in zip(grads, gnorms, strict=True):
        z = normal(rng, tuple(g.shape), like=g)
        if gn > 0:
            z += (ALIGNED / gn) * g
        normaliser = max(gn, floor)
        z *= 1.0 / normaliser
        directions.append(z)
        norms.append(normaliser)
    return directions, norms


def _host_directions(
    grads: Sequence[np.ndarray],
    rng: np.random.Generator,
    gnorms: Sequence[float],
    floor: float,
) -> tuple[list[np.ndarray], list[float]]:
    """probe_direction for float64 NumPy gradients and a NumPy Generator, bit for
    bit the general path's numbers with less memory traffic: the float32 samples
    (kept for a repeated check, see _gaussian_samples) are added to the scaled
    gradient in one float64 array from numeric.workspace (the same roundings as
    z64 += (ALIGNED / gn) * g: the sum is commutative and z is exact in float64),
    then scaled."""
    directions, norms = [], []
    samples = _gaussian_samples(rng, [tuple(g.shape) for g in grads])
    for g, gn, z in zip(grads, gnorms, samples, strict=True):
        d = workspace.empty(g.shape, np.float64)
        directions.append(d)
        norms.append(_aligned_into(d, g, gn, z, floor))
    return directions, norms


def _aligned_into(
    out: np.ndarray, g: np.ndarray, gn: float, z: np.ndarray, floor: float
) -> float:
    """One tensor's host direction written into ``out`` (float64):
    (z + (ALIGNED / gn) g) / max(gn, floor), z alone where gn is 0; returns the
    normaliser. The roundings of probe_direction's general path (z exact in
    float64, the sum commutative)."""
    if gn > 0:
        np.multiply(g, ALIGNED / gn, out=out)
        out += z
    else:
        out[...] = z
    normaliser = max(gn, floor)
    out *= 1.0 / normaliser
    return normaliser


def streamed_probe_direction(
    grads: Sequence[np.ndarray],
    rng: np.random.Generator,
    gnorms: Sequence[float],
) -> tuple[list[np.ndarray], list[float], list[tuple[float, float] | None]]:
    """probe_direction for host gradients some of which are narrow (float32:
    Session.vjp_on_device(compact=True) hands a float32 gradient as the
    framework's own array), with ``gnorms`` from numeric.blocks.host_norm: the same
    float64 directions as probe_direction gives for their widened copies, bit for
    bit, without those copies. A narrow tensor is read once, in cache-sized
    blocks; each block is widened, its direction written, and <g_t, d_t> and
    |d_t|^2 summed from the block while it is in cache (a float32 check of a 1M
    parameter model read each of its 8 MB float64 arrays 5 times before).

    Returns ``(d, normalisers, sums)``: ``sums[t]`` is (<g_t, d_t>, |d_t|^2) for
    a narrow tensor, summed over blocks in float64 (the same numbers as the
    whole-array reductions to rounding), None for a float64 one (its direction
    is _host_directions' and its sums are the callers' whole-array ones, so a
    float64 check's numbers are unchanged to the last bit)."""
    floor = _normaliser_floor(gnorms)
    samples = _gaussian_samples(rng, [tuple(g.shape) for g in grads])
    buf = blocks.buffer()
    directions, norms, sums = [], [], []
    for g, gn, z in zip(grads, gnorms, samples, strict=True):
        d = workspace.empty(g.shape, np.float64)
        directions.append(d)
        if g.dtype == np.float64:
            norms.append(_aligned_into(d, g, gn, z, floor))
            sums.append(None)
            continue
        flat_g, flat_z, flat_d = np.reshape(g, -1), np.reshape(z, -1), d.reshape(-1)
        normaliser = max(gn, floor)
        gd = dd = 0.0
        for i in range(0, flat_g.size, blocks.BLOCK):
            j = min(i + blocks.BLOCK, flat_g.size)
            w, out = buf[: j - i], flat_d[i:j]
            np.copyto(w, flat_g[i:j])  # the exact widening
            _aligned_into(out, w, gn, flat_z[i:j], floor)  # elementwise: per block
            gd += float(np.dot(w, out))
            dd += float(np.dot(out, out))
        norms.append(normaliser)
        sums.append((gd, dd))
    return directions, norms, sums


def _compact_directions(
    grads: Widened,
    rng: np.random.Generator,
    gnorms: Sequence[float],
    floor: float,
) -> tuple[Widened, list[float]]:
    """probe_direction for compact gradients (see numeric.compact): each tensor's
    direction is formed in float64 as _host_directions forms it, from the same
    samples, then rounded once to float32 and stored so; the result is a Widened
    of those float32 arrays, and every later use of the direction reads the same
    float64 values. The rounding changes the direction (by ~6e-8 relative per
    element), not any property the check relies on: d_t is still the
    Gaussian-plus-aligned vector scaled by ``normaliser`` to ~6e-8.

    Memory: one tensor's samples and float64 direction at a time, besides the
    float32 directions kept (no memo of the samples: a compact check is a large
    one, see _gaussian_samples)."""
    directions: list[np.ndarray | None] = []
    norms = []
    for g, gn, shape in zip(grads, gnorms, grads.shapes(), strict=True):
        z = gaussian(rng, shape, dtype=np.float32)
        d = np.empty(shape)
        normaliser = _aligned_into(d, g, gn, z, floor)
        del g, z
        # float32 keeps ~7 digits of d only while its scale 1/normaliser sits well
        # inside float32's normal range; a gradient norm beyond it (a float64 model
        # at 1e40) keeps its direction in float64
        keep64 = not COMPACT_SCALES[0] <= normaliser <= COMPACT_SCALES[1]
        directions.append(d if keep64 else d.astype(np.float32))
        norms.append(normaliser)
    return Widened(directions), norms
