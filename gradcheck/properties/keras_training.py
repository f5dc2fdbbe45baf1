"""The keras_training property: Keras' own train step against the compile config.

``check(model, x, y, ...)`` runs the training step ``fit`` would run on a compiled
Keras 3 model (the same ``train_on_batch`` / ``make_train_function`` path: a
``tf.function``, XLA when ``jit_compile`` says so, or the torch backend's step) and
compares the gradient that step hands to the optimizer with

    sum_i w_i * grad(loss_i) + grad(sum(model.losses))

computed independently from the compile configuration: every output's loss is
paired with its output **by name**, using the user's ``loss=``/``loss_weights=`` as
written in ``compile`` (never ``CompileLoss``, whose pairing is what is being
checked). Keras' reported ``loss`` and per-output ``<name>_loss`` metrics are
compared with the independent values too. The verdict, tolerance and flow matrix
come from :func:`gradcheck.properties.linearity.judge`.

Why a recording optimizer. The gradient a train step computes never leaves it: it
goes straight into ``optimizer.apply``. Swapping ``model.optimizer`` for the
duration of one step for an optimizer whose ``apply`` *records* the incoming
gradient (and changes no weight) reads exactly what the user's optimizer would
receive, whatever the train step looks like (an overridden ``train_step`` or
``compute_loss`` included), without touching the user's optimizer: its variables,
slots and ``iterations`` are never read or written. A fresh train function is traced
for the recorder (the user's traced function calls the user's optimizer); it is
cached for the last few models checked, so checking a model again costs ~0.04 s
instead of ~0.5 s of tracing (measured on generated specs, 2 CPU cores).

Tolerance. Both sides are the framework's own gradients in the model's precision,
summed in different orders (a compiled graph, or XLA, against eager per-loss
gradients), so ``judge``'s elementwise rounding model applies unchanged (4 sigma x
4e-6 relative in float32) with one addition: every tensor's floor is FLOOR x the
*model's* largest gradient element, not only its own. A bias feeding BatchNorm
has an exactly-zero true gradient whose rounding (8e-8) comes from order-1 terms;
judged on its own scale it was a false alarm at 5e4 x the tolerance. Measured
with that floor: 125 generated specs (dense, LayerNorm, conv, GRU/LSTM,
embeddings, regularizers, sample weights with zeros) and hand-made LSTM, 8-layer
GELU, BatchNorm and dropout models with graph, eager and XLA steps stay below 0.1
x the tolerance; a planted 1% gradient scaling is ~300 x above it. Mixed precision
and float32 losses on a float64 model use the rounding of the coarsest dtype the
layers or losses compute in.

That rounding model is a prior. Deep networks with BatchNorm in training mode
amplify rounding far beyond it (keras.applications.MobileNetV3Small, 32x32, two
heads: Keras' step and the eager per-loss gradients differ by 6e-3 on elements of
~100, 15 x the prior's tolerance, and so do the eager and the tf.function
computation of the *same* gradient). So a failing gradient comparison of a
deterministic step is judged again with the rounding measured at check time on
equivalent computations (see :func:`_measured_rounding`): one backward pass of
the independent total against the per-loss passes, and Keras' step as compiled
against the same step run eagerly. Both are free of any bug in Keras' step (a
doubled, detached or mispaired loss is in both runs of the user's step), so a
wrong gradient stays wrong while no constant calibrated on one machine decides
the verdict on another. Measured: MobileNetV3Small, EfficientNetB0 at 0.2 x the
measured tolerance; a head counted twice, a detached head and Keras' sorted-name
pairing on MobileNetV3Small stay mismatches (tests/test_keras_zoo.py).

Pairing rules (what "right" means). A dict is matched by output name. A list (for
``loss``, ``loss_weights``, ``y`` or ``sample_weight``) is matched with the outputs
in the order the model *defines* them: the list order of a list-output model, the
key order of the dict a dict-output model returns (``keras.Model(inputs, {"main":
..., "aux": ...})`` defines main, then aux). Keras 3 flattens dicts in sorted key
order (``model.output_names`` is sorted for dict outputs), so it pairs a list with a
dict-output model alphabetically (keras-team/keras#20596, #20346); when that order
differs from the definition order gradcheck reports the mismatch and names the head
instead of guessing what the user meant. A single loss applies to every output; a
single (1-D) ``sample_weight`` applies to every output; no weight means 1.
Regularization (``model.losses``: kernel and activity penalties, ``add_loss``) is
one pseudo-loss named ``"regularization"`` with weight 1: loss weights do not scale
it.

State. Everything a train step and the independent forward pass can change is
restored bit for bit before returning (also when the check fails or raises): every
model variable (trainable, non-trainable such as BatchNorm statistics, seed-generator
states), every metric variable (train_on_batch resets and updates them),
``model.optimizer``, ``model.train_function`` and the other step functions,
``stop_training``, Keras' global seed generator, NumPy/Python RNG states, and on the
torch backend the parameters' ``.grad`` and torch's RNG state.

Strategies. A model built and compiled under ``tf.distribute.MirroredStrategy``
(or ``OneDeviceStrategy``) is checked under it: Keras' distributed step runs as
``fit`` runs it (the global batch split over the replicas by the strategy's
distributed dataset, ``train_step`` in each under ``strategy.run``), and what is
recorded is the gradient the optimizer receives after its cross-replica
all-reduce (:mod:`gradcheck.backends.keras_mirrored`). Keras 3.15 divides each
replica's mean-reduced losses and penalties by ``num_replicas_in_sync`` and the
all-reduce sums, so for equal shards the step's gradient is the global batch's:
the same ``sum_i w_i grad L_i + grad(sum(model.losses))`` the single-device check
computes, with the same tolerance. Refused, with the fix named: a call inside the
strategy's scope (Keras would scale the global-batch side by 1/R), a batch that
does not split evenly (Keras' fit raises on it), strategies whose replicas are
not all in this process, and unsynchronised BatchNormalization that ran in
training mode (each replica normalises its own shard, by design not the global
batch's gradient). Dropout drawing per replica makes a failing comparison
``nondeterministic``. A gradient exactly R x the global one is named as the
classic "mean over the replica's batch, no 1/R" bug.

Randomness. Dropout & co. draw their masks from SeedGenerator states, which are
model variables: the independent forward pass starts from the same states as
Keras' step, so it draws the same masks. If the comparison fails and Keras' own step
gives a different gradient when replayed from the same state, the report says
``nondeterministic`` (and the measured rounding is not used: a random step's
spread would hide anything).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gradcheck.backends import step_backend
from gradcheck.backends.base import TensorSpec
from gradcheck.errors import (
    ClassWeightError,
    FrameworkNotInstalledError,
    InvalidArgumentError,
    KerasStepError,
    NonFiniteError,
    NotCompiledError,
    NothingToDifferentiateError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl
from gradcheck.properties import linearity
from gradcheck.result import CheckReport, Location

if TYPE_CHECKING:
    from gradcheck.backends.keras_step import Captured, Snapshot

__all__ = [
    "BACKENDS",
    "PROPERTY",
    "REGULARIZATION",
    "check",
    "compile_built",
    "keras_data",
]

PROPERTY = "keras_training"
#: the pseudo-loss holding sum(model.losses) (weight 1)
REGULARIZATION = "regularization"
#: Keras backends whose train step gradcheck can read
BACKENDS = ("tensorflow", "torch")
#: how close (relative) a reported value must be to a candidate explanation
_EXPLAIN_RTOL = 1e-5


# --------------------------------------------------------------------- entry point
def check(
    model: Any,
    x: Any,
    y: Any,
    *,
    sample_weight: Any = None,
    class_weight: Mapping[int, float] | None = None,
    seed: int,
    rtol: float | None = None,
) -> CheckReport:
    """Run Keras' train step once and judge it (see the module docstring).

    Raises a :class:`~gradcheck.errors.GradcheckError` when the model cannot be
    checked: not a Keras model, not compiled (or compiled without ``loss=``),
    class_weight with several outputs, x/y/sample_weight that do not fit the
    model's inputs and outputs, or Keras' own step raising."""
    started = time.perf_counter()
    ks = _import_keras()
    _check_model(ks, model)
    backend = ks.backend()
    if backend not in BACKENDS:
        raise UnsupportedInputError(
            f"check_keras_model supports the Keras backends {BACKENDS}; this Keras "
            f"runs on {backend!r} (KERAS_BACKEND is fixed when keras is imported)."
        )
    ops = ks.gradient_ops(backend)
    strategy = _check_strategy(ks.distribution(model))
    config = _compile_config(model)
    if not model.built:
        raise UnsupportedInputError(
            f"model {model.name!r} is not built: its variables do not exist until "
            "its first call, and a check cannot create them and then leave the "
            "model as it was. Call it once first (model(x) or "
            "model.build(input_shape)), as fit would."
        )
    variables = list(model.trainable_variables)
    if not variables:
        raise NothingToDifferentiateError(
            "the model has no trainable variables: a train step changes nothing."
        )
    _check_batch(x, y, sample_weight)
    _check_shards(strategy, x)
    if class_weight is not None and sample_weight is not None:
        raise InvalidArgumentError(
            "pass sample_weight or class_weight, not both (Keras refuses both too)."
        )
    scale, scale_note = ks.loss_scale(model.optimizer)
    snapshot = ks.Snapshot(model, ops)
    try:
        side = _independent(
            ks,
            ops,
            model,
            x,
            y,
            sample_weight,
            class_weight,
            config,
            variables,
            scale,
        )
        snapshot.reset_values()
        captured = ks.capture(
            model, x, y, sample_weight, class_weight, variables, scale
        )
        _check_norms(strategy, captured)
        forwards, backwards, steps = 1.0, float(len(side.values)), 1.0
        verdict = functools.partial(
            _verdict, ks, backend, model, side, captured, variables, seed, rtol
        )
        report = verdict(scale_note)
        if not report.passed:
            snapshot.reset_values()
            replay = ks.capture(
                model, x, y, sample_weight, class_weight, variables, scale
            )
            steps += 1
            if _same_step(captured, replay) and any(
                t.status == "mismatch" for t in report.tensors
            ):
                # a failing gradient comparison of a deterministic step is judged
                # again with this model's rounding, measured on equivalent
                # computations (a random step's spread would hide anything)
                spread = _measured_rounding(
                    ks,
                    ops,
                    model,
                    (x, y, sample_weight, class_weight),
                    variables,
                    scale,
                    side,
                    captured,
                    snapshot,
                )
                prior = report
                report = verdict(scale_note, noise=spread.noise, noise_how=spread.how)
                where = prior.location.tensor if prior.location else "?"
                report.notes.insert(
                    0,
                    f"the per-element rounding model allowed {prior.tolerance:.3e} at "
                    f"{where!r} (error {prior.error:.3e}); judged with this model's "
                    "rounding measured at check time on equivalent computations"
                    + (
                        ", they still differ."
                        if any(t.status == "mismatch" for t in report.tensors)
                        else ", the gradients agree."
                    ),
                )
                forwards, backwards = forwards + 1, backwards + 1
                steps += spread.steps
            if not report.passed:
                _flag_nondeterminism(report, captured, replay)
                _flag_replica_randomness(report, captured, strategy)
    except KerasStepError:
        # Keras raised mid-step, possibly while building its CompileLoss
        snapshot.restore(unbuild=True)
        raise
    except BaseException:
        snapshot.restore()
        raise
    snapshot.restore()
    report.cost = {
        "forward": forwards,
        "backward": backwards,
        "train_steps": steps,
        "seconds": time.perf_counter() - started,
    }
    if strategy is not None:
        _strategy_notes(report, strategy, x)
        if report.status == "mismatch":
            _replica_factor_note(report, strategy, side, captured)
    return report


# --------------------------------------------------------------------- strategies
def _check_strategy(found: Any) -> Any:
    """The model's tf.distribute strategy when its step can be checked here (a
    ``keras_mirrored.Distribution``), None when the model has none; raises when
    it cannot be checked.

    Called inside ``with strategy.scope():`` the check is refused rather than
    run: Keras divides every mean-reduced loss by the active strategy's
    ``num_replicas_in_sync`` (``scale_loss_for_distribution``), so the global-batch
    side would be computed 1/R too small, and a scope cannot be left from inside
    it (TensorFlow refuses nested scopes)."""
    if found is None:
        return None
    if found.scope is not None:
        raise UnsupportedInputError(
            f"check_keras_model was called inside `with {found.scope}.scope():`. "
            "Call it after the with block: the model keeps the strategy it was "
            "built under and gradcheck runs Keras' distributed step with it; inside "
            "the scope Keras divides the losses gradcheck computes on the global "
            "batch by num_replicas_in_sync."
        )
    if found.strategy is None:
        return None
    if not found.local:
        raise UnsupportedInputError(
            f"the model trains under {found.strategy} ({found.replicas} replicas): "
            "check_keras_model runs the strategy's step in this process, which "
            "works for MirroredStrategy and OneDeviceStrategy (every replica "
            "local); a multi-worker, parameter-server or TPU step needs its other "
            "workers or hosts. Check the same model built under a MirroredStrategy."
        )
    return found


def _global_batch(x: Any) -> int | None:
    return next(
        (b for _, leaf in _leaves(x, "x") if (b := _batch_size(leaf)) is not None),
        None,
    )


def _check_shards(strategy: Any, x: Any) -> None:
    """A batch must split evenly over the replicas. Refused, not run: Keras 3.15's
    fit itself raises on a first batch that does not (its symbolic build averages
    the replicas' shards, AddN of [3, d] and [2, d]), and on a later one it
    divides each replica's mean loss by num_replicas_in_sync whatever the
    shard's size (scale_loss_for_distribution), which is not the global batch's
    mean: no verdict on the gradient would mean anything."""
    if strategy is None or strategy.replicas < 2:
        return
    n = _global_batch(x)
    if n is not None and n % strategy.replicas:
        raise InvalidArgumentError(
            f"the batch of {n} does not split evenly over the {strategy.replicas} "
            f"replicas of the model's {strategy.strategy}: pass a batch whose size "
            "is a multiple of num_replicas_in_sync. (Keras' fit raises on such a "
            "first batch, and on a later one divides each replica's mean loss by "
            "num_replicas_in_sync whatever its shard's size: not the global "
            "batch's mean.)"
        )


def _check_norms(strategy: Any, captured: Captured) -> None:
    """Refuse a step in which unsynchronised BatchNormalization ran in training
    mode under several replicas (seen in the step: its moving mean moved)."""
    names = captured.per_replica_norms
    if strategy is None or strategy.replicas < 2 or not names:
        return
    shown = ", ".join(repr(n) for n in names[:4])
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    raise UnsupportedInputError(
        f"BatchNormalization {shown}{more} ran in training mode with "
        f"synchronized=False: each of the {strategy.replicas} replicas normalised "
        "its shard with the shard's own mean and variance, so by design the "
        "step's gradient is not the global batch's and comparing them says "
        "nothing. Build the model with BatchNormalization(synchronized=True) "
        "(statistics all-reduced across replicas) to check it under the strategy, "
        "or check it outside the strategy."
    )


def _strategy_notes(report: CheckReport, strategy: Any, x: Any) -> None:
    """What ran under the strategy, for the report (notes and cost)."""
    replicas = int(strategy.replicas)
    report.cost["replicas"] = float(replicas)
    n = _global_batch(x)
    report.notes.insert(
        0,
        f"strategy: {strategy.strategy}, num_replicas_in_sync={replicas}"
        + (f" ({', '.join(strategy.devices)})" if strategy.devices else "")
        + ": Keras' step ran as fit runs it (the batch"
        + (f" of {n}" if n is not None else "")
        + " split over the replicas by the strategy's distributed dataset, "
        "train_step in each replica under strategy.run, the replicas' gradients "
        "summed by the optimizer's all-reduce); recorded is the gradient the "
        "optimizer receives after that reduction, compared with the gradient of "
        "the global batch.",
    )


def _replica_factor_note(
    report: CheckReport, strategy: Any, side: _Side, captured: Captured
) -> None:
    """Name the classic bug under a strategy when the numbers show it: Keras'
    gradient is num_replicas_in_sync x the global batch's in every tensor."""
    replicas = int(strategy.replicas)
    if replicas < 2:
        return
    worst, scale = 0.0, 0.0
    for t, (g, calls) in enumerate(zip(captured.grads, captured.calls, strict=True)):
        parts = [
            side.weights[n] * side.grads[n][t]
            for n in side.grads
            if side.grads[n][t] is not None
        ]
        if calls == 0 or not parts:
            continue
        expected = replicas * sum(parts)
        worst = max(worst, float(np.max(np.abs(g - expected), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(expected), initial=0.0)))
    if scale > 0 and worst <= _EXPLAIN_RTOL * 10 * scale:
        report.notes.insert(
            0,
            f"Keras' step's gradient is {replicas} x the global batch's in every "
            f"tensor, {replicas} = num_replicas_in_sync: the classic cause is a loss "
            "averaged over each replica's batch without dividing by "
            "num_replicas_in_sync (a custom compute_loss or train_step using "
            "ops.mean where a keras.losses.Loss scales by 1/num_replicas_in_sync "
            "itself; the replicas' gradients are summed, not averaged). A loss "
            f"multiplied by {replicas} looks the same.",
        )


def _flag_replica_randomness(
    report: CheckReport, captured: Captured, strategy: Any
) -> None:
    """Under a strategy each replica draws dropout masks & co. for its own shard
    from the same SeedGenerator state: no pass over the global batch draws the
    same numbers, so a failing comparison says nothing about the gradient."""
    if strategy is None or not captured.random or report.status != "mismatch":
        return
    report.status = "nondeterministic"
    report.notes.insert(
        0,
        "Keras' step drew random numbers (Dropout, GaussianNoise, random "
        f"augmentation) in each of the {strategy.replicas} replicas for its own "
        "shard: the global-batch side cannot draw the same ones, so the comparison "
        "is not meaningful. Check the model with its random layers off (rate 0), "
        "or the same model outside the strategy, where the masks are reproduced.",
    )


# --------------------------------------------------------------------- validation
def _import_keras() -> Any:
    """The Keras step backend (gradcheck.backends.keras_step), Keras 3 checked."""
    try:
        ks = step_backend("keras")
    except ImportError as exc:  # pragma: no cover - keras is a test dependency
        raise FrameworkNotInstalledError(
            "check_keras_model needs Keras 3 (pip install keras and a backend)."
        ) from exc
    ks.check_keras3()
    return ks


def _check_model(ks: Any, model: Any) -> None:
    if not ks.is_model(model):
        raise UnsupportedInputError(
            "check_keras_model takes a compiled keras.Model; got "
            f"{type(model).__module__}.{type(model).__name__}. For a loss function "
            "or a torch module use check_gradients/check_linearity."
        )
    if not getattr(model, "compiled", False):
        raise NotCompiledError(
            f"model {model.name!r} is not compiled: the train step it would run "
            "does not exist yet. Call model.compile(optimizer=..., loss=..., "
            "loss_weights=...) first, as before fit()."
        )
    if getattr(model, "_compile_loss", None) is None:
        raise NotCompiledError(
            f"model {model.name!r} was compiled without loss=: gradcheck checks the "
            "train step against the losses given to compile(), and there are none "
            "(a model that only uses add_loss or its own compute_loss has no "
            "independent definition to compare with)."
        )


def _batch_size(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    shape = tuple(shape)
    return int(shape[0]) if shape and shape[0] is not None else None


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [
            leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")
        ]
    return [(path, value)]


def _check_batch(x: Any, y: Any, sample_weight: Any) -> None:
    """Every array must have the same leading (batch) dimension."""
    if y is None:
        raise InvalidArgumentError(
            "y is required: the compiled losses compare the outputs with targets."
        )
    sizes = [
        (path, n)
        for what, value in (("x", x), ("y", y), ("sample_weight", sample_weight))
        for path, leaf in _leaves(value, what)
        if (n := _batch_size(leaf)) is not None
    ]
    if sizes and len({n for _, n in sizes}) > 1:
        listed = ", ".join(f"{p}: {n}" for p, n in sizes)
        raise InvalidArgumentError(
            f"x, y and sample_weight must share the batch size; got {listed}."
        )


@dataclass
class _Config:
    loss: Any
    loss_weights: Any


def _compile_config(model: Any) -> _Config:
    """The user's ``loss``/``loss_weights`` as given to compile(): Keras keeps them
    in ``_compile_config`` (used by ``get_compile_config``); ``model.loss`` and
    ``CompileLoss._user_loss_weights`` hold the same objects."""
    stored = getattr(getattr(model, "_compile_config", None), "config", None)
    if isinstance(stored, Mapping) and "loss" in stored:
        return _Config(stored["loss"], stored.get("loss_weights"))
    compile_loss = model._compile_loss
    return _Config(
        getattr(compile_loss, "_user_loss", model.loss),
        getattr(compile_loss, "_user_loss_weights", None),
    )


# --------------------------------------------------------------------- pairing
@dataclass
class _Head:
    name: str
    loss: Any  # a keras.losses.Loss
    label: str  # how the user named the loss
    weight: float
    target: Any
    sample_weight: Any


@dataclass
class _Side:
    """The independent side: per-loss values and gradients, by name."""

    heads: list[_Head]
    kind: str  # "dict", "list" or "single": the model's output structure
    names: list[str]  # outputs in definition order
    predictions: dict[str, np.ndarray]
    values: dict[str, float]
    grads: dict[str, list[np.ndarray | None]]
    weights: dict[str, float]
    notes: list[str] = field(default_factory=list)


def _outputs(model: Any, y_pred: Any) -> tuple[str, dict[str, Any]]:
    """The model's outputs by name, in definition order."""
    keras_names = list(getattr(model, "output_names", None) or [])
    if isinstance(y_pred, Mapping):
        # a functional model keeps the dict it was built with (insertion order);
        # what it returns is sorted on the torch backend
        defined = getattr(model, "_outputs_struct", None)
        order = list(y_pred)
        if isinstance(defined, Mapping) and set(defined) == set(order):
            order = list(defined)
        kind, named = "dict", {str(k): y_pred[k] for k in order}
    elif isinstance(y_pred, (list, tuple)):
        names = (
            keras_names
            if len(keras_names) == len(y_pred)
            else [f"output_{i}" for i in range(len(y_pred))]
        )
        kind, named = "list", dict(zip(names, y_pred, strict=True))
    else:
        name = keras_names[0] if len(keras_names) == 1 else "output"
        kind, named = "single", {name: y_pred}
    for name, value in named.items():
        if isinstance(value, (Mapping, list, tuple)):
            raise UnsupportedInputError(
                f"output {name!r} is itself a {type(value).__name__}: "
                "check_keras_model supports one level of dict/list outputs."
            )
    return kind, named


def _by_name(
    value: Any, kind: str, names: list[str], what: str, broadcast: bool = False
) -> tuple[dict[str, Any], bool]:
    """``value`` (dict by name, list in definition order, or one array) per output.
    Returns the mapping and whether a list was paired with a dict-output model."""
    if value is None:
        return dict.fromkeys(names), False
    if isinstance(value, Mapping):
        keys = [str(k) for k in value]
        extra = [k for k in keys if k not in names]
        if extra:
            raise InvalidArgumentError(
                f"{what} names {extra}, which the model does not output; its outputs "
                f"are {names}."
            )
        return {n: value.get(n) for n in names}, False
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and len(names) == 1:
            return {names[0]: value[0]}, False
        if len(value) != len(names):
            raise InvalidArgumentError(
                f"{what} is a {type(value).__name__} of {len(value)} but the model has "
                f"{len(names)} outputs {names}."
            )
        return dict(zip(names, value, strict=True)), kind == "dict"
    if len(names) == 1 or broadcast:
        return dict.fromkeys(names, value), False
    raise InvalidArgumentError(
        f"{what} is one array but the model has {len(names)} outputs {names}: pass a "
        "dict keyed by output name."
    )


def _resolve_weights(
    loss_weights: Any, kind: str, names: list[str], with_loss: list[str]
) -> tuple[dict[str, float], bool]:
    if loss_weights is None:
        return dict.fromkeys(with_loss, 1.0), False
    if isinstance(loss_weights, (int, float)) and not isinstance(loss_weights, bool):
        return dict.fromkeys(with_loss, float(loss_weights)), False
    if isinstance(loss_weights, Mapping):
        extra = [k for k in loss_weights if k not in names]
        if extra:
            raise InvalidArgumentError(
                f"compile(loss_weights=...) names {extra}, which the model does not "
                f"output; its outputs are {names}."
            )
        return {n: float(loss_weights.get(n, 1.0)) for n in with_loss}, False
    if isinstance(loss_weights, (list, tuple)):
        values = [float(w) for w in loss_weights]
        if len(values) == len(names):
            by_name = dict(zip(names, values, strict=True))
        elif len(values) == len(with_loss):
            by_name = dict(zip(with_loss, values, strict=True))
        else:
            raise InvalidArgumentError(
                f"compile(loss_weights=...) lists {len(values)} weights for "
                f"{len(names)} outputs {names}."
            )
        return {n: by_name[n] for n in with_loss}, kind == "dict"
    raise InvalidArgumentError(
        f"compile(loss_weights=...) is a {type(loss_weights).__name__}; expected a "
        "float, a list or a dict."
    )


def _class_sample_weight(
    ks: Any, y: Any, class_weight: Mapping[int, float]
) -> np.ndarray:
    """Keras' documented conversion: one-hot targets -> argmax, (N, 1) -> squeeze,
    rounded to int; each example gets its class's weight (1 if absent)."""
    labels = np.asarray(ks.numpy(y) if not isinstance(y, np.ndarray) else y)
    if labels.ndim > 1:
        labels = labels.argmax(-1) if labels.shape[-1] != 1 else labels[..., 0]
    labels = np.round(labels).astype(np.int64)
    return np.array([float(class_weight.get(int(c), 1.0)) for c in labels], "float32")


def _independent(
    ks: Any,
    ops: Any,
    model: Any,
    x: Any,
    y: Any,
    sample_weight: Any,
    class_weight: Any,
    config: _Config,
    variables: list[Any],
    scale: float,
) -> _Side:
    state: dict[str, Any] = {}

    def compute() -> dict[str, Any]:
        try:
            y_pred = model(x, training=True)
        except Exception as exc:
            raise InvalidArgumentError(
                f"model(x, training=True) raised {type(exc).__name__}: {exc}"
                + _input_hint(model, x)
            ) from exc
        kind, outputs = _outputs(model, y_pred)
        names = list(outputs)
        if class_weight is not None and len(names) > 1:
            raise ClassWeightError(
                "class_weight works for single-output models only; this one has "
                f"{len(names)} outputs {names}. Keras' fit refuses it too "
                "(`class_weight` is only supported for Models with a single output) "
                "and train_on_batch cannot turn a dict of targets into weights. "
                "Pass a per-output sample_weight dict instead."
            )
        targets, y_list = _by_name(y, kind, names, "y")
        sws, sw_list = _by_name(sample_weight, kind, names, "sample_weight", True)
        if class_weight is not None:
            sws = {names[0]: _class_sample_weight(ks, targets[names[0]], class_weight)}
        loss_cfg, loss_list = _by_name(
            config.loss, kind, names, "compile(loss=...)", True
        )
        with_loss = [n for n in names if loss_cfg[n] is not None]
        if not with_loss:
            raise NotCompiledError(
                "compile(loss=...) gives none of the outputs a loss."
            )
        missing = [n for n in with_loss if targets[n] is None]
        if missing:
            raise InvalidArgumentError(
                f"y has no target for the output(s) {missing} (outputs {names})."
            )
        weights, w_list = _resolve_weights(config.loss_weights, kind, names, with_loss)
        heads = []
        values: dict[str, Any] = {}
        for n in with_loss:
            loss, label = ks.resolve_loss(loss_cfg[n], targets[n], outputs[n])
            heads.append(_Head(n, loss, label, weights[n], targets[n], sws[n]))
            try:
                values[n] = loss(targets[n], outputs[n], sample_weight=sws[n])
            except Exception as exc:
                raise InvalidArgumentError(
                    f"the '{n}' loss ({label}) raised {type(exc).__name__} on y[{n!r}] "
                    f"and the output '{n}': {exc}"
                ) from exc
        penalties = list(model.losses)
        if penalties:
            reg = None
            for p in penalties:
                p = ks.summed(p)
                reg = p if reg is None else reg + p
            values[_reg_name(names)] = reg
        state.update(
            kind=kind,
            names=names,
            heads=heads,
            weights=weights,
            predictions={n: ks.numpy(outputs[n]) for n in names},
            lists=[
                w
                for w, flag in (
                    ("y", y_list),
                    ("sample_weight", sw_list),
                    ("loss", loss_list),
                    ("loss_weights", w_list),
                )
                if flag
            ],
        )
        return values

    values, grads = ops.value_and_grads(compute, variables, scale)
    floats = {
        k: float(np.asarray(ks.numpy(v), dtype=np.float64)) for k, v in values.items()
    }
    for k, v in floats.items():
        if not math.isfinite(v):
            raise NonFiniteError(
                f"the '{k}' loss is {v} at this batch: a loss must be finite to have "
                "a gradient (log(0), 0/0 or overflow in it?)."
            )
    weights = dict(state["weights"])
    reg = _reg_name(state["names"])
    if reg in floats:
        weights[reg] = 1.0
    side = _Side(
        heads=state["heads"],
        kind=state["kind"],
        names=state["names"],
        predictions=state["predictions"],
        values=floats,
        grads=grads,
        weights=weights,
    )
    sorted_names = sorted(side.names)
    if state["lists"] and sorted_names != side.names:
        side.notes.append(
            f"{', '.join(state['lists'])} given as a list for a dict-output model: "
            f"gradcheck pairs it with the outputs in the order the model defines "
            f"them {side.names}; Keras {ks.version()} pairs lists with dict "
            f"outputs in sorted key order {sorted_names} (keras#20596, #20346). "
            "Pass a dict keyed by output name to make the pairing unambiguous."
        )
    return side


def _reg_name(names: Sequence[str]) -> str:
    return REGULARIZATION if REGULARIZATION not in names else "model.losses"


def _input_hint(model: Any, x: Any) -> str:
    inputs = getattr(model, "inputs", None) or []
    names = [getattr(t, "name", "?") for t in inputs]
    if not names:
        return ""
    given = (
        f"a dict with keys {list(x)}"
        if isinstance(x, Mapping)
        else f"a {type(x).__name__} of {len(x)}"
        if isinstance(x, (list, tuple))
        else "one array"
    )
    return f" (the model's inputs are {names}; x is {given})."


@dataclass
class _Spread:
    """The measured rounding of equivalent computations, per tensor."""

    noise: list[float]
    how: str
    steps: float


#: how the tolerance's measured term is obtained, for the report
SPREAD_TOLERANCE = (
    "the measured spread between equivalent computations of the gradient (the "
    "largest element in each tensor): {parts}"
)


def _measured_rounding(
    ks: Any,
    ops: Any,
    model: Any,
    data: tuple[Any, Any, Any, Any],
    variables: Sequence[Any],
    scale: float,
    side: _Side,
    captured: Captured,
    snapshot: Snapshot,
) -> _Spread:
    """Per tensor, how far apart two computations of the same gradient that differ
    only in rounding land on this model, at this batch:

    - one backward pass of ``sum_i w_i L_i`` (built independently, as the per-loss
      side) against ``sum_i w_i grad L_i`` from the per-loss passes: the summation
      order of the backward, which is what Keras' step changes. A deep network
      with BatchNorm in training mode amplifies rounding far beyond the per-element
      model (MobileNetV3Small: 5e-3 on elements of ~100, 50 x float32's 4e-6);
    - Keras' step as compiled against the same step run eagerly (when it is
      compiled): kernel choice and graph rewrites (grappler's fused BatchNorm,
      conv algorithms, XLA).

    Neither can contain a bug that is in Keras' step: the first is gradcheck's
    own two sides, the second runs the user's step twice, so a doubled, missing or
    mispaired loss is in both and cancels. A wrong gradient stays as wrong as it
    was; only the tolerance learns this model's rounding. Measured at check time,
    on this machine's kernels: no constant carries from one CPU to another."""
    x, y, sample_weight, class_weight = data
    parts, unmeasured = [], ""
    steps = 0.0
    noise = [0.0] * len(variables)
    if ks.compiled(model):
        snapshot.reset_values()
        steps += 1
        try:
            eager = ks.capture(
                model,
                x,
                y,
                sample_weight,
                class_weight,
                variables,
                scale,
                eagerly=True,
            )
        except KerasStepError as exc:
            # a step written for graph mode only: its kernels' rounding stays
            # unmeasured, and the tolerance says so
            unmeasured = (
                f" (not measured: Keras' step {captured.how} vs the same step run "
                f"eagerly, which raised {type(exc.__cause__).__name__})"
            )
        else:
            for t, (g, e, c, ce) in enumerate(
                zip(
                    captured.grads,
                    eager.grads,
                    captured.calls,
                    eager.calls,
                    strict=True,
                )
            ):
                if c > 0 and ce > 0:
                    # a non-finite element is judged as such (not as noise)
                    both = np.isfinite(g) & np.isfinite(e)
                    diff = np.abs(np.where(both, g, 0.0) - np.where(both, e, 0.0))
                    noise[t] += float(np.max(diff, initial=0.0))
            parts.append(f"Keras' step {captured.how} vs the same step run eagerly")
    snapshot.reset_values()
    total = _independent_total(ks, ops, model, x, side, variables, scale)
    for t, g in enumerate(total):
        per_loss = [
            side.weights[n] * side.grads[n][t]
            for n in side.grads
            if side.grads[n][t] is not None
        ]
        if g is None or not per_loss:
            continue
        noise[t] += float(np.max(np.abs(g - sum(per_loss)), initial=0.0))
    parts.insert(
        0,
        "one backward pass of sum_i w_i L_i vs the per-loss backward passes "
        "(summation order)",
    )
    how = SPREAD_TOLERANCE.format(parts=" + ".join(parts)) + unmeasured
    return _Spread(noise, how, steps)


def _independent_total(
    ks: Any,
    ops: Any,
    model: Any,
    x: Any,
    side: _Side,
    variables: Sequence[Any],
    scale: float,
) -> list[np.ndarray | None]:
    """The gradient of ``sum_i w_i L_i + sum(model.losses)`` from one backward
    pass, with the losses, targets and sample weights the per-loss side paired."""
    reg_name = _reg_name(side.names)

    def compute() -> dict[str, Any]:
        _, outputs = _outputs(model, model(x, training=True))
        total = None
        for h in side.heads:
            value = h.loss(h.target, outputs[h.name], sample_weight=h.sample_weight)
            total = h.weight * value if total is None else total + h.weight * value
        if reg_name in side.values:
            for p in model.losses:
                total = total + ks.summed(p)
        return {"total": total}

    _, grads = ops.value_and_grads(compute, variables, scale)
    return grads["total"]


# --------------------------------------------------------------------- verdict
def _specs(variables: Sequence[Any]) -> list[TensorSpec]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for v in variables:
        name = str(getattr(v, "path", None) or getattr(v, "name", "variable"))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return [
        TensorSpec(
            name=n,
            shape=tuple(int(d) for d in v.shape),
            dtype=tl.canonical_dtype(v.dtype),
            device=_device(v),
            kind="parameter",
        )
        for n, v in zip(names, variables, strict=True)
    ]


def _device(v: Any) -> str:
    raw = str(getattr(getattr(v, "value", v), "device", "") or "cpu").lower()
    if "gpu" in raw or "cuda" in raw:
        return "gpu"
    return "cpu"


def _compute_rounding(
    ks: Any,
    model: Any,
    side: _Side,
    specs: Sequence[TensorSpec],
    rtol: float | None,
) -> tuple[float | None, str | None]:
    """The rounding (and dtype) of the coarsest precision the gradients pass
    through, when it is coarser than the variables': mixed precision computes in
    float16/bfloat16 with float32 variables, and Keras losses compute in their own
    dtype (floatx, float32 by default) even for a float64 model."""
    if rtol is not None:
        return rtol, None

    policies = [getattr(layer, "dtype_policy", None) for layer in _layers(model)]
    dtypes = {
        tl.canonical_dtype(getattr(p, "compute_dtype", None) or "float32")
        for p in policies
        if p is not None
    }
    dtypes.add(tl.canonical_dtype(ks.floatx()))
    dtypes |= {tl.canonical_dtype(h.loss.dtype) for h in side.heads if h.loss.dtype}
    known = [(tl.GRADIENT_ROUNDING[d], d) for d in dtypes if d in tl.GRADIENT_ROUNDING]
    coarsest, dtype = max(known, default=(0.0, None))
    own = max((tl.gradient_rounding(s.dtype) for s in specs), default=0.0)
    return (coarsest, dtype) if coarsest > own else (None, None)


def _floor_scales(
    specs: Sequence[TensorSpec], g_total: Sequence[np.ndarray | None], side: _Side
) -> list[float]:
    """Per tensor: the largest |w_i grad L_i| element, anywhere in the model, of the
    losses that reach the tensor (and of Keras' gradient there); see
    :func:`gradcheck.properties.linearity.reaching_floors`."""
    return linearity.reaching_floors(side.weights, side.grads, g_total)


def _layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten(include_self=True, recursive=True)) if flatten else [model]


def _verdict(
    ks: Any,
    backend: str,
    model: Any,
    side: _Side,
    captured: Captured,
    variables: Sequence[Any],
    seed: int,
    rtol: float | None,
    scale_note: str | None,
    noise: Sequence[float] | None = None,
    noise_how: str | None = None,
) -> CheckReport:
    specs = _specs(variables)
    g_total: list[np.ndarray | None] = [
        g if calls > 0 else None
        for g, calls in zip(captured.grads, captured.calls, strict=True)
    ]
    nan_at = None  # a NaN/Inf in Keras' step where every loss's gradient is finite
    for t, g in enumerate(g_total):
        if g is None or np.all(np.isfinite(g)):
            continue
        expected_finite = all(
            side.grads[n][t] is None or np.all(np.isfinite(side.grads[n][t]))
            for n in side.grads
        )
        if expected_finite and not scale_note:
            # a wrong gradient at any tolerance, like a NaN gradient of a finite
            # function (issue 17): a verdict naming the tensor, not an error
            # (keras#20596's mispairing puts a crossentropy on a linear output)
            nan_at = nan_at or (
                t,
                np.unravel_index(int(np.argmax(~np.isfinite(g))), g.shape),
            )
            g_total[t] = np.where(np.isfinite(g), g, 0.0)
            continue
        raise NonFiniteError(
            "Keras' train step produced a NaN/Inf gradient at this batch"
            + (
                " (a LossScaleOptimizer would skip this step and lower its scale)."
                if scale_note
                else "."
            )
        )
    effective_rtol, coarse_dtype = _compute_rounding(ks, model, side, specs, rtol)
    report = linearity.judge(
        specs,
        side.weights,
        None,
        g_total,
        side.values,
        side.grads,
        framework=f"keras/{backend}",
        seed=seed,
        rtol=effective_rtol,
        property=PROPERTY,
        total_label="Keras' train step",
        floor_scale=_floor_scales(specs, g_total, side),
        noise=noise,
    )
    report.tolerance_reason = report.tolerance_reason.replace(
        "the tensor's largest",
        "the largest gradient element of the losses reaching the tensor",
    )
    if noise is not None:
        report.tolerance_reason += f"; + {tl.ROUNDING_SIGMAS:g} x {noise_how}"
    if coarse_dtype is not None:
        report.tolerance_reason += (
            f"; the rounding is {coarse_dtype}'s, the coarsest dtype the model's "
            "layers or losses compute in"
        )
    notes: list[str] = []
    _no_gradient_notes(notes, specs, side, captured)
    rho = max(
        effective_rtol or 0.0,
        tl.gradient_rounding("float32"),
        *(tl.gradient_rounding(s.dtype) for s in specs),
    )
    value_location = _compare_values(report, notes, side, captured, rho)
    if nan_at is not None:
        t, index = nan_at
        report.status = "mismatch"
        report.location = Location(
            tensor=specs[t].name,
            index=tuple(int(i) for i in index),
            analytical=math.nan,
            quantity="gradient element (NaN/Inf in Keras' train step)",
        )
        report.error = math.inf
        notes.insert(
            0,
            f"Keras' train step produced a NaN/Inf gradient for '{specs[t].name}' "
            f"(first at {list(int(i) for i in index)}) while every loss's own "
            "gradient (sum_i w_i grad L_i) is finite there: the step computes "
            "something other than the weighted sum of the losses (e.g. a loss "
            "paired with the wrong output: a crossentropy on a linear output).",
        )
    if report.passed and value_location is not None:
        report.status = "mismatch"
        report.location = value_location
        report.error = float(value_location.error or 0.0)
        report.tolerance = float(value_location.tolerance or 0.0)
        report.tolerance_reason = (
            f"loss values: {tl.ROUNDING_SIGMAS:g} x rounding ({rho:.0e}) x (|Keras' "
            "value| + sum of the |terms| compared); gradients, "
            + report.tolerance_reason
        )
    notes.extend(side.notes)
    opt = model.optimizer
    notes.append(
        f"Keras {ks.version()}, {backend} backend; train step "
        f"{captured.how} with a recording optimizer in place of the user's "
        f"{type(opt).__name__}, which was not touched; compared with the gradients "
        f"of {', '.join(repr(h.name) + ' (' + h.label + ')' for h in side.heads)}"
        + (
            f" and {_reg_name(side.names)!r} (sum of model.losses)"
            if _reg_name(side.names) in side.values
            else ""
        )
        + ", by output name."
    )
    if scale_note:
        notes.append(scale_note)
    if any(getattr(opt, a, None) for a in ("clipnorm", "clipvalue", "global_clipnorm")):
        notes.append(
            "the optimizer clips gradients after the train step hands them over: "
            "clipping is not part of what is compared."
        )
    if getattr(opt, "weight_decay", None):
        notes.append(
            "the optimizer applies weight decay itself (not through the gradient): "
            "not part of what is compared."
        )
    report.notes = notes + report.notes
    return report


def _no_gradient_notes(
    notes: list[str], specs: Sequence[TensorSpec], side: _Side, captured: Captured
) -> None:
    reached = [
        any(
            side.grads[n][t] is not None and np.any(side.grads[n][t])
            for n in side.grads
        )
        for t in range(len(specs))
    ]
    missing = [
        s.name
        for s, calls, r in zip(specs, captured.calls, reached, strict=True)
        if calls == 0 and r
    ]
    if missing and len(missing) == sum(reached):
        notes.append(
            f"Keras' train step applied no gradient to any of the {len(missing)} "
            "trainable variables the losses reach: it never called optimizer.apply()"
            " / apply_gradients() with them (an overridden train_step?)."
        )
    elif missing:
        shown = ", ".join(repr(m) for m in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        notes.append(
            f"Keras' train step applied no gradient to {shown}{more}, which the "
            "losses reach (a gradient stopped or filtered in train_step?)."
        )
    repeated = [s.name for s, c in zip(specs, captured.calls, strict=True) if c > 1]
    if repeated:
        notes.append(
            f"Keras' train step applied gradients {max(captured.calls)} times to "
            f"{repeated[0]!r}{' and others' if len(repeated) > 1 else ''} in one step: "
            "compared is their sum, the total update direction."
        )


def _value_tolerance(rho: float, *terms: float) -> float:
    return tl.ROUNDING_SIGMAS * rho * sum(abs(t) for t in terms)


def _ratio(diff: float, tol: float) -> float:
    """error / tolerance; an exact agreement is 0 even when the tolerance is 0 (a
    zero-weight model whose loss and total are exactly 0)."""
    if diff == 0:
        return 0.0
    return diff / tol if tol > 0 else math.inf


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _EXPLAIN_RTOL * max(abs(a), abs(b), 1e-12)


def _compare_values(
    report: CheckReport,
    notes: list[str],
    side: _Side,
    captured: Captured,
    rho: float,
) -> Location | None:
    """Keras' reported loss and ``<output>_loss`` metrics against the independent
    values, within ``rho`` relative rounding (at least float32's: CompileLoss casts
    every value to floatx). Returns the location of the worst disagreement (None:
    all agree)."""
    logs = {k: v for k, v in captured.logs.items() if k not in captured.stale}
    if captured.stale & set(captured.logs):
        notes.append(
            f"the train step never updated Keras' {sorted(captured.stale)} "
            "tracker(s) (a custom train_step that does not call compute_loss or the "
            "loss tracker?): their reported values are not compared."
        )
    worst: tuple[float, Location | None] = (1.0, None)
    reg_name = _reg_name(side.names)
    reg = side.values.get(reg_name, 0.0)
    per_head = {h.name: side.values[h.name] for h in side.heads}
    if len(side.heads) > 1:
        absent = []
        # Keras names a metric after the output, or after the loss when the model
        # has no output names (a subclassed model returning a list)
        labels = [h.label for h in side.heads]
        for h in side.heads:
            key = f"{h.name}_loss"
            by_label = f"{h.label}_loss"
            if key not in logs and labels.count(h.label) == 1 and by_label in logs:
                key = by_label
            if key not in logs:
                absent.append(key)
                continue
            reported, ours = logs[key], per_head[h.name]
            tol = _value_tolerance(rho, reported, ours)
            ratio = _ratio(abs(reported - ours), tol)
            if ratio > 1:
                notes.append(
                    f"Keras reported {key} = {reported:.7g} but the '{h.name}' loss "
                    f"({h.label} on y[{h.name!r}] and the output '{h.name}') is "
                    f"{ours:.7g}" + _explain_metric(side, h.name, reported)
                )
                if ratio > worst[0]:
                    worst = (ratio, _value_location(key, h.name, ours, reported, tol))
        if absent and len(absent) < len(side.heads):
            notes.append(
                f"Keras did not report {absent} (keras#18993): only the other "
                "per-output losses were compared."
            )
        elif absent:
            notes.append(
                "Keras reported no per-output losses (an overridden train_step with "
                "its own logs?): only the gradient and the total were compared."
            )
    total = sum(side.weights[h.name] * per_head[h.name] for h in side.heads) + reg
    if "loss" in logs:
        reported = logs["loss"]
        tol = _value_tolerance(
            rho,
            reported,
            reg,
            *(side.weights[h.name] * per_head[h.name] for h in side.heads),
        )
        ratio = _ratio(abs(reported - total), tol)
        if ratio > 1:
            notes.append(
                f"Keras reported loss = {reported:.7g} but sum_i w_i * loss_i"
                + (" + regularization" if reg_name in side.values else "")
                + f" = {total:.7g}"
                + _explain_total(side, per_head, reg, reported, logs)
            )
            if ratio > worst[0]:
                culprit = _culprit(report)
                worst = (ratio, _value_location("loss", culprit, total, reported, tol))
    elif "loss" not in captured.logs:
        notes.append(
            "Keras' train step reported no 'loss': the total was not compared."
        )
    return worst[1]


def _culprit(report: CheckReport) -> str | None:
    return report.location.head if report.location is not None else None


def _value_location(
    key: str, head: str | None, ours: float, reported: float, tol: float
) -> Location:
    return Location(
        tensor=key,
        index=None,
        numerical=ours,
        analytical=reported,
        error=abs(reported - ours),
        tolerance=tol,
        quantity="loss value (numerical = independent, analytical = Keras' report)",
        head=head,
    )


def _loss_value(head: _Head, target: Any, pred: np.ndarray, sw: Any) -> float | None:
    try:
        value = head.loss(target, pred, sample_weight=sw)
        return float(np.asarray(step_backend("keras").numpy(value)))
    except Exception:
        return None


def _explain_metric(side: _Side, name: str, reported: float) -> str:
    """Which pairing of loss function, target and output gives what Keras reported."""
    by_name = {h.name: h for h in side.heads}
    for other, value in side.values.items():
        if other != name and other in by_name and _close(value, reported):
            return (
                f"; it equals the '{other}' loss: Keras' per-output metrics are "
                "paired with the outputs out of order."
            )
    pred = side.predictions[name]
    own = by_name[name]
    for fn_head, t_head in itertools.product(side.heads, side.heads):
        if fn_head.name == name and t_head.name == name:
            continue
        for sw in (t_head.sample_weight, own.sample_weight):
            value = _loss_value(fn_head, t_head.target, pred, sw)
            if value is not None and _close(value, reported):
                what = []
                if fn_head.name != name:
                    what.append(f"the '{fn_head.name}' loss function ({fn_head.label})")
                else:
                    what.append(f"its own loss function ({own.label})")
                what.append(
                    f"on y[{t_head.name!r}]" if t_head.name != name else "on its own y"
                )
                return (
                    f"; Keras' value is {' '.join(what)} applied to the output "
                    f"'{name}': Keras paired "
                    + (
                        "losses"
                        if fn_head.name != name and t_head.name == name
                        else "targets"
                        if fn_head.name == name
                        else "losses and targets"
                    )
                    + " with outputs out of order."
                )
    return "."


def _explain_total(
    side: _Side,
    per_head: dict[str, float],
    reg: float,
    reported: float,
    logs: Mapping[str, float],
) -> str:
    heads = [h.name for h in side.heads]
    w = [side.weights[n] for n in heads]
    v = [per_head[n] for n in heads]
    for perm in itertools.permutations(range(len(heads))):
        if list(perm) == list(range(len(heads))):
            continue
        if _close(
            sum(w[p] * vi for p, vi in zip(perm, v, strict=True)) + reg, reported
        ):
            paired = ", ".join(
                f"{n}: {w[p]:g}" for n, p in zip(heads, perm, strict=True)
            )
            return (
                f"; it equals the total with the loss weights paired as {{{paired}}}:"
                " loss_weights were matched to outputs out of order."
            )
    reported_heads = [logs.get(f"{n}_loss") for n in heads]
    if len(heads) > 1 and all(r is not None for r in reported_heads):
        keras_total = sum(wi * r for wi, r in zip(w, reported_heads, strict=True)) + reg
        if _close(keras_total, reported):
            return (
                "; it is consistent with Keras' own per-output values, so the "
                "per-output pairing (above) is what differs."
            )
    if reg and _close(_weighted(w, v), reported):
        return "; it equals the total without the regularization (model.losses)."
    if _close(sum(v) + reg, reported):
        return "; it equals the total with every loss weight 1: loss_weights ignored."
    return "."


def _weighted(w: Sequence[float], v: Sequence[float]) -> float:
    return sum(wi * vi for wi, vi in zip(w, v, strict=True))


def _same_step(first: Captured, again: Captured) -> bool:
    """Whether Keras' step, replayed from the same state, gave the same gradient."""
    return all(  # equal_nan: a NaN the step produces twice is the same step
        (a is None and b is None)
        or (a is not None and b is not None and np.array_equal(a, b, equal_nan=True))
        for a, b in zip(first.grads, again.grads, strict=True)
    )


def _flag_nondeterminism(report: CheckReport, first: Captured, again: Captured) -> None:
    if not _same_step(first, again):
        report.status = "nondeterministic"
        report.notes.insert(
            0,
            "Keras' train step gave a different gradient when replayed from the same "
            "weights and seed states: a random op not driven by Keras' SeedGenerators "
            "(or a nondeterministic kernel). The comparison is not meaningful.",
        )


# --------------------------------------------------------------------- architectures
def compile_built(
    built: Any,
    *,
    loss_style: str | None = None,
    weights_style: str | None = None,
    optimizer: Any = "adam",
    **compile_kwargs: Any,
) -> Any:
    """Compile a :class:`~gradcheck.architectures.keras_builder.KerasBuilt` model the
    way a user would, and return the model.

    ``loss_style``/``weights_style``: "dict" (keyed by head name), "list" (in the
    spec's head order, which is the model's definition order) or "single" (one
    loss for every head / one weight); default: the spec's ``loss_format`` /
    ``weights_format``. "single" losses need every head to have the same loss and
    "single" weights need equal weights: otherwise the request is refused rather
    than silently compiling a different model."""
    from gradcheck.architectures import keras_builder

    spec = built.spec
    styles = ("dict", "list", "single")
    loss_style = loss_style or spec.loss_format
    weights_style = weights_style or spec.weights_format
    for what, style in (("loss_style", loss_style), ("weights_style", weights_style)):
        if style not in styles:
            raise InvalidArgumentError(f"{what} is one of {styles}, got {style!r}.")
    losses = {h.name: keras_builder.keras_loss(h, None) for h in spec.heads}
    weights = spec.weights

    def shaped(values: dict[str, Any], style: str, what: str, same: bool) -> Any:
        if style == "dict":
            return values
        if style == "list":
            return list(values.values())
        if not same:
            raise InvalidArgumentError(
                f"{what} style 'single' needs one value for every head; the spec "
                f"has {values}."
            )
        return next(iter(values.values()))

    loss_same = len({(h.loss, h.from_logits) for h in spec.heads}) == 1
    built.model.compile(
        optimizer=optimizer,
        loss=shaped(losses, loss_style, "loss", loss_same),
        loss_weights=shaped(
            dict(weights),
            weights_style,
            "loss_weights",
            len(set(weights.values())) == 1,
        ),
        **compile_kwargs,
    )
    return built.model


def keras_data(
    built: Any, batch: Mapping[str, Any], *, y_style: str = "dict"
) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` for ``check_keras_model`` from an architectures
    batch: x in the spec's input order (one array for one input); y keyed by head
    name ("dict") or in head order ("list").

    sample_weight takes the form Keras 3.15 can read, whatever ``y_style``: a dict
    by head name for dict outputs, a list in head order for list outputs (Keras
    looks a sample_weight up by the loss's path, an index for list outputs, so a
    dict fails there). Heads without sample weights get ones (the same loss as
    none), because Keras needs a weight for every output once one has one."""
    if y_style not in ("dict", "list"):
        raise InvalidArgumentError(f"y_style is 'dict' or 'list', got {y_style!r}.")
    spec = built.spec
    b = built.convert(batch)
    xs = [b["inputs"][i.name] for i in spec.inputs]
    x = xs[0] if len(xs) == 1 else xs
    names = list(spec.head_names)
    targets = b["targets"]
    sws = b.get("sample_weights") or {}
    sample_weight: Any = None
    if sws:
        n = _batch_size(next(iter(targets.values())))
        ones = np.ones(n, dtype=built.dtype)
        by_head = {h: sws.get(h, ones) for h in names}
        if len(names) == 1:
            sample_weight = by_head[names[0]]
        elif spec.output_structure == "dict":
            sample_weight = by_head
        else:
            sample_weight = [by_head[h] for h in names]
    if len(names) == 1:
        y: Any = targets[names[0]]
    elif y_style == "list":
        y = [targets[h] for h in names]
    else:
        y = {h: targets[h] for h in names}
    return x, y, sample_weight
