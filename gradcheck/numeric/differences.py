"""Central differences with Richardson extrapolation and an error estimate.

``phi(t)`` is a scalar function of the step (the framework evaluates the model at
x + t*d and projects the outputs on the cotangents). For a step h,

    D(h) = (phi(h) - phi(-h)) / 2h = D + c h^2 + O(h^4)

so two steps h and h/r give the extrapolation R = (r^2 D(h/r) - D(h)) / (r^2 - 1) and
|D(h/r) - D(h)| / (r^2 - 1) estimates the truncation error of D(h/r) (an upper
estimate for R's). Rounding: each phi carries ~ULPS*eps*S (S = sum |v_i y_i|, from
the backend), so a central difference carries ~ULPS*eps*S/h.

The step is refined (h/4) while truncation dominates and the estimate is above the
budget, or coarsened (4h) while rounding dominates: numdifftools' idea at 2-4
evaluations instead of ~30.

Array API: ``phi`` may return NumPy arrays, torch tensors or any array-API arrays (of
one library); every difference, extrapolation and error estimate is computed in
their namespace and stays on their device (``DerivativeEstimate.value`` of a CUDA
``phi`` is a CUDA tensor). Only the decisions (which step next, which estimate is
best) come to the host, as Python floats: a few syncs per estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from gradcheck.errors import InvalidArgumentError, NonFiniteError
from gradcheck.numeric.arrays import Array, Namespace, as_float64, device, namespace

#: One evaluation at x + t*d: (value, rounding scale S) as float64 arrays of the same
#: shape (0-d for a projected scalar, 1-d for a Jacobian column), of any array-API
#: library (Python or NumPy scalars are NumPy's).
Evaluation = tuple[Array, Array]
Phi = Callable[[float], Evaluation]


@dataclass
class DerivativeEstimate:
    value: Array  # best estimate (Richardson-extrapolated)
    error: Array  # estimated absolute error of ``value`` (truncation + rounding)
    truncation: Array
    rounding: Array
    step: float  # the finer step of the pair used
    coarse: float = 0.0  # the coarser step of the pair used
    #: (h, D(h)) for every central difference taken: the error-vs-step curve.
    curve: list[tuple[float, Array]] = field(default_factory=list)
    #: phi at every t evaluated, for one-sided differences and nondeterminism tests.
    values: dict[float, Evaluation] = field(default_factory=dict)


class _Memo:
    """phi's values by t, as float64 arrays of phi's namespace (``xp``: known from
    the first value, and the same for every later one)."""

    def __init__(self, phi: Phi, values: dict[float, Evaluation] | None = None):
        self.phi = phi
        self.values: dict[float, Evaluation] = dict(values or {})
        self.xp: Namespace | None = None
        for val, scale in self.values.values():
            self.xp = namespace(val, scale)
            break

    def __call__(self, t: float) -> Evaluation:
        if t not in self.values:
            val, scale = self.phi(t)
            xp = namespace(val, scale)
            if self.xp is None:
                self.xp = xp
            elif xp is not self.xp:
                raise InvalidArgumentError(
                    f"the function evaluated for finite differences returned "
                    f"{xp.__name__} arrays at t={t:.3g} but {self.xp.__name__} arrays "
                    "before: it must return arrays of one library throughout"
                )
            val, scale = as_float64(val, xp), as_float64(scale, xp)
            if not bool(xp.all(xp.isfinite(val))):
                raise NonFiniteError(
                    f"the function is not finite at a finite-difference point x + {t:.3g}*d "
                    "though it is finite at x: the step leaves the function's domain "
                    "(log/sqrt/division near a boundary?). Pass a smaller `step=` or "
                    "move the point away from the boundary."
                )
            self.values[t] = (val, scale)
        return self.values[t]

    def central(self, h: float) -> tuple[Array, Array]:
        (fp, sp), (fm, sm) = self(h), self(-h)
        assert self.xp is not None  # set by the evaluations above
        return (fp - fm) / (2 * h), self.xp.maximum(sp, sm)


def richardson(
    phi: Phi,
    h0: float,
    eps: float,
    budget: float | Array,
    *,
    ulps: float,
    max_refinements: int = 3,
    ratio: float = 4.0,
    values: dict[float, Evaluation] | None = None,
) -> DerivativeEstimate:
    """Estimate phi'(0) to within ``budget`` (elementwise) if possible: 4 evaluations
    when the first step is good, 2 more per refinement (at most ``max_refinements``).

    ``budget`` (a float, or an array of phi's shape: NumPy's or phi's namespace) is
    moved to phi's namespace and device once phi has been evaluated."""
    memo = _Memo(phi, values)
    limit: Array | None = None  # the budget in phi's namespace, once known

    def estimate(h_coarse: float, h_fine: float) -> DerivativeEstimate:
        dc, _ = memo.central(h_coarse)
        df, s = memo.central(h_fine)
        xp = memo.xp
        r2 = (h_coarse / h_fine) ** 2
        value = (r2 * df - dc) / (r2 - 1)
        trunc = xp.abs(df - dc) / (r2 - 1)
        rnd = ulps * eps * s / h_fine
        est = DerivativeEstimate(value, trunc + rnd, trunc, rnd, h_fine)
        est.coarse = h_coarse
        return est

    def excess(e: DerivativeEstimate) -> float:
        nonlocal limit
        xp = memo.xp
        if limit is None:
            limit = as_float64(budget, xp, device(e.error))
        return float(xp.max(e.error - limit))

    h_coarse, h_fine = h0, h0 / 2  # the first pair has ratio 2
    best = estimate(h_coarse, h_fine)
    for _ in range(max_refinements):
        if excess(best) <= 0:
            break
        xp = memo.xp
        refine = float(xp.sum(best.truncation)) >= float(xp.sum(best.rounding))
        if refine:
            h_coarse, h_fine = h_fine, h_fine / ratio
        else:
            h_coarse, h_fine = h_coarse * ratio, h_coarse
        cand = estimate(h_coarse, h_fine)
        if refine:
            # the truncation estimate assumes D(h) = D + c h^2; where the function
            # is less smooth (C1 but not C2: x|x| at 0, its error is O(h)) it is
            # too small. Two extrapolations from nested steps then disagree by more
            # than their estimates allow: the part of the gap that the coarser
            # one's own estimate does not explain is counted against the finer
            # one (conservatively: the coarser one is the worse). Free where the
            # model holds (they agree to O(h^4)), and where the coarser estimate
            # already said it was poor (a jump crossed), so a clean finer step is
            # not blamed for it.
            gap = xp.abs(cand.value - best.value) - best.error
            cand.truncation = xp.maximum(cand.truncation, gap)
            cand.error = cand.truncation + cand.rounding
        if excess(cand) < excess(best):
            best = cand
    steps = sorted({abs(t) for t in memo.values if t != 0 and -t in memo.values})
    best.curve = [(t, memo.central(t)[0]) for t in steps]
    best.values = memo.values
    return best


def ladder(
    phi: Phi,
    h0: float,
    *,
    below: int = 2,
    above: int = 3,
    ratio: float = 4.0,
    values: dict[float, Evaluation] | None = None,
) -> DerivativeEstimate:
    """Empirical error estimate for low-precision evaluations (numdifftools' way).

    In float32 the noise of a difference phi(h) - phi(-h) is far below the ulp of
    phi (nearby points round alike), so no a-priori rounding bound is usable. Take
    central differences at h0 * ratio^k (k = -below..above), extrapolate each
    adjacent pair, and estimate each extrapolation's error as its disagreement with
    its neighbours; return the one with the smallest. 2 evaluations per step."""
    memo = _Memo(phi, values)
    hs = [h0 * ratio**k for k in range(-below, above + 1)]
    ds = [memo.central(h)[0] for h in hs]
    xp = memo.xp
    r2 = ratio**2
    rs = [(r2 * ds[i] - ds[i + 1]) / (r2 - 1) for i in range(len(hs) - 1)]
    best: DerivativeEstimate | None = None
    for i, r in enumerate(rs):
        neighbours = [rs[j] for j in (i - 1, i + 1) if 0 <= j < len(rs)]
        err = xp.max(xp.stack([xp.abs(r - n) for n in neighbours]), axis=0)
        cand = DerivativeEstimate(
            r, err, err, xp.zeros_like(err), hs[i], coarse=hs[i + 1]
        )
        if best is None or float(xp.max(cand.error)) < float(xp.max(best.error)):
            best = cand
    assert best is not None
    best.curve = [(h, d) for h, d in zip(hs, ds, strict=True)]
    best.values = memo.values
    return best


def one_sided(
    phi: Phi, h: float, values: dict[float, Evaluation] | None = None
) -> tuple[Array, Array, dict[float, Evaluation]]:
    """Second-order one-sided derivatives (forward, backward) at t=0.

    D+ = (-3 phi(0) + 4 phi(h) - phi(2h)) / 2h,  D- = (3 phi(0) - 4 phi(-h) + phi(-2h)) / 2h.
    At a kink (ReLU at 0, max ties, |x| at 0) they differ by the jump in slope."""
    memo = _Memo(phi, values)
    f0 = memo(0.0)[0]
    fwd = (-3 * f0 + 4 * memo(h)[0] - memo(2 * h)[0]) / (2 * h)
    bwd = (3 * f0 - 4 * memo(-h)[0] + memo(-2 * h)[0]) / (2 * h)
    return fwd, bwd, memo.values


def noise_level(values: Array) -> float | None:
    """The noise of a function from its values at equally spaced points (Moré and
    Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3), 2011).

    The k-th differences of a table of m + 1 values are, for a smooth function at
    a small enough spacing, pure noise: var(Delta^k f) = C(2k, k) * sigma^2 for
    independent noise of deviation sigma. Each order gives sigma_k = sqrt(mean(
    (Delta^k f)^2) / C(2k, k)); the estimate is the order-k one where sigma_k is
    stable (within a factor 4 of its neighbours) and the differences change sign
    (so the smooth part no longer dominates); the largest of those three, since
    the few differences of a short table underestimate more often than not (on 9
    values of pure noise, 3,000 tables: below 0.26 sigma in 1% of them, 0.16 in
    0.1%, above 2.2 sigma in 1%). None when no order qualifies: the
    spacing is too large (the smooth part dominates) and no estimate is possible.
    0.0 when every value is the same (no noise visible at this spacing).

    ``values``: an array of any array-API library (or a sequence of floats); the
    differences are taken in its namespace, on its device."""
    xp = namespace(values)
    f = xp.reshape(as_float64(values, xp), (-1,))
    n = int(f.shape[0])
    if n < 4:
        raise ValueError("noise_level needs at least 4 values")
    if bool(xp.all(f == f[0])):
        return 0.0
    levels, signs = [], []
    diff = f
    for k in range(1, n):
        diff = diff[1:] - diff[:-1]  # what np.diff computes
        # 1 / C(2k, k) = (k!)^2 / (2k)!: the same float division as the int64
        # products of the NumPy-only version up to k = 10 (so the same bits); for
        # longer tables, where those overflowed int64, Python's integers stay exact
        gamma = float(math.factorial(k) ** 2) / float(math.factorial(2 * k))
        levels.append(float(xp.sqrt(gamma * xp.mean(diff * diff))))
        signs.append(bool(xp.any(diff > 0)) and bool(xp.any(diff < 0)))
    for k in range(len(levels) - 2):  # orders k+1 and the two above it
        lo, hi = min(levels[k : k + 3]), max(levels[k : k + 3])
        if hi <= 4 * lo and signs[k]:
            return hi  # the largest of the three: few samples underestimate
    return None
