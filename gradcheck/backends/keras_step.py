"""The Keras side of check_keras_model (:mod:`gradcheck.properties.keras_training`):
Keras' own train step recorded by an optimizer that never applies what it gets,
the snapshot and restore of everything a step or a forward pass changes (variables,
metrics, optimizer, train function, seed states), loss resolution as compile() does
it, and the Keras calls the property needs (backend, version, floatx, NumPy copies).

The independent side's gradients come from the backend Keras runs on:
:mod:`gradcheck.backends.keras_tensorflow` (GradientTape) or
:mod:`gradcheck.backends.keras_torch` (torch.autograd), see :func:`gradient_ops`."""

from __future__ import annotations

import collections
import functools
import importlib
import random
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras.optimizers import LossScaleOptimizer

from gradcheck.errors import (
    FrameworkNotInstalledError,
    InvalidArgumentError,
    KerasStepError,
)

try:
    from keras.src.backend.common import global_state
except ImportError:  # pragma: no cover - private module moved
    global_state = None

try:
    from keras.src.losses.losses import LossFunctionWrapper
except ImportError:  # pragma: no cover - private module moved

    class LossFunctionWrapper(keras.losses.Loss):  # type: ignore[no-redef]
        def __init__(self, fn: Callable[..., Any], name: str):
            super().__init__(name=name)
            self.fn = fn

        def call(self, y_true: Any, y_pred: Any) -> Any:
            return self.fn(y_true, y_pred)


__all__ = [
    "Captured",
    "Snapshot",
    "backend",
    "capture",
    "check_keras3",
    "compiled",
    "distribution",
    "floatx",
    "gradient_ops",
    "is_model",
    "loss_scale",
    "numpy",
    "resolve_loss",
    "summed",
    "version",
]


# --------------------------------------------------------------------- keras
def check_keras3() -> None:
    """Raise unless this is Keras 3."""
    if not hasattr(keras, "Variable"):  # pragma: no cover - Keras 2 / tf.keras
        raise FrameworkNotInstalledError(
            f"check_keras_model needs Keras 3; found keras {keras.__version__}."
        )


def is_model(model: Any) -> bool:
    return isinstance(model, keras.Model)


def backend() -> str:
    """The backend Keras runs on ("tensorflow", "torch", "jax", ...)."""
    return keras.backend.backend()


def version() -> str:
    return keras.__version__


def floatx() -> str:
    return keras.config.floatx()


def distribution(model: Any) -> Any:
    """The tf.distribute strategy the model trains under, and the one whose scope
    is active at the call: a :class:`gradcheck.backends.keras_mirrored.
    Distribution`, or None (no strategy anywhere, or not the TensorFlow backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from gradcheck.backends import keras_mirrored

    return keras_mirrored.distribution(model)


def summed(value: Any) -> Any:
    """``sum(value)`` in floatx, as a Keras tensor (a model.losses penalty)."""
    return keras.ops.sum(keras.ops.cast(value, keras.config.floatx()))


def gradient_ops(backend: str) -> Any:
    """Per-loss values and gradients on Keras' ``backend``: an object with
    ``value_and_grads``, ``grad_state``/``restore_grad_state`` and
    ``rng_state``/``restore_rng``."""
    if backend == "tensorflow":
        from gradcheck.backends.keras_tensorflow import TensorFlowOps

        return TensorFlowOps()
    from gradcheck.backends.keras_torch import TorchOps

    return TorchOps()


# --------------------------------------------------------------------- values
def loss_scale(optimizer: Any) -> tuple[float, str | None]:
    """The factor the user's optimizer multiplies the loss by in ``scale_loss`` (and
    divides the gradient by in ``apply``): the dynamic scale of a
    LossScaleOptimizer (mixed precision), else ``loss_scale_factor``. Both sides
    scale and unscale by it, so float16 gradients underflow alike."""
    if optimizer is None:
        return 1.0, None
    if isinstance(optimizer, LossScaleOptimizer):
        value = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        scale = float(np.asarray(numpy(value)))
        return scale, (
            f"the optimizer is a LossScaleOptimizer: both sides scale the loss by its "
            f"current dynamic scale {scale:g} and unscale the gradients."
        )
    factor = getattr(optimizer, "loss_scale_factor", None)
    if factor:
        return float(
            factor
        ), f"both sides scale the loss by loss_scale_factor={factor}."
    return 1.0, None


def numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a Keras tensor or variable."""
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


# --------------------------------------------------------------------- state
def _global_seed_state() -> Any:
    if global_state is None:  # pragma: no cover - private module moved
        return None
    gen = global_state.get_global_attribute("global_seed_generator")
    return getattr(gen, "state", None)


class Snapshot:
    """Everything of the user's a train step and a forward pass can change."""

    _ATTRS = (
        "optimizer",
        "train_function",
        "test_function",
        "predict_function",
        "stop_training",
    )

    def __init__(self, model: Any, ops: Any):
        self.model = model
        self.ops = ops
        found: dict[int, Any] = {}
        candidates = list(model.variables) + list(model.metrics_variables)
        seed_state = _global_seed_state()
        if seed_state is not None:
            candidates.append(seed_state)
        for v in candidates:
            found.setdefault(id(v), v)
        # a variable created under a tf.distribute strategy has one copy per
        # replica (mirrored: equal; sync-on-read metrics: each replica's share):
        # each copy is saved and put back as it was, not the value read across
        # replicas (assigning that to a sync-on-read SUM variable divides it)
        self.values = [(v, numpy(v), ops.components(v)) for v in found.values()]
        self.copies = [
            [(c, numpy(c)) for c in comps] if comps else None
            for _, _, comps in self.values
        ]
        self.metrics = {id(m) for m in model.metrics}
        self.attrs = {a: getattr(model, a, None) for a in self._ATTRS}
        compile_loss = model._compile_loss
        compile_metrics = getattr(model, "_compile_metrics", None)
        self.unbuilt = [
            c
            for c in (compile_loss, compile_metrics)
            if c is not None and not getattr(c, "built", True)
        ]
        self.grads = ops.grad_state(model.variables)
        self.rng = (np.random.get_state(), random.getstate(), ops.rng_state())

    def reset_values(self) -> None:
        """Variables and RNG states as they were: the next pass (Keras' step or
        the independent one) starts from the same point and draws the same
        dropout masks."""
        for (v, value, _), copies in zip(self.values, self.copies, strict=True):
            if copies:
                for c, c_value in copies:
                    c.assign(c_value)
            else:
                v.assign(value)
        np_state, py_state, framework_state = self.rng
        np.random.set_state(np_state)
        random.setstate(py_state)
        if framework_state is not None:
            self.ops.restore_rng(framework_state)

    def restore(self, unbuild: bool = False) -> None:
        model = self.model
        errors: list[BaseException] = []
        for a, value in self.attrs.items():
            try:
                setattr(model, a, value)
            except Exception as exc:  # pragma: no cover - restore the rest first
                errors.append(exc)
        if unbuild:
            # a step that raised while Keras built its CompileLoss/CompileMetrics
            # leaves them half built (later steps then log nothing): unbuild them
            for c in self.unbuilt:
                _unbuild(c)
        try:
            self.reset_values()
        except Exception as exc:  # pragma: no cover
            errors.append(exc)
        for m in model.metrics:
            if id(m) not in self.metrics:  # built by the step: as fresh as it was
                m.reset_state()
        self.ops.restore_grad_state(self.grads)
        if errors:  # pragma: no cover
            raise errors[0]


def _unbuild(compile_obj: Any) -> None:
    compile_obj.built = False
    if hasattr(compile_obj, "_flat_losses"):
        compile_obj._flat_losses = None
        compile_obj._y_pred_build_structure = None
        compile_obj._y_true_build_structure = None
    metrics = getattr(compile_obj, "_metrics", None)
    if isinstance(metrics, list):
        metrics.clear()


# --------------------------------------------------------------------- losses
def resolve_loss(identifier: Any, target: Any, pred: Any) -> tuple[Any, str]:
    """A ``keras.losses.Loss`` for what the user passed (string, function, Loss)."""
    losses = keras.losses
    if isinstance(identifier, losses.Loss):
        return identifier, identifier.name
    if isinstance(identifier, str):
        label = identifier
        if identifier.lower() in ("crossentropy", "ce"):
            # Keras picks by shapes (documented for compile's "crossentropy")
            t_shape, p_shape = tuple(np.shape(target)), tuple(pred.shape)
            if p_shape[-1] == 1:
                fn = losses.binary_crossentropy
            elif len(t_shape) < len(p_shape) or (t_shape[-1] == 1 and p_shape[-1] > 1):
                fn = losses.sparse_categorical_crossentropy
            else:
                fn = losses.categorical_crossentropy
        else:
            fn = losses.get(identifier)
    else:
        fn = losses.get(identifier)
        label = getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
    if isinstance(fn, losses.Loss):
        return fn, label
    if not callable(fn):
        raise InvalidArgumentError(f"compile(loss=...) has {identifier!r}: not a loss.")
    return _wrap(fn, label), label


def _wrap(fn: Callable[..., Any], name: str) -> Any:
    """A loss function as a ``Loss`` (sum_over_batch_size, sample weights, masks):
    Keras' own wrapper, which also aligns the ranks of y_true and y_pred."""
    return LossFunctionWrapper(fn, name=name)


# --------------------------------------------------------------------- capture
@functools.cache
def _recorder_class() -> type:
    """A ``keras.optimizers.Optimizer`` that records, and never applies, gradients.

    Built on first use. ``apply`` is overridden as a whole: the base class would
    also apply variable constraints and weight decay to the *model's* weights."""

    class GradientRecorder(keras.optimizers.Optimizer):
        def __init__(self, variables: Sequence[Any]):
            super().__init__(learning_rate=0.0, name="gradcheck_recorder")
            self.build(list(variables))

        def build(self, variables: list[Any]) -> None:
            if self.built:
                return
            super().build(variables)
            self._gradients = [
                self.add_variable_from_reference(v, name="gradient") for v in variables
            ]
            self._calls = [
                self.add_variable(
                    (), dtype="float32", initializer="zeros", name="calls"
                )
                for _ in variables
            ]
            self._scale = self.add_variable(
                (), dtype="float32", initializer="ones", name="scale"
            )
            self.built = True

        def scale_loss(self, loss: Any) -> Any:
            return loss * keras.ops.cast(self._scale, loss.dtype)

        def apply(self, grads: Any, trainable_variables: Any = None) -> None:
            grads = list(grads)
            if trainable_variables is None:
                trainable_variables = self._trainable_variables
            for g, v in zip(grads, trainable_variables, strict=True):
                if g is not None:
                    self.update_step(g, v, None)
            self._iterations.assign_add(1)

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            key = self._var_key(variable)
            if key not in self._trainable_variables_indices:
                return  # not one of the model's trainable variables
            i = self._trainable_variables_indices[key]
            if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
                # IndexedSlices (Embedding) exist on TF only
                gradient = importlib.import_module(
                    "gradcheck.backends.keras_tensorflow"
                ).dense(gradient)
            target = self._gradients[i]
            g = keras.ops.cast(gradient, target.dtype)
            target.assign_add(g / keras.ops.cast(self._scale, target.dtype))
            self._calls[i].assign_add(1.0)

        def reset(self, scale: float) -> None:
            for v in self._gradients:
                v.assign(keras.ops.zeros(v.shape, v.dtype))
            for c in self._calls:
                c.assign(0.0)
            self._scale.assign(scale)

        def read(self) -> tuple[list[np.ndarray], list[int]]:
            return (
                [numpy(v).astype(np.float64) for v in self._gradients],
                [int(numpy(c)) for c in self._calls],
            )

    return GradientRecorder


@dataclass
class _Cached:
    """The recorder and the train function traced with it, for one model.

    Valid while the model's own cached train function is the one seen when the
    entry was made: Keras drops it on compile() and make_train_function(force=True),
    which is when it would retrace too (Python state a train_step reads at trace
    time is then read again, as in fit)."""

    model: weakref.ref[Any]
    key: tuple[Any, ...]
    compile_loss: Any
    user_function: Any
    recorder: Any
    train_function: Any = None


#: The last few models' entries, by id (checked against ``model``). Bounded, not a
#: WeakKeyDictionary: the traced train function refers to its model, so an entry
#: keeps its model alive; a small LRU bounds that instead of leaking every model an
#: audit builds, and the user's model object is never given an attribute.
_CACHE: collections.OrderedDict[int, _Cached] = collections.OrderedDict()
_CACHE_SIZE = 4


def _cache_key(model: Any, variables: Sequence[Any]) -> tuple[Any, ...]:
    """What a traced step depends on besides the data; train_step/compute_loss by
    their function, so an override set on the instance counts too."""
    return (
        getattr(model.train_step, "__func__", model.train_step),
        getattr(model.compute_loss, "__func__", model.compute_loss),
        id(getattr(model, "_compile_metrics", None)),
        tuple(id(v) for v in variables),
        bool(model.run_eagerly),
        bool(model.jit_compile),
        int(getattr(model, "steps_per_execution", 1) or 1),
    )


def _recorder_for(
    model: Any, variables: Sequence[Any], make: Callable[..., Any] | None = None
) -> _Cached:
    """The cached entry for ``model``; ``make(model, variables)`` builds a new
    recorder (default: a plain one)."""
    key = _cache_key(model, variables)
    entry = _CACHE.get(id(model))
    if (
        entry is None
        or entry.model() is not model
        or entry.key != key
        or entry.compile_loss is not model._compile_loss
        or entry.user_function is not model.train_function
    ):
        entry = _Cached(
            weakref.ref(model),
            key,
            model._compile_loss,
            model.train_function,
            make(model, variables) if make else _recorder_class()(variables),
        )
    _CACHE[id(model)] = entry
    _CACHE.move_to_end(id(model))
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


@dataclass
class Captured:
    grads: list[np.ndarray]
    calls: list[int]
    logs: dict[str, float]
    how: str
    #: log keys whose Mean tracker the step never updated (a custom train_step
    #: that skips compute_loss or the loss tracker reports their initial 0)
    stale: set[str] = field(default_factory=set)
    #: the step drew from the model's SeedGenerators (dropout & co.): set for a
    #: step under a strategy, where each replica draws for its own shard
    random: bool = False
    #: BatchNormalization layers (synchronized=False) that ran in training mode
    #: in a step under a strategy: each replica normalised its own shard
    per_replica_norms: tuple[str, ...] = ()


def capture(
    model: Any,
    x: Any,
    y: Any,
    sample_weight: Any,
    class_weight: Any,
    variables: Sequence[Any],
    scale: float,
    *,
    eagerly: bool = False,
) -> Captured:
    """One ``train_on_batch`` with the recorder as the optimizer; the caller's
    snapshot puts the optimizer, functions, variables and metrics back.

    A model built under a tf.distribute strategy runs ``fit``'s distributed step
    instead (:func:`gradcheck.backends.keras_mirrored.run_step`: the batch split
    over the replicas by the strategy's distributed dataset; ``train_on_batch``
    would hand every replica the whole batch), with a recorder made in the
    strategy's scope that records the all-reduced gradient.

    ``eagerly``: the same step run eagerly (``run_eagerly=True`` for this one call,
    with a train function made for it and dropped afterwards; the traced one stays
    cached)."""
    strategy = distribution(model)
    mirrored = None
    if strategy is not None and strategy.strategy is not None:
        from gradcheck.backends import keras_mirrored as mirrored
    entry = _recorder_for(model, variables, mirrored.recorder if mirrored else None)
    entry.recorder.reset(scale)
    how = "run eagerly" if eagerly else _how(model)
    if mirrored is not None:
        how += (
            f" under {strategy.strategy} ({strategy.replicas} replica"
            f"{'s' if strategy.replicas != 1 else ''}: fit's distributed step)"
        )
        seeds = mirrored.seed_states(model)
        seeds_before = [numpy(v) for v in seeds]
        norms = mirrored.unsynchronized_norms(model)
        norms_before = [numpy(v) for _, v in norms]
    user_optimizer, user_function = model.optimizer, model.train_function
    user_eagerly = model.run_eagerly
    model.optimizer = entry.recorder
    model.train_function = None if eagerly else entry.train_function
    try:
        if eagerly:
            model.run_eagerly = True
        if mirrored is not None:
            logs = mirrored.run_step(model, x, y, sample_weight, class_weight)
        else:
            logs = model.train_on_batch(
                x,
                y,
                sample_weight=sample_weight,
                class_weight=class_weight,
                return_dict=True,
            )
        if not eagerly:
            entry.train_function = model.train_function
        stale = _stale_trackers(model)
    except Exception as exc:
        if not eagerly:
            entry.train_function = None
        raise KerasStepError(
            "Keras' own train step ("
            + (
                "fit's distributed step under the model's strategy"
                if mirrored is not None
                else "model.train_on_batch, as fit runs it"
            )
            + (", run eagerly" if eagerly else "")
            + f") raised {type(exc).__name__}: {exc}"
            + _step_hint(exc, x, y, sample_weight)
        ) from exc
    finally:
        model.optimizer, model.train_function = user_optimizer, user_function
        model.run_eagerly = user_eagerly
    grads, calls = entry.recorder.read()
    floats = _floats(logs)
    # a tracker the step never updated reports its initial 0
    stale = {k for k in stale if floats.get(k) == 0.0}
    random, per_replica = False, ()
    if mirrored is not None:
        random = any(
            not np.array_equal(numpy(v), before)
            for v, before in zip(seeds, seeds_before, strict=True)
        )
        per_replica = tuple(
            name
            for (name, v), before in zip(norms, norms_before, strict=True)
            if not np.array_equal(numpy(v), before)
        )
    return Captured(grads, calls, floats, how, stale, random, per_replica)


def compiled(model: Any) -> bool:
    """Whether Keras' step runs compiled (a tf.function, XLA, torch.compile)."""

    if model.run_eagerly:
        return False
    return keras.backend.backend() == "tensorflow" or bool(model.jit_compile)


def _how(model: Any) -> str:
    """How the train step ran, in words, for the report."""

    if model.run_eagerly:
        return "run eagerly (run_eagerly=True)"
    if keras.backend.backend() == "torch":
        if model.jit_compile:
            return "compiled with torch.compile (jit_compile=True)"
        return "run by the torch backend (eager: jit_compile=False)"
    xla = " with XLA" if model.jit_compile else ""
    return f"compiled as a tf.function{xla} (jit_compile={model.jit_compile})"


def _floats(logs: Any) -> dict[str, float]:
    floats = {}
    for k, v in (logs or {}).items():
        try:
            floats[str(k)] = float(np.asarray(v))
        except (TypeError, ValueError):
            continue
    return floats


def _stale_trackers(model: Any) -> set[str]:
    trackers = [getattr(model, "_loss_tracker", None)]
    trackers += list(getattr(model._compile_loss, "metrics", None) or [])
    stale = set()
    for m in trackers:
        count = getattr(m, "count", None)
        if count is not None and float(np.asarray(numpy(count))) == 0.0:
            stale.add(m.name)
    return stale


def _step_hint(exc: BaseException, x: Any, y: Any, sample_weight: Any) -> str:
    if isinstance(sample_weight, Mapping) and isinstance(exc, KeyError):
        return (
            ". (Keras 3 resolves a sample_weight dict by the loss's path: for a "
            "model with list outputs that is an index, so pass a list in output "
            "order.)"
        )
    if isinstance(sample_weight, (list, tuple)) and isinstance(exc, TypeError):
        return (
            ". (For a model with dict outputs Keras 3 needs sample_weight as a dict "
            "keyed by output name.)"
        )
    return ""
