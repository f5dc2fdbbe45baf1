"""The linearity property: grad(total) = sum_i w_i * grad(loss_i), tensor by tensor.

``total_fn`` is the combined loss as the user's (or the framework's) code computes
it; each ``loss_fns[name]`` is one head's loss computed on its own. Both sides are
the framework's own gradients in the user's precision, so the tolerance is the
rounding of that precision only (GRADIENT_ROUNDING[dtype] on the magnitudes
involved), elementwise.

Besides the verdict the check returns the gradient-flow matrix (which loss reaches
which tensor, and how strongly) and, where the identity fails, the *effective
weight* each loss has inside the failing tensor: a least-squares fit of grad(total)
on the per-loss gradients. That turns "mismatch" into "in 'trunk.0.weight' the total
carries 'aux' with weight 0 instead of 0.3" (a detached branch) or "with weight 0.09
instead of 0.3" (a weight applied twice).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradcheck.backends.base import Session, TensorSpec
from gradcheck.errors import (
    GradcheckError,
    InvalidArgumentError,
    NonFiniteError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.result import CheckReport, FlowMatrix, Location, TensorResult

#: Elementwise tolerance floor, as a fraction of the largest magnitude in the tensor:
#: elements whose true gradient is ~0 still carry rounding from their large terms.
FLOOR = 0.1


def validate(loss_fns: Any, weights: Any) -> tuple[list[str], dict[str, float]]:
    if not isinstance(loss_fns, Mapping) or not loss_fns:
        raise InvalidArgumentError(
            "loss_fns must be a non-empty dict {head name: callable returning that "
            f"head's loss}}; got {type(loss_fns).__name__}."
        )
    if not isinstance(weights, Mapping):
        raise InvalidArgumentError(
            f"weights must be a dict {{head name: float}}; got {type(weights).__name__}. "
            "(Lists are ambiguous: Keras matches list weights to outputs in sorted "
            "key order.)"
        )
    missing = [k for k in loss_fns if k not in weights]
    extra = [k for k in weights if k not in loss_fns]
    if missing or extra:
        raise InvalidArgumentError(
            "loss_fns and weights must name the same heads: "
            + (f"no weight for {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"weights for unknown heads {extra}" if extra else "")
            + "."
        )
    out: dict[str, float] = {}
    for k in loss_fns:
        if not callable(loss_fns[k]):
            raise InvalidArgumentError(f"loss_fns[{k!r}] is not callable.")
        try:
            w = float(weights[k])
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"weights[{k!r}] = {weights[k]!r} is not a number."
            ) from None
        if not math.isfinite(w):
            raise InvalidArgumentError(f"weights[{k!r}] = {w} is not finite.")
        out[str(k)] = w
    return [str(k) for k in loss_fns], out


def run(
    session: Session,
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
    *,
    seed: int,
    rtol: float | None = None,
) -> CheckReport:
    started = time.perf_counter()
    names, w = validate(loss_fns, weights)
    if not callable(total_fn):
        raise UnsupportedInputError(
            f"total_fn must be callable; got {type(total_fn).__name__}."
        )
    total_val, g_total = session.value_and_grads(total_fn, "total_fn")
    _finite(session, "total_fn", total_val, g_total)
    vals, grads = {}, {}
    for name in names:
        vals[name], grads[name] = session.value_and_grads(
            loss_fns[name], f"loss_fns[{name!r}]"
        )
        _finite(session, f"loss '{name}'", vals[name], grads[name])
    require_connected(session, g_total, grads)
    report = judge_session(
        session, total_fn, loss_fns, w, (total_val, g_total), (vals, grads), seed, rtol
    )
    if not report.passed:
        check_nondeterminism(session, total_fn, total_val, g_total, report)
    return session.finish(report, started)


def require_connected(
    session: Session,
    g_total: Sequence[np.ndarray | None],
    grads: Mapping[str, Sequence[np.ndarray | None]],
) -> None:
    """Neither the total nor any loss reaches a differentiated tensor: nothing
    can be compared, and a pass would say nothing. A clear error instead."""
    if any(g is not None for g in g_total) or any(
        g is not None for gs in grads.values() for g in gs
    ):
        return
    raise GradcheckError(
        "neither total_fn nor any loss depends on a differentiated tensor (the "
        "framework reports no path from "
        + ", ".join(f"'{s.name}'" for s in session.specs[:5])
        + "): nothing to compare. Are the losses computed under no_grad / "
        "stop_gradient, or from copies of the parameters you passed?"
    )


def check_nondeterminism(
    session: Session,
    total_fn: Callable[..., Any],
    total_val: float,
    g_total: Sequence[np.ndarray | None],
    report: CheckReport,
) -> None:
    """A failed comparison whose total differs when evaluated again at the same
    point is nondeterministic (dropout in train mode), not a mismatch."""
    again, g_again = session.value_and_grads(total_fn, "total_fn")
    if again != total_val or any(
        (a is None) != (b is None) or (a is not None and not np.array_equal(a, b))
        for a, b in zip(g_total, g_again, strict=True)
    ):
        report.status = "nondeterministic"
        report.notes.insert(
            0,
            (
                f"total_fn gave different results at the same point ({total_val:.9e} "
                f"then {again:.9e}): dropout or another random op in train mode. Use "
                "eval mode or fix the RNG inside the loss functions."
            ),
        )


def judge_session(
    session: Session,
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    w: Mapping[str, float],
    total: tuple[float, list[np.ndarray | None]],
    per_loss: tuple[dict[str, float], dict[str, list[np.ndarray | None]]],
    seed: int,
    rtol: float | None,
    property: str = "linearity",
) -> CheckReport:
    """:func:`judge` on a session's gradients; a gradient comparison that fails is
    judged again with the backward passes' measured rounding (:func:`rounding_noise`)
    before it is reported (a wrong value is not rounding: no second look)."""
    args = (session.specs, w, total[0], total[1], per_loss[0], per_loss[1])
    kw = dict(framework=session.framework, seed=seed, rtol=rtol, property=property)
    report = judge(*args, **kw)
    if not report.passed and report.location and report.location.tensor != "total":
        noise = rounding_noise(session, total_fn, loss_fns, w)
        report = judge(*args, **kw, noise=noise)
        report.tolerance_reason += f"; + {tl.ROUNDING_SIGMAS:g} x {NOISE_TOLERANCE}"
    return report


def judge(
    specs: Sequence[TensorSpec],
    weights: Mapping[str, float],
    total_value: float | None,
    g_total: Sequence[np.ndarray | None],
    values: Mapping[str, float],
    grads: Mapping[str, Sequence[np.ndarray | None]],
    *,
    framework: str,
    seed: int,
    rtol: float | None = None,
    property: str = "linearity",
    total_label: str = "the total",
    floor_scale: float | Sequence[float] | None = None,
    noise: Sequence[Any] | None = None,
) -> CheckReport:
    """Compare a total's gradient with sum_i w_i * grad(L_i), tensor by tensor.

    Session-free, so every property that obtains the two sides some other way (a
    training step's ``.grad``, Keras' own train step) shares one verdict, one
    tolerance and one flow matrix. ``None`` gradients mean "does not reach";
    ``total_value=None`` skips the comparison of loss values. ``floor_scale``: a
    gradient magnitude (one for all tensors, or one per tensor) that a tensor's
    rounding floor is at least FLOOR x, for gradients that are ~0 by cancellation
    of larger terms elsewhere (a bias before BatchNorm). ``noise``: per tensor,
    the measured rounding of the backward passes (:func:`rounding_noise`), added
    to the tolerance."""
    names = list(weights)
    w = dict(weights)
    total_val, vals = total_value, values
    if floor_scale is None:
        floor_scale = reaching_floors(w, grads, g_total)
    rho = [tl.gradient_rounding(s.dtype, rtol) for s in specs]
    zeros = [np.zeros(s.shape) for s in specs]
    gt = [z if g is None else g for z, g in zip(zeros, g_total, strict=True)]
    gi = {
        n: [z if g is None else g for z, g in zip(zeros, grads[n], strict=True)]
        for n in names
    }
    tensors, worst = [], (-1.0, None)
    flow_norms, flow_reach, effective = [], [], []
    for t, spec in enumerate(specs):
        expected = sum((w[n] * gi[n][t] for n in names), start=np.zeros(spec.shape))
        magnitude = sum((np.abs(w[n] * gi[n][t]) for n in names), start=np.abs(gt[t]))
        floor = floor_scale[t] if isinstance(floor_scale, Sequence) else floor_scale
        scale = max(float(np.max(magnitude, initial=0.0)), floor or 0.0)
        tol = tl.ROUNDING_SIGMAS * rho[t] * (magnitude + FLOOR * scale)
        if noise is not None:  # measured rounding of the backward passes
            tol = tol + tl.ROUNDING_SIGMAS * noise[t]
        err = np.abs(gt[t] - expected)
        ratio = np.where(
            tol > 0, err / np.maximum(tol, 1e-300), np.where(err > 0, np.inf, 0.0)
        )
        k = int(np.argmax(ratio)) if ratio.size else 0
        r = float(ratio.reshape(-1)[k]) if ratio.size else 0.0
        tr = TensorResult(
            name=spec.name,
            shape=spec.shape,
            dtype=spec.dtype,
            device=spec.device,
            kind=spec.kind,
            grad_norm=float(np.linalg.norm(gt[t])),
            analytical=float(gt[t].reshape(-1)[k]) if ratio.size else None,
            numerical=float(expected.reshape(-1)[k]) if ratio.size else None,
            error=float(err.reshape(-1)[k]) if ratio.size else 0.0,
            tolerance=float(tol.reshape(-1)[k]) if ratio.size else 0.0,
            status="passed" if r <= 1 else "mismatch",
            connected=g_total[t] is not None,
        )
        tensors.append(tr)
        if r > worst[0]:
            worst = (r, (t, k))
        flow_norms.append([float(np.linalg.norm(w[n] * gi[n][t])) for n in names])
        flow_reach.append(
            [grads[n][t] is not None and bool(np.any(gi[n][t] != 0)) for n in names]
        )
        effective.append(_effective_weights(gt[t], [gi[n][t] for n in names]))

    flow = FlowMatrix(
        tensors=[s.name for s in specs],
        losses=names,
        weights=[w[n] for n in names],
        norms=flow_norms,
        reaches=flow_reach,
        total_norms=[float(np.linalg.norm(g)) for g in gt],
        effective_weights=effective,
    )
    ratio_max, (t, k) = worst
    spec = specs[t]
    tr = tensors[t]
    report = CheckReport(
        property=property,
        status="passed" if ratio_max <= 1 else "mismatch",
        framework=framework,
        device=_joined(s.device for s in specs),
        dtype=_dtype(specs),
        seed=seed,
        mode="analytic",
        error=tr.error or 0.0,
        tolerance=tr.tolerance or 0.0,
        tolerance_reason=(
            f"per element: {tl.ROUNDING_SIGMAS:g} x gradient rounding ("
            + ", ".join(
                sorted({f"{s.dtype} {r:.0e}" for s, r in zip(specs, rho, strict=True)})
            )
            + f") x (|grad total| + sum_i |w_i grad L_i| + {FLOOR:g} x the largest "
            "gradient element of the losses reaching the tensor)"
        ),
        tensors=tensors,
        flow=flow,
    )
    value_sum = sum(w[n] * vals[n] for n in names)
    value_tol = (
        tl.ROUNDING_SIGMAS
        * max(rho, default=0.0)
        * (abs(total_val or 0.0) + sum(abs(w[n] * vals[n]) for n in names))
    )
    value_off = total_val is not None and abs(total_val - value_sum) > value_tol
    if value_off:
        assert total_val is not None
        head, why = _value_culprit(names, w, vals, total_val, value_sum, value_tol)
        report.notes.append(
            f"{total_label}'s value {total_val:.6e} differs from sum_i w_i * loss_i = "
            f"{value_sum:.6e} (by {abs(total_val - value_sum):.3e}): {why}"
        )
        if report.passed:
            # the gradients agree at this point (a head whose gradient is 0 here: a
            # dead ReLU, saturated sigmoid) but total != sum_i w_i L_i as functions:
            # the claim fails, and elsewhere the gradients would differ too
            report.status = "mismatch"
            report.error = abs(total_val - value_sum)
            report.tolerance = value_tol
            report.tolerance_reason = (
                f"loss values: {tl.ROUNDING_SIGMAS:g} x rounding "
                f"({max(rho, default=0.0):.0e}) x (|total| + sum_i |w_i L_i|); "
                + report.tolerance_reason.replace(
                    "per element", "gradients, per element"
                )
            )
            report.location = Location(
                tensor="total",
                index=None,
                numerical=value_sum,
                analytical=total_val,
                error=abs(total_val - value_sum),
                tolerance=value_tol,
                head=head,
                quantity="loss value (numerical = sum_i w_i L_i, analytical = total)",
            )
            report.notes.append(
                "the gradients agree at this point, so the value is what shows it: "
                "a head whose gradient vanishes here (dead ReLU, saturated output) "
                "can still be missing from the total."
            )
            return report
    if not report.passed:
        index = (
            tuple(int(i) for i in np.unravel_index(k, spec.shape)) if spec.shape else ()
        )
        culprit = _culprit(names, w, effective[t], flow_reach[t])
        report.location = Location(
            tensor=spec.name,
            index=index,
            numerical=tr.numerical,
            analytical=tr.analytical,
            error=tr.error,
            tolerance=tr.tolerance,
            head=culprit,
            quantity="gradient (numerical = sum_i w_i dL_i, analytical = d total)",
        )
        report.notes.append(
            _explain(spec.name, names, w, effective[t], flow_reach[t], total_label)
        )
    return report


def _joined(devices: Any) -> str:
    d = sorted(set(devices))
    return ",".join(d) if d else "cpu"


def _dtype(specs: Sequence[TensorSpec]) -> str:
    dtypes = sorted({s.dtype for s in specs})
    return dtypes[0] if len(dtypes) == 1 else "mixed(" + ",".join(dtypes) + ")"


def _finite(
    session: Session, what: str, value: float, grads: list[np.ndarray | None]
) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(
            f"{what} is {value} at the point to check. A loss must be finite to have a "
            "gradient: look for log(0), 0/0 or overflow in it."
        )
    session.check_finite_grads(grads, what=f"gradient of {what}")


#: loss scales whose backward passes re-round every intermediate (not powers of 2,
#: which would scale exactly)
NOISE_SCALES = (0.6, 0.7, 0.9, 1.1, 1.3, 1.45)
NOISE_TOLERANCE = (
    "the measured rounding of the backward passes (each gradient taken again for "
    f"the loss scaled by {', '.join(map(str, NOISE_SCALES))}: exactly linear, "
    "rounded differently; the largest spread in each tensor)"
)


def rounding_noise(
    session: Session,
    total_fn: Callable[..., Any],
    loss_fns: Mapping[str, Callable[..., Any]],
    weights: Mapping[str, float],
) -> list[Any]:
    """Per tensor, the largest element of: how much the gradients of the total and of each
    weighted loss move when the loss is scaled by a non-power-of-two factor c and
    the gradient divided by c again. Exactly, nothing moves (a gradient is linear
    in the loss); in floating point every intermediate cotangent re-rounds, so the
    spread is the backward's own rounding, at the scale of the cotangents that
    cancel inside it. Found by benchmarks/false_alarms.py: an L1 penalty on a
    softmax (constant: its gradient is 0 up to rounding of the order of its
    0.008/N cotangent, ~1e-10 in float32) next to a loss weighted 1e-6, whose
    gradient sets the tolerance at ~1e-11. Used only to re-judge a failing
    comparison: a systematic error (a detached head, a doubled weight) moves
    identically at every scale and adds nothing."""
    fns = {"total_fn": (total_fn, 1.0)}
    fns.update({f"loss_fns[{n!r}]": (loss_fns[n], abs(weights[n])) for n in weights})
    noise: list[Any] = [0.0 for _ in session.specs]
    for label, (fn, weight) in fns.items():
        if weight == 0:
            continue
        _, base = session.value_and_grads(fn, label)
        spread = [np.zeros(sp.shape) for sp in session.specs]
        for c in NOISE_SCALES:
            _, g = session.value_and_grads(lambda *a, fn=fn, c=c: fn(*a) * c, label)
            for t, (g0, gc) in enumerate(zip(base, g, strict=True)):
                if g0 is not None and gc is not None:
                    spread[t] = np.maximum(spread[t], np.abs(gc / c - g0))
        for t in range(len(noise)):
            # the tensor's largest: a draw's rounding lands on any element (an
            # element whose draws happen to round alike is no quieter)
            noise[t] = noise[t] + weight * float(np.max(spread[t], initial=0.0))
    return noise


def reaching_floors(
    weights: Mapping[str, float],
    grads: Mapping[str, Sequence[np.ndarray | None]],
    g_total: Sequence[np.ndarray | None],
) -> list[float]:
    """Per tensor: the largest |w_i grad L_i| element, anywhere in the model, of the
    losses that reach the tensor (and the total's own largest element there): the
    scale of the tensor's rounding floor (``judge``'s ``floor_scale``).

    A gradient that is ~0 by cancellation carries the rounding of the terms that
    cancel, which are as large as those losses' gradients elsewhere: a bias feeding
    BatchNorm (exactly 0 in exact arithmetic; measured 8e-8 next to kernels of
    order 1, a false alarm at 5e4 x a tolerance taken from the tensor alone), an L1
    activity penalty on a softmax (its sum is always 1, its gradient ~1e-9 of
    rounding; found by benchmarks/false_alarms.py in float32 at 9 x the old
    tolerance). Only the losses connected to the tensor count, so a head with a tiny
    weight keeps a floor of its own size and a detached tiny head is still seen on
    its own layers."""
    largest = {
        n: max(
            (
                float(np.max(np.abs(weights[n] * g), initial=0.0))
                for g in grads[n]
                if g is not None
            ),
            default=0.0,
        )
        for n in weights
    }
    floors = []
    for t, g in enumerate(g_total):
        own = float(np.max(np.abs(g), initial=0.0)) if g is not None else 0.0
        # connected, even where this point's gradient happens to be exactly 0
        # (the softmax penalty's rounding is 0 on one evaluation, 1e-10 on another)
        reaching = [largest[n] for n in weights if grads[n][t] is not None]
        floors.append(max([own, *reaching]))
    return floors


def _value_culprit(
    names: list[str],
    w: dict[str, float],
    vals: Mapping[str, float],
    total: float,
    value_sum: float,
    tol: float,
) -> tuple[str | None, str]:
    """The head whose term explains total != sum_i w_i L_i, and the explanation."""
    for n in names:
        if w[n] != 0 and abs(total - (value_sum - w[n] * vals[n])) <= tol:
            return (
                n,
                f"it equals the sum without '{n}' (weight {w[n]:g}): a missing head.",
            )
        if vals[n] != 0 and w[n] != 0:
            factor = 1 + (total - value_sum) / (w[n] * vals[n])
            k = round(factor)
            if k not in (0, 1) and abs(factor - k) * abs(w[n] * vals[n]) <= tol:
                return n, (
                    f"it equals the sum with '{n}' weighted {k * w[n]:g} instead of "
                    f"{w[n]:g}."
                )
    return None, (
        "the total adds or weights something else (a regularizer, a different "
        "weight, a missing head)."
    )


def _effective_weights(
    g_total: np.ndarray, per_loss: list[np.ndarray]
) -> list[float | None]:
    """Least-squares weights a_i with g_total ~ sum_i a_i g_i (None: loss absent here)."""
    cols = [i for i, g in enumerate(per_loss) if np.any(g != 0)]
    out: list[float | None] = [None] * len(per_loss)
    if not cols:
        return out
    a = np.stack([per_loss[i].reshape(-1) for i in cols], axis=1)
    coef, *_ = np.linalg.lstsq(a, g_total.reshape(-1), rcond=None)
    for i, c in zip(cols, coef, strict=True):
        out[i] = float(c)
    return out


def _culprit(
    names: list[str], w: dict[str, float], eff: list[float | None], reach: list[bool]
) -> str | None:
    # relative: a head weighted 1e-6 carried at 2e-6 is the culprit next to a
    # weight-1 loss whose fitted weight is off by 1e-4
    # (a zero-weight head is measured against a millionth of the largest weight)
    floor = max(1e-6 * max((abs(v) for v in w.values()), default=0.0), 1e-12)
    dev = [
        (abs((e if e is not None else 0.0) - w[n]) / max(abs(w[n]), floor), n)
        for n, e, r in zip(names, eff, reach, strict=True)
        if r
    ]
    return max(dev)[1] if dev else None


def _explain(
    tensor: str,
    names: list[str],
    w: dict[str, float],
    eff: list[float | None],
    reach: list[bool],
    total_label: str = "the total",
) -> str:
    parts = []
    for n, e, r in zip(names, eff, reach, strict=True):
        if not r:
            continue
        e = 0.0 if e is None else e
        if abs(e - w[n]) > 1e-3 * max(abs(w[n]), 1e-12):
            what = (
                "not at all (detached?)"
                if abs(e) < 1e-6 * max(abs(w[n]), 1e-12)
                else f"with weight {e:.6g}"
            )
            parts.append(f"'{n}' {what} instead of {w[n]:.6g}")
    if not parts:
        inside = "total_fn" if total_label == "the total" else total_label
        return (
            f"in '{tensor}' {total_label}'s gradient is not a weighted sum of the "
            "per-loss gradients: it contains a term none of the losses has (a "
            f"regularizer or an extra loss inside {inside}?)."
        )
    return f"in '{tensor}' {total_label}'s gradient carries " + "; ".join(parts) + "."
