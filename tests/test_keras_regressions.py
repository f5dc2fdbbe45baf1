"""Known Keras multi-output issues (../shared/ANCHORS.md) as checks on the installed
Keras, pinned to what Keras 3.15 does.

Each test states what Keras does here (measured directly, without gradcheck) and
what check_keras_model must say about it: pass where Keras pairs losses, weights,
targets and sample weights with the right outputs, and a mismatch naming the head
where it does not. Every case uses asymmetric losses and values (mse on targets of
scale 3 next to binary cross-entropy on 0/1 targets, weights 1 and 0.3) so a swap
changes the total: keras#20596 went unnoticed because swapping two symmetric losses
did not. Output names are defined out of sorted order (main before aux).

Pinned Keras 3.15.1 behaviour (a test fails when an upgrade changes it):

* keras#20596 / #20346: a list ``loss`` (and a list ``y``) for a model with dict
  outputs is paired in sorted key order, not in the order the model defines its
  outputs: flagged.
* list ``loss_weights`` with dict outputs: paired in sorted key order: flagged.
* a dict ``loss_weights`` next to a list ``loss`` on a list-output model: the dict is
  flattened in sorted key order and paired by position, ignoring the names (found
  while writing these tests): flagged.
* one loss for every output with a dict ``loss_weights``: Keras refuses
  (``loss_weights must match the number of losses``): KerasStepError.
* keras#19740: sum_over_batch_size divides by the number of examples, zeros in
  sample_weight included: passes.
* keras#18993: every ``<output>_loss`` is logged: passes, all compared.
* keras#19780: a list ``loss_weights`` of one on a single output: passes.
* keras#16356: compile() leaves the user's loss dicts as they were.
* one 1-D sample_weight applies to every output: passes.
* class_weight with several outputs: refused by fit, ClassWeightError here.
* keras#16285 (loss scaled by 1/replicas under tf.distribute) needs several
  replicas: check_keras_model runs fit's distributed step under MirroredStrategy
  and compares the all-reduced gradient with the global batch's
  (tests/test_keras_mirrored.py, on 2 logical CPUs in a fresh interpreter).
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck.errors import ClassWeightError, KerasStepError  # noqa: E402
from gradcheck.keras_api import check_keras_model  # noqa: E402

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)

N = 10
LOSSES = {"main": "mse", "aux": "binary_crossentropy"}
WEIGHTS = {"main": 1.0, "aux": 0.3}


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, 3)).astype("float32")
    y = {
        "main": (3 * rng.standard_normal((N, 1))).astype("float32"),
        "aux": rng.integers(0, 2, (N, 1)).astype("float32"),
    }
    sw = rng.uniform(0.2, 2.0, N).astype("float32")
    sw[::2] = 0.0
    return x, y, sw


def model(structure: str = "dict", names: tuple[str, str] = ("main", "aux")):
    """Two heads: the first regression, the second a sigmoid probability."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(
        6,
        activation="tanh",
        name="trunk",
        kernel_regularizer=keras.regularizers.L2(0.02),
    )(inp)
    first = keras.layers.Dense(1, name=names[0])(h)
    second = keras.layers.Dense(1, activation="sigmoid", name=names[1])(h)
    if structure == "dict":
        return keras.Model(inp, {names[0]: first, names[1]: second})
    return keras.Model(inp, [first, second])


def per_output(m, x, y):
    """Each output's loss computed by hand, paired by name."""
    out = m(x)
    out = out if isinstance(out, dict) else dict(zip(("main", "aux"), out, strict=True))
    return {
        "main": float(
            keras.losses.mean_squared_error(y["main"], out["main"]).numpy().mean()
        ),
        "aux": float(
            keras.losses.binary_crossentropy(y["aux"], out["aux"]).numpy().mean()
        ),
        "aux_as_mse": float(
            keras.losses.mean_squared_error(y["aux"], out["aux"]).numpy().mean()
        ),
        "main_as_bce": float(
            keras.losses.binary_crossentropy(y["main"], out["main"]).numpy().mean()
        ),
        "reg": float(sum(float(v) for v in m.losses)),
    }


def test_dict_config_is_paired_by_name():
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    assert check_keras_model(m, x, y).passed


def test_list_loss_on_dict_outputs_is_paired_in_sorted_order():
    """keras#20596: Keras applies the list in sorted key order (aux, main)."""
    m = model()
    m.compile(
        optimizer="sgd", loss=["mse", "binary_crossentropy"], loss_weights=WEIGHTS
    )
    x, y, _ = data()
    hand = per_output(m, x, y)
    logs = m.test_on_batch(x, y, return_dict=True)
    assert np.isclose(logs["main_loss"], hand["main_as_bce"], rtol=1e-5)
    assert np.isclose(logs["aux_loss"], hand["aux_as_mse"], rtol=1e-5)

    report = check_keras_model(m, x, y)
    assert report.status == "mismatch"
    assert report.location.head in ("main", "aux")
    text = report.message()
    assert "Keras paired losses with outputs out of order" in text
    assert "sorted key order ['aux', 'main']" in text


def test_list_loss_in_sorted_definition_order_passes():
    """Where the definition order is the sorted order the pairing is right."""
    m = model(names=("a_main", "b_aux"))
    m.compile(
        optimizer="sgd", loss=["mse", "binary_crossentropy"], loss_weights=[1, 0.3]
    )
    x, y, _ = data()
    report = check_keras_model(m, x, {"a_main": y["main"], "b_aux": y["aux"]})
    assert report.passed, report.message()


def test_list_loss_weights_on_dict_outputs_are_paired_in_sorted_order():
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=[1.0, 0.3])
    x, y, _ = data()
    hand = per_output(m, x, y)
    logs = m.test_on_batch(x, y, return_dict=True)
    sorted_pairing = 0.3 * hand["main"] + 1.0 * hand["aux"] + hand["reg"]
    assert np.isclose(logs["loss"], sorted_pairing, rtol=1e-5)

    report = check_keras_model(m, x, y)
    assert report.status == "mismatch"
    text = report.message()
    assert "loss weights paired as {main: 0.3, aux: 1}" in text
    assert "'main' with weight 0.3 instead of 1" in text


def test_list_targets_on_dict_outputs_are_paired_in_sorted_order():
    """keras#20346: y as a list is packed into the dict in sorted key order."""
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    report = check_keras_model(m, x, [y["main"], y["aux"]])
    assert report.status == "mismatch"
    text = report.message()
    assert "Keras paired targets with outputs out of order" in text
    assert "y given as a list for a dict-output model" in text


def test_dict_loss_weights_next_to_a_list_loss_ignore_the_names():
    """List outputs, loss as a list, loss_weights as a dict by output name: Keras
    flattens the dict (sorted: aux, main) and pairs it by position."""
    m = model("list")
    m.compile(
        optimizer="sgd", loss=["mse", "binary_crossentropy"], loss_weights=dict(WEIGHTS)
    )
    x, y, _ = data()
    targets = [y["main"], y["aux"]]
    hand = per_output(m, x, y)
    logs = m.test_on_batch(x, targets, return_dict=True)
    assert np.isclose(logs["loss"], 0.3 * hand["main"] + hand["aux"] + hand["reg"])

    report = check_keras_model(m, x, targets)
    assert report.status == "mismatch"
    assert report.location.head in ("main", "aux")
    assert "loss_weights were matched to outputs out of order" in report.message()


def test_one_loss_with_dict_weights_is_refused_by_keras():
    m = model()
    m.compile(optimizer="sgd", loss="mse", loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    with pytest.raises(KerasStepError, match="loss_weights` must match"):
        check_keras_model(m, x, y)


def test_sample_weight_zeros_keep_the_batch_denominator():
    """keras#19740: sum_over_batch_size = sum(sw * loss) / N, zeros included."""
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, sw = data()
    out = m(x)
    per_example = keras.losses.mean_squared_error(y["main"], out["main"]).numpy()
    logs = m.test_on_batch(
        x, y, sample_weight={"main": sw, "aux": sw}, return_dict=True
    )
    assert np.isclose(logs["main_loss"], np.sum(sw * per_example) / N, rtol=1e-5)
    assert not np.isclose(logs["main_loss"], np.sum(sw * per_example) / sw.sum())

    report = check_keras_model(m, x, y, sample_weight={"main": sw, "aux": sw})
    assert report.passed, report.message()


def test_every_output_loss_is_logged_and_compared():
    """keras#18993: per-output losses are logged (unweighted), so all are compared."""
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    logs = m.test_on_batch(x, y, return_dict=True)
    assert {"loss", "main_loss", "aux_loss"} <= set(logs)
    report = check_keras_model(m, x, y)
    assert report.passed
    assert not any("did not report" in n or "no per-output" in n for n in report.notes)


@pytest.mark.parametrize("weights", [[0.5], 0.5, {"out": 0.5}])
def test_loss_weights_on_a_single_output(weights):
    """keras#19780: a one-element list (or a float, or a dict) weights the loss."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    m = keras.Model(inp, keras.layers.Dense(1, name="out")(inp))
    m.compile(optimizer="sgd", loss="mse", loss_weights=weights)
    x, y, _ = data()
    hand = float(keras.losses.mean_squared_error(y["main"], m(x)).numpy().mean())
    assert np.isclose(
        m.test_on_batch(x, y["main"], return_dict=True)["loss"], 0.5 * hand
    )
    assert check_keras_model(m, x, y["main"]).passed


def test_compile_leaves_the_user_dicts_alone():
    """keras#16356: compile() and the check must not reorder or fill the dicts."""
    loss = {"main": "mse", "aux": "binary_crossentropy"}
    weights = {"aux": 0.3, "main": 1.0}
    m = model()
    m.compile(optimizer="sgd", loss=loss, loss_weights=weights)
    x, y, _ = data()
    assert check_keras_model(m, x, y).passed
    assert list(loss.items()) == [("main", "mse"), ("aux", "binary_crossentropy")]
    assert list(weights.items()) == [("aux", 0.3), ("main", 1.0)]


def test_one_sample_weight_applies_to_every_output():
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, sw = data()
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.passed, report.message()


def test_class_weight_needs_a_single_output():
    m = model()
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    with pytest.raises(ClassWeightError, match="single output"):
        check_keras_model(m, x, y, class_weight={0: 1.0, 1: 5.0})


def test_a_nan_gradient_in_keras_step_with_finite_losses_is_a_mismatch():
    """A step whose gradient is NaN where every loss's own gradient is finite
    computes something other than the weighted sum (the audit met it as
    keras#20596 handing a crossentropy a linear output): a verdict naming the
    weight, not an error. Here compute_loss adds 1e-3 * sqrt(z) with z = 0 and
    dz/dw = 1: value 0, gradient inf."""

    class NanStep(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
            loss = super().compute_loss(x, y, y_pred, sample_weight, **kw)
            w = self.get_layer("trunk").kernel
            z = keras.ops.sum(w) - keras.ops.stop_gradient(keras.ops.sum(w))
            return loss + 1e-3 * keras.ops.sqrt(z)  # value 0, gradient inf

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(6, activation="tanh", name="trunk")(inp)
    m = NanStep(inp, {"main": keras.layers.Dense(1, name="main")(h)})
    m.compile(optimizer="sgd", loss={"main": "mse"})
    x, y, _ = data()
    report = check_keras_model(m, x, {"main": y["main"]})
    assert report.status == "mismatch", report.message()
    assert report.location.tensor.startswith("trunk")
    assert "NaN/Inf gradient" in report.message()
