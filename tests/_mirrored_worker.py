"""check_keras_model under tf.distribute.MirroredStrategy, in a fresh interpreter.

Run by tests/test_keras_mirrored.py as ``python tests/_mirrored_worker.py``: the
CPU must be split into two logical devices before TensorFlow initialises its
devices, which another test in the pytest process may already have done. Prints
one JSON object: a verdict per scenario (status, the tensor named, notes, cost,
whether every copy of every variable came back bit for bit, or the error).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradcheck  # noqa: E402

TWO = ["/CPU:0", "/CPU:1"]
RNG = np.random.default_rng(0)
X = RNG.random((4, 3)).astype("float32")
Y = {
    "a": RNG.random((4, 2)).astype("float32"),
    "b": RNG.random((4, 1)).astype("float32"),
}
SW = {"a": RNG.random(4).astype("float32"), "b": RNG.random(4).astype("float32")}


def _copies(v: Any) -> list[tuple[str, bytes]]:
    """(dtype, bytes) of each replica's copy of ``v``."""
    inner = getattr(v, "_value", None)
    inner = v if inner is None else inner
    parts = (
        list(inner.values)
        if isinstance(inner, tf.distribute.DistributedValues)
        else [inner]
    )
    return [(str(np.asarray(p.numpy()).dtype), p.numpy().tobytes()) for p in parts]


def state(model: Any) -> dict[str, Any]:
    """Every copy (one per replica) of every variable of the model, its metrics
    and its optimizer (iterations, slots), and the objects a check swaps."""
    variables = (
        list(model.variables)
        + list(model.metrics_variables)
        + list(model.optimizer.variables)
    )
    return {
        "values": [(str(v.path), _copies(v)) for v in variables],
        "objects": (
            id(model.optimizer),
            id(model.train_function),
            len(model.variables),
            len(model.optimizer.variables),
        ),
    }


def two_heads(
    strategy: Any,
    compute_loss: Callable[..., Any] | None = None,
    *,
    trained: bool = False,
) -> Any:
    """Dict outputs a (2 units) and b (1 unit), loss weights, an L2 kernel
    penalty; built and compiled under ``strategy``; ``trained``: fit one step
    first (Adam then has slots and iterations = 1, all mirrored)."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        i = keras.Input((3,))
        h = keras.layers.Dense(4, activation="tanh", kernel_regularizer="l2")(i)
        model = keras.Model(
            i, {"a": keras.layers.Dense(2)(h), "b": keras.layers.Dense(1)(h)}
        )
        if compute_loss is not None:
            model.compute_loss = compute_loss(model)
        model.compile(
            optimizer="adam",
            loss={"a": "mse", "b": "mae"},
            loss_weights={"a": 0.5, "b": 2.0},
        )
    if trained:
        model.fit(X, Y, sample_weight=SW, batch_size=4, epochs=1, verbose=0)
    return model


def doubled(model: Any) -> Callable[..., Any]:
    original = model.compute_loss

    def compute_loss(*args: Any, **kwargs: Any) -> Any:
        return 2.0 * original(*args, **kwargs)

    return compute_loss


class MeanLoss(keras.Model):
    """The compute_loss of Keras' own docstring example: the mean over the
    replica's batch plus the penalties, never divided by num_replicas_in_sync."""

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        loss = keras.ops.mean((y_pred - y) ** 2)
        return loss + keras.ops.sum(self.losses)


def mean_loss(strategy: Any) -> Any:
    keras.utils.set_random_seed(0)
    with strategy.scope():
        i = keras.Input((3,))
        h = keras.layers.Dense(4, activation="tanh", kernel_regularizer="l2")(i)
        model = MeanLoss(i, keras.layers.Dense(1)(h))
        model.compile(optimizer="sgd", loss="mse")
    return model


def dropout(strategy: Any) -> Any:
    keras.utils.set_random_seed(0)
    with strategy.scope():
        i = keras.Input((3,))
        h = keras.layers.Dropout(0.5)(keras.layers.Dense(8, activation="tanh")(i))
        model = keras.Model(i, keras.layers.Dense(1)(h))
        model.compile(optimizer="adam", loss="mse")
    return model


def batchnorm(strategy: Any, synchronized: bool, frozen: bool = False) -> Any:
    """Dense -> BatchNormalization -> tanh -> Dense; ``frozen``: the
    normalisation not trainable (Keras 3 then runs it in inference mode)."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        i = keras.Input((3,))
        h = keras.layers.Dense(4)(i)
        norm = keras.layers.BatchNormalization(synchronized=synchronized)
        norm.trainable = not frozen
        h = norm(h)
        model = keras.Model(
            i, keras.layers.Dense(1)(keras.layers.Activation("tanh")(h))
        )
        model.compile(optimizer="adam", loss="mse")
    return model


def classifier(strategy: Any) -> Any:
    """One softmax head, sparse labels: for class_weight."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        i = keras.Input((3,))
        h = keras.layers.Dense(4, activation="tanh")(i)
        model = keras.Model(i, keras.layers.Dense(3, activation="softmax")(h))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def verdict(model: Any, x: Any, y: Any, **kwargs: Any) -> dict[str, Any]:
    before = state(model)
    out: dict[str, Any] = {}
    try:
        report = gradcheck.check_keras_model(model, x, y, seed=0, **kwargs)
    except gradcheck.GradcheckError as exc:
        out.update(error=type(exc).__name__, message=str(exc))
    else:
        doc = report.to_dict()
        out.update(
            status=report.status,
            tensor=report.location.tensor if report.location else None,
            notes=report.notes,
            cost=doc["cost"],
            error_over_tolerance=report.error / report.tolerance
            if report.tolerance
            else None,
        )
    after = state(model)
    # Keras builds the compiled loss's per-output trackers on a model's first
    # step (train_on_batch and fit alike): they may appear, as fresh as Keras
    # makes them; everything that existed before must be bit-identical
    old = dict(before["values"])
    new = [(p, c) for p, c in after["values"] if p not in old]
    out["state_equal"] = (
        after["objects"] == before["objects"]
        and all(dict(after["values"]).get(p) == c for p, c in old.items())
        and all(p.startswith("compile_loss/") for p, _ in new)
        and all(
            not np.frombuffer(data, dtype).any()
            for _, copies in new
            for dtype, data in copies
        )
    )
    return out


def scenarios() -> dict[str, Callable[[], dict[str, Any]]]:
    two = tf.distribute.MirroredStrategy(TWO)
    one = tf.distribute.MirroredStrategy(["/CPU:0"])
    default = tf.distribute.get_strategy()

    def inside_scope() -> dict[str, Any]:
        model = two_heads(two)
        with two.scope():
            return verdict(model, X, Y, sample_weight=SW)

    def uneven() -> dict[str, Any]:
        x = RNG.random((5, 3)).astype("float32")
        y = {k: RNG.random((5, v.shape[1])).astype("float32") for k, v in Y.items()}
        return verdict(two_heads(two), x, y)

    return {
        "correct_2": lambda: verdict(
            two_heads(two, trained=True), X, Y, sample_weight=SW
        ),
        "correct_eager_2": lambda: _eager(two_heads(two)),
        "correct_1": lambda: verdict(two_heads(one), X, Y, sample_weight=SW),
        "doubled_2": lambda: verdict(
            two_heads(two, doubled, trained=True), X, Y, sample_weight=SW
        ),
        "doubled_1": lambda: verdict(two_heads(one, doubled), X, Y, sample_weight=SW),
        "mean_loss_2": lambda: verdict(mean_loss(two), X, Y["b"]),
        "mean_loss_1": lambda: verdict(mean_loss(one), X, Y["b"]),
        "mean_loss_none": lambda: verdict(mean_loss(default), X, Y["b"]),
        "dropout_2": lambda: verdict(dropout(two), X, Y["b"]),
        "batchnorm_2": lambda: verdict(batchnorm(two, False), X, Y["b"]),
        "batchnorm_frozen_2": lambda: verdict(
            batchnorm(two, False, frozen=True), X, Y["b"]
        ),
        "batchnorm_synchronized_2": lambda: verdict(batchnorm(two, True), X, Y["b"]),
        "class_weight_2": lambda: verdict(
            classifier(two),
            X,
            np.array([0, 2, 1, 2]),
            class_weight={0: 0.5, 1: 1.0, 2: 3.0},
        ),
        "inside_scope": inside_scope,
        "uneven_2": uneven,
    }


def _eager(model: Any) -> dict[str, Any]:
    model.run_eagerly = True
    return verdict(model, X, Y, sample_weight=SW)


def main(names: list[str]) -> None:
    # a stuck run ends with every thread's stack on stderr (the test shows it)
    # instead of the test's timeout killing it silently
    faulthandler.dump_traceback_later(
        float(os.environ.get("GRADCHECK_WORKER_DEADLINE", "200")), exit=True
    )
    warnings.filterwarnings("ignore")
    # the scenarios' own fit calls under the strategy stall for minutes when the
    # garbage collector runs in a replica's thread (see keras_mirrored.run_step,
    # which guards gradcheck's step the same way): off for this short process
    gc.disable()
    table = scenarios()
    results = {}
    for name in names or list(table):
        started = time.perf_counter()
        try:
            results[name] = table[name]()
        except Exception as exc:  # a crash is a verdict the test reports
            results[name] = {
                "crash": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        results[name]["seconds"] = time.perf_counter() - started
        print(name, results[name]["seconds"], file=sys.stderr, flush=True)
    results["_devices"] = len(tf.config.list_logical_devices("CPU"))
    print(json.dumps(results), flush=True)
    sys.stderr.flush()
    # the interpreter's shutdown can wait forever on TensorFlow's threads (seen
    # under pytest: every scenario done, "<no Python frame>" for minutes)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
