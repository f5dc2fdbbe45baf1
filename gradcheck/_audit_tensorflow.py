"""Audit cases for TensorFlow/Keras (imported only when TF is installed and audited)."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradcheck  # noqa: E402
from gradcheck.audit import Case  # noqa: E402


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


def cases(
    i: int, dtype: str, seed: int, rel: float, activations: tuple[str, ...]
) -> Iterator[Case]:
    trunk, main, aux, x, y, c, w = _model(seed, dtype, activations)
    params = {"trunk": trunk, "main": main, "aux": aux}
    bug = _scaled(rel)

    def losses(planted: bool = False, detach: bool = False):
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

    def total(**kw):
        return lambda: sum(w[k] * v for k, v in losses(**kw).items())

    fns = {k: (lambda k=k: losses()[k]) for k in w}
    w_detect = dict(w, aux=w["aux"] or 0.3)
    tag = f"tensorflow/{dtype}/model{i}"
    yield Case(
        f"{tag}/finite_difference",
        "tensorflow",
        dtype,
        "finite_difference",
        True,
        lambda: gradcheck.check_gradients(total(), params=params, seed=seed, label=tag),
    )
    yield Case(
        f"{tag}/finite_difference/planted_scaled_backward_{rel:g}",
        "tensorflow",
        dtype,
        "finite_difference",
        False,
        lambda: gradcheck.check_gradients(
            total(planted=True), params=params, seed=seed, label=tag
        ),
    )
    yield Case(
        f"{tag}/linearity",
        "tensorflow",
        dtype,
        "linearity",
        True,
        lambda: gradcheck.check_linearity(
            total(), fns, w, params=params, seed=seed, label=tag
        ),
    )
    yield Case(
        f"{tag}/linearity/planted_detached_aux_branch",
        "tensorflow",
        dtype,
        "linearity",
        False,
        lambda: gradcheck.check_linearity(
            lambda: losses()["main"] + w_detect["aux"] * losses(detach=True)["aux"],
            fns,
            w_detect,
            params=params,
            seed=seed,
            label=tag,
        ),
    )
