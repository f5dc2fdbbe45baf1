"""The devices property: the same model, weights and batch give the same gradients
on every device (CPU and GPUs), within the rounding the dtype and kernels allow.

How a model reaches each device, without touching the user's objects:

* torch: every evaluation works on ``copy.deepcopy(model).to(device)`` and on a
  copy of ``batch`` whose tensors (inside dicts, lists, tuples) are moved there;
  ``loss_fn(model_copy, batch_copy)`` must return the scalar loss. The user's
  module, its ``.grad`` and its buffers are never touched.
* TensorFlow / Keras: the user's model itself runs under ``tf.device(device)``.
  TF places every op by that scope and copies its inputs there (variable reads
  included), so one model computes on every device and nothing is cloned -
  ``keras.models.clone_model`` loses subclassed models' code and custom layers'
  state, a deep copy of a Keras model is not supported. Whatever ``loss_fn``
  writes into the model's variables (BatchNorm statistics) is reset after every
  evaluation, and every variable is restored exactly at the end. ``batch`` is
  passed as is: TF copies tensors to the op's device itself.

Both frameworks compute the gradient of every trainable parameter on every device,
in the model's dtype. The first device is the reference (the CPU for
``devices="auto"``); every other device is compared with it elementwise.

Tolerance, per element, for reference gradient ``a`` and device gradient ``b``::

    ROUNDING_SIGMAS * rho * (|a| + |b| + FLOOR * max(|a| + |b|))          (float)
  + ROUNDING_SIGMAS * rho_tf32 * (|b| + rms(b))            (TF32 on b's device)

``rho`` is the dtype's gradient rounding (numeric.tolerance.GRADIENT_ROUNDING),
raised to ``eps * sqrt(K)`` when the run accumulated K terms into one element (the
longest matmul/convolution/reduction seen): two devices sum in different orders,
and a random walk of K roundings grows like sqrt(K). ``rho_tf32`` is
:data:`TF32_KERNEL_ROUNDING` * sqrt(n) for the n float32 kernels that ran in TF32 on
that device (counted during the evaluation); see :func:`tf32_rounding` for the
derivation. The TF32 term scales with the tensor's rms, not only with the element,
because a TF32 error is proportional to the size of the products summed, which a
cancelling sum does not show.

TF32 is never a silent excuse: when a device fails the plain float tolerance while
TF32 ran there, the check evaluates that device once more with TF32 switched off
(and switched back) and compares again. If the TF32-free gradients agree, TF32 is
the cause (a pass with a note when the difference is within the TF32 allowance, a
mismatch naming TF32 when it exceeds it); if they still differ, the difference is
real whatever the TF32 allowance would have forgiven, and the report says TF32 is
not the cause.

Nondeterminism: every device is evaluated twice at the same point. If a device's
two results differ bitwise and the comparison fails, the status is
"nondeterministic", not "mismatch". The cause is then narrowed down: two more
evaluations with the random-number state reset in between tell random numbers
drawn in ``loss_fn`` (dropout, noise) from nondeterministic kernels; for kernels the
framework's determinism switch is turned on for two further evaluations (torch:
deterministic algorithms in warn-only mode, whose warnings name the ops without a
deterministic implementation; TensorFlow: op determinism, whose errors name the op)
and restored; the ops with nondeterministic GPU kernels that ran are listed too.

State: nothing of the user's changes - model, RNG states (torch CPU and CUDA,
NumPy, Python, TF's global generator and Keras' seed generators), grad mode, the
deterministic-algorithms flag and warn-only mode, TF op determinism, TF32
switches - also when the check raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck import devices as dv
from gradcheck.backends import device_driver
from gradcheck.backends.devices_base import Driver, Evaluation, same
from gradcheck.errors import (
    DeviceUnavailableError,
    GradientMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.result import CheckReport, Location, TensorResult

__all__ = [
    "DEFAULT_TF32_KERNELS",
    "PROPERTY",
    "TF32_KERNEL_ROUNDING",
    "TF32_UNIT_ROUNDOFF",
    "Comparison",
    "DeviceRun",
    "assert_devices",
    "check_devices",
    "compare",
    "judge",
    "run",
    "tf32_rounding",
]

PROPERTY = "devices"

#: Elementwise floor as in the linearity check: an element whose gradient is ~0
#: still carries the rounding of the large terms that cancelled into it.
FLOOR = 0.1

#: TF32 keeps 10 explicit mantissa bits: unit roundoff 2^-11.
TF32_UNIT_ROUNDOFF = 2.0**-11

#: Relative rounding one TF32 kernel adds to its result, measured against the rms
#: size of the result (see :func:`tf32_rounding`): 2 * sqrt(2/3) * 2^-11.
TF32_KERNEL_ROUNDING = 2.0 * math.sqrt(2.0 / 3.0) * TF32_UNIT_ROUNDOFF

#: TF32 kernels assumed when they could not be counted (compiled graphs).
DEFAULT_TF32_KERNELS = 16


def tf32_rounding(kernels: int) -> float:
    """Relative rounding of a gradient that went through ``kernels`` TF32 kernels.

    A TF32 matmul or convolution rounds both float32 operands to a 10-bit mantissa
    (unit roundoff u = 2^-11 ~ 4.9e-4) and accumulates in float32. An element of
    the result, sum_k x_k y_k over K terms, becomes sum_k x_k y_k (1 + d_k + e_k)
    with |d|, |e| <= u. Rounded to nearest, d and e are independent with standard
    deviation u / sqrt(3), so the error has standard deviation
    sqrt(2/3) u ||x * y||_2: it grows like sqrt(K), exactly as the size of a
    K-term sum of mixed signs does, so relative to the result's typical (rms) size
    it does not grow with K (a sum of one sign grows like K, its relative error
    shrinks). That is 4.0e-4 per kernel; we double it (8.0e-4) because some
    conversion paths truncate instead of rounding (a bias of up to 2u per
    product). A gradient passes through several such kernels in series (forward
    and backward); independent errors add in quadrature, hence sqrt(kernels),
    with kernels = all TF32 kernel calls counted in one gradient evaluation (an
    upper bound on the longest chain). The 4-sigma elementwise test then allows
    ~3e-3 x sqrt(kernels) of the rms, while a 1e-2 relative error on a typical
    element of a few-kernel model still fails."""
    return TF32_KERNEL_ROUNDING * math.sqrt(kernels) if kernels > 0 else 0.0


def accumulation_rounding(dtype: str, length: int) -> float:
    """eps * sqrt(K): the random-walk rounding of a K-term floating-point sum. Two
    devices accumulate in different orders, so each carries its own."""
    return tl.eps(dtype) * math.sqrt(length) if length > 1 else 0.0


# ====================================================================== the core
@dataclass
class TensorComparison:
    """One tensor: the element that is worst relative to its tolerance."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    index: tuple[int, ...]
    reference: float | None
    other: float | None
    error: float
    tolerance: float
    #: worst error / TF32-aware tolerance, and / plain tolerance (no TF32 term)
    ratio: float
    plain_ratio: float
    other_norm: float
    connected: bool
    #: elements where one device is NaN/Inf and the other is not the same value
    nonfinite: int = 0


@dataclass
class Comparison:
    """Every tensor of one device's gradients against the reference's."""

    tensors: list[TensorComparison]
    #: tolerance terms used (per dtype rho, accumulation length, TF32 roundings)
    terms: dict[str, float]

    @property
    def ratio(self) -> float:
        return max((t.ratio for t in self.tensors), default=0.0)

    @property
    def plain_ratio(self) -> float:
        return max((t.plain_ratio for t in self.tensors), default=0.0)

    @property
    def worst(self) -> TensorComparison | None:
        return max(self.tensors, key=lambda t: t.ratio, default=None)

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    @property
    def plain_passed(self) -> bool:
        return self.plain_ratio <= 1.0


def _as_array(x: Any) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


def _rms(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0


def compare(
    reference: Mapping[str, Any],
    other: Mapping[str, Any],
    *,
    dtypes: Mapping[str, str] | str,
    tf32_kernels: int = 0,
    reference_tf32_kernels: int = 0,
    accumulation: int = 0,
    rtol: float | None = None,
) -> Comparison:
    """Compare two devices' gradients elementwise (pure NumPy; None = the tensor is
    not connected to the loss on that device, compared as zeros).

    ``tf32_kernels`` / ``reference_tf32_kernels``: TF32 kernels that ran on each
    side (0: TF32 not in play there); ``accumulation``: the longest sum either
    side accumulated; ``rtol`` replaces the dtype's gradient rounding."""
    if set(reference) != set(other):
        raise InvalidArgumentError(
            "the two gradient sets name different tensors: "
            f"{sorted(set(reference) ^ set(other))}."
        )
    rho_ta = tf32_rounding(reference_tf32_kernels)
    rho_tb = tf32_rounding(tf32_kernels)
    terms: dict[str, float] = {"accumulation_length": float(accumulation)}
    out: list[TensorComparison] = []
    for name in reference:
        dtype = dtypes if isinstance(dtypes, str) else dtypes[name]
        dtype = tl.canonical_dtype(dtype)
        rho = (
            tl.gradient_rounding(dtype, rtol)
            if rtol is not None
            else max(
                tl.gradient_rounding(dtype), accumulation_rounding(dtype, accumulation)
            )
        )
        terms[f"gradient_rounding[{dtype}]"] = rho
        # TF32 only touches float32 kernels
        ta, tb = (rho_ta, rho_tb) if dtype == "float32" else (0.0, 0.0)
        if ta:
            terms["tf32_rounding[reference]"] = ta
        if tb:
            terms["tf32_rounding"] = tb
        out.append(
            _compare_tensor(name, dtype, reference[name], other[name], rho, ta, tb)
        )
    return Comparison(out, terms)


def _compare_tensor(
    name: str,
    dtype: str,
    ref: Any,
    oth: Any,
    rho: float,
    rho_ta: float,
    rho_tb: float,
) -> TensorComparison:
    a, b = _as_array(ref), _as_array(oth)
    connected = b is not None
    if a is None and b is None:
        return TensorComparison(
            name, (), dtype, (), None, None, 0.0, 0.0, 0.0, 0.0, 0.0, False
        )
    a = np.zeros_like(b) if a is None else a
    b = np.zeros_like(a) if b is None else b
    if a.shape != b.shape:
        raise InvalidArgumentError(
            f"'{name}' has shape {a.shape} on the reference and {b.shape} on the "
            "other device."
        )
    finite = np.isfinite(a) & np.isfinite(b)
    fa, fb = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    magnitude = np.abs(fa) + np.abs(fb)
    scale = float(np.max(magnitude, initial=0.0))
    sigmas = tl.ROUNDING_SIGMAS
    plain = sigmas * rho * (magnitude + FLOOR * scale)
    tf32 = np.zeros_like(plain)
    if rho_ta:
        tf32 = tf32 + sigmas * rho_ta * (np.abs(fa) + _rms(fa))
    if rho_tb:
        tf32 = tf32 + sigmas * rho_tb * (np.abs(fb) + _rms(fb))
    tol = plain + tf32
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    err = np.where(finite, np.abs(fa - fb), np.where(same, 0.0, np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1.0), 0.0)
        ratio = np.where((tol <= 0) & (err > 0), np.inf, ratio)
        plain_ratio = np.where(plain > 0, err / np.where(plain > 0, plain, 1.0), 0.0)
        plain_ratio = np.where((plain <= 0) & (err > 0), np.inf, plain_ratio)
    k = int(np.argmax(ratio)) if ratio.size else 0
    index = tuple(int(i) for i in np.unravel_index(k, a.shape)) if a.shape else ()
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    return TensorComparison(
        name=name,
        shape=tuple(a.shape),
        dtype=dtype,
        index=index,
        reference=float(flat_a[k]) if a.size else None,
        other=float(flat_b[k]) if b.size else None,
        error=float(err.reshape(-1)[k]) if err.size else 0.0,
        tolerance=float(tol.reshape(-1)[k]) if tol.size else 0.0,
        ratio=float(ratio.reshape(-1)[k]) if ratio.size else 0.0,
        plain_ratio=float(np.max(plain_ratio, initial=0.0)),
        other_norm=float(np.linalg.norm(fb)),
        connected=connected,
        nonfinite=int(np.sum(~finite & ~same)),
    )


@dataclass
class DeviceRun:
    """What was measured on one device (the pipeline fills it; tests may too)."""

    device: str
    #: gradients of the first evaluation, by tensor name (None: not connected)
    grads: dict[str, np.ndarray | None]
    loss: float = math.nan
    #: a second evaluation at the same point differed bitwise
    repeat_differs: bool = False
    #: largest |g1 - g2| / max|g1| over the tensors, when repeat_differs
    repeat_change: float = 0.0
    #: gradients evaluated with TF32 switched off (measured only when needed)
    without_tf32: dict[str, np.ndarray | None] | None = None
    #: devices.tf32_state() of this device
    tf32: dict[str, Any] = field(default_factory=dict)
    #: TF32 kernel calls in one evaluation (0: TF32 not in play for this model)
    tf32_kernels: int = 0
    #: the longest sum accumulated into one element (matmul K, reductions)
    accumulation: int = 0
    #: random-number ops the evaluation ran (torch "bernoulli_", TF "Stateless...")
    random_ops: list[str] = field(default_factory=list)
    #: ops with nondeterministic GPU kernels that ran on this device
    candidate_ops: list[str] = field(default_factory=list)
    #: ops the determinism switch names as having no deterministic implementation
    flagged_ops: list[str] = field(default_factory=list)
    #: "random" (runs agree once the RNG state is reset), "kernels" (they don't),
    #: None (not diagnosed)
    cause: str | None = None
    #: with the determinism switch on, two runs agreed (None: not tried)
    deterministic_agrees: bool | None = None
    #: the name of the framework's determinism switch, for the notes
    switch: str = "the framework's determinism switch"


@dataclass
class _Verdict:
    run: DeviceRun
    shown: Comparison
    failed: bool
    status: str
    notes: list[str]
    #: ``shown`` is the comparison measured with TF32 switched off
    measured_without_tf32: bool = False


def judge(
    framework: str,
    runs: Sequence[DeviceRun],
    *,
    dtypes: Mapping[str, str] | str,
    seed: int = 0,
    rtol: float | None = None,
    cost: Mapping[str, float] | None = None,
) -> CheckReport:
    """The report for ``runs`` (the first is the reference). Pure: no framework."""
    if len(runs) < 2:
        raise InvalidArgumentError("judge needs a reference run and at least one more.")
    ref, others = runs[0], list(runs[1:])
    verdicts = [_verdict(ref, run, dtypes, rtol) for run in others]
    failing = [v for v in verdicts if v.failed]
    if failing:
        # a deterministic disagreement outranks noise
        mismatches = [v for v in failing if v.status == "mismatch"]
        pool = mismatches or failing
        worst = max(pool, key=lambda v: v.shown.ratio)
        status = worst.status
    else:
        worst = max(verdicts, key=lambda v: v.shown.ratio)
        status = "passed"
    w = worst.shown.worst
    if isinstance(dtypes, str):
        dtype_set = {tl.canonical_dtype(dtypes)}
    else:
        dtype_set = {tl.canonical_dtype(d) for d in dtypes.values()}
    dtype = (
        next(iter(dtype_set))
        if len(dtype_set) == 1
        else "mixed(" + ",".join(sorted(dtype_set)) + ")"
    )
    tensors = [
        TensorResult(
            name=t.name,
            shape=t.shape,
            dtype=t.dtype,
            device=v.run.device,
            kind="parameter",
            grad_norm=t.other_norm,
            analytical=t.other,
            numerical=t.reference,
            error=t.error,
            tolerance=t.tolerance,
            status="passed" if t.ratio <= 1 else _status(v.run, ref),
            connected=t.connected,
        )
        for v in verdicts
        for t in v.shown.tensors
    ]
    terms: dict[str, float] = {}
    for v in verdicts:
        for key, value in v.shown.terms.items():
            if key.startswith("tf32_rounding"):
                key = f"{key}[{v.run.device}]"
            terms[key] = max(terms.get(key, 0.0), value)
        if v.run.tf32_kernels:
            terms[f"tf32_kernels[{v.run.device}]"] = float(v.run.tf32_kernels)
    if ref.tf32_kernels:
        terms[f"tf32_kernels[{ref.device}]"] = float(ref.tf32_kernels)
    report = CheckReport(
        property=PROPERTY,
        status=status,
        framework=framework,
        device=f"{ref.device} vs {', '.join(r.device for r in others)}",
        dtype=dtype,
        seed=seed,
        mode="analytic",
        error=w.error if w else 0.0,
        tolerance=w.tolerance if w else 0.0,
        tolerance_reason=_reason(ref, others, terms, rtol)
        + (
            "; the error shown was measured with TF32 switched off and is judged "
            "without the TF32 term"
            if worst.measured_without_tf32
            else ""
        ),
        tolerance_terms=terms,
        tensors=tensors,
    )
    if failing and w is not None:
        ops = _ops_for_location(worst.run, ref)
        quantity = (
            f"gradient on {ref.device} (numerical) vs on {worst.run.device} "
            "(analytical)"
        )
        if ops:
            quantity += f" [nondeterministic op: {', '.join(ops)}]"
        report.location = Location(
            tensor=w.name,
            index=w.index,
            numerical=w.reference,
            analytical=w.other,
            error=w.error,
            tolerance=w.tolerance,
            quantity=quantity,
        )
    notes: list[str] = []
    for run in [ref, *others]:
        if run.tf32 and run.tf32.get("gpu"):
            counted = (
                f" ({run.tf32_kernels} TF32 kernel calls per gradient evaluation)"
                if run.tf32_kernels
                else (
                    "; this model ran no float32 matmul/convolution there, so TF32 "
                    "played no part"
                    if run.tf32.get("in_play")
                    else ""
                )
            )
            notes.append(f"{run.device}: {run.tf32.get('reason', '')}{counted}")
    for v in verdicts:
        notes.extend(v.notes)
    for run in [ref, *others]:
        if run.repeat_differs:
            notes.append(_nondeterminism_note(run))
    report.notes = notes
    if cost:
        report.cost = dict(cost)
    return report


def _status(run: DeviceRun, ref: DeviceRun) -> str:
    return (
        "nondeterministic" if run.repeat_differs or ref.repeat_differs else "mismatch"
    )


def _verdict(
    ref: DeviceRun, run: DeviceRun, dtypes: Mapping[str, str] | str, rtol: float | None
) -> _Verdict:
    acc = max(ref.accumulation, run.accumulation)
    c = compare(
        ref.grads,
        run.grads,
        dtypes=dtypes,
        tf32_kernels=run.tf32_kernels,
        reference_tf32_kernels=ref.tf32_kernels,
        accumulation=acc,
        rtol=rtol,
    )
    c0 = None
    if run.without_tf32 is not None or ref.without_tf32 is not None:
        c0 = compare(
            ref.without_tf32 if ref.without_tf32 is not None else ref.grads,
            run.without_tf32 if run.without_tf32 is not None else run.grads,
            dtypes=dtypes,
            accumulation=acc,
            rtol=rtol,
        )
    tf32 = run.tf32_kernels > 0 or ref.tf32_kernels > 0
    pair = f"{run.device} vs {ref.device}"
    notes: list[str] = []
    shown, failed, measured = c, False, False
    dtype_word = _dtype_word(dtypes)
    if c.plain_passed:
        pass
    elif c.passed:  # only the TF32 allowance covers it
        if c0 is not None and not c0.passed:
            shown, failed, measured = c0, True, True
            notes.append(
                f"{pair}: the difference is within the TF32 allowance, but with TF32 "
                f"switched off it remains ({_ratio_text(c0)} the {dtype_word} "
                "tolerance): TF32 is not the cause; the gradients really differ."
            )
        else:
            how = (
                "with TF32 switched off the two agree within "
                f"{dtype_word} rounding (measured)"
                if c0 is not None
                else "no difference beyond TF32's rounding remains"
            )
            notes.append(
                f"{pair}: the gradients differ by {_ratio_text(c, plain=True)} the "
                f"plain {dtype_word} tolerance but lie within the TF32-aware one: "
                f"TF32 explains the difference ({how})."
            )
    else:
        failed = True
        if c0 is not None and c0.passed:
            notes.append(
                f"{pair}: TF32 is the cause: with TF32 switched off the gradients "
                f"agree within {dtype_word} rounding, with it they differ by "
                f"{_ratio_text(c)} the TF32-aware tolerance (ill-conditioned sums: "
                "large terms cancelling). Train with TF32 off if that precision "
                f"matters ({_tf32_off_hint(run)})."
            )
        elif c0 is not None:
            notes.append(
                f"{pair}: with TF32 switched off the gradients still differ "
                f"({_ratio_text(c0)} the {dtype_word} tolerance): TF32 is not the "
                "cause."
            )
        elif tf32:
            notes.append(
                f"{pair}: TF32 was in play and could not be switched off to tell "
                "whether it is the cause."
            )
        elif run.tf32.get("gpu") or ref.tf32.get("gpu"):
            where = run if run.tf32.get("gpu") else ref
            reason = where.tf32.get("reason", "TF32 was not in play")
            notes.append(
                f"{pair}: TF32 is not the cause ({reason.rstrip('.')}; no TF32 "
                "kernel ran)."
            )
        bad = [t for t in shown.tensors if t.nonfinite]
        if bad:
            notes.append(
                f"{run.device} produced NaN/Inf where {ref.device} did not, in "
                + ", ".join(f"'{t.name}' ({t.nonfinite} elements)" for t in bad)
                + "."
            )
    status = _status(run, ref) if failed else "passed"
    return _Verdict(run, shown, failed, status, notes, measured)


def _num(x: float | None) -> str:
    return "None" if x is None else f"{x:.9e}"


def _ratio_text(c: Comparison, plain: bool = False) -> str:
    r = c.plain_ratio if plain else c.ratio
    return f"{r:.3g}x" if math.isfinite(r) else "infinitely more than"


def _dtype_word(dtypes: Mapping[str, str] | str) -> str:
    names = {dtypes} if isinstance(dtypes, str) else set(dtypes.values())
    names = {tl.canonical_dtype(n) for n in names}
    return next(iter(names)) if len(names) == 1 else "floating-point"


def _tf32_off_hint(run: DeviceRun) -> str:
    if run.tf32.get("framework") == "tensorflow":
        return "tf.config.experimental.enable_tensor_float_32_execution(False)"
    return (
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'; "
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'"
    )


def _reason(
    ref: DeviceRun,
    others: Sequence[DeviceRun],
    terms: Mapping[str, float],
    rtol: float | None,
) -> str:
    rhos = ", ".join(
        f"{k[len('gradient_rounding[') : -1]} {v:.1e}"
        for k, v in sorted(terms.items())
        if k.startswith("gradient_rounding[")
    )
    acc = int(terms.get("accumulation_length", 0))
    if rtol is not None:
        source = "rtol"
    elif acc > 1:
        source = f"max(gradient rounding, eps*sqrt(K)), K = {acc} longest accumulation"
    else:
        source = "gradient rounding"
    text = (
        f"per element: {tl.ROUNDING_SIGMAS:g} x rounding ({rhos}; {source}) x "
        f"(|g_{ref.device}| + |g_other| + {FLOOR:g} x the tensor's largest)"
    )
    tf32 = [r for r in [ref, *others] if r.tf32_kernels]
    if tf32:
        text += " + TF32 accounted for: " + "; ".join(
            f"{tl.ROUNDING_SIGMAS:g} x {tf32_rounding(r.tf32_kernels):.1e} "
            f"(= {TF32_KERNEL_ROUNDING:.1e} x sqrt({r.tf32_kernels} TF32 kernels)) x "
            f"(|g_{r.device}| + rms(g_{r.device}))"
            for r in tf32
        )
    return text


def _ops_for_location(run: DeviceRun, ref: DeviceRun) -> list[str]:
    for r in (run, ref):
        if not r.repeat_differs:
            continue
        if r.flagged_ops:
            return r.flagged_ops
        if r.cause == "random" and r.random_ops:
            return r.random_ops
        if r.deterministic_agrees and r.candidate_ops:
            return r.candidate_ops
        if r.random_ops:
            return r.random_ops
    return []


def _nondeterminism_note(run: DeviceRun) -> str:
    head = (
        f"{run.device} is nondeterministic: two evaluations at the same point gave "
        f"different results (largest relative change {run.repeat_change:.1e})"
    )
    if run.cause == "random":
        ops = ", ".join(run.random_ops) if run.random_ops else "no op the log saw"
        return (
            f"{head}; with the random-number state reset they agree: loss_fn draws "
            f"random numbers ({ops}) - dropout or noise in training mode. Evaluate "
            "in eval mode (model.eval() / training=False) or draw from a fixed "
            "generator to compare devices."
        )
    if run.cause != "kernels":
        return head + "."
    text = f"{head}; they differ even with the random-number state reset."
    if run.flagged_ops:
        text += (
            f" {run.switch} names {', '.join(run.flagged_ops)} as having no "
            "deterministic implementation."
        )
    if run.deterministic_agrees:
        swapped = (
            f" ({', '.join(run.candidate_ops)} ran here)" if run.candidate_ops else ""
        )
        text += (
            f" With {run.switch} on, the runs agree: the nondeterminism comes from "
            f"kernels it replaces with deterministic ones{swapped}; turn it on to "
            "compare devices."
        )
    elif run.deterministic_agrees is False:
        text += (
            f" They still differ with {run.switch} on"
            + (
                f" (nondeterministic-kernel ops that ran: {', '.join(run.candidate_ops)})"
                if run.candidate_ops
                else ""
            )
            + ": look for state that changes between calls (a counter, a clock, a "
            "Python-side random source) or an op the framework does not flag."
        )
    elif run.candidate_ops:
        text += (
            " Ops with nondeterministic GPU kernels that ran: "
            + ", ".join(run.candidate_ops)
            + "."
        )
    if run.random_ops and not run.deterministic_agrees:
        text += (
            f" Random ops ran ({', '.join(run.random_ops)}); ops seeded from a "
            "global seed draw anew on every call (their op seed advances and cannot "
            "be reset), so they may be the cause: pass an explicit seed or a "
            "generator."
        )
    return text


# ====================================================================== front doors
def check_devices(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    devices: str | Sequence[str] = "auto",
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
) -> CheckReport:
    """Check that ``model``'s gradients agree across devices.

    ``loss_fn(model, batch)`` returns the scalar loss; it must use the model and
    batch it is given (gradcheck hands it a copy on each device for torch). Every
    trainable parameter's gradient is computed on each device of ``devices``
    (see :func:`gradcheck.devices.resolve`; "auto" = the CPU and every GPU, the
    first is the reference) and compared elementwise. ``seed`` seeds torch's CPU
    and GPU generators before the first evaluation on each device (restored
    afterwards); ``rtol`` replaces the dtype's gradient rounding. Returns a report
    with property ``"devices"``; see the module docstring for TF32 and
    nondeterminism."""
    from gradcheck import api

    report = run(
        loss_fn, model, batch, devices=devices, seed=api._seed(seed), rtol=rtol
    )
    return api._publish(report, label)


def assert_devices(
    loss_fn: Callable[[Any, Any], Any], model: Any, batch: Any, **kwargs: Any
) -> CheckReport:
    """Like :func:`check_devices`; raises :class:`GradientMismatchError` on failure."""
    report = check_devices(loss_fn, model, batch, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report


def run(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    batch: Any,
    *,
    devices: str | Sequence[str] = "auto",
    seed: int = 0,
    rtol: float | None = None,
) -> CheckReport:
    """The engine behind :func:`check_devices` (no seed resolution, no listeners)."""
    started = time.perf_counter()
    if not callable(loss_fn):
        raise UnsupportedInputError(
            f"loss_fn must be callable as loss_fn(model, batch); got "
            f"{type(loss_fn).__name__}."
        )
    if rtol is not None:
        tl.gradient_rounding("float64", rtol)  # validates
    driver = _driver(loss_fn, model, batch)
    try:
        names = dv.resolve(driver.framework, devices)
        if len(names) < 2:
            raise DeviceUnavailableError(
                f"devices={devices!r} gives only {names}: comparing devices needs "
                "at least two. "
                + (
                    dv._no_gpu_message(driver.framework, str(devices))
                    if devices == "auto"
                    else "Name two or more, e.g. ('cpu', 'cuda:0')."
                )
            )
        runs = [_measure(driver, name, seed) for name in names]
        _validate_reference(runs[0])
        _resolve_tf32(driver, runs, rtol)
        for r in runs:
            if r.repeat_differs:
                _diagnose(driver, r)
        cost = {
            "forward": driver.evaluations,
            "backward": driver.evaluations,
            "seconds": time.perf_counter() - started,
        }
        return judge(
            driver.framework,
            runs,
            dtypes=driver.dtypes,
            seed=seed,
            rtol=rtol,
            cost=cost,
        )
    finally:
        driver.restore()


def _change(a: Evaluation, b: Evaluation) -> float:
    worst = 0.0 if a.loss == b.loss else abs(a.loss - b.loss) / max(abs(a.loss), 1e-300)
    for name, ga in a.grads.items():
        gb = b.grads[name]
        if ga is None or gb is None or ga.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            scale = float(np.max(np.abs(ga)))
            diff = float(np.max(np.abs(ga - gb)))
        if scale > 0 and math.isfinite(diff):
            worst = max(worst, diff / scale)
    return worst


def _measure(driver: Driver, device: str, seed: int) -> DeviceRun:
    driver.seed(device, seed)
    first = driver.evaluate(device)
    second = driver.evaluate(device)
    state = driver.tf32_state(device)
    differs = not same(first, second)
    return DeviceRun(
        device=device,
        grads=first.grads,
        loss=first.loss,
        repeat_differs=differs,
        repeat_change=_change(first, second) if differs else 0.0,
        tf32=state,
        tf32_kernels=first.log.tf32_kernels(state, DEFAULT_TF32_KERNELS),
        accumulation=max(first.log.accumulation, second.log.accumulation),
        random_ops=sorted(first.log.random | second.log.random),
        candidate_ops=sorted(first.log.candidates | second.log.candidates)
        if dv.is_gpu(device)
        else [],
        switch=driver.switch,
    )


def _validate_reference(ref: DeviceRun) -> None:
    if not math.isfinite(ref.loss):
        raise NonFiniteError(
            f"loss_fn returned {ref.loss} on the reference device {ref.device}. A loss "
            "must be finite to have a gradient: look for log(0), 0/0 or overflow."
        )
    if all(g is None for g in ref.grads.values()):
        raise UnsupportedInputError(
            "no parameter of the model reaches the loss: loss_fn(model, batch) must "
            "compute the loss with the model it is passed (gradcheck passes a copy "
            "on each device), not one it captured, and must not detach it."
        )
    for name, g in ref.grads.items():
        if g is not None and not np.isfinite(g).all():
            raise NonFiniteError(
                f"the gradient of '{name}' on the reference device {ref.device} has "
                f"{int((~np.isfinite(g)).sum())} NaN/Inf elements of {g.size} while "
                "the loss is finite: the backward pass overflows or divides by zero."
            )


def _resolve_tf32(driver: Driver, runs: list[DeviceRun], rtol: float | None) -> None:
    """Measure without TF32 every device pair whose difference exceeds the plain
    tolerance while TF32 ran on either side (once per device)."""
    ref = runs[0]
    for r in runs[1:]:
        if not (r.tf32_kernels or ref.tf32_kernels):
            continue
        c = compare(
            ref.grads,
            r.grads,
            dtypes=driver.dtypes,
            accumulation=max(ref.accumulation, r.accumulation),
            rtol=rtol,
        )
        if c.plain_passed:
            continue
        for side in (ref, r):
            if side.tf32_kernels and side.without_tf32 is None:
                with driver.tf32_off():
                    side.without_tf32 = driver.evaluate(side.device).grads


def _diagnose(driver: Driver, r: DeviceRun) -> None:
    """Random numbers or kernels? Then which kernels (see the module docstring)."""
    snapshot = driver.rng_snapshot(r.device)
    driver.rng_reset(snapshot)
    a = driver.evaluate(r.device)
    driver.rng_reset(snapshot)
    b = driver.evaluate(r.device)
    if same(a, b):
        r.cause = "random"
        return
    r.cause = "kernels"
    flagged, agrees = driver.probe(r.device, snapshot)
    r.flagged_ops = flagged
    r.deterministic_agrees = agrees


# ====================================================================== op logs


def _driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> Driver:
    return device_driver(loss_fn, model, batch)


def __getattr__(name: str) -> Any:
    # the PyTorch TF32 switch, importable from here as before the move
    if name == "_torch_tf32_off":
        from gradcheck.backends.torch_devices import tf32_off_switches

        return tf32_off_switches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
