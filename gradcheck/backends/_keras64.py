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
  function captured (targets, masks) combine with float64 activations.

Everything is restored in ``finally``; the caller verifies that the outputs came
out float64 and falls back to native precision otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops


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
    float32 constants in the user's code). Some Keras ops (Conv1D, regularizers)
    hand the variable object itself to TF, whose promotion logic then fails: the
    caller retries with ``promotion=False``."""
    import keras

    policy = keras.DTypePolicy("float64")
    saved_policies = [(layer, layer.dtype_policy) for layer in layers]
    saved_values = [(v, v._value) for v, _ in swaps]
    saved_mode = tf_ops.get_dtype_conversion_mode()
    try:
        for v, shadow in swaps:
            v._value = shadow
        for layer, _ in saved_policies:
            layer.dtype_policy = policy
        if promotion:
            tf_ops.set_dtype_conversion_mode("all")
        yield
    finally:
        tf_ops.set_dtype_conversion_mode(saved_mode.name.lower())
        for layer, p in saved_policies:
            layer.dtype_policy = p
        for v, original in saved_values:
            v._value = original
