"""Build a spec as a ``torch.nn.Module`` with the spec's initial weights.

Activations flow in Keras' layout, (batch, steps, features) and (batch, height,
width, channels); conv1d, conv2d and the 2-D pools move the channels to axis 1 and
back around the torch op, padding "same" is TensorFlow's (explicit zeros, the odd
one after). Layout conversions from the neutral weights
(:mod:`gradcheck.architectures.weights`): Linear ``weight = kernel.T``; Conv1d
``weight = kernel.transpose(2, 1, 0)``; Conv2d ``weight = kernel.transpose(3, 2, 0,
1)``, a depthwise one has ``groups=in`` and ``weight[c * u + j, 0] =
kernel[:, :, c, j]``; LSTM/GRU stack the gates row-wise in the neutral order
(torch's: i, f, g, o and r, z, n); the LSTM's one bias goes into ``bias_ih`` and
``bias_hh`` is zero. Attention is written from four Linear layers (query, key, value,
output) with Keras' MultiHeadAttention arithmetic. BatchNorm and dropout run in the
mode the spec fixes (``F.batch_norm``/``F.dropout`` with ``training=``), whatever
``model.train()``/``eval()`` says; BatchNorm's momentum is 1 - Keras' and its
epsilon Keras'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradcheck.architectures import spec as S
from gradcheck.architectures.base import Built, check_dtype
from gradcheck.architectures.spec import HeadSpec, LayerSpec, ModelSpec, Regularizer
from gradcheck.architectures.weights import initial_weights
from gradcheck.errors import InvalidArgumentError

__all__ = ["SpecModule", "TorchBuilt", "build"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

ACTIVATIONS = {
    "linear": lambda x: x,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "softplus": F.softplus,
    "elu": F.elu,
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, S.LEAKY_SLOPE),
    "softmax": lambda x: torch.softmax(x, -1),
    "silu": F.silu,
    "relu6": F.relu6,
    "hard_swish": F.hardswish,
}


class Separable(torch.nn.Module):
    """Keras' SeparableConv2D: a depthwise convolution (no bias), then a 1x1 one."""

    def __init__(self, channels: int, filters: int, kernel_size: int, strides: int):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(
            channels, channels, kernel_size, strides, groups=channels, bias=False
        )
        self.pointwise = torch.nn.Conv2d(channels, filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Attention(torch.nn.Module):
    """Keras' MultiHeadAttention (self-attention, output back to the input width)
    from four Linear layers: ``heads`` heads of ``key_dim``, scores ``q . k`` scaled
    by Keras' ``1/sqrt(key_dim)`` (rounded to float32, see
    :func:`~gradcheck.architectures.spec.attention_scale`), masked scores -1e9."""

    def __init__(self, features: int, heads: int, key_dim: int):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        for part in ("query", "key", "value"):
            self.add_module(part, torch.nn.Linear(features, heads * key_dim))
        self.output = torch.nn.Linear(heads * key_dim, features)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        return attention(
            x, self.query, self.key, self.value, self.output, self.heads, mask, causal
        )


def attention(
    x: torch.Tensor,
    query: torch.nn.Module,
    key: torch.nn.Module,
    value: torch.nn.Module,
    output: torch.nn.Module,
    heads: int,
    mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Self-attention as Keras computes it; ``mask`` (batch, steps): 1 = a real key."""
    n, t, _ = x.shape

    def split(h: torch.Tensor) -> torch.Tensor:  # (n, heads, t, key_dim)
        return h.reshape(n, t, heads, -1).transpose(1, 2)

    q, k, v = split(query(x)), split(key(x)), split(value(x))
    scores = (q @ k.transpose(-1, -2)) * S.attention_scale(q.shape[-1])
    keep = torch.ones(t, t, dtype=torch.bool, device=x.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(n, 1, t, t)
    if mask is not None:
        keep = keep & (mask > 0.5)[:, None, None, :]
    scores = scores.masked_fill(~keep, S.ATTENTION_MASK_VALUE)
    probs = torch.softmax(scores, -1)
    return output((probs @ v).transpose(1, 2).reshape(n, t, -1))


class PinnedBatchNorm(torch.nn.BatchNorm1d):
    """BatchNorm over the last (channels) axis in the mode the spec fixes (batch
    statistics when ``pinned_training``), whatever ``.train()``/``.eval()`` says.
    Called as a module, so forward hooks on it run."""

    def __init__(self, features: int, pinned_training: bool):
        super().__init__(features, S.BATCHNORM_EPSILON, S.TORCH_BATCHNORM_MOMENTUM)
        self.pinned_training = pinned_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, self, self.pinned_training)


def pad_same(x: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """TensorFlow's "same" zeros on the last two axes of a (batch, C, H, W) tensor."""
    if layer.padding != "same":
        return x
    (top, bottom), (left, right) = (
        S.same_padding(d, layer.kernel_size, layer.strides) for d in x.shape[2:]
    )
    return F.pad(x, (left, right, top, bottom))


def _module(layer: LayerSpec, fan_in: int, vocab: int) -> torch.nn.Module | None:
    k, u = layer.kind, layer.units
    if k == "dense":
        return torch.nn.Linear(fan_in, u)
    if k == "conv1d":
        pad = "same" if layer.padding == "same" else 0
        return torch.nn.Conv1d(fan_in, u, layer.kernel_size, padding=pad)
    if k == "layernorm":
        return torch.nn.LayerNorm(fan_in, eps=S.LAYERNORM_EPSILON)
    if k == "lstm":
        return torch.nn.LSTM(fan_in, u, batch_first=True)
    if k == "gru":
        return torch.nn.GRU(fan_in, u, batch_first=True)
    ks, st = layer.kernel_size, layer.strides
    if k == "conv2d":
        return torch.nn.Conv2d(fan_in, u, ks, st)
    if k == "depthwise_conv2d":
        return torch.nn.Conv2d(fan_in, fan_in * u, ks, st, groups=fan_in)
    if k == "separable_conv2d":
        return Separable(fan_in, u, ks, st)
    if k == "batchnorm":
        return PinnedBatchNorm(fan_in, layer.training)
    if k == "embedding":
        return torch.nn.Embedding(vocab, u, padding_idx=layer.padding_idx)
    if k == "attention":
        return Attention(fan_in, layer.num_heads, u)
    return None  # pools, merge, add, dropout


def torch_params(kind: str, w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Neutral weights of one layer -> its torch parameters by attribute name."""
    if kind == "dense":
        return {"weight": w["kernel"].T, "bias": w["bias"]}
    if kind == "conv1d":
        return {"weight": w["kernel"].transpose(2, 1, 0), "bias": w["bias"]}
    if kind == "embedding":
        return {"weight": w["embeddings"]}
    if kind == "layernorm":
        return {"weight": w["gamma"], "bias": w["beta"]}
    if kind == "conv2d":
        return {"weight": w["kernel"].transpose(3, 2, 0, 1), "bias": w["bias"]}
    if kind == "depthwise_conv2d":
        k, _, c, m = w["depthwise_kernel"].shape
        weight = w["depthwise_kernel"].transpose(2, 3, 0, 1).reshape(c * m, 1, k, k)
        return {"weight": weight, "bias": w["bias"]}
    if kind == "separable_conv2d":
        k, _, c, _ = w["depthwise_kernel"].shape
        depthwise = w["depthwise_kernel"].transpose(2, 3, 0, 1).reshape(c, 1, k, k)
        return {
            "depthwise.weight": depthwise,
            "pointwise.weight": w["pointwise_kernel"].transpose(3, 2, 0, 1),
            "pointwise.bias": w["bias"],
        }
    if kind == "batchnorm":
        return {
            "weight": w["gamma"],
            "bias": w["beta"],
            "running_mean": w["moving_mean"],
            "running_var": w["moving_variance"],
        }
    if kind == "attention":
        out = {}
        for part in ("query", "key", "value"):
            kernel = w[f"{part}_kernel"]
            out[f"{part}.weight"] = kernel.reshape(kernel.shape[0], -1).T
            out[f"{part}.bias"] = w[f"{part}_bias"].reshape(-1)
        kernel = w["output_kernel"]
        out["output.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        out["output.bias"] = w["output_bias"]
        return out
    g, _, u = w["input_kernel"].shape
    out = {
        "weight_ih_l0": w["input_kernel"].transpose(0, 2, 1).reshape(g * u, -1),
        "weight_hh_l0": w["recurrent_kernel"].transpose(0, 2, 1).reshape(g * u, u),
    }
    if kind == "lstm":
        out["bias_ih_l0"] = w["bias"].reshape(-1)
        out["bias_hh_l0"] = np.zeros(g * u)
    else:
        out["bias_ih_l0"] = w["input_bias"].reshape(-1)
        out["bias_hh_l0"] = w["recurrent_bias"].reshape(-1)
    return out


def tensor_layout(
    model: Any, layer: str, kind: str, neutral: Mapping[str, np.ndarray]
) -> list[tuple[str, np.ndarray]]:
    """(name of the model's tensor, the neutral array laid out as that tensor) for
    one layer; ``neutral`` holds arrays in the layer's neutral weight shapes."""
    return [(f"{layer}.{attr}", a) for attr, a in torch_params(kind, neutral).items()]


def _penalty(r: Regularizer | None, x: torch.Tensor | None) -> torch.Tensor | None:
    if r is None or x is None:
        return None
    out = torch.zeros((), dtype=x.dtype, device=x.device)
    if r.l1:
        out = out + r.l1 * x.abs().sum()
    if r.l2:
        out = out + r.l2 * x.square().sum()
    return out


class SpecModule(torch.nn.Module):
    """The spec's model: ``forward(inputs)`` takes a dict of tensors by input name
    and returns a dict of head outputs in head order. Every layer is a submodule
    named like its spec node (parameters read ``lstm.weight_ih_l0``)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec.validate()
        shapes = spec.shapes()
        vocab = {i.name: i.vocab for i in spec.inputs}
        for name, layer, srcs in spec.layers():
            if hasattr(self, name):
                raise InvalidArgumentError(
                    f"the layer name {name!r} clashes with the attribute "
                    f"{type(self).__name__}.{name}; rename the layer"
                )
            module = _module(layer, shapes[srcs[0]][-1], vocab.get(srcs[0], 0))
            if module is not None:
                self.add_module(name, module)

    def run(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Head outputs and the regularization (kernel + activity penalties)."""
        values: dict[str, torch.Tensor] = {
            i.name: inputs[i.name] for i in self.spec.inputs
        }
        first = next(self.parameters())
        reg = torch.zeros((), dtype=first.dtype, device=first.device)
        for name, layer, srcs in self.spec.layers():
            x, penalties = self._call_layer(name, layer, [values[s] for s in srcs])
            values[name] = x
            for p in penalties:
                reg = reg + p
        return {h.name: values[h.name] for h in self.spec.heads}, reg

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(inputs)[0]

    def _call_layer(
        self, name: str, layer: LayerSpec, xs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        k = layer.kind
        if k == "merge":
            return torch.cat(xs, -1), []
        if k == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out, []
        if k == "attention":
            mask = xs[1] if len(xs) > 1 else None
            return getattr(self, name)(xs[0], mask, layer.causal), []
        (x,) = xs
        if k == "pool":
            return x.mean(tuple(range(1, x.dim() - 1))), []
        if k == "dropout":
            return F.dropout(x, layer.rate, training=layer.training), []
        if k in ("maxpool2d", "avgpool2d"):
            pool = F.max_pool2d if k == "maxpool2d" else F.avg_pool2d
            y = pool(x.permute(0, 3, 1, 2), layer.kernel_size, layer.strides)
            return y.permute(0, 2, 3, 1), []
        module = getattr(self, name)
        if k in ("lstm", "gru"):
            seq = module(x)[0]
            return (seq if layer.return_sequences else seq[:, -1]), []
        if k in ("embedding", "layernorm"):
            return module(x), []
        if k == "batchnorm":
            return module(x), []
        if k == "conv1d":
            x = module(x.transpose(1, 2)).transpose(1, 2)
        elif k in S._CONV2D:
            x = module(pad_same(x.permute(0, 3, 1, 2), layer)).permute(0, 2, 3, 1)
        else:
            x = module(x)
        x = ACTIVATIONS[layer.activation](x)
        penalties = [
            _penalty(layer.kernel_regularizer, getattr(module, "weight", None)),
            _penalty(layer.activity_regularizer, x),
        ]
        if penalties[1] is not None:
            penalties[1] = penalties[1] / x.shape[0]
        return x, [p for p in penalties if p is not None]


def batch_norm(
    x: torch.Tensor, module: torch.nn.Module, training: bool
) -> torch.Tensor:
    """BatchNorm over the last (channels) axis of ``x`` in the fixed mode."""
    y = F.batch_norm(
        x.movedim(-1, 1),
        module.running_mean,
        module.running_var,
        module.weight,
        module.bias,
        training=training,
        momentum=S.TORCH_BATCHNORM_MOMENTUM,
        eps=S.BATCHNORM_EPSILON,
    )
    return y.movedim(1, -1)


def per_example_loss(head: HeadSpec, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The loss of every example, as Keras computes it (shape (N,))."""
    loss, eps = head.loss, S.PROBABILITY_EPSILON
    if loss == "mse":
        return (y - t).square().mean(-1)
    if loss == "mae":
        return (y - t).abs().mean(-1)
    if loss == "huber":
        return F.huber_loss(y, t, reduction="none", delta=S.HUBER_DELTA).mean(-1)
    if loss == "categorical_crossentropy":
        if head.from_logits:
            return -(t * torch.log_softmax(y, -1)).sum(-1)
        p = (y / y.sum(-1, keepdim=True)).clamp(eps, 1 - eps)
        return -(t * p.log()).sum(-1)
    if loss == "sparse_categorical_crossentropy":
        logits = y if head.from_logits else y.clamp(eps, 1 - eps).log()
        return F.cross_entropy(logits, t, reduction="none")
    if head.from_logits:  # binary
        return F.binary_cross_entropy_with_logits(y, t, reduction="none").mean(-1)
    p = y.clamp(eps, 1 - eps)
    return -(t * p.log() + (1 - t) * (1 - p).log()).mean(-1)


class TorchBuilt(Built):
    framework = "torch"
    kernel_format = "{}.weight"

    def __init__(
        self, spec: ModelSpec, model: SpecModule, dtype: str, device: str = "cpu"
    ):
        super().__init__(spec, model, dtype)
        self.torch_dtype = DTYPES[dtype]
        self.device = torch.device(device)

    def _tensor(self, x: Any, integer: bool = False) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        return torch.as_tensor(
            np.asarray(x),
            dtype=torch.int64 if integer else self.torch_dtype,
            device=self.device,
        )

    def convert(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        tokens = {i.name for i in self.spec.inputs if i.kind == "tokens"}
        sparse = {
            h.name
            for h in self.spec.heads
            if h.loss == "sparse_categorical_crossentropy"
        }
        return {
            "inputs": {
                k: self._tensor(v, k in tokens) for k, v in batch["inputs"].items()
            },
            "targets": {
                k: self._tensor(v, k in sparse) for k, v in batch["targets"].items()
            },
            "sample_weights": {
                k: self._tensor(v)
                for k, v in (batch.get("sample_weights") or {}).items()
            },
        }

    def forward(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        return self.model.run(inputs)

    def head_loss(self, head: HeadSpec, output: Any, target: Any, sw: Any) -> Any:
        v = per_example_loss(head, output, target)
        if sw is not None:
            v = v * sw
        return v.sum() / v.shape[0]


def _tensor_at(module: torch.nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at a dotted path ("pointwise.weight")."""
    for part in path.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def build(spec: ModelSpec, dtype: str = "float64", device: str = "cpu") -> TorchBuilt:
    """The spec as a :class:`SpecModule` in ``dtype`` on ``device``, with the spec's
    weights (set on the CPU, then moved: the same values on every device)."""
    check_dtype(dtype)
    weights = initial_weights(spec)
    with torch.random.fork_rng(devices=[]):  # construction draws; keep user's RNG
        model = SpecModule(spec).to(DTYPES[dtype])
    kinds = {name: layer.kind for name, layer, _ in spec.layers()}
    with torch.no_grad():
        for layer, w in weights.items():
            module = getattr(model, layer)
            for attr, value in torch_params(kinds[layer], w).items():
                _tensor_at(module, attr).copy_(
                    torch.as_tensor(np.ascontiguousarray(value))
                )
    return TorchBuilt(spec, model.to(device), dtype, device)
