"""check_keras_model on keras.applications with two heads (issue 10, the zoo).

Real architectures with random weights (weights=None, nothing downloaded), at the
smallest input each accepts (32x32 for all three), wrapped into a functional model
with two heads defined out of sorted name order (main, then aux), compiled with dict
losses and dict loss weights. Keras' step runs BatchNorm in training mode, as fit
does. Deep BatchNorm stacks amplify rounding far beyond the per-element model: on
MobileNetV3Small Keras' compiled step and the eager per-loss gradients differ by
~5e-3 on elements of ~100, which is rounding (the same gradient computed eagerly and
in a tf.function differs as much); the verdict must come from the rounding measured
at check time, while planted bugs on the same model stay mismatches: a compute_loss
that counts one head twice, one that detaches a head, and Keras' own sorted-name
pairing of list loss weights with dict outputs (keras#20596).

Every check leaves the model's variables (BatchNorm statistics included) and the
optimizer's state bit for bit as they were. Slow: each check runs a deep network's
train step (traced) and its eager reference.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck.keras_api import check_keras_model  # noqa: E402

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)

N = 8
SIZE = 32
LOSSES = {"main": "mse", "aux": "categorical_crossentropy"}
WEIGHTS = {"main": 1.0, "aux": 0.3}


def mobilenet_v3_small():
    return keras.applications.MobileNetV3Small(
        input_shape=(SIZE, SIZE, 3), minimalistic=True, weights=None, include_top=False
    )


def efficientnet_b0():
    return keras.applications.EfficientNetB0(
        input_shape=(SIZE, SIZE, 3), weights=None, include_top=False
    )


def resnet50_v2():
    return keras.applications.ResNet50V2(
        input_shape=(SIZE, SIZE, 3), weights=None, include_top=False
    )


def two_heads(backbone, cls=keras.Model, *, loss_weights=None):
    """The backbone, global pooling and two heads defined as main, then aux (sorted
    order is aux, main); compiled with dict losses and weights unless told."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(backbone()(inp))
    outputs = {
        "main": keras.layers.Dense(1, name="main")(h),
        "aux": keras.layers.Dense(3, activation="softmax", name="aux")(h),
    }
    m = cls(inp, outputs)
    m.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=dict(LOSSES),
        loss_weights=dict(WEIGHTS) if loss_weights is None else loss_weights,
    )
    return m


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, SIZE, SIZE, 3)).astype("float32")
    y = {
        "main": (3 * rng.standard_normal((N, 1))).astype("float32"),
        "aux": np.eye(3, dtype="float32")[rng.integers(0, 3, N)],
    }
    sw_main = rng.uniform(0.2, 2.0, N).astype("float32")
    sw_main[::3] = 0.0
    sw = {"main": sw_main, "aux": rng.uniform(0.2, 2.0, N).astype("float32")}
    return x, y, sw


def state(m) -> list[np.ndarray]:
    """The model's variables (BatchNorm statistics included) and the optimizer's."""
    return [v.numpy().copy() for v in [*m.variables, *m.optimizer.variables]]


def unchanged(before, m) -> bool:
    after = state(m)
    return len(before) == len(after) and all(
        np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )


def trained(m):
    """One real fit step first: the optimizer's slots exist and are non-zero."""
    x, y, _ = data(seed=1)
    m.fit(x, y, batch_size=N, epochs=1, verbose=0)
    assert int(m.optimizer.iterations.numpy()) == 1
    return m


@pytest.fixture(scope="module")
def mobilenet():
    return trained(two_heads(mobilenet_v3_small))


# --------------------------------------------------------------------- correct
def test_mobilenet_v3_small_two_heads_pass(mobilenet):
    x, y, _ = data()
    before = state(mobilenet)
    report = check_keras_model(mobilenet, x, y)
    assert report.passed, report.message()
    assert report.flow.losses == ["main", "aux"]
    assert unchanged(before, mobilenet)


def test_mobilenet_v3_small_with_sample_weight_passes(mobilenet):
    x, y, sw = data()
    before = state(mobilenet)
    report = check_keras_model(mobilenet, x, y, sample_weight=sw)
    assert report.passed, report.message()
    assert unchanged(before, mobilenet)


@pytest.mark.parametrize(
    "backbone", [efficientnet_b0, resnet50_v2], ids=["EfficientNetB0", "ResNet50V2"]
)
def test_other_applications_two_heads_pass(backbone):
    m = two_heads(backbone)
    x, y, sw = data()
    before = state(m)
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.passed, report.message()
    assert unchanged(before, m)


# --------------------------------------------------------------------- planted bugs
class AuxTwice(keras.Model):
    """compute_loss adds the weighted aux loss a second time (aux weighs 0.6)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        total = super().compute_loss(x, y, y_pred, sample_weight, **kw)
        sw = (sample_weight or {}).get("aux")
        aux = keras.losses.CategoricalCrossentropy()(y["aux"], y_pred["aux"], sw)
        return total + WEIGHTS["aux"] * aux


class DetachesAux(keras.Model):
    """compute_loss stops the gradient of the aux output."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        y_pred = dict(y_pred, aux=keras.ops.stop_gradient(y_pred["aux"]))
        return super().compute_loss(x, y, y_pred, sample_weight, **kw)


def test_mobilenet_v3_small_head_counted_twice_is_a_mismatch():
    m = two_heads(mobilenet_v3_small, AuxTwice)
    x, y, sw = data()
    before = state(m)
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.status == "mismatch", report.message()
    assert report.location.head == "aux", report.message()
    assert "'aux' with weight 0.6 instead of 0.3" in report.message()
    assert unchanged(before, m)


def test_mobilenet_v3_small_detached_head_is_a_mismatch():
    m = two_heads(mobilenet_v3_small, DetachesAux)
    x, y, _ = data()
    report = check_keras_model(m, x, y)
    assert report.status == "mismatch", report.message()
    assert report.location.head == "aux", report.message()
    assert "applied no gradient to 'aux/kernel', 'aux/bias'" in report.message()


def test_mobilenet_v3_small_sorted_name_pairing_is_a_mismatch():
    """keras#20596: list loss weights [1, 0.3] in definition order (main, aux) are
    paired by Keras in sorted order: aux gets 1, main 0.3."""
    m = two_heads(mobilenet_v3_small, loss_weights=[WEIGHTS["main"], WEIGHTS["aux"]])
    x, y, _ = data()
    report = check_keras_model(m, x, y)
    assert report.status == "mismatch", report.message()
    assert report.location.head in ("main", "aux"), report.message()
    text = report.message()
    assert "loss weights paired as {main: 0.3, aux: 1}" in text, text
    assert "sorted key order ['aux', 'main']" in text, text
    fitted = dict(zip(report.flow.losses, _effective(report), strict=True))
    assert fitted["main"] == pytest.approx(0.3, rel=1e-3)
    assert fitted["aux"] == pytest.approx(1.0, rel=1e-3)


def _effective(report):
    """The fitted weights of the losses in the failing tensor."""
    t = report.flow.tensors.index(report.location.tensor)
    return report.flow.effective_weights[t]
