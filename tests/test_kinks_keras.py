"""keras.applications.MobileNetV3Small at a fresh init (issue 10, item 3): deep
ReLU/hard-swish stacks whose finite differences cross kinks at the usual step.
The verdict is passed (smaller steps or a nearby point), or nondifferentiable
where a kink sits at x, never a mismatch; a wrong backward stays a mismatch."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradcheck  # noqa: E402

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


def _case(planted: bool):
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        minimalistic=True,
        weights=None,
        include_top=False,
        include_preprocessing=False,
    )
    pool = keras.layers.GlobalAveragePooling2D()
    main, aux = keras.layers.Dense(3, name="main"), keras.layers.Dense(1, name="aux")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((2, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.standard_normal((2, 3)).astype("float32"))
    model = keras.Sequential([keras.Input((32, 32, 3)), base, pool])
    main.build((None, model.output_shape[-1]))
    aux.build((None, model.output_shape[-1]))

    @tf.custom_gradient
    def scaled(h):  # planted: the backward into the trunk is 0.1% too large
        return tf.identity(h), lambda g: g * (1 + 1e-3)

    def loss():
        f = model(x, training=False)
        if planted:
            f = scaled(f)
        return tf.reduce_mean((main(f) - y) ** 2) + 0.3 * tf.reduce_mean(aux(f) ** 2)

    return [model, main, aux], loss


def test_mobilenetv3small_fresh_init_is_never_a_mismatch():
    params, loss = _case(planted=False)
    report = gradcheck.check_gradients(loss, params=params)
    assert report.status in ("passed", "nondifferentiable"), report.message()


def test_mobilenetv3small_wrong_backward_is_a_mismatch():
    params, loss = _case(planted=True)
    report = gradcheck.check_gradients(loss, params=params)
    assert report.status == "mismatch", report.message()
