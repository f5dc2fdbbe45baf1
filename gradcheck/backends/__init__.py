"""Backend selection. Frameworks are detected through ``sys.modules``: gradcheck never
imports torch or TensorFlow itself until an object of that framework shows up."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gradcheck.backends.base import Session, TensorSpec
from gradcheck.errors import MixedFrameworksError, UnsupportedInputError

__all__ = [
    "Session",
    "TensorSpec",
    "detect_framework",
    "open_session",
    "step_backend",
    "variant_driver",
]


def _leaves(obj: Any) -> Iterable[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif obj is not None:
        yield obj


def _framework_of(obj: Any) -> str | None:
    if "torch" in sys.modules:
        from gradcheck.backends import torch as tb

        if tb.owns(obj):
            return tb.FRAMEWORK
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        if _is_keras_torch(obj):
            return "torch"
        if "tensorflow" in sys.modules:
            from gradcheck.backends import tensorflow as tfb

            if tfb.owns(obj):
                return tfb.FRAMEWORK
    return None


def _is_keras_torch(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    if keras is None:
        return False
    kinds = (keras.Model, keras.layers.Layer, keras.Variable)
    return isinstance(obj, kinds) and keras.backend.backend() == "torch"


def detect_framework(inputs: Sequence[Any], params: Any) -> str:
    found: dict[str, str] = {}
    for where, group in (("inputs", inputs), ("params", params)):
        for leaf in _leaves(group):
            fw = _framework_of(leaf)
            if fw is not None:
                found.setdefault(fw, f"{where}: {type(leaf).__name__}")
    if len(found) > 1:
        detail = "; ".join(f"{fw} ({what})" for fw, what in found.items())
        raise MixedFrameworksError(
            f"inputs and params mix frameworks: {detail}. A check runs in one framework; "
            "convert the tensors (e.g. torch.from_numpy(t.numpy())) or check separately."
        )
    if not found:
        raise UnsupportedInputError(
            "found no torch or TensorFlow tensor, Variable, nn.Module or keras.Model in "
            "inputs/params. Pass the tensors to differentiate as inputs (with "
            "requires_grad=True for torch) or the model as params=model."
        )
    return next(iter(found))


def open_session(fn: Callable[..., Any], inputs: Sequence[Any], params: Any) -> Session:
    if not callable(fn):
        raise UnsupportedInputError(f"fn must be callable; got {type(fn).__name__}.")
    framework = detect_framework(inputs, params)
    if framework == "torch":
        from gradcheck.backends.torch import TorchSession

        if _is_keras_torch(params) or any(_is_keras_torch(p) for p in _leaves(params)):
            params = _keras_torch_params(params)
        return TorchSession(fn, inputs, params)
    from gradcheck.backends.tensorflow import TensorflowSession

    return TensorflowSession(fn, inputs, params)


def _keras_torch_params(params: Any) -> dict[str, Any]:
    """Keras 3 on the torch backend keeps each variable's value in a torch Parameter."""
    keras = sys.modules["keras"]
    out: dict[str, Any] = {}
    for leaf in _leaves(params):
        if isinstance(leaf, (keras.Model, keras.layers.Layer)):
            for v in leaf.trainable_variables:
                out[v.path] = v.value
        elif isinstance(leaf, keras.Variable):
            out[leaf.path] = leaf.value
        else:
            out[f"params[{len(out)}]"] = leaf
    return out


def _driver(kind: str, loss_fn: Callable[..., Any], model: Any, batch: Any) -> Any:
    """The driver of module ``torch_<kind>`` or ``tensorflow_<kind>`` that owns
    ``model`` (a framework is only asked once it is imported: a model of it
    exists)."""
    for framework in ("torch", "tensorflow"):
        if framework in sys.modules:
            module = importlib.import_module(f"gradcheck.backends.{framework}_{kind}")
            if module.owns(model):
                return module.driver(loss_fn, model, batch)
    raise UnsupportedInputError(
        "model must be a torch.nn.Module, a Keras Model/Layer or a tf.Module; got "
        f"{type(model).__name__}."
    )


def variant_driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> Any:
    """The variants property's driver for ``model``'s framework
    (:mod:`gradcheck.backends.torch_variants`,
    :mod:`gradcheck.backends.tensorflow_variants`)."""
    return _driver("variants", loss_fn, model, batch)


#: The module that drives a training step in each framework (imported on first use):
#: torch_step for check_training_step, keras_step for check_keras_training.
_STEP_BACKENDS = {
    "torch": "gradcheck.backends.torch_step",
    "keras": "gradcheck.backends.keras_step",
}


def step_backend(framework: str) -> Any:
    """The training-step driver module of ``framework`` ("torch" or "keras")."""
    return importlib.import_module(_STEP_BACKENDS[framework])
