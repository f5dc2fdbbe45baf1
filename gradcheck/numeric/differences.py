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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gradcheck.errors import NonFiniteError

#: One evaluation at x + t*d: (value, rounding scale S) as float64 arrays of the same
#: shape (0-d for a projected scalar, 1-d for a Jacobian column).
Evaluation = tuple[np.ndarray, np.ndarray]
Phi = Callable[[float], Evaluation]


@dataclass
class DerivativeEstimate:
    value: np.ndarray  # best estimate (Richardson-extrapolated)
    error: np.ndarray  # estimated absolute error of ``value`` (truncation + rounding)
    truncation: np.ndarray
    rounding: np.ndarray
    step: float  # the finer step of the pair used
    coarse: float = 0.0  # the coarser step of the pair used
    #: (h, D(h)) for every central difference taken: the error-vs-step curve.
    curve: list[tuple[float, np.ndarray]] = field(default_factory=list)
    #: phi at every t evaluated, for one-sided differences and nondeterminism tests.
    values: dict[float, Evaluation] = field(default_factory=dict)


class _Memo:
    def __init__(self, phi: Phi, values: dict[float, Evaluation] | None = None):
        self.phi = phi
        self.values: dict[float, Evaluation] = dict(values or {})

    def __call__(self, t: float) -> Evaluation:
        if t not in self.values:
            val, scale = self.phi(t)
            val, scale = (
                np.asarray(val, dtype=np.float64),
                np.asarray(scale, dtype=np.float64),
            )
            if not np.isfinite(val).all():
                raise NonFiniteError(
                    f"the function is not finite at a finite-difference point x + {t:.3g}*d "
                    "though it is finite at x: the step leaves the function's domain "
                    "(log/sqrt/division near a boundary?). Pass a smaller `step=` or "
                    "move the point away from the boundary."
                )
            self.values[t] = (val, scale)
        return self.values[t]

    def central(self, h: float) -> tuple[np.ndarray, np.ndarray]:
        (fp, sp), (fm, sm) = self(h), self(-h)
        return (fp - fm) / (2 * h), np.maximum(sp, sm)


def richardson(
    phi: Phi,
    h0: float,
    eps: float,
    budget: float | np.ndarray,
    *,
    ulps: float,
    max_refinements: int = 3,
    ratio: float = 4.0,
    values: dict[float, Evaluation] | None = None,
) -> DerivativeEstimate:
    """Estimate phi'(0) to within ``budget`` (elementwise) if possible: 4 evaluations
    when the first step is good, 2 more per refinement (at most ``max_refinements``).
    """
    memo = _Memo(phi, values)
    budget = np.asarray(budget, dtype=np.float64)

    def estimate(h_coarse: float, h_fine: float) -> DerivativeEstimate:
        dc, _ = memo.central(h_coarse)
        df, s = memo.central(h_fine)
        r2 = (h_coarse / h_fine) ** 2
        value = (r2 * df - dc) / (r2 - 1)
        trunc = np.abs(df - dc) / (r2 - 1)
        rnd = ulps * eps * s / h_fine
        est = DerivativeEstimate(value, trunc + rnd, trunc, rnd, h_fine)
        est.coarse = h_coarse
        return est

    def excess(e: DerivativeEstimate) -> float:
        return float(np.max(e.error - budget))

    h_coarse, h_fine = h0, h0 / 2  # the first pair has ratio 2
    best = estimate(h_coarse, h_fine)
    for _ in range(max_refinements):
        if excess(best) <= 0:
            break
        refine = float(np.sum(best.truncation)) >= float(np.sum(best.rounding))
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
            gap = np.abs(cand.value - best.value) - best.error
            cand.truncation = np.maximum(cand.truncation, gap)
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
    r2 = ratio**2
    rs = [(r2 * ds[i] - ds[i + 1]) / (r2 - 1) for i in range(len(hs) - 1)]
    best: DerivativeEstimate | None = None
    for i, r in enumerate(rs):
        neighbours = [rs[j] for j in (i - 1, i + 1) if 0 <= j < len(rs)]
        err = np.max([np.abs(r - n) for n in neighbours], axis=0)
        cand = DerivativeEstimate(
            r, err, err, np.zeros_like(err), hs[i], coarse=hs[i + 1]
        )
        if best is None or float(np.max(cand.error)) < float(np.max(best.error)):
            best = cand
    assert best is not None
    best.curve = [(h, d) for h, d in zip(hs, ds, strict=True)]
    best.values = memo.values
    return best


def one_sided(
    phi: Phi, h: float, values: dict[float, Evaluation] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[float, Evaluation]]:
    """Second-order one-sided derivatives (forward, backward) at t=0.

    D+ = (-3 phi(0) + 4 phi(h) - phi(2h)) / 2h,  D- = (3 phi(0) - 4 phi(-h) + phi(-2h)) / 2h.
    At a kink (ReLU at 0, max ties, |x| at 0) they differ by the jump in slope."""
    memo = _Memo(phi, values)
    f0 = memo(0.0)[0]
    fwd = (-3 * f0 + 4 * memo(h)[0] - memo(2 * h)[0]) / (2 * h)
    bwd = (3 * f0 - 4 * memo(-h)[0] + memo(-2 * h)[0]) / (2 * h)
    return fwd, bwd, memo.values


def noise_level(values: np.ndarray) -> float | None:
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
    0.0 when every value is the same (no noise visible at this spacing)."""
    f = np.asarray(values, dtype=np.float64).reshape(-1)
    if f.size < 4:
        raise ValueError("noise_level needs at least 4 values")
    if np.all(f == f[0]):
        return 0.0
    levels, signs = [], []
    diff = f
    for k in range(1, f.size):
        diff = np.diff(diff)
        gamma = float(
            np.prod(np.arange(1, k + 1)) ** 2 / np.prod(np.arange(1, 2 * k + 1))
        )
        levels.append(float(np.sqrt(gamma * np.mean(diff * diff))))
        signs.append(bool(np.any(diff > 0) and np.any(diff < 0)))
    for k in range(len(levels) - 2):  # orders k+1 and the two above it
        lo, hi = min(levels[k : k + 3]), max(levels[k : k + 3])
        if hi <= 4 * lo and signs[k]:
            return hi  # the largest of the three: few samples underestimate
    return None
