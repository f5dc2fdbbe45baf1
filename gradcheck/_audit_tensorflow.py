"""Audit cases for TensorFlow/Keras (imported only when TF is installed and audited)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradcheck.audit import Losses  # noqa: E402


def _scaled(rel: float):
    @tf.custom_gradient
    def scaled(x):
        def grad(g):
            return g * (1 + rel)

        return tf.identity(x), grad

    return scaled


def _model(seed: int, dtype: str, activations: tuple[str, ...]):
    import keras

    rng = np.random.default_rng(seed)
    n_in, width = int(rng.integers(3, 12)), int(rng.integers(4, 32))
    n_cls, batch = int(rng.integers(2, 6)), int(rng.integers(4, 33))
    act = activations[int(rng.integers(len(activations)))]
    keras.utils.set_random_seed(seed)
    inp = keras.Input((n_in,), dtype=dtype)
    h = keras.layers.Dense(width, act, dtype=dtype)(inp)
    h = keras.layers.Dense(width, act, dtype=dtype)(h)
    trunk = keras.Model(inp, h)
    main = keras.layers.Dense(1, dtype=dtype)
    aux = keras.layers.Dense(n_cls, dtype=dtype)
    main.build((None, width))
    aux.build((None, width))
    x = tf.constant(rng.standard_normal((batch, n_in)), dtype=dtype)
    y = tf.constant(rng.standard_normal((batch, 1)), dtype=dtype)
    c = tf.constant(rng.integers(0, n_cls, batch))
    weights = {"main": 1.0, "aux": float(rng.choice([0.0, 1e-3, 0.3, 2.5]))}
    return trunk, main, aux, x, y, c, weights


def build(
    dtype: str, seed: int, rel: float, activations: tuple[str, ...]
) -> tuple[dict[str, Any], Losses, dict[str, float]]:
    """A seeded two-head Keras model, its per-head losses and loss weights."""
    trunk, main, aux, x, y, c, w = _model(seed, dtype, activations)
    bug = _scaled(rel)

    def losses(planted: bool = False, detach: bool = False) -> dict[str, tf.Tensor]:
        h = trunk(x)
        if planted:
            h = bug(h)
        logits = aux(tf.stop_gradient(h) if detach else h)
        return {
            "main": tf.reduce_mean(tf.square(main(h) - y)),
            "aux": tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=c, logits=logits)
            ),
        }

    return {"trunk": trunk, "main": main, "aux": aux}, losses, w
