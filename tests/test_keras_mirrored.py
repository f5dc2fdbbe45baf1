"""check_keras_model on models built and compiled under tf.distribute strategies.

The two-replica scenarios run in a fresh interpreter (tests/_mirrored_worker.py):
splitting the CPU into two logical devices must happen before TensorFlow
initialises its devices, which other tests in this process may have done. The
worker runs every scenario once (one TensorFlow start-up) and answers JSON; each
test below reads its scenario's verdict. A one-replica MirroredStrategy (what a
user with one device gets) is also checked here, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip(
        "tf.distribute needs Keras' TensorFlow backend", allow_module_level=True
    )

import tensorflow as tf  # noqa: E402

import gradcheck  # noqa: E402

WORKER = Path(__file__).with_name("_mirrored_worker.py")
ROOT = WORKER.parent.parent


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Any]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        KERAS_BACKEND="tensorflow",
        GRADCHECK_WORKER_DEADLINE="200",
    )
    done = subprocess.run(
        [sys.executable, str(WORKER)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["_devices"] == 2, "the worker did not get two logical CPUs"
    crashed = {
        k: v["traceback"]
        for k, v in out.items()
        if isinstance(v, dict) and "crash" in v
    }
    assert not crashed, crashed
    return out


def _notes(v: dict[str, Any]) -> str:
    return "\n".join(v.get("notes", []))


def test_correct_model_passes_on_two_replicas(verdicts: dict[str, Any]) -> None:
    # dict outputs, loss weights 0.5/2, mse + mae, an L2 penalty, sample weights
    for name in ("correct_2", "correct_eager_2"):
        v = verdicts[name]
        assert v["status"] == "passed", (name, v)
        assert v["cost"]["replicas"] == 2
        assert "strategy: MirroredStrategy, num_replicas_in_sync=2" in _notes(v)
        assert "(CPU:0, CPU:1)" in _notes(v)
        assert v["error_over_tolerance"] < 0.1
    assert "run eagerly" in _notes(verdicts["correct_eager_2"])


def test_class_weight_on_two_replicas(verdicts: dict[str, Any]) -> None:
    v = verdicts["class_weight_2"]
    assert v["status"] == "passed", v


def test_one_replica_strategy_passes(verdicts: dict[str, Any]) -> None:
    v = verdicts["correct_1"]
    assert v["status"] == "passed", v
    assert v["cost"]["replicas"] == 1
    assert "num_replicas_in_sync=1" in _notes(v)


@pytest.mark.parametrize("name", ["doubled_2", "doubled_1"])
def test_doubled_compute_loss_is_a_mismatch(verdicts: dict[str, Any], name) -> None:
    v = verdicts[name]
    assert v["status"] == "mismatch", v
    assert v["tensor"] and v["tensor"].startswith("dense"), v
    assert v["error_over_tolerance"] > 100


def test_mean_over_the_replica_batch_is_caught_only_with_replicas(
    verdicts: dict[str, Any],
) -> None:
    """Keras' compute_loss docstring example (ops.mean over the replica's batch +
    penalties, no 1/num_replicas_in_sync): right on one device, twice the
    gradient on two replicas."""
    v = verdicts["mean_loss_2"]
    assert v["status"] == "mismatch", v
    assert v["tensor"] is not None
    assert "2 x the global batch's in every tensor" in _notes(v)
    assert verdicts["mean_loss_1"]["status"] == "passed", verdicts["mean_loss_1"]
    assert verdicts["mean_loss_none"]["status"] == "passed"


def test_dropout_under_replicas_is_not_judged(verdicts: dict[str, Any]) -> None:
    v = verdicts["dropout_2"]
    assert v["status"] == "nondeterministic", v
    assert "each of the 2 replicas" in _notes(v)


def test_batchnorm_per_replica_statistics(verdicts: dict[str, Any]) -> None:
    """Unsynchronised BatchNormalization in training mode normalises each shard
    by itself: refused with the fix named; synchronized=True (statistics
    all-reduced) passes, and so does a frozen one (inference mode)."""
    v = verdicts["batchnorm_2"]
    assert v["error"] == "UnsupportedInputError"
    assert "'batch_normalization' ran in training mode" in v["message"]
    assert "synchronized=True" in v["message"]
    for name in ("batchnorm_synchronized_2", "batchnorm_frozen_2"):
        assert verdicts[name]["status"] == "passed", (name, verdicts[name])


def test_refusals(verdicts: dict[str, Any]) -> None:
    v = verdicts["inside_scope"]
    assert v["error"] == "UnsupportedInputError"
    assert "after the with block" in v["message"]
    v = verdicts["uneven_2"]
    assert v["error"] == "InvalidArgumentError"
    assert "batch of 5 does not split evenly over the 2 replicas" in v["message"]


def test_every_copy_of_every_variable_is_restored(verdicts: dict[str, Any]) -> None:
    """Model weights, Adam's iterations and slots, metric variables: each
    replica's copy bit for bit, after passing, failing and refused checks."""
    for name, v in verdicts.items():
        if not name.startswith("_"):
            assert v["state_equal"], name


# ----------------------------------------------------------------- in process
def _one_device_model(double: bool = False) -> Any:
    keras.utils.set_random_seed(1)
    with tf.distribute.MirroredStrategy(["/CPU:0"]).scope():
        i = keras.Input((3,))
        h = keras.layers.Dense(4, activation="tanh", kernel_regularizer="l2")(i)
        model = keras.Model(i, [keras.layers.Dense(2)(h), keras.layers.Dense(1)(h)])
        if double:
            original = model.compute_loss
            model.compute_loss = lambda *a, **k: 2.0 * original(*a, **k)
        model.compile(optimizer="adam", loss=["mse", "mse"], loss_weights=[1.0, 0.3])
    return model


def _data() -> tuple[Any, Any]:
    rng = np.random.default_rng(1)
    x = rng.random((6, 3)).astype("float32")
    return x, [
        rng.random((6, 2)).astype("float32"),
        rng.random((6, 1)).astype("float32"),
    ]


def test_one_device_strategy_in_process() -> None:
    """A MirroredStrategy over one device: what a user whose process has one
    logical device gets (this pytest process, whatever ran before)."""
    x, y = _data()
    model = _one_device_model()
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    before = [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]
    report = gradcheck.check_keras_model(model, x, y, seed=0)
    assert report.passed, report.message()
    assert report.cost["replicas"] == 1
    bad = _one_device_model(double=True)
    failed = gradcheck.check_keras_model(bad, x, y, seed=0)
    assert failed.status == "mismatch"
    after = [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


# ----------------------------------------------------------------- the audit job
@pytest.mark.slow
def test_audit_mirrored_jobs_catch_the_doubled_loss_and_pass_correct_models() -> None:
    """gradcheck._audit_tensorflow.mirrored_jobs: two jobs (correct, planted),
    run through the audit's own search in a worker with two logical CPUs."""
    from gradcheck import _audit_tensorflow as audit_tf
    from gradcheck.audit import run_job

    jobs = list(audit_tf.mirrored_jobs(0))
    assert [j.planted for j in jobs] == [None, audit_tf.MIRRORED_BUG]
    assert all(j.device == "MirroredStrategy:2" for j in jobs)
    try:
        for job in jobs:
            outcome = run_job(job, examples=3, seed=0)
            assert outcome.error is None, outcome.error
            assert outcome.examples == 3
            expected = "passed" if job.planted is None else "mismatch"
            assert outcome.statuses == {expected: 3}, outcome.statuses
            assert outcome.report.cost["replicas"] == 2
    finally:
        audit_tf.stop_mirrored_worker()
