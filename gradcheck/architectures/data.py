"""Random batches for a spec, as NumPy arrays (no framework, no Hypothesis).

A batch is ``{"inputs": ..., "targets": ..., "sample_weights": ...}`` (see
:mod:`gradcheck.architectures.base`). A padding mask input is right-padded, as
tokenizers pad: each example keeps its first ``length`` steps (1) and pads the rest
(0), with ``length`` from 1 to all steps (a key every query may attend to). Targets follow each head's loss: normal
values for regression, one-hot rows for categorical cross-entropy, class ids for
the sparse one, 0/1 for binary cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gradcheck.architectures.spec import ModelSpec
from gradcheck.errors import InvalidArgumentError

__all__ = ["SAMPLE_WEIGHT_KINDS", "random_batch"]

#: per-head sample weights: "positive" in [0.1, 2), "zeros": some (at least one) 0
SAMPLE_WEIGHT_KINDS = ("positive", "zeros")


def random_batch(
    spec: ModelSpec,
    size: int = 4,
    seed: int = 0,
    sample_weights: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A batch of ``size`` examples drawn from ``seed``; ``sample_weights`` maps
    head names to a kind in :data:`SAMPLE_WEIGHT_KINDS` (other heads get none)."""
    spec.validate()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(f"size must be an int >= 1, got {size!r}")
    if size < spec.min_batch_size():
        raise InvalidArgumentError(
            f"size must be >= {spec.min_batch_size()} for this spec: a batchnorm "
            "in training mode normalizes a vector over the batch"
        )
    sample_weights = dict(sample_weights or {})
    for head, kind in sample_weights.items():
        if head not in spec.head_names:
            raise InvalidArgumentError(f"sample_weights: no head named {head!r}")
        if kind not in SAMPLE_WEIGHT_KINDS:
            raise InvalidArgumentError(
                f"sample_weights[{head!r}] is one of {SAMPLE_WEIGHT_KINDS}"
            )
    n = size
    rng = np.random.default_rng(seed)
    inputs = {}
    for i in spec.inputs:
        if i.kind == "tokens":
            inputs[i.name] = rng.integers(0, i.vocab, (n, *i.shape))
        elif i.kind == "mask":
            steps = i.shape[0]
            lengths = rng.integers(1, steps + 1, n)
            inputs[i.name] = (np.arange(steps) < lengths[:, None]).astype(np.float64)
        else:
            inputs[i.name] = rng.standard_normal((n, *i.shape))
    targets = {}
    for h in spec.heads:
        u = h.units
        if h.loss == "sparse_categorical_crossentropy":
            targets[h.name] = rng.integers(0, u, n)
        elif h.loss == "categorical_crossentropy":
            targets[h.name] = np.eye(u)[rng.integers(0, u, n)]
        elif h.loss == "binary_crossentropy":
            targets[h.name] = rng.integers(0, 2, (n, u)).astype(np.float64)
        else:
            targets[h.name] = rng.standard_normal((n, u))
    sw = {}
    for h in spec.heads:  # head order, so a batch does not depend on dict order
        kind = sample_weights.get(h.name)
        if kind is None:
            continue
        w = rng.uniform(0.1, 2.0, n)
        if kind == "zeros":
            w[rng.random(n) < 0.5] = 0.0
            w[rng.integers(n)] = 0.0
        sw[h.name] = w
    return {"inputs": inputs, "targets": targets, "sample_weights": sw}
