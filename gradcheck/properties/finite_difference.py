"""The finite-difference property: the framework's gradient equals the derivative
that finite differences measure.

Directional mode (the default for anything but tiny problems):

1. one forward + backward in the user's precision gives the gradient g_t of
   phi = sum_o <v_o, y_o> (seeded Gaussian cotangents v; v = 1 for a scalar loss);
2. a seeded probe direction d (per-tensor normalised, see numeric.directions) gives
   the analytical directional derivative sum_t <g_t, d_t>;
3. a central difference of phi(x + t d), in float64 where fn can run in it (2
   forwards), passes when it agrees within the analytical side's rounding; else
   Richardson extrapolation reuses it and adds an error estimate (2 more), or, for
   a low-precision reference, a ladder of steps measures the error empirically;
4. tolerance = FD_SAFETY * (estimated FD error) + rounding of the analytical side
   (GRADIENT_ROUNDING[dtype] propagated through d) + rounding of the perturbed point.

Only when that comparison fails (or the FD estimate is untrustworthy) does the
engine spend more work: it re-evaluates to detect nondeterminism, takes one-sided
differences to detect kinks, and bisects over tensors and then elements to blame
the wrong one (O(log n) more directional checks).

Empty tensors have nothing to compare: a check whose differentiated tensors, or
whose outputs, are all empty passes with a note saying so; otherwise the empty
ones are named in a note and the rest is checked as usual.

Full mode compares every element: a numerical Jacobian column per input element and
an analytical row per output element (or the cotangent projection when outputs are
large).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.backends.base import Session
from gradcheck.errors import (
    GradcheckError,
    InvalidArgumentError,
    NonFiniteError,
    ReferencePrecisionError,
)
from gradcheck.numeric import arrays as xa
from gradcheck.numeric import blocks
from gradcheck.numeric import compact as cpt
from gradcheck.numeric import differences as fd
from gradcheck.numeric import directions as dirs
from gradcheck.numeric import tolerance as tl
from gradcheck.numeric.compact import Widened
from gradcheck.result import CheckReport, Location, StepEstimate, TensorResult

#: "auto" mode uses the full Jacobian at or below these sizes.
FULL_MAX_INPUTS = 64
FULL_MAX_OUTPUTS = 64
#: From this many differentiated elements on, a directional check holds its
#: gradients and probe direction compactly (numeric.compact: float32 where they
#: are float32, read as float64): 2**24 elements is 128 MB per float64 set, where
#: the memory starts to matter next to the model and one float64 copy of a tensor
#: per pass costs little next to its forward passes. Below it nothing changes.
COMPACT_MIN_ELEMENTS = 1 << 24
#: Rounding-spread test of low-precision gradients (see _precision_split): points
#: moved by JITTER_ULPS ulps, deviation allowed up to JITTER_FACTOR x the spread.
JITTER_ULPS = 4.0
JITTER_FACTOR = 10.0
#: Rounding-noise draws of low-precision gradients (see _rounding_draws).
NOISE_DRAWS = 8
NOISE_ULPS = 4
NOISE_SIGMAS = 4.0
#: Evaluations at one point differing by more than this many ulps of their scale
#: are nondeterministic, whatever else is seen.
NONDET_ULPS = 1e3
#: Cap on forward evaluations spent locating a failure (blame / kink location).
BLAME_BUDGET = 400
#: A check that meets kinks (or finite differences that do not converge) at x is
#: re-run at a nearby point: every tensor moved by this fraction of its scale (a
#: seeded Gaussian draw, rounded to the tensor's dtype). Large next to the reference
#: step (float64: eps^(1/3) ~ 6e-6 of the scale, so units pushed off a kink stay
#: ~100 steps away from it), small enough to stay in the same regime of the model.
NEARBY_SHIFT = 1e-3
#: Non-converging differences are retried from this fraction of the usual step.
SMALLER_STEP_FACTOR = 1e-2
#: Forward evaluations spent locating one kink when a census already names where
#: the kinks are (a model-sized search is not worth a full BLAME_BUDGET then).
CENSUS_BLAME_BUDGET = 60
#: Low-precision gradients: the analytical side's rounding along the probe
#: direction is measured at check time (see _Measured) with MEASURE_DRAWS gradients
#: at points a few ulps away with rescaled cotangents, and MEASURE_MORE_DRAWS more
#: before a failure may rest on it. The allowance is MEASURE_SIGMAS x their RMS
#: deviation from the checked gradient, never below MEASURE_FLOOR_ULPS ulps of the
#: summed absolute contributions (systematic rounding common to every draw, e.g. a
#: constant rounded to float32) and never above the table prior.
#: A float64 check that passes only on the a-priori rounding bounds of its finite
#: differences (FORWARD_ROUNDING_ULPS, the input-rounding Cauchy-Schwarz bound)
#: measures that noise instead (see _measure_fd_noise): phi on FD_NOISE_POINTS
#: points FD_NOISE_SPACING x the step apart, centred on the step h (phi(h) is
#: reused), Moré-Wild's estimate, and FD_NOISE_SIGMAS deviations of the
#: central difference it causes replace the two bounds.
FD_NOISE_SPACING = 1e-2
FD_NOISE_POINTS = 9
FD_NOISE_SIGMAS = 8.0
MEASURE_DRAWS = 2
MEASURE_MORE_DRAWS = 6
MEASURE_SIGMAS = 4.0
MEASURE_FLOOR_ULPS = 1.0
#: No draws where they cannot change the verdict (see _Measured.start).
MEASURE_SKIP_AT_FLOOR = True


@dataclass
class Options:
    seed: int
    mode: str = "auto"  # "auto" | "directional" | "full"
    rtol: float | None = None  # override of GRADIENT_ROUNDING for the native dtype
    step: float | None = None  # override of the relative step (fraction of |x|)
    blame_budget: int = BLAME_BUDGET
    #: which derivative is judged: "reverse" (the backward: <g, d> with g the VJP
    #: of the cotangent), "forward" (forward mode: <v, J d> from the session's
    #: jvp), "both" (forward mode, then forward against reverse, tightly)
    ad: str = "reverse"

    def __post_init__(self) -> None:
        if self.ad not in ("reverse", "forward", "both"):
            raise InvalidArgumentError(
                f"ad must be 'reverse', 'forward' or 'both', got {self.ad!r}"
            )
        if self.mode not in ("auto", "directional", "full"):
            raise InvalidArgumentError(
                f"mode must be 'auto', 'directional' or 'full', got {self.mode!r}"
            )
        if self.step is not None and not (0 < self.step < 1):
            raise InvalidArgumentError(
                f"step is a relative step in (0, 1), e.g. 1e-5; got {self.step!r}"
            )
        if self.rtol is not None and not (self.rtol >= 0):
            raise InvalidArgumentError(f"rtol must be >= 0, got {self.rtol!r}")


def _numpy_dtype(name: str):
    """NumPy's version of a tensor dtype (bfloat16 through ml_dtypes when present)."""
    if name in ("float64", "float32", "float16"):
        return np.dtype(name)
    if name == "bfloat16":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            return None
    return None


class _Restart(Exception):
    """The reference precision changed during the first evaluation."""


# ---------------------------------------------------------------------------------------
# The directional problem: a (possibly restricted) direction and everything to judge it.
# ---------------------------------------------------------------------------------------
class _Probe:
    def __init__(self, ctx: _Context, direction: list[np.ndarray | None]):
        self.ctx = ctx
        self.direction = direction
        s = ctx.session
        self.handle = s.prepare(direction)
        #: <g_t, d_t>: reverse mode's contribution of each tensor: host arrays a
        #: piece at a time (a compact check's arrays are never widened whole),
        #: arrays on an accelerator (Session.vjp_on_device) where they live, their
        #: scalars read together (numeric.arrays.vdots)
        # (a tensor of the full direction that dirs.streamed_probe_direction
        # summed already: its <g_t, d_t> from there, no further pass)
        moved = cpt.narrow(direction)
        summed = [
            None
            if d is None
            or t >= len(ctx.full_sums)
            or ctx.full_sums[t] is None
            or d is not ctx.full_direction[t]
            else ctx.full_sums[t][0]
            for t, d in enumerate(moved)
        ]
        dots = xa.vdots(
            cpt.narrow(ctx.grads),
            [
                None if sm is not None else d
                for d, sm in zip(moved, summed, strict=True)
            ],
            host=lambda g, d: cpt.piece_sum(np.dot, g, d),
        )
        self.reverse_contrib = np.array(
            [v if sm is None else sm for v, sm in zip(dots, summed, strict=True)]
        )
        # ad="forward": <v, J d> from one JVP along the whole direction; the
        # per-tensor sizes that scale the finite-difference trust limit stay
        # reverse mode's (magnitudes only). ad="both": one JVP per tensor the
        # direction moves, compared with reverse mode tensor by tensor.
        if ctx.options.ad == "both":
            self.contrib = ctx.forward_contrib(direction)
            self.analytical = float(self.contrib.sum())
        elif ctx.forward:
            self.contrib = self.reverse_contrib
            self.analytical = ctx.forward_total(direction)
        else:
            self.contrib = self.reverse_contrib
            self.analytical = float(self.contrib.sum())
        # rounding of the analytical side: <dg_t, d_t> with |dg_t| = rho_t |g_t|_eff is
        # ~ N(0, (rho_t |g_t|_eff / norm_t)^2) for the Gaussian part of d_t
        # (the full direction's norms are known: no second pass over its arrays)
        # (a compact direction's arrays as stored: which tensors it moves, and
        # whether they are the full direction's, need no float64 copy)
        self.moved = cpt.narrow(direction)
        full = cpt.narrow(ctx.full_direction)
        own = [
            d is not None and not (t < len(full) and d is full[t])
            for t, d in enumerate(self.moved)
        ]
        measured = xa.norms(
            [d if o else None for d, o in zip(self.moved, own, strict=True)],
            host=lambda d: math.sqrt(cpt.piece_sum(_sq, d)),
        )
        self.d_norms = [
            None
            if d is None
            else measured[t]
            if own[t]
            else ctx.full_direction_norms[t]
            for t, d in enumerate(self.moved)
        ]
        #: per tensor, the rounding term per unit of relative gradient rounding
        self._unit_rounding = [
            0.0
            if d is None
            else ctx.g_eff[t]
            / ctx.norms[t]
            * self.d_norms[t]
            / max(ctx.full_direction_norms[t], 1e-300)
            for t, d in enumerate(self.moved)
        ]
        self.scale = max(float(np.linalg.norm(self.contrib)), 1e-300)
        self.memo: dict[float, fd.Evaluation] | None = None

    @property
    def analytic_rounding(self) -> float:
        """ROUNDING_SIGMAS sigma of the random part; the table's rho has 10x
        headroom over typical rounding, which also covers the (rare) part aligned
        with g_t. Where the rounding was measured (see _Measured) ctx.rho is the
        prior scaled down to the measurement."""
        ctx = self.ctx
        return tl.ROUNDING_SIGMAS * math.sqrt(
            sum((r * u) ** 2 for r, u in zip(ctx.rho, self._unit_rounding, strict=True))
        )

    def phi(self, t: float) -> fd.Evaluation:
        ctx = self.ctx
        if t == 0.0 and ctx.phi0 is not None:  # the same point whatever the direction
            return ctx.phi0
        before = ctx.session.reference_dtype
        outs = _outputs_at(ctx.session, self.handle, t)
        if ctx.session.reference_dtype != before:
            raise _Restart
        val = sum(float(np.vdot(v, y)) for v, y in zip(ctx.cot, outs, strict=True))
        if t != 0.0 and ctx.corrects_input_rounding:
            val -= ctx.input_rounding_correction(self.direction, t)
        scale = sum(
            float(np.abs(v * y).sum()) for v, y in zip(ctx.cot, outs, strict=True)
        )
        if t == 0.0:
            ctx.phi0 = (np.float64(val), np.float64(scale))
        return np.float64(val), np.float64(scale)

    def input_rounding(self, h: float) -> float:
        """Error of the central difference from rounding x + t d to the reference
        dtype: |<g, fl(x+td) - (x+td)>| / h <= eps/2 * |g| |x| / h per tensor
        (Cauchy-Schwarz), zero where phi is corrected for it exactly (see
        input_rounding_correction)."""
        ctx = self.ctx
        if ctx.corrects_input_rounding:
            return 0.0
        total = sum(
            gn * xn
            for gn, xn, d in zip(ctx.g_norms, ctx.x_norms, self.moved, strict=True)
            if d is not None
        )
        return 0.5 * ctx.eps_ref * total / h * ctx.fd_round_factor

    def estimate(
        self, budget: float, values: dict | None = None, refinements: int | None = None
    ) -> fd.DerivativeEstimate:
        ctx = self.ctx
        if ctx.session.reference_dtype != "float64":
            # rounding-limited: measure the error on a ladder of steps instead
            return fd.ladder(self.phi, self.step(), values=values)
        return fd.richardson(
            self.phi,
            self.step(),
            ctx.eps_ref,
            budget,
            ulps=tl.FORWARD_ROUNDING_ULPS * ctx.fd_round_factor,
            max_refinements=3 if refinements is None else refinements,
            values=values,
        )

    def step(self) -> float:
        ctx = self.ctx
        frac = ctx.options.step or tl.step_fraction(ctx.session.reference_dtype)
        frac *= ctx.step_scale
        hs = []
        for t, d in enumerate(self.moved):
            n = 0 if d is None else xa.size(d)
            if n == 0:
                continue
            rms_d = self.d_norms[t] / math.sqrt(n)
            if rms_d > 0:
                hs.append(frac * ctx.x_scale[t] / rms_d)
        h = min(hs) if hs else frac
        # The step moves x by `frac` of its scale; it must not move phi by more
        # than `frac` of phi's scale (sum |v * y|) either: t * |D| <= frac * scale.
        # The x-scale step breaks that when a few tensors' gradients are many
        # orders above the rest (D-FINE, DEIMv2, PP-DocLayout at a fresh init:
        # backbone activations ~1e-16 behind normalisations with var << eps, each
        # multiplying the gradient by 1/sqrt(eps), up to 1e17), since the
        # direction divides the other tensors by the largest gradient's floor:
        # the differences then span a saturated, flat stretch of phi and
        # "converge" to 0, or cross kinks. Capped, their rounding error is
        # eps * |D| / frac relative to torch's |D|, wrong or right: harmless.
        ana = abs(self.analytical)
        if ana > 0 and math.isfinite(ana):
            # the scale run() took from the analytical outputs; phi(0) (a
            # forward) where there is none (a nearby re-run's context)
            phi_scale = ctx.phi_scale or float(self.phi(0.0)[1])
            if phi_scale > 0 and math.isfinite(phi_scale):
                h = min(h, frac * phi_scale / ana)
        return h

    def judge(
        self, est: fd.DerivativeEstimate
    ) -> tuple[float, float, dict[str, float]]:
        terms = {
            "finite_difference": tl.fd_safety(self.ctx.session.reference_dtype)
            * float(est.error),
            "analytical_rounding": self.analytic_rounding,
            "input_rounding": self.input_rounding(est.step),
        }
        return abs(float(est.value) - self.analytical), sum(terms.values()), terms


class _Context:
    """State shared by every probe of one check."""

    def __init__(
        self,
        session: Session,
        options: Options,
        cot: list[np.ndarray],
        grads: list[np.ndarray],
        g_norms: list[float] | None = None,
    ):
        self.session = session
        self.options = options
        self.cot = cot
        self.grads = grads
        #: the gradients (and so the probe directions) are the backend's arrays
        #: on their devices (Session.vjp_on_device), not NumPy's: the hot path's
        #: reductions run there, a failure's diagnosis copies them (_on_host)
        self.on_device = not all(
            g is None or isinstance(g, np.ndarray) for g in cpt.narrow(grads)
        )
        #: host gradients of which some are float32 arrays as the framework
        #: computed them (a plain list, not a compact Widened): the hot path reads
        #: them in float64 block by block (dirs.streamed_probe_direction), a
        #: failure's diagnosis widens them first (_on_host)
        self.narrow_host = (
            not self.on_device
            and not isinstance(grads, Widened)
            and any(isinstance(g, np.ndarray) and g.dtype != np.float64 for g in grads)
        )
        #: per tensor, (<g_t, d_t>, |d_t|^2) of the full direction where the
        #: streamed pass summed them (None: the callers' reductions)
        self.full_sums: list[tuple[float, float] | None] = []
        self._x: list[np.ndarray] | None = None
        self._host_grads: list[np.ndarray] | None = None
        # (arrays.norm: NumPy's own norm for NumPy arrays, the gradients' device's
        # for the tensors of Session.vjp_on_device: a scalar comes to the host)
        gn = self.g_norms = (
            xa.norms(grads, host=blocks.host_norm) if g_norms is None else list(g_norms)
        )
        gmax = max(gn, default=0.0)
        self.g_eff = [max(g, tl.ROUNDING_FLOOR * gmax) if gmax > 0 else 1.0 for g in gn]
        inner = session.internal_dtype
        self.rho = [
            tl.gradient_rounding(
                inner if inner and tl.eps(inner) > tl.eps(s.dtype) else s.dtype,
                options.rtol,
            )
            for s in session.specs
        ]
        #: the table's rho, before any measurement scales it (see _Measured)
        self.prior_rho = list(self.rho)
        self.measured: _Measured | None = None
        #: multiplier on the a-priori rounding bounds of the finite differences,
        #: < 1 once their noise was measured (see _measure_fd_noise)
        self.fd_round_factor = 1.0
        self.fd_noise: float | None = None
        self.x_norms = session.norms()
        rms = [
            xn / math.sqrt(sp.size) if sp.size else 0.0
            for xn, sp in zip(self.x_norms, session.specs, strict=True)
        ]
        top = max(rms, default=0.0)
        # the perturbation of tensor t is scaled by its own magnitude, with a floor for
        # tensors that are (near) zero, e.g. freshly initialised biases
        self.x_scale = [max(r, 0.1 * top, 1e-3) for r in rms]
        self.phi0: fd.Evaluation | None = None
        #: sum |v * y| at x from the analytical outputs (set by run(); 0: unknown)
        self.phi_scale = 0.0
        #: forward mode judged (Options.ad): the analytical side is <v, J d>
        self.forward = options.ad in ("forward", "both")
        #: ad="both": what forward mode is compared with reverse mode on
        self.both_full: tuple | None = None
        self.both_probe: _Probe | None = None
        #: order 2, full mode: the note of the derived outputs' measured rounding
        self.derived_noise_note: str | None = None
        self.full_direction: list[np.ndarray] = []
        self.norms: list[float] = []
        #: True for the re-run at a nearby point (see _nearby): no second move.
        self.nearby = False
        #: Multiplier on every probe's step: < 1 once differences are found to
        #: converge only at smaller steps (see _judge_smaller_steps).
        self.step_scale = 1.0

    def forward_total(self, direction: Sequence[np.ndarray | None]) -> float:
        """<v, J d> from one JVP along the whole direction."""
        with _timed("gradient"):
            tangents = self.session.jvp(direction)
        moved = [
            sp.name
            for sp, d in zip(self.session.specs, direction, strict=True)
            if d is not None
        ]
        _check_finite_tangents(self.session, tangents, ", ".join(moved[:3]))
        return sum(
            float(np.vdot(v, y)) for v, y in zip(self.cot, tangents, strict=True)
        )

    def forward_contrib(self, direction: Sequence[np.ndarray | None]) -> np.ndarray:
        """<v, J_t d_t> per tensor t, from the session's forward mode (one JVP per
        tensor the direction moves; 0 where it does not)."""
        out = np.zeros(len(direction))
        for t, d in enumerate(direction):
            if d is None:
                continue
            only: list[np.ndarray | None] = [None] * len(direction)
            only[t] = d
            with _timed("gradient"):
                tangents = self.session.jvp(only)
            _check_finite_tangents(self.session, tangents, self.session.specs[t].name)
            out[t] = sum(
                float(np.vdot(v, y)) for v, y in zip(self.cot, tangents, strict=True)
            )
        return out

    @property
    def x(self) -> list[np.ndarray]:
        """The point itself, as float64 arrays (copied from the backend on demand)."""
        if self._x is None:
            self._x = self.session.values()
        return self._x

    @property
    def abs_x(self) -> list[np.ndarray]:
        return [np.abs(v) for v in self.x]

    @property
    def corrects_input_rounding(self) -> bool:
        """Evaluations in a low precision: phi is corrected for the rounding of
        x + t d to that precision (to first order, exactly computable here)."""
        ref = self.session.reference_dtype
        return ref != "float64" and all(
            _numpy_dtype(sp.dtype) for sp in self.session.specs
        )

    def input_rounding_correction(
        self, direction: list[np.ndarray | None], t: float
    ) -> float:
        """<g, fl(x + t d) - (x + t d)>: what rounding the perturbed point to the
        tensors' dtype adds to phi(t), to first order."""
        total = 0.0
        # (a reference that fell back to a low precision: the rounding is
        # computed on the host, the point x being there already; tensors of
        # Session.vjp_on_device are read there once per check)
        if self._host_grads is None:
            self._host_grads = [xa.to_host(g) for g in self.grads]
        for spec, g, x, d in zip(
            self.session.specs, self._host_grads, self.x, direction, strict=True
        ):
            if d is None or spec.dtype == "float64":
                continue
            exact = x + t * xa.to_host(d)
            rounded = exact.astype(_numpy_dtype(spec.dtype)).astype(np.float64)
            total += float(np.vdot(g, rounded - exact))
        return total

    @property
    def eps_ref(self) -> float:
        return tl.eps(self.session.reference_dtype)

    def fd_limit(self, scale: float) -> float:
        return tl.max_fd_relative(self.session.reference_dtype) * scale


# ---------------------------------------------------------------------------------------
# Where a check's time goes: report.cost["gradient_seconds"] and
# cost["reference_seconds"] beside cost["seconds"].
# ---------------------------------------------------------------------------------------
@dataclass
class _Clock:
    #: the framework's forward and backward at x that give the derivative judged:
    #: run()'s analytic call and its VJP (a cast-free check's float64 VJP too),
    #: full mode's VJP per output row, forward mode's JVPs
    gradient: float = 0.0
    #: fn's finite-difference evaluations, x + t d formed and fn run there
    #: (Session.outputs_at), wherever the engine makes them: the passing check's
    #: central difference, Richardson's further steps, the diagnosis's
    reference: float = 0.0


#: The clock of the check run() is making in this thread (None outside one).
_clock: contextvars.ContextVar[_Clock | None] = contextvars.ContextVar(
    "gradcheck_finite_difference_clock", default=None
)


@contextlib.contextmanager
def _timed(part: str) -> Iterator[None]:
    """Add the block's wall-clock time to ``part`` of the current check's clock."""
    clock = _clock.get()
    start = time.perf_counter()
    try:
        yield
    finally:
        if clock is not None:
            setattr(clock, part, getattr(clock, part) + time.perf_counter() - start)


def _outputs_at(s: Session, handle: object, t: float) -> list[np.ndarray]:
    """Session.outputs_at, its time counted as the check's reference time."""
    with _timed("reference"):
        return s.outputs_at(handle, t)


def run(session: Session, options: Options) -> CheckReport:
    """The finite-difference check of ``session`` (module docstring). Besides the
    session's count of forwards and backwards and the check's seconds, the
    report's cost says where the time went: ``gradient_seconds`` in the
    framework's forward and backward at x that give the derivative judged
    (reverse mode's VJP, full mode's rows, forward mode's JVPs),
    ``reference_seconds`` in fn's finite-difference evaluations (x + t d formed
    and fn run there, in float64 where it runs in it; a failure's diagnosis
    included). The rest of ``seconds`` is gradcheck's own work: the probe
    direction, reductions and tolerance, and the further gradients that a
    measured rounding or a failure's diagnosis takes."""
    clock = _Clock()
    token = _clock.set(clock)
    try:
        report = _run(session, options)
    finally:
        _clock.reset(token)
    report.cost["gradient_seconds"] = clock.gradient
    report.cost["reference_seconds"] = clock.reference
    return report


def _run(session: Session, options: Options) -> CheckReport:
    started = time.perf_counter()
    with _timed("gradient"):
        outputs = session.analytic()
    session.check_finite_outputs(outputs)
    refusal = session.second_order_refusal()
    if refusal is not None:
        return session.finish(_refused(session, options, *refusal), started)
    rng = np.random.default_rng(options.seed)
    cot = dirs.cotangents(session.output_shapes, rng)
    n_in = sum(s.size for s in session.specs)
    n_out = sum(math.prod(int(n) for n in s) for s in session.output_shapes)
    if n_in == 0 or n_out == 0:
        return session.finish(_nothing_to_compare(session, options, n_in), started)
    mode = options.mode
    if mode == "auto":
        mode = (
            "full"
            if n_in <= FULL_MAX_INPUTS and n_out <= FULL_MAX_OUTPUTS
            else "directional"
        )
    # full mode takes a VJP per output row from the retained graph; forward mode
    # takes JVP columns instead (and "both" compares the two)
    # a large model's gradients and directions are held in float32 where they are
    # float32 (numeric.compact): the same float64 numbers, half the memory
    compact = mode == "directional" and n_in >= COMPACT_MIN_ELEMENTS
    cast_free = mode == "directional" and _cast_free_applies(session, options)
    retain = mode == "full" and options.ad != "forward"
    # and the backend keeps no model-sized buffer between evaluations (a failing
    # check's diagnosis holds several gradient sets of its own meanwhile)
    session.lean = compact
    if (
        mode == "directional"
        and not compact
        and not cast_free
        and options.ad == "reverse"
    ):
        # a passing reverse-mode directional check reads its gradients only
        # through dot products and norms (numeric.arrays): the backend may keep
        # them on their devices, and on the host it may hand a float32 gradient
        # as is (read in float64 by numeric.blocks.host_norm and
        # dirs.streamed_probe_direction; a failure widens it, see _on_host).
        # Full mode, forward mode, compact and cast-free checks read them on the
        # host, in float64.
        with _timed("gradient"):
            raw = session.vjp_on_device(cot, retain=retain, compact=True)
    else:
        with _timed("gradient"):
            raw = session.vjp(cot, retain=retain, compact=compact)
    # the gradients' norms, which the probe direction needs anyway: a finite norm
    # means finite elements, so the element-wise finiteness test (a pass over
    # every gradient) runs only where a norm is not finite (NaN or Inf among the
    # elements, or squares that overflow). A compact check's norms are those of
    # the widened gradients, taken by _Context.
    g_norms = None if compact else xa.norms(raw, host=blocks.host_norm)
    try:
        if g_norms is None or not all(math.isfinite(n) for n in g_norms):
            session.check_finite_grads(raw)
    except NonFiniteError as exc:
        if getattr(exc, "tensor", None) is None or not any(
            g is not None and np.isnan(xa.to_host(g)).any() for g in raw
        ):
            raise  # an infinite gradient: a singular point (sqrt at 0), not a bug
        return session.finish(_nan_gradient(session, options, mode, exc), started)
    grads: Sequence[np.ndarray] = [
        np.zeros(s.shape) if g is None else g
        for s, g in zip(session.specs, raw, strict=True)
    ]
    if compact:
        grads = Widened(grads)
    if all(g is None for g in raw):
        refusal = session.unconnected_refusal()
        if refusal is not None:
            return session.finish(_refused(session, options, *refusal), started)
        raise GradcheckError(
            "the outputs do not depend on any differentiated tensor (the framework "
            "reports no path from "
            + ", ".join(f"'{s.name}'" for s in session.specs[:5])
            + " to the outputs). Does fn read the tensors you passed, or copies/detached "
            "versions of them?"
        )
    judged: Session = session
    own_grads: list[np.ndarray] | None = None
    fallback_note: str | None = None
    if cast_free:
        # a float64 model computing in float32 inside: judged on its cast-free
        # float64 gradient (see _CastFree), its own gradient against that one
        free = _CastFree(session)
        try:
            with _timed("gradient"):
                raw_free = free.vjp(cot)
            session.check_finite_grads(raw_free, "cast-free float64 gradient")
        except (ReferencePrecisionError, NonFiniteError) as exc:
            fallback_note = (
                f"the cast-free float64 gradient (this model's {session.internal_dtype} "
                f"casts run in float64) could not be taken ({str(exc)[:160]}), so the "
                f"check is judged at {session.internal_dtype} precision."
            )
        else:
            own_raw, own_rng = raw, copy.deepcopy(rng)
            judged, own_grads, raw = free, grads, raw_free
            grads = _zeros_for_none_specs(session, raw_free)
    ctx = _Context(judged, options, cot, grads, g_norms if judged is session else None)
    # phi's scale at x (sum |v * y|) for the step cap (_Probe.step), from the
    # outputs the analytical side already computed: no extra forward. Native
    # precision is plenty for a step bound.
    ctx.phi_scale = sum(
        float(np.abs(np.asarray(v, np.float64) * np.asarray(y, np.float64)).sum())
        for v, y in zip(cot, outputs, strict=True)
    )
    if mode == "full":
        report = _run_full(ctx, raw, outputs)
    else:
        report = _run_directional(ctx, raw, rng)
    if fallback_note is not None:
        report.notes.append(fallback_note)
    if own_grads is not None and _judge_own_gradient(ctx, session, own_grads, report):
        # step (2) failed: before a float32-path bug is claimed, the model's own
        # gradient is judged as it was before the cast-free judgement existed, at
        # its internal precision against the finite differences. The measured
        # split can sit just above its allowance on a correct model (hf
        # qwen3_5_vision float64: 1.3x), which is no evidence of a bug when the
        # float32-precision judgement passes.
        step2 = [n for n in report.notes if "code path only" in n]
        old = _run_directional(
            _Context(session, options, cot, own_grads), own_raw, own_rng
        )
        if old.passed:
            old.notes.append(
                "the cast-free float64 gradient (this model's "
                f"{session.internal_dtype} casts run in float64) matches the finite "
                "differences at float64 precision; the model's own gradient is a "
                f"little further from it than its measured {session.internal_dtype} "
                "rounding allows"
                + (f" ({step2[0][:300]})" if step2 else "")
                + f", and judged at {session.internal_dtype} precision against the "
                "finite differences it passes: no bug on that path is claimed."
            )
            report = old
    if options.ad == "both" and report.passed:
        _compare_modes(ctx, report)
    return session.finish(report, started)


def _zeros_for_none_specs(
    session: Session, raw: Sequence[np.ndarray | None]
) -> list[np.ndarray]:
    return [
        np.zeros(sp.shape) if g is None else g
        for sp, g in zip(session.specs, raw, strict=True)
    ]


# ---------------------------------------------------------------------------------------
# A float64 model that computes in float32 inside (RMSNorm's cast, attention softmax
# in float32): its gradient carries float32 rounding, so judged directly it can only
# be held to float32 precision, and a 1e-7 bug passes. The reference evaluations
# already run those casts in float64; the backward of that promoted forward is a
# cast-free float64 gradient, the exact derivative of the function the finite
# differences see. So (1) the cast-free gradient is judged against the finite
# differences as a plain float64 model's is (float64 rounding prior, measured
# finite-difference noise), which catches a bug present in every path at float64
# sensitivity; (2) the model's own gradient (with its casts) is compared with the
# cast-free one on its measured float32 rounding (the measured split of float32
# models), which catches a bug only on the float32 path at float32 sensitivity.
# Directional mode only (full mode compares elements of small problems on the
# table's prior, as before); reverse mode, no user rtol, torch (where rounding is
# measured at check time).
# ---------------------------------------------------------------------------------------
def _cast_free_applies(session: Session, options: Options) -> bool:
    inner = session.internal_dtype
    return (
        inner is not None
        and session.framework == "torch"
        and hasattr(session, "gradients_at")
        and getattr(session, "derived_order", 1) == 1
        and session.reference_dtype == "float64"
        and all(sp.dtype == "float64" for sp in session.specs)
        and _numpy_dtype(inner) is not None
        and tl.eps(inner) >= tl.eps("float32")
        and options.rtol is None
        and options.ad == "reverse"
    )


class _Derived(Session):
    """A session the check derives from the user's one (the cast-free function, the
    same function seen from a nearby point): the inner session owns the user's
    state and counts the evaluations; what the subclass does not redefine is the
    inner session's."""

    def __init__(self, inner: Session):
        super().__init__()
        self.inner = inner
        self.framework = inner.framework
        self.specs = inner.specs
        self.output_names = inner.output_names
        self.output_shapes = inner.output_shapes

    @property
    def reference_dtype(self) -> str:  # type: ignore[override]
        return self.inner.reference_dtype

    @property
    def internal_dtype(self) -> str | None:  # type: ignore[override]
        return self.inner.internal_dtype

    @property
    def forward_count(self) -> int:  # type: ignore[override]
        return self.inner.forward_count

    @forward_count.setter
    def forward_count(self, value: int) -> None:
        pass  # counted by the inner session

    @property
    def backward_count(self) -> int:  # type: ignore[override]
        return self.inner.backward_count

    @backward_count.setter
    def backward_count(self, value: int) -> None:
        pass

    def restore(self) -> None:  # the inner session owns the user's state
        pass

    def _at(
        self, promote: bool, handle: object, t: float
    ) -> tuple[bool, object, float]:
        """Where the inner session takes a gradient this session is asked for, as
        (promote, handle, t): the same here; a subclass redefines it."""
        return promote, handle, t

    def gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        *,
        promote: bool,
        handle: object = None,
        t: float = 0.0,
    ) -> list[list[np.ndarray | None]]:
        promote, handle, t = self._at(promote, handle, t)
        return self.inner.gradients_at(  # type: ignore[attr-defined]
            cotangent_sets, promote=promote, handle=handle, t=t
        )

    def gradient_reductions(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        reduce: Callable[[int, int, np.ndarray], Any],
        *,
        promote: bool,
        handle: object = None,
        t: float = 0.0,
    ) -> list[list[Any]]:
        promote, handle, t = self._at(promote, handle, t)
        return self.inner.gradient_reductions(
            cotangent_sets, reduce, promote=promote, handle=handle, t=t
        )

    def values(self) -> list[np.ndarray]:
        return self.inner.values()

    def norms(self) -> list[float]:
        return self.inner.norms()

    def known_causes(self, location: object) -> list[str]:
        return self.inner.known_causes(location)

    def passing_detaches(self) -> object:
        passing = getattr(self.inner, "passing_detaches", None)
        return None if passing is None else passing()

    def value_and_grads(self, fn, label):
        # linearity and locality evaluate losses through the user's session; the
        # finite-difference check, the only user of a derived session, never does
        raise TypeError(f"{type(self).__name__} evaluates no loss functions")


class _CastFree(_Derived):
    """The inner session with every gradient taken as the reference evaluations
    are: the forward and backward run in float64, the model's own casts to float32
    included. Framework-free (it asks the inner session for promoted gradients)."""

    internal_dtype = None  # type: ignore[assignment]

    def analytic(self) -> list[np.ndarray]:  # pragma: no cover - run() calls the inner
        return self.inner.analytic()

    def vjp(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[np.ndarray | None]:
        return self.gradients_at([cotangents], promote=True)[0]

    def _at(
        self, promote: bool, handle: object, t: float
    ) -> tuple[bool, object, float]:
        return True, handle, t  # every gradient as the reference evaluations take it

    def projected_gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        direction: Sequence[np.ndarray | None],
        *,
        promote: bool,
        handle: object = None,
        t: float = 0.0,
    ) -> list[float]:
        promote, handle, t = self._at(promote, handle, t)
        return self.inner.projected_gradients_at(
            cotangent_sets, direction, promote=promote, handle=handle, t=t
        )

    def ulp_moves(self, dtype: str | Sequence[str], ulps: int, seed: int) -> object:
        return self.inner.ulp_moves(dtype, ulps, seed)

    def prepare(self, direction: Sequence[np.ndarray | None]) -> object:
        return self.inner.prepare(direction)

    def outputs_at(self, handle: object, t: float) -> list[np.ndarray]:
        return self.inner.outputs_at(handle, t)


def _judge_own_gradient(
    ctx: _Context, session: Session, own: list[np.ndarray], report: CheckReport
) -> bool:
    """Step (2) of the cast-free judgement: the model's own gradient (with its
    casts) against the cast-free one (ctx.grads), tensor by tensor, on its measured
    rounding in the internal precision (see _split_judgement). Runs only when the
    cast-free gradient passed; a failure of that one is in every path. True when
    the own gradient was found off (report turned into a mismatch)."""
    low = session.internal_dtype
    assert low is not None
    session.judged_cast_free()
    if report.status != "passed":
        if report.status == "mismatch":
            report.notes.append(
                f"the cast-free float64 gradient (this model's {low} casts run in "
                "float64, forward and backward) misses the finite differences: the "
                f"error is on every precision's path, not {low} rounding."
            )
        return False
    own_ctx = _Context(session, ctx.options, ctx.cot, own)
    own_ctx._x = ctx._x
    own_ctx.measured = _Measured(np.dtype(_numpy_dtype(low)), tl.eps(low), 0.0, 0.0)
    cast_free = _Against.of(own_ctx, ctx.grads)
    t, dev, allowed, measured = _split_judgement(own_ctx, cast_free)
    spec = session.specs[t]
    if dev <= allowed:
        report.tolerance_reason = (
            "cast-free float64 gradient vs finite differences: "
            + report.tolerance_reason
            + f"; the model's own gradient (with its {low} casts) is within "
            f"{MEASURED_SPLIT_FACTOR:g}x its measured {low} rounding of the cast-free "
            "one, tensor by tensor"
        )
        report.notes.append(
            f"the model's own gradient (with its {low} casts) is within its measured "
            f"{low} rounding of the cast-free float64 gradient (worst '{spec.name}': "
            f"{dev:.3e}, allowed {allowed:.3e} from {measured}); the cast-free "
            "gradient matches the finite differences at float64 precision."
        )
        return False
    rel = dev / max(cast_free.norms[t], 1e-300)
    _native_path_mismatch(
        own_ctx,
        report,
        cast_free,
        (t, dev, allowed),
        f"its measured {low} rounding",
        f"the cast-free float64 gradient (this model's {low} casts run in float64) "
        f"matches the finite differences, but the model's own gradient, with its "
        f"{low} casts, is off from it by {rel:.1e} (relative, '{spec.name}'), "
        f"{dev / allowed:.1f}x its measured {low} rounding ({measured}): a bug on the "
        f"{low} code path only (a kernel or custom backward that behaves differently "
        f"in {low}).",
    )
    return report.status == "mismatch"


def _check_finite_tangents(
    session: Session, tangents: Sequence[np.ndarray], tensor: str
) -> None:
    for name, y in zip(session.output_names, tangents, strict=True):
        if not np.isfinite(y).all():
            raise NonFiniteError(
                f"the framework's forward-mode derivative of {name} along "
                f"'{tensor}' has {int((~np.isfinite(y)).sum())} NaN/Inf elements of "
                f"{y.size} while the outputs are finite: a jvp that overflows or "
                "divides by zero (a custom Function's jvp, sqrt/norm at 0?)."
            )


def _refused(session: Session, options: Options, tensor: str, why: str) -> CheckReport:
    """The framework cannot differentiate fn's gradient at all (order 2: a backward
    marked @once_differentiable, or one that records no graph): there is no
    second derivative to compare, and the verdict says so instead of an
    exception from deep inside the framework."""
    return CheckReport(
        property="finite_difference",
        status="nondifferentiable",
        framework=session.framework,
        device=session.device,
        dtype=session.dtype,
        seed=options.seed,
        mode=options.mode,
        error=math.nan,
        tolerance=math.nan,
        tolerance_reason="none: the framework's gradient cannot be differentiated",
        reference_dtype=None,
        location=Location(
            tensor=tensor, quantity="second derivative (its backward has no graph)"
        ),
        tensors=[
            TensorResult(
                name=sp.name,
                shape=sp.shape,
                dtype=sp.dtype,
                device=sp.device,
                kind=sp.kind,
                grad_norm=math.nan,
                status="nondifferentiable",
            )
            for sp in session.specs
        ],
        notes=[why],
    )


def _nothing_to_compare(session: Session, options: Options, n_in: int) -> CheckReport:
    """Every differentiated tensor, or every output, has zero elements: the
    Jacobian is empty, so there is nothing to compare and nothing can be wrong
    (torch.autograd.gradcheck passes these too). The report says so."""
    if n_in == 0:
        what, items = (
            "every differentiated tensor",
            [(sp.name, sp.shape) for sp in session.specs],
        )
    else:
        what, items = (
            "every output",
            list(zip(session.output_names, session.output_shapes, strict=True)),
        )
    listed = ", ".join(f"{n} {list(sh)}" for n, sh in items[:5])
    listed += ", ..." if len(items) > 5 else ""
    why = (
        f"{what} is empty ({listed}): the Jacobian has no elements, nothing was "
        "compared"
    )
    tensors = [
        TensorResult(
            name=sp.name,
            shape=sp.shape,
            dtype=sp.dtype,
            device=sp.device,
            kind=sp.kind,
            grad_norm=0.0,  # d(empty)/dx, or the gradient of an empty tensor
            status="passed",
        )
        for sp in session.specs
    ]
    return CheckReport(
        property="finite_difference",
        status="passed",
        framework=session.framework,
        device=session.device,
        dtype=session.dtype,
        seed=options.seed,
        mode="full",
        error=0.0,
        tolerance=0.0,
        tolerance_reason=f"none needed: {why}",
        reference_dtype=None,
        tensors=tensors,
        notes=[why + "."],
    )


def _nan_gradient(
    session: Session, options: Options, mode: str, exc: NonFiniteError
) -> CheckReport:
    """A NaN gradient where fn's outputs are finite (e.g. 0 * NaN in a backward
    behind a fully masked softmax row): wrong at any tolerance, a mismatch at its
    first NaN element; the backend's message (which tensor, how many elements, the
    op and module whose backward produced it) is the first note. An infinite
    gradient stays an error: it usually marks a singular point (sqrt at 0)."""
    return CheckReport(
        property="finite_difference",
        status="mismatch",
        framework=session.framework,
        device=session.device,
        dtype=session.dtype,
        seed=options.seed,
        mode=mode,
        error=math.inf,
        tolerance=0.0,
        tolerance_reason="none: a NaN gradient of a finite function is wrong at "
        "any tolerance",
        reference_dtype=None,
        location=Location(
            tensor=exc.tensor,  # type: ignore[attr-defined]
            index=exc.index,  # type: ignore[attr-defined]
            analytical=math.nan,
        ),
        notes=[str(exc)],
    )


def _empty_notes(session: Session) -> list[str]:
    """Notes naming the empty tensors and outputs of a check that still compares
    the others."""
    empty = [f"{sp.name} {list(sp.shape)}" for sp in session.specs if sp.size == 0]
    empty += [
        f"{n} {list(sh)}"
        for n, sh in zip(session.output_names, session.output_shapes, strict=True)
        if int(np.prod(sh, dtype=np.int64)) == 0
    ]
    if not empty:
        return []
    return [
        f"empty (no elements, nothing to compare): {', '.join(empty)}; the other "
        "tensors and outputs were checked."
    ]


def _base_report(
    ctx: _Context, mode: str, raw: Sequence[np.ndarray | None]
) -> CheckReport:
    s = ctx.session
    tensors = [
        TensorResult(
            name=spec.name,
            shape=spec.shape,
            dtype=spec.dtype,
            device=spec.device,
            kind=spec.kind,
            grad_norm=gn,
            connected=r is not None,
        )
        for spec, gn, r in zip(s.specs, ctx.g_norms, raw, strict=True)
    ]
    return CheckReport(
        property="finite_difference",
        status="passed",
        framework=s.framework,
        device=s.device,
        dtype=s.dtype,
        seed=ctx.options.seed,
        mode=mode,
        error=0.0,
        tolerance=0.0,
        tolerance_reason="",
        reference_dtype=s.reference_dtype,
        tensors=tensors,
        notes=_empty_notes(s),
    )


def _reason(terms: dict[str, float], ctx: _Context) -> str:
    s = ctx.session
    safety = tl.fd_safety(s.reference_dtype)
    rho = ", ".join(
        sorted({f"{sp.dtype} {r:.0e}" for sp, r in zip(s.specs, ctx.rho, strict=True)})
    )
    return (
        f"{safety:g} x estimated finite-difference error {terms['finite_difference'] / safety:.2e} "
        f"({'Richardson' if s.reference_dtype == 'float64' else 'step ladder'}, "
        f"{s.reference_dtype} reference) + analytical rounding "
        f"{terms['analytical_rounding']:.2e} (gradient rounding {rho}"
        + (", user rtol" if ctx.options.rtol is not None else "")
        + (
            (
                ", at the floor of its measurement at check time"
                if ctx.measured.at_floor
                else ", measured at check time"
            )
            if ctx.measured is not None and ctx.measured.factor < 1.0
            else ""
        )
        + f") + input rounding {terms['input_rounding']:.2e}"
    )


# ---------------------------------------------------------------------------------------
def _run_directional(
    ctx: _Context, raw: Sequence[np.ndarray | None], rng: np.random.Generator
) -> CheckReport:
    # gradients on an accelerator (Session.vjp_on_device) get their direction
    # drawn there; NumPy's host draw otherwise (the same numbers on every machine)
    draw = ctx.session.direction_draw(rng) if ctx.on_device else None
    if ctx.narrow_host:
        d, normalisers, ctx.full_sums = dirs.streamed_probe_direction(
            ctx.grads, rng, ctx.g_norms
        )
    else:
        d, normalisers = dirs.probe_direction(ctx.grads, draw or rng, ctx.g_norms)
    ctx.full_direction, ctx.norms = d, normalisers
    summed = ctx.full_sums or [None] * len(d)
    norms = xa.norms(
        [x if sm is None else None for x, sm in zip(d, summed, strict=True)]
    )
    ctx.full_direction_norms = [
        n if sm is None else math.sqrt(sm[1])
        for n, sm in zip(norms, summed, strict=True)
    ]
    # an empty tensor has nothing to perturb: no direction (and no blame) for it
    active = cpt.subset(d, [t for t, sp in enumerate(ctx.session.specs) if sp.size])
    for _attempt in range(2):
        probe = _Probe(ctx, active)
        try:
            if ctx.measured is None:
                ctx.measured = _Measured.start(ctx, probe)
            est, fast = _estimate(probe)
            if ctx.measured is not None and ctx.measured.may_draw_more:
                err, tol, _ = probe.judge(est)
                if err > tol and ctx.measured.draw_more(ctx, probe):
                    est, fast = _estimate(probe)
            break
        except _Restart:
            continue  # reference precision fell back to native: new steps and limits
    else:  # pragma: no cover - the precision changes at most once
        raise AssertionError("reference precision kept changing")
    ctx.both_probe = probe
    report = _base_report(ctx, "directional", raw)
    for tr, c in zip(report.tensors, probe.contrib, strict=True):
        # ad="forward" takes one JVP for the whole direction: no per-tensor value
        forward_total_only = ctx.forward and ctx.options.ad != "both"
        tr.analytical = None if forward_total_only else float(c)
    err, tol, terms = probe.judge(est)
    report.reference_dtype = ctx.session.reference_dtype
    report.error, report.tolerance, report.tolerance_terms = err, tol, terms
    report.tolerance_reason = _reason(terms, ctx)
    report.steps = _curve(est)
    if fast:
        report.tolerance_reason = (
            "one central difference agreed within the analytical side's rounding, "
            "so no truncation allowance was needed: " + report.tolerance_reason
        )
    trustworthy = terms["finite_difference"] <= ctx.fd_limit(_trust_scale(probe, est))
    if (
        err <= tol
        and trustworthy
        and err > terms["analytical_rounding"] + tl.FD_SAFETY * float(est.truncation)
        and _measure_fd_noise(ctx, probe, est, terms)
    ):  # the pass rested on a-priori rounding bounds: judged on measured noise
        est, fast = _estimate(probe)
        err, tol, terms = probe.judge(est)
        if err > tol and _measure_fd_noise(ctx, probe, est, terms, again=True):
            # a failure may not rest on one short table (it underestimates
            # sigma 4x in 1% of tables): a second one, interleaved with it
            est, fast = _estimate(probe)
            err, tol, terms = probe.judge(est)
        report.error, report.tolerance, report.tolerance_terms = err, tol, terms
        report.tolerance_reason = _reason(terms, ctx)
        report.steps = _curve(est)
        report.notes.append(
            f"finite-difference rounding measured at check time: phi's noise along "
            f"the probe direction is {ctx.fd_noise:.2e} (Moré-Wild, "
            f"{FD_NOISE_POINTS} points), so the differences' rounding is judged on "
            f"it instead of the a-priori bounds ({1 / ctx.fd_round_factor:.0f}x "
            "larger)."
        )
        trustworthy = terms["finite_difference"] <= ctx.fd_limit(
            _trust_scale(probe, est)
        )
    if ctx.measured is not None and ctx.measured.factor < 1.0:
        report.notes.append(ctx.measured.note() + ".")
    if err <= tol and trustworthy:
        return report
    _on_host(ctx, probe)
    _diagnose(ctx, probe, est, report, err, trustworthy)
    return report


def _on_host(ctx: _Context, probe: _Probe) -> None:
    """A failed check's gradients and directions as host float64 arrays: the
    diagnosis (blame, the precision split, kinks) is NumPy code written for
    float64 arrays, and only a failure pays for the copies (float32 host
    gradients read as they came, ctx.narrow_host, are widened; arrays on an
    accelerator are copied). The probe keeps its prepared handle (the same
    values) and which of the full direction's arrays it moves."""
    if ctx.narrow_host:  # float32 gradients read as they came: widened once
        ctx.grads = [
            g if g is None or g.dtype == np.float64 else g.astype(np.float64)
            for g in ctx.grads
        ]
        ctx.narrow_host = False
    if not ctx.on_device:
        return
    full = [xa.to_host(d) for d in ctx.full_direction]
    index = {id(d): h for d, h in zip(ctx.full_direction, full, strict=True)}
    ctx.grads = [xa.to_host(g) for g in ctx.grads]
    ctx._host_grads = None
    ctx.full_direction = full
    probe.direction = [
        None if d is None else index[id(d)] if id(d) in index else xa.to_host(d)
        for d in probe.direction
    ]
    probe.moved = cpt.narrow(probe.direction)
    ctx.on_device = False


def _estimate(probe: _Probe) -> tuple[fd.DerivativeEstimate, bool]:
    """The directional derivative by finite differences: one central difference
    when it already agrees (fast, True), else Richardson / the step ladder,
    reusing the evaluations made so far."""
    quick = _single_difference(probe)
    if quick is not None:
        return quick, True
    ctx = probe.ctx
    budget = max(probe.analytic_rounding, ctx.fd_limit(probe.scale)) / tl.FD_SAFETY
    return probe.estimate(budget, values=probe.memo), False


def _measure_fd_noise(
    ctx: _Context,
    probe: _Probe,
    est: fd.DerivativeEstimate,
    terms: dict[str, float],
    again: bool = False,
) -> bool:
    """Measure the noise of phi along the probe direction and scale the a-priori
    rounding bounds of the finite differences down to it; True if they changed.
    ``again``: a second table, at points between the first one's, and the larger
    of the two estimates.

    Only for a float64 reference with a float64 analytical side (a low-precision
    gradient's own rounding dwarfs these bounds), once per check. The bounds are
    FORWARD_ROUNDING_ULPS ulps of sum|v y| per evaluation and the Cauchy-Schwarz
    bound on rounding x + t d: both far above what is present (16 ulps is a bound
    for deep models), which let a 1e-7 bug pass in float64. Moré-Wild's estimate
    on FD_NOISE_POINTS values of phi, FD_NOISE_SPACING x the step apart (the
    smooth part's higher differences vanish there, every point's rounding of
    x + t d and of the forward pass is its own), gives the deviation sigma of one
    evaluation; a central difference at step h then deviates by sigma / (sqrt(2)
    h), and FD_NOISE_SIGMAS of that replace both bounds (never more than they
    allow). No estimate (the table is not noise-dominated) leaves the bounds."""
    s = ctx.session
    if again != (ctx.fd_noise is not None):
        return False
    if (
        s.reference_dtype != "float64"
        or ctx.measured is not None
        or any(r > tl.gradient_rounding("float64") for r in ctx.prior_rho)
    ):
        return False
    # the bounds as they stood before any measurement
    apriori = terms["finite_difference"] - tl.FD_SAFETY * float(est.truncation)
    apriori = (apriori + terms["input_rounding"]) / ctx.fd_round_factor
    if apriori <= 0:
        return False
    h = est.step
    # The table is centred on t = h, not 0: phi(h) is already known from the
    # differences (one forward fewer; the noise of phi is the same there, every
    # point's rounding of x + t d and of the forward pass still its own).
    sigma, values = _noise_table(
        probe, h, h, shift=0.5 if again else 0.0, known=probe.memo or {}
    )
    if sigma is None:
        return False
    sigma = max(
        sigma, ctx.eps_ref * abs(values[FD_NOISE_POINTS // 2]), ctx.fd_noise or 0.0
    )
    measured = _difference_noise(sigma, h)
    if measured >= apriori:
        ctx.fd_round_factor = 1.0
        return again
    ctx.fd_round_factor = measured / apriori
    ctx.fd_noise = sigma
    return True


class _Measured:
    """The analytical side's rounding along the probe direction, measured at check
    time, for gradients computed in a low precision (float32, or a float64 model
    that computes in float32 inside).

    The table's GRADIENT_ROUNDING is a prior with ~10x headroom over the rounding of
    typical models (and more on others: 300-700x on transformers), so a float32
    check judged by it misses relative bugs of 1e-5. Here the same gradient is taken
    again at points moved by a few ulps of the gradient's precision (every element
    by a random whole number of ulps, which re-rounds the forward pass) with the
    cotangent scaled by a random factor in [0.5, 2] (which re-rounds the backward:
    a VJP is linear in it), and each projected on the probe direction, divided by
    the scale, in pairs at x + m and x - m: the mean of a pair minus the checked
    value is the rounding actually present (about 1.2 sigma: three roundings), the
    gradient's own change over the move cancelling in the mean to first order (it
    was ~5x the rounding on a shrunk BERT, unpaired). A systematic
    error (a scaled backward, a wrong element, a float32-only kernel bug) is the
    same at every draw and does not enter it, so it cannot widen its own allowance.

    The measured allowance, MEASURE_SIGMAS x RMS with a floor of
    MEASURE_FLOOR_ULPS ulps of sum_t |<g_t, d_t>| (rounding common to every draw:
    constants rounded once), scales ctx.rho down from the prior (never up: where
    the measurement exceeds the prior, the usual diagnosis re-measures per tensor).
    Every later probe (blame, the precision split) uses the scaled rho. A check
    that fails on MEASURE_DRAWS draws takes MEASURE_MORE_DRAWS more and is judged
    on all of them, so a small-sample underestimate cannot make a false alarm.

    Torch only (TensorFlow keeps the prior until this path is tested there), not
    with a user rtol, and not in full mode (small problems compare elements)."""

    def __init__(self, low: np.dtype, eps: float, a0: float, floor: float):
        self.low, self.eps, self.a0, self.floor = low, eps, a0, floor
        self.low_name = str(low.name)  # what the backend's ulp_moves takes
        self.devs: list[float] = []
        self.draws = 0
        self.factor = 1.0
        #: judged at the floor without draws: they could not have changed the verdict
        self.at_floor = False

    @classmethod
    def start(cls, ctx: _Context, probe: _Probe) -> _Measured | None:
        s = ctx.session
        if s.framework != "torch" or ctx.options.rtol is not None or ctx.forward:
            return None  # forward mode: judged on the table's prior
        inner = s.internal_dtype
        names = {sp.dtype for sp in s.specs} | ({inner} if inner else set())
        low_name = max(names, key=tl.eps)
        low = _numpy_dtype(low_name)
        eps = tl.eps(low_name)
        if low is None or eps < tl.eps("float32") or not hasattr(s, "gradients_at"):
            return None
        floor = MEASURE_FLOOR_ULPS * eps * float(np.abs(probe.contrib).sum())
        m = cls(np.dtype(low), eps, probe.analytical, floor)
        # Draws can only raise the allowance above its floor (MEASURE_FLOOR_ULPS,
        # known before any draw) and never above the prior: where the floor is at
        # the prior already, or where one central difference agrees within the
        # floor's allowance, every draw would leave the verdict as it is (the
        # same difference, a tolerance at least as wide), so none is taken: the
        # check is judged at the floor, the tightest allowance a measurement can
        # give. The draws (2 x 2 gradients) were most of a passing float32
        # check's cost (issue 12).
        m._apply(ctx, probe)
        if MEASURE_SKIP_AT_FLOOR and (
            m.factor >= 1.0 or _single_difference(probe) is not None
        ):
            m.at_floor = m.factor < 1.0
            return m
        m._draw(ctx, probe, MEASURE_DRAWS)
        m._apply(ctx, probe)
        return m

    @property
    def may_draw_more(self) -> bool:
        return self.draws <= MEASURE_DRAWS and self.factor < 1.0 and not self.at_floor

    def draw_more(self, ctx: _Context, probe: _Probe) -> bool:
        """More draws before a failure rests on the measurement; True if the
        allowance changed."""
        before = self.factor
        self._draw(ctx, probe, MEASURE_MORE_DRAWS)
        self._apply(ctx, probe)
        return self.factor != before

    def _draw(self, ctx: _Context, probe: _Probe, n: int) -> None:
        s = ctx.session
        rng = np.random.default_rng([ctx.options.seed, 5, self.draws])
        for _ in range(n):
            # the move and the projection run where the tensors live (the backend's
            # ulp_moves / projected_gradients_at): no full-size host work per draw
            handle = s.ulp_moves(
                self.low_name, NOISE_ULPS, int(rng.integers(np.iinfo(np.int64).max))
            )
            pair = []
            for sign in (1.0, -1.0):  # x + move and x - move: the gradient's own
                # change over the move cancels in their mean (to first order)
                scale = float(rng.uniform(0.5, 2.0))
                cot = [(c * scale).astype(self.low).astype(np.float64) for c in ctx.cot]
                (a,) = s.projected_gradients_at(
                    [cot], probe.direction, promote=False, handle=handle, t=sign
                )
                pair.append(a / scale)
            self.devs.append(0.5 * (pair[0] + pair[1]) - self.a0)
            self.draws += 1

    @property
    def rms(self) -> float:
        return math.sqrt(sum(v * v for v in self.devs) / max(len(self.devs), 1))

    @property
    def allowance(self) -> float:
        return max(MEASURE_SIGMAS * self.rms, self.floor)

    def _apply(self, ctx: _Context, probe: _Probe) -> None:
        ctx.rho = list(ctx.prior_rho)
        prior = probe.analytic_rounding
        self.factor = min(1.0, self.allowance / prior) if prior > 0 else 1.0
        #: what the prior allows along this probe's direction
        self.prior = prior
        ctx.rho = [r * self.factor for r in ctx.prior_rho]

    def note(self) -> str:
        if self.at_floor:
            return (
                "gradient rounding not measured at check time: one central "
                "difference agrees within the least allowance a measurement could "
                f"give (the floor of {MEASURE_FLOOR_ULPS:g} ulp of the summed "
                f"contributions, {self.floor:.2e}; the table's prior would allow "
                f"{self.prior / max(self.floor, 1e-300):.0f}x more), so no draw "
                "could fail the check and none was taken"
            )
        return (
            f"gradient rounding measured at check time: {self.draws} pairs of "
            f"gradients at points up to {NOISE_ULPS} ulps either side, with rescaled "
            f"cotangents, deviate along the probe direction by {self.rms:.2e} RMS "
            + (
                f"(allowance {MEASURE_SIGMAS:g}x that"
                if MEASURE_SIGMAS * self.rms >= self.floor
                else f"(allowance: the floor of {MEASURE_FLOOR_ULPS:g} ulp of the "
                f"summed contributions, {self.floor:.2e}"
            )
            + f"; the table's prior would allow {self.prior / max(self.allowance, 1e-300):.0f}x more)"
        )


def _single_difference(probe: _Probe) -> fd.DerivativeEstimate | None:
    """The fast path: one central difference (2 forwards) on a float64 reference.

    If it agrees with the analytical value within the analytical rounding plus the
    difference's own rounding, the check passes without estimating truncation:
    an unestimated truncation error can only make agreement harder, unless it
    cancelled a real error exactly, which a seeded random direction makes
    vanishingly unlikely. Otherwise the +-h evaluations are reused by Richardson."""
    ctx = probe.ctx
    if ctx.session.reference_dtype != "float64":
        return None
    h = probe.step()
    memo = probe.memo or {}
    (fp, sp) = memo[h] if h in memo else probe.phi(h)
    (fm, sm) = memo[-h] if -h in memo else probe.phi(-h)
    probe.memo = {**memo, h: (fp, sp), -h: (fm, sm)}
    if ctx.session.reference_dtype != "float64":  # fell back during these calls
        raise _Restart
    value = (float(fp) - float(fm)) / (2 * h)
    rounding = (
        tl.FORWARD_ROUNDING_ULPS
        * ctx.fd_round_factor
        * ctx.eps_ref
        * max(float(sp), float(sm))
        / h
    )
    est = fd.DerivativeEstimate(
        np.float64(value),
        np.float64(rounding),
        np.float64(0.0),
        np.float64(rounding),
        h,
        coarse=h,
        curve=[(h, np.float64(value))],
        values=dict(probe.memo),
    )
    err, tol, terms = probe.judge(est)
    # a pass may rest on it only if its rounding is small enough to trust (as for
    # any estimate); otherwise Richardson takes over and may coarsen the step
    trusted = terms["finite_difference"] <= ctx.fd_limit(_trust_scale(probe, est))
    return est if err <= tol and trusted else None


def _trust_scale(probe: _Probe, est: fd.DerivativeEstimate) -> float:
    """What the finite-difference error is judged against (MAX_FD_RELATIVE x
    this): the size of the directional derivative. Where every analytical
    gradient is exactly zero (floor, sign: piecewise constant) that size is 0 and
    any estimate, however exact, would look untrustworthy; the scale is then the
    derivative phi would have if it changed by its own magnitude S when x moves by
    its own magnitude, S * step_fraction / h (h: the probe's base step, the input
    scale over the direction's size). A nonzero finite difference is still judged
    against the (zero) analytical value by the tolerance."""
    scale = max(probe.scale, abs(float(est.value)))
    ctx = probe.ctx
    if max(ctx.g_norms, default=0.0) == 0.0 and est.values:
        s = max(float(v[1]) for v in est.values.values())
        frac = ctx.options.step or tl.step_fraction(ctx.session.reference_dtype)
        scale = max(scale, s * frac / probe.step())
    return scale


def _curve(est: fd.DerivativeEstimate) -> list[StepEstimate]:
    final = float(est.value)
    return [StepEstimate(h, float(v), abs(float(v) - final)) for h, v in est.curve]


def _diagnose(
    ctx: _Context,
    probe: _Probe,
    est: fd.DerivativeEstimate,
    report: CheckReport,
    err: float,
    trustworthy: bool,
) -> None:
    s = ctx.session
    h = est.step
    # 1. nondeterminism: the same point evaluated twice, the same gradient taken twice
    again, _ = probe.phi(h)
    first, scale_s = est.values[h]
    spread = abs(float(again) - float(first))
    if spread > 0 and (
        _gross(spread, float(scale_s), ctx.eps_ref)
        or spread / h >= 0.1 * max(err, tl.FD_SAFETY * float(est.error))
    ):
        report.status = "nondeterministic"
        report.notes.append(
            f"fn gave two different values at the same point (difference {spread:.3e}, "
            f"i.e. {spread / h:.3e} in the directional derivative): dropout or another "
            "random op in train mode, or nondeterministic kernels. Put the model in "
            "eval mode, fix the RNG inside fn, or enable deterministic algorithms."
        )
        return
    if ctx.options.ad == "both":  # the same JVPs again
        drift = float(
            np.abs(ctx.forward_contrib(probe.direction) - probe.contrib).sum()
        )
    elif ctx.forward:
        drift = abs(ctx.forward_total(probe.direction) - probe.analytical)
    else:
        s.analytic()
        regrads = s.vjp(ctx.cot, compact=isinstance(ctx.grads, Widened))
        drift = sum(
            abs(
                cpt.piece_sum(lambda a, b, d: np.dot(a - b, d), g2, g, dd)
                if g2 is not None
                else cpt.piece_sum(np.dot, g, dd)
            )
            for g, g2, dd in zip(
                cpt.narrow(ctx.grads),
                regrads,
                cpt.narrow(probe.direction),
                strict=True,
            )
            if dd is not None
        )
    if drift > 0 and drift >= 0.1 * err:
        report.status = "nondeterministic"
        report.notes.append(
            f"the backward pass is not reentrant: two gradients at the same point differ "
            f"(by {drift:.3e} along the probe direction): atomics in scatter/index_add or "
            "nondeterministic kernels."
        )
        return
    # 2. low precision against a float64 reference: is the float64 gradient right,
    #    and is the native one within its own (measured) rounding of it?
    if _precision_split(ctx, probe, est, report):
        return
    # 3. kinks: one-sided derivatives at x disagree, or finite differences do not
    #    converge (steps cross kinks). With many units on kinks at once (a fresh
    #    init whose activations vanish: ReLU6 at BatchNorm's zero bias) the
    #    framework's subgradient need not lie between the one-sided derivatives
    #    along the probe direction, so neither "between" nor "outside" decides.
    #    The check is re-run at a nearby point where the function is smooth at the
    #    step's scale: its verdict there decides (a wrong backward stays a
    #    mismatch), and the report says so.
    kink = _kink(probe, est)
    if kink is not None:  # the float64 gradient missed FD because of the kink
        report.notes = [n for n in report.notes if not n.endswith(_NOT_PRECISION)]
    if kink is not None or not trustworthy:
        # a kink measured at step h may lie near x rather than at it (within h):
        # at smaller steps (float64 allows them) the one-sided derivatives then
        # agree and the differences converge; the smaller steps decide the check
        small = _smaller_step_estimate(ctx, probe)
        if small is not None and _kink(probe, small) is None:
            decided = _judge_smaller_steps(ctx, probe, small, report)
            if decided is not None:
                if decided:
                    return
                est = small  # the mismatch is judged on these differences
                # low precision: the float64 gradient against these converged
                # differences, then the native one against its measured rounding
                if _precision_split(ctx, probe, small, report):
                    return
                kink, trustworthy, err = None, True, report.error
    # (forward mode judges at x only: a nearby point would need JVPs there)
    if (kink is not None or not trustworthy) and not ctx.nearby and not ctx.forward:
        if _nearby(ctx, probe, est, report, kink, trustworthy):
            return
    if kink is not None:
        fwd, bwd, jump, noise = kink
        lo, hi = min(fwd, bwd), max(fwd, bwd)
        outside = max(lo - probe.analytical, probe.analytical - hi, 0.0)
        if outside > report.tolerance and _outside_by_detach(
            ctx, probe, lo, hi, report
        ):
            return
        if outside <= report.tolerance or ctx.nearby:
            report.status = "nondifferentiable"
            report.notes.append(
                f"one-sided derivatives differ at this point: forward {fwd:.6e}, backward "
                f"{bwd:.6e} (jump {jump:.3e} >> noise {noise:.1e}); the analytical value "
                f"{probe.analytical:.6e} "
                + (
                    "lies between them (a valid subgradient). "
                    if outside <= report.tolerance
                    else "lies outside them, which many kinks at once allow. "
                )
                + "A kink such as ReLU at 0, max/min ties or |x| at 0."
            )
            report.location = _locate(
                ctx, probe, lambda p: _kink(p, None) is not None, "kink"
            )
            return
        report.notes.append(
            f"a kink is present (one-sided derivatives {fwd:.6e} / {bwd:.6e}) but the "
            f"analytical value {probe.analytical:.6e} is outside both: a real mismatch."
        )
    if not trustworthy and (err <= report.tolerance or ctx.nearby):
        report.status = "nondifferentiable"
        report.notes.append(
            f"finite differences do not converge: the estimated error "
            f"{report.tolerance_terms['finite_difference']:.2e} exceeds what a pass may "
            f"rest on ({ctx.fd_limit(_trust_scale(probe, est)):.2e}). The function is not "
            "smooth at the "
            "scale of the step (many kinks crossed) or too coarse in "
            f"{s.reference_dtype}. Try float64, or a smaller step=."
        )
        return
    report.status = "mismatch"
    report.location = _locate(ctx, probe, _mismatches, "mismatch")
    report.notes.extend(s.known_causes(report.location))
    _detach_counterfactual(ctx, probe, est, report)


def _detach_counterfactual(
    ctx: _Context, probe: _Probe, est: fd.DerivativeEstimate, report: CheckReport
) -> None:
    """A mismatch where fn detaches tensors that require grad: one more gradient
    with those detaches passing it (the backend's ``passing_detaches``, an
    identity in place of each detach), compared along the probe direction with
    the same finite differences and tolerance. When it matches, the detaches are
    the whole mismatch (by design where the model stops the gradient on purpose:
    D-FINE's and RT-DETR's detached reference points, DAC's straight-through
    quantizer): the verdict stays a mismatch (torch's gradient is not fn's
    derivative) and its first note says so. When it still misses, the detaches
    do not explain it and a note says that too. Backends without the hook, or fn
    without detaches: nothing."""
    got = _passing_derivative(ctx, probe, report)
    if got is None:
        return
    alt_dir, passed, alt_size, low, held = got
    err = abs(float(est.value) - alt_dir)
    tol = report.tolerance
    if low:
        tol = (
            tl.FD_SAFETY * float(est.error)
            + tl.ROUNDING_SIGMAS * tl.gradient_rounding("float64") * math.sqrt(alt_size)
            + probe.input_rounding(est.step)
        )
    noise = 0.0
    if err > tol:
        # the differences' own noise, measured (the Richardson error of two
        # steps that agree by chance can be 5x below it: Grounding DINO's
        # reference phi scatters by ~1e-12 at steps of 1e-9, 4e-5 at the check's
        # step, and the counterfactual missed by 1.6e-5 > 9.8e-6 on that alone)
        noise = _counterfactual_noise(probe, est)
        tol += noise
    n = f"{passed} detach{'es' if passed != 1 else ''}"
    noted = f", with the differences' measured noise {noise:.3e}" if noise > 0 else ""
    if err <= tol:
        report.notes.insert(
            0,
            f"cause confirmed: with fn's {n} of tensors that require grad passing the "
            f"gradient (an identity in place of each .detach(), one more backward"
            f"{_held_casts(held)}), torch's directional derivative is {alt_dir:.6e} against the finite "
            f"differences' {float(est.value):.6e} (error {err:.3e} <= tolerance "
            f"{tol:.3e}{noted}), where with them it is {probe.analytical:.6e}: the "
            "detaches "
            "are the whole mismatch, not a wrong backward. By design where the model "
            "stops the gradient on purpose (see the note naming them).",
        )
    else:
        before = abs(float(est.value) - probe.analytical)
        report.notes.append(
            f"with fn's {n} passing the gradient, torch's directional derivative is "
            f"{alt_dir:.6e}, still not the finite differences' {float(est.value):.6e} "
            f"(error {err:.3e} > tolerance {tol:.3e}{noted}): the detaches do not "
            "explain "
            "the whole mismatch"
            + (
                f", though nearly all of it (the error drops from {before:.3e} to "
                f"{err:.3e}: what is left is a mismatch of its own, {err / tol:.1f}x "
                "the tolerance)."
                if err < 0.01 * before
                else "."
            )
        )


def _counterfactual_noise(probe: _Probe, est: fd.DerivativeEstimate) -> float:
    """FD_NOISE_SIGMAS deviations of the central difference at the estimate's step
    caused by phi's noise, measured as _measure_fd_noise does (Moré-Wild on
    FD_NOISE_POINTS values FD_NOISE_SPACING x the step apart); 0 when no estimate
    is possible (the smooth part dominates) or phi fails."""
    h = float(est.step)
    if not h > 0:
        return 0.0
    try:
        sigma, _ = _noise_table(probe, 0.0, h)
    except Exception:  # a diagnosis only
        return 0.0
    if not sigma:
        return 0.0
    return _difference_noise(sigma, h)


def _noise_table(
    probe: _Probe,
    centre: float,
    h: float,
    *,
    shift: float = 0.0,
    known: dict | None = None,
) -> tuple[float | None, list[float]]:
    """Moré-Wild's estimate of phi's noise along the probe (fd.noise_level, None
    where the table is not noise-dominated) and the table: FD_NOISE_POINTS values
    FD_NOISE_SPACING x h apart around ``centre`` (moved by ``shift`` spacings),
    each read from ``known`` (evaluations already made) where it is there."""
    dt = FD_NOISE_SPACING * h
    half = FD_NOISE_POINTS // 2
    known = known or {}
    values = [
        float((known[t] if t in known else probe.phi(t))[0])
        for t in (centre + (i - half + shift) * dt for i in range(FD_NOISE_POINTS))
    ]
    return fd.noise_level(np.array(values)), values


def _difference_noise(sigma: float, h: float) -> float:
    """FD_NOISE_SIGMAS deviations of a central difference at step h whose two
    evaluations each deviate by sigma."""
    return FD_NOISE_SIGMAS * sigma / (math.sqrt(2.0) * h)


def _held_casts(held: int) -> str:
    """The counterfactual's words for the 8-bit float casts it held constant (a
    straight-through quantizer's own rounding steps, see the torch backend's
    PassDetach)."""
    if not held:
        return ""
    return (
        f"; {held} cast{'s' if held != 1 else ''} to an 8-bit float held constant, "
        "their derivative between rounding steps, where torch passes the gradient "
        "through as an identity"
    )


def _passing_derivative(
    ctx: _Context, probe: _Probe, report: CheckReport
) -> tuple[float, int, int, bool, int] | None:
    """torch's directional derivative along the probe with fn's detaches passing
    the gradient (see _detach_counterfactual): (value, detaches passed, gradient
    count, taken on float64 copies), or None when the backend has no such hook or
    fn detaches nothing (a failure to take it is noted on the report)."""
    s = ctx.session
    passing = getattr(s, "passing_detaches", None)
    manager = None if passing is None else passing()
    if manager is None:
        return None
    # a low-precision check against a float64 reference: the counterfactual
    # gradient is taken as the reference evaluations are (float64 copies) and
    # judged at float64 tolerance, as the precision split judges the float64 one
    low = _needs_split(ctx) and not ctx.forward
    try:
        with manager as mode:
            alt = s.gradients_at([ctx.cot], promote=low)[0]  # type: ignore[attr-defined]
    except Exception as exc:  # the counterfactual is a diagnosis, never a verdict
        report.notes.append(
            "fn's gradient with its detaches passing the gradient could not be "
            f"taken ({str(exc)[:160]}): whether they explain the mismatch is open."
        )
        return None
    alt_dir = sum(
        float(np.vdot(g, d))
        for g, d in zip(alt, probe.direction, strict=True)
        if g is not None and d is not None
    )
    held = int(getattr(mode, "held", 0))
    return alt_dir, int(getattr(mode, "passed", 0)), len(alt), low, held


def _outside_by_detach(
    ctx: _Context, probe: _Probe, lo: float, hi: float, report: CheckReport
) -> bool:
    """At a kink, torch's value lies outside both one-sided derivatives (which
    many kinks at once allow, so the verdict would be nondifferentiable). When fn
    detaches tensors and, with those detaches passing the gradient, torch's value
    lies between them, the detaches are why it was outside: a mismatch, cause
    confirmed (Grounding DINO's detached proposals at a point with grid-sample
    kinks). True when so decided."""
    got = _passing_derivative(ctx, probe, report)
    if got is None:
        return False
    alt_dir, passed, _, _, held = got
    tol = report.tolerance
    if max(lo - alt_dir, alt_dir - hi, 0.0) > tol:
        return False
    n = f"{passed} detach{'es' if passed != 1 else ''}"
    report.status = "mismatch"
    report.location = _locate(ctx, probe, _mismatches, "mismatch")
    report.notes.extend(ctx.session.known_causes(report.location))
    report.notes.insert(
        0,
        f"cause confirmed: torch's directional derivative {probe.analytical:.6e} lies "
        f"outside the one-sided derivatives at this point ({lo:.6e} .. {hi:.6e}: "
        f"kinks); with fn's {n} of tensors that require grad passing the gradient "
        f"(an identity in place of each .detach(), one more backward"
        f"{_held_casts(held)}) it is {alt_dir:.6e}, between them (tolerance {tol:.3e}): the detaches are the "
        "mismatch, not the kinks and not a wrong backward. By design where the "
        "model stops the gradient on purpose (see the note naming them).",
    )
    return True


def _smaller_step_estimate(
    ctx: _Context, probe: _Probe
) -> fd.DerivativeEstimate | None:
    """Central differences on a ladder of steps around SMALLER_STEP_FACTOR x the
    usual one (a float64 reference allows steps that small), with the error
    measured as the disagreement of neighbouring extrapolations (fd.ladder): at
    such steps the a-priori rounding bound (FORWARD_ROUNDING_ULPS x eps x S / h)
    is far above the scatter actually seen, and would refuse a converged
    estimate. The ladder keeps its best-agreeing pair, an optimistic choice, so
    its error is weighted as a low-precision reference's. None without a float64
    reference."""
    if ctx.session.reference_dtype != "float64":
        return None
    try:
        est = fd.ladder(probe.phi, probe.step() * SMALLER_STEP_FACTOR)
    except _Restart:  # pragma: no cover - the precision was decided before
        return None
    weight = tl.FD_SAFETY_LOW_PRECISION / tl.FD_SAFETY
    est.error = est.error * weight
    est.truncation = est.truncation * weight
    return est


def _judge_smaller_steps(
    ctx: _Context, probe: _Probe, est: fd.DerivativeEstimate, report: CheckReport
) -> bool | None:
    """Differences that did not converge at the usual step (kinks near x, within
    the step: deep ReLU stacks) but do at smaller ones decide the check. None when
    they do not converge there either; otherwise the report takes the smaller
    steps' comparison and every later probe (blame) uses them too: True when it
    passes, False when it is a mismatch for the caller to locate."""
    err, tol, terms = probe.judge(est)
    if terms["finite_difference"] > ctx.fd_limit(_trust_scale(probe, est)):
        return None
    ctx.step_scale = SMALLER_STEP_FACTOR
    report.error, report.tolerance, report.tolerance_terms = err, tol, terms
    report.tolerance_reason = f"at a smaller step ({est.step:.2e}): " + _reason(
        terms, ctx
    )
    report.steps = _curve(est)
    report.notes = [n for n in report.notes if not n.endswith(_NOT_PRECISION)]
    if err <= tol:
        report.status = "passed"
        report.notes.append(
            "finite differences did not converge at the usual step (kinks near x, "
            f"within the step) but do at smaller steps (h = {est.step:.2e}), where "
            f"the gradient matches them (error {err:.3e} <= tolerance {tol:.3e})."
        )
        return True
    report.notes.append(
        "finite differences did not converge at the usual step (kinks near x, "
        f"within the step); at smaller steps (h = {est.step:.2e}) they converge "
        f"with no kink and are judged there (the gradient differs from them by "
        f"{err:.3e}, more than the {tol:.3e} the rounding prior allows)."
    )
    return False


class _Shifted(_Derived):
    """The same function seen from x + shift: every evaluation and gradient the
    check asks for is the inner session's at x + shift + t*d. Framework-free: it
    only combines directions, so any backend's session can be shifted."""

    def __init__(self, inner: Session, shift: list[np.ndarray]):
        super().__init__(inner)
        self.shift = shift

    def _moved(self, direction: Sequence[np.ndarray | None] | None, t: float):
        if direction is None or t == 0.0:
            return self.inner.prepare(self.shift)
        return self.inner.prepare(
            [
                s if d is None else s + t * d
                for s, d in zip(self.shift, direction, strict=True)
            ]
        )

    def analytic(self) -> list[np.ndarray]:
        return []  # vjp() below evaluates afresh at the shifted point

    def vjp(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[np.ndarray | None]:
        return self.gradients_at([cotangents], promote=False)[0]

    def _at(
        self, promote: bool, handle: object, t: float
    ) -> tuple[bool, object, float]:
        return promote, self._moved(handle, t), 1.0  # x + shift + t d

    def prepare(self, direction: Sequence[np.ndarray | None]) -> object:
        return list(direction)

    def outputs_at(self, handle: object, t: float) -> list[np.ndarray]:
        return self.inner.outputs_at(self._moved(handle, t), 1.0)  # type: ignore[arg-type]

    def values(self) -> list[np.ndarray]:
        return [x + s for x, s in zip(self.inner.values(), self.shift, strict=True)]


def _nearby(
    ctx: _Context,
    probe: _Probe,
    est: fd.DerivativeEstimate,
    report: CheckReport,
    kink: tuple[float, float, float, float] | None,
    trustworthy: bool,
) -> bool:
    """Re-run the directional check at x + shift (NEARBY_SHIFT of each tensor's
    scale, seeded; rounded so the point is exact in each tensor's dtype) and decide
    the report with it. True when decided: "mismatch" if the gradient is wrong
    where the function is smooth, else "nondifferentiable" (the disagreement at x
    comes from kinks), with the kink census at x where the backend can take one.
    False when the nearby point cannot be evaluated (outside fn's domain)."""
    s = ctx.session
    rng = np.random.default_rng(ctx.options.seed + 3)
    shift = []
    for x, spec, xs in zip(ctx.x, s.specs, ctx.x_scale, strict=True):
        move = NEARBY_SHIFT * xs * rng.standard_normal(x.shape)
        dt = _numpy_dtype(spec.dtype) or np.dtype(np.float64)
        shift.append((x + move).astype(dt).astype(np.float64) - x)
    shifted = _Shifted(s, shift)
    try:
        raw = shifted.vjp(ctx.cot)
        shifted.check_finite_grads(raw)
        grads = [
            np.zeros(sp.shape) if g is None else g
            for sp, g in zip(s.specs, raw, strict=True)
        ]
        sub_ctx = _Context(shifted, ctx.options, ctx.cot, grads)
        sub_ctx.nearby = True
        sub = _run_directional(sub_ctx, raw, np.random.default_rng(ctx.options.seed))
    except GradcheckError as exc:
        report.notes.append(
            f"a nearby point (each tensor moved by {NEARBY_SHIFT:g} of its scale) "
            f"could not be checked: {str(exc).splitlines()[0]}"
        )
        return False
    census = _census_note(s)
    why = (
        f"one-sided derivatives differ at x (forward {kink[0]:.6e}, backward "
        f"{kink[1]:.6e}, analytical {probe.analytical:.6e})"
        if kink is not None
        else "finite differences do not converge at x (estimated error "
        f"{report.tolerance_terms['finite_difference']:.2e}: the steps cross kinks)"
    )
    where = (
        f"checked again at a nearby point: every tensor moved by {NEARBY_SHIFT:g} of "
        f"its scale (seed {ctx.options.seed + 3})"
    )
    if sub.status == "mismatch":
        report.status = "mismatch"
        report.location = sub.location
        report.error, report.tolerance = sub.error, sub.tolerance
        report.tolerance_terms = sub.tolerance_terms
        report.tolerance_reason = f"at the nearby point: {sub.tolerance_reason}"
        report.steps = sub.steps
        report.tensors = sub.tensors
        report.notes.append(
            f"{why}; {where}, where the function is smooth at the step's scale, the "
            "gradient is wrong: a real mismatch (shown at the nearby point)."
            + (f" {census}" if census else "")
        )
        report.notes.extend(sub.notes)
        return True
    if sub.status == "passed" and kink is None:
        # no kink measured at x, only differences that do not converge there (kinks
        # near x, within the steps, as in deep ReLU stacks): the gradient is judged
        # where the differences converge, and the report says where
        report.status = "passed"
        report.error, report.tolerance = sub.error, sub.tolerance
        report.tolerance_terms = sub.tolerance_terms
        report.tolerance_reason = f"at the nearby point: {sub.tolerance_reason}"
        report.steps = sub.steps
        report.notes = [n for n in report.notes if not n.endswith(_NOT_PRECISION)]
        report.notes.append(
            f"{why}; no kink was measured at x itself. {where.capitalize()}, where "
            f"the differences converge, the gradient matches finite differences "
            f"(error {sub.error:.3e} <= tolerance {sub.tolerance:.3e}): passed there."
            + (f" {census}" if census else "")
        )
        return True
    report.status = "nondifferentiable"
    report.notes = [n for n in report.notes if not n.endswith(_NOT_PRECISION)]
    if sub.status == "passed":
        report.notes.append(
            f"{why}: the function is not differentiable at x. {where.capitalize()}, "
            f"the gradient matches finite differences (error {sub.error:.3e} <= "
            f"tolerance {sub.tolerance:.3e}): the framework's gradient is right where "
            "the function is differentiable."
            + (f" {census}" if census else "")
            + " To check at x itself, move it off the kinks (e.g. train a few steps "
            "or initialise biases away from 0)."
        )
        if kink is not None:  # a census names the places: a cheaper search
            report.location = _locate(
                ctx,
                probe,
                lambda p: _kink(p, None) is not None,
                "kink",
                budget=CENSUS_BLAME_BUDGET if census else None,
            )
    else:
        report.notes.append(
            f"{why}; {where}, the verdict is {sub.status} too: the function is not "
            "smooth at the scale of the step around x."
            + (f" {census}" if census else "")
        )
        report.notes.extend(sub.notes)
        report.location = sub.location
    return True


def _census_note(s: Session) -> str:
    """Where the backend can count them: how many units sit exactly on a kink at x."""
    census = getattr(s, "kink_census", None)
    if census is None:
        return ""
    try:
        rows = census()
    except Exception:  # a diagnostic only: never let it hide the verdict
        return ""
    if not rows:
        return ""
    total = sum(n for _, n, _ in rows)
    rows = sorted(rows, key=lambda r: -r[1])
    listed = ", ".join(f"{where} {n}/{size}" for where, n, size in rows[:5])
    more = f" and {len(rows) - 5} more places" if len(rows) > 5 else ""
    return f"At x, {total} unit(s) sit exactly on a kink: {listed}{more}."


def _gross(spread: float, scale: float, eps: float) -> bool:
    """Two evaluations at one point differ by far more than rounding could (dropout,
    random ops): nondeterministic whatever the error it causes. Differences of a few
    ulps (reduction order, GPU atomics) are judged by their effect instead."""
    return spread > NONDET_ULPS * eps * max(scale, 1e-300)


def _needs_split(ctx: _Context) -> bool:
    s = ctx.session
    return s.reference_dtype == "float64" and (
        any(sp.dtype != "float64" for sp in s.specs) or s.internal_dtype is not None
    )


def _jitter_handle(ctx: _Context) -> tuple[object, float]:
    """A direction that moves every element by a few ulps of its own magnitude."""
    rng = np.random.default_rng(ctx.options.seed + 1)
    d = [
        # |x| one tensor at a time (ctx.abs_x would hold all of them at once)
        rng.choice([-1.0, 1.0], size=x.shape) * np.maximum(np.abs(x), 1e-30)
        for x in ctx.x
    ]
    eta = JITTER_ULPS * max(tl.eps(sp.dtype) for sp in ctx.session.specs)
    return ctx.session.prepare(d), eta


def _zeros_for_none(
    ctx: _Context, grads: Sequence[np.ndarray | None]
) -> list[np.ndarray]:
    return [
        np.zeros(sp.shape) if g is None else g
        for sp, g in zip(ctx.session.specs, grads, strict=True)
    ]


_NOISE_NOTE = (
    f"the low-precision backward's own rounding noise ({NOISE_DRAWS} draws at points "
    f"up to {NOISE_ULPS} ulps away with cotangents moved by a few ulps, each against "
    "the float64 gradient at the same point, plus that gradient's change)"
)


def _rounding_draws(
    ctx: _Context,
    cot_sets: Sequence[Sequence[np.ndarray]],
    *,
    stability: bool = True,
    low_name: str | None = None,
    elementwise: bool = False,
) -> _Draws | None:
    """Errors of the native gradient against the float64 one at NOISE_DRAWS nearby
    points: every element moved by a random whole number of its own ulps (<=
    NOISE_ULPS, so the point stays exactly representable in its dtype) and the
    cotangent scaled by a random factor in [0.5, 2] (and each element by 1 + a few
    eps; rounded to the native dtype). A VJP is linear in the cotangent, so the
    scaling changes nothing exactly but re-rounds every intermediate the backward
    forms from it (cancelled O(1) terms, exponents ~1e4). Both
    gradients are taken at the same point with the same cotangent, so the true
    gradient's change cancels and what remains is the native backward's own
    rounding: cancelled terms, rounded intermediates, re-rounded at each draw.
    Returns the per-element noise, NOISE_SIGMAS x (the draws' standard deviation +
    the RMS change of the float64 gradient itself), as a _Draws (its L2 norm per
    tensor, or per element for a small problem); None where a dtype has no NumPy
    version. The draws are summed as they come (Welford's running mean and sum
    of squared deviations), one tensor at a time: the native gradients of a
    draw are held while its float64 ones are read one tensor at a time, and no
    draw is kept (a BERT-base float32 check would otherwise hold 16 float64
    copies of its gradient). The second term is backward stability: a stable
    backward returns the exact gradient of a point a few ulps away, so its error
    may reach the float64 gradient's sensitivity to such moves. (logcumsumexp at
    x = 1e4 is admitted by the first term: the rescaled cotangent re-rounds its
    ~1e4 intermediates, which moving x alone did not.) No cap: a backward computing
    internally in a lower precision than its dtype spreads like rounding and passes
    this test; a systematic error (a scaled backward, a wrong element) gives the
    same error at every draw and adds nothing to the spread.

    ``stability=False`` leaves the second term out (the measured path, see
    _measured_split: a backward-stable gradient's error re-rounds from point to
    point and shows in the spread; the float64 gradient's change over a few ulps
    bounds it from far above and would hide a 1e-5 bug); ``low_name`` moves the points by ulps of that dtype instead of each
    tensor's own (a float64 model computing in float32 inside)."""
    s = ctx.session
    names = [low_name or sp.dtype for sp in s.specs]
    dts = [_numpy_dtype(n) for n in names]
    # torch only for now: on TensorFlow this path (float64 evaluations at moved
    # points with rescaled cotangents) is not yet tested; a failed promoted
    # evaluation there would switch the session's reference precision mid-check
    if s.framework != "torch" or any(dt is None for dt in dts):
        return None
    eps = max(tl.eps(n) for n in names)
    low = np.float32 if eps >= tl.eps("float32") else np.float64
    rng = np.random.default_rng(ctx.options.seed + 2)
    stats = _Draws(len(cot_sets), s.specs, stability or elementwise)
    base = None
    if stability:  # the float64 gradient at x: what the moved ones change from
        base = s.gradient_reductions(cot_sets, lambda row, t, g: g, promote=True)
    for _ in range(NOISE_DRAWS):
        handle = s.ulp_moves(
            names, NOISE_ULPS, int(rng.integers(np.iinfo(np.int64).max))
        )
        scale = rng.uniform(0.5, 2.0)
        cots = [
            [
                (
                    c
                    * scale
                    * (1 + NOISE_ULPS * eps * rng.uniform(-1, 1, size=np.shape(c)))
                )
                .astype(low)
                .astype(np.float64)
                for c in cs
            ]
            for cs in cot_sets
        ]
        held = _held_native(s, cots, handle, 1.0)
        s.gradient_reductions(
            cots, stats.adder(held, scale, base), promote=True, handle=handle, t=1.0
        )
        del handle, held
    return stats


class _Draws:
    """_rounding_draws' statistics, summed draw by draw per row and tensor:
    Welford's running mean of the error (native minus float64 gradient, per
    element) and its sum of squared deviations (per element where ``elementwise``
    asks for the per-element noise, else summed over the tensor: its L2 norm
    needs no more), and the sum of the squared moves of the float64 gradient."""

    def __init__(self, rows: int, specs: Sequence[Any], elementwise: bool):
        self.specs = specs
        self.elementwise = elementwise
        self.n = [[0] * len(specs) for _ in range(rows)]
        self.mean: list[list[Any]] = [[None] * len(specs) for _ in range(rows)]
        self.m2: list[list[Any]] = [[0.0] * len(specs) for _ in range(rows)]
        self.moves: list[list[Any]] = [[None] * len(specs) for _ in range(rows)]

    def adder(
        self,
        held: list[list[np.ndarray | None]],
        scale: float,
        base: list[list[np.ndarray]] | None,
    ) -> Callable[[int, int, np.ndarray], None]:
        """The reduction that adds one draw: its float64 gradient g64, one tensor
        at a time (and that a piece at a time), against the native one held
        (dropped once used), both divided by the draw's cotangent scale."""

        def add(row: int, t: int, g64: np.ndarray) -> None:
            g32, held[row][t] = held[row][t], None
            b = None if base is None else base[row][t]
            self.n[row][t] += 1
            k = self.n[row][t]
            if self.mean[row][t] is None:  # flat per-element sums
                self.mean[row][t] = np.zeros(g64.size)
                if self.elementwise:
                    self.m2[row][t] = np.zeros(g64.size)
                if b is not None:
                    self.moves[row][t] = np.zeros(g64.size)
            mean, m2, moves = self.mean[row][t], self.m2[row][t], self.moves[row][t]
            for at, (native, wide, before) in cpt.pieces(g32, g64, b):
                sl = slice(at, at + wide.size)
                err = (native - wide) / scale
                delta = err - mean[sl]
                mean[sl] += delta / k
                sq = delta * (err - mean[sl])
                if self.elementwise:
                    m2[sl] += sq
                else:
                    self.m2[row][t] += float(sq.sum())
                if before is not None:
                    moves[sl] += np.square(wide / scale - before)

        return add

    def _noise(self, row: int, t: int) -> np.ndarray | float:
        """NOISE_SIGMAS x (standard deviation + RMS move): per element where
        elementwise, else its L2 norm (no move term then)."""
        n = self.n[row][t]
        var = self.m2[row][t] / max(n - 1, 1)
        if not self.elementwise:
            return NOISE_SIGMAS * math.sqrt(max(float(var), 0.0))
        out = np.sqrt(var)
        if self.moves[row][t] is not None:
            out = out + np.sqrt(self.moves[row][t] / n)
        return NOISE_SIGMAS * out

    def tensor_norms(self) -> list[list[float]]:
        """Per row, per tensor: the L2 norm of the per-element noise."""
        return [
            [
                float(v) if np.isscalar(v) else float(np.linalg.norm(v))
                for v in (self._noise(r, t) for t in range(len(self.specs)))
            ]
            for r in range(len(self.n))
        ]

    def elements(self) -> np.ndarray:
        """The per-element noise, shape (rows, n_in) (elementwise only)."""
        assert self.elementwise
        return np.stack(
            [
                np.concatenate(
                    [np.reshape(self._noise(r, t), -1) for t in range(len(self.specs))]
                )
                for r in range(len(self.n))
            ]
        )


class _Against:
    """The checked gradient g against another gradient G of the same tensors (the
    float64 one), as the numbers the precision split reads, per tensor: G is
    never held whole. It comes one tensor at a time (Session.gradient_reductions;
    a float32 model's float64 gradient is twice the model) and leaves
    <G_t, d_t> along the probe direction, ||G_t||, ||g_t - G_t|| and the element
    where |g_t - G_t| is largest, with G and g there."""

    def __init__(self, rows: Sequence[tuple[float, float, float, tuple]]):
        self.along = sum(r[0] for r in rows)
        self.norms = [r[1] for r in rows]
        self.devs = [r[2] for r in rows]
        #: per tensor: (flat index, G there, g there), or None for no element
        self.worst = [r[3] for r in rows]

    @staticmethod
    def reducer(
        ctx: _Context, direction: Sequence[np.ndarray | None] | None
    ) -> Callable[[int, int, np.ndarray], tuple[float, float, float, tuple]]:
        """The reduction of G_t against ctx.grads[t] (``direction``: None for no
        dot product)."""

        grads = cpt.narrow(ctx.grads)
        dirs = None if direction is None else cpt.narrow(direction)

        def reduce(row: int, t: int, other: np.ndarray):
            d = None if dirs is None else dirs[t]
            along = sq_other = sq_dev = 0.0
            worst, largest = None, -1.0
            for at, (g, o, dd) in cpt.pieces(grads[t], other, d):
                diff = g - o
                if dd is not None:
                    along += float(np.dot(o, dd))
                sq_other += float(np.dot(o, o))
                sq_dev += float(np.dot(diff, diff))
                k = int(np.argmax(np.abs(diff)))
                if abs(diff[k]) > largest:  # the first largest, as np.argmax's
                    largest = abs(float(diff[k]))
                    worst = (at + k, float(o[k]), float(g[k]))
            return (along, math.sqrt(sq_other), math.sqrt(sq_dev), worst)

        return reduce

    @classmethod
    def of(cls, ctx: _Context, others: Sequence[np.ndarray | None]) -> _Against:
        """The summary of gradients already held (as a list)."""
        reduce = cls.reducer(ctx, None)
        return cls(
            [
                reduce(0, t, np.zeros(sp.shape) if o is None else o)
                for t, (sp, o) in enumerate(zip(ctx.session.specs, others, strict=True))
            ]
        )

    @classmethod
    def taken(
        cls,
        ctx: _Context,
        direction: Sequence[np.ndarray | None] | None,
        **at: Any,
    ) -> _Against:
        """The summary of the gradient the session takes at ``at``
        (gradient_reductions' keywords), read one tensor at a time."""
        s = ctx.session
        (rows,) = s.gradient_reductions([ctx.cot], cls.reducer(ctx, direction), **at)
        return cls(rows)


def _native_path_mismatch(
    ctx: _Context,
    report: CheckReport,
    g64: _Against,
    worst: tuple[int, float, float],
    versus: str,
    note: str,
) -> None:
    """The float64 gradient matches finite differences but the native one is over
    its allowance at tensor ``worst[0]``: a mismatch located at that tensor's
    largest deviation from the float64 gradient, with ``note`` appended."""
    t, dev, allowed = worst
    spec = ctx.session.specs[t]
    at = g64.worst[t]
    k = 0 if at is None else at[0]
    report.status = "mismatch"
    report.location = Location(
        tensor=spec.name,
        index=tuple(int(i) for i in np.unravel_index(k, spec.shape))
        if spec.shape
        else (),
        numerical=None if at is None else at[1],
        analytical=None if at is None else at[2],
        error=dev,
        tolerance=allowed,
        quantity=_quantity(ctx)
        + " (numerical = float64 gradient, verified by finite differences; "
        f"error/tolerance: the tensor's L2 deviation vs {versus})",
    )
    report.notes.append(note)


_NOT_PRECISION = ": the error is not about precision."


def _precision_split(
    ctx: _Context, probe: _Probe, est: fd.DerivativeEstimate, report: CheckReport
) -> bool:
    """Decide a failed low-precision check with the float64 gradient; True if decided.

    A float32 gradient can differ from the float64 reference by more than the usual
    rounding when the function is ill-conditioned in float32 (catastrophic
    cancellation, LayerNorm over one feature). Then: (1) the framework's float64
    gradient is compared with the same finite differences at float64 tolerance -
    if that fails the bug is not about precision and diagnosis goes on; (2) the
    native gradient must be within JITTER_FACTOR x its measured rounding spread
    (native gradients at a point moved by a few ulps) of the float64 gradient.
    """
    if not _needs_split(ctx) or ctx.forward:
        # forward mode: judged on the table's rounding prior, no split (the
        # float64 side of the split is a reverse-mode gradient)
        return False
    s = ctx.session
    g64 = _Against.taken(ctx, probe.direction, promote=True)
    ana64 = g64.along
    rho64 = tl.gradient_rounding("float64")
    terms64 = {
        "finite_difference": tl.FD_SAFETY * float(est.error),
        "analytical_rounding": tl.ROUNDING_SIGMAS * rho64 * math.sqrt(len(s.specs)),
        "input_rounding": probe.input_rounding(est.step),
    }
    err64, tol64 = abs(float(est.value) - ana64), sum(terms64.values())
    if err64 > tol64:
        report.notes.append(
            f"the framework's float64 gradient misses the finite differences too "
            f"(error {err64:.3e} > {tol64:.3e})" + _NOT_PRECISION
        )
        return False
    if ctx.measured is not None and ctx.measured.factor < 1.0:
        return _measured_split(ctx, g64, report, (err64, tol64, terms64))
    handle, eta = _jitter_handle(ctx)
    # ||gj_t - g_t|| per tensor, the jittered gradient read one tensor at a time
    (jitter,) = s.gradient_reductions(
        [ctx.cot],
        lambda row, t, gjt: _distance(gjt, cpt.narrow(ctx.grads)[t]),
        promote=False,
        handle=handle,
        t=eta,
    )

    def judge(noise: list[float] | None) -> tuple[tuple[int, float, float], float]:
        worst, worst_ratio = (0, 0.0, 0.0), -1.0
        for t, dev in enumerate(g64.devs):
            allowed = JITTER_FACTOR * jitter[t] + (
                tl.ROUNDING_SIGMAS * ctx.rho[t] * ctx.g_eff[t]
            )
            if noise is not None:
                allowed += noise[t]
            ratio = dev / allowed if allowed > 0 else (np.inf if dev > 0 else 0.0)
            if ratio > worst_ratio:
                worst, worst_ratio = (t, dev, allowed), ratio
        return worst, worst_ratio

    (t, dev, allowed), worst_ratio = judge(None)
    measured = f"the spread of {s.specs[t].dtype} gradients at points {JITTER_ULPS:g} ulps away"
    if worst_ratio > 1:
        draws = _rounding_draws(ctx, [ctx.cot])
        if draws is not None:
            (t, dev, allowed), worst_ratio = judge(draws.tensor_norms()[0])
            measured = _NOISE_NOTE
    spec = s.specs[t]
    if worst_ratio <= 1:
        report.status = "passed"
        report.error, report.tolerance, report.tolerance_terms = err64, tol64, terms64
        report.tolerance_reason = (
            "float64 gradient vs finite differences: "
            + _reason(terms64, ctx)
            + f"; the {spec.dtype} gradient is within {JITTER_FACTOR:g}x its measured "
            "rounding spread of the float64 gradient"
        )
        report.notes.append(
            f"the {spec.dtype} gradient differs from float64 by more than typical "
            f"rounding (worst '{spec.name}': {dev:.3e}, allowed {allowed:.3e} from "
            f"{measured}): the function is ill-conditioned in low precision; its "
            "float64 gradient matches finite differences."
        )
        return True
    _native_path_mismatch(
        ctx,
        report,
        g64,
        (t, dev, allowed),
        f"{spec.dtype} rounding",
        f"the float64 gradient matches finite differences but the {spec.dtype} one "
        f"does not match it: a bug on the {spec.dtype} code path only (a kernel or "
        "custom backward that behaves differently in low precision).",
    )
    return True


#: the measured split (see _measured_split): the native gradient may differ from
#: the float64 one by MEASURED_SPLIT_FACTOR x its measured rounding per tensor
MEASURED_SPLIT_FACTOR = 4.0


def _measured_split(
    ctx: _Context,
    g64: _Against,
    report: CheckReport,
    judged64: tuple[float, float, dict[str, float]],
) -> bool:
    """The precision split of a check whose rounding was measured (see _Measured):
    the float64 gradient matched finite differences, so is the native gradient
    within its own measured rounding of it, tensor by tensor?

    The difference g - g64 is rounding plus any bug on the native path only (a
    float32 kernel); it cannot be its own allowance. The allowance per tensor is
    MEASURED_SPLIT_FACTOR x the L2 norm of the native gradient's rounding, measured
    as the mean of gradients at x +- a few ulps (rescaled cotangents) minus g (the
    gradient's change over the move cancels to first order), and never below the
    model-wide relative rounding times the tensor's gradient (a tensor of a few
    elements has too few samples of its own), plus MEASURE_FLOOR_ULPS ulps. A
    tensor over it is judged again on NOISE_DRAWS rounding draws (float32 against
    float64 at the same moved points) before it is a mismatch."""
    t, dev, allowed, measured = _split_judgement(ctx, g64)
    spec = ctx.session.specs[t]
    if dev <= allowed:
        err64, tol64, terms64 = judged64
        report.status = "passed"
        report.error, report.tolerance, report.tolerance_terms = err64, tol64, terms64
        report.tolerance_reason = (
            "float64 gradient vs finite differences: "
            + _reason(terms64, ctx)
            + f"; the {spec.dtype} gradient is within {MEASURED_SPLIT_FACTOR:g}x its "
            "measured rounding of the float64 gradient, tensor by tensor"
        )
        report.notes.append(
            f"the gradient's deviation along the probe direction exceeds its measured "
            f"rounding there, but tensor by tensor it is within its own rounding of "
            f"the float64 gradient (worst '{spec.name}': {dev:.3e}, allowed "
            f"{allowed:.3e} from {measured}), and the float64 gradient matches "
            "finite differences."
        )
        return True
    rel = dev / max(g64.norms[t], 1e-300)
    _native_path_mismatch(
        ctx,
        report,
        g64,
        (t, dev, allowed),
        "its measured rounding",
        f"the float64 gradient matches finite differences but the {spec.dtype} one "
        f"is off by {rel:.1e} (relative, '{spec.name}'), {dev / allowed:.1f}x its "
        f"measured rounding ({measured}): a bug on the {spec.dtype} code path only "
        "(a kernel or custom backward that behaves differently in low precision). "
        "The table's rounding prior would have let it pass.",
    )
    return True


def _split_judgement(ctx: _Context, g64: _Against) -> tuple[int, float, float, str]:
    """The tensor that deviates most from ``g64`` relative to its measured rounding
    (see _measured_split): (index, L2 deviation, allowance, how it was measured).

    The mean of the gradients at x + move and x - move is formed one tensor at a
    time: the first side's gradients are held as they came (float32 where that
    is their exact value), the second side's are read one tensor at a time and
    combined with them. The move is the backend's ulp_moves (drawn where the
    tensors live)."""
    m = ctx.measured
    assert m is not None
    s = ctx.session
    rng = np.random.default_rng([ctx.options.seed, 6])
    handle = s.ulp_moves(
        np.dtype(m.low).name, NOISE_ULPS, int(rng.integers(np.iinfo(np.int64).max))
    )
    # x + move and x - move, each with the cotangent rescaled by its own factor
    scale_a, scale_b = (float(rng.uniform(0.5, 2.0)) for _ in range(2))
    cot_a, cot_b = (
        [(c * scale).astype(m.low).astype(np.float64) for c in ctx.cot]
        for scale in (scale_a, scale_b)
    )
    (held,) = _held_native(s, [cot_a], handle, 1.0)
    grads = cpt.narrow(ctx.grads)

    def noise_of(row: int, t: int, b: np.ndarray) -> float:
        a, held[t] = held[t], None  # dropped once used
        return math.sqrt(
            cpt.piece_sum(
                lambda a, b, g: _sq(0.5 * a / scale_a + 0.5 * b / scale_b - g),
                a,
                b,
                grads[t],
            )
        )

    (noise,) = s.gradient_reductions(
        [cot_b], noise_of, promote=False, handle=handle, t=-1.0
    )
    del handle
    devs = g64.devs

    def judge(per_tensor: list[float]) -> tuple[int, float, float]:
        total = math.sqrt(sum(n * n for n in per_tensor))
        pooled = total / max(math.sqrt(sum(g * g for g in ctx.g_norms)), 1e-300)
        worst, worst_ratio = (0, 0.0, 0.0), -1.0
        for t, dev in enumerate(devs):
            allowed = (
                MEASURED_SPLIT_FACTOR * max(per_tensor[t], pooled * ctx.g_eff[t])
                + MEASURE_FLOOR_ULPS * m.eps * ctx.g_eff[t]
            )
            ratio = dev / allowed if allowed > 0 else (np.inf if dev > 0 else 0.0)
            if ratio > worst_ratio:
                worst, worst_ratio = (t, dev, allowed), ratio
        return worst

    t, dev, allowed = judge(noise)
    measured = "the mean of gradients at points a few ulps either side"
    if dev > allowed:
        draws = _rounding_draws(
            ctx, [ctx.cot], stability=False, low_name=np.dtype(m.low).name
        )
        if draws is not None:
            spread = [
                n / NOISE_SIGMAS * (MEASURED_SPLIT_FACTOR / NOISE_SIGMAS)
                for n in draws.tensor_norms()[0]
            ]
            t, dev, allowed = judge(
                [max(a, b) for a, b in zip(noise, spread, strict=True)]
            )
            measured = _NOISE_NOTE.replace(", plus that gradient's change", "")
    return t, dev, allowed, measured


def _held_native(
    s: Session, cot_sets: Sequence[Sequence[np.ndarray]], handle: object, t: float
) -> list[list[np.ndarray]]:
    """The native gradients at x + t d, per cotangent set and tensor, held for a
    second pass against other gradients (float32 where that is their exact
    value: _exact_narrow)."""
    return s.gradient_reductions(
        cot_sets, lambda row, i, g: _exact_narrow(g), promote=False, handle=handle, t=t
    )


def _exact_narrow(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 where that holds its exact values (a float32 gradient read
    as float64), else ``a`` itself: half the memory for a gradient held a while."""
    if a.dtype != np.float64 or not a.size:
        return a
    narrow = a.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for _, (w, x) in cpt.pieces(narrow, a):
            if not np.array_equal(w, x, equal_nan=True):
                return a
    return narrow


def _sq(v: np.ndarray) -> float:
    return float(np.dot(v, v))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||, piecewise (see numeric.compact.pieces)."""
    return math.sqrt(cpt.piece_sum(lambda x, y: _sq(x - y), a, b))


def _kink(
    probe: _Probe, est: fd.DerivativeEstimate | None
) -> tuple[float, float, float, float] | None:
    ctx = probe.ctx
    if est is None:
        est = probe.estimate(budget=np.inf, refinements=0)
    h = est.step
    fwd, bwd, values = fd.one_sided(probe.phi, h, est.values)
    est.values.update(values)
    scale_s = max(float(values[t][1]) for t in values)
    # noise of the one-sided differences: rounding (8 ulps-weighted terms / 2h) plus
    # their h^2 truncation, estimated by the central differences' disagreement
    noise = 8 * tl.FORWARD_ROUNDING_ULPS * ctx.eps_ref * scale_s / h + 10 * float(
        est.truncation
    )
    noise += probe.input_rounding(h) * 4
    jump = abs(float(fwd) - float(bwd))
    floor = 1e-8 * max(probe.scale, abs(float(est.value)))
    if jump > max(noise, floor, probe.analytic_rounding):
        return float(fwd), float(bwd), jump, noise
    return None


def _mismatches(probe: _Probe) -> bool:
    budget = (
        max(probe.analytic_rounding, probe.ctx.fd_limit(probe.scale)) / tl.FD_SAFETY
    )
    est = probe.estimate(budget, refinements=1)
    err, tol, _ = probe.judge(est)
    return err > tol


# ---------------------------------------------------------------------------------------
# Blame: bisection over tensors, then over the elements of the blamed tensor.
# ---------------------------------------------------------------------------------------
def _restricted(
    ctx: _Context,
    tensor_ids: Sequence[int],
    t_elem: int | None = None,
    lo: int = 0,
    hi: int = 0,
) -> _Probe:
    d = cpt.subset(ctx.full_direction, tensor_ids)
    if t_elem is not None:
        # one element range of one tensor, in the dtype the direction is held in
        # (a compact direction stays compact: no float64 copy of the tensor)
        full = cpt.narrow(ctx.full_direction)[t_elem]
        part = np.zeros(full.size, dtype=full.dtype)
        part[lo:hi] = full.reshape(-1)[lo:hi]
        arrays = cpt.narrow(d)
        arrays[t_elem] = part.reshape(full.shape)
        d = Widened(arrays) if isinstance(d, Widened) else arrays
    return _Probe(ctx, d)


def _locate(
    ctx: _Context, probe: _Probe, bad, kind: str, budget: int | None = None
) -> Location | None:
    s = ctx.session
    start = s.forward_count
    budget = ctx.options.blame_budget if budget is None else budget

    def spent() -> bool:
        return s.forward_count - start >= budget

    tensors = [t for t, dd in enumerate(probe.moved) if dd is not None]
    while len(tensors) > 1 and not spent():
        half = len(tensors) // 2
        a, b = tensors[:half], tensors[half:]
        if bad(_restricted(ctx, a)):
            tensors = a
        elif bad(_restricted(ctx, b)):
            tensors = b
        else:
            break  # each half passes alone: the error is spread; report the set
    if len(tensors) != 1:
        names = ", ".join(s.specs[t].name for t in tensors)
        return Location(
            tensor=names,
            quantity=f"directional derivative ({kind} spread over tensors)",
            numerical=None,
            analytical=probe.analytical,
        )
    t = tensors[0]
    lo, hi = 0, s.specs[t].size
    while hi - lo > 1 and not spent():
        mid = (lo + hi) // 2
        if bad(_restricted(ctx, [], t, lo, mid)):
            hi = mid
        elif bad(_restricted(ctx, [], t, mid, hi)):
            lo = mid
        else:
            break
    spec = s.specs[t]
    if hi - lo == 1:
        index = (
            tuple(int(i) for i in np.unravel_index(lo, spec.shape))
            if spec.shape
            else ()
        )
        p = _restricted(ctx, [], t, lo, hi)
        dk = float(cpt.narrow(ctx.full_direction)[t].reshape(-1)[lo])
        est = p.estimate(
            budget=max(p.analytic_rounding, ctx.fd_limit(p.scale)) / tl.FD_SAFETY,
            refinements=1,
        )
        err, tol, _ = p.judge(est)
        return Location(
            tensor=spec.name,
            index=index,
            numerical=float(est.value) / dk,
            analytical=(
                p.analytical / dk
                if ctx.forward
                else float(cpt.narrow(ctx.grads)[t].reshape(-1)[lo])
            ),
            error=err / abs(dk),
            tolerance=tol / abs(dk),
            quantity=_quantity(ctx),
        )
    p = _restricted(ctx, [], t, lo, hi)
    est = p.estimate(budget=np.inf, refinements=0)
    err, tol, _ = p.judge(est)
    rng = (
        f"elements {lo}..{hi - 1} (flat)"
        if (lo, hi) != (0, spec.size)
        else "the whole tensor"
    )
    return Location(
        tensor=spec.name,
        numerical=float(est.value),
        analytical=p.analytical,
        error=err,
        tolerance=tol,
        quantity=f"directional derivative over {rng}",
    )


def _quantity(ctx: _Context) -> str:
    if all(int(np.prod(sh, dtype=np.int64)) == 1 for sh in ctx.session.output_shapes):
        return "partial derivative"
    return "partial derivative of <v, outputs> (seeded cotangent v)"


# ---------------------------------------------------------------------------------------
# Full mode: every element of the Jacobian.
# ---------------------------------------------------------------------------------------
def _run_full(
    ctx: _Context, raw: Sequence[np.ndarray | None], outputs: list[np.ndarray]
) -> CheckReport:
    s = ctx.session
    n_out = sum(o.size for o in outputs)
    full_jacobian = n_out <= FULL_MAX_OUTPUTS
    # analytical rows: one VJP per output element (or the cotangent projection)
    cot_sets = _cotangent_sets(ctx, outputs, full_jacobian and n_out > 1)
    if ctx.options.ad == "forward":
        analytic = _forward_columns(ctx, full_jacobian and n_out > 1)
    elif len(cot_sets) > 1:
        rows = []
        for i, cot in enumerate(cot_sets):
            with _timed("gradient"):
                g = s.vjp(cot, retain=i < len(cot_sets) - 1)
            s.check_finite_grads(g)
            rows.append(g)
        analytic = _stack(ctx, rows)  # (n_out, n_in)
    else:
        with _timed("gradient"):
            s.vjp(ctx.cot)  # release the retained graph
        analytic = _stack(ctx, [ctx.grads])
    if ctx.options.ad == "both":  # judge forward mode; compare it with reverse after
        reverse = analytic
        analytic = _forward_columns(ctx, full_jacobian and n_out > 1)
    n_in = analytic.shape[1]
    rho = np.concatenate(
        [np.full(sp.size, r) for sp, r in zip(s.specs, ctx.rho, strict=True)]
    )
    x_scale = np.concatenate(
        [np.full(sp.size, xs) for sp, xs in zip(s.specs, ctx.x_scale, strict=True)]
    )
    abs_x = np.concatenate([a.reshape(-1) for a in ctx.abs_x])
    col_of = np.concatenate([np.full(sp.size, t) for t, sp in enumerate(s.specs)])
    numeric = np.zeros_like(analytic)
    fd_err = np.zeros_like(analytic)
    curves: list[StepEstimate] = []
    kinks: list[int] = []
    #: per column: the step used, and a kink's jump with the bar it cleared
    steps = np.zeros(n_in)
    kink_jumps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    jfloor = tl.ROUNDING_FLOOR * float(np.max(np.abs(analytic), initial=0.0))
    tol_an = tl.ROUNDING_SIGMAS * rho[None, :] * (np.abs(analytic) + jfloor)
    if ctx.options.ad == "both":
        ctx.both_full = (reverse, analytic, tol_an, col_of)

    zero = s.prepare([None] * len(s.specs))
    base_outs = _outputs_at(s, zero, 0.0)  # resolves the reference precision first
    f0 = _project(ctx, base_outs, full_jacobian and n_out > 1)
    phi_scale = float(np.max(np.abs(f0[1]), initial=0.0))
    if not math.isfinite(phi_scale):
        phi_scale = 0.0
    offsets = np.cumsum([0] + [sp.size for sp in s.specs])
    for k in range(n_in):
        t = int(col_of[k])
        local = k - int(offsets[t])
        e: list[np.ndarray | None] = [None] * len(s.specs)
        unit = np.zeros(s.specs[t].size)
        unit[local] = 1.0
        e[t] = unit.reshape(s.specs[t].shape)
        handle = s.prepare(e)

        def phi(tt: float, handle=handle) -> fd.Evaluation:
            return _project(
                ctx, _outputs_at(s, handle, tt), full_jacobian and n_out > 1
            )

        frac = ctx.options.step or tl.step_fraction(s.reference_dtype)
        h0 = frac * max(abs_x[k], x_scale[k])
        # nor more than `frac` of phi's scale in phi (see _Probe.step)
        slope = float(np.max(np.abs(analytic[:, k]), initial=0.0))
        if slope > 0 and math.isfinite(slope) and phi_scale > 0:
            h0 = min(h0, frac * phi_scale / slope)
        est = fd.richardson(
            phi,
            h0,
            ctx.eps_ref,
            tol_an[:, k] / tl.FD_SAFETY,
            ulps=tl.FORWARD_ROUNDING_ULPS,
            values={0.0: f0},
        )
        numeric[:, k] = est.value
        steps[k] = est.step
        fd_err[:, k] = est.error + 0.5 * ctx.eps_ref * abs_x[k] / est.step * np.abs(
            analytic[:, k]
        )
        if k == 0:
            curves = [
                StepEstimate(h, float(np.ravel(v)[0]), None) for h, v in est.curve
            ]
        err_k = np.abs(numeric[:, k] - analytic[:, k])
        if np.any(err_k > tl.FD_SAFETY * fd_err[:, k] + tol_an[:, k]):
            fwd, bwd, _ = fd.one_sided(phi, est.step, est.values)
            noise = (
                8 * tl.FORWARD_ROUNDING_ULPS * ctx.eps_ref * np.abs(f0[1]) / est.step
            )
            jump = np.abs(fwd - bwd)
            bar = np.maximum(noise + 10 * est.truncation, tol_an[:, k])
            if np.any(jump > bar):
                lo, hi = np.minimum(fwd, bwd), np.maximum(fwd, bwd)
                an = analytic[:, k]
                if np.all((an >= lo - tol_an[:, k]) & (an <= hi + tol_an[:, k])):
                    kinks.append(k)
                    kink_jumps[k] = (jump, bar)
    if getattr(s, "derived_order", 1) == 2 and s.reference_dtype == "float64":
        kinks = _derived_noise(
            ctx,
            f0,
            full_jacobian and n_out > 1,
            steps,
            fd_err,
            tol_an,
            numeric,
            analytic,
            kinks,
            kink_jumps,
        )

    report = _base_report(
        ctx, "full" if full_jacobian else "full (cotangent projection)", raw
    )
    if ctx.derived_noise_note:
        report.notes.append(ctx.derived_noise_note)
    report.reference_dtype = s.reference_dtype
    tol = tl.FD_SAFETY * fd_err + tol_an
    err = np.abs(numeric - analytic)
    ratio = np.where(
        tol > 0, err / np.maximum(tol, 1e-300), np.where(err > 0, np.inf, 0.0)
    )
    for kk in kinks:
        ratio[:, kk] = np.minimum(ratio[:, kk], 0.0)  # judged separately below
    i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    report.error, report.tolerance = float(err[i, k]), float(tol[i, k])
    report.tolerance_terms = {
        "finite_difference": float(tl.FD_SAFETY * fd_err[i, k]),
        "analytical_rounding": float(tol_an[i, k]),
        "input_rounding": 0.0,
    }
    report.tolerance_reason = (
        f"per element: {tl.FD_SAFETY:g} x estimated finite-difference error (Richardson, "
        f"{s.reference_dtype} reference) + {tl.ROUNDING_SIGMAS:g} x gradient rounding "
        f"({', '.join(sorted({f'{sp.dtype} {r:.0e}' for sp, r in zip(s.specs, ctx.rho, strict=True)}))}) x (|J| + "
        f"{tl.ROUNDING_FLOOR:g} max|J|); worst element shown"
    )
    report.steps = curves
    for t, tr in enumerate(report.tensors):
        cols = col_of == t
        tr.error = float(err[:, cols].max(initial=0.0))
        tr.tolerance = (
            float(
                tol[:, cols][
                    np.unravel_index(np.argmax(ratio[:, cols]), ratio[:, cols].shape)
                ]
            )
            if cols.any()
            else 0.0
        )
        tr.status = "passed" if ratio[:, cols].max(initial=0.0) <= 1 else "mismatch"
    t = int(col_of[k])
    local = int(k - sum(sp.size for sp in s.specs[:t]))
    spec = s.specs[t]
    index = (
        tuple(int(j) for j in np.unravel_index(local, spec.shape)) if spec.shape else ()
    )
    out_name = _output_element(s, i) if full_jacobian and n_out > 1 else None
    quantity = f"Jacobian element d {out_name}" if out_name else _quantity(ctx)
    if ratio[i, k] > 1 or kinks:
        again = _project(ctx, _outputs_at(s, zero, 0.0), full_jacobian and n_out > 1)
        spread = float(np.max(np.abs(again[0] - f0[0])))
        if _gross(spread, float(np.max(f0[1])), ctx.eps_ref):
            report.status = "nondeterministic"
            report.notes.append(
                f"fn gave two different values at the same point (difference "
                f"{spread:.3e}): dropout or another random op in train mode, or "
                "nondeterministic kernels. Put the model in eval mode, fix the RNG "
                "inside fn, or enable deterministic algorithms."
            )
            return report
    if ratio[i, k] > 1 and _needs_split(ctx) and not ctx.forward:
        ratio, i, k, decided = _full_precision_split(
            ctx, report, cot_sets, analytic, numeric, fd_err, tol_an, col_of, ratio
        )
        if decided:
            return report
    if ratio[i, k] > 1:
        report.status = "mismatch"
        report.location = Location(
            spec.name,
            index,
            float(numeric[i, k]),
            float(analytic[i, k]),
            float(err[i, k]),
            float(tol[i, k]),
            quantity,
        )
    elif kinks:
        kk = kinks[0]
        t = int(col_of[kk])
        local = int(kk - sum(sp.size for sp in s.specs[:t]))
        spec = s.specs[t]
        index = (
            tuple(int(j) for j in np.unravel_index(local, spec.shape))
            if spec.shape
            else ()
        )
        report.status = "nondifferentiable"
        report.location = Location(
            spec.name,
            index,
            float(numeric[0, kk]),
            float(analytic[0, kk]),
            quantity="kink",
        )
        report.notes.append(
            f"{len(kinks)} element(s) sit on a kink (one-sided derivatives differ, the "
            "analytical value is a valid subgradient): ReLU at 0, max ties or |x| at 0."
        )
    return report


#: Order 2 (a derived function whose outputs are gradients): evaluations at
#: points DERIVED_NOISE_ULPS ulps away measure their rounding, in DERIVED_NOISE_DRAWS
#: draws; FD_NOISE_SIGMAS x its effect on a central difference joins the
#: finite-difference error (see _derived_noise).
DERIVED_NOISE_DRAWS = 4
DERIVED_NOISE_ULPS = 2
#: columns whose noise is also measured along the column (Moré-Wild)
DERIVED_NOISE_COLUMNS = 8


def _derived_noise(
    ctx: _Context,
    f0: fd.Evaluation,
    jacobian: bool,
    steps: np.ndarray,
    fd_err: np.ndarray,
    tol_an: np.ndarray,
    numeric: np.ndarray,
    analytic: np.ndarray,
    kinks: list[int],
    kink_jumps: dict[int, tuple[np.ndarray, np.ndarray]],
) -> list[int]:
    """Full mode at order 2, where the comparison fails (or sees kinks): the
    derived function's outputs are first-order gradients, whose rounding is a
    backward pass's (O(1) terms cancelling to a small gradient: LayerNorm over one
    or two features, corrcoef of two values, eigh), not the FORWARD_ROUNDING_ULPS
    of the outputs' own size the a-priori bounds assume. It is measured: the
    outputs at DERIVED_NOISE_DRAWS points every element of which moved by up to
    DERIVED_NOISE_ULPS ulps (float64), their RMS deviation sigma per output row,
    and FD_NOISE_SIGMAS x sigma / (sqrt(2) h) joins each column's finite-difference
    error (``fd_err``, in place) and the bar a kink's jump must clear. A wrong
    second derivative is the same at every draw and stays a mismatch. Returns the
    kinks that still clear their bar."""
    s = ctx.session
    tol = tl.FD_SAFETY * fd_err + tol_an
    failing = np.any(np.abs(numeric - analytic) > tol)
    if not failing and not kinks:
        return kinks
    rng = np.random.default_rng([ctx.options.seed, 7])
    devs = []
    for _ in range(DERIVED_NOISE_DRAWS):
        move = [
            rng.integers(-DERIVED_NOISE_ULPS, DERIVED_NOISE_ULPS + 1, size=x.shape)
            * np.spacing(np.abs(x))
            for x in ctx.x
        ]
        outs = _outputs_at(s, s.prepare(move), 1.0)
        devs.append(_project(ctx, outs, jacobian)[0] - f0[0])
    sigma = np.sqrt(np.mean(np.square(np.stack(devs)), axis=0))  # (rows,)
    noise = (
        FD_NOISE_SIGMAS * sigma[:, None] / (math.sqrt(2.0) * np.maximum(steps, 1e-300))
    )
    # a gradient that cancels to (near) zero can be exactly the same a few ulps
    # away and still jump by an ulp of its cancelled terms over the step: along
    # each failing column (at most DERIVED_NOISE_COLUMNS), Moré-Wild's estimate
    # on FD_NOISE_POINTS values one step apart (at a smaller spacing such a
    # function is constant; a smooth one's high differences vanish at this one,
    # and a real jump stays a jump: hinge_embedding_loss keeps its kink)
    bad = np.flatnonzero(np.any(np.abs(numeric - analytic) > tol, axis=0))
    columns = list(dict.fromkeys([*kinks, *bad.tolist()]))[:DERIVED_NOISE_COLUMNS]
    offsets = np.cumsum([0] + [sp.size for sp in s.specs])
    half = FD_NOISE_POINTS // 2
    for k in columns:
        t = int(np.searchsorted(offsets, k, side="right") - 1)
        e: list[np.ndarray | None] = [None] * len(s.specs)
        unit = np.zeros(s.specs[t].size)
        unit[k - int(offsets[t])] = 1.0
        e[t] = unit.reshape(s.specs[t].shape)
        handle = s.prepare(e)
        dt = steps[k]
        table = np.stack(
            [
                _project(ctx, _outputs_at(s, handle, (i - half) * dt), jacobian)[0]
                for i in range(FD_NOISE_POINTS)
            ]
        )
        for row in range(table.shape[1]):
            level = fd.noise_level(table[:, row])
            if level:
                noise[row, k] = max(
                    noise[row, k],
                    FD_NOISE_SIGMAS * level / (math.sqrt(2.0) * steps[k]),
                )
                sigma[row] = max(sigma[row], level)
    fd_err += noise / tl.FD_SAFETY
    kept = [
        k for k in kinks if np.any(kink_jumps[k][0] > kink_jumps[k][1] + noise[:, k])
    ]
    if float(np.max(sigma, initial=0.0)) > 0:
        ctx.derived_noise_note = (
            "order 2: the derived function's outputs (gradients) were evaluated at "
            f"{DERIVED_NOISE_DRAWS} points up to {DERIVED_NOISE_ULPS} ulps away and "
            f"along the failing columns ({FD_NOISE_POINTS} points, Moré-Wild); "
            f"their rounding (up to {float(np.max(sigma)):.2e}) joins the "
            "finite-difference error"
            + (
                f" and explains {len(kinks) - len(kept)} apparent kink(s)"
                if len(kept) < len(kinks)
                else ""
            )
            + "."
        )
    return kept


def _forward_columns(ctx: _Context, jacobian: bool) -> np.ndarray:
    """Forward mode's Jacobian: one JVP per input element, each column every
    output element (``jacobian``) or the projection <v, J e_k>: (n_rows, n_in)."""
    s = ctx.session
    cols = []
    for t, sp in enumerate(s.specs):
        for local in range(sp.size):
            e: list[np.ndarray | None] = [None] * len(s.specs)
            unit = np.zeros(sp.size)
            unit[local] = 1.0
            e[t] = unit.reshape(sp.shape)
            with _timed("gradient"):
                tangents = s.jvp(e)
            _check_finite_tangents(s, tangents, sp.name)
            if jacobian:
                cols.append(np.concatenate([y.reshape(-1) for y in tangents]))
            else:
                cols.append(
                    np.array(
                        [
                            sum(
                                float(np.vdot(v, y))
                                for v, y in zip(ctx.cot, tangents, strict=True)
                            )
                        ]
                    )
                )
    return np.stack(cols, axis=1)


def _compare_modes(ctx: _Context, report: CheckReport) -> None:
    """ad="both", after forward mode passed against finite differences: forward
    and reverse mode compute the same derivatives, so they must agree within
    both sides' rounding (no finite-difference error in between: tighter than
    either check). A disagreement is a mismatch located at the tensor (and, in
    full mode, element) where it is largest."""
    s = ctx.session
    if ctx.both_full is not None:
        reverse, forward, tol_an, col_of = ctx.both_full
        diff = np.abs(forward - reverse)
        tol = 2.0 * tol_an
        ratio = np.where(
            tol > 0, diff / np.maximum(tol, 1e-300), np.where(diff > 0, np.inf, 0.0)
        )
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        t = int(col_of[k])
        local = int(k - sum(sp.size for sp in s.specs[:t]))
        index = (
            tuple(int(j) for j in np.unravel_index(local, s.specs[t].shape))
            if s.specs[t].shape
            else ()
        )
        worst = (
            float(ratio[i, k]),
            t,
            index,
            float(reverse[i, k]),
            float(forward[i, k]),
            float(diff[i, k]),
            float(tol[i, k]),
        )
        what = "Jacobian element"
    elif ctx.both_probe is not None:
        probe = ctx.both_probe
        rounding = [
            2.0 * tl.ROUNDING_SIGMAS * r * u
            for r, u in zip(ctx.rho, probe._unit_rounding, strict=True)
        ]
        diff = np.abs(probe.contrib - probe.reverse_contrib)
        ratios = [
            d / r if r > 0 else (np.inf if d > 0 else 0.0)
            for d, r in zip(diff, rounding, strict=True)
        ]
        t = int(np.argmax(ratios))
        worst = (
            float(ratios[t]),
            t,
            None,
            float(probe.reverse_contrib[t]),
            float(probe.contrib[t]),
            float(diff[t]),
            float(rounding[t]),
        )
        what = "directional derivative <v, J d> along the probe direction"
    else:  # pragma: no cover - every run path sets one
        return
    ratio, t, index, rev, fwd, err, tol = worst
    report.notes.append(
        f"ad='both': forward mode against reverse mode, per {what}: largest "
        f"difference {err:.3e} at '{s.specs[t].name}' (allowed {tol:.3e}, both "
        "sides' rounding)."
    )
    if ratio <= 1:
        return
    report.status = "mismatch"
    report.location = Location(
        tensor=s.specs[t].name,
        index=index,
        numerical=rev,
        analytical=fwd,
        error=err,
        tolerance=tol,
        quantity=f"{what}: forward mode (analytical) against reverse mode (shown "
        "as numerical)",
    )
    report.notes.append(
        "forward and reverse mode disagree although forward mode matches finite "
        "differences: the backward (or the framework's transpose of the forward "
        "rule) is wrong where they differ."
    )


def _cotangent_sets(
    ctx: _Context, outputs: list[np.ndarray], jacobian: bool
) -> list[list[np.ndarray]]:
    """One-hot cotangents for every output element, or the seeded projection."""
    if not jacobian:
        return [ctx.cot]
    sets = []
    for o, out in enumerate(outputs):
        for j in range(out.size):
            cot = [np.zeros(x.shape) for x in outputs]
            cot[o].reshape(-1)[j] = 1.0
            sets.append(cot)
    return sets


def _stack(
    ctx: _Context, grad_lists: Sequence[Sequence[np.ndarray | None]]
) -> np.ndarray:
    """Rows of flattened gradients (None -> zeros): an (n_rows, n_in) Jacobian."""
    specs = ctx.session.specs
    return np.stack(
        [
            np.concatenate(
                [
                    np.zeros(sp.size) if g is None else g.reshape(-1)
                    for sp, g in zip(specs, grads, strict=True)
                ]
            )
            for grads in grad_lists
        ]
    )


def _full_precision_split(
    ctx, report, cot_sets, analytic, numeric, fd_err, tol_an, col_of, ratio
):
    """Full-mode counterpart of _precision_split, elementwise. Returns the updated
    ratio matrix, the worst element and whether the report is decided."""
    s = ctx.session
    j64 = _stack(ctx, s.gradients_at(cot_sets, promote=True))
    rho64 = tl.gradient_rounding("float64")
    floor64 = tl.ROUNDING_FLOOR * float(np.max(np.abs(j64), initial=0.0))
    tol64 = tl.FD_SAFETY * fd_err + tl.ROUNDING_SIGMAS * rho64 * (np.abs(j64) + floor64)
    if np.any(np.abs(numeric - j64) > tol64):
        report.notes.append(
            "the framework's float64 gradient misses the finite differences too: "
            "the error is not about precision."
        )
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        return ratio, i, k, False
    handle, eta = _jitter_handle(ctx)
    jj = _stack(ctx, s.gradients_at(cot_sets, promote=False, handle=handle, t=eta))
    spread = np.abs(jj - analytic)
    allowed = np.zeros_like(analytic)
    for t in range(len(s.specs)):
        cols = col_of == t
        if cols.any():
            allowed[:, cols] = JITTER_FACTOR * spread[:, cols].max(
                axis=1, keepdims=True
            )
    allowed += tol_an
    dev = np.abs(analytic - j64)

    def judge() -> np.ndarray:
        return np.where(
            allowed > 0,
            dev / np.maximum(allowed, 1e-300),
            np.where(dev > 0, np.inf, 0.0),
        )

    ratio = judge()
    if np.max(ratio, initial=0.0) > 1:
        draws = _rounding_draws(ctx, cot_sets, elementwise=True)
        if draws is not None:
            allowed += draws.elements()
            ratio = judge()
            report.notes.append(
                _NOISE_NOTE[0].upper() + _NOISE_NOTE[1:] + " was measured."
            )
    i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    if ratio[i, k] <= 1:
        report.status = "passed"
        report.error, report.tolerance = float(dev[i, k]), float(allowed[i, k])
        report.tolerance_reason += (
            "; low-precision elements judged against the float64 gradient (itself "
            f"verified by finite differences) with {JITTER_FACTOR:g}x their measured "
            "rounding spread"
        )
        report.notes.append(
            "the low-precision gradient differs from float64 by more than typical "
            "rounding, within its measured rounding spread: the function is "
            "ill-conditioned in low precision; its float64 gradient matches finite "
            "differences."
        )
        for tr in report.tensors:
            tr.status = "passed"
        return ratio, i, k, True
    numeric[:, :] = j64  # the reference the failure is shown against
    report.notes.append(
        "the float64 gradient matches finite differences but the low-precision one "
        "does not match it: a bug on the low-precision code path only."
    )
    return ratio, i, k, False


def _project(ctx: _Context, outs: list[np.ndarray], jacobian: bool) -> fd.Evaluation:
    """All output elements (full Jacobian) or the cotangent projection <v, y>."""
    if jacobian:
        y = np.concatenate([o.reshape(-1) for o in outs])
        return y, np.abs(y)
    val = sum(float(np.vdot(v, y)) for v, y in zip(ctx.cot, outs, strict=True))
    sc = sum(float(np.abs(v * y).sum()) for v, y in zip(ctx.cot, outs, strict=True))
    return np.array([val]), np.array([sc])


def _output_element(s: Session, i: int) -> str:
    for name, shape in zip(s.output_names, s.output_shapes, strict=True):
        n = int(np.prod(shape, dtype=np.int64))
        if i < n:
            idx = np.unravel_index(i, shape) if shape else ()
            return f"{name}[{', '.join(map(str, idx))}]" if shape else name
        i -= n
    return "output"
