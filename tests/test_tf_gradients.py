"""The engine on TensorFlow/Keras: planted bugs fail, correct code passes, and the
user's state (weights, statistics, seed states, optimizer slots) survives."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradcheck  # noqa: E402

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)

DTYPES = ["float64", "float32"]
#: the relative error each dtype promises to catch
DETECT = {"float64": 1e-5, "float32": 1e-3}
HEADS = ("zeta_main", "alpha_aux")  # definition order; sorted order is reversed
WEIGHTS = {"zeta_main": 1.0, "alpha_aux": 0.3}


def const(*shape, dtype="float64", seed=0):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


# --------------------------------------------------------------------------- planted
def scaled(rel):
    """Identity whose backward is scaled by (1 + rel)."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            return g * (1 + rel)

        return tf.identity(x), grad

    return f


def matmul(transposed):
    """x @ w (square w) whose input gradient uses w instead of w^T if ``transposed``."""

    @tf.custom_gradient
    def f(x, w):
        def grad(g):
            dx = g @ w if transposed else g @ tf.transpose(w)
            return dx, tf.transpose(x) @ g

        return x @ w, grad

    return f


def sine(ignores_upstream):
    """sin(x) whose backward forgets the upstream gradient if ``ignores_upstream``."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            return tf.cos(x) if ignores_upstream else g * tf.cos(x)

        return tf.sin(x), grad

    return f


def square(index, factor):
    """x**2 whose backward is multiplied by ``factor`` at one flat index."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            n = int(tf.size(x))
            bump = tf.reshape(tf.one_hot(index, n, dtype=x.dtype), x.shape)
            return 2 * x * g * (1 + (factor - 1) * bump)

        return x * x, grad

    return f


def relu(factor):
    """ReLU with a custom backward ``factor`` x the true one."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            return g * tf.cast(x >= 0, x.dtype) * factor

        return tf.nn.relu(x), grad

    return f


# --------------------------------------------------------------------------- smooth
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_scaled_backward_is_caught_at_promised_precision(dtype, mode):
    x, w = const(4, 5, dtype=dtype), const(5, 3, dtype=dtype, seed=1)

    def fn(bug):
        return lambda x, w: tf.reduce_sum(tf.tanh(bug(x) @ w))

    ok = gradcheck.assert_gradients(fn(scaled(0.0)), (x, w), mode=mode)
    assert ok.reference_dtype == "float64"
    report = gradcheck.check_gradients(fn(scaled(DETECT[dtype])), (x, w), mode=mode)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    with pytest.raises(gradcheck.GradientMismatchError, match=r"inputs\[0\]"):
        gradcheck.assert_gradients(fn(scaled(DETECT[dtype])), (x, w), mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bug", ["transposed", "ignores_upstream"])
def test_structural_backward_bugs_fail(dtype, bug):
    x, w = const(6, 6, dtype=dtype), const(6, 6, dtype=dtype, seed=1)
    fns = {
        "transposed": lambda planted: (
            lambda x, w: tf.reduce_sum(tf.tanh(matmul(planted)(x, w)))
        ),
        "ignores_upstream": lambda planted: (
            lambda x, w: tf.reduce_sum(sine(planted)(x) ** 2) + tf.reduce_sum(w * 0)
        ),
    }
    assert gradcheck.check_gradients(fns[bug](False), (x, w), mode="directional")
    report = gradcheck.check_gradients(fns[bug](True), (x, w), mode="directional")
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    assert report.location.index is not None


@pytest.mark.parametrize("index", [4321, 9999])
def test_single_wrong_element_in_10000_is_found(index):
    x = const(100, 100, seed=3)
    assert gradcheck.check_gradients(
        lambda x: tf.reduce_sum(square(index, 1.0)(x)), (x,)
    ).passed
    report = gradcheck.check_gradients(
        lambda x: tf.reduce_sum(square(index, 1.5)(x)), (x,)
    )
    assert report.mode == "directional"
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    assert report.location.index == (index // 100, index % 100)
    value = float(tf.reshape(x, [-1])[index])
    assert report.location.numerical == pytest.approx(2 * value, rel=1e-3)
    assert report.location.analytical == pytest.approx(3 * value, rel=1e-3)
    msg = report.message()
    for part in ("inputs[0]", f"[{index // 100}, {index % 100}]", "float64"):
        assert part in msg


def float32_only_bug(x):
    """sin(x), whose backward is 1e-3 too large on the float32 path only."""

    @tf.custom_gradient
    def f(x):
        def grad(g):
            scale = 1.001 if x.dtype == tf.float32 else 1.0
            return g * tf.cos(x) * scale

        return tf.sin(x), grad

    return f(x)


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_bug_on_the_float32_path_only_is_a_mismatch(mode):
    # the engine compares the float32 gradient with the float64 one
    # (TensorflowSession.gradients_at), which itself matches finite differences
    x = (
        const(6, 7, dtype="float32")
        if mode == "directional"
        else const(7, dtype="float32")
    )
    report = gradcheck.check_gradients(
        lambda x: tf.reduce_sum(float32_only_bug(x)), (x,), mode=mode
    )
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    assert any("code path only" in n for n in report.notes), report.notes
    assert gradcheck.check_gradients(
        lambda x: tf.reduce_sum(float32_only_bug(x)),
        (tf.cast(x, tf.float64),),
        mode=mode,
    ).passed


# --------------------------------------------------------------------------- keras
def multihead(dtype, seed=0):
    """A functional model: shared Dense trunk, a regression and a class head."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,), dtype=dtype)
    h = keras.layers.Dense(8, activation="tanh", dtype=dtype, name="trunk0")(inp)
    h = keras.layers.Dense(8, activation="tanh", dtype=dtype, name="trunk1")(h)
    outs = {
        "zeta_main": keras.layers.Dense(1, dtype=dtype, name="zeta_main")(h),
        "alpha_aux": keras.layers.Dense(4, dtype=dtype, name="alpha_aux")(h),
    }
    model = keras.Model(inp, outs)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((12, 6)), dtype=dtype)
    y = tf.constant(rng.standard_normal((12, 1)), dtype=dtype)
    c = tf.constant(rng.integers(0, 4, 12))
    return model, x, y, c


def head_losses(model, x, y, c, detach_aux=False):
    if detach_aux:  # the aux head reads a detached copy of the trunk's output
        h = model.get_layer("trunk1")(model.get_layer("trunk0")(x))
        out = {
            "zeta_main": model.get_layer("zeta_main")(h),
            "alpha_aux": model.get_layer("alpha_aux")(tf.stop_gradient(h)),
        }
    else:
        out = model(x)
    return {
        "zeta_main": tf.reduce_mean(tf.square(out["zeta_main"] - y)),
        "alpha_aux": tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=c, logits=out["alpha_aux"]
            )
        ),
    }


def total_fn(model, x, y, c, weights, **kw):
    def total():
        losses = head_losses(model, x, y, c, **kw)
        return weights["zeta_main"] * losses["zeta_main"] + (
            weights["alpha_aux"] * losses["alpha_aux"]
        )

    return total


def loss_fns(model, x, y, c):
    return {k: (lambda k=k: head_losses(model, x, y, c)[k]) for k in HEADS}


@pytest.mark.parametrize("dtype", DTYPES)
def test_keras_multihead_model(dtype):
    model, x, y, c = multihead(dtype)
    assert model.output_names == sorted(HEADS)  # not the definition order
    names = [v.path for v in model.trainable_variables]
    report = gradcheck.check_gradients(total_fn(model, x, y, c, WEIGHTS), params=model)
    assert report.passed, report.message()
    assert [t.name for t in report.tensors] == names
    # float32 Keras models are re-run in float64 for the reference (see _keras64)
    assert report.dtype == dtype and report.reference_dtype == "float64"
    # a bug inside the forward pass is blamed on the trunk
    bug = scaled(10 * DETECT[dtype])

    def planted():
        h = model.get_layer("trunk0")(x)
        h = model.get_layer("trunk1")(bug(h))
        return tf.reduce_mean(tf.square(model.get_layer("zeta_main")(h) - y))

    report = gradcheck.check_gradients(planted, params=model)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor.startswith("trunk0/")


# --------------------------------------------------------------------------- linearity
def test_linearity_correct_total_and_flow_matrix():
    model, x, y, c = multihead("float64")
    report = gradcheck.assert_linearity(
        total_fn(model, x, y, c, WEIGHTS),
        loss_fns(model, x, y, c),
        WEIGHTS,
        params=model,
    )
    flow = report.flow
    assert flow.losses == list(HEADS)
    assert flow.reached_by("trunk0/kernel") == ["zeta_main", "alpha_aux"]
    assert flow.reached_by("zeta_main/kernel") == ["zeta_main"]
    assert flow.reached_by("alpha_aux/kernel") == ["alpha_aux"]
    t = flow.tensors.index("trunk0/kernel")
    assert flow.effective_weights[t] == pytest.approx([1.0, 0.3], rel=1e-4)


def test_linearity_detached_branch_names_the_aux_loss():
    model, x, y, c = multihead("float64")
    total = total_fn(model, x, y, c, WEIGHTS, detach_aux=True)
    report = gradcheck.check_linearity(
        total, loss_fns(model, x, y, c), WEIGHTS, params=model
    )
    assert report.status == "mismatch", report.message()
    assert report.location.tensor.startswith("trunk")
    assert report.location.head == "alpha_aux"
    assert "'alpha_aux' not at all (detached?)" in report.message()
    with pytest.raises(gradcheck.GradientMismatchError, match="alpha_aux"):
        gradcheck.assert_linearity(
            total, loss_fns(model, x, y, c), WEIGHTS, params=model
        )


def test_linearity_weight_applied_twice():
    model, x, y, c = multihead("float64")
    twice = {"zeta_main": 1.0, "alpha_aux": 0.3**2}
    report = gradcheck.check_linearity(
        total_fn(model, x, y, c, twice),
        loss_fns(model, x, y, c),
        WEIGHTS,
        params=model,
    )
    assert report.status == "mismatch", report.message()
    assert report.location.head == "alpha_aux"
    t = report.flow.tensors.index(report.location.tensor)
    assert report.flow.effective_weights[t][1] == pytest.approx(0.09, rel=1e-4)
    assert "with weight 0.09 instead of 0.3" in report.message()


# --------------------------------------------------------------------------- kinks
KINK = tf.constant([0.0, 1.5, -2.0, 0.7], dtype="float64")


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_relu_at_zero_is_nondifferentiable(mode):
    smooth = tf.constant([0.3, 1.5, -2.0, 0.7], dtype="float64")
    fn = lambda x: tf.reduce_sum(tf.nn.relu(x))  # noqa: E731
    assert gradcheck.check_gradients(fn, (smooth,), mode=mode).passed
    report = gradcheck.check_gradients(fn, (KINK,), mode=mode)
    assert report.status == "nondifferentiable", report.message()
    assert report.location.tensor == "inputs[0]"
    assert report.location.index == (0,)


def test_kink_with_a_wrong_gradient_is_a_mismatch():
    good = gradcheck.check_gradients(
        lambda x: tf.reduce_sum(relu(1.0)(x)), (KINK,), mode="directional"
    )
    assert good.status == "nondifferentiable", good.message()
    report = gradcheck.check_gradients(
        lambda x: tf.reduce_sum(relu(3.0)(x)), (KINK,), mode="directional"
    )
    assert report.status == "mismatch", report.message()


# --------------------------------------------------------------------------- dropout
def test_dropout_in_training_mode_is_nondeterministic():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,), dtype="float64"),
            keras.layers.Dense(16, dtype="float64"),
            keras.layers.Dropout(0.5, dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )
    x = const(10, 8)
    before = [v.numpy().tobytes() for v in model.variables]
    report = gradcheck.check_gradients(
        lambda: tf.reduce_mean(model(x, training=True) ** 2), params=model
    )
    assert report.status == "nondeterministic", report.message()
    assert [v.numpy().tobytes() for v in model.variables] == before
    assert gradcheck.check_gradients(
        lambda: tf.reduce_mean(model(x, training=False) ** 2), params=model
    ).passed


def test_tf_random_generator_in_a_module_advances_and_is_restored():
    class Noisy(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(const(20, 8, seed=1))
            self.gen = tf.random.Generator.from_seed(7)

        def __call__(self, x):
            noise = 1 + self.gen.normal((8,), dtype=tf.float64)
            return tf.reduce_sum(tf.tanh(x @ self.w) * noise)

    module, x = Noisy(), const(4, 20)
    state = module.gen.state.numpy().tobytes()
    report = gradcheck.check_gradients(lambda: module(x), params=module)
    assert report.status == "nondeterministic", report.message()
    assert module.gen.state.numpy().tobytes() == state


# --------------------------------------------------------------------------- errors
def test_unusable_inputs_raise_clear_errors():
    x = const(3)
    with pytest.raises(gradcheck.NonFiniteError):
        gradcheck.check_gradients(lambda x: tf.reduce_sum(x) * np.nan, (x,))
    with pytest.raises(gradcheck.NothingToDifferentiateError):
        gradcheck.check_gradients(
            lambda n: tf.cast(n, tf.float64), (tf.constant([1, 2]),)
        )
    with pytest.raises(gradcheck.UnsupportedInputError):
        gradcheck.check_gradients(lambda x: 3.0, (x,))
    assert gradcheck.check_gradients(lambda x: tf.reduce_sum(tf.sin(x)), (x,))


def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(gradcheck.MixedFrameworksError):
        gradcheck.check_gradients(lambda a, b: a.sum(), (t, const(3)))


# --------------------------------------------------------------------------- state
def compiled_model():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = const(16, 5, dtype="float32", seed=4)
    model.train_on_batch(x, const(16, 1, dtype="float32", seed=5))
    return model, x


def snapshot(model):
    return [
        (v.path, v.numpy().tobytes())
        for v in list(model.variables) + list(model.optimizer.variables)
    ]


def forward(model, x, *, dropout, bug=None):
    """The layers one by one: BatchNorm in training mode (moves its statistics)."""
    dense, norm, drop, head = model.layers
    h = norm(dense(x), training=True)
    h = drop(h if bug is None else bug(h), training=dropout)
    return tf.reduce_mean(head(h) ** 2)


@pytest.mark.parametrize("case", ["mismatch", "dropout", "raises", "raises-traced"])
def test_model_and_optimizer_bit_identical_after_failure(case, monkeypatch):
    from gradcheck.backends import tensorflow as tfb

    # raises: fn's Python raises at its third call, every evaluation eager;
    # raises-traced: the traced reference graph fails (see below)
    monkeypatch.setattr(tfb, "COMPILED_REFERENCE", case != "raises")
    model, x = compiled_model()
    before = snapshot(model)
    assert any("_momentum" in path for path, _ in before)  # optimizer slots
    assert gradcheck.check_gradients(
        lambda: forward(model, x, dropout=False), params=model
    ).passed
    assert snapshot(model) == before
    if case == "raises":
        calls = []

        def fn():
            calls.append(1)
            if len(calls) == 3:
                raise ValueError("third call")
            return forward(model, x, dropout=False)

        with pytest.raises(ValueError, match="third call"):
            gradcheck.check_gradients(fn, params=model)
    elif case == "raises-traced":
        # runs 1-2: the analytical and the eager reference call; 3: the traced
        # graph's first run; 4: its second, which fails, and the same evaluation
        # run eagerly (5) raises from fn's own code, as it would without a graph
        runs = tf.Variable(0)  # not the model's: no check resets it

        def fn():
            runs.assign_add(1)
            tf.debugging.assert_less(runs, 4, message="fourth run")
            return forward(model, x, dropout=False)

        with pytest.raises(gradcheck.errors.FunctionRaisedError, match="fourth run"):
            gradcheck.check_gradients(fn, params=model)
        assert int(runs.numpy()) == 5
    elif case == "mismatch":
        report = gradcheck.check_gradients(
            lambda: forward(model, x, dropout=False, bug=scaled(0.5)), params=model
        )
        assert report.status == "mismatch", report.message()
    else:  # seed states advance during the check and are restored after it
        report = gradcheck.check_gradients(
            lambda: forward(model, x, dropout=True), params=model
        )
        assert report.status == "nondeterministic", report.message()
    assert snapshot(model) == before


# --------------------------------------------------------------------------- engine
# Regression tests for engine bugs these tests found (full mode had no
# nondeterminism diagnosis; the float32 dropout criterion was borderline).
def test_dropout_in_a_small_model_is_nondeterministic():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(8, dtype="float64"),
            keras.layers.Dropout(0.5, dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )
    x = const(16, 5)
    report = gradcheck.check_gradients(
        lambda: tf.reduce_mean(model(x, training=True) ** 2), params=model
    )
    assert report.mode == "full"
    assert report.status == "nondeterministic", report.message()


def test_float32_dropout_is_nondeterministic():
    model, x = compiled_model()
    report = gradcheck.check_gradients(
        lambda: forward(model, x, dropout=True), params=model
    )
    assert report.status == "nondeterministic", report.message()


def test_model_bit_identical_after_failing_linearity_check():
    model, x, y, c = multihead("float32")
    before = [v.numpy().tobytes() for v in model.variables]
    report = gradcheck.check_linearity(
        total_fn(model, x, y, c, WEIGHTS, detach_aux=True),
        loss_fns(model, x, y, c),
        WEIGHTS,
        params=model,
    )
    assert report.status == "mismatch", report.message()
    assert [v.numpy().tobytes() for v in model.variables] == before


def test_float32_keras_layers_run_their_reference_in_float64():
    """LayerNormalization (no input autocast), Conv1D, GRU and kernel/activity
    regularizers re-run in float64 for the reference (the audit found LayerNorm
    falling back to a float32 reference, whose noisy differences then raised a
    false alarm); Keras' floatx, the variables' dtypes and Variable.__eq__ are as
    before afterwards, and a 1e-3 bug is still caught."""
    from keras.src.backend.common.variables import Variable

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 3))
    h = keras.layers.Conv1D(
        4,
        3,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.01),
        activity_regularizer=keras.regularizers.L1(0.01),
    )(inp)
    h = keras.layers.GRU(3)(h)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    x = tf.constant(np.random.default_rng(0).standard_normal((4, 6, 3)), tf.float32)
    y = tf.constant(np.random.default_rng(1).standard_normal((4, 2)), tf.float32)
    eq, dtypes = Variable.__eq__, [v.dtype for v in model.variables]

    def loss(scale=1.0):
        def fn():
            out = model(x)
            if scale != 1.0:
                out = out * scale + tf.stop_gradient(out * (1 - scale))
            return tf.reduce_mean(tf.square(out - y)) + tf.add_n(model.losses)

        return fn

    report = gradcheck.check_gradients(loss(), params=model)
    assert report.passed, report.message()
    assert report.reference_dtype == "float64" and report.notes == []
    assert keras.config.floatx() == "float32" and Variable.__eq__ is eq
    assert [v.dtype for v in model.variables] == dtypes
    planted = gradcheck.check_gradients(loss(1.001), params=model)
    assert planted.status == "mismatch"


def test_a_loss_object_made_before_the_check_gets_the_float64_reference():
    """`loss_fn = keras.losses.MeanSquaredError()` at the top of a training script
    fixes the Loss's dtype to float32; within the float64 reference it computes in
    float64 (it used to force the whole check onto a float32 reference), and its
    dtype is float32 again afterwards."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    model = keras.Model(
        inp, keras.layers.Dense(1)(keras.layers.Dense(8, activation="tanh")(inp))
    )
    x, y = tf.random.normal((16, 5), seed=1), tf.random.normal((16, 1), seed=2)
    loss_fn = keras.losses.MeanSquaredError()
    report = gradcheck.check_gradients(lambda: loss_fn(y, model(x)), params=model)
    assert report.passed, report.message()
    assert report.reference_dtype == "float64", report.notes
    assert loss_fn.dtype == "float32"
