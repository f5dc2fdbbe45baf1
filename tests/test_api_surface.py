"""The public face: no framework import, stable names, clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradcheck


def test_import_gradcheck_imports_no_framework():
    code = (
        "import sys, gradcheck, gradcheck.api, gradcheck.backends, gradcheck.numeric.differences\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names():
    for name in (
        "check_gradients",
        "assert_gradients",
        "check_linearity",
        "assert_linearity",
    ):
        assert callable(getattr(gradcheck, name))
    assert set(gradcheck.__all__) <= set(dir(gradcheck))
    assert issubclass(gradcheck.GradientMismatchError, AssertionError)
    for err in (
        gradcheck.InvalidArgumentError,
        gradcheck.UnsupportedInputError,
        gradcheck.NothingToDifferentiateError,
        gradcheck.NonFiniteError,
        gradcheck.MixedFrameworksError,
        gradcheck.ShapeChangedError,
    ):
        assert issubclass(err, gradcheck.GradcheckError)


def test_no_framework_objects_is_a_clear_error():
    with pytest.raises(gradcheck.UnsupportedInputError, match="no torch or TensorFlow"):
        gradcheck.check_gradients(lambda x: x, ([1.0, 2.0],))
    with pytest.raises(gradcheck.UnsupportedInputError, match="callable"):
        gradcheck.check_gradients(3, ())


@pytest.fixture
def torch():
    """torch, or a skip of the test that needs it. A fixture, not an importorskip
    in the class body: that would skip this whole module at collection when torch
    is absent, the framework-free tests above included."""
    return pytest.importorskip("torch")


class TestTorchBadInput:
    def test_nothing_differentiable(self, torch):
        with pytest.raises(
            gradcheck.NothingToDifferentiateError, match="requires_grad=False"
        ):
            gradcheck.check_gradients(lambda x: x.sum(), (torch.randn(3),))
        with pytest.raises(gradcheck.NothingToDifferentiateError, match="int64"):
            gradcheck.check_gradients(lambda: 0, params=[torch.arange(3)])

    def test_nan_and_inf_are_named(self, torch):
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(gradcheck.NonFiniteError, match="NaN"):
            gradcheck.check_gradients(lambda x: (x * float("nan")).sum(), (x,))
        with pytest.raises(gradcheck.NonFiniteError, match="inf"):
            gradcheck.check_gradients(lambda x: x.sum() / 0.0, (x,))
        # a NaN gradient of a finite function (0 * inf in sqrt's backward) is
        # wrong at any tolerance: a mismatch naming the tensor, not an exception
        report = gradcheck.check_gradients(lambda x: torch.sqrt(x * 0).sum(), (x,))
        assert report.status == "mismatch"
        assert report.location.tensor == "inputs[0]"
        assert "NaN" in report.message()

    def test_fn_must_return_a_tensor(self, torch):
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(gradcheck.UnsupportedInputError, match="float"):
            gradcheck.check_gradients(lambda x: x.sum().item(), (x,))
        with pytest.raises(gradcheck.UnsupportedInputError, match="floating-point"):
            gradcheck.check_gradients(lambda x: x.argmax(), (x,))

    def test_shapes_that_change_between_calls(self, torch):
        x = torch.randn(6, dtype=torch.float64, requires_grad=True)
        calls = []

        def fn(x):
            calls.append(1)
            return x[: 6 - len(calls) % 2].sin()

        with pytest.raises(
            gradcheck.ShapeChangedError, match="changed between two calls"
        ):
            gradcheck.check_gradients(fn, (x,), mode="directional")

    def test_disconnected_output(self, torch):
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(gradcheck.GradcheckError, match="do not depend"):
            gradcheck.check_gradients(
                lambda x: x.detach().sin().sum() + 0 * torch.ones(()), (x,)
            )

    def test_lone_tensor_input_is_accepted(self, torch):
        x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        assert gradcheck.check_gradients(lambda x: x.sin().sum(), x).passed

    def test_mixed_frameworks(self, torch):
        tf = pytest.importorskip("tensorflow")
        x = torch.randn(3, requires_grad=True)
        with pytest.raises(gradcheck.MixedFrameworksError, match="torch.*tensorflow"):
            gradcheck.check_gradients(lambda a, b: a.sum(), (x, tf.constant([1.0])))
