"""A framework-neutral, JSON-serializable description of a multi-head model.

A :class:`ModelSpec` is a DAG of named tensors: the model's inputs, the trunk's
nodes (each a layer applied to earlier tensors; ``merge`` concatenates several) and
the heads. A head branches from any trunk node (or input), applies its own chain of
layers and ends with a ``dense`` output layer that carries the head's name; it has
its own loss and loss weight. Keras' classic functional-API example reads::

    ModelSpec(
        inputs=(
            InputSpec("text", "tokens", (6,), vocab=20),
            InputSpec("meta", shape=(3,)),
        ),
        trunk=(
            Node("embed", ("text",), LayerSpec("embedding", 8)),
            Node("lstm", ("embed",), LayerSpec("lstm", 4)),
            Node("joined", ("lstm", "meta"), LayerSpec("merge")),
        ),
        heads=(
            HeadSpec("aux", "lstm", (LayerSpec("dense", 1, "sigmoid"),),
                     loss="binary_crossentropy", from_logits=False, weight=0.2),
            HeadSpec("main", "joined", (LayerSpec("dense", 1),), loss="mse"),
        ),
    )

Shapes are per example (no batch axis): ``(features,)``, ``(steps, features)`` or
``(height, width, channels)`` (images, channels last as in Keras; the torch builder
permutes around its convolutions) for float tensors, ``(steps,)`` for token ids and
for padding masks (1 = a real step, 0 = padding; read by attention layers). Heads keep their definition order
everywhere (outputs, losses, JSON); nothing is sorted.

Nothing here imports a framework; builders live in ``torch_builder`` and
``keras_builder``.
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcheck.errors import InvalidArgumentError

#: What :meth:`ModelSpec.to_code` prints with: ``code.to_code``, set by
#: :mod:`gradcheck.architectures.code` when it is imported (the package imports it).
#: spec.py imports nothing else of gradcheck.architectures: spec <- weights <- code.
_code_printer: Callable[[ModelSpec, str, str], str] | None = None


def set_code_printer(printer: Callable[[ModelSpec, str, str], str]) -> None:
    """Install the function behind :meth:`ModelSpec.to_code`."""
    global _code_printer
    _code_printer = printer


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
]

INPUT_KINDS = ("float", "tokens", "mask")
#: layer kinds; "pool" averages over every axis but the last (steps, or height and
#: width: global average pooling), "merge" concatenates on the last axis, "add" sums
#: tensors of one shape (a residual connection)
LAYER_KINDS = (
    "dense",
    "layernorm",
    "conv1d",
    "lstm",
    "gru",
    "embedding",
    "pool",
    "merge",
    "conv2d",
    "depthwise_conv2d",
    "separable_conv2d",
    "maxpool2d",
    "avgpool2d",
    "batchnorm",
    "dropout",
    "attention",
    "add",
)
#: activations of dense/conv1d layers; "softmax" only on a probability head's output
ACTIVATIONS = (
    "linear",
    "tanh",
    "sigmoid",
    "gelu",
    "softplus",
    "elu",
    "relu",
    "leaky_relu",
    "softmax",
    "silu",
    "relu6",
    "hard_swish",
)
#: activations whose derivative jumps (elu with alpha=1 is C1: not listed);
#: relu6 at 0 and 6, hard_swish (x * relu6(x + 3) / 6) at -3 and 3
KINKED_ACTIVATIONS = ("relu", "leaky_relu", "relu6", "hard_swish")
#: leaky_relu's negative slope: Keras' default (torch's default is 0.01)
LEAKY_SLOPE = 0.2
#: LayerNormalization's epsilon: Keras' default (torch's default is 1e-5)
LAYERNORM_EPSILON = 1e-3
#: BatchNormalization's epsilon: Keras' default (torch's default is 1e-5)
BATCHNORM_EPSILON = 1e-3
#: BatchNormalization's momentum as Keras counts it (the moving statistics keep
#: 0.99 of their value); torch's momentum is the share of the new batch, 1 - 0.99
BATCHNORM_MOMENTUM = 0.99
#: torch's momentum for the same update (written out: 1 - 0.99 is 0.010000000000000009)
TORCH_BATCHNORM_MOMENTUM = 0.01
#: the value both builders put into masked attention scores before the softmax
#: (Keras' own; any key a mask leaves is exp(-1e9) = 0 behind the unmasked ones)
ATTENTION_MASK_VALUE = -1e9


def attention_scale(key_dim: int) -> float:
    """The factor attention scores get: ``1/sqrt(key_dim)`` rounded to float32, as
    Keras 3's TensorFlow backend applies it even to a float64 model
    (``tf.cast(python_float, "float64")`` goes through a float32 constant); torch
    uses the same number, so both frameworks build the same model."""
    return float(np.float32(1.0 / math.sqrt(key_dim)))


#: Huber's delta: Keras' default
HUBER_DELTA = 1.0
#: Keras' backend.epsilon(): probabilities are clipped to [EPS, 1 - EPS]
PROBABILITY_EPSILON = 1e-7
LOSSES = (
    "mse",
    "mae",
    "huber",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "binary_crossentropy",
)
CROSSENTROPIES = LOSSES[3:]
#: the activation a head's output layer must have when its loss takes probabilities
PROBABILITY_ACTIVATION = {
    "categorical_crossentropy": "softmax",
    "sparse_categorical_crossentropy": "softmax",
    "binary_crossentropy": "sigmoid",
}
OUTPUT_STRUCTURES = ("list", "dict")
FORMATS = ("dict", "list", "single")
#: the builders' name for the sum of kernel and activity penalties
REGULARIZATION = "regularization"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: names the generated code and the builders use for themselves
RESERVED_NAMES = frozenset(
    {
        REGULARIZATION,
        "activity",
        "batch",
        "evaluate",
        "f",
        "forward",
        "init",
        "inputs",
        "keras",
        "loss",
        "losses",
        "model",
        "nn",
        "np",
        "os",
        "outputs",
        "reduce",
        "self",
        "seed",
        "tf",
        "torch",
        "total",
        "train",
        "training",
        "weights",
        "zlib",
    }
)
_WITH_UNITS = (
    "dense",
    "conv1d",
    "lstm",
    "gru",
    "embedding",
    "conv2d",
    "depthwise_conv2d",
    "separable_conv2d",
    "attention",
)
_CONV2D = ("conv2d", "depthwise_conv2d", "separable_conv2d")
_POOL2D = ("maxpool2d", "avgpool2d")
_IMAGE_ONLY = _CONV2D + _POOL2D
_WITH_ACTIVATION = ("dense", "conv1d") + _CONV2D
_WITH_REGULARIZER = ("dense", "conv1d", "conv2d")
_WITH_KERNEL = ("conv1d",) + _IMAGE_ONLY
_SEQUENCE_ONLY = ("conv1d", "lstm", "gru", "attention")
#: layers that read several tensors
_MULTI_INPUT = ("merge", "add")


def _fail(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"invalid model spec: {msg}")


@dataclass(frozen=True)
class Regularizer:
    """``l1 * sum(|x|) + l2 * sum(x**2)`` (Keras' ``L1L2``). As an activity
    regularizer Keras divides it by the batch size; the builders do the same."""

    l1: float = 0.0
    l2: float = 0.0


@dataclass(frozen=True)
class InputSpec:
    """A model input: float features or integer token ids in ``[0, vocab)``."""

    name: str
    kind: str = "float"
    shape: tuple[int, ...] = (1,)
    vocab: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One layer. ``units``: output features (dense, lstm/gru units, embedding
    dimension, conv1d/conv2d/separable_conv2d filters), the depth multiplier of a
    depthwise_conv2d (``channels * units`` outputs), the key dimension per head of
    an attention layer; lstm/gru return the last step unless ``return_sequences``;
    regularizers apply to dense, conv1d and conv2d only.

    ``kernel_size``/``strides``/``padding``: square 2-D kernels and pooling windows
    (pools are "valid" only); ``strides`` also for conv1d (1 only).
    ``training``: a batchnorm normalizes with the batch's statistics (else with its
    moving ones), a dropout drops (else it is the identity): fixed per layer,
    whatever mode the framework's model is in. ``trained_statistics``: a
    batchnorm's moving mean and variance are drawn (nonzero mean, variance not 1)
    instead of a fresh layer's 0 and 1. ``rate``: dropout's drop probability.
    ``num_heads``/``causal``: self-attention heads and a causal mask; an attention
    node may read a ``mask`` input second (key padding mask). ``padding_idx``: an
    embedding whose row of that id gets no gradient (torch only)."""

    kind: str
    units: int = 0
    activation: str = "linear"
    kernel_size: int = 1
    padding: str = "valid"
    return_sequences: bool = False
    kernel_regularizer: Regularizer | None = None
    activity_regularizer: Regularizer | None = None
    strides: int = 1
    training: bool = False
    trained_statistics: bool = False
    rate: float = 0.0
    num_heads: int = 0
    causal: bool = False
    padding_idx: int | None = None


@dataclass(frozen=True)
class Node:
    """A trunk node: ``layer`` applied to the tensors named in ``inputs``."""

    name: str
    inputs: tuple[str, ...]
    layer: LayerSpec


@dataclass(frozen=True)
class HeadSpec:
    """A head: ``layers`` applied in order to ``source``; the last one is a dense
    output layer named like the head. ``from_logits`` is for cross-entropies: False
    means the output layer applies softmax (sigmoid for binary) and the loss takes
    probabilities."""

    name: str
    source: str
    layers: tuple[LayerSpec, ...]
    loss: str = "mse"
    from_logits: bool = True
    weight: float = 1.0

    @property
    def output_kind(self) -> str:
        """One of "values" (regression), "logits" or "probabilities"."""
        if self.loss not in CROSSENTROPIES:
            return "values"
        return "logits" if self.from_logits else "probabilities"

    @property
    def units(self) -> int:
        return self.layers[-1].units if self.layers else 0

    def layer_names(self) -> tuple[str, ...]:
        """Hidden layers are ``{head}_1, {head}_2, ...``; the output is ``{head}``."""
        n = len(self.layers)
        return tuple(f"{self.name}_{i + 1}" for i in range(n - 1)) + (self.name,)


@dataclass(frozen=True)
class ModelSpec:
    """A multi-head model. ``output_structure``: the Keras model returns a list or a
    dict of head outputs. ``loss_format``/``weights_format``: how the Keras user
    passes ``loss``/``loss_weights`` to ``compile`` (a dict by head name, a list in
    head order, or a single value for every head). ``seed`` fixes the initial
    weights (see :mod:`gradcheck.architectures.weights`)."""

    inputs: tuple[InputSpec, ...]
    trunk: tuple[Node, ...]
    heads: tuple[HeadSpec, ...]
    output_structure: str = "list"
    loss_format: str = "dict"
    weights_format: str = "dict"
    seed: int = 0
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; fields at their default value are left out."""
        return _encode(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        try:
            return _decode_model(data)
        except InvalidArgumentError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _fail(f"cannot read {type(exc).__name__}: {exc}") from None

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------ structure
    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def weights(self) -> dict[str, float]:
        """Loss weight per head, in head order."""
        return {h.name: h.weight for h in self.heads}

    def head(self, name: str) -> HeadSpec:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(name)

    def layers(self) -> Iterator[tuple[str, LayerSpec, tuple[str, ...]]]:
        """Every layer as ``(name, layer, input names)``: trunk nodes in an order
        where each comes after its inputs, then each head's chain."""
        for node in self.ordered_trunk():
            yield node.name, node.layer, node.inputs
        for h in self.heads:
            prev = h.source
            for name, layer in zip(h.layer_names(), h.layers, strict=True):
                yield name, layer, (prev,)
                prev = name

    def ordered_trunk(self) -> tuple[Node, ...]:
        """Trunk nodes in a topological order (definition order among ready nodes)."""
        if "order" not in self._cache:
            self._cache["order"] = _toposort(self)
        return self._cache["order"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shape of every named tensor (inputs, nodes, head layers)."""
        if "shapes" not in self._cache:
            self.validate()
        return dict(self._cache["shapes"])

    @property
    def stochastic(self) -> bool:
        """A dropout layer drops in training mode: every forward pass draws anew,
        and a gradient check can only say ``nondeterministic``."""
        return any(
            layer.kind == "dropout" and layer.training for _, layer, _ in self.layers()
        )

    def min_batch_size(self) -> int:
        """The smallest batch the model runs on: a batchnorm in training mode
        normalizes each channel over the batch and the other axes, and one value
        per channel (one example of a vector) leaves nothing to normalize (torch
        refuses it)."""
        shapes = self.shapes()
        least = 1
        for _, layer, srcs in self.layers():
            if layer.kind == "batchnorm" and layer.training:
                if math.prod(shapes[srcs[0]][:-1]) == 1:
                    least = 2
        return least

    def with_weights(self, weights: Mapping[str, float]) -> ModelSpec:
        """A copy with other loss weights (by head name)."""
        unknown = set(weights) - set(self.head_names)
        if unknown:
            raise InvalidArgumentError(f"no head named {sorted(unknown)}")
        heads = tuple(
            dataclasses.replace(h, weight=float(weights.get(h.name, h.weight)))
            for h in self.heads
        )
        return dataclasses.replace(self, heads=heads)

    # ------------------------------------------------------------ validation
    def validate(self) -> ModelSpec:
        """Raise :class:`InvalidArgumentError` naming the first inconsistency;
        return the spec."""
        if "shapes" not in self._cache:
            self._cache["shapes"] = _validate(self)
        return self

    # ------------------------------------------------------------ code
    def to_code(self, framework: str = "torch", dtype: str = "float64") -> str:
        """Python source that rebuilds this model, its initial weights and its
        losses with the framework alone (no gradcheck import): the same as
        ``gradcheck.architectures.code.to_code(spec, framework, dtype)``, which
        registers itself here (see :func:`set_code_printer`)."""
        if _code_printer is None:  # pragma: no cover - the package imports code.py
            raise RuntimeError(
                "no code printer: import gradcheck.architectures.code first."
            )
        return _code_printer(self, framework, dtype)


# ---------------------------------------------------------------- validation
def _toposort(spec: ModelSpec) -> tuple[Node, ...]:
    known = {i.name for i in spec.inputs}
    by_name = {n.name: n for n in spec.trunk}
    for n in spec.trunk:
        for src in n.inputs:
            if src not in known and src not in by_name:
                raise _fail(
                    f"node {n.name!r} reads {src!r}, which is neither an input "
                    f"nor a trunk node (known: {sorted(known | set(by_name))})"
                )
    done: list[Node] = []
    ready = set(known)
    pending = list(spec.trunk)
    while pending:
        progress = [n for n in pending if all(s in ready for s in n.inputs)]
        if not progress:
            raise _fail(f"the trunk has a cycle: {_find_cycle(pending, by_name)}")
        for n in progress:
            done.append(n)
            ready.add(n.name)
        pending = [n for n in pending if n.name not in ready]
    return tuple(done)


def _find_cycle(pending: list[Node], by_name: Mapping[str, Node]) -> str:
    stuck = {n.name for n in pending}
    path = [pending[0].name]
    while True:
        node = by_name[path[-1]]
        nxt = next(s for s in node.inputs if s in stuck)
        if nxt in path:
            cycle = path[path.index(nxt) :] + [nxt]
            return " -> ".join(reversed(cycle))
        path.append(nxt)


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(
            f"{what} name {name!r} must be lowercase letters, digits and '_', "
            "starting with a letter"
        )
    if keyword.iskeyword(name) or name in RESERVED_NAMES:
        raise _fail(f"{what} name {name!r} is reserved; pick another")


def _check_regularizer(r: Any, where: str) -> None:
    if r is None:
        return
    if not isinstance(r, Regularizer):
        raise _fail(f"{where} must be a Regularizer or None, got {r!r}")
    for v in (r.l1, r.l2):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _fail(f"{where} needs finite l1, l2 >= 0, got {r!r}")


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def spatial_size(size: int, kernel: int, strides: int, padding: str) -> int:
    """Output length of one axis of a convolution or pooling window (Keras' rule:
    "valid" keeps whole windows, "same" keeps ``ceil(size / strides)``)."""
    if padding == "same":
        return -(-size // strides)
    return (size - kernel) // strides + 1


def same_padding(size: int, kernel: int, strides: int) -> tuple[int, int]:
    """(before, after) zeros TensorFlow adds on one axis for padding "same" (the
    extra one goes after): what the torch builder pads explicitly."""
    total = max(
        (spatial_size(size, kernel, strides, "same") - 1) * strides + kernel - size, 0
    )
    return total // 2, total - total // 2


def layer_output_shape(layer: LayerSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-example output shape of one layer applied to ``shape`` (no validation:
    :func:`_layer_shape` checks first; the strategies use it on what they build)."""
    k = layer.kind
    if k == "embedding":
        return shape + (layer.units,)
    if k == "dense":
        return shape[:-1] + (layer.units,)
    if k in ("layernorm", "batchnorm", "dropout", "attention", "add"):
        return shape
    if k == "pool":
        return shape[-1:]
    if k in ("lstm", "gru"):
        return ((shape[0],) if layer.return_sequences else ()) + (layer.units,)
    if k == "conv1d":
        same = layer.padding == "same"
        return (shape[0] if same else shape[0] - layer.kernel_size + 1, layer.units)
    if k in _IMAGE_ONLY:
        h, w = (
            spatial_size(d, layer.kernel_size, layer.strides, layer.padding)
            for d in shape[:2]
        )
        if k == "depthwise_conv2d":
            return (h, w, shape[2] * layer.units)
        if k in _POOL2D:
            return (h, w, shape[2])
        return (h, w, layer.units)
    raise InvalidArgumentError(f"{k!r} layers have no single-input output shape")


def _layer_shape(
    where: str, layer: LayerSpec, srcs: list[tuple[str, tuple[int, ...], str]]
) -> tuple[int, ...]:
    """Check one layer against its inputs ``(name, shape, input kind)`` (kind
    "float" for every layer's output); return the per-example output shape."""
    k = layer.kind
    if k not in LAYER_KINDS:
        raise _fail(f"{where}: unknown layer kind {k!r}; one of {LAYER_KINDS}")
    if k in _WITH_UNITS and not _positive(layer.units):
        raise _fail(f"{where}: a {k} layer needs units >= 1, got {layer.units!r}")
    if k not in _WITH_UNITS and layer.units != 0:
        raise _fail(f"{where}: a {k} layer has no units (got {layer.units})")
    if layer.activation not in ACTIVATIONS:
        raise _fail(f"{where}: unknown activation {layer.activation!r}")
    if k not in _WITH_ACTIVATION and layer.activation != "linear":
        raise _fail(f"{where}: a {k} layer takes no activation")
    if k not in _WITH_KERNEL and (
        layer.kernel_size != 1 or layer.padding != "valid" or layer.strides != 1
    ):
        raise _fail(
            f"{where}: kernel_size, strides and padding are for convolutions "
            "and pooling only"
        )
    if k not in ("lstm", "gru") and layer.return_sequences:
        raise _fail(f"{where}: return_sequences is for lstm/gru only")
    if k not in ("batchnorm", "dropout") and layer.training:
        raise _fail(f"{where}: training is for batchnorm and dropout only")
    if k != "batchnorm" and layer.trained_statistics:
        raise _fail(f"{where}: trained_statistics is for batchnorm only")
    if k != "attention" and (layer.num_heads != 0 or layer.causal):
        raise _fail(f"{where}: num_heads and causal are for attention only")
    if k != "embedding" and layer.padding_idx is not None:
        raise _fail(f"{where}: padding_idx is for embedding only")
    rate = layer.rate
    if k == "dropout":
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not 0 < rate < 1
        ):
            raise _fail(f"{where}: dropout needs 0 < rate < 1, got {rate!r}")
    elif rate != 0.0:
        raise _fail(f"{where}: rate is for dropout only")
    for attr in ("kernel_regularizer", "activity_regularizer"):
        r = getattr(layer, attr)
        if r is not None and k not in _WITH_REGULARIZER:
            raise _fail(f"{where}: {attr} is for dense, conv1d and conv2d only")
        _check_regularizer(r, f"{where}: {attr}")
    masks = [name for name, _, kind in srcs if kind == "mask"]
    if k == "attention":
        return _attention_shape(where, layer, srcs)
    if masks:
        raise _fail(f"{where}: {masks[0]!r} is a padding mask; only attention reads it")
    if k in _MULTI_INPUT:
        if len(srcs) < 2:
            raise _fail(f"{where}: {k} combines two or more tensors")
    elif len(srcs) != 1:
        raise _fail(f"{where}: a {k} layer takes one input, got {len(srcs)}")
    tokens = [name for name, _, kind in srcs if kind == "tokens"]
    if k == "embedding":
        if not tokens:
            raise _fail(f"{where}: embedding reads a tokens input")
        return srcs[0][1] + (layer.units,)
    if tokens:
        raise _fail(
            f"{where}: {tokens[0]!r} holds token ids; only an embedding reads it"
        )
    shape = srcs[0][1]
    if k in ("conv1d", "lstm", "gru") and len(shape) != 2:
        raise _fail(
            f"{where}: {k} needs a sequence (steps, features), got shape {shape}"
        )
    if k == "pool" and len(shape) < 2:
        raise _fail(f"{where}: pool averages over steps or pixels; got shape {shape}")
    if k in _IMAGE_ONLY and len(shape) != 3:
        raise _fail(
            f"{where}: {k} needs an image (height, width, channels), got shape {shape}"
        )
    if k in _WITH_KERNEL:
        _check_window(where, layer, shape)
    if k not in _MULTI_INPUT:
        return layer_output_shape(layer, shape)
    if k == "add":
        if len({s for _, s, _ in srcs}) != 1:
            got = ", ".join(f"{n} {s}" for n, s, _ in srcs)
            raise _fail(f"{where}: add needs tensors of one shape ({got})")
        return shape
    # merge
    ranks = {len(s) for _, s, _ in srcs}
    leading = {s[:-1] for _, s, _ in srcs}
    if len(ranks) != 1 or len(leading) != 1:
        got = ", ".join(f"{n} {s}" for n, s, _ in srcs)
        raise _fail(f"{where}: merge needs equal shapes but the last axis ({got})")
    return shape[:-1] + (sum(s[-1] for _, s, _ in srcs),)


def _check_window(where: str, layer: LayerSpec, shape: tuple[int, ...]) -> None:
    k = layer.kind
    if not _positive(layer.kernel_size):
        raise _fail(f"{where}: kernel_size must be >= 1")
    if not _positive(layer.strides):
        raise _fail(f"{where}: strides must be >= 1, got {layer.strides!r}")
    if layer.padding not in ("valid", "same"):
        raise _fail(f"{where}: padding is 'valid' or 'same'")
    if k == "conv1d" and layer.strides != 1:
        raise _fail(f"{where}: conv1d has strides 1 only")
    if k in _POOL2D and layer.padding != "valid":
        raise _fail(
            f"{where}: pooling is 'valid' only (Keras and torch count a 'same' "
            "average's padding differently)"
        )
    axes = shape[:1] if k == "conv1d" else shape[:2]
    if layer.padding == "valid" and layer.kernel_size > min(axes):
        what = "steps" if k == "conv1d" else "pixels (height or width)"
        raise _fail(
            f"{where}: kernel_size {layer.kernel_size} exceeds {min(axes)} {what}"
        )


def _attention_shape(
    where: str, layer: LayerSpec, srcs: list[tuple[str, tuple[int, ...], str]]
) -> tuple[int, ...]:
    if not _positive(layer.num_heads):
        raise _fail(f"{where}: attention needs num_heads >= 1")
    if not 1 <= len(srcs) <= 2:
        raise _fail(f"{where}: attention reads a sequence and optionally a mask")
    (name, shape, kind), *rest = srcs
    if kind != "float" or len(shape) != 2:
        raise _fail(
            f"{where}: attention's first input is a sequence (steps, features), "
            f"got {name!r} {shape}"
        )
    if rest:
        mname, mshape, mkind = rest[0]
        if mkind != "mask":
            raise _fail(f"{where}: attention's second input must be a mask input")
        if mshape != shape[:1]:
            raise _fail(
                f"{where}: mask {mname!r} has shape {mshape}, the sequence "
                f"{shape[:1]} steps"
            )
    return shape


def _validate(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    for attr, options in (
        ("output_structure", OUTPUT_STRUCTURES),
        ("loss_format", FORMATS),
        ("weights_format", FORMATS),
    ):
        if getattr(spec, attr) not in options:
            raise _fail(f"{attr} is one of {options}, got {getattr(spec, attr)!r}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int):
        raise _fail(f"seed must be an int, got {spec.seed!r}")
    if not 0 <= spec.seed < 2**32:
        raise _fail(f"seed must be in [0, 2**32), got {spec.seed}")
    if not spec.inputs:
        raise _fail("a model needs at least one input")
    if not spec.heads:
        raise _fail("a model needs at least one head")
    seen: dict[str, str] = {}

    def claim(name: str, what: str) -> None:
        _check_name(name, what)
        if name in seen:
            raise _fail(f"the name {name!r} is used twice ({seen[name]}, {what})")
        seen[name] = what

    shapes: dict[str, tuple[int, ...]] = {}
    input_kinds: dict[str, str] = {}
    for i in spec.inputs:
        claim(i.name, "input")
        shape = tuple(i.shape)
        if i.kind not in INPUT_KINDS:
            raise _fail(f"input {i.name!r}: kind is one of {INPUT_KINDS}")
        if not shape or not all(_positive(d) for d in shape):
            raise _fail(f"input {i.name!r}: shape needs sizes >= 1, got {i.shape!r}")
        if i.kind == "float":
            if len(shape) > 3:
                raise _fail(
                    f"input {i.name!r}: (features,), (steps, features) or "
                    "(height, width, channels)"
                )
        elif len(shape) != 1:
            raise _fail(f"input {i.name!r}: {i.kind} inputs have shape (steps,)")
        if i.kind == "tokens":
            if not _positive(i.vocab):
                raise _fail(f"input {i.name!r}: tokens need vocab >= 1")
        elif i.vocab:
            raise _fail(f"input {i.name!r}: vocab is for tokens inputs only")
        input_kinds[i.name] = i.kind
        shapes[i.name] = shape
    for n in spec.trunk:
        claim(n.name, "trunk node")
        if isinstance(n.inputs, str) or not n.inputs:
            raise _fail(f"node {n.name!r}: inputs is a tuple of names")
    for h in spec.heads:
        claim(h.name, "head")
    for h in spec.heads:
        for name in h.layer_names()[:-1]:
            claim(name, f"hidden layer of head {h.name!r}")

    for n in spec.ordered_trunk():
        srcs = [(s, shapes[s], input_kinds.get(s, "float")) for s in n.inputs]
        if n.layer.activation == "softmax":
            raise _fail(f"node {n.name!r}: softmax belongs on a head's output")
        shapes[n.name] = _layer_shape(f"node {n.name!r}", n.layer, srcs)
        p = n.layer.padding_idx
        if p is not None:
            vocab = spec.input(n.inputs[0]).vocab
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < vocab:
                raise _fail(
                    f"node {n.name!r}: padding_idx must be an id in [0, {vocab}), "
                    f"got {p!r}"
                )

    trunk_names = {n.name for n in spec.trunk} | set(shapes)
    for h in spec.heads:
        _validate_head(h, trunk_names, shapes, input_kinds)

    _check_reachable(spec)
    _check_formats(spec)
    return shapes


def _validate_head(
    h: HeadSpec,
    known: set[str],
    shapes: dict[str, tuple[int, ...]],
    input_kinds: dict[str, str],
) -> None:
    where = f"head {h.name!r}"
    if h.source not in known:
        raise _fail(f"{where} branches from unknown {h.source!r}")
    if input_kinds.get(h.source) == "mask":
        raise _fail(f"{where} branches from the padding mask {h.source!r}")
    if not h.layers:
        raise _fail(f"{where} needs at least its dense output layer")
    if h.loss not in LOSSES:
        raise _fail(f"{where}: unknown loss {h.loss!r}; one of {LOSSES}")
    w = h.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise _fail(f"{where}: weight must be a finite number, got {w!r}")
    if w < 0:
        raise _fail(f"{where}: weight must be >= 0, got {w}")
    prev = h.source
    for name, layer in zip(h.layer_names(), h.layers, strict=True):
        lw = f"{where}, layer {name!r}"
        if layer.kind in ("merge", "add", "embedding"):
            raise _fail(f"{lw}: a head's layers cannot be {layer.kind}")
        if layer.activation == "softmax" and name != h.name:
            raise _fail(f"{lw}: softmax belongs on the head's output layer")
        shapes[name] = _layer_shape(
            lw, layer, [(prev, shapes[prev], input_kinds.get(prev, "float"))]
        )
        prev = name
    out = h.layers[-1]
    if out.kind != "dense":
        raise _fail(f"{where}: the output layer must be dense, got {out.kind}")
    if len(shapes[h.name]) != 1:
        raise _fail(
            f"{where}: the output must be (units,) per example, got "
            f"{shapes[h.name]}; reduce the steps or pixels first (pool, lstm or gru)"
        )
    if h.loss not in CROSSENTROPIES:
        if h.from_logits is not True:
            raise _fail(f"{where}: from_logits applies to cross-entropies only")
        if out.activation == "softmax":
            raise _fail(f"{where}: softmax output with a {h.loss} loss")
        return
    if h.loss != "binary_crossentropy" and out.units < 2:
        raise _fail(f"{where}: {h.loss} needs units >= 2 (classes)")
    prob = PROBABILITY_ACTIVATION[h.loss]
    if h.from_logits and out.activation in ("softmax", "sigmoid"):
        raise _fail(
            f"{where}: {h.loss} with from_logits=True, but the output layer "
            f"applies {out.activation}: use linear or from_logits=False"
        )
    if not h.from_logits and out.activation != prob:
        raise _fail(
            f"{where}: {h.loss} from probabilities needs a {prob} output layer, "
            f"got {out.activation}"
        )


def _check_reachable(spec: ModelSpec) -> None:
    by_name = {n.name: n for n in spec.trunk}
    used: set[str] = set()
    stack = [h.source for h in spec.heads]
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        if name in by_name:
            stack.extend(by_name[name].inputs)
    for n in spec.trunk:
        if n.name not in used:
            raise _fail(f"node {n.name!r} reaches no head: remove it")
    for i in spec.inputs:
        if i.name not in used:
            raise _fail(f"input {i.name!r} reaches no head: remove it")


def _check_formats(spec: ModelSpec) -> None:
    if len(spec.heads) == 1:
        return
    losses = {(h.loss, h.from_logits) for h in spec.heads}
    if spec.loss_format == "single" and len(losses) > 1:
        raise _fail("loss_format 'single' needs the same loss on every head")
    if spec.weights_format == "single" and len({h.weight for h in spec.heads}) > 1:
        raise _fail("weights_format 'single' needs the same weight on every head")
    if (spec.loss_format == "single") != (spec.weights_format == "single"):
        raise _fail(
            "Keras pairs a single loss only with a single loss weight (and a "
            "dict/list of losses only with a dict/list of weights) on several "
            f"outputs; got loss_format {spec.loss_format!r} and weights_format "
            f"{spec.weights_format!r}"
        )


# ---------------------------------------------------------------- (de)serialization
def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            out[f.name] = _encode(value)
        return out
    if isinstance(obj, (tuple, list)):
        return [_encode(v) for v in obj]
    return obj


def _take(data: Mapping[str, Any], cls: type, what: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(f"{what} must be a JSON object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise _fail(
            f"{what}: unknown field(s) {sorted(unknown)}; known {sorted(names)}"
        )
    return dict(data)


def _regularizer(data: Any) -> Regularizer | None:
    if data is None:
        return None
    return Regularizer(**_take(data, Regularizer, "regularizer"))


def _layer(data: Mapping[str, Any]) -> LayerSpec:
    d = _take(data, LayerSpec, "layer")
    for attr in ("kernel_regularizer", "activity_regularizer"):
        d[attr] = _regularizer(d.get(attr))
    return LayerSpec(**d)


def _decode_model(data: Mapping[str, Any]) -> ModelSpec:
    d = _take(data, ModelSpec, "model spec")
    inputs = []
    for i in d["inputs"]:
        di = _take(i, InputSpec, "input")
        di["shape"] = tuple(di.get("shape", (1,)))
        inputs.append(InputSpec(**di))
    trunk = []
    for n in d.get("trunk", ()):
        dn = _take(n, Node, "node")
        trunk.append(Node(dn["name"], tuple(dn["inputs"]), _layer(dn["layer"])))
    heads = []
    for h in d["heads"]:
        dh = _take(h, HeadSpec, "head")
        dh["layers"] = tuple(_layer(x) for x in dh["layers"])
        heads.append(HeadSpec(**dh))
    d.update(inputs=tuple(inputs), trunk=tuple(trunk), heads=tuple(heads))
    return ModelSpec(**d)
