"""The Keras training assertions: check Keras' own train step of a compiled model.

Kept apart from :mod:`gradcheck.api` because it is about a framework's trainer, not
a function: it takes a compiled ``keras.Model`` and its data the way ``fit`` does.
Importing this module imports neither Keras nor a backend; the check imports Keras
when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gradcheck.api import _publish, _seed
from gradcheck.errors import GradientMismatchError
from gradcheck.result import CheckReport

__all__ = ["assert_keras_model", "check_keras_model"]


def check_keras_model(
    model: Any,
    x: Any,
    y: Any,
    *,
    sample_weight: Any = None,
    class_weight: Mapping[int, float] | None = None,
    seed: int | None = None,
    rtol: float | None = None,
    label: str | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Check the gradient Keras' compiled train step computes for one batch.

    Runs ``model.train_on_batch(x, y, sample_weight=...)`` (the step ``fit`` runs,
    compiled or eager as the model was compiled) with a recording optimizer in
    place of the user's, and compares the gradient it hands to the optimizer with
    ``sum_i w_i * grad(loss_i) + grad(sum(model.losses))`` computed independently
    from ``compile(loss=..., loss_weights=...)``, pairing losses, weights, targets
    and sample weights with outputs **by output name** (lists: in the order the
    model defines its outputs). Keras' reported ``loss`` and ``<output>_loss``
    values are compared too. The model, its weights, its optimizer (variables and
    ``iterations``) and its metrics are left exactly as they were.

    ``x``/``y``/``sample_weight``/``class_weight``: as for ``train_on_batch``
    (y a dict keyed by output name, or a list in output order). ``rtol`` overrides
    the expected gradient rounding (a prior: a failing gradient comparison is
    judged again with this model's rounding measured at check time, from one
    backward pass of the weighted total against the per-loss passes and from
    Keras' compiled step against the same step run eagerly; deep BatchNorm
    networks such as keras.applications.MobileNetV3Small need it). Returns a
    :class:`CheckReport` with
    ``property="keras_training"``; raises a :class:`~gradcheck.errors.GradcheckError`
    (e.g. :class:`~gradcheck.errors.NotCompiledError`) when the model cannot be
    checked.

    A model built and compiled under ``tf.distribute.MirroredStrategy`` (or
    ``OneDeviceStrategy``) is checked under its strategy: Keras' distributed step
    runs as ``fit`` runs it (the batch split over the replicas, ``train_step`` in
    each under ``strategy.run``), and the gradient the optimizer receives after
    the cross-replica all-reduce is compared with the global batch's. Call it
    outside ``with strategy.scope():``, with a batch size divisible by
    ``num_replicas_in_sync``; the notes and ``cost["replicas"]`` say the strategy
    and its replicas.

    ``repro_dir``: a failing check writes a repro bundle there
    (:func:`gradcheck.repro.write_keras_bundle`: Keras' JSON and compile
    configs, the weights, the batch; a Model subclass or custom layer by
    ``module:qualname``); ``gradcheck replay`` reruns it. Default: the pytest
    plugin's ``--gradcheck-repro-dir``, else none."""
    from gradcheck.properties import keras_training

    s = _seed(seed)
    report = keras_training.check(
        model,
        x,
        y,
        sample_weight=sample_weight,
        class_weight=class_weight,
        seed=s,
        rtol=rtol,
    )
    report.label = label
    from gradcheck import repro

    repro.write_keras_bundle(
        repro_dir,
        report,
        model,
        x,
        y,
        sample_weight=sample_weight,
        class_weight=class_weight,
        options={"seed": s, "rtol": rtol},
    )
    return _publish(report, label)


def assert_keras_model(model: Any, x: Any, y: Any, **kwargs: Any) -> CheckReport:
    """Like :func:`check_keras_model`; raises :class:`GradientMismatchError` on
    failure."""
    report = check_keras_model(model, x, y, **kwargs)
    if not report.passed:
        raise GradientMismatchError(report)
    return report
