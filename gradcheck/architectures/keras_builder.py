"""Build a spec as a functional ``keras.Model`` with the spec's initial weights.

Layout conversions from the neutral weights (:mod:`gradcheck.architectures.weights`):
Dense/Conv1D kernels are already Keras' (``x @ kernel``, channels last); LSTM
stacks the gates column-wise in the neutral order (Keras': i, f, c, o) with one
bias; GRU uses ``reset_after=True`` (torch's formulation), gates column-wise in
Keras' order z, r, h, and a (2, 3u) bias: input bias, recurrent bias.

Conv2D/DepthwiseConv2D/SeparableConv2D kernels are the neutral ones; attention is
``keras.layers.MultiHeadAttention`` (self-attention, its EinsumDense layouts are the
neutral ones), the key padding mask an input turned into a (batch, steps, steps)
``attention_mask``, the causal mask ``use_causal_mask``. BatchNormalization and
Dropout run in the mode the spec fixes, whatever ``training=`` the model is called
with (:class:`PinnedBatchNormalization`, :class:`PinnedDropout`); BatchNorm keeps
Keras' momentum (torch gets 1 - it) and epsilon. An embedding with ``padding_idx``
is refused: Keras' Embedding has no such row (``mask_zero`` masks the steps for the
layers downstream, which is another thing).

Each head's loss is the Keras loss object a user would write
(``keras.losses.MeanSquaredError()`` ...), made with the dtype of the output it
receives: Keras losses cast their inputs to their own dtype (float32 unless told),
which would round a float64 model's outputs. Regularization is ``model.losses``
after the call: kernel penalties plus activity penalties divided by the batch size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradcheck.architectures import spec as S  # noqa: E402
from gradcheck.architectures.base import Built, check_dtype  # noqa: E402
from gradcheck.architectures.spec import (  # noqa: E402
    HeadSpec,
    LayerSpec,
    ModelSpec,
    Regularizer,
)
from gradcheck.architectures.weights import initial_weights  # noqa: E402
from gradcheck.errors import InvalidArgumentError  # noqa: E402

__all__ = [
    "KerasBuilt",
    "PinnedBatchNormalization",
    "PinnedDropout",
    "build",
    "compile_args",
    "keras_loss",
]

#: Keras loss class per spec loss name
LOSS_CLASSES = {
    "mse": "MeanSquaredError",
    "mae": "MeanAbsoluteError",
    "huber": "Huber",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
    "binary_crossentropy": "BinaryCrossentropy",
}
#: Keras' order of the GRU gates (z, r, h) as indices into the neutral order
GRU_ORDER = [1, 0, 2]


class PinnedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization in one mode: batch statistics when ``pinned_training``,
    moving ones otherwise, whatever ``training=`` the model is called with."""

    def __init__(self, *args: Any, pinned_training: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pinned_training = pinned_training

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return super().call(inputs, training=self.pinned_training, mask=mask)


class PinnedDropout(keras.layers.Dropout):
    """Dropout that drops when ``pinned_training`` (and never otherwise)."""

    def __init__(self, *args: Any, pinned_training: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pinned_training = pinned_training

    def call(self, inputs: Any, training: Any = None) -> Any:
        return super().call(inputs, training=self.pinned_training)


def _regularizer(r: Regularizer | None) -> Any:
    return None if r is None else keras.regularizers.L1L2(l1=r.l1, l2=r.l2)


def _layer(name: str, layer: LayerSpec, vocab: int, dtype: str, rank: int) -> Any:
    """The Keras layer; ``rank``: of its (first) input, per example."""
    k, u = layer.kind, layer.units
    common = {"name": name, "dtype": dtype}
    if k in ("dense", "conv1d", "conv2d"):
        common.update(
            activation=layer.activation,
            kernel_regularizer=_regularizer(layer.kernel_regularizer),
            activity_regularizer=_regularizer(layer.activity_regularizer),
        )
        if k == "dense":
            return keras.layers.Dense(u, **common)
        if k == "conv2d":
            return keras.layers.Conv2D(
                u, layer.kernel_size, layer.strides, padding=layer.padding, **common
            )
        return keras.layers.Conv1D(
            u, layer.kernel_size, padding=layer.padding, **common
        )
    window = {"strides": layer.strides, "padding": layer.padding}
    if k == "depthwise_conv2d":
        return keras.layers.DepthwiseConv2D(
            layer.kernel_size,
            depth_multiplier=u,
            activation=layer.activation,
            **window,
            **common,
        )
    if k == "separable_conv2d":
        return keras.layers.SeparableConv2D(
            u, layer.kernel_size, activation=layer.activation, **window, **common
        )
    if k in ("maxpool2d", "avgpool2d"):
        cls = (
            keras.layers.MaxPooling2D
            if k == "maxpool2d"
            else keras.layers.AveragePooling2D
        )
        return cls(layer.kernel_size, **window, **common)
    if k == "batchnorm":
        return PinnedBatchNormalization(
            momentum=S.BATCHNORM_MOMENTUM,
            epsilon=S.BATCHNORM_EPSILON,
            pinned_training=layer.training,
            **common,
        )
    if k == "dropout":
        return PinnedDropout(layer.rate, pinned_training=layer.training, **common)
    if k == "attention":
        return keras.layers.MultiHeadAttention(layer.num_heads, u, **common)
    if k == "add":
        return keras.layers.Add(**common)
    if k == "embedding":
        if layer.padding_idx is not None:
            raise InvalidArgumentError(
                f"layer {name!r}: padding_idx is torch-only. Keras' Embedding has "
                "no row without a gradient (mask_zero masks the steps downstream "
                "instead); build this spec with build_torch"
            )
        return keras.layers.Embedding(vocab, u, **common)
    if k == "layernorm":
        return keras.layers.LayerNormalization(epsilon=S.LAYERNORM_EPSILON, **common)
    if k == "lstm":
        return keras.layers.LSTM(u, return_sequences=layer.return_sequences, **common)
    if k == "gru":
        return keras.layers.GRU(
            u, return_sequences=layer.return_sequences, reset_after=True, **common
        )
    if k == "pool":
        if rank == 3:
            return keras.layers.GlobalAveragePooling2D(**common)
        return keras.layers.GlobalAveragePooling1D(**common)
    return keras.layers.Concatenate(axis=-1, **common)


def keras_weights(kind: str, w: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Neutral weights of one layer -> the list ``layer.set_weights`` takes."""
    if kind in ("dense", "conv1d", "conv2d"):
        return [w["kernel"], w["bias"]]
    if kind == "depthwise_conv2d":
        return [w["depthwise_kernel"], w["bias"]]
    if kind == "separable_conv2d":
        return [w["depthwise_kernel"], w["pointwise_kernel"], w["bias"]]
    if kind == "batchnorm":
        return [w["gamma"], w["beta"], w["moving_mean"], w["moving_variance"]]
    if kind == "attention":
        return [
            w[f"{part}_{what}"]
            for part in ("query", "key", "value", "output")
            for what in ("kernel", "bias")
        ]
    if kind == "embedding":
        return [w["embeddings"]]
    if kind == "layernorm":
        return [w["gamma"], w["beta"]]
    k, r = w["input_kernel"], w["recurrent_kernel"]
    if kind == "gru":
        k, r = k[GRU_ORDER], r[GRU_ORDER]
    g, n_in, u = k.shape
    kernel = k.transpose(1, 0, 2).reshape(n_in, g * u)
    recurrent = r.transpose(1, 0, 2).reshape(u, g * u)
    if kind == "lstm":
        return [kernel, recurrent, w["bias"].reshape(-1)]
    bias = np.stack(
        [
            w["input_bias"][GRU_ORDER].reshape(-1),
            w["recurrent_bias"][GRU_ORDER].reshape(-1),
        ]
    )
    return [kernel, recurrent, bias]


def tensor_layout(
    model: Any, layer: str, kind: str, neutral: Mapping[str, np.ndarray]
) -> list[tuple[str, np.ndarray]]:
    """(path of the model's variable, the neutral array laid out as that variable)
    for one layer; ``neutral`` holds arrays in the layer's neutral weight shapes."""
    variables = model.get_layer(layer).weights
    return [
        (v.path, a)
        for v, a in zip(variables, keras_weights(kind, neutral), strict=True)
    ]


def keras_loss(head: HeadSpec, dtype: str | None = None) -> Any:
    """The Keras loss object for a head."""
    cls = getattr(keras.losses, LOSS_CLASSES[head.loss])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if head.loss in S.CROSSENTROPIES:
        kwargs["from_logits"] = head.from_logits
    if head.loss == "huber":
        kwargs["delta"] = S.HUBER_DELTA
    return cls(**kwargs)


def compile_args(spec: ModelSpec, dtype: str | None = None) -> dict[str, Any]:
    """``loss=`` and ``loss_weights=`` for ``model.compile`` written the way the spec
    says (dict by head name, list in head order, or one value)."""
    losses = {h.name: keras_loss(h, dtype) for h in spec.heads}
    weights = spec.weights

    def shaped(values: dict[str, Any], fmt: str) -> Any:
        if fmt == "dict":
            return values
        if fmt == "list":
            return list(values.values())
        return next(iter(values.values()))

    return {
        "loss": shaped(losses, spec.loss_format),
        "loss_weights": shaped(weights, spec.weights_format),
    }


def attention_mask(mask: Any) -> Any:
    """A key padding mask (batch, steps), 1 = a real step, as the (batch, steps,
    steps) boolean ``attention_mask`` MultiHeadAttention takes."""
    keep = keras.ops.greater(mask, 0.5)
    steps = mask.shape[1]
    return keras.ops.repeat(keras.ops.expand_dims(keep, 1), steps, axis=1)


def _model(spec: ModelSpec, dtype: str) -> Any:
    tensors: dict[str, Any] = {}
    for i in spec.inputs:
        tensors[i.name] = keras.Input(
            shape=i.shape,
            name=i.name,
            dtype="int32" if i.kind == "tokens" else dtype,
        )
    vocab = {i.name: i.vocab for i in spec.inputs}
    shapes = spec.shapes()
    for name, layer, srcs in spec.layers():
        rank = len(shapes[srcs[0]])
        fn = _layer(name, layer, vocab.get(srcs[0], 0), dtype, rank)
        args = [tensors[s] for s in srcs]
        if layer.kind in ("merge", "add"):
            tensors[name] = fn(args)
        elif layer.kind == "attention":
            tensors[name] = fn(
                args[0],
                args[0],
                attention_mask=attention_mask(args[1]) if len(args) > 1 else None,
                use_causal_mask=layer.causal,
            )
        else:
            tensors[name] = fn(args[0])
    inputs = [tensors[i.name] for i in spec.inputs]
    outputs = [tensors[h.name] for h in spec.heads]
    if spec.output_structure == "dict":
        outputs = dict(zip(spec.head_names, outputs, strict=True))
    return keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs)


class KerasBuilt(Built):
    framework = "keras"

    def __init__(self, spec: ModelSpec, model: Any, dtype: str):
        super().__init__(spec, model, dtype)
        self._losses: dict[tuple[str, str], Any] = {}

    def _tensor(self, x: Any, dtype: str) -> Any:
        if isinstance(x, (tf.Tensor, tf.Variable)):
            return x
        return tf.constant(np.asarray(x), dtype=dtype)

    def convert(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        tokens = {i.name for i in self.spec.inputs if i.kind == "tokens"}
        sparse = {
            h.name
            for h in self.spec.heads
            if h.loss == "sparse_categorical_crossentropy"
        }
        d = self.dtype
        return {
            "inputs": {
                k: self._tensor(v, "int32" if k in tokens else d)
                for k, v in batch["inputs"].items()
            },
            "targets": {
                k: self._tensor(v, "int32" if k in sparse else d)
                for k, v in batch["targets"].items()
            },
            "sample_weights": {
                k: self._tensor(v, d)
                for k, v in (batch.get("sample_weights") or {}).items()
            },
        }

    def call(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The model's outputs, as a dict in head order."""
        xs = [inputs[i.name] for i in self.spec.inputs]
        out = self.model(xs[0] if len(xs) == 1 else xs)
        if isinstance(out, Mapping):
            return {h: out[h] for h in self.spec.head_names}
        if not isinstance(out, (list, tuple)):
            out = [out]
        return dict(zip(self.spec.head_names, out, strict=True))

    def forward(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        outputs = self.call(inputs)
        penalties = self.model.losses
        dtype = next(iter(outputs.values())).dtype
        reg = tf.zeros((), dtype=dtype)
        for p in penalties:
            reg = reg + tf.cast(p, dtype)
        return outputs, reg

    def head_loss(self, head: HeadSpec, output: Any, target: Any, sw: Any) -> Any:
        dtype = output.dtype.name
        key = (head.name, dtype)
        if key not in self._losses:
            self._losses[key] = keras_loss(head, dtype)
        return self._losses[key](target, output, sample_weight=sw)

    def compile_args(self) -> dict[str, Any]:
        return compile_args(self.spec, self.dtype)


def build(spec: ModelSpec, dtype: str = "float64") -> KerasBuilt:
    """The spec as a functional ``keras.Model`` in ``dtype``, with its weights."""
    check_dtype(dtype)
    spec.validate()
    weights = initial_weights(spec)
    model = _model(spec, dtype)
    kinds = {name: layer.kind for name, layer, _ in spec.layers()}
    for name, w in weights.items():
        model.get_layer(name).set_weights(keras_weights(kinds[name], w))
    return KerasBuilt(spec, model, dtype)
