"""Run a float32 Keras model in float64 for reference evaluations, then put it back.

TensorFlow variables cannot change dtype, so a float32 Keras model cannot simply
be re-run on float64 copies. Keras 3 variables keep their storage in ``._value``
(a ``tf.Variable``) and layers cast inputs to their dtype policy. For the duration
of one evaluation this module:

* points every tracked Keras variable's ``_value`` at a float64 shadow
  ``tf.Variable`` (created once, assigned per evaluation);
* sets the dtype policy of every layer of the given models to float64, so layers
  compute in float64 and cast their inputs up;
* turns on TensorFlow's dtype promotion ("all"), so float32 constants the user's
  function captured (targets, masks) combine with float64 activations, and makes a
  Keras variable answer ``v == bool`` (which that promotion asks of every operand)
  with False instead of an elementwise comparison that raises;
* declares the variables float64 and sets Keras' floatx to float64, so
  regularizers (``ops.cast(l2, x.dtype)``) compute in float64;
* casts floating inputs to float64 for layers that do not autocast them
  (LayerNormalization).

Everything is restored in ``finally``; the caller verifies that the outputs came
out float64 and falls back to native precision otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

from gradcheck._quiet import promotion_quiet


def is_keras_variable(v: Any) -> bool:
    return isinstance(getattr(v, "_value", None), tf.Variable) and hasattr(v, "path")


def layers_of(containers: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    seen: set[int] = set()
    for c in containers:
        flatten = getattr(c, "_flatten_layers", None)
        if flatten is None:
            continue
        for layer in flatten(include_self=True, recursive=True):
            if id(layer) not in seen and hasattr(layer, "dtype_policy"):
                seen.add(id(layer))
                out.append(layer)
    return out


class Float64Shadows:
    """One float64 ``tf.Variable`` per Keras variable, made on first use."""

    def __init__(self) -> None:
        self._shadows: dict[int, tf.Variable] = {}

    def shadow(self, keras_var: Any, value: tf.Tensor) -> tf.Variable:
        key = id(keras_var)
        sv = self._shadows.get(key)
        value = tf.cast(value, tf.float64)
        if sv is None:
            sv = self._shadows[key] = tf.Variable(
                value, trainable=bool(getattr(keras_var, "trainable", True))
            )
        else:
            sv.assign(value)
        return sv


@contextlib.contextmanager
def float64(
    layers: list[Any], swaps: list[tuple[Any, tf.Variable]], promotion: bool = True
) -> Iterator[None]:
    """Within the block, each Keras variable reads its float64 shadow and the
    layers compute in float64; ``promotion`` turns TF's dtype promotion on (for
    float32 constants in the user's code). If fn still fails, the caller retries
    with ``promotion=False``, then falls back to native precision."""
    import keras

    policy = keras.DTypePolicy("float64")
    saved_policies = [(layer, layer.dtype_policy) for layer in layers]
    saved_values = [(v, v._value, v._dtype) for v, _ in swaps]
    saved_mode = tf_ops.get_dtype_conversion_mode()
    # layers that do not autocast their inputs (LayerNormalization) would get
    # float32 activations next to float64 weights: cast floating inputs up for
    # them; an instance attribute shadows the class's call and is deleted after
    patched = [layer for layer in layers if "call" not in vars(layer)]
    # regularizers multiply by Python floats, which Keras converts to floatx
    saved_floatx = keras.config.floatx()
    from keras.src.backend.common.variables import Variable as variable_class

    saved_eq = variable_class.__dict__["__eq__"]
    # a keras.losses.Loss made before the check (the `loss_fn = MeanSquaredError()`
    # of any training script) fixed its dtype to floatx then and casts y_pred down
    # to it: within the block a low-precision Loss computes in float64
    from keras.src.losses.loss import Loss as loss_class

    saved_loss_dtype = loss_class.__dict__["dtype"]
    try:
        loss_class.dtype = property(_float64_loss_dtype(saved_loss_dtype))
        keras.config.set_floatx("float64")
        for v, shadow in swaps:
            v._value = shadow
            v._dtype = "float64"  # what regularizers read (ops.cast(l2, x.dtype))
        for layer, _ in saved_policies:
            layer.dtype_policy = policy
        for layer in patched:
            layer.call = _casting_call(layer.call)
        if promotion:
            tf_ops.set_dtype_conversion_mode("all")
            # TF's promotion asks `x == bool` of every operand; a Keras variable
            # handed to an op answers with an elementwise comparison that fails
            variable_class.__eq__ = _eq_types_false(saved_eq)
        with promotion_quiet():  # TF logs each op the promotion skips: our noise
            yield
    finally:
        loss_class.dtype = saved_loss_dtype
        tf_ops.set_dtype_conversion_mode(saved_mode.name.lower())
        variable_class.__eq__ = saved_eq
        keras.config.set_floatx(saved_floatx)
        for layer in patched:
            vars(layer).pop("call", None)
        for layer, p in saved_policies:
            layer.dtype_policy = p
        for v, original, dtype in saved_values:
            v._value = original
            v._dtype = dtype


def _float64_loss_dtype(original: property) -> Any:
    def dtype(self: Any) -> Any:
        value = original.fget(self)
        return "float64" if value in ("float32", "float16", "bfloat16") else value

    return dtype


def _eq_types_false(eq: Any) -> Any:
    def __eq__(self: Any, other: Any) -> Any:  # noqa: N807
        if isinstance(other, type):
            return False
        return eq(self, other)

    return __eq__


def _up(x: Any) -> Any:
    if isinstance(x, tf.Tensor) and x.dtype in (tf.float16, tf.bfloat16, tf.float32):
        return tf.cast(x, tf.float64)
    return x


def _casting_call(call: Any) -> Any:
    import functools

    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        args = tf.nest.map_structure(_up, args)
        kwargs = tf.nest.map_structure(_up, kwargs)
        return call(*args, **kwargs)

    return wrapped
