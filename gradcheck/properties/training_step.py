"""The training-step property (PyTorch): the ``.grad`` a step leaves is sum_i w_i grad L_i.

:func:`gradcheck.check_linearity` checks a *loss function*. Real training code goes
further between the loss and the optimizer: it sums the heads itself, scales the
loss for a ``GradScaler`` and unscales the gradients, accumulates over micro-batches
with a division by their count. Each of those steps can silently change the gradient
the optimizer sees, and none of them shows in the loss value. This property checks
the end product: after the user's ``step_fn()`` every trainable parameter's
``.grad`` must equal sum_i w_i * dL_i/dparam, where each ``L_i`` (``loss_fns[i]()``) is
one head's loss over the whole batch, differentiated on its own with
``torch.autograd.grad`` (no ``.grad`` side effects).

Verdict, tolerance, flow matrix, effective weights and culprit head all come from
:func:`gradcheck.properties.linearity.judge`; this module only obtains the two sides
and adds the diagnoses specific to training code (a gradient that never arrived,
one factor common to every loss and parameter: an unscaled GradScaler, an
accumulation divided by the wrong count, clipping).

Sandbox: the user's callables run on working copies. The torch backend's ``_State``
snapshots parameters' storage, ``.grad``, ``requires_grad``, train/eval flags,
buffers, grad mode and RNG; on top of it every call gets fresh clones of the
parameters and buffers, the ``GradScaler``'s attributes are swapped for copies, and
an optimizer whose ``step()`` runs inside ``step_fn`` is switched, by a global
step pre-hook, to a copy of its state at that moment. An ``optimizer.step()`` in
``step_fn`` is therefore allowed (real steps usually end with one): it writes into
the copies, and restoring puts back the original objects, which were never written.

Tolerance: the linearity tolerance of the parameters' dtype, elementwise, with the
rounding floor taken from the model's largest gradient element rather than each
tensor's own (a bias feeding BatchNorm in train mode has a gradient that is zero up to
the rounding of much larger terms; with a per-tensor floor every such step was a false
alarm). Measured on CPU: float32 steps accumulated over 1-16 equal micro-batches, with
and without a GradScaler, reach at most 7% of it (600 random models, weights 0-300),
so accumulation needs no extra allowance. Under ``autocast`` the step's forward and
backward round in bfloat16/float16: the expected side runs in the same autocast
(computing it in float32 instead gave 27 false alarms in 100 bfloat16 steps even at
bfloat16's full tolerance) and the rounding is AUTOCAST_ROUNDING_FRACTION of that
dtype's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradcheck.backends import step_backend
from gradcheck.backends.base import TensorSpec
from gradcheck.errors import (
    NoGradientError,
    NonFiniteError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.properties import linearity
from gradcheck.result import CheckReport

PROPERTY = "training_step"
#: How the judge names the step's side ("the step's gradient carries 'aux' ...").
TOTAL_LABEL = "the step"
FRAMEWORK = "torch"

#: A factor found in every tensor is "the scaler's scale", "n" or "1/n" when it is
#: this close (relative); a power of two at least this large looks like a GradScaler.
_SNAP = 1e-4
_SCALER_LIKE = 256.0
#: Under autocast both sides run the same low-precision forward (the loss_fns in the
#: same autocast), so they differ only by the backward's accumulation order: measured
#: at <= 5% of GRADIENT_ROUNDING[dtype]'s tolerance (80 bfloat16/float16 CPU steps:
#: widths 32-128, 1-8 micro-batches, BatchNorm, 3 heads). A quarter of the table keeps
#: >= 5x headroom and makes a weight applied twice on a head visible.
AUTOCAST_ROUNDING_FRACTION = 0.25
#: Below this relative deviation on every parameter, and with no common factor, the
#: mismatch looks like the rounding of a lower precision (autocast) rather than a bug.
_SMALL_DEVIATION = 0.05


def run(
    step_fn: Callable[[], Any],
    model: Any,
    loss_fns: Mapping[str, Callable[[], Any]],
    weights: Mapping[str, float],
    *,
    scaler: Any = None,
    autocast: Any = None,
    seed: int,
    rtol: float | None = None,
) -> CheckReport:
    """Run ``step_fn()`` and compare the ``.grad`` it leaves with sum_i w_i grad L_i.

    See :func:`gradcheck.training_api.check_training_step` for the contract."""
    ts = step_backend(FRAMEWORK)
    started = time.perf_counter()
    names, w = linearity.validate(loss_fns, weights)
    ts.check_model(model)
    if not callable(step_fn):
        raise UnsupportedInputError(
            f"step_fn must be a callable taking no arguments that runs forward and "
            f"backward; got {type(step_fn).__name__}."
        )
    ts.check_scaler(scaler)
    amp = ts.autocast_dtype(autocast)
    named, specs = ts.trainable(model)
    rounding_note = ""
    if amp is not None:
        rounding_note = (
            f"; autocast to {tl.canonical_dtype(amp)}: the loss_fns ran in it too"
        )
        if rtol is None:
            rtol = AUTOCAST_ROUNDING_FRACTION * tl.gradient_rounding(amp)
            rounding_note += (
                f", rounding {AUTOCAST_ROUNDING_FRACTION:g} x {tl.canonical_dtype(amp)}'s"
                " (both sides share the forward's rounding)"
            )
    device_type = ts.device_type(named)
    scale = float(scaler.get_scale()) if scaler is not None else None
    params = [p for _, p in named]

    sandbox = ts.Sandbox(model, scaler)
    try:
        values: dict[str, float] = {}
        grads: dict[str, list[np.ndarray | None]] = {}
        for name in names:
            sandbox.fresh()
            values[name], grads[name] = ts.loss_and_grads(
                loss_fns[name], name, params, specs, device_type, amp
            )
        sandbox.fresh()
        g_step = ts.step_grads(step_fn, named)
        runs = 1
        rewritten = sandbox.params_rewritten()
        stepped = list(sandbox.stepped)
        _check_step(specs, g_step, grads, w, scale)
        tolerance = {"rtol": rtol, "floor_scale": _largest(w, g_step, grads)}
        report = linearity.judge(
            specs,
            w,
            None,
            g_step,
            values,
            grads,
            framework=FRAMEWORK,
            seed=seed,
            property=PROPERTY,
            total_label=TOTAL_LABEL,
            **tolerance,
        )
        if not report.passed:
            # the same step again, from the same parameters but a different RNG state
            sandbox.fresh(reset_rng=False)
            g_again = ts.step_grads(step_fn, named)
            runs += 1
            again = linearity.judge(
                specs,
                {"first run": 1.0},
                None,
                g_again,
                {"first run": 0.0},
                {"first run": g_step},
                framework=FRAMEWORK,
                seed=seed,
                **tolerance,
            )
            if not again.passed:
                report.status = "nondeterministic"
    finally:
        sandbox.restore()

    report.tolerance_reason = report.tolerance_reason.replace(
        "the tensor's largest", "the model's largest gradient element"
    )
    _annotate(
        report,
        specs,
        w,
        names,
        g_step,
        grads,
        scale,
        amp,
        ts.batchnorm_in_train_mode(model),
        tolerance,
    )
    if stepped:
        report.notes.append(
            f"step_fn ran {', '.join(sorted(set(stepped)))}.step(); gradcheck undid it: "
            "parameters and optimizer state are as they were before the check."
        )
    elif rewritten:
        report.notes.append(
            "step_fn changed parameter values outside a torch.optim.Optimizer.step() "
            f"({', '.join(rewritten[:3])}{', ...' if len(rewritten) > 3 else ''}); "
            "gradcheck restored the parameters, but not any other state of what "
            "changed them."
        )
    report.tolerance_reason += rounding_note
    report.cost = {
        "forward": len(names) + runs,
        "backward": len(names) + runs,
        "seconds": time.perf_counter() - started,
    }
    return report


def _check_step(
    specs: Sequence[TensorSpec],
    g_step: Sequence[np.ndarray | None],
    grads: Mapping[str, Sequence[np.ndarray | None]],
    w: Mapping[str, float],
    scale: float | None,
) -> None:
    """Raise for a step whose gradients cannot be compared: non-finite, or absent."""
    for spec, g in zip(specs, g_step, strict=True):
        if g is not None and not np.isfinite(g).all():
            n = int((~np.isfinite(g)).sum())
            if scale is not None:
                why = (
                    f"with the GradScaler at scale {scale:g} this is an overflow of the "
                    "scaled gradients: scaler.step() would skip this step and "
                    "scaler.update() lower the scale (a skipped step, not a wrong "
                    "gradient). Check at a smaller scale: GradScaler(init_scale=...)."
                )
            else:
                why = (
                    "the per-loss gradients are finite, so the step's own arithmetic "
                    "overflows (an unscaled GradScaler that overflowed? pass scaler=) "
                    "or divides by zero (accumulation divided by a count of 0?)."
                )
            raise NonFiniteError(
                f"after step_fn, '{spec.name}'.grad has {n} NaN/Inf elements of "
                f"{g.size}; {why}"
            )
    if all(g is None for g in g_step):
        expected_nonzero = [
            spec.name
            for t, spec in enumerate(specs)
            if any(
                w[n] != 0 and grads[n][t] is not None and np.any(grads[n][t] != 0)
                for n in w
            )
        ]
        if expected_nonzero:
            more = len(expected_nonzero) - 1
            raise NoGradientError(
                f"step_fn left no .grad on any of the {len(specs)} trainable "
                f"parameters, but the weighted losses have a gradient for "
                f"'{expected_nonzero[0]}'{f' and {more} more' if more else ''}: did "
                "step_fn call backward()? gradcheck sets every .grad to None before "
                "the step; a zero_grad() after backward() (e.g. optimizer.zero_grad() "
                "after optimizer.step()) also clears them. End step_fn before it."
            )


# ---------------------------------------------------------------------- diagnoses
def _annotate(
    report: CheckReport,
    specs: Sequence[TensorSpec],
    w: Mapping[str, float],
    names: Sequence[str],
    g_step: Sequence[np.ndarray | None],
    grads: Mapping[str, Sequence[np.ndarray | None]],
    scale: float | None,
    amp: Any,
    batchnorm_training: bool,
    tolerance: Mapping[str, Any],
) -> None:
    if report.location is not None:
        report.location.quantity = (
            "gradient (numerical = sum_i w_i dL_i, analytical = the step's .grad)"
        )
    if report.passed:
        return
    if report.status == "nondeterministic":
        report.notes.insert(
            0,
            "step_fn left a different .grad when run again from the same parameters "
            "with a different RNG state: dropout or another random op. gradcheck "
            "replays the user's RNG state for every loss_fn and for the step, which "
            "makes one forward pass over the batch reproducible, but not micro-batches "
            "(each forward draws its own masks). Check in eval mode (model.eval()) or "
            "seed the RNG inside step_fn and loss_fns.",
        )
        return
    expected = [
        sum(
            (w[n] * grads[n][t] for n in names if grads[n][t] is not None),
            start=np.zeros(spec.shape),
        )
        for t, spec in enumerate(specs)
    ]
    first: list[str] = []
    missing = [
        t for t, g in enumerate(g_step) if g is None and np.any(expected[t] != 0)
    ]
    if missing:
        tensors = ", ".join(f"'{specs[t].name}'" for t in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        heads = [
            f"'{n}' (weight {w[n]:g})"
            for n in names
            if w[n] != 0
            and any(
                grads[n][t] is not None and np.any(grads[n][t] != 0) for t in missing
            )
        ]
        first.append(
            f"no gradient reached {tensors}{more}: .grad is None after the step, "
            f"although {', '.join(heads)} reach{'es' if len(heads) == 1 else ''} "
            f"{'it' if len(missing) == 1 else 'them'}: step_fn never backpropagates "
            "that loss there (left out of the sum, or detached)."
        )
    report.notes[:0] = first
    factor = _common_factor(specs, w, g_step, grads, expected, report.seed, tolerance)
    if factor is not None:
        report.notes.append(_factor_note(factor, scale))
        return
    deviation = max(
        (
            float(np.linalg.norm((g if g is not None else 0.0) - e))
            / float(np.linalg.norm(e))
            for g, e in zip(g_step, expected, strict=True)
            if np.any(e != 0)
        ),
        default=math.inf,
    )
    if amp is None and deviation < _SMALL_DEVIATION:
        report.notes.append(
            f"the step's .grad is within {deviation:.1%} of the expected gradient on "
            "every parameter: if step_fn runs under torch.autocast, pass "
            "autocast=torch.bfloat16 (or float16) so that the loss_fns run in the same "
            "autocast and the tolerance is that precision's; otherwise a weight is "
            "slightly off."
        )
    if batchnorm_training:
        report.notes.append(
            "the model has BatchNorm layers in train mode: each forward pass normalizes "
            "by its own batch, so accumulating over micro-batches does not give the "
            "full-batch gradient. Check in eval mode (model.eval()), or with loss_fns "
            "over the same micro-batches."
        )


def _common_factor(
    specs: Sequence[TensorSpec],
    w: Mapping[str, float],
    g_step: Sequence[np.ndarray | None],
    grads: Mapping[str, Sequence[np.ndarray | None]],
    expected: Sequence[np.ndarray],
    seed: int,
    tolerance: Mapping[str, Any],
) -> float | None:
    """c when the step's .grad is c * expected for every loss and tensor, else None.

    c is the least-squares factor over all tensors together; it counts only when the
    step's gradient divided by c passes the same elementwise judge, so a factor that
    fits some tensors and not others (one head's weight) is not reported as common."""
    num = sum(
        float(np.vdot(g, e))
        for g, e in zip(g_step, expected, strict=True)
        if g is not None
    )
    den = sum(float(np.vdot(e, e)) for e in expected)
    if den == 0 or not math.isfinite(num / den):
        return None
    c = num / den
    if c == 0:
        zero = all(g is None or not np.any(g) for g in g_step)
        return 0.0 if zero else None
    if abs(c - 1.0) <= _SNAP:
        return None
    rescaled = [None if g is None else g / c for g in g_step]
    verdict = linearity.judge(
        specs,
        w,
        None,
        rescaled,
        dict.fromkeys(w, 0.0),
        grads,
        framework=FRAMEWORK,
        seed=seed,
        **tolerance,
    )
    return c if verdict.passed else None


def _largest(
    w: Mapping[str, float],
    g_step: Sequence[np.ndarray | None],
    grads: Mapping[str, Sequence[np.ndarray | None]],
) -> float:
    """The model's largest gradient magnitude (|step| + sum_i |w_i g_i|, elementwise).

    Passed to the judge as every tensor's rounding floor: a gradient that is ~0 by
    cancellation carries rounding of the terms that cancelled, which live in other
    tensors' scale. The bias of a layer feeding BatchNorm in train mode is the common
    case (exactly zero in exact arithmetic, float32 noise in both sides); with the
    tensor's own largest element as floor every such step was a false alarm."""
    largest = 0.0
    for t, g in enumerate(g_step):
        magnitude = np.abs(g) if g is not None else 0.0
        for n in w:
            if grads[n][t] is not None:
                magnitude = magnitude + np.abs(w[n] * grads[n][t])
        largest = max(largest, float(np.max(magnitude, initial=0.0)))
    return largest


def _factor_note(c: float, scale: float | None) -> str:
    if c == 0.0:
        return (
            "the step's .grad is zero on every parameter: a zero_grad(set_to_none="
            "False) after backward(), or every loss detached from the parameters."
        )
    head = (
        f"the step's .grad is the expected gradient times {c:.6g}, one factor common "
        "to every loss and every parameter"
    )
    n = round(c)
    inv = round(1.0 / c)
    if scale is not None and _close(c, scale):
        return (
            f"{head}: the GradScaler's scale ({scale:g}). The gradients are still "
            "scaled: call scaler.unscale_(optimizer) after backward(), before reading "
            "or clipping gradients (scaler.step() unscales only inside itself)."
        )
    if c >= _SCALER_LIKE and _close(c, 2.0 ** round(math.log2(c))):
        return (
            f"{head}: a power of two as large as a GradScaler's scale (default "
            "init_scale 65536.0). Scaled gradients that were never unscaled: call "
            "scaler.unscale_(optimizer) after backward(), before reading or clipping "
            "gradients (pass scaler= to have gradcheck confirm the scale)."
        )
    if n >= 2 and _close(c, n):
        return (
            f"{head}: accumulation divided by the wrong count? .grad is {n}x the "
            "expected. When accumulating over k equal micro-batches, divide each "
            f"micro-batch's mean loss by k (here {n}x too small a divisor, or none); "
            f"else a loss summed where the loss_fns take the mean ({n} elements)?"
        )
    if c > 0 and inv >= 2 and _close(1.0 / c, inv):
        return (
            f"{head}: accumulation divided by the wrong count? .grad is 1/{inv} = "
            f"{c:.6g}x the expected. When accumulating over k equal micro-batches, "
            f"divide each micro-batch's mean loss by k exactly once (here {inv}x too "
            "large a divisor: divided twice, or by the sample count?)."
        )
    if 0 < c < 1:
        return (
            f"{head}: gradient clipping (clip_grad_norm_) or a factor folded into the "
            "loss rescales every gradient alike. Check the gradient before clipping."
        )
    return (
        f"{head}: a factor folded into the loss (a loss scale, a learning rate, a "
        "sign), outside any head's weight."
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _SNAP * abs(b)
