"""Public front door of the training-step check (PyTorch): check_* returns a report,
assert_* raises on failure. Thin like :mod:`gradcheck.api`; the work is in
:mod:`gradcheck.properties.training_step`. Importing this module imports no torch."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from gradcheck.api import _loss_labels, _publish, _seed, no_raw_exceptions
from gradcheck.errors import GradientMismatchError
from gradcheck.properties import training_step
from gradcheck.result import CheckReport

__all__ = ["assert_training_step", "check_training_step"]


def check_training_step(
    step_fn: Callable[[], Any],
    model: Any,
    loss_fns: Mapping[str, Callable[[], Any]],
    weights: Mapping[str, float],
    *,
    scaler: Any = None,
    autocast: Any = None,
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Check that the ``.grad`` ``step_fn()`` leaves equals sum_i w_i * grad(loss_i).

    ``step_fn()`` takes no arguments (close over the model, batch, optimizer and
    scaler) and is the user's training step up to the optimizer: forward, the
    weighted sum of the heads, backward, possibly over several micro-batches and
    through a ``torch.amp.GradScaler`` including ``scaler.unscale_(optimizer)``.
    gradcheck sets every ``.grad`` to None first, so stale gradients cannot hide an
    accumulation bug; a ``zero_grad()`` at the start of ``step_fn`` is harmless, one
    after ``backward()`` empties what is checked. If ``step_fn`` goes on to
    ``optimizer.step()`` / ``scaler.step(optimizer)`` / ``scaler.update()`` that is
    allowed: it runs on copies and is undone.

    ``loss_fns``: {head: callable() -> that head's scalar loss over the *whole*
    batch}, each differentiated on its own; ``weights``: {head: float}. The expected
    gradient is sum_i weights[i] * grad(loss_fns[i]()) for every trainable
    parameter of ``model``. Gradient accumulation matches it when done right: mean
    losses over k equal-sized micro-batches, each divided by k (unequal sizes or
    sum-reduced losses need the matching weighting; BatchNorm in train mode makes
    micro-batches differ from the full batch).

    ``scaler``: the ``GradScaler`` ``step_fn`` uses. Pass it so that its scale and
    growth tracker are protected (``update()`` inside the step changes them) and so
    that a gradient left scaled is recognised by its scale. ``autocast``:
    ``torch.bfloat16``/``torch.float16`` when ``step_fn`` runs under
    ``torch.autocast``; the loss_fns then run in the same autocast (both sides share
    the forward's rounding) and the tolerance is a quarter of that dtype's gradient
    rounding. ``rtol`` overrides the relative gradient rounding; ``seed`` is recorded
    for reproduction (the check itself draws nothing at random).

    Everything of the user's is bit-identical afterwards, whether the check passed,
    failed or raised: parameters (storage and values), ``.grad``, ``requires_grad``,
    train/eval flags, buffers, RNG states, the state of any ``torch.optim``
    optimizer stepped inside ``step_fn`` (found through a step pre-hook), and the
    scaler passed. Other state ``step_fn`` changes (learning-rate schedulers, EMA
    weights, counters) is not undone: keep it out of ``step_fn``. Exceptions from
    ``step_fn`` or the loss_fns propagate after restoring, as a
    :class:`gradcheck.errors.FunctionRaisedError` that is also an instance of the
    original type (``except ValueError`` still catches it); any other framework
    error becomes a ``GradcheckError`` naming the problem.

    The report (``property="training_step"``) carries the flow matrix and the
    effective weight of each loss in each parameter's ``.grad``; its notes name a
    parameter no gradient reached and a factor common to every loss and parameter
    (an unscaled GradScaler, an accumulation divided by the wrong count).

    ``repro_dir``: a failing check writes a repro bundle there
    (:func:`gradcheck.repro.write_training_bundle`: ``step_fn`` and the loss
    functions by ``module:qualname``, the model, a module-level object of
    ``step_fn``'s module, with its state_dict, the torch tensors they read from
    their module's globals, the scaler's state); ``gradcheck replay`` reruns it.
    Default: the pytest plugin's ``--gradcheck-repro-dir``, else none."""
    s = _seed(seed)
    with no_raw_exceptions(
        "check_training_step", step_fn=step_fn, **_loss_labels(loss_fns)
    ):
        report = training_step.run(
            step_fn,
            model,
            loss_fns,
            weights,
            scaler=scaler,
            autocast=autocast,
            seed=s,
            rtol=rtol,
        )
    report.label = label
    from gradcheck import repro

    repro.write_training_bundle(
        repro_dir,
        report,
        step_fn,
        model,
        loss_fns,
        weights,
        scaler=scaler,
        autocast=autocast,
        options={"seed": s, "rtol": rtol},
    )
    return _publish(report, label)


def assert_training_step(
    step_fn: Callable[[], Any],
    model: Any,
    loss_fns: Mapping[str, Callable[[], Any]],
    weights: Mapping[str, float],
    **kwargs: Any,
) -> CheckReport:
    """Like :func:`check_training_step`; raises :class:`GradientMismatchError` on
    failure."""
    report = check_training_step(step_fn, model, loss_fns, weights, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report
