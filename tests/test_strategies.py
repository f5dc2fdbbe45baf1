"""gradcheck.strategies: valid specs, every output structure and loss form Keras
users write, fail-fast bounds, and shrinking toward minimal models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import gradcheck
from gradcheck.architectures import ModelSpec
from gradcheck.architectures.spec import CROSSENTROPIES
from gradcheck.strategies import (
    TRUNK_KINDS,
    architectures,
    batches,
    loss_weights,
    weight_values,
)

#: find() settings: deterministic, no example database
FIND = settings(
    database=None,
    max_examples=2000,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
#: find() without shrinking: "can this be drawn at all?"
REACH = settings(FIND, phases=[Phase.generate])


def units(spec: ModelSpec) -> list[int]:
    return [layer.units for _, layer, _ in spec.layers() if layer.units]


def trunk_layers(spec: ModelSpec) -> int:
    return sum(node.layer.kind not in ("merge", "add") for node in spec.trunk)


# --------------------------------------------------------------------------- specs
@settings(max_examples=60)
@given(architectures())
def test_drawn_specs_are_valid_and_within_default_bounds(spec):
    assert spec.validate() is spec
    assert 1 <= len(spec.heads) <= 3
    assert 1 <= trunk_layers(spec) <= 3
    assert all(1 <= u <= 16 for u in units(spec))
    assert ModelSpec.from_json(spec.to_json()) == spec


@settings(max_examples=30)
@given(
    architectures(
        min_heads=2,
        max_heads=2,
        min_layers=0,
        max_layers=1,
        min_units=3,
        max_units=4,
        layer_kinds=("dense",),
        activations=("tanh",),
        losses=("mse", "binary_crossentropy"),
        allow_extra_inputs=False,
        allow_regularizers=False,
        allow_residual=False,
        output_structures=("dict",),
        formats=("list",),
        min_weight=0.5,
        max_weight=2.0,
    )
)
def test_bounds_and_choices_are_respected(spec):
    assert len(spec.heads) == 2 and trunk_layers(spec) <= 1
    assert len(spec.inputs) == 1
    for _, layer, _ in spec.layers():
        assert layer.kind in ("dense", "pool")
        assert layer.kernel_regularizer is None and layer.activity_regularizer is None
        if layer.units:
            assert 3 <= layer.units <= 4
    for h in spec.heads:
        assert h.loss in ("mse", "binary_crossentropy")
        assert 0.5 <= h.weight <= 2.0
        for layer in h.layers[:-1]:
            assert layer.activation in ("linear", "tanh")
    assert spec.output_structure == "dict"
    assert (spec.loss_format, spec.weights_format) == ("list", "list")


def test_defaults_are_filled_from_each_other():
    spec = find(
        architectures(min_heads=5, min_units=20), lambda s: True, settings=REACH
    )
    assert len(spec.heads) == 5 and min(units(spec)) >= 20


FEATURES = {
    "every layer kind": None,  # expanded below
    "list outputs": lambda s: s.output_structure == "list",
    "dict outputs": lambda s: s.output_structure == "dict",
    "loss as dict": lambda s: s.loss_format == "dict" and len(s.heads) > 1,
    "loss as list": lambda s: s.loss_format == "list" and len(s.heads) > 1,
    "one loss for all": lambda s: s.loss_format == "single" and len(s.heads) > 1,
    "weights as dict": lambda s: s.weights_format == "dict" and len(s.heads) > 1,
    "weights as list": lambda s: s.weights_format == "list" and len(s.heads) > 1,
    "head names not sorted": lambda s: list(s.head_names) != sorted(s.head_names),
    "extra input merged midway": lambda s: (
        len(s.inputs) == 2 and s.trunk[-1].layer.kind != "merge"
    ),
    "token input": lambda s: s.inputs[0].kind == "tokens",
    "head branching before the end": lambda s: any(
        h.source != s.heads[0].source for h in s.heads
    ),
    "kernel regularizer": lambda s: any(
        layer.kernel_regularizer for _, layer, _ in s.layers()
    ),
    "activity regularizer": lambda s: any(
        layer.activity_regularizer for _, layer, _ in s.layers()
    ),
    "three heads, mixed losses": lambda s: len({h.loss for h in s.heads}) == 3,
    "sequence kept by lstm": lambda s: any(
        layer.kind == "lstm" and layer.return_sequences for _, layer, _ in s.layers()
    ),
    "conv1d same": lambda s: any(layer.padding == "same" for _, layer, _ in s.layers()),
    "kinked activation": lambda s: any(
        layer.activation in ("relu", "leaky_relu") for _, layer, _ in s.layers()
    ),
}


def _layers(s, **want):
    return any(
        all(getattr(layer, k) == v for k, v in want.items())
        for _, layer, _ in s.layers()
    )


for kind in TRUNK_KINDS:
    FEATURES[f"{kind} layer"] = lambda s, kind=kind: _layers(s, kind=kind)
for act in ("relu6", "hard_swish", "silu", "gelu"):
    FEATURES[f"{act} activation"] = lambda s, act=act: _layers(s, activation=act)
FEATURES.update(
    {
        "image input": lambda s: len(s.inputs[0].shape) == 3,
        "residual add": lambda s: _layers(s, kind="add"),
        "residual conv2d block": lambda s: any(
            n.layer.kind == "add" and n.inputs[1].startswith("conv2d") for n in s.trunk
        ),
        "strided conv2d, padding same": lambda s: _layers(
            s, kind="conv2d", strides=2, padding="same"
        ),
        "strided depthwise conv2d": lambda s: _layers(
            s, kind="depthwise_conv2d", strides=2
        ),
        "separable conv2d, padding same": lambda s: _layers(
            s, kind="separable_conv2d", padding="same"
        ),
        "overlapping max pool": lambda s: _layers(s, kind="maxpool2d", strides=1),
        "global pool of an image": lambda s: any(
            layer.kind == "pool" and len(s.shapes()[srcs[0]]) == 3
            for _, layer, srcs in s.layers()
        ),
        "batchnorm, training mode": lambda s: _layers(
            s, kind="batchnorm", training=True
        ),
        "batchnorm, eval mode, trained statistics": lambda s: _layers(
            s, kind="batchnorm", training=False, trained_statistics=True
        ),
        "attention with a padding mask": lambda s: any(
            n.layer.kind == "attention" and len(n.inputs) == 2 for n in s.trunk
        ),
        "causal attention": lambda s: _layers(s, kind="attention", causal=True),
        "two attention heads": lambda s: _layers(s, kind="attention", num_heads=2),
        "dropout, eval mode": lambda s: _layers(s, kind="dropout", training=False),
    }
)
for loss in ("mse", "mae", "huber", *CROSSENTROPIES):
    for logits in (True, False) if loss in CROSSENTROPIES else (True,):
        FEATURES[f"{loss} logits={logits}"] = lambda s, x=(loss, logits): any(
            (h.loss, h.from_logits) == x for h in s.heads
        )
del FEATURES["every layer kind"]


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_structure_a_user_writes_is_drawn(feature):
    spec = find(architectures(), FEATURES[feature], settings=REACH)
    assert spec.validate() is spec


def test_what_a_property_cannot_judge_is_drawn_only_when_asked():
    """Dropout in training mode (nondeterministic by design) and padding_idx
    (torch zeroes that row's gradient by design) need their flags; max pooling (a
    kink) is left out when no kinked activation is allowed."""
    for allowed, expected in ((False, False), (True, True)):
        drops = architectures(allow_dropout=allowed, layer_kinds=("dense", "dropout"))
        found = _reaches(drops, lambda s: _layers(s, kind="dropout", training=True))
        assert found is expected and (
            not expected or find(drops, lambda s: s.stochastic, settings=REACH)
        )
        padded = architectures(
            allow_padding_idx=allowed, layer_kinds=("dense", "embedding")
        )
        found = _reaches(
            padded,
            lambda s: any(layer.padding_idx is not None for _, layer, _ in s.layers()),
        )
        assert found is expected
    smooth = architectures(
        activations=("tanh", "gelu"), layer_kinds=("dense", "maxpool2d", "avgpool2d")
    )
    assert not _reaches(smooth, lambda s: _layers(s, kind="maxpool2d"))
    assert _reaches(smooth, lambda s: _layers(s, kind="avgpool2d"))
    kinked = architectures(
        activations=("tanh", "relu6"), layer_kinds=("dense", "maxpool2d")
    )
    assert _reaches(kinked, lambda s: _layers(s, kind="maxpool2d"))


def _reaches(strategy, condition):
    try:
        find(strategy, condition, settings=REACH)
    except NoSuchExample:
        return False
    return True


def test_new_features_shrink_toward_absent():
    """A failure that needs an image shrinks to one plain conv2d: stride 1, padding
    valid, linear, no residual, no batchnorm/pool/attention around it."""
    small = architectures(max_heads=2, max_layers=2)
    spec = find(small, lambda s: _layers(s, kind="conv2d"), settings=FIND)
    kinds = [layer.kind for _, layer, _ in spec.layers()]
    # ("merge": an extra input joined midway is structure, not a new feature; the
    # shrinker may keep one where removing it needs two coordinated steps)
    assert kinds.count("conv2d") == 1
    assert set(kinds) <= {"dense", "conv2d", "pool", "merge"}
    (conv,) = [layer for _, layer, _ in spec.layers() if layer.kind == "conv2d"]
    assert (conv.strides, conv.padding, conv.activation) == (1, "valid", "linear")
    assert conv.kernel_regularizer is None and conv.units == 1
    assert spec.inputs[0].shape == (1, 1, 1) and len(spec.heads) == 1
    bn = find(small, lambda s: _layers(s, kind="batchnorm"), settings=FIND)
    (layer,) = [x for _, x, _ in bn.layers() if x.kind == "batchnorm"]
    assert not layer.training and not layer.trained_statistics
    assert {x.kind for _, x, _ in bn.layers()} <= {"dense", "batchnorm"}


def test_batches_for_batchnorm_in_training_mode_have_two_examples():
    spec = find(
        architectures(),
        lambda s: _layers(s, kind="batchnorm", training=True),
        settings=REACH,
    )
    smallest = find(batches(spec, max_size=1), lambda b: True, settings=FIND)
    assert len(next(iter(smallest["targets"].values()))) == 2


# --------------------------------------------------------------------------- shrinking
def test_shrinks_to_a_minimal_failing_model():
    """Fails with >= 2 heads and a layer of >= 3 units: the minimal example has
    exactly 2 heads, one trunk layer, and one layer of 3 units, the rest 1."""

    def fails(spec):
        return len(spec.heads) >= 2 and max(units(spec)) >= 3

    spec = find(architectures(), fails, settings=FIND)
    assert len(spec.heads) == 2
    assert trunk_layers(spec) == 1 and len(spec.inputs) == 1
    assert sorted(units(spec)) == [1] * (len(units(spec)) - 1) + [3]
    assert all(len(h.layers) == 1 for h in spec.heads)
    assert spec.inputs[0].kind == "float" and spec.inputs[0].shape == (1,)
    assert [h.loss for h in spec.heads] == ["mse", "mse"]
    assert spec.head_names == ("main", "aux")  # definition order, not sorted
    assert spec.seed == 0


def test_batches_shrink_to_the_smallest_failing_size():
    spec = find(architectures(), lambda s: True, settings=REACH)
    batch = find(batches(spec), lambda b: len(b["targets"]["main"]) >= 3, settings=FIND)
    assert len(batch["targets"]["main"]) == 3
    assert batch["sample_weights"] == {}


# --------------------------------------------------------------------------- weights
def test_loss_weights_cover_zero_tiny_large_and_mixed():
    names = ("zeta", "alpha", "main")
    s = loss_weights(names)
    assert list(find(s, lambda w: True, settings=FIND)) == list(names)
    find(s, lambda w: 0.0 in w.values(), settings=FIND)
    find(s, lambda w: 1e-6 in w.values(), settings=FIND)
    find(s, lambda w: max(w.values()) >= 1e2, settings=FIND)
    mixed = find(
        s,
        lambda w: min(w.values()) > 0 and max(w.values()) / min(w.values()) >= 1e8,
        settings=FIND,
    )
    assert len(mixed) == 3


@settings(max_examples=50)
@given(
    st.data(),
    st.floats(0, 10),
    st.floats(0, 1e4),
)
def test_loss_weights_stay_in_bounds(data, lo, span):
    hi = lo + span
    w = data.draw(loss_weights(["a", "b"], min_value=lo, max_value=hi))
    assert list(w) == ["a", "b"]
    for v in w.values():
        assert lo <= v <= hi and math.isfinite(v)
        assert v in (0.0, lo) or v >= min(hi, max(lo, 1e-6))  # nothing subnormal


# --------------------------------------------------------------------------- batches
@settings(max_examples=30)
@given(st.data(), architectures(max_heads=3))
def test_batches_fit_the_spec(data, spec):
    batch = data.draw(batches(spec, min_size=2, max_size=5))
    n = len(next(iter(batch["inputs"].values())))
    assert 2 <= n <= 5
    for i in spec.inputs:
        x = batch["inputs"][i.name]
        assert x.shape == (n, *i.shape)
        if i.kind == "tokens":
            assert x.dtype.kind == "i" and 0 <= x.min() and x.max() < i.vocab
    for h in spec.heads:
        t = batch["targets"][h.name]
        if h.loss == "sparse_categorical_crossentropy":
            assert t.shape == (n,) and t.max() < h.units
        else:
            assert t.shape == (n, h.units)
        if h.loss == "categorical_crossentropy":
            np.testing.assert_array_equal(t.sum(-1), 1.0)
    for name, w in batch["sample_weights"].items():
        assert name in spec.head_names and w.shape == (n,) and w.min() >= 0


def test_sample_weights_with_zeros_are_drawn():
    spec = find(architectures(), lambda s: True, settings=REACH)
    batch = find(
        batches(spec),
        lambda b: any((w == 0).any() for w in b["sample_weights"].values()),
        settings=REACH,
    )
    assert batch["sample_weights"]
    no_weights = find(
        batches(spec, sample_weights=False), lambda b: True, settings=REACH
    )
    assert no_weights["sample_weights"] == {}


# --------------------------------------------------------------------------- fail fast
def _spec():
    return find(architectures(), lambda s: True, settings=REACH)


BAD = [
    (lambda: architectures(min_heads=3, max_heads=2), "min_heads=3 is larger"),
    (lambda: architectures(min_heads=0), "min_heads must be >= 1"),
    (lambda: architectures(min_units=0), "min_units must be >= 1"),
    (lambda: architectures(min_units=5, max_units=4), "min_units=5"),
    (lambda: architectures(min_layers=-1), "min_layers must be >= 0"),
    (lambda: architectures(max_layers=2.5), "max_layers must be an int"),
    (lambda: architectures(min_heads=True), "min_heads must be an int"),
    (lambda: architectures(max_head_layers=0), "max_head_layers"),
    (lambda: architectures(layer_kinds=("dense", "transformer")), "transformer"),
    (lambda: architectures(max_image=0), "max_image must be >= 1"),
    (lambda: architectures(max_channels=0), "max_channels must be >= 1"),
    (lambda: architectures(layer_kinds=()), "must not be empty"),
    (lambda: architectures(layer_kinds=("lstm", "gru")), "needs 'dense' or"),
    (lambda: architectures(activations=("softmax",)), "softmax"),
    (lambda: architectures(losses=("hinge",)), "hinge"),
    (
        lambda: architectures(max_units=1, losses=("categorical_crossentropy",)),
        "need >= 2 units",
    ),
    (lambda: architectures(formats=("tuple",)), "tuple"),
    (lambda: architectures(output_structures=()), "must not be empty"),
    (lambda: architectures(min_weight=2.0, max_weight=1.0), "larger than"),
    (lambda: loss_weights(["a"], min_value=-1.0), ">= 0"),
    (lambda: loss_weights(["a"], max_value=math.inf), "finite"),
    (lambda: loss_weights(["a", "a"]), "unique"),
    (lambda: loss_weights("ab"), "not one str"),
    (lambda: weight_values(min_value=math.nan), "finite"),
    (lambda: batches(_spec(), min_size=0), "min_size must be >= 1"),
    (lambda: batches(_spec(), min_size=4, max_size=3), "min_size=4"),
    (lambda: batches({"inputs": []}), "must be a ModelSpec"),
]


@pytest.mark.parametrize("make, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_impossible_arguments_fail_when_the_strategy_is_made(make, match):
    with pytest.raises(gradcheck.InvalidArgumentError, match=match):
        make()


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        architectures(1, 3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        batches(_spec(), 1, 4)  # type: ignore[misc]
