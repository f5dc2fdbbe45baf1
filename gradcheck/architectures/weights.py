"""Deterministic initial weights of a spec, as NumPy float64 arrays.

Every parameter is drawn on its own: ``shift + scale * N(0, 1)`` from a generator
seeded with ``(spec.seed, crc32("layer/param"))``. A parameter's value therefore
depends on the seed, its name and its shape only, so a shrunk spec keeps the
weights of the layers it keeps (where their shapes are unchanged).

Framework-neutral layout, per layer kind (``in``: input features, ``u``: units)::

    dense      kernel (in, u), bias (u,)
    conv1d     kernel (kernel_size, in, u), bias (u,)      cross-correlation
    embedding  embeddings (vocab, u)
    layernorm  gamma (in,), beta (in,)
    lstm       input_kernel (4, in, u), recurrent_kernel (4, u, u), bias (4, u)
               gates: input, forget, cell, output
    gru        input_kernel (3, in, u), recurrent_kernel (3, u, u),
               input_bias (3, u), recurrent_bias (3, u)
               gates: reset, update, candidate; the candidate is
               tanh(x W_n + b_n + r * (h U_n + c_n))   (torch; Keras reset_after=True)

    conv2d     kernel (k, k, in, u), bias (u,)                 channels last
    depthwise_conv2d
               depthwise_kernel (k, k, in, u), bias (in * u,)  output channel c * u + j
    separable_conv2d
               depthwise_kernel (k, k, in, 1), pointwise_kernel (1, 1, in, u), bias (u,)
    batchnorm  gamma (in,), beta (in,), moving_mean (in,), moving_variance (in,)
               statistics are not trained by gradients: fresh ones are 0 and 1,
               trained ones a draw (variance exp(draw), so positive)
    attention  query_kernel, key_kernel, value_kernel (in, heads, u),
               query_bias, key_bias, value_bias (heads, u),
               output_kernel (heads, u, in), output_bias (in,)     (Keras' layout)

A kernel is applied as ``x @ kernel``; ``pool``, ``merge``, ``add``, the 2-D pools
and ``dropout`` have no parameters.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from gradcheck.architectures.spec import ModelSpec

__all__ = ["GATES", "STATISTICS", "Param", "draw", "initial_weights", "parameters"]

GATES = {
    "lstm": ("input", "forget", "cell", "output"),
    "gru": ("reset", "update", "candidate"),
}
BIAS_SCALE = 0.1
#: a batchnorm's moving statistics: buffers / non-trainable weights, no gradient
STATISTICS = ("moving_mean", "moving_variance")
#: trained statistics: mean 0.5 * N(0, 1), variance exp(0.5 * N(0, 1))
STATISTICS_SCALE = 0.5
ATTENTION_PARTS = ("query", "key", "value")


@dataclass(frozen=True)
class Param:
    layer: str
    name: str
    shape: tuple[int, ...]
    scale: float
    shift: float = 0.0
    #: the value is exp(draw) (a positive variance)
    exp: bool = False

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.name}"


def draw(seed: int, key: str, shape: tuple[int, ...], scale: float, shift: float):
    """``shift + scale * N(0, 1)`` of ``shape``, seeded by ``(seed, crc32(key))``."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return shift + scale * rng.standard_normal(shape)


def parameters(spec: ModelSpec) -> list[Param]:
    """Every parameter of the spec's layers, in ``spec.layers()`` order."""
    shapes = spec.validate().shapes()
    vocab = {i.name: i.vocab for i in spec.inputs}
    out: list[Param] = []
    for name, layer, srcs in spec.layers():
        k, u = layer.kind, layer.units
        fan_in = shapes[srcs[0]][-1]
        if k == "dense":
            out.append(Param(name, "kernel", (fan_in, u), 1 / math.sqrt(fan_in)))
            out.append(Param(name, "bias", (u,), BIAS_SCALE))
        elif k == "conv1d":
            n = layer.kernel_size * fan_in
            shape = (layer.kernel_size, fan_in, u)
            out.append(Param(name, "kernel", shape, 1 / math.sqrt(n)))
            out.append(Param(name, "bias", (u,), BIAS_SCALE))
        elif k == "embedding":
            out.append(Param(name, "embeddings", (vocab[srcs[0]], u), 0.5))
        elif k == "layernorm":
            out.append(Param(name, "gamma", (fan_in,), BIAS_SCALE, 1.0))
            out.append(Param(name, "beta", (fan_in,), BIAS_SCALE))
        elif k in GATES:
            g = len(GATES[k])
            out.append(
                Param(name, "input_kernel", (g, fan_in, u), 1 / math.sqrt(fan_in))
            )
            out.append(Param(name, "recurrent_kernel", (g, u, u), 1 / math.sqrt(u)))
            if k == "lstm":
                out.append(Param(name, "bias", (g, u), BIAS_SCALE))
            else:
                out.append(Param(name, "input_bias", (g, u), BIAS_SCALE))
                out.append(Param(name, "recurrent_bias", (g, u), BIAS_SCALE))
        elif k in ("conv2d", "depthwise_conv2d", "separable_conv2d"):
            out += _conv2d_params(name, k, layer.kernel_size, fan_in, u)
        elif k == "batchnorm":
            out.append(Param(name, "gamma", (fan_in,), BIAS_SCALE, 1.0))
            out.append(Param(name, "beta", (fan_in,), BIAS_SCALE))
            if layer.trained_statistics:
                s = STATISTICS_SCALE
                out.append(Param(name, "moving_mean", (fan_in,), s))
                out.append(Param(name, "moving_variance", (fan_in,), s, exp=True))
            else:
                out.append(Param(name, "moving_mean", (fan_in,), 0.0))
                out.append(Param(name, "moving_variance", (fan_in,), 0.0, 1.0))
        elif k == "attention":
            h, scale = layer.num_heads, 1 / math.sqrt(fan_in)
            for part in ATTENTION_PARTS:
                out.append(Param(name, f"{part}_kernel", (fan_in, h, u), scale))
                out.append(Param(name, f"{part}_bias", (h, u), BIAS_SCALE))
            out.append(
                Param(name, "output_kernel", (h, u, fan_in), 1 / math.sqrt(h * u))
            )
            out.append(Param(name, "output_bias", (fan_in,), BIAS_SCALE))
    return out


def _conv2d_params(name: str, kind: str, k: int, fan_in: int, u: int) -> list[Param]:
    if kind == "conv2d":
        return [
            Param(name, "kernel", (k, k, fan_in, u), 1 / math.sqrt(k * k * fan_in)),
            Param(name, "bias", (u,), BIAS_SCALE),
        ]
    if kind == "depthwise_conv2d":
        return [
            Param(name, "depthwise_kernel", (k, k, fan_in, u), 1 / k),
            Param(name, "bias", (fan_in * u,), BIAS_SCALE),
        ]
    return [
        Param(name, "depthwise_kernel", (k, k, fan_in, 1), 1 / k),
        Param(name, "pointwise_kernel", (1, 1, fan_in, u), 1 / math.sqrt(fan_in)),
        Param(name, "bias", (u,), BIAS_SCALE),
    ]


def initial_weights(spec: ModelSpec) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {param name: float64 array}}`` for every layer with weights."""
    weights: dict[str, dict[str, np.ndarray]] = {}
    for p in parameters(spec):
        value = draw(spec.seed, p.key, p.shape, p.scale, p.shift)
        weights.setdefault(p.layer, {})[p.name] = np.exp(value) if p.exp else value
    return weights
