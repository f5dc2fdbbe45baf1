"""Framework-neutral multi-head model specs, their builders and code printing.

``import gradcheck.architectures`` imports neither torch nor TensorFlow; the
builders import their framework when called::

    built = build_torch(spec, "float64")     # or build_keras(spec, "float32")
    gradcheck.check_gradients(built.total_fn(batch), params=built.model)
    gradcheck.check_linearity(
        built.total_fn(batch), built.loss_fns(batch), built.loss_weights(),
        params=built.model,
    )

Strategies that draw specs and batches live in :mod:`gradcheck.strategies`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gradcheck.architectures import code
from gradcheck.architectures.data import random_batch
from gradcheck.architectures.flow import expected_flow
from gradcheck.architectures.spec import (
    ACTIVATIONS,
    KINKED_ACTIVATIONS,
    LAYER_KINDS,
    LOSSES,
    REGULARIZATION,
    HeadSpec,
    InputSpec,
    LayerSpec,
    ModelSpec,
    Node,
    Regularizer,
)
from gradcheck.architectures.weights import initial_weights

if TYPE_CHECKING:  # pragma: no cover
    from gradcheck.architectures.keras_builder import KerasBuilt
    from gradcheck.architectures.torch_builder import TorchBuilt

__all__ = [
    "ACTIVATIONS",
    "KINKED_ACTIVATIONS",
    "LAYER_KINDS",
    "LOSSES",
    "REGULARIZATION",
    "HeadSpec",
    "InputSpec",
    "LayerSpec",
    "ModelSpec",
    "Node",
    "Regularizer",
    "build_keras",
    "build_torch",
    "expected_flow",
    "initial_weights",
    "random_batch",
    "tensor_layout",
    "to_code",
]


def build_torch(
    spec: ModelSpec, dtype: str = "float64", device: str = "cpu"
) -> TorchBuilt:
    """The spec as a ``torch.nn.Module`` on ``device`` with its losses (imports
    torch)."""
    from gradcheck.architectures import torch_builder

    return torch_builder.build(spec, dtype, device)


def build_keras(spec: ModelSpec, dtype: str = "float64") -> KerasBuilt:
    """The spec as a functional ``keras.Model`` with its losses (imports Keras)."""
    from gradcheck.architectures import keras_builder

    return keras_builder.build(spec, dtype)


def tensor_layout(
    framework: str, model: Any, layer: str, kind: str, neutral: Mapping[str, Any]
) -> list[tuple[str, Any]]:
    """How ``framework``'s built ``model`` lays out one layer's neutral weights:
    (the framework's tensor name, the array in that tensor's layout) per tensor
    (imports the framework's builder)."""
    if framework == "torch":
        from gradcheck.architectures import torch_builder as builder
    else:
        from gradcheck.architectures import keras_builder as builder
    return builder.tensor_layout(model, layer, kind, neutral)


def to_code(spec: ModelSpec, framework: str = "torch", dtype: str = "float64") -> str:
    """Python source that rebuilds the model, its weights and losses."""
    return code.to_code(spec, framework, dtype)
