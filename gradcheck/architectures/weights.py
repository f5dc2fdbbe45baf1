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

A kernel is applied as ``x @ kernel``; ``pool`` and ``merge`` have no parameters.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from gradcheck.architectures.spec import ModelSpec

__all__ = ["GATES", "Param", "draw", "initial_weights", "parameters"]

GATES = {
    "lstm": ("input", "forget", "cell", "output"),
    "gru": ("reset", "update", "candidate"),
}
BIAS_SCALE = 0.1


@dataclass(frozen=True)
class Param:
    layer: str
    name: str
    shape: tuple[int, ...]
    scale: float
    shift: float = 0.0

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
    return out


def initial_weights(spec: ModelSpec) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {param name: float64 array}}`` for every layer with weights."""
    weights: dict[str, dict[str, np.ndarray]] = {}
    for p in parameters(spec):
        weights.setdefault(p.layer, {})[p.name] = draw(
            spec.seed, p.key, p.shape, p.scale, p.shift
        )
    return weights
