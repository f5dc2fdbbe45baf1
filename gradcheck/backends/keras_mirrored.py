"""check_keras_model on a model built and compiled under a ``tf.distribute``
strategy (:mod:`gradcheck.properties.keras_training` decides; this module runs).

What runs is the strategy's own step, the way ``fit`` runs it on the TensorFlow
backend of Keras 3 (keras/src/backend/tensorflow/trainer.py):

* the data goes through Keras' ``TFEpochIterator`` with the whole batch as one
  global batch, which calls ``strategy.experimental_distribute_dataset``: each
  replica gets its shard (n / num_replicas_in_sync examples);
* ``model.make_train_function()`` wraps ``train_step`` in ``strategy.run`` (a
  ``tf.function``, XLA when ``jit_compile``; eager under ``run_eagerly``);
* in each replica ``compute_loss`` scales every mean-reduced loss and each
  ``model.losses`` penalty by ``1 / num_replicas_in_sync``
  (``losses.loss.scale_loss_for_distribution``, ``_aggregate_additional_loss``),
  and the optimizer *sums* the replicas' gradients (``TFOptimizer.
  _all_reduce_sum_gradients``, ``ReduceOp.SUM``) before its update, which runs
  on every device (``merge_call`` + ``extended.update``).

For equal shards that sum is the gradient of the global batch: what the
property compares it with. The recording optimizer here does exactly what the
user's optimizer does up to its update (it calls Keras' own
``_backend_update_step``: the cross-replica all-reduce, then ``update_step`` on
each device) and records instead of updating: so what is recorded is the
gradient the user's optimizer receives after the cross-replica reduction.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from gradcheck.backends.keras_step import _recorder_class

try:  # private: fit's own iterator (distributes the dataset as fit does)
    from keras.src.backend.tensorflow.trainer import TFEpochIterator
    from keras.src.utils.python_utils import pythonify_logs
except ImportError:  # pragma: no cover - private modules moved
    TFEpochIterator = None
    pythonify_logs = None

__all__ = ["Distribution", "distribution", "recorder", "run_step", "seed_states"]

#: strategies whose step gradcheck can run in this process: every replica lives
#: here (a multi-worker strategy's step waits for the other workers)
LOCAL_STRATEGIES = ("MirroredStrategy", "OneDeviceStrategy")


@dataclass(frozen=True)
class Distribution:
    """The strategy a model trains under, or the one whose scope is active."""

    #: the strategy's class name, e.g. "MirroredStrategy"; None: the model was
    #: built outside any strategy scope
    strategy: str | None
    replicas: int
    devices: tuple[str, ...]
    #: whether every replica runs in this process (MirroredStrategy,
    #: OneDeviceStrategy and their subclasses)
    local: bool
    #: the class name of the strategy whose scope is active at the call, or None
    scope: str | None


def _local(strategy: Any) -> bool:
    return any(
        c.__name__ in LOCAL_STRATEGIES
        and c.__module__.startswith("tensorflow.python.distribute")
        for c in type(strategy).__mro__
    )


def distribution(model: Any) -> Distribution | None:
    """The model's strategy (None: built outside a scope and none active)."""
    strategy = getattr(model, "_distribute_strategy", None)
    scope = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    if strategy is None and scope is None:
        return None
    return Distribution(
        strategy=type(strategy).__name__ if strategy is not None else None,
        replicas=int(strategy.num_replicas_in_sync) if strategy is not None else 1,
        devices=tuple(
            # "/job:localhost/replica:0/task:0/device:CPU:1" -> "CPU:1"
            str(d).rsplit("device:", 1)[-1]
            for d in getattr(strategy.extended, "worker_devices", ())
        )
        if strategy is not None
        else (),
        local=strategy is not None and _local(strategy),
        scope=type(scope).__name__ if scope is not None else None,
    )


@functools.cache
def _distributed_recorder_class() -> type:
    base = _recorder_class()

    class DistributedGradientRecorder(base):  # type: ignore[misc, valid-type]
        """The recorder for a step under a strategy: created in the strategy's
        scope (its variables are mirrored like the user's optimizer's), and its
        ``apply`` goes through Keras' own cross-replica path."""

        def apply(self, grads: Any, trainable_variables: Any = None) -> None:
            grads = list(grads)
            if trainable_variables is None:
                trainable_variables = self._trainable_variables
            pairs = [
                (g, v)
                for g, v in zip(grads, trainable_variables, strict=True)
                if g is not None
            ]
            if pairs:
                # TFOptimizer._backend_update_step: all-reduce (SUM) of the
                # replicas' gradients, then update_step (the recording one) on
                # every device, exactly as the user's optimizer would
                self._backend_update_step(
                    [g for g, _ in pairs], [v for _, v in pairs], self.learning_rate
                )
            self._iterations.assign_add(1)

    return DistributedGradientRecorder


def recorder(model: Any, variables: Sequence[Any]) -> Any:
    """A recording optimizer created in the model's strategy scope."""
    with model.distribute_strategy.scope():
        return _distributed_recorder_class()(variables)


def unsynchronized_norms(model: Any) -> list[tuple[str, Any]]:
    """(name, moving mean) of every BatchNormalization with
    ``synchronized=False``: in training mode each replica normalises its own shard
    with the shard's statistics (and moves its moving mean). Whether one runs in
    training mode shows only in the step (a layer may be called with
    training=False), by its moving mean moving."""
    return [
        (layer.name, layer.moving_mean)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
        and not getattr(layer, "synchronized", False)
        and getattr(layer, "moving_mean", None) is not None
    ]


def seed_states(model: Any) -> list[Any]:
    """The model's SeedGenerator states (Dropout & co. draw from them)."""
    return [
        v
        for v in model.variables
        if str(getattr(v, "path", "")).endswith("seed_generator_state")
    ]


def run_step(
    model: Any, x: Any, y: Any, sample_weight: Any, class_weight: Any
) -> dict[str, Any]:
    """One step of ``fit`` on the batch: Keras' distributed train function on an
    iterator over the strategy's distributed dataset, the batch as one global
    batch (``batch_size`` = its length, no shuffle). Returns Keras' logs."""
    if TFEpochIterator is None:  # pragma: no cover - private modules moved
        raise RuntimeError(
            "keras.src.backend.tensorflow.trainer.TFEpochIterator is gone: this "
            "Keras is not the 3.x gradcheck reads."
        )
    leaves = [a for a in tf.nest.flatten(x) if a is not None]
    n = int(np.shape(leaves[0])[0])
    if (
        isinstance(y, Mapping)
        and isinstance(sample_weight, (list, tuple))
        and len(sample_weight) == len(y)
    ):
        # a list-output model with y keyed by output name and sample_weight a
        # list in output order: train_on_batch takes it, the strategy's dataset
        # needs one structure for both (the audit found it); y in the same order
        y = [y[k] for k in y]
    epoch = TFEpochIterator(
        x=x,
        y=y,
        sample_weight=sample_weight,
        batch_size=n,
        steps_per_epoch=None,
        shuffle=False,
        class_weight=class_weight,
        distribute_strategy=model.distribute_strategy,
        steps_per_execution=model.steps_per_execution,
    )
    # build the compiled losses/metrics under the strategy as train_on_batch does
    # (from the global batch: fit averages the first distributed batch for the
    # same shapes, at the cost of one more distributed iterator, ~0.3 s)
    model._maybe_symbolic_build(data_batch=(x, y, sample_weight))
    model.make_train_function()
    model.reset_metrics()
    logs = None
    logger = tf.get_logger()
    level = logger.level
    if model.run_eagerly:
        # "Using MirroredStrategy eagerly has significant overhead": the eager
        # run is gradcheck's (the kernels' rounding), not the user's choice
        logger.setLevel("ERROR")
    # Python's garbage collector stays off while the replicas' threads trace and
    # run the step: with it on, a replica thread stalled in tf_stack.extract_stack
    # for 20-260 s in 4 of 5 runs of tests/_mirrored_worker.py (Keras' own fit
    # under the strategy as well as this step; TensorFlow 2.21, 2 logical CPUs, a
    # loaded 2-core machine), and never in runs with it off. Not collected first:
    # a full collection among TensorFlow's objects took ~2 s
    collecting = gc.isenabled()
    gc.disable()
    try:
        with epoch.catch_stop_iteration():
            for _, _, iterator in epoch:
                logs = model.train_function(iterator)
                break
    finally:
        if collecting:
            gc.enable()
        logger.setLevel(level)
    return pythonify_logs(logs) if logs is not None else {}
