"""The audit's second-order and forward-mode jobs (issue 13), on generated models.

Four jobs per framework and dtype, each a hypothesis search like the engine jobs
of :mod:`gradcheck.audit` (correct models must pass, a planted bug must be a
``mismatch``):

* ``second_order``, correct: ``check_gradients(total, params=model, order=2)``
  on smooth models whose total is passed through s(L) = L + L^2 / 2 (a custom
  op with a hand-written, differentiable backward g * (1 + L));
* ``second_order``, planted: the same op whose backward uses a *detached* saved
  L (g * (1 + L.detach()); TensorFlow: ``tf.stop_gradient``): right at order 1,
  it drops the grad(L) grad(L)^T term of every Hessian-vector product;
* ``forward_mode``, correct: ``check_gradients(total, params=model,
  ad="forward")`` (torch forward AD; TensorFlow's ForwardAccumulator);
* ``forward_mode``, planted: torch: the total passes through an identity
  Function whose ``jvp`` is 1 + rel times too large (rel: the engine jobs'
  promised detection limit) while its backward is right; TensorFlow (no
  user-written jvp exists there): an identity ``tf.custom_gradient`` whose
  gradient function stops the gradient through its upstream argument, called
  inside a ``tf.function``, where TensorFlow's forward mode transposes the
  gradient function and so gets a zero tangent while reverse mode is right.

Frameworks are imported inside the checks only. The lead wires :func:`jobs` into
the audit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradcheck
from gradcheck.result import CheckReport


def jobs(framework: str, dtype: str, seed: int) -> Iterator[Any]:
    """The second-order and forward-mode jobs for ``framework`` ("torch" or
    "tensorflow") and ``dtype`` ("float64" or "float32"); ``seed`` is the
    audit's (each check is seeded by run_job)."""
    from gradcheck.audit import (
        PLANTED,
        SMOOTH_ACTIVATIONS,
        SMOOTH_LOSSES,
        Job,
        _specs,
    )

    del seed  # the checks take run_job's seed
    smooth = dict(
        activations=SMOOTH_ACTIVATIONS,
        losses=SMOOTH_LOSSES,
        allow_regularizers=False,
        max_units=4,
        max_layers=1,
        max_heads=2,
    )
    rel = PLANTED[dtype]
    helpers = _torch_helpers() if framework == "torch" else _tf_helpers()

    def second(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def check(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(framework, spec, dtype)
            fn = helpers["square"](built.total_fn(batch), detached=planted)
            return gradcheck.check_gradients(
                fn, params=built.model, order=2, seed=s, mode="directional"
            )

        return check

    def forward(planted: bool) -> Callable[[Any, dict[str, Any], int], CheckReport]:
        def check(spec: Any, batch: dict[str, Any], s: int) -> CheckReport:
            built = _build(framework, spec, dtype)
            fn = built.total_fn(batch)
            if planted:
                fn = helpers["wrong_jvp"](fn, rel)
            return gradcheck.check_gradients(
                fn, params=built.model, ad="forward", seed=s, mode="directional"
            )

        return check

    # TensorFlow's tf.nn.moments (Keras 3's moments on TensorFlow: LayerNormalization,
    # BatchNormalization in training mode) computes the variance around
    # tf.stop_gradient(mean): first derivatives are right (the dropped term is
    # zero at the mean), second derivatives are not (measured: order 2 on
    # LayerNormalization fails, the same function in torch passes; see
    # tests/test_second_order.py). The correct-model job leaves those layers
    # out in TensorFlow: a framework bug is not gradcheck's false alarm.
    exact = _no_moments if framework == "tensorflow" else None
    yield Job(
        framework, "second_order", dtype, None, second(False), _specs(exact, **smooth)
    )
    yield Job(
        framework,
        "second_order",
        dtype,
        "a backward that uses a detached saved input (d2 term dropped)",
        second(True),
        _specs(exact, **smooth, min_weight=0.01),
        # TensorFlow float32 is judged on the table's rounding prior (the
        # measured rounding is torch-only): hypothesis finds generated models
        # where the dropped term stays under it (a counterexample in 4 examples,
        # error 3.0e-05 <= tolerance 1.7e-04), so this job would search for a
        # miss gradcheck does not claim to catch
        skip="TensorFlow float32 second order: judged on the rounding prior, "
        "which can hide the planted term"
        if framework == "tensorflow" and dtype == "float32"
        else None,
    )
    # torch's float32 CPU LSTM/GRU run mkldnn_rnn_layer, which has no forward
    # AD (torch 2.13: check_gradients refuses it by name, UnsupportedInputError);
    # the float32 torch forward-mode jobs draw models without recurrent layers
    where = _no_recurrent if framework == "torch" and dtype == "float32" else None
    yield Job(
        framework,
        "forward_mode",
        dtype,
        None,
        forward(False),
        _specs(where, **smooth),
    )
    yield Job(
        framework,
        "forward_mode",
        dtype,
        f"jvp scaled by 1+{rel:g}, backward right"
        if framework == "torch"
        else "tf.function custom_gradient blind to its upstream gradient",
        forward(True),
        _specs(where, **smooth, min_weight=0.01),
    )


def _no_moments(spec: Any) -> bool:
    """No layer whose TensorFlow implementation uses tf.nn.moments."""
    return not any(
        layer.kind == "layernorm" or (layer.kind == "batchnorm" and layer.training)
        for _, layer, _ in spec.layers()
    )


def _no_recurrent(spec: Any) -> bool:
    return not any(layer.kind in ("lstm", "gru") for _, layer, _ in spec.layers())


def _build(framework: str, spec: Any, dtype: str) -> Any:
    from gradcheck.architectures import build_keras, build_torch

    if framework == "torch":
        return build_torch(spec, dtype, "cpu")
    return build_keras(spec, dtype)


# ---------------------------------------------------------------- torch
def _torch_helpers() -> dict[str, Callable[..., Any]]:
    import torch

    class Square(torch.autograd.Function):
        """s(L) = L + L^2 / 2 with a hand-written backward g * (1 + L); with
        ``detached`` the saved L is detached (the planted second-order bug)."""

        @staticmethod
        def forward(ctx: Any, total: Any, detached: bool) -> Any:
            ctx.save_for_backward(total)
            ctx.detached = detached
            return total + 0.5 * total * total

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, None]:
            (total,) = ctx.saved_tensors
            if ctx.detached:
                total = total.detach()
            return g * (1 + total), None

    class WrongJvp(torch.autograd.Function):
        """Identity; backward right, jvp 1 + rel times too large."""

        @staticmethod
        def forward(ctx: Any, x: Any, rel: float) -> Any:
            ctx.rel = rel
            return x.clone()

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, None]:
            return g, None

        @staticmethod
        def jvp(ctx: Any, t: Any, _rel: Any) -> Any:
            return t * (1 + ctx.rel)

    def square(fn: Callable[[], Any], detached: bool) -> Callable[[], Any]:
        return lambda: Square.apply(fn(), detached)

    def wrong_jvp(fn: Callable[[], Any], rel: float) -> Callable[[], Any]:
        return lambda: WrongJvp.apply(fn(), rel)

    return {"square": square, "wrong_jvp": wrong_jvp}


# ---------------------------------------------------------------- TensorFlow
def _tf_helpers() -> dict[str, Callable[..., Any]]:
    import tensorflow as tf

    def square(fn: Callable[[], Any], detached: bool) -> Callable[[], Any]:
        @tf.custom_gradient
        def s(total: Any) -> Any:
            def grad(g: Any) -> Any:
                saved = tf.stop_gradient(total) if detached else total
                return g * (1 + saved)

            return total + 0.5 * total * total, grad

        return lambda: s(fn())

    @tf.custom_gradient
    def _blind(x: Any) -> Any:
        def grad(g: Any) -> Any:
            return tf.stop_gradient(g)  # right value, no derivative in g

        return tf.identity(x), grad

    blind = tf.function(_blind)

    def wrong_jvp(fn: Callable[[], Any], rel: float) -> Callable[[], Any]:
        del rel  # the TensorFlow bug is a zero tangent, not a scaled one
        return lambda: blind(fn())

    return {"square": square, "wrong_jvp": wrong_jvp}
