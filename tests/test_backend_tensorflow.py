"""The TensorFlow/Keras backend, tested directly (not through the engine)."""

from __future__ import annotations

import random

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck.backends import tensorflow as tfb  # noqa: E402
from gradcheck.backends.tensorflow import TensorflowSession, owns  # noqa: E402
from gradcheck.errors import (  # noqa: E402
    NothingToDifferentiateError,
    ShapeChangedError,
    UnsupportedInputError,
)

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)


def _dense(units: int = 2, in_dim: int = 3, seed: int = 0, **kw) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((in_dim,)), keras.layers.Dense(units, **kw)])


def _snapshot(model: keras.Model) -> list[tuple[str, bytes, np.ndarray]]:
    return [(v.path, v.numpy().tobytes(), v.numpy().copy()) for v in model.variables]


def _assert_same(model: keras.Model, snap) -> None:
    now = _snapshot(model)
    assert [p for p, _, _ in now] == [p for p, _, _ in snap]
    for (_, b0, a0), (_, b1, a1) in zip(snap, now, strict=True):
        assert np.array_equal(a0, a1)
        assert b0 == b1


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_cube_sum_gradient(dtype):
    x_np = np.array([[1.0, -2.0], [0.5, 3.0]])
    x = tf.constant(x_np, dtype=dtype)
    with TensorflowSession(lambda x: tf.reduce_sum(x**3), (x,), None) as s:
        assert [sp.name for sp in s.specs] == ["inputs[0]"]
        assert s.specs[0].dtype == tf.as_dtype(dtype).name
        assert s.specs[0].shape == (2, 2) and s.specs[0].device == "cpu"
        (y,) = s.analytic()
        assert y.dtype == np.float64 and y.shape == ()
        np.testing.assert_allclose(y, np.sum(x_np**3), rtol=1e-6)
        assert s.output_names == ["output"] and s.output_shapes == [()]
        (g,) = s.vjp([np.array(2.0)])
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, 2.0 * 3 * x_np**2, rtol=1e-6)
        assert (s.forward_count, s.backward_count) == (1, 1)


def test_dense_layer_gradient_by_hand():
    model = _dense()
    x_np = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    x = tf.constant(x_np)

    def loss(x):
        return tf.reduce_sum(model(x) ** 2)

    with TensorflowSession(loss, (x,), model) as s:
        names = [sp.name for sp in s.specs]
        assert names == ["inputs[0]"] + [v.path for v in model.trainable_variables]
        assert names[1].endswith("/kernel") and names[2].endswith("/bias")
        assert [sp.kind for sp in s.specs] == ["input", "parameter", "parameter"]
        s.analytic()
        gx, gw, gb = s.vjp([np.array(1.0)])
    w, b = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    r = 2.0 * (x_np.astype(np.float64) @ w + b)
    np.testing.assert_allclose(gw, x_np.T.astype(np.float64) @ r, rtol=1e-5)
    np.testing.assert_allclose(gb, r.sum(0), rtol=1e-5)
    np.testing.assert_allclose(gx, r @ w.T, rtol=1e-5)


def test_vjp_cotangents_unconnected_and_retain():
    x = tf.constant([1.0, 2.0])
    z = tf.constant([3.0, 4.0])
    v = tf.Variable([1.0, -1.0], trainable=False)  # still differentiated

    def fn(x, z, v):
        return x * v, tf.reduce_sum(x)

    with TensorflowSession(fn, (x, z, v), None) as s:
        assert [sp.name for sp in s.specs] == ["inputs[0]", "inputs[1]", "inputs[2]"]
        s.analytic()
        ct = [np.array([1.0, 10.0]), np.array(2.0)]
        gx, gz, gv = s.vjp(ct, retain=True)
        np.testing.assert_allclose(gx, [1 * 1 + 2, 10 * -1 + 2])
        assert gz is None
        np.testing.assert_allclose(gv, [1.0, 20.0])
        again = s.vjp(ct)
        np.testing.assert_allclose(again[0], gx)
        assert s.backward_count == 2


def test_same_tensor_twice_and_closure_are_separate():
    x = tf.constant([1.0, 2.0])
    with TensorflowSession(lambda a, b: tf.reduce_sum(a * b * x), (x, x), None) as s:
        s.analytic()
        ga, gb = s.vjp([np.array(1.0)])
    np.testing.assert_allclose(ga, [1.0, 4.0])  # d/da of a*b*x with b = x = x
    np.testing.assert_allclose(gb, [1.0, 4.0])


def test_value_and_grads():
    x = tf.constant([1.0, 2.0, 3.0])
    v = tf.Variable(2.0)
    with TensorflowSession(lambda x: tf.reduce_sum(x), (x,), [v]) as s:
        value, (gx, gv) = s.value_and_grads(
            lambda x: tf.reduce_sum(v * x**2), "weighted loss"
        )
        assert value == pytest.approx(28.0)
        np.testing.assert_allclose(gx, [4.0, 8.0, 12.0])
        np.testing.assert_allclose(gv, 14.0)
        with pytest.raises(UnsupportedInputError, match="weighted loss"):
            s.value_and_grads(lambda x: x * 2, "weighted loss")
        with pytest.raises(UnsupportedInputError, match="my head"):
            s.value_and_grads(lambda x: 1.0, "my head")


# ---------------------------------------------------------------- IndexedSlices
def test_gather_gives_dense_gradient():
    table = tf.Variable(np.arange(8.0, dtype=np.float32).reshape(4, 2))
    ids = tf.constant([0, 2, 0])
    with TensorflowSession(
        lambda ids: tf.reduce_sum(tf.gather(table, ids)), (ids,), [table]
    ) as s:
        assert [sp.name for sp in s.specs] == ["params[0]"]
        s.analytic()
        (g,) = s.vjp([np.array(1.0)])
    assert isinstance(g, np.ndarray) and g.dtype == np.float64
    np.testing.assert_array_equal(g, [[2, 2], [0, 0], [1, 1], [0, 0]])


def test_keras_embedding_gives_dense_gradient():
    keras.utils.set_random_seed(0)
    emb = keras.layers.Embedding(5, 3)
    emb.build((None,))
    ids = tf.constant([1, 1, 4])
    with TensorflowSession(lambda ids: tf.reduce_sum(emb(ids)), (ids,), emb) as s:
        assert s.specs[0].name == emb.embeddings.path
        s.analytic()
        (g,) = s.vjp([np.array(1.0)])
        value, (g2,) = s.value_and_grads(lambda ids: tf.reduce_sum(emb(ids)), "l")
    expected = np.zeros((5, 3))
    expected[1] = 2.0
    expected[4] = 1.0
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_array_equal(g2, expected)


# ---------------------------------------------------------------- reference side
def test_outputs_at_matches_fn_at_shifted_point_in_float64():
    x_np = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    d = np.array([1.0, 0.5, -2.0])
    x = tf.constant(x_np)
    with TensorflowSession(lambda x: tf.sin(x) * x, (x,), None) as s:
        s.analytic()
        assert s.reference_dtype == "float64"
        h = s.prepare([d])
        assert h[0].dtype == tf.float64
        (y,) = s.outputs_at(h, 1e-3)
        assert s.reference_dtype == "float64" and s.notes == []
    p = x_np.astype(np.float64) + 1e-3 * d
    np.testing.assert_allclose(y, np.sin(p) * p, rtol=1e-14)


def test_outputs_at_casts_all_floating_inputs_and_keeps_integers():
    x = tf.constant([1.0, 2.0], dtype=tf.float32)
    scale = tf.constant([3.0, 4.0], dtype=tf.float32)  # differentiated, d = None
    n = tf.constant(2)
    seen = []

    def fn(x, scale, n):
        seen.append((x.dtype, scale.dtype, n.dtype))
        return x * scale * tf.cast(n, x.dtype)

    with TensorflowSession(fn, (x, scale, n), None) as s:
        s.analytic()
        (y,) = s.outputs_at(s.prepare([np.ones(2), None]), 0.5)
    assert seen[-1] == (tf.float64, tf.float64, tf.int32)
    np.testing.assert_allclose(y, [1.5 * 3 * 2, 2.5 * 4 * 2])


@pytest.mark.parametrize("kind", ["closure", "cast"])
def test_native_fallback_with_note(kind):
    w = tf.constant([[1.0], [2.0]], dtype=tf.float32)
    if kind == "closure":

        def fn(x):
            return tf.matmul(x, w)  # float64 x cannot meet float32 w
    else:

        def fn(x):
            return tf.cast(x, tf.float32) * 2.0

    x = tf.constant([[1.0, 1.0]], dtype=tf.float32)
    with TensorflowSession(fn, (x,), None) as s:
        s.analytic()
        (y,) = s.outputs_at(s.prepare([np.array([[1.0, 0.0]])]), 0.25)
        assert s.reference_dtype == "float32"
        assert len(s.notes) == 1 and "float32, not float64" in s.notes[0]
        s.outputs_at(s.prepare([np.array([[1.0, 0.0]])]), 0.5)
        assert len(s.notes) == 1  # decided once
    expected = [[1.25 + 2.0]] if kind == "closure" else [[2.5, 2.0]]
    np.testing.assert_allclose(y, expected)


def test_plain_variables_run_native_and_are_restored_after_each_call():
    w = tf.Variable(np.full((3, 2), 0.25, dtype=np.float32))
    x = tf.ones((2, 3))
    with TensorflowSession(lambda x: tf.matmul(x, w), (x,), {"w": w}) as s:
        assert s.reference_dtype == "float32"
        assert any("variables cannot change dtype" in n for n in s.notes)
        s.analytic()
        (y,) = s.outputs_at(s.prepare([None, np.full((3, 2), 0.5)]), 0.1)
        np.testing.assert_array_equal(w.numpy(), np.full((3, 2), 0.25, np.float32))
    shifted = np.float64(np.float32(0.25 + 0.05))
    np.testing.assert_allclose(y, np.full((2, 2), 3 * shifted), rtol=1e-7)
    assert w.dtype == tf.float32


def test_keras_variables_get_a_float64_reference_and_are_put_back():
    model = _dense()
    snap = _snapshot(model)
    x = tf.ones((2, 3))
    kernel = model.trainable_variables[0]
    storage = [v._value for v in model.variables]
    policies = [layer.dtype_policy.name for layer in model._flatten_layers()]
    with TensorflowSession(lambda x: model(x), (x,), model) as s:
        assert s.reference_dtype == "float64" and s.notes == []
        s.analytic()
        d = [None, np.full((3, 2), 0.5), None]
        (y,) = s.outputs_at(s.prepare(d), 0.1)
        assert s.reference_dtype == "float64"
        _assert_same(model, snap)  # the float32 variables were never written
        assert [v._value for v in model.variables] == storage
    w, b = (v.astype(np.float64) for _, _, v in snap)
    # exact float64 arithmetic on the float32 values: no float32 rounding of w + td
    np.testing.assert_allclose(y, np.ones((2, 3)) @ (w + 0.05) + b, rtol=1e-14)
    assert kernel.dtype == "float32"
    assert [layer.dtype_policy.name for layer in model._flatten_layers()] == policies
    assert float(model(x)[0, 0]).__class__ is float and model(x).dtype == tf.float32


def test_float64_variables_need_no_note():
    v = tf.Variable([1.0, 2.0], dtype=tf.float64)
    with TensorflowSession(lambda: v * v, (), v) as s:
        assert s.specs[0].name == "params"
        s.analytic()
        (y,) = s.outputs_at(s.prepare([np.array([1.0, 1.0])]), 1e-3)
        assert s.reference_dtype == "float64" and s.notes == []
    np.testing.assert_allclose(y, [1.001**2, 2.001**2], rtol=1e-15)
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])


def test_values_and_norms():
    v = tf.Variable([-1.5, 2.0])
    x = tf.constant([-3.0])
    with TensorflowSession(lambda x: x * tf.reduce_sum(v), (x,), {"w": v}) as s:
        assert [sp.name for sp in s.specs] == ["inputs[0]", "w"]
        ax, av = s.values()
        assert s.norms() == pytest.approx([3.0, 2.5])
    np.testing.assert_array_equal(ax, [-3.0])
    np.testing.assert_array_equal(av, [-1.5, 2.0])


def test_shape_change_is_reported():
    calls = []

    def fn(x):
        calls.append(1)
        return x if len(calls) == 1 else tf.concat([x, x], 0)

    with TensorflowSession(fn, (tf.constant([1.0]),), None) as s:
        s.analytic()
        with pytest.raises(ShapeChangedError):
            s.outputs_at(s.prepare([np.ones(1)]), 0.1)


# ---------------------------------------------------------------- outputs
def test_dict_and_tuple_outputs_flattened_non_floating_ignored():
    x = tf.constant([1.0, 2.0])

    def fn(x):
        return {
            "a": 2.0 * x,
            "b": (tf.reduce_sum(x), tf.constant([1, 2]), "label"),
            "ids": tf.argmax(x),
        }

    with TensorflowSession(fn, (x,), None) as s:
        ys = s.analytic()
        assert s.output_names == ["output['a']", "output['b'][0]"]
        assert s.output_shapes == [(2,), ()]
        np.testing.assert_allclose(ys[0], [2.0, 4.0])
        (g,) = s.vjp([np.array([1.0, 1.0]), np.array(3.0)])
    np.testing.assert_allclose(g, [5.0, 5.0])


def test_python_float_output_is_rejected():
    with TensorflowSession(lambda x: 3.0, (tf.constant([1.0]),), None) as s:
        with pytest.raises(UnsupportedInputError, match="float"):
            s.analytic()


def test_integer_only_output_is_rejected():
    with TensorflowSession(lambda x: tf.argmax(x), (tf.constant([1.0]),), None) as s:
        with pytest.raises(UnsupportedInputError):
            s.analytic()


# ---------------------------------------------------------------- what is checked
def test_integer_only_inputs_raise_nothing_to_differentiate():
    with pytest.raises(NothingToDifferentiateError, match=r"inputs\[0\] \(int32"):
        TensorflowSession(
            lambda n: tf.cast(n, tf.float32), (tf.constant([1, 2]),), None
        )


def test_numpy_input_is_named_in_the_message():
    with pytest.raises(NothingToDifferentiateError, match="tf.constant"):
        TensorflowSession(lambda a: a, (np.ones(2),), None)


def test_wrong_params_type():
    with pytest.raises(UnsupportedInputError, match="params"):
        TensorflowSession(lambda x: x, (tf.constant(1.0),), "model")
    with pytest.raises(UnsupportedInputError, match="inputs instead"):
        TensorflowSession(lambda x: x, (tf.constant(1.0),), [tf.constant(1.0)])


def test_complex_input_is_checked_as_real_and_imaginary_parts():
    """Complex tensors were refused before issue 13; now their real and imaginary
    parts are checked (tests/test_complex.py has the conjugate bugs)."""
    import gradcheck

    z = tf.constant([1 + 2j, -0.5 + 0.25j], dtype=tf.complex128)
    report = gradcheck.check_gradients(lambda z: tf.math.abs(z * z), z)
    assert report.passed, report.message()
    assert any("view_as_real" in t.name for t in report.tensors)


def test_frozen_layer_is_skipped():
    model = _dense()
    model.trainable = False
    with pytest.raises(NothingToDifferentiateError, match="trainable=False"):
        TensorflowSession(lambda: model(tf.ones((1, 3))), (), model)


def test_param_names_lists_and_dicts():
    model = _dense()
    tv = tf.Variable(1.0)
    kv = keras.Variable(np.ones(2, dtype="float32"), name="kv")
    with pytest.raises(UnsupportedInputError, match="'params\\[2\\]'"):
        TensorflowSession(lambda: tv * kv, (), [tv, kv, {"m": model}])
    with TensorflowSession(lambda: tv * kv, (), [tv, kv, model]) as s:
        names = [sp.name for sp in s.specs]
    assert names[0] == "params[0]"
    assert names[1] == kv.path
    assert names[2:] == ["params[2]." + v.path for v in model.trainable_variables]
    with TensorflowSession(lambda: tv * kv, (), {"t": tv, "m": model}) as s:
        names = [sp.name for sp in s.specs]
    assert names == ["t"] + ["m." + v.path for v in model.trainable_variables]


def test_tf_module_params():
    class Scale(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable([2.0, 3.0], name="w")
            self.steps = tf.Variable(0, name="steps")
            self.frozen = tf.Variable(1.0, trainable=False, name="frozen")

    mod = Scale()
    x = tf.constant([1.0, 1.0])
    with TensorflowSession(lambda: tf.reduce_sum(mod.w * x), (), mod) as s:
        assert [sp.name for sp in s.specs] == ["w"]
        s.analytic()
        (g,) = s.vjp([np.array(1.0)])
    np.testing.assert_array_equal(g, [1.0, 1.0])


def test_owns():
    model = _dense()
    assert owns(tf.constant(1.0)) and owns(tf.Variable(1.0))
    assert owns(model) and owns(model.layers[0]) and owns(model.variables[0])
    assert not owns(np.ones(2)) and not owns(1.0) and not owns([tf.constant(1.0)])
    assert tfb.FRAMEWORK == "tensorflow"


def test_device_names():
    assert tfb._device("/job:localhost/replica:0/task:0/device:CPU:0") == "cpu"
    assert tfb._device("/job:localhost/replica:0/task:0/device:GPU:1") == "gpu:1"
    assert tfb._device("") == "cpu"


# ---------------------------------------------------------------- restoring state
def test_model_bit_identical_after_fn_raised():
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    snap = _snapshot(model)

    def fn(x):
        model(x, training=True)  # moves the BatchNorm statistics
        for v in model.trainable_variables:
            v.assign(v * 3.0 + 1.0)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with TensorflowSession(fn, (tf.ones((2, 3)),), model) as s:
            s.analytic()
    _assert_same(model, snap)


def test_model_bit_identical_after_outputs_at_raised():
    model = _dense()
    snap = _snapshot(model)
    calls = []

    def fn(x):
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("second call")
        return model(x)

    with pytest.raises(ValueError, match="second call"):
        with TensorflowSession(fn, (tf.ones((1, 3)),), model) as s:
            s.analytic()
            s.outputs_at(s.prepare([None, np.ones((3, 2)), np.ones(2)]), 0.1)
    _assert_same(model, snap)


def test_mutation_inside_fn_is_undone_between_calls():
    v = tf.Variable([1.0, 2.0])

    def fn():
        out = v * 1.0
        v.assign_add([10.0, 10.0])
        return out

    with TensorflowSession(fn, (), v) as s:
        (y1,) = s.analytic()
        (y2,) = s.outputs_at(s.prepare([None]), 0.0)
        np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(y1, y2)


def test_rng_states_restored():
    np.random.seed(123)
    random.seed(7)
    gen = tf.random.get_global_generator()
    expected_np = np.random.get_state()[1].copy()
    expected_py = random.getstate()
    expected_tf = gen.state.numpy().copy()

    def fn(x):
        np.random.rand(5)
        random.random()
        tf.random.get_global_generator().normal([3])
        return x * 2.0

    with TensorflowSession(fn, (tf.constant([1.0]),), None) as s:
        s.analytic()
        s.outputs_at(s.prepare([np.ones(1)]), 0.1)
    np.testing.assert_array_equal(np.random.get_state()[1], expected_np)
    assert random.getstate() == expected_py
    assert tf.random.get_global_generator() is gen
    np.testing.assert_array_equal(gen.state.numpy(), expected_tf)


def test_restore_when_init_fails():
    np.random.seed(5)
    expected = np.random.get_state()[1].copy()
    v = tf.Variable([1.0])
    with pytest.raises(UnsupportedInputError):
        TensorflowSession(lambda: v, (), [v, object()])
    np.testing.assert_array_equal(np.random.get_state()[1], expected)
    np.testing.assert_array_equal(v.numpy(), [1.0])


# ---------------------------------------------------------------- traced reference
# outputs_at runs fn as a tf.function once the traced graph agreed with an eager
# call (TensorflowSession._reference_forward): fn's Python runs three times (the
# analytical call, the eager reference call, the trace), whatever the number of
# reference evaluations, and every value is the eager one's.
def _reference_values(fn, inputs, params, points, compiled, monkeypatch):
    monkeypatch.setattr(tfb, "COMPILED_REFERENCE", compiled)
    with TensorflowSession(fn, inputs, params) as s:
        s.analytic()
        out = [s.outputs_at(s.prepare(d), t) for d, t in points]
        return out, s.reference_dtype, list(s.notes)


@pytest.mark.parametrize("case", ["keras-float32", "keras-float64", "inputs"])
def test_reference_forward_is_traced_once_and_equals_eager(case, monkeypatch):
    keras.utils.set_random_seed(3)
    if case == "inputs":
        x = tf.constant([[0.3, -1.2, 2.0]], dtype=tf.float32)
        params, inputs = None, (x,)
        body = lambda x: {"y": tf.sin(x) * x, "s": tf.reduce_sum(tf.tanh(x))}  # noqa: E731
        dirs = [np.array([[1.0, 0.5, -2.0]])]
    else:
        dtype = case.split("-")[1]
        model = keras.Sequential(
            [
                keras.Input((3,), dtype=dtype),
                keras.layers.Dense(4, activation="tanh", dtype=dtype),
                keras.layers.BatchNormalization(dtype=dtype),
                keras.layers.Dense(2, dtype=dtype),
            ]
        )
        x = tf.constant(np.linspace(-1, 1, 6).reshape(2, 3), dtype=dtype)
        params, inputs = model, ()
        body = lambda: tf.reduce_mean(model(x, training=True) ** 2)  # noqa: E731
        dirs = [
            [
                np.full(v.shape, 0.5 * (i + 1))
                for i, v in enumerate(model.trainable_variables)
            ]
        ]
        snap = _snapshot(model)
    calls = []

    def fn(*args):
        calls.append(1)
        return body(*args)

    points = [([None] * len(dirs[0]), 0.0)] + [
        (dirs[0], t) for t in (1e-3, -2e-3, 0.25)
    ]
    eager, dtype_e, notes_e = _reference_values(
        fn, inputs, params, points, False, monkeypatch
    )
    n_eager = len(calls)
    calls.clear()
    traced, dtype_t, notes_t = _reference_values(
        fn, inputs, params, points, True, monkeypatch
    )
    assert n_eager == 1 + len(points)
    assert len(calls) == 3  # analytic, the eager reference call, the trace
    assert dtype_t == dtype_e == "float64" and notes_t == notes_e
    for a, b in zip(eager, traced, strict=True):
        for ya, yb in zip(a, b, strict=True):
            np.testing.assert_allclose(yb, ya, rtol=1e-13, atol=1e-15)
    if params is not None:
        _assert_same(params, snap)


def test_untraceable_fn_keeps_the_eager_reference(monkeypatch):
    monkeypatch.setattr(tfb, "COMPILED_REFERENCE", True)
    x = tf.constant([0.5, 1.5])
    calls = []

    def fn(x):  # .numpy() cannot trace: the eager path, every evaluation
        calls.append(1)
        return x * float(tf.reduce_sum(x).numpy())

    with TensorflowSession(fn, (x,), None) as s:
        s.analytic()
        ys = [s.outputs_at(s.prepare([np.ones(2)]), t)[0] for t in (0.1, 0.2, 0.3)]
    assert len(calls) == 1 + 3 + 1  # analytic, three eager calls, the failed trace
    for t, y in zip((0.1, 0.2, 0.3), ys, strict=True):
        p = np.array([0.5, 1.5]) + t
        np.testing.assert_allclose(y, p * p.sum(), rtol=1e-14)


def test_python_randomness_is_not_frozen_by_the_trace(monkeypatch):
    """A fn drawing NumPy noise on every call: traced, the draw would be a
    constant; the eager and traced first calls differ, so the reference stays
    eager and the check reports the nondeterminism it did before."""
    import gradcheck

    monkeypatch.setattr(tfb, "COMPILED_REFERENCE", True)
    x = tf.constant([0.5, 1.5, -0.7], dtype=tf.float64)
    calls = []

    def fn(x):
        calls.append(1)
        return tf.reduce_sum(x**2) + float(np.random.normal()) * 1e-3 * x[0]

    report = gradcheck.check_gradients(fn, (x,), seed=0)
    assert report.status == "nondeterministic", report.message()
    assert len(calls) > 4  # every reference evaluation ran fn's Python


@pytest.mark.parametrize("case", ["inputs", "keras-float32"])
def test_traced_reference_of_the_order2_function_equals_eager(case, monkeypatch):
    """The derived function g = grad <v, fn> reads its inputs' sources from its
    arguments: traced, it follows the point (a source captured from the first
    evaluation would freeze the inputs' part of g)."""
    keras.utils.set_random_seed(5)
    if case == "inputs":
        w = tf.constant([[0.4, -0.3], [1.1, 0.2], [-0.5, 0.7]], dtype=tf.float32)
        x = tf.constant([[0.3, -1.2, 2.0]], dtype=tf.float32)
        inputs, params = (x,), None
        fn = lambda x: tf.tanh(tf.matmul(x, w)) * x[:, :2]  # noqa: E731
    else:
        model = keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, activation="tanh")]
        )
        x = tf.constant([[0.3, -1.2, 2.0], [0.1, 0.5, -0.4]])
        inputs, params = (x,), model
        fn = lambda x: tf.reduce_sum(model(x) ** 3)  # noqa: E731
        snap = _snapshot(model)
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(tfb, "COMPILED_REFERENCE", compiled)
        s = tfb.second_order_session(fn, inputs, params, seed=0)
        with s:
            s.analytic()
            rng = np.random.default_rng(1)
            d = [rng.normal(size=sp.shape) for sp in s.specs]
            results.append([s.outputs_at(s.prepare(d), t) for t in (0.0, 0.1, -0.3)])
            if compiled:
                assert any(v is not False for v in s._compiled.values())
    for a, b in zip(*results, strict=True):
        for ya, yb in zip(a, b, strict=True):
            np.testing.assert_allclose(yb, ya, rtol=1e-12, atol=1e-14)
    if params is not None:
        _assert_same(params, snap)
