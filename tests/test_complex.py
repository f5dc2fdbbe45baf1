"""Complex inputs and outputs, checked as their real and imaginary parts.

torch's convention (and TensorFlow's, measured below): the gradient of a real
loss L w.r.t. z is dL/dRe z + i dL/dIm z, so its real view is the gradient w.r.t.
the real pair, which finite differences perturb. complex64 is judged against a
complex128 reference."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck

torch = pytest.importorskip("torch")

CDTYPES = [torch.complex128, torch.complex64]
SIZES = [5, 200]  # full Jacobian, directional


def point(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=dtype, generator=gen)


def mul_fn(w, conj: bool):
    """z * w as a custom Function; its backward must multiply by conj(w)."""

    class Mul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z * w

        @staticmethod
        def backward(ctx, g):
            return g * (w.conj() if conj else w)

    return Mul


@pytest.mark.parametrize("dtype", CDTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_forgotten_conjugate_fails_and_the_right_one_passes(dtype, n):
    z = point(n, dtype).requires_grad_(True)
    w = point(n, dtype, seed=1)
    bad, good = mul_fn(w, conj=False), mul_fn(w, conj=True)
    report = gradcheck.check_gradients(lambda z: bad.apply(z).abs().sum(), z)
    assert report.status == "mismatch"
    assert report.location.tensor == "view_as_real(inputs[0])"
    assert report.location.index is None or report.location.index[-1] in (0, 1)
    ok = gradcheck.check_gradients(lambda z: good.apply(z).abs().sum(), z)
    assert ok.passed, ok.message()
    if dtype == torch.complex64:
        assert ok.reference_dtype == "float64"  # complex128 evaluations
        assert ok.tensors[0].dtype == "float32"


@pytest.mark.parametrize("dtype", CDTYPES)
@pytest.mark.parametrize(
    "fn",
    [
        lambda z: torch.fft.fft(z),  # complex -> complex
        lambda z: (z * z.conj()).real.sum(),  # complex -> real
        lambda z: torch.view_as_real(z.exp()),  # complex -> real pairs
        lambda z: z.abs().log().sum() + z.angle().sin().sum(),
    ],
    ids=["fft", "abs2", "exp", "abs_angle"],
)
def test_correct_complex_functions_pass_every_order_and_mode(dtype, fn):
    z = point(6, dtype).requires_grad_(True)
    for kw in ({}, {"order": 2}, {"ad": "forward"}):
        report = gradcheck.check_gradients(fn, z, **kw)
        assert report.passed, (kw, report.message())


def test_real_to_complex_and_complex_parameters():
    x = point(8, torch.float64).requires_grad_(True)
    assert gradcheck.check_gradients(lambda x: torch.fft.rfft(x), x).passed
    p = torch.nn.Parameter(point(4, torch.complex64))
    data, ptr = p.detach().clone(), p.data_ptr()
    report = gradcheck.check_gradients(lambda: (p * p).abs().sum(), params=[p])
    assert report.passed, report.message()
    assert report.tensors[0].shape == (4, 2)
    assert torch.equal(p.detach(), data) and p.data_ptr() == ptr
    assert p.dtype == torch.complex64


def test_complex64_closure_constant_is_widened_for_the_reference():
    w = point(5, torch.complex64, seed=3)  # captured: promoted in the reference
    z = point(5, torch.complex64).requires_grad_(True)
    report = gradcheck.check_gradients(lambda z: (z * w).abs().sum(), z)
    assert report.passed and report.reference_dtype == "float64"


# ----------------------------------------------------------------- TensorFlow
def _tf():
    return pytest.importorskip("tensorflow")


def test_tf_convention_is_torchs():
    """TensorFlow's gradient of a real loss w.r.t. complex z, measured: dL/dRe z
    + i dL/dIm z (so the real view needs no conjugation)."""
    tf = _tf()
    z0 = np.array([1.0 + 2.0j, -0.5 + 0.3j])
    w = np.array([0.7 - 1.1j, 0.2 + 0.9j])

    def loss(z):
        return tf.reduce_sum(tf.math.real(z * w) + tf.math.imag(z * w) ** 2)

    z = tf.constant(z0)
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = loss(z)
    g = tape.gradient(y, z).numpy()
    h = 1e-6
    num = []
    for k in range(2):
        e = np.zeros(2, complex)
        e[k] = h
        da = (loss(tf.constant(z0 + e)) - loss(tf.constant(z0 - e))).numpy() / (2 * h)
        db = (loss(tf.constant(z0 + 1j * e)) - loss(tf.constant(z0 - 1j * e))).numpy()
        num.append(da + 1j * db / (2 * h))
    np.testing.assert_allclose(g, num, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
def test_tf_complex_inputs_and_outputs(dtype):
    tf = _tf()
    rng = np.random.default_rng(0)
    z = tf.constant(rng.standard_normal(6) + 1j * rng.standard_normal(6), dtype=dtype)
    w = tf.constant(rng.standard_normal(6) + 1j * rng.standard_normal(6), dtype=dtype)

    @tf.custom_gradient
    def mul_no_conj(z, w):
        def grad(g):
            return g * w, g * z  # both conjugates forgotten

        return z * w, grad

    @tf.custom_gradient
    def mul(z, w):
        def grad(g):
            return g * tf.math.conj(w), g * tf.math.conj(z)

        return z * w, grad

    for kw in ({}, {"order": 2}, {"ad": "forward"}):
        r = gradcheck.check_gradients(lambda z, w: tf.signal.fft(z * w), (z, w), **kw)
        assert r.passed, (kw, r.message())
        assert r.reference_dtype == "float64"
    assert gradcheck.check_gradients(lambda z, w: mul(z, w), (z, w)).passed
    bad = gradcheck.check_gradients(lambda z, w: mul_no_conj(z, w), (z, w))
    assert bad.status == "mismatch"
    assert bad.location.tensor.startswith("view_as_real(inputs[")
