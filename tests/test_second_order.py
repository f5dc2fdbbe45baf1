"""order=2: the framework's second derivatives against finite differences of its
own first-order gradient (gradgradcheck's question), for inputs, parameters and
the incoming gradient, in torch (float32 and float64) and TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck.errors import InvalidArgumentError

torch = pytest.importorskip("torch")

from tests.test_torch_state import assert_same, build, snapshot  # noqa: E402

DTYPES = [torch.float64, torch.float32]
SIZES = [5, 200]  # full Jacobian, directional


def cube(backward):
    """x**3 as a custom Function whose backward is ``backward(x, g)``."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return backward(x, g)

    return Cube


#: first-order right; its backward uses a detached saved input, so torch's
#: derivative of the gradient w.r.t. x is missing (its second derivative is 0)
DetachedSaved = cube(lambda x, g: 3 * g * x.detach() ** 2)
#: first-order right; the gradient does not depend on the incoming gradient in
#: autograd's eyes (g detached): d(grad)/d(grad_output) is wrong
DetachedUpstream = cube(lambda x, g: 3 * g.detach() * x**2)
Correct = cube(lambda x, g: 3 * g * x**2)


def point(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=dtype, generator=gen).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_detached_saved_input_passes_order_1_and_fails_order_2(dtype, n):
    x = point(n, dtype)
    fn = lambda x: DetachedSaved.apply(x).sin()  # noqa: E731
    assert gradcheck.check_gradients(fn, x).passed
    report = gradcheck.check_gradients(fn, x, order=2)
    assert report.status == "mismatch"
    assert report.location.tensor == "inputs[0]"
    assert (report.order, report.ad) == (2, "reverse")
    assert "order 2" in report.headline()
    if dtype == torch.float32:
        assert report.reference_dtype == "float64"
    with pytest.raises(gradcheck.GradientMismatchError, match="order 2"):
        gradcheck.assert_gradients(fn, x, order=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_correct_second_derivatives_pass(dtype, n):
    x = point(n, dtype)
    report = gradcheck.check_gradients(lambda x: Correct.apply(x).sin(), x, order=2)
    assert report.passed, report.message()
    assert report.order == 2
    names = [t.name for t in report.tensors]
    assert names == ["inputs[0]", "grad_outputs[0]"]


def test_gradient_blind_to_the_incoming_gradient_is_named():
    x = point(6, torch.float64)
    fn = lambda x: DetachedUpstream.apply(x) * 1.0  # noqa: E731
    assert gradcheck.check_gradients(fn, x).passed
    report = gradcheck.check_gradients(fn, x, order=2)
    assert report.status == "mismatch"
    assert report.location.tensor == "grad_outputs[0]"


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_parameters_hessian_vector_products(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).to(dtype)
    xb = torch.randn(8, 4, dtype=dtype)
    loss = lambda: model(xb).pow(2).mean()  # noqa: E731
    report = gradcheck.check_gradients(loss, params=model, order=2, mode="directional")
    assert report.passed, report.message()
    assert {"0.weight", "2.bias", "grad_outputs[0]"} <= {t.name for t in report.tensors}

    class BadAct(torch.nn.Module):  # tanh with a backward torch cannot see through
        def forward(self, h):
            return TanhDetached.apply(h)

    model[1] = BadAct()
    report = gradcheck.check_gradients(loss, params=model, order=2, mode="directional")
    assert report.status == "mismatch"
    assert report.location.tensor in {"0.weight", "0.bias", "2.weight"}


class TanhDetached(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        y = h.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y.detach() ** 2)


def test_once_differentiable_backward_is_a_verdict():
    from torch.autograd.function import once_differentiable

    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * g * x**2

    x = point(5, torch.float64)
    fn = lambda x: Once.apply(x).sum()  # noqa: E731
    assert gradcheck.check_gradients(fn, x).passed
    report = gradcheck.check_gradients(fn, x, order=2)
    assert report.status == "nondifferentiable"
    assert report.location.tensor == "inputs[0]"
    assert any("once_differentiable" in n and "Once" in n for n in report.notes)


def test_backward_without_graph_is_a_verdict():
    def no_graph(x, g):
        with torch.no_grad():
            return 3 * g * x**2

    NoGraph = cube(no_graph)
    x = point(5, torch.float64)
    report = gradcheck.check_gradients(lambda x: NoGraph.apply(x).sum(), x, order=2)
    assert report.status == "nondifferentiable"
    assert any("carries no graph" in n for n in report.notes)


def test_second_order_leaves_the_users_state_alone():
    model = build(torch.float32)
    xb = torch.randn(5, 6)
    before = snapshot(model)
    report = gradcheck.check_gradients(
        lambda: model(xb).pow(2).mean(), params=model, order=2, mode="directional"
    )
    assert report.status in {"passed", "mismatch", "nondifferentiable"}
    assert_same(before, model)

    def boom():
        raise ValueError("boom")

    with pytest.raises(gradcheck.GradcheckError):
        gradcheck.check_gradients(boom, params=model, order=2)
    assert_same(before, model)


@pytest.mark.parametrize(
    "kw", [{"order": 3}, {"order": 0}, {"order": True}, {"ad": "sideways"}]
)
def test_bad_order_or_ad_is_refused(kw):
    x = point(3, torch.float64)
    with pytest.raises(InvalidArgumentError):
        gradcheck.check_gradients(lambda x: x.sum(), x, **kw)


# ----------------------------------------------------------------- TensorFlow
def _tf():
    return pytest.importorskip("tensorflow")


def tf_cube(stop: bool, numpy: bool = False):
    tf = _tf()

    @tf.custom_gradient
    def f(x):
        def grad(g):
            if numpy:  # a gradient function TensorFlow cannot differentiate
                return tf.constant(g.numpy() * 3.0 * x.numpy() ** 2)
            xs = tf.stop_gradient(x) if stop else x
            return g * 3.0 * xs**2

        return x**3, grad

    return f


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", SIZES)
def test_tf_planted_stop_gradient_in_custom_gradient_is_caught(dtype, n):
    tf = _tf()
    x = tf.constant(np.random.default_rng(0).standard_normal(n), dtype=dtype)
    bad, good = tf_cube(stop=True), tf_cube(stop=False)
    assert gradcheck.check_gradients(lambda x: tf.sin(bad(x)), x).passed
    report = gradcheck.check_gradients(lambda x: tf.sin(bad(x)), x, order=2)
    assert report.status == "mismatch"
    assert report.location.tensor == "inputs[0]"
    assert report.framework == "tensorflow" and report.order == 2
    ok = gradcheck.check_gradients(lambda x: tf.sin(good(x)), x, order=2)
    assert ok.passed, ok.message()


def test_tf_gradient_in_numpy_is_a_verdict():
    tf = _tf()
    x = tf.constant(np.linspace(-1, 1, 5))
    f = tf_cube(stop=False, numpy=True)
    report = gradcheck.check_gradients(lambda x: tf.reduce_sum(f(x)), x, order=2)
    assert report.status == "nondifferentiable"


@pytest.mark.parametrize("floatx", ["float32", "float64"])
def test_tf_keras_model_second_order(floatx):
    tf = _tf()
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", dtype=floatx),
            keras.layers.Dense(1, dtype=floatx),
        ]
    )
    xb = tf.constant(np.random.default_rng(1).standard_normal((6, 3)), dtype=floatx)
    before = [v.numpy().copy() for v in model.weights]
    report = gradcheck.check_gradients(
        lambda: tf.reduce_mean(model(xb) ** 2), params=model, order=2
    )
    assert report.passed, report.message()
    assert report.order == 2
    for v, b in zip(model.weights, before, strict=True):
        assert v.numpy().tobytes() == b.tobytes()


def test_tf_moments_second_derivative_finding():
    """A TensorFlow bug the second-order check finds: tf.nn.moments (Keras 3's
    moments on TensorFlow: LayerNormalization, training-mode BatchNormalization)
    takes the variance around tf.stop_gradient(mean). First derivatives are
    right (the dropped term vanishes at the mean), second derivatives are not;
    the same function in torch passes (TensorFlow 2.21)."""
    tf = _tf()
    x64 = np.random.default_rng(0).standard_normal((4, 3))

    def normalized(x):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return tf.reduce_sum(tf.sin(3.0 * (x - mean) * tf.math.rsqrt(var + 1e-3)))

    x = tf.constant(x64)
    assert gradcheck.check_gradients(normalized, x).passed
    report = gradcheck.check_gradients(normalized, x, order=2)
    assert report.status == "mismatch" and report.location.tensor == "inputs[0]"
    xt = torch.tensor(x64, requires_grad=True)
    same = lambda x: torch.sin(  # noqa: E731
        3.0 * torch.nn.functional.layer_norm(x, (3,), eps=1e-3)
    ).sum()
    assert gradcheck.check_gradients(same, xt, order=2).passed
