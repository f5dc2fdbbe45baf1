"""Keras on TensorFlow, for check_keras_model: per-loss gradients under a
persistent GradientTape, and IndexedSlices made dense for the recording optimizer.
See :mod:`gradcheck.backends.keras_step`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradcheck.backends.keras_step import numpy

__all__ = ["TensorFlowOps", "dense"]


def dense(gradient: Any) -> Any:
    """A dense tensor for an IndexedSlices gradient (Embedding)."""
    return tf.convert_to_tensor(gradient)


class TensorFlowOps:
    """Eager forward pass under a persistent GradientTape, one gradient per loss."""

    name = "tensorflow"

    def value_and_grads(
        self,
        compute: Callable[[], dict[str, Any]],
        variables: Sequence[Any],
        scale: float,
    ) -> tuple[dict[str, Any], dict[str, list[np.ndarray | None]]]:
        with tf.GradientTape(persistent=True) as tape:
            losses = compute()
            scaled = {k: v * scale for k, v in losses.items()}
        grads = {}
        for name, value in scaled.items():
            gs = tape.gradient(value, list(variables), unconnected_gradients="none")
            grads[name] = [
                None if g is None else numpy(tf.convert_to_tensor(g)) / scale
                for g in gs
            ]
        del tape
        return losses, grads

    def components(self, variable: Any) -> list[Any] | None:
        """Each replica's copy of a variable created under a tf.distribute
        strategy (mirrored or sync-on-read); None for an ordinary variable."""
        inner = getattr(variable, "_value", None)
        inner = variable if inner is None else inner
        if isinstance(inner, tf.distribute.DistributedValues):
            return list(inner.values)
        return None

    def grad_state(self, variables: Sequence[Any]) -> list[Any]:
        return []

    def restore_grad_state(self, saved: list[Any]) -> None:
        return None

    def rng_state(self) -> Any:
        return None

    def restore_rng(self, saved: Any) -> None:
        return None
