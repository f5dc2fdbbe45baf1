"""ad="forward" / "both": forward-mode derivatives (torch forward AD, a custom
Function's jvp; TensorFlow's ForwardAccumulator) against finite differences, and
forward against reverse mode."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck.errors import UnsupportedInputError

torch = pytest.importorskip("torch")

from tests.test_torch_state import assert_same, build, snapshot  # noqa: E402

pytest_plugins = ["pytester"]

DTYPES = [torch.float64, torch.float32]
SIZES = [5, 200]  # full Jacobian, directional


def sin_fn(jvp_factor: float = 1.0, backward_factor: float = 1.0):
    """sin as a custom Function with a backward and a jvp, each scaled."""

    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos() * backward_factor

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return t * x.cos() * jvp_factor

    return Sin


def point(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=dtype, generator=gen).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_wrong_jvp_passes_reverse_and_fails_forward(dtype, n):
    Sin = sin_fn(jvp_factor=1.01)
    x = point(n, dtype)
    fn = lambda x: Sin.apply(x) * 2.0  # noqa: E731
    assert gradcheck.check_gradients(fn, x).passed
    report = gradcheck.check_gradients(fn, x, ad="forward")
    assert report.status == "mismatch"
    assert report.location.tensor == "inputs[0]"
    assert report.ad == "forward" and "forward mode" in report.headline()
    both = gradcheck.check_gradients(fn, x, ad="both")
    assert both.status == "mismatch" and both.ad == "both"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_correct_jvp_passes_forward_and_both(dtype, n):
    Sin = sin_fn()
    x = point(n, dtype)
    for ad in ("forward", "both"):
        report = gradcheck.check_gradients(lambda x: Sin.apply(x).exp(), x, ad=ad)
        assert report.passed, report.message()
        assert report.ad == ad
    assert any("forward mode against reverse mode" in n for n in report.notes)


def test_wrong_backward_fails_both():
    Sin = sin_fn(backward_factor=1.01)
    x = point(7, torch.float64)
    fn = lambda x: Sin.apply(x)  # noqa: E731
    assert gradcheck.check_gradients(fn, x, ad="forward").passed
    report = gradcheck.check_gradients(fn, x, ad="both")
    assert report.status == "mismatch"
    assert any("reverse mode failed" in n for n in report.notes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_parameters_forward_mode(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).to(dtype)
    xb = torch.randn(9, 5, dtype=dtype)
    loss = lambda: torch.nn.functional.cross_entropy(  # noqa: E731
        model(xb), torch.arange(9) % 3
    )
    for mode in ("full", "directional"):
        report = gradcheck.check_gradients(loss, params=model, ad="both", mode=mode)
        assert report.passed, report.message()

    class Act(torch.nn.Module):
        def forward(self, h):
            return sin_fn(jvp_factor=0.99).apply(h)

    model[1] = Act()
    assert gradcheck.check_gradients(loss, params=model).passed
    report = gradcheck.check_gradients(
        loss, params=model, ad="forward", mode="directional"
    )
    assert report.status == "mismatch"
    assert report.location.tensor in {"0.weight", "0.bias"}


def test_function_without_jvp_is_refused_by_name():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = point(4, torch.float64)
    with pytest.raises(UnsupportedInputError, match="jvp"):
        gradcheck.check_gradients(lambda x: NoJvp.apply(x), x, ad="forward")


def test_forward_mode_leaves_the_users_state_alone():
    model = build(torch.float32)
    xb = torch.randn(5, 6)
    before = snapshot(model)
    gradcheck.check_gradients(lambda: model(xb).pow(2).mean(), params=model, ad="both")
    assert_same(before, model)


def test_fixture_passes_order_and_ad_through(pytester):
    pytester.makepyfile(
        test_fwd="""
import torch


def test_it(gradcheck):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    report = gradcheck.check_gradients(lambda x: x.sin(), x, ad="forward", order=2)
    assert report.passed and report.ad == "forward" and report.order == 2
"""
    )
    from tests.test_plugin import PLUGIN  # the plugin, however it is installed

    result = pytester.runpytest_inprocess(*PLUGIN)
    result.assert_outcomes(passed=1)


# ----------------------------------------------------------------- TensorFlow
def _tf():
    return pytest.importorskip("tensorflow")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", SIZES)
def test_tf_forward_mode_on_correct_functions(dtype, n):
    tf = _tf()
    x = tf.constant(np.random.default_rng(0).standard_normal(n), dtype=dtype)
    for ad in ("forward", "both"):
        report = gradcheck.check_gradients(
            lambda x: tf.tanh(x) * tf.exp(0.3 * x), x, ad=ad
        )
        assert report.passed, report.message()
        assert report.ad == ad


def test_tf_keras_model_forward_mode():
    tf = _tf()
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    xb = tf.constant(np.random.default_rng(1).standard_normal((6, 3)), tf.float32)
    report = gradcheck.check_gradients(
        lambda: tf.reduce_mean(model(xb) ** 2), params=model, ad="both"
    )
    assert report.passed, report.message()


@pytest.mark.parametrize("n", SIZES)
def test_tf_function_custom_gradient_blind_to_upstream_fails_forward(n):
    """TensorFlow's forward mode inside a tf.function differentiates a
    tf.custom_gradient by transposing its gradient function (forward over
    backward); one that stops the gradient through its upstream argument is
    right in reverse mode and silently zero in forward mode."""
    tf = _tf()

    @tf.custom_gradient
    def cube(x):
        def grad(g):
            return tf.stop_gradient(g) * 3.0 * x**2

        return x**3, grad

    compiled = tf.function(cube)
    x = tf.constant(np.random.default_rng(2).standard_normal(n))
    fn = lambda x: tf.sin(compiled(x))  # noqa: E731
    assert gradcheck.check_gradients(fn, x).passed
    report = gradcheck.check_gradients(fn, x, ad="forward")
    assert report.status == "mismatch"
    assert report.location.tensor == "inputs[0]"
