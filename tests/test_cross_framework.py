"""check_cross_framework: one spec in torch and in Keras, same losses and gradients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import gradcheck  # noqa: E402
from gradcheck import architectures as A  # noqa: E402
from gradcheck.architectures import torch_builder  # noqa: E402
from gradcheck.backends.base import TensorSpec  # noqa: E402
from gradcheck.properties import cross_framework  # noqa: E402
from gradcheck.strategies import architectures, batches  # noqa: E402
from tests.test_locality import SPEC  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.tensorflow]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_same_spec_agrees(dtype):
    report = gradcheck.check_cross_framework(SPEC, dtype=dtype, label="xf")
    assert report.passed, report.message()
    assert report.property == "cross_framework"
    names = [t.name for t in report.tensors]
    # neutral layout: one name per spec parameter, whatever each framework calls it
    assert "lstm/input_kernel" in names and "main_1/kernel" in names
    assert "regularization" in report.notes[0]


def test_neutral_gradients_are_the_adjoint_of_the_layouts():
    """<g_framework, layout(d)> = <neutral(g_framework), d> for any direction d."""
    torch = pytest.importorskip("torch")
    built = A.build_torch(SPEC, "float64")
    model = built.model
    names = [n for n, _ in model.named_parameters()]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(tuple(p.shape)) for p in model.parameters()]
    specs = [
        TensorSpec(n, g.shape, "float64", "cpu", "parameter")
        for n, g in zip(names, grads, strict=True)
    ]
    neutral = cross_framework._to_neutral(SPEC, "torch", model, specs, grads)
    d = {
        layer: {
            k.split("/")[1]: rng.standard_normal(v.shape)
            for k, v in neutral.items()
            if k.startswith(layer + "/")
        }
        for layer in {k.split("/")[0] for k in neutral}
    }
    kinds = {n: layer.kind for n, layer, _ in SPEC.layers()}
    lhs = 0.0
    for name, g in zip(names, grads, strict=True):
        layer, attr = name.split(".", 1)
        lhs += float(
            np.sum(g * torch_builder.torch_params(kinds[layer], d[layer])[attr])
        )
    rhs = sum(
        float(np.sum(neutral[k] * d[k.split("/")[0]][k.split("/")[1]])) for k in neutral
    )
    assert lhs == pytest.approx(rhs, rel=1e-12)
    del torch


def test_a_perturbed_weight_in_one_framework_is_named(monkeypatch):
    real = A.build_keras

    def perturbed(spec, dtype):
        built = real(spec, dtype)
        layer = built.model.get_layer("main_1")
        kernel, bias = layer.get_weights()
        kernel[2, 1] *= 1 + 1e-6
        layer.set_weights([kernel, bias])
        return built

    monkeypatch.setattr(A, "build_keras", perturbed)
    report = gradcheck.check_cross_framework(SPEC, dtype="float64")
    assert report.status == "mismatch"
    assert report.location.head in {"main", "regularization"}
    text = report.message()
    assert "cross-framework" in text and "main" in text


def test_a_different_loss_definition_is_blamed_on_its_head(monkeypatch):
    """A torch MSE that is off by 0.1%: the 'main' loss's value differs."""
    real = torch_builder.per_example_loss

    def wrong(head, y, t):
        out = real(head, y, t)
        return out * 1.001 if head.name == "main" else out

    monkeypatch.setattr(torch_builder, "per_example_loss", wrong)
    report = gradcheck.check_cross_framework(SPEC, dtype="float32")
    assert report.status == "mismatch"
    assert report.location.head == "main"
    with pytest.raises(gradcheck.GradientMismatchError, match="'main' loss differs"):
        gradcheck.assert_cross_framework(SPEC, dtype="float32")


def test_bad_input_is_a_clear_error():
    with pytest.raises(gradcheck.UnsupportedInputError, match="ModelSpec"):
        gradcheck.check_cross_framework({"not": "a spec"})
    with pytest.raises(gradcheck.InvalidArgumentError, match="dtype"):
        gradcheck.check_cross_framework(SPEC, dtype="float16")


def test_a_missing_framework_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real(name, *a),
    )
    with pytest.raises(gradcheck.FrameworkNotInstalledError, match="torch"):
        gradcheck.check_cross_framework(SPEC)


@settings(max_examples=6)
@given(data=st.data(), spec=architectures(max_heads=3, max_units=6))
def test_drawn_specs_agree_in_both_dtypes(data, spec):
    batch = data.draw(batches(spec, max_size=4))
    for dtype in ("float64", "float32"):
        report = gradcheck.check_cross_framework(spec, batch, dtype=dtype)
        assert report.passed, spec.to_code("torch") + "\n" + report.message()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["images", "attention"])
def test_new_layers_agree_in_gradients(name, dtype):
    """Conv2D/depthwise/separable, pools, batchnorm in both modes, residual adds,
    ReLU6/hard-swish/SiLU, masked causal attention: same losses and per-loss
    gradients in the neutral layout (statistics get no gradient in either)."""
    from tests.test_architectures import SPECS, batch_for

    spec = SPECS[name]
    report = gradcheck.check_cross_framework(spec, batch_for(spec), dtype=dtype)
    assert report.passed, report.message()
    names = {t.name for t in report.tensors}
    if name == "images":
        assert {"sep/pointwise_kernel", "dw/depthwise_kernel", "bn/gamma"} <= names
    else:
        assert {"att/query_kernel", "att/output_bias", "aux_1/value_kernel"} <= names
