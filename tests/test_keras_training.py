"""check_keras_model: Keras' own train step against the compile configuration.

Correct models pass (dict outputs defined out of sorted order, list outputs, one
loss for every output, asymmetric losses and weights including 0, sample weights
with zeros, kernel and activity regularizers, dropout, BatchNorm, LSTM, eager and
XLA steps, mixed precision); planted bugs in an overridden compute_loss/train_step
fail with a message naming the head, the parameter and the property; the user's
model, optimizer (slots, iterations) and metrics survive every check bit for bit;
what cannot be checked raises a clear GradcheckError. The torch Keras backend runs
in a subprocess (KERAS_BACKEND is fixed when keras is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck import api  # noqa: E402
from gradcheck.errors import (  # noqa: E402
    ClassWeightError,
    GradcheckError,
    GradientMismatchError,
    InvalidArgumentError,
    KerasStepError,
    NotCompiledError,
    UnsupportedInputError,
)
from gradcheck.keras_api import assert_keras_model, check_keras_model  # noqa: E402

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)

#: definition order; sorted order (aux, extra, main) differs
HEADS = ("main", "aux", "extra")
#: asymmetric on purpose: swapping two losses or two weights changes the total
LOSSES = {"main": "mse", "aux": "binary_crossentropy", "extra": "mae"}
WEIGHTS = {"main": 1.0, "aux": 0.3, "extra": 0.0}
N = 12


def data(seed: int = 0) -> tuple[np.ndarray, dict, dict]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, 4)).astype("float32")
    y = {
        "main": (3 * rng.standard_normal((N, 1))).astype("float32"),
        "aux": rng.integers(0, 2, (N, 1)).astype("float32"),
        "extra": rng.standard_normal((N, 2)).astype("float32"),
    }
    sw_main = rng.uniform(0.2, 2.0, N).astype("float32")
    sw_main[::3] = 0.0  # zeros: the denominator stays N (sum_over_batch_size)
    sw = {
        "main": sw_main,
        "aux": rng.uniform(0.2, 2.0, N).astype("float32"),
        "extra": np.ones(N, "float32"),
    }
    return x, y, sw


def model(
    structure: str = "dict",
    cls: type | None = None,
    *,
    regularized: bool = True,
    dropout: bool = False,
    batchnorm: bool = False,
    seed: int = 0,
):
    """Three heads on a shared trunk, outputs defined as main, aux, extra."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    reg = (
        {
            "kernel_regularizer": keras.regularizers.L2(0.01),
            "activity_regularizer": keras.regularizers.L1(0.01),
        }
        if regularized
        else {}
    )
    h = keras.layers.Dense(8, activation="tanh", name="trunk", **reg)(inp)
    if batchnorm:
        h = keras.layers.BatchNormalization(name="bn")(h)
    if dropout:
        h = keras.layers.Dropout(0.4, name="drop")(h)
    outs = {
        "main": keras.layers.Dense(1, name="main")(h),
        "aux": keras.layers.Dense(1, activation="sigmoid", name="aux")(h),
        "extra": keras.layers.Dense(2, name="extra")(h),
    }
    out = outs if structure == "dict" else [outs[k] for k in HEADS]
    return (cls or keras.Model)(inp, out)


def compiled(structure: str = "dict", cls: type | None = None, **kw):
    m = model(structure, cls, **kw)
    m.compile(optimizer="adam", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    return m


@pytest.fixture(scope="module")
def dict_model():
    return compiled("dict")


def state(m) -> dict[str, list[np.ndarray]]:
    """Every piece of a model's numeric state."""
    return {
        "variables": [v.numpy().copy() for v in m.variables],
        "optimizer": [v.numpy().copy() for v in m.optimizer.variables],
        "metrics": [v.numpy().copy() for v in m.metrics_variables],
    }


def same(a: dict, b: dict) -> bool:
    return all(
        len(a[k]) == len(b[k])
        and all(np.array_equal(u, v) for u, v in zip(a[k], b[k], strict=True))
        for k in a
    )


# --------------------------------------------------------------------- correct
def test_dict_outputs_out_of_sorted_order_pass(dict_model):
    x, y, sw = data()
    report = check_keras_model(dict_model, x, y, sample_weight=sw)
    assert report.passed, report.message()
    assert report.property == "keras_training"
    assert report.framework == "keras/tensorflow"
    assert report.flow.losses == ["main", "aux", "extra", "regularization"]
    assert report.flow.weights == [1.0, 0.3, 0.0, 1.0]
    assert report.error <= 0.5 * report.tolerance  # not a near miss
    assert any("recording optimizer" in n and "Adam" in n for n in report.notes)


class CountsTraces(keras.Model):
    """train_step's Python body runs when the step is traced, not when the traced
    step is called: the counter counts traces."""

    traces = 0

    def train_step(self, data):
        type(self).traces += 1
        return super().train_step(data)


def test_same_model_again_reuses_the_traced_step():
    m = compiled("dict", CountsTraces)
    user_function = m.train_function
    x, y, sw = data(seed=1)
    first = check_keras_model(m, x, y, sample_weight=sw)
    assert first.passed, first.message()
    # TensorFlow traces a function that creates variables on its first call twice
    traced = CountsTraces.traces
    assert traced >= 1
    for seed in (1, 2):  # other values, same shapes: no retrace
        x, y, sw = data(seed=seed)
        report = check_keras_model(m, x, y, sample_weight=sw)
        assert report.passed, report.message()
        assert report.cost["train_steps"] == 1.0
    assert CountsTraces.traces == traced
    assert m.train_function is user_function  # the user's step was not replaced
    m.compile(optimizer="adam", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    assert check_keras_model(m, x, y, sample_weight=sw).passed
    assert CountsTraces.traces > traced  # compile() drops traced steps: traced again


def test_list_outputs_with_list_config_pass():
    m = model("list")
    m.compile(
        optimizer="sgd",
        loss=[LOSSES[h] for h in HEADS],
        loss_weights=[WEIGHTS[h] for h in HEADS],
    )
    x, y, sw = data()
    report = check_keras_model(
        m, x, [y[h] for h in HEADS], sample_weight=[sw[h] for h in HEADS]
    )
    assert report.passed, report.message()


def test_list_outputs_with_dict_config_and_dict_targets_pass():
    m = model("list")
    m.compile(optimizer="sgd", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    x, y, _ = data()
    report = check_keras_model(m, x, y)
    assert report.passed, report.message()


def test_one_loss_for_every_output_and_one_sample_weight_for_all():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="gelu", name="trunk")(inp)
    m = keras.Model(
        inp,
        {
            "zeta": keras.layers.Dense(1, name="zeta")(h),
            "alpha": keras.layers.Dense(1, name="alpha")(h),
        },
    )
    m.compile(optimizer="sgd", loss="huber")
    x, y, sw = data()
    targets = {"zeta": y["main"], "alpha": 0.1 * y["main"]}
    report = check_keras_model(m, x, targets, sample_weight=sw["main"])
    assert report.passed, report.message()
    assert report.flow.losses == ["zeta", "alpha"]


def test_single_output_with_class_weight():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = keras.layers.Dense(5, activation="relu")(inp)
    m = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="p")(h))
    m.compile(optimizer="sgd", loss="binary_crossentropy", loss_weights=[0.5])
    x, y, _ = data()
    report = check_keras_model(m, x, y["aux"], class_weight={0: 1.0, 1: 4.0})
    assert report.passed, report.message()


def test_dropout_and_batchnorm_replay_the_same_step():
    m = compiled("dict", dropout=True, batchnorm=True)
    x, y, sw = data()
    m.fit(x, y, batch_size=6, epochs=1, verbose=0)
    before = state(m)
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.passed, report.message()
    assert same(before, state(m))  # BatchNorm statistics and seed states too


class UnseededNoise(keras.layers.Layer):
    """Training-mode noise from TensorFlow's global generator, not a SeedGenerator:
    every run of the step draws anew."""

    def call(self, x, training=False):
        if training:
            return x + 0.1 * tf.random.normal(tf.shape(x))
        return x


def test_a_step_that_draws_anew_is_nondeterministic_not_passed():
    """Its replay differs, so the measured rounding (which would include the
    draws) is not used to pass it."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name="x")
    h = UnseededNoise()(keras.layers.Dense(8, activation="tanh", name="trunk")(inp))
    m = keras.Model(
        inp,
        {
            "main": keras.layers.Dense(1, name="main")(h),
            "aux": keras.layers.Dense(1, activation="sigmoid", name="aux")(h),
        },
    )
    m.compile(
        optimizer="adam",
        loss={"main": "mse", "aux": "binary_crossentropy"},
        loss_weights={"main": 1.0, "aux": 0.3},
    )
    x, y, _ = data()
    report = check_keras_model(m, x, {"main": y["main"], "aux": y["aux"]})
    assert report.status == "nondeterministic", report.message()
    assert "measured spread" not in report.tolerance_reason


def test_stacked_lstm_has_no_false_alarm():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3), name="seq")
    h = keras.layers.LSTM(16, return_sequences=True, name="lstm1")(inp)
    h = keras.layers.LSTM(16, name="lstm2")(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    m = keras.Model(
        inp,
        {
            "main": keras.layers.Dense(1, name="main")(h),
            "aux": keras.layers.Dense(3, activation="softmax", name="aux")(h),
        },
    )
    m.compile(
        optimizer="adam",
        loss={"main": "mse", "aux": "categorical_crossentropy"},
        loss_weights={"main": 1.0, "aux": 2.5},
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 6, 3)).astype("float32")
    y = {
        "main": rng.standard_normal((N, 1)).astype("float32"),
        "aux": np.eye(3, dtype="float32")[rng.integers(0, 3, N)],
    }
    report = check_keras_model(m, x, y)
    assert report.passed, report.message()
    assert report.error <= 0.5 * report.tolerance


@pytest.mark.parametrize(
    "options", [{"run_eagerly": True}, {"jit_compile": True}], ids=["eager", "xla"]
)
def test_eager_and_xla_steps_pass(options):
    m = model("dict", regularized=False)
    m.compile(
        optimizer="rmsprop", loss=dict(LOSSES), loss_weights=dict(WEIGHTS), **options
    )
    x, y, sw = data()
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.passed, report.message()
    how = "eagerly" if options.get("run_eagerly") else "XLA"
    assert any(how in n for n in report.notes)


def test_mixed_precision_uses_the_loss_scale():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        m = model("dict", regularized=False)
        m.compile(optimizer="adam", loss=dict(LOSSES), loss_weights=dict(WEIGHTS))
    finally:
        keras.config.set_dtype_policy(previous)
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y, sw = data()
    m.fit(x, y, batch_size=6, epochs=1, verbose=0)
    before = state(m)
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.passed, report.message()
    assert any("LossScaleOptimizer" in n for n in report.notes)
    assert same(before, state(m))  # the dynamic scale and its counter too


# --------------------------------------------------------------------- planted bugs
class DropsAux(keras.Model):
    """compute_loss forgets the aux head."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        sw = sample_weight or {}
        total = keras.losses.MeanSquaredError()(
            y["main"], y_pred["main"], sw.get("main")
        )
        return total + keras.ops.sum(self.losses)


class AuxTwice(keras.Model):
    """compute_loss adds the (weighted) aux loss a second time."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        total = super().compute_loss(x, y, y_pred, sample_weight, **kw)
        sw = (sample_weight or {}).get("aux")
        aux = keras.losses.BinaryCrossentropy()(y["aux"], y_pred["aux"], sw)
        return total + 0.3 * aux


class SwapsTargets(keras.Model):
    """compute_loss hands main's target to aux and aux's to main."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
        swapped = dict(y, main=y["aux"], aux=y["main"])
        return super().compute_loss(x, swapped, y_pred, sample_weight, **kw)


def _step(model, data, transform):
    x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        y_pred = transform(model(x, training=True))
        loss = model.compute_loss(x, y, y_pred, sw)
    grads = tape.gradient(loss, model.trainable_variables)
    return x, y, sw, y_pred, grads


class StopsAux(keras.Model):
    """train_step stops the gradient of the aux output."""

    def train_step(self, data):
        def stop(p):
            return dict(p, aux=tf.stop_gradient(p["aux"]))

        x, y, sw, y_pred, grads = _step(self, data, stop)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True)
        )
        return self.compute_metrics(x, y, y_pred, sw)


class ScalesGrads(keras.Model):
    """train_step scales every gradient by 1.01 (a 1% bug)."""

    def train_step(self, data):
        x, y, sw, y_pred, grads = _step(self, data, lambda p: p)
        grads = [g * 1.01 for g in grads]
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True)
        )
        return self.compute_metrics(x, y, y_pred, sw)


class NeverApplies(keras.Model):
    """train_step computes the loss and returns without an update."""

    def train_step(self, data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        return {"loss": self.compute_loss(x, y, self(x, training=True), sw)}


PLANTED = [
    (DropsAux, "aux", "'aux' not at all"),
    (AuxTwice, "aux", "'aux' with weight 0.6 instead of 0.3"),
    (SwapsTargets, None, "Keras paired targets with outputs out of order"),
    (StopsAux, "aux", "applied no gradient to 'aux/kernel', 'aux/bias'"),
    (ScalesGrads, "main", "with weight 1.01 instead of 1"),
    (NeverApplies, None, "applied no gradient to any of the"),
]


@pytest.mark.parametrize(
    "cls,head,says", PLANTED, ids=[c.__name__ for c, _, _ in PLANTED]
)
def test_planted_bug_names_head_parameter_and_property(cls, head, says):
    m = compiled("dict", cls)
    x, y, sw = data()
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.status == "mismatch"
    message = report.message()
    assert "keras-training check FAILED" in message
    assert says in message, message
    loc = report.location
    assert loc is not None and loc.head in HEADS
    if head is not None:
        assert loc.head == head, message
    assert f"of loss '{loc.head}'" in message
    variables = {v.path for v in m.trainable_variables}
    assert loc.tensor in variables and f"'{loc.tensor}'" in message
    # caught with this model's rounding measured (the bug is in both runs of the
    # user's step, so it does not widen the tolerance)
    assert "measured spread between equivalent computations" in message
    assert not m.run_eagerly
    with pytest.raises(GradientMismatchError) as info:
        assert_keras_model(m, x, y, sample_weight=sw)
    assert info.value.report.location.tensor == loc.tensor


class LogsLossWithoutPenalties(keras.Model):
    """The gradient is right; the logged loss leaves out the regularization."""

    def train_step(self, data):
        x, y, sw, y_pred, grads = _step(self, data, lambda p: p)
        self.optimizer.apply_gradients(
            zip(grads, self.trainable_variables, strict=True)
        )
        total = self.compute_loss(x, y, y_pred, sw) - keras.ops.sum(self.losses)
        self._loss_tracker.update_state(total)
        return self.compute_metrics(x, y, y_pred, sw)


@pytest.mark.parametrize(
    "options",
    [{}, {"jit_compile": True}, {"run_eagerly": True}],
    ids=["graph", "xla", "eager"],
)
def test_measured_rounding_alone_judges_the_step(options):
    """With the prior switched off (rtol=1e-12: the per-element rounding model
    allows almost nothing), the tolerance is the rounding measured at check time
    on equivalent computations: a correct model (BatchNorm in training mode,
    regularizers, sample weights) passes, and a head counted twice is still a
    mismatch far beyond it (the bug is in both runs of the user's step)."""
    x, y, sw = data()
    for cls, passes in ((None, True), (AuxTwice, False)):
        m = model("dict", cls, batchnorm=True)
        m.compile(
            optimizer="adam", loss=dict(LOSSES), loss_weights=dict(WEIGHTS), **options
        )
        report = check_keras_model(m, x, y, sample_weight=sw, rtol=1e-12)
        assert "measured spread between equivalent computations" in (
            report.tolerance_reason
        )
        said = report.notes[0]
        assert said.startswith("the per-element rounding model allowed"), said
        if passes:
            assert report.passed, report.message()
            assert said.endswith("the gradients agree."), said
        else:
            assert report.status == "mismatch", report.message()
            assert report.location.head == "aux", report.message()
            assert report.error > 100 * report.tolerance
            assert said.endswith("they still differ."), said


def test_a_wrong_reported_loss_alone_is_a_mismatch():
    m = compiled("dict", LogsLossWithoutPenalties)
    x, y, sw = data()
    report = check_keras_model(m, x, y, sample_weight=sw)
    assert report.status == "mismatch"
    assert report.location.tensor == "loss"
    assert "keras-training check FAILED (mismatch) at 'loss'" in report.message()
    assert "it equals the total without the regularization" in report.message()
    assert all(t.status == "passed" for t in report.tensors)  # gradient is right


class Subclassed(keras.Model):
    """No functional graph: outputs as a list, an add_loss penalty, dropout."""

    def __init__(self):
        super().__init__()
        self.trunk = keras.layers.Dense(6, activation="tanh")
        self.drop = keras.layers.Dropout(0.3)
        self.main = keras.layers.Dense(1)
        self.aux = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x, training=False):
        h = self.drop(self.trunk(x), training=training)
        self.add_loss(0.01 * keras.ops.sum(h**2))
        return [self.main(h), self.aux(h)]


def test_subclassed_model_with_add_loss_passes():
    keras.utils.set_random_seed(0)
    m = Subclassed()
    m.compile(
        optimizer="adam", loss=["mse", "binary_crossentropy"], loss_weights=[1, 0.3]
    )
    x, y, _ = data()
    with pytest.raises(UnsupportedInputError, match="not built"):
        check_keras_model(m, x, [y["main"], y["aux"]])
    m(x)
    report = check_keras_model(m, x, [y["main"], y["aux"]])
    assert report.passed, report.message()
    assert report.flow.losses == ["output_0", "output_1", "regularization"]
    # Keras names these metrics after the losses: they were still compared
    assert not any("per-output" in n for n in report.notes)


# --------------------------------------------------------------------- state
def _fit_twice(m, x, y):
    for seed in (1, 2):
        _, y_other, _ = data(seed)
        m.fit(x, y_other, batch_size=N, epochs=1, verbose=0)
    return m


@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum"])
def test_user_state_is_bit_identical_after_pass_fail_and_raise(optimizer):
    def make_optimizer():
        if optimizer == "adam":
            return keras.optimizers.Adam(1e-2)
        return keras.optimizers.SGD(1e-2, momentum=0.9)

    x, y, sw = data()
    good, twin = compiled("dict"), compiled("dict")
    bad = compiled("dict", AuxTwice)
    for m in (good, twin, bad):
        m.compile(
            optimizer=make_optimizer(),
            loss=dict(LOSSES),
            loss_weights=dict(WEIGHTS),
            metrics={"aux": ["accuracy"], "main": ["mae"]},
        )
        _fit_twice(m, x, y)
    assert int(good.optimizer.iterations.numpy()) == 2
    assert any(np.any(v.numpy() != 0) for v in good.optimizer.variables[2:])

    user_opt, user_fn = good.optimizer, good.train_function
    before = state(good)
    assert check_keras_model(good, x, y, sample_weight=sw).passed
    with pytest.raises(KerasStepError):  # Keras' own step raises inside the check
        check_keras_model(good, x, y, sample_weight=[sw[h] for h in HEADS])
    with pytest.raises(InvalidArgumentError):
        check_keras_model(good, x, {"main": y["main"]})
    assert same(before, state(good))
    assert good.optimizer is user_opt and good.train_function is user_fn
    assert not good.stop_training

    bad_before, bad_fn = state(bad), bad.train_function
    assert not check_keras_model(bad, x, y, sample_weight=sw).passed
    assert same(bad_before, state(bad))
    # the failing check also ran the step eagerly to measure its rounding
    assert bad.train_function is bad_fn and not bad.run_eagerly

    # the next real step is exactly the step of a twin that was never checked
    good.fit(x, y, batch_size=N, epochs=1, verbose=0)
    twin.fit(x, y, batch_size=N, epochs=1, verbose=0)
    assert same(state(good), state(twin))


# --------------------------------------------------------------------- errors
def test_uncompiled_model_is_refused():
    with pytest.raises(NotCompiledError, match="not compiled"):
        check_keras_model(model("dict"), *data()[:2])


def test_model_compiled_without_loss_is_refused():
    m = model("dict")
    m.compile(optimizer="sgd")
    with pytest.raises(NotCompiledError, match="without loss="):
        check_keras_model(m, *data()[:2])


def test_class_weight_with_several_outputs_is_refused(dict_model):
    x, y, _ = data()
    with pytest.raises(ClassWeightError, match="single-output models only"):
        check_keras_model(dict_model, x, y, class_weight={0: 1.0, 1: 2.0})


def test_not_a_keras_model_is_refused():
    with pytest.raises(UnsupportedInputError, match="compiled keras.Model"):
        check_keras_model(lambda x: x, np.zeros((2, 1)), np.zeros((2, 1)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda x, y: (x, {"main": y["main"], "extra": y["extra"]}), r"\['aux'\]"),
        (lambda x, y: (x, dict(y, other=y["main"])), "'other'"),
        (lambda x, y: (x, [y["main"], y["aux"]]), "list of 2 but the model has 3"),
        (lambda x, y: (x[:5], y), "share the batch size"),
        (lambda x, y: ([x, x], y), "model's inputs are"),
    ],
    ids=["missing-target", "unknown-target", "short-list", "batch", "inputs"],
)
def test_data_that_does_not_fit_the_model_is_named(dict_model, make, match):
    x, y, _ = data()
    x, y = make(x, y)
    with pytest.raises(InvalidArgumentError, match=match):
        check_keras_model(dict_model, x, y)


def test_failed_keras_step_leaves_the_model_trainable():
    m = compiled("list")
    x, y, sw = data()
    targets = [y[h] for h in HEADS]
    with pytest.raises(KerasStepError, match="pass a list in output order"):
        check_keras_model(m, x, targets, sample_weight=sw)  # Keras: KeyError 0
    logs = m.train_on_batch(x, targets, return_dict=True)
    assert {"main_loss", "aux_loss", "extra_loss"} <= set(logs)


def test_sample_weight_and_class_weight_together_are_refused(dict_model):
    x, y, sw = data()
    with pytest.raises(InvalidArgumentError, match="not both"):
        check_keras_model(dict_model, x, y, sample_weight=sw, class_weight={0: 1.0})


def test_errors_are_gradcheck_errors():
    assert issubclass(NotCompiledError, GradcheckError)
    assert issubclass(KerasStepError, GradcheckError)
    assert issubclass(ClassWeightError, InvalidArgumentError)


# --------------------------------------------------------------------- api
def test_reports_are_published_with_their_label(dict_model):
    seen = []
    api._listeners.append(seen.append)
    try:
        x, y, sw = data()
        report = check_keras_model(dict_model, x, y, sample_weight=sw, label="k1")
    finally:
        api._listeners.remove(seen.append)
    assert seen == [report] and report.label == "k1"
    assert report.to_dict()["property"] == "keras_training"


def test_importing_the_keras_api_imports_no_framework():
    code = (
        "import sys, gradcheck.keras_api, gradcheck.properties.keras_training; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------- torch backend
TORCH_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np, keras, torch
    from gradcheck.keras_api import check_keras_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4)).astype("float32")
    y = {"main": 3 * rng.standard_normal((12, 1)).astype("float32"),
         "aux": rng.integers(0, 2, (12, 1)).astype("float32")}
    sw = {"main": np.where(np.arange(12) % 3 == 0, 0.0, 1.5).astype("float32"),
          "aux": np.ones(12, "float32")}

    class AuxTwice(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         **kw):
            total = super().compute_loss(x, y, y_pred, sample_weight, **kw)
            sw = (sample_weight or {}).get("aux")
            aux = keras.losses.BinaryCrossentropy()(y["aux"], y_pred["aux"], sw)
            return total + 0.3 * aux

    def build(cls=keras.Model):
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,), name="x")
        h = keras.layers.Dense(
            8, activation="tanh", name="trunk",
            kernel_regularizer=keras.regularizers.L2(0.01))(inp)
        h = keras.layers.Dropout(0.3, name="drop")(h)
        m = cls(inp, {"main": keras.layers.Dense(1, name="main")(h),
                      "aux": keras.layers.Dense(1, activation="sigmoid",
                                                name="aux")(h)})
        m.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9),
                  loss={"main": "mse", "aux": "binary_crossentropy"},
                  loss_weights={"main": 1.0, "aux": 0.3})
        m.fit(x, y, batch_size=6, epochs=1, verbose=0)
        return m

    def snapshot(m):
        return [v.numpy().copy() for v in
                list(m.variables) + list(m.optimizer.variables)
                + list(m.metrics_variables)]

    out = {"backend": keras.backend.backend()}
    for name, cls in (("good", keras.Model), ("bad", AuxTwice)):
        m = build(cls)
        before = snapshot(m)
        grads = [v.value.grad for v in m.trainable_variables]
        r = check_keras_model(m, x, y, sample_weight=sw)
        after = snapshot(m)
        out[name] = {
            "status": r.status,
            "head": r.location.head if r.location else None,
            "tensor": r.location.tensor if r.location else None,
            "framework": r.framework,
            "message": r.message(),
            "restored": all(np.array_equal(a, b) for a, b in zip(before, after)),
            "grads_restored": all(
                (g is None) == (v.value.grad is None)
                and (g is None or torch.equal(g, v.value.grad))
                for g, v in zip(grads, m.trainable_variables)),
        }
    print("RESULT " + json.dumps(out))
    """
)


def _env(**extra: str) -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH", "")) if p
    )
    return env


def test_torch_keras_backend_in_a_subprocess():
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_SCRIPT],
        capture_output=True,
        text=True,
        env=_env(KERAS_BACKEND="torch"),
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["backend"] == "torch"
    good, bad = out["good"], out["bad"]
    assert good["status"] == "passed", good["message"]
    assert good["framework"] == "keras/torch"
    assert bad["status"] == "mismatch" and bad["head"] == "aux", bad["message"]
    assert "keras-training" in bad["message"] and bad["tensor"] in bad["message"]
    assert "with weight 0.6 instead of 0.3" in bad["message"]
    for case in (good, bad):
        assert case["restored"] and case["grads_restored"]
