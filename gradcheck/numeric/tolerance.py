"""Tolerances in one table keyed by dtype, with one resolver.

``EPS`` is the machine epsilon of each floating dtype. ``GRADIENT_ROUNDING`` is the
relative (L2) rounding error we expect in a whole gradient tensor computed in that
dtype by a framework's backward pass. It is the only calibrated constant of the
tolerance model: the directional check's tolerance is this rounding, propagated
through the probe direction, plus the finite-difference error *estimated* on the
spot (Richardson + rounding of the reference evaluations). No fixed atol.

Calibration (tests/test_calibration.py re-measures it): float32 backward passes of
MLP (tanh/ReLU), LayerNorm, LSTM, GRU, Conv1d and Embedding models with logit- and
probability-based cross-entropy and MSE showed relative L2 errors against float64
of 8e-8..4e-7 (about 3 eps). 4e-6 leaves 10x headroom; a 1e-3 relative bug stays
~60x above the resulting directional tolerance for a single tensor.
"""

from __future__ import annotations

import re

import numpy as np

from gradcheck.errors import InvalidArgumentError

EPS: dict[str, float] = {
    "float64": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
}

GRADIENT_ROUNDING: dict[str, float] = {
    "float64": 1e-10,
    "float32": 4e-6,
    "float16": 1e-2,
    "bfloat16": 6e-2,
}

#: The largest finite-difference error, relative to the scale of the directional
#: derivative, that still lets a check claim "passed". Above it the estimate is not
#: trustworthy (kinks crossed, nondeterminism, too coarse a reference precision) and
#: the engine diagnoses instead of passing. Chosen so that the promised detection
#: limits (1e-5 relative in float64, 1e-3 in float32) stay >= 3x above the FD noise.
MAX_FD_RELATIVE: dict[str, float] = {
    "float64": 3e-6,
    "float32": 3e-4,
    "float16": 3e-2,
    "bfloat16": 1e-1,
}

#: A tensor whose gradient is below this fraction of the largest one is assumed to
#: carry the rounding of that fraction: a (near-)zero gradient is a cancellation of
#: larger terms (e.g. LayerNorm over one feature) and is noisy in absolute terms.
ROUNDING_FLOOR = 0.1

#: How many standard deviations of rounding noise the analytical side may show.
ROUNDING_SIGMAS = 4.0
#: Multiplier on the (estimated, not bounded) finite-difference error.
FD_SAFETY = 3.0
#: The same for a low-precision reference, whose error comes from the step ladder:
#: it keeps the best-agreeing pair of steps, an optimistic choice (a 3x margin gave
#: 1 false alarm in 80 random float32 Keras specs that could not run in float64).
FD_SAFETY_LOW_PRECISION = 5.0


def fd_safety(reference_dtype: object) -> float:
    return (
        FD_SAFETY
        if canonical_dtype(reference_dtype) == "float64"
        else FD_SAFETY_LOW_PRECISION
    )


#: Accumulated rounding of one forward pass, in units of eps * sum|v_i y_i|.
FORWARD_ROUNDING_ULPS = 16.0


#: canonical_dtype's answers by dtype object (a check asks ~40 times for the same
#: few dtypes: the regular expression was most of its fixed Python cost's share)
_CANONICAL: dict[object, str] = {}


def canonical_dtype(dtype: object) -> str:
    """'torch.float32', tf.float32, np.float32 ... -> 'float32'."""
    try:
        return _CANONICAL[dtype]
    except (KeyError, TypeError):  # (TypeError: an unhashable dtype-like object)
        pass
    tokens = re.findall(r"[a-z]+[0-9]*", str(getattr(dtype, "name", dtype)).lower())
    name = tokens[-1] if tokens else str(dtype)
    aliases = {"double": "float64", "float": "float32", "half": "float16"}
    name = aliases.get(name, name)
    if len(_CANONICAL) < 256:
        try:
            _CANONICAL[dtype] = name
        except TypeError:
            pass
    return name


def eps(dtype: object) -> float:
    key = canonical_dtype(dtype)
    try:
        return EPS[key]
    except KeyError:
        raise InvalidArgumentError(
            f"dtype {key!r} is not a floating dtype gradcheck knows; "
            f"use one of {sorted(EPS)}"
        ) from None


def gradient_rounding(dtype: object, override: float | None = None) -> float:
    if override is not None:
        if not (override >= 0):
            raise InvalidArgumentError(f"rtol must be >= 0, got {override!r}")
        return float(override)
    eps(dtype)  # validates
    return GRADIENT_ROUNDING[canonical_dtype(dtype)]


def max_fd_relative(reference_dtype: object) -> float:
    eps(reference_dtype)
    return MAX_FD_RELATIVE[canonical_dtype(reference_dtype)]


def step_fraction(reference_dtype: object) -> float:
    """Relative step for central differences: eps^(1/3) balances h^2 truncation
    against eps/h rounding. Kept small (not the larger Richardson optimum
    eps^(1/5)) so that ReLU-type kinks are rarely crossed."""
    return eps(reference_dtype) ** (1.0 / 3.0)
