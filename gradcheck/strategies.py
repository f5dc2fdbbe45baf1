"""Hypothesis strategies for multi-head models, loss weights and batches.

::

    from hypothesis import given, strategies as st
    from gradcheck.strategies import architectures, batches

    @given(data=st.data(), spec=architectures(max_heads=2, layer_kinds=("dense",)))
    def test_something(data, spec):
        batch = data.draw(batches(spec, max_size=4))
        ...

Every strategy takes keyword-only ``min_*``/``max_*`` bounds; a missing maximum is
filled from its minimum (``max_heads=None`` means ``max(min_heads, 3)``) and an
impossible range raises :class:`~gradcheck.errors.InvalidArgumentError` when the
strategy is made, not when it is drawn from. Choices are ordered simplest first
(dense before recurrent, linear before kinked activations, mse before
cross-entropies, no regularizer before one; no residual, stride 1, eval-mode
batchnorm with fresh statistics, unmasked attention before the rest), so a failing
example shrinks toward fewer heads, fewer and narrower layers and a smaller batch.

What a property cannot judge is drawn only when asked for: dropout in training mode
(``allow_dropout``: a gradient check can only say ``nondeterministic``) and
embeddings with ``padding_idx`` (``allow_padding_idx``: torch only; torch leaves the
padding row's gradient at zero by design, which finite differences call a
mismatch). Max pooling, like relu, has a kink (where two window entries tie): it is
drawn only when a kinked activation is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import strategies as st

from gradcheck.architectures.data import SAMPLE_WEIGHT_KINDS, random_batch
from gradcheck.architectures.spec import (
    ACTIVATIONS,
    CROSSENTROPIES,
    FORMATS,
    KINKED_ACTIVATIONS,
    LOSSES,
    OUTPUT_STRUCTURES,
    PROBABILITY_ACTIVATION,
    HeadSpec,
    InputSpec,
    LayerSpec,
    ModelSpec,
    Node,
    Regularizer,
    layer_output_shape,
)
from gradcheck.errors import InvalidArgumentError

__all__ = ["architectures", "batches", "loss_weights", "weight_values"]

#: trunk and hidden-head layer kinds a strategy may draw, simplest first
TRUNK_KINDS = (
    "dense",
    "layernorm",
    "conv1d",
    "gru",
    "lstm",
    "embedding",
    "pool",
    "dropout",
    "batchnorm",
    "conv2d",
    "depthwise_conv2d",
    "separable_conv2d",
    "avgpool2d",
    "maxpool2d",
    "attention",
)
#: activations a strategy may draw for hidden layers (softmax is for outputs only)
HIDDEN_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "softmax")
#: head names, deliberately not in sorted order
HEAD_NAMES = ("main", "aux", "score", "alpha", "zeta", "label", "omega", "beta")
#: special loss weights: 1, 0, tiny, a fraction, large
SPECIAL_WEIGHTS = (1.0, 0.0, 1e-6, 0.3, 2.5, 1e3, 1e-3)
#: the smallest nonzero weight drawn (unless min_value is smaller and drawn as such)
TINY_WEIGHT = 1e-6
_VECTOR_KINDS = ("dense", "layernorm")
#: LayerNorm over 1 feature outputs beta and over 2 outputs about +-gamma + beta: the
#: gradient through it is zero or float32 cancellation noise, which the engine's
#: float32 tolerance does not cover. Strategies normalize 3 features or more.
MIN_LAYERNORM_FEATURES = 3
_ANY_RANK_KINDS = ("dense", "layernorm", "dropout", "batchnorm")
_SEQUENCE_KINDS = _ANY_RANK_KINDS + ("conv1d", "gru", "lstm", "pool", "attention")
_IMAGE_KINDS = _ANY_RANK_KINDS + (
    "conv2d",
    "depthwise_conv2d",
    "separable_conv2d",
    "avgpool2d",
    "maxpool2d",
    "pool",
)
_CONV2D_KINDS = ("conv2d", "depthwise_conv2d", "separable_conv2d")
#: a batchnorm in training mode normalizes over at least this many values per
#: channel and example... (see _min_batch): with fewer its output is (nearly) a
#: constant and the gradient through it float32 noise, as for LayerNorm above
MIN_NORMALIZED = 3
#: dropout's rate (one value: the rate does not change what a check can say)
DROPOUT_RATE = 0.25
#: the name of the padding-mask input attention layers read
MASK_INPUT = "pad_mask"
#: l1/l2 factors exact in float32: Keras casts them through float32
#: (0.01 becomes 0.0099999998 in a float64 model)
_REGULARIZER_VALUES = (0.0, 2**-7, 2**-10, 2**-4)


# ---------------------------------------------------------------- argument checks
def _int(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {value!r}")
    if value < least:
        raise InvalidArgumentError(f"{name} must be >= {least}, got {value}")
    return value


def _bounds(
    name: str, lo: Any, hi: Any, least: int, default_hi: int
) -> tuple[int, int]:
    lo = _int(f"min_{name}", lo, least)
    hi = max(lo, default_hi) if hi is None else _int(f"max_{name}", hi, least)
    if lo > hi:
        raise InvalidArgumentError(
            f"min_{name}={lo} is larger than max_{name}={hi}: no {name} count fits"
        )
    return lo, hi


def _subset(name: str, values: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise InvalidArgumentError(f"{name}: unknown {unknown}; choose from {allowed}")
    if not values:
        raise InvalidArgumentError(f"{name} must not be empty")
    # simplest first, whatever order the caller wrote
    return tuple(v for v in allowed if v in values)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- loss weights
def weight_values(
    *, min_value: float = 0.0, max_value: float = 1e3
) -> st.SearchStrategy[float]:
    """One loss weight in ``[min_value, max_value]``: special values first (1, 0,
    1e-6, 0.3, 2.5, 1e3, 1e-3, the bounds), then log-uniform and uniform draws.
    Nonzero weights are at least 1e-6 (or ``min_value``): a weight like 1e-300
    underflows to 0 in float32 and tests nothing a user writes."""
    lo = _float("min_value", min_value)
    hi = _float("max_value", max_value)
    if lo < 0:
        raise InvalidArgumentError(f"loss weights are >= 0; got min_value={lo}")
    if lo > hi:
        raise InvalidArgumentError(f"min_value={lo} is larger than max_value={hi}")
    specials = _special_weights(lo, hi)
    branches = [st.sampled_from(specials)]
    if hi > lo:
        small = min(hi, max(lo, TINY_WEIGHT))
        if hi > small:
            exponents = st.floats(math.log10(small), math.log10(hi))
            branches.append(exponents.map(lambda e: min(hi, max(small, 10.0**e))))
        uniform = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        branches.append(uniform.map(lambda w: w if w == 0 or w >= small else small))
    return st.one_of(*branches)


def _special_weights(lo: float, hi: float) -> list[float]:
    specials = [w for w in (*SPECIAL_WEIGHTS, lo, hi) if lo <= w <= hi]
    return list(dict.fromkeys(specials))  # unique, order kept


def loss_weights(
    names: Iterable[str], *, min_value: float = 0.0, max_value: float = 1e3
) -> st.SearchStrategy[dict[str, float]]:
    """``{name: weight}`` in the order of ``names``. Covers 0, tiny (1e-6), large
    and mixed magnitudes (tiny and large weights in the same dict)."""
    if isinstance(names, str):
        raise InvalidArgumentError("names is a sequence of head names, not one str")
    names = tuple(names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError(f"names must be unique strings, got {names!r}")
    values = weight_values(min_value=min_value, max_value=max_value)
    independent = st.tuples(*(values for _ in names)).map(
        lambda ws: dict(zip(names, ws, strict=True))
    )
    if len(names) < 2:
        return independent
    lo, hi = float(min_value), float(max_value)
    tiny, large = max(lo, min(1e-6, hi)), hi

    def mixed(large_mask: list[bool]) -> dict[str, float]:
        if all(large_mask) or not any(large_mask):
            large_mask = [not large_mask[0]] + large_mask[1:]
        return {n: large if b else tiny for n, b in zip(names, large_mask, strict=True)}

    magnitudes = st.lists(st.booleans(), min_size=len(names), max_size=len(names))
    return st.one_of(independent, magnitudes.map(mixed))


# ---------------------------------------------------------------- architectures
def architectures(
    *,
    min_heads: int = 1,
    max_heads: int | None = None,
    min_layers: int = 1,
    max_layers: int | None = None,
    min_units: int = 1,
    max_units: int | None = None,
    max_head_layers: int = 2,
    max_features: int = 6,
    max_steps: int = 5,
    layer_kinds: Iterable[str] = TRUNK_KINDS,
    activations: Iterable[str] = HIDDEN_ACTIVATIONS,
    losses: Iterable[str] = LOSSES,
    allow_extra_inputs: bool = True,
    allow_regularizers: bool = True,
    allow_residual: bool = True,
    allow_dropout: bool = False,
    allow_padding_idx: bool = False,
    max_image: int = 6,
    max_channels: int = 2,
    output_structures: Iterable[str] = OUTPUT_STRUCTURES,
    formats: Iterable[str] = FORMATS,
    min_weight: float = 0.0,
    max_weight: float = 1e3,
) -> st.SearchStrategy[ModelSpec]:
    """Valid :class:`~gradcheck.architectures.ModelSpec` s.

    ``min/max_heads`` (default max 3); ``min/max_layers``: trunk layers, merges
    and residual adds not counted (default max 3); ``min/max_units``: units of every drawn layer
    (default max 16; classification heads get at least 2). Each head has 1 to
    ``max_head_layers`` layers, the last a dense output (plus a pool when it
    branches from a sequence). ``layer_kinds`` limits trunk and hidden head layers
    (it needs "dense" or "layernorm"); ``activations`` the hidden activations;
    ``losses`` the heads' losses. ``allow_extra_inputs``: a second float input may
    be concatenated midway. ``allow_residual``: a trunk layer that keeps its
    input's shape may be a residual block (``input + f(input)``, an ``add`` node).
    ``allow_dropout``: dropout layers may drop (training mode; they are the
    identity otherwise); ``allow_padding_idx``: token embeddings may have
    ``padding_idx=0`` (torch only). Image inputs are ``(height, width, channels)``
    up to ``max_image`` x ``max_image`` x ``max_channels``.
    ``output_structures`` and ``formats`` pick how a Keras user writes the
    outputs, ``loss`` and ``loss_weights``.
    """
    min_heads, max_heads = _bounds("heads", min_heads, max_heads, 1, 3)
    min_layers, max_layers = _bounds("layers", min_layers, max_layers, 0, 3)
    min_units, max_units = _bounds("units", min_units, max_units, 1, 16)
    _int("max_head_layers", max_head_layers, 1)
    _int("max_features", max_features, 1)
    _int("max_steps", max_steps, 1)
    _int("max_image", max_image, 1)
    _int("max_channels", max_channels, 1)
    kinds = _subset("layer_kinds", layer_kinds, TRUNK_KINDS)
    if not set(kinds) & set(_VECTOR_KINDS):
        raise InvalidArgumentError(
            "layer_kinds needs 'dense' or 'layernorm': layers on (features,) tensors"
        )
    acts = _subset("activations", activations, HIDDEN_ACTIVATIONS)
    if "maxpool2d" in kinds and not set(acts) & set(KINKED_ACTIVATIONS):
        kinds = tuple(k for k in kinds if k != "maxpool2d")
    loss_names = _subset("losses", losses, LOSSES)
    if max_units < 2:
        loss_names = tuple(
            n for n in loss_names if n in ("mse", "mae", "huber", "binary_crossentropy")
        )
        if not loss_names:
            raise InvalidArgumentError(
                f"max_units={max_units}: categorical losses need >= 2 units"
            )
    structures = _subset("output_structures", output_structures, OUTPUT_STRUCTURES)
    fmts = _subset("formats", formats, FORMATS)
    weights = weight_values(min_value=min_weight, max_value=max_weight)
    cfg = {
        "heads": (min_heads, max_heads),
        "layers": (min_layers, max_layers),
        "units": (min_units, max_units),
        "head_layers": max_head_layers,
        "features": max_features,
        "steps": max_steps,
        "kinds": kinds,
        "acts": acts,
        "losses": loss_names,
        "extra": bool(allow_extra_inputs),
        "regularizers": bool(allow_regularizers),
        "residual": bool(allow_residual),
        "dropout": bool(allow_dropout),
        "padding_idx": bool(allow_padding_idx),
        "image": max_image,
        "channels": max_channels,
        "structures": structures,
        "formats": fmts,
        "weights": weights,
        "default_weight": _special_weights(float(min_weight), float(max_weight))[0],
    }
    return _architectures(cfg)


# A spec is drawn as lists of raw, shape-agnostic descriptors that are then read
# against the shapes so far (a kind index picks among the kinds that fit), so any
# subset of layers or heads is still a valid spec. Lists have a fixed length and
# each descriptor starts with a presence draw (0 = left out): the shrinker removes
# a layer or a head by lowering that one number to 0, which it always tries.
# (Deleting an element from the middle of a Hypothesis list often fails: measured,
# units [1, 1, 3] stay [1, 1, 3].) A head's output layer is its last present
# layer, so dropping the output promotes the layer before it instead of losing its
# width. Every optional part costs the same draws whichever way it goes, so the
# shrinker compares choices, not lengths.
_PRESENT = st.integers(0, 3)


def _regularizer_options(enabled: bool) -> st.SearchStrategy[tuple[Any, Any]]:
    """(kernel, activity) regularizers, (None, None) first."""
    if not enabled:
        return st.just((None, None))
    options: list[Regularizer | None] = [None]
    for v in _REGULARIZER_VALUES[1:]:
        options += [Regularizer(l2=v), Regularizer(l1=v), Regularizer(l1=v, l2=v)]
    return st.sampled_from([(k, a) for k in options for a in options])


def _raw_layers(cfg: dict[str, Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        _PRESENT,
        st.integers(0, len(TRUNK_KINDS) - 1),  # kind, among those that fit
        st.integers(*cfg["units"]),
        st.integers(0, len(HIDDEN_ACTIVATIONS)),  # activation, among allowed ones
        # bit 0: return_sequences, bit 1: padding "same", the rest: kernel_size - 1
        st.integers(0, 11),
        _regularizer_options(cfg["regularizers"]),
        # bit 0: residual block, bit 1: strides 2 (conv2d), overlapping pools,
        # 2 attention heads; bit 2: training mode (batchnorm, dropout),
        # padding_idx; bit 3: trained statistics; bit 4: causal; bit 5: padding mask
        st.integers(0, 63),
    )


def _raw_heads(cfg: dict[str, Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    n = cfg["head_layers"]
    return st.tuples(
        _PRESENT,
        st.integers(0, 2 * cfg["layers"][1] + 1),  # source index, deepest first
        _loss_choice(cfg["losses"]),
        cfg["weights"],
        st.lists(_raw_layers(cfg), min_size=n, max_size=n),
    )


def _options(shape: tuple[int, ...], kinds: Sequence[str]) -> list[str]:
    """The kinds that fit a tensor of ``shape``, in ``kinds``' order."""
    allowed = {1: _VECTOR_KINDS + ("dropout", "batchnorm"), 2: _SEQUENCE_KINDS}
    options = [k for k in kinds if k in allowed.get(len(shape), _IMAGE_KINDS)]
    if shape[-1] < MIN_LAYERNORM_FEATURES and len(options) > 1:
        options = [k for k in options if k != "layernorm"]
    if len(shape) == 3 and min(shape[:2]) < 2:  # no 2x2 window fits
        options = [k for k in options if k not in ("avgpool2d", "maxpool2d")]
    if len(shape) == 2 and shape[0] < 2:  # attention over one step is constant
        options = [k for k in options if k != "attention"]
    return options or [k for k in kinds if k in ("dense", "layernorm")][:1]


def _read_layer(
    raw: tuple[Any, ...],
    shape: tuple[int, ...],
    kinds: Sequence[str],
    acts: Any,
    cfg: dict[str, Any] | None = None,
    mask: str | None = None,
) -> LayerSpec:
    """The layer a raw descriptor means on a tensor of ``shape``; ``mask``: the
    padding-mask input an attention layer may read (trunk only)."""
    _, kind_i, units, act_i, bits, (kreg, areg), extra = raw
    cfg = cfg or {}
    seqs, same, ksize = bool(bits & 1), bool(bits & 2), 1 + (bits >> 2)
    options = _options(shape, kinds)
    kind = options[kind_i % len(options)]
    act = acts[act_i % len(acts)]
    strided, training, trained = bool(extra & 2), bool(extra & 4), bool(extra & 8)
    if kind in ("layernorm", "pool"):
        return LayerSpec(kind)
    if kind == "dropout":
        return LayerSpec(
            kind, rate=DROPOUT_RATE, training=training and cfg.get("dropout", False)
        )
    if kind == "batchnorm":
        return LayerSpec(
            kind,
            training=training and math.prod(shape[:-1]) >= MIN_NORMALIZED,
            trained_statistics=trained,
        )
    if kind == "attention":
        return LayerSpec(kind, units, num_heads=1 + strided, causal=bool(extra & 16))
    if kind in ("lstm", "gru"):
        return LayerSpec(kind, units, return_sequences=seqs)
    if kind == "conv1d":
        return LayerSpec(
            kind,
            units,
            act,
            kernel_size=min(ksize, shape[0]),
            padding="same" if same else "valid",
            kernel_regularizer=kreg,
            activity_regularizer=areg,
        )
    side = min(shape[:2]) if len(shape) == 3 else 1
    if kind in ("avgpool2d", "maxpool2d"):
        size = max(2, min(ksize, side))
        return LayerSpec(kind, kernel_size=size, strides=1 if strided else size)
    if kind in _CONV2D_KINDS:
        regs = {}
        if kind == "conv2d":
            regs = {"kernel_regularizer": kreg, "activity_regularizer": areg}
        if kind == "depthwise_conv2d":  # the depth multiplier: 1 or 2 (or min_units)
            units = min(units, max(2, cfg.get("units", (1, 1))[0]))
        return LayerSpec(
            kind,
            units,
            act,
            kernel_size=min(ksize, side),
            padding="same" if same else "valid",
            strides=2 if strided else 1,
            **regs,
        )
    return LayerSpec(
        kind, units, act, kernel_regularizer=kreg, activity_regularizer=areg
    )


def _residual(
    layer: LayerSpec, shape: tuple[int, ...], units: tuple[int, int]
) -> LayerSpec | None:
    """``layer`` made to keep ``shape`` (same width, padding "same", stride 1), so
    that ``input + layer(input)`` is a residual block; None where it cannot (a
    width outside the ``units`` bounds, a pool)."""
    k, width = layer.kind, shape[-1]
    if layer.units and not units[0] <= width <= units[1]:
        return None
    if k in ("dense", "conv1d", "conv2d", "separable_conv2d"):
        kw: dict[str, Any] = {"units": width}
        if k != "dense":
            kw.update(padding="same", strides=1)
        return dataclasses.replace(layer, **kw)
    if k == "depthwise_conv2d":
        if units[0] > 1:
            return None
        return dataclasses.replace(layer, units=1, padding="same", strides=1)
    if k in ("lstm", "gru") and len(shape) == 2:
        return dataclasses.replace(layer, units=width, return_sequences=True)
    if k in ("layernorm", "batchnorm", "dropout", "attention"):
        return layer
    return None  # pools change the shape


def _read_output(
    raw: tuple[Any, ...], loss: str, logits: bool, acts: Sequence[str]
) -> LayerSpec:
    _, _, units, act_i, _, (kreg, areg), _ = raw
    if loss in CROSSENTROPIES and loss != "binary_crossentropy":
        units = max(units, 2)
    if loss in CROSSENTROPIES and not logits:
        activation = PROBABILITY_ACTIVATION[loss]
    else:
        if loss in CROSSENTROPIES:
            acts = tuple(a for a in acts if a != "sigmoid")
        options = tuple(dict.fromkeys(("linear", *acts)))
        activation = options[act_i % len(options)]
    return LayerSpec(
        "dense", units, activation, kernel_regularizer=kreg, activity_regularizer=areg
    )


def _default_layer(cfg: dict[str, Any]) -> tuple[Any, ...]:
    return (1, 0, cfg["units"][0], 0, 0, (None, None), 0)


def _default_head(cfg: dict[str, Any]) -> tuple[Any, ...]:
    loss = (cfg["losses"][0], True)
    return (1, 0, loss, cfg["default_weight"], [])


def _padded(
    draw: Any, elements: st.SearchStrategy[Any], bounds: tuple[int, int], default: Any
) -> list[Any]:
    """The present elements of ``hi`` drawn ones, padded in front with ``default``
    (the simplest element) to at least ``lo``."""
    lo, hi = bounds
    drawn = [e for e in draw(st.lists(elements, min_size=hi, max_size=hi)) if e[0]]
    return [default] * (lo - len(drawn)) + drawn


@st.composite
def _architectures(draw: Any, cfg: dict[str, Any]) -> ModelSpec:
    kinds, acts = cfg["kinds"], cfg["acts"]
    raw_trunk = _padded(draw, _raw_layers(cfg), cfg["layers"], _default_layer(cfg))
    n_layers = len(raw_trunk)

    # the primary input: features, a float sequence, tokens (embedding first) or an
    # image (height, width, channels)
    input_kinds = ["vector"]
    if set(kinds) & (set(_SEQUENCE_KINDS) - set(_ANY_RANK_KINDS)):
        input_kinds.append("sequence")
    if "embedding" in kinds and n_layers >= 1:
        input_kinds.append("tokens")
    if set(kinds) & (set(_IMAGE_KINDS) - set(_ANY_RANK_KINDS)):
        input_kinds.append("image")
    input_kind = draw(st.sampled_from(input_kinds))
    steps = draw(st.integers(1, cfg["steps"]))
    features = draw(st.integers(1, cfg["features"]))
    vocab = draw(st.integers(2, 12))
    height = draw(st.integers(1, cfg["image"]))
    width = draw(st.integers(1, cfg["image"]))
    channels = draw(st.integers(1, cfg["channels"]))
    if input_kind == "vector":
        primary = InputSpec("features", "float", (features,))
    elif input_kind == "sequence":
        primary = InputSpec("series", "float", (steps, features))
    elif input_kind == "tokens":
        primary = InputSpec("text", "tokens", (steps,), vocab=vocab)
    else:
        primary = InputSpec("image", "float", (height, width, channels))
    inputs = [primary]
    mask_input = None  # the padding mask, made when an attention layer reads it

    # an extra float input concatenated after trunk layer merge_at
    extra = draw(st.booleans()) if cfg["extra"] else False
    merge_at = draw(st.integers(0, max(0, cfg["layers"][1] - 1)))
    extra_features = draw(st.integers(1, cfg["features"]))
    if not extra or n_layers == 0:
        merge_at = -1
    merge_at = min(merge_at, n_layers - 1)

    trunk: list[Node] = []
    sources = [(primary.name, primary.shape)]  # deepest first
    cur, shape = primary.name, primary.shape
    for i, raw in enumerate(raw_trunk):
        flags = raw[6]
        if input_kind == "tokens" and i == 0:
            pad = 0 if cfg["padding_idx"] and flags & 4 else None
            layer = LayerSpec("embedding", raw[2], padding_idx=pad)
        else:
            layer = _read_layer(raw, shape, kinds, acts, cfg)
        block = None
        if cfg["residual"] and flags & 1:
            block = _residual(layer, shape, cfg["units"])
        if block is not None:
            layer = block
        srcs: tuple[str, ...] = (cur,)
        if (
            layer.kind == "attention"
            and flags & 32
            and input_kind in ("sequence", "tokens")
            and shape[0] == steps
        ):
            if mask_input is None:
                mask_input = InputSpec(MASK_INPUT, "mask", (steps,))
            srcs = (cur, MASK_INPUT)
        prev, cur = cur, f"{layer.kind}{i}"
        new_shape = layer_output_shape(layer, shape)
        trunk.append(Node(cur, srcs, layer))
        if block is not None and new_shape == shape:
            sources.insert(0, (cur, new_shape))
            cur = f"add{i}"
            trunk.append(Node(cur, (prev, f"{layer.kind}{i}"), LayerSpec("add")))
        shape = new_shape
        sources.insert(0, (cur, shape))
        if i == merge_at:
            x = InputSpec("extra", "float", shape[:-1] + (extra_features,))
            inputs.append(x)
            prev, cur = cur, f"merge{i}"
            trunk.append(Node(cur, (prev, x.name), LayerSpec("merge")))
            shape = shape[:-1] + (shape[-1] + extra_features,)
            sources.insert(0, (cur, shape))
    if mask_input is not None:
        inputs.insert(1, mask_input)
    if trunk:  # heads branch from trunk nodes; the first from the trunk's end
        sources = sources[:-1]

    raw_heads = _padded(draw, _raw_heads(cfg), cfg["heads"], _default_head(cfg))
    n_heads = len(raw_heads)
    pool = HEAD_NAMES + tuple(f"head{i}" for i in range(len(HEAD_NAMES), n_heads))
    names = draw(
        st.lists(st.sampled_from(pool), min_size=n_heads, max_size=n_heads, unique=True)
    )
    fmts = cfg["formats"]
    loss_format = draw(st.sampled_from(fmts))
    weights_format = draw(st.sampled_from(fmts))
    if n_heads > 1:  # Keras pairs a single loss with a single weight only
        if loss_format == "single":
            weights_format = "single"
        elif weights_format == "single":
            weights_format = next((f for f in fmts if f != "single"), "dict")
    heads = []
    for j, (name, raw) in enumerate(zip(names, raw_heads, strict=True)):
        _, src_i, (loss, logits), weight, raw_layers = raw
        if loss_format == "single" and n_heads > 1:  # one loss, one weight for all
            _, _, (loss, logits), weight, _ = raw_heads[0]
        present = [r for r in raw_layers if r[0]] or [_default_layer(cfg)]
        source, shape = sources[0 if j == 0 else src_i % len(sources)]
        layers: list[LayerSpec] = []
        for raw_layer in present[:-1]:
            layers.append(_read_layer(raw_layer, shape, kinds, acts, cfg))
            shape = layer_output_shape(layers[-1], shape)
        if len(shape) >= 2:
            layers.append(LayerSpec("pool"))
        layers.append(_read_output(present[-1], loss, logits, acts))
        heads.append(HeadSpec(name, source, tuple(layers), loss, logits, weight))
    spec = ModelSpec(
        inputs=tuple(inputs),
        trunk=tuple(trunk),
        heads=tuple(heads),
        output_structure=draw(st.sampled_from(cfg["structures"])),
        loss_format=loss_format,
        weights_format=weights_format,
        seed=draw(st.integers(0, 2**16)),
    )
    return spec.validate()


def _loss_choice(losses: Sequence[str]) -> st.SearchStrategy[tuple[str, bool]]:
    """(loss, from_logits), logits first."""
    choices = [(loss, True) for loss in losses]
    choices += [(loss, False) for loss in losses if loss in CROSSENTROPIES]
    return st.sampled_from(choices)


# ---------------------------------------------------------------- batches
def batches(
    spec: ModelSpec,
    *,
    min_size: int = 1,
    max_size: int | None = None,
    sample_weights: bool = True,
) -> st.SearchStrategy[dict[str, Any]]:
    """A batch for ``spec`` (see :mod:`gradcheck.architectures.base`): NumPy
    inputs, a target per head and, when ``sample_weights``, per-head sample weights
    for some heads (none, positive, or with zeros). Values come from a drawn seed
    (:func:`gradcheck.architectures.data.random_batch`), so a batch shrinks by its
    size and seed, toward no sample weights. A spec with a batchnorm in training
    mode gets at least two examples (``min_size``/``max_size`` are raised)."""
    if not isinstance(spec, ModelSpec):
        raise InvalidArgumentError(
            f"spec must be a ModelSpec, got {type(spec).__name__}"
        )
    spec.validate()
    min_size, max_size = _bounds("size", min_size, max_size, 1, 16)
    least = _min_batch(spec)
    min_size, max_size = max(min_size, least), max(max_size, least)
    return _batches(spec, min_size, max_size, bool(sample_weights))


def _min_batch(spec: ModelSpec) -> int:
    """The smallest batch drawn for ``spec``: a batchnorm in training mode gets two
    examples at least. With one, a global average pool right after it sees the
    channel's mean, which the normalization makes exactly beta: a constant whose
    gradient is rounding noise (and a vector batchnorm needs two anyway)."""
    train_bn = any(
        layer.kind == "batchnorm" and layer.training for _, layer, _ in spec.layers()
    )
    return max(spec.min_batch_size(), 2 if train_bn else 1)


@st.composite
def _batches(
    draw: Any, spec: ModelSpec, min_size: int, max_size: int, weighted: bool
) -> dict[str, Any]:
    size = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    kinds: dict[str, str] = {}
    for h in spec.heads:
        kind = draw(st.sampled_from((None, *SAMPLE_WEIGHT_KINDS)))
        if weighted and kind is not None:
            kinds[h.name] = kind
    return random_batch(spec, size, seed, kinds)
