"""The audit's planted bugs for TensorFlow/Keras (imported only when TF is audited)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def scaled_backward(fn: Callable[[], Any], rel: float) -> Callable[[], Any]:
    """``fn`` with a backward ``1 + rel`` times too large."""

    @tf.custom_gradient
    def scaled(x: Any) -> Any:
        return tf.identity(x), lambda g: g * (1 + rel)

    return lambda: scaled(fn())


def _assume_something_to_cut(spec: Any, head: str) -> None:
    """Reject (hypothesis ``assume``) an example whose head branches below no
    layer with weights: detaching its input changes no gradient, so there is no
    bug to catch (the audit's candidate test counts any layer but pool/merge as
    having weights; dropout, add and the 2-D pools have none)."""
    from hypothesis import assume

    from gradcheck.architectures.flow import head_branches_below_weights

    assume(head_branches_below_weights(spec, head))


@contextlib.contextmanager
def cut_head(built: Any, head: str) -> Iterator[None]:
    """``tf.stop_gradient`` on the input of ``head``'s first layer with weights
    (every tensor it is called with), for the duration of the block."""
    _assume_something_to_cut(built.spec, head)
    for name in built.spec.head(head).layer_names():
        layer = built.model.get_layer(name)
        if layer.weights:
            break
    original = layer.call

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # every tensor argument: attention reads its input twice (query, value)
        args = tuple(tf.stop_gradient(a) if tf.is_tensor(a) else a for a in args)
        return original(tf.stop_gradient(inputs), *args, **kwargs)

    layer.call = call
    try:
        yield
    finally:
        layer.call = original


def perturbed_builders(rel: float) -> tuple[Any, Any]:
    """(build_torch, a build_keras whose last head's loss is ``1 + rel`` times too
    large): two builds of one spec that are not the same model."""
    from gradcheck.architectures import build_keras, build_torch

    def build(spec: Any, dtype: str) -> Any:
        built = build_keras(spec, dtype)
        last = spec.heads[-1].name
        head_loss = built.head_loss

        def wrong(head: Any, output: Any, target: Any, sw: Any) -> Any:
            loss = head_loss(head, output, target, sw)
            return loss * (1 + rel) if head.name == last else loss

        built.head_loss = wrong
        return built

    return build_torch, build


def on_device(check: Callable[..., Any], device: str) -> Callable[..., Any]:
    """``check`` run under ``tf.device(device)``: the model's ops go there."""

    def run(*args: Any) -> Any:
        with tf.device(device):
            return check(*args)

    return run


def device_loss(built: Any, rel: float | None) -> Callable[[Any, Any], Any]:
    """``loss_fn(model, batch)`` for gradcheck.check_devices (which runs it under
    each ``tf.device``). ``rel``: plant a backward off by ``rel`` on GPUs only."""

    def loss(model: Any, batch: Any) -> Any:
        total = built.total(batch)
        if rel is not None and "GPU" in total.device.upper():
            return scaled_backward(lambda: total, rel)()
        return total

    return loss


# ---------------------------------------------------------------- Keras training
TRAINING_PROPERTY = "keras_training"
TRAINING_BUG = "a compute_loss override that detaches the last head's output"


def keras_pairing(spec: Any) -> dict[str, tuple[Any, float]]:
    """Which head's loss and which weight Keras 3.15's CompileLoss gives each output
    of a spec model compiled as the spec says (measured in
    tests/test_keras_regressions.py, read from keras/src/trainers/compile_utils.py):
    Keras flattens dict outputs in sorted key order, pairs a *list* with that
    flattened order, and packs a dict ``loss_weights`` next to a list ``loss`` (or a
    list ``loss_weights`` next to a dict ``loss``) by sorted key position."""
    heads = {h.name: h for h in spec.heads}
    defined = [h.name for h in spec.heads]
    ordered = sorted(defined) if spec.output_structure == "dict" else defined
    w = spec.weights
    if spec.loss_format == "list":
        loss_of = dict(zip(ordered, defined, strict=True))
    else:  # dict: by name; single: one loss for all
        loss_of = {n: n for n in defined}
    if spec.loss_format == "list" and spec.weights_format == "dict":
        weight_of = dict(zip(ordered, sorted(defined), strict=True))
    elif spec.weights_format == "list" and (
        spec.loss_format == "list" or spec.output_structure == "dict"
    ):
        weight_of = dict(zip(ordered, defined, strict=True))
    else:
        weight_of = {n: n for n in defined}
    return {n: (heads[loss_of[n]], w[weight_of[n]]) for n in defined}


def _mispaired(spec: Any) -> list[tuple[Any, Any, float]]:
    """(head, head whose loss Keras applies, weight Keras applies) for every output
    Keras pairs visibly differently from the spec."""
    out = []
    for h in spec.heads:
        given, weight = keras_pairing(spec)[h.name]
        # a weight off by rounding (0.01 vs 0.010000000000000005) is no swap
        off = abs(weight - h.weight) > 1e-2 * max(abs(weight), abs(h.weight))
        if (given.loss, given.from_logits) != (h.loss, h.from_logits) or off:
            out.append((h, given, weight))
    return out


def trainable(spec: Any) -> bool:
    """Specs Keras trains as written (see KNOWN_FRAMEWORK_BUGS for the rest)."""
    return not _mispaired(spec)


def _shows_pairing_bug(spec: Any) -> bool:
    """Keras visibly mis-pairs a loss or a weight, and a mis-paired loss goes to an
    output of the same width and target kind (so the step runs and the bug shows
    in the numbers, not as Keras' own shape error)."""
    wrong = _mispaired(spec)
    return bool(wrong) and all(
        given.units == h.units and _sparse(given) == _sparse(h) for h, given, _ in wrong
    )


def _sparse(head: Any) -> bool:
    """Sparse cross-entropy takes integer labels, the others one column per unit:
    a sparse loss paired with a dense target makes Keras raise a shape error."""
    return str(head.loss).startswith("sparse")


#: Keras 3.15 pairs lists (and dict loss_weights next to a list loss) with outputs
#: in sorted name order, not the order the model defines them (keras#20596,
#: #20346; ../shared/ANCHORS.md): gradcheck must flag every model that shows it
KNOWN_FRAMEWORK_BUGS = [
    (
        "Keras' own sorted-name pairing of list losses/weights (keras#20596)",
        _shows_pairing_bug,
    )
]


def _detach_last(y_pred: Any, last: str) -> Any:
    if isinstance(y_pred, dict):
        return {k: tf.stop_gradient(v) if k == last else v for k, v in y_pred.items()}
    if isinstance(y_pred, (list, tuple)):
        return [*y_pred[:-1], tf.stop_gradient(y_pred[-1])]
    return tf.stop_gradient(y_pred)


def _assume_last_head_trains(built: Any, batch: dict[str, Any], last: str) -> None:
    """Reject (hypothesis ``assume``) an example where detaching the last head's
    output cannot show: its weight is 0, or its loss has an exactly zero gradient
    at the point (a ReLU6 head saturated on every example). A planted bug that
    changes no number is no miss of the check."""
    from hypothesis import assume

    weight = built.loss_weights()[last]
    with tf.GradientTape() as tape:
        value = built.loss_fns(batch)[last]()
    grads = tape.gradient(value, built.model.trainable_variables)
    assume(
        weight != 0
        and any(g is not None and bool(tf.reduce_any(g != 0)) for g in grads)
    )


def training_check(planted: bool) -> Callable[[Any, dict[str, Any], int], Any]:
    """Keras' own compiled train step on a spec model, compiled the way the spec
    says a user writes it (dict/list/single losses and weights, dict or list
    outputs), with Adam. The planted bug is the classic custom ``compute_loss``
    slip: the last head's prediction detached, so its loss trains nothing."""
    import gradcheck
    from gradcheck.architectures import build_keras
    from gradcheck.properties.keras_training import compile_built, keras_data

    def check(spec: Any, batch: dict[str, Any], seed: int) -> Any:
        built = build_keras(spec, "float32")
        if planted:
            _assume_last_head_trains(built, batch, spec.heads[-1].name)
        model = compile_built(built, optimizer="adam")
        if planted:
            original = model.compute_loss
            last = spec.heads[-1].name

            def compute_loss(
                x: Any = None,
                y: Any = None,
                y_pred: Any = None,
                sample_weight: Any = None,
                training: bool = True,
            ) -> Any:
                return original(
                    x=x,
                    y=y,
                    y_pred=_detach_last(y_pred, last),
                    sample_weight=sample_weight,
                    training=training,
                )

            model.compute_loss = compute_loss
        x, y, sample_weight = keras_data(built, batch)
        with warnings.catch_warnings():
            if _mispaired(spec):
                # Keras' sorted-name pairing (keras#20596) hands a from-logits
                # cross-entropy a sigmoid head's output, and Keras says so: the
                # symptom of the bug this job reproduces on purpose, on a model
                # the audit generated; the check itself reports the mispairing
                warnings.filterwarnings("ignore", message=MISPAIRED_LOGITS_WARNING)
            return gradcheck.check_keras_model(
                model, x, y, sample_weight=sample_weight, seed=seed
            )

    return check


#: Keras' warning when a from-logits loss receives a sigmoid's output
MISPAIRED_LOGITS_WARNING = r'"`\w+` received `from_logits=True`, but the `output`'
