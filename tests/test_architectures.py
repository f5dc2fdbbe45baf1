"""Model specs: validation, JSON, weights; torch and Keras builds of one spec agree;
printed code rebuilds the model; the engine passes models built from specs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcheck
from gradcheck.architectures import (
    ACTIVATIONS,
    LAYER_KINDS,
    LOSSES,
    REGULARIZATION,
    HeadSpec,
    InputSpec,
    LayerSpec,
    ModelSpec,
    Node,
    Regularizer,
    initial_weights,
    random_batch,
)
from gradcheck.architectures.spec import CROSSENTROPIES
from gradcheck.strategies import architectures, batches

#: torch warns once that padding="same" with an even kernel pads a copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_KERAS = (
    importlib.util.find_spec("tensorflow") is not None
    and importlib.util.find_spec("keras") is not None
)


def needs(*frameworks):
    """Skip unless the frameworks are installed (this module imports none)."""
    if "torch" in frameworks and not HAS_TORCH:
        pytest.skip("torch not installed")
    if "keras" in frameworks and not HAS_KERAS:
        pytest.skip("tensorflow/keras not installed")


#: l1/l2 factors exact in float32 (Keras casts them through float32)
R = Regularizer(l1=2**-7, l2=2**-10)


def dense(units, activation="linear", **kw):
    return LayerSpec("dense", units, activation, **kw)


# --------------------------------------------------------------------------- specs
#: Keras' functional-API example: text -> Embedding -> LSTM -> aux output; LSTM
#: features + a second input -> Dense -> main output. Heads not in sorted order.
CLASSIC = ModelSpec(
    inputs=(
        InputSpec("text", "tokens", (6,), vocab=20),
        InputSpec("meta", shape=(3,)),
    ),
    trunk=(
        Node("embed", ("text",), LayerSpec("embedding", 8)),
        Node("lstm", ("embed",), LayerSpec("lstm", 5)),
        Node("joined", ("lstm", "meta"), LayerSpec("merge")),
        Node("hidden", ("joined",), dense(6, "relu")),
    ),
    heads=(
        HeadSpec("main", "hidden", (dense(1),), loss="mse", weight=1.0),
        HeadSpec(
            "aux",
            "lstm",
            (dense(1, "sigmoid"),),
            loss="binary_crossentropy",
            from_logits=False,
            weight=0.2,
        ),
    ),
    seed=3,
)

#: sequences: conv1d (valid and same), gru with sequences, layernorm, lstm, pool;
#: heads branch at three depths; dict outputs, list losses and weights
SEQUENCES = ModelSpec(
    inputs=(InputSpec("series", shape=(5, 3)),),
    trunk=(
        Node("conv", ("series",), LayerSpec("conv1d", 4, "tanh", kernel_size=2)),
        Node("gru", ("conv",), LayerSpec("gru", 4, return_sequences=True)),
        Node("norm", ("gru",), LayerSpec("layernorm")),
        Node("lstm", ("norm",), LayerSpec("lstm", 3)),
        Node("deep", ("lstm",), dense(4, "softplus")),
    ),
    heads=(
        HeadSpec(
            "zeta",
            "conv",
            (
                LayerSpec("conv1d", 3, "elu", kernel_size=2, padding="same"),
                LayerSpec("pool"),
                dense(3),
            ),
            loss="categorical_crossentropy",
            weight=0.5,
        ),
        HeadSpec(
            "alpha",
            "gru",
            (LayerSpec("pool"), dense(4, "softmax")),
            loss="sparse_categorical_crossentropy",
            from_logits=False,
            weight=2.5,
        ),
        HeadSpec("main", "deep", (dense(2),), loss="huber"),
    ),
    output_structure="dict",
    loss_format="list",
    weights_format="list",
    seed=11,
)

#: vectors: every loss form left over, regularizers, an extra input merged midway,
#: weights 0 / tiny / large
VECTORS = ModelSpec(
    inputs=(InputSpec("x", shape=(4,)), InputSpec("extra", shape=(2,))),
    trunk=(
        Node("d0", ("x",), dense(6, "gelu", kernel_regularizer=R)),
        Node("cat", ("d0", "extra"), LayerSpec("merge")),
        Node("norm", ("cat",), LayerSpec("layernorm")),
        Node("d1", ("norm",), dense(5, "leaky_relu", activity_regularizer=R)),
    ),
    heads=(
        HeadSpec("score", "d1", (dense(3),), loss="mae", weight=1e-6),
        HeadSpec(
            "label",
            "d0",
            (dense(3, "sigmoid"), dense(4, "softmax", kernel_regularizer=R)),
            loss="categorical_crossentropy",
            from_logits=False,
            weight=1e3,
        ),
        HeadSpec("flag", "d1", (dense(2),), loss="binary_crossentropy", weight=0.0),
        HeadSpec(
            "klass",
            "norm",
            (dense(3, "tanh"),),
            loss="sparse_categorical_crossentropy",
            weight=0.3,
        ),
        HeadSpec(
            "prob",
            "cat",
            (dense(2, "sigmoid", activity_regularizer=R),),
            loss="binary_crossentropy",
            from_logits=False,
        ),
        HeadSpec("reg", "norm", (dense(2, "tanh"),), loss="mse", weight=2.5),
    ),
    seed=7,
)

#: one loss and one weight for every head (Keras' single-value form)
SINGLE = ModelSpec(
    inputs=(InputSpec("x", shape=(3,)),),
    trunk=(Node("h", ("x",), dense(4, "tanh")),),
    heads=(
        HeadSpec("b", "h", (dense(2),), weight=0.5),
        HeadSpec("a", "x", (dense(1),), weight=0.5),
    ),
    output_structure="dict",
    loss_format="single",
    weights_format="single",
)

#: images: strided conv2d with padding "same", batchnorm with trained statistics
#: (eval) and in training mode, depthwise and separable convolutions, a residual
#: block, max and average pooling, global average pooling, dropout (eval), the
#: activations real vision models use
IMAGES = ModelSpec(
    inputs=(InputSpec("image", shape=(6, 6, 2)),),
    trunk=(
        Node(
            "conv",
            ("image",),
            LayerSpec(
                "conv2d",
                4,
                "relu6",
                kernel_size=3,
                strides=2,
                padding="same",
                kernel_regularizer=R,
            ),
        ),
        Node("bn", ("conv",), LayerSpec("batchnorm", trained_statistics=True)),
        Node(
            "dw",
            ("bn",),
            LayerSpec(
                "depthwise_conv2d", 2, "hard_swish", kernel_size=2, padding="same"
            ),
        ),
        Node("sep", ("dw",), LayerSpec("separable_conv2d", 4, "silu", kernel_size=2)),
        Node("inner", ("sep",), LayerSpec("conv2d", 4, "tanh", padding="same")),
        Node("res", ("sep", "inner"), LayerSpec("add")),
        Node("mp", ("res",), LayerSpec("maxpool2d", kernel_size=2, strides=1)),
        Node("bn_train", ("mp",), LayerSpec("batchnorm", training=True)),
        Node("drop", ("bn_train",), LayerSpec("dropout", rate=0.3)),
    ),
    heads=(
        HeadSpec("main", "drop", (LayerSpec("pool"), dense(2))),
        HeadSpec(
            "aux",
            "res",
            (
                LayerSpec("avgpool2d", kernel_size=2, strides=2),
                LayerSpec("pool"),
                dense(3),
            ),
            loss="sparse_categorical_crossentropy",
            weight=0.5,
        ),
    ),
    seed=5,
)

#: a small transformer block: token embedding, causal self-attention with a key
#: padding mask, a residual add, layer norm; a head with its own (unmasked,
#: non-causal) attention and a vector batchnorm in training mode
ATTENTION = ModelSpec(
    inputs=(
        InputSpec("text", "tokens", (5,), vocab=9),
        InputSpec("pad_mask", "mask", (5,)),
    ),
    trunk=(
        Node("embed", ("text",), LayerSpec("embedding", 4)),
        Node(
            "att",
            ("embed", "pad_mask"),
            LayerSpec("attention", 3, num_heads=2, causal=True),
        ),
        Node("res", ("embed", "att"), LayerSpec("add")),
        Node("norm", ("res",), LayerSpec("layernorm")),
    ),
    heads=(
        HeadSpec("main", "norm", (LayerSpec("pool"), dense(2, "gelu"))),
        HeadSpec(
            "aux",
            "embed",
            (
                LayerSpec("attention", 2, num_heads=1),
                LayerSpec("pool"),
                LayerSpec("batchnorm", training=True),
                dense(1),
            ),
            weight=0.3,
        ),
    ),
    seed=9,
)

SPECS = {
    "classic": CLASSIC,
    "sequences": SEQUENCES,
    "vectors": VECTORS,
    "single": SINGLE,
    "images": IMAGES,
    "attention": ATTENTION,
}


def batch_for(spec, size=3, seed=0):
    return random_batch(
        spec, size, seed, {spec.heads[0].name: "zeros", spec.heads[-1].name: "positive"}
    )


def test_hand_written_specs_cover_every_kind_activation_and_loss():
    kinds, acts, losses = set(), set(), set()
    for spec in SPECS.values():
        spec.validate()
        for _, layer, _ in spec.layers():
            kinds.add(layer.kind)
            acts.add(layer.activation)
        losses |= {(h.loss, h.from_logits) for h in spec.heads}
    assert kinds == set(LAYER_KINDS)
    assert acts == set(ACTIVATIONS)
    expected = {(loss, True) for loss in LOSSES}
    expected |= {(loss, False) for loss in CROSSENTROPIES}
    assert losses == expected


# --------------------------------------------------------------------------- spec
@pytest.mark.parametrize("name", sorted(SPECS))
def test_json_round_trip_is_exact(name):
    spec = SPECS[name]
    text = spec.to_json()
    back = ModelSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert json.loads(text) == spec.to_dict()


@settings(max_examples=40)
@given(architectures())
def test_json_round_trip_of_drawn_specs(spec):
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec and back.validate() is back
    assert back.head_names == spec.head_names


def test_heads_keep_definition_order():
    assert CLASSIC.head_names == ("main", "aux")
    assert list(CLASSIC.weights) == ["main", "aux"]
    assert [h["name"] for h in CLASSIC.to_dict()["heads"]] == ["main", "aux"]
    assert "output_structure" not in CLASSIC.to_dict()  # defaults are left out
    reweighted = CLASSIC.with_weights({"aux": 0.5})
    assert reweighted.weights == {"main": 1.0, "aux": 0.5}
    with pytest.raises(gradcheck.InvalidArgumentError, match="ghost"):
        CLASSIC.with_weights({"ghost": 1.0})


def test_shapes_and_layer_names():
    shapes = SEQUENCES.shapes()
    assert shapes["conv"] == (4, 4) and shapes["zeta_1"] == (4, 3)
    assert shapes["zeta_2"] == (3,) and shapes["alpha"] == (4,)
    assert SEQUENCES.head("zeta").layer_names() == ("zeta_1", "zeta_2", "zeta")
    assert CLASSIC.shapes()["joined"] == (8,)


def test_trunk_may_be_listed_in_any_order():
    spec = dataclasses.replace(CLASSIC, trunk=tuple(reversed(CLASSIC.trunk)))
    assert [n.name for n in spec.validate().ordered_trunk()] == [
        "embed",
        "lstm",
        "joined",
        "hidden",
    ]


def _mutate(spec, **changes):
    return dataclasses.replace(spec, **changes)


def _head(spec, i, **changes):
    heads = list(spec.heads)
    heads[i] = dataclasses.replace(heads[i], **changes)
    return dataclasses.replace(spec, heads=tuple(heads))


def _node(spec, i, **changes):
    trunk = list(spec.trunk)
    trunk[i] = dataclasses.replace(trunk[i], **changes)
    return dataclasses.replace(spec, trunk=tuple(trunk))


BAD_SPECS = [
    (_node(CLASSIC, 1, inputs=("nowhere",)), "reads 'nowhere'"),
    (_node(CLASSIC, 0, inputs=("hidden",)), r"cycle: .*embed"),
    (_node(CLASSIC, 1, inputs=("lstm",)), r"cycle: lstm -> lstm"),
    (_head(CLASSIC, 0, source="ghost"), "unknown 'ghost'"),
    (_head(CLASSIC, 1, from_logits=True), "from_logits=True, but the output"),
    (_head(CLASSIC, 1, layers=(dense(1),), from_logits=False), "needs a sigmoid"),
    (
        _head(CLASSIC, 0, loss="categorical_crossentropy"),
        "needs units >= 2",
    ),
    (_head(CLASSIC, 0, from_logits=False), "cross-entropies only"),
    (_head(CLASSIC, 0, layers=(dense(2, "softmax"),)), "softmax output with a mse"),
    (_head(CLASSIC, 0, layers=()), "at least its dense output"),
    (_head(CLASSIC, 0, layers=(LayerSpec("layernorm"),)), "must be dense"),
    (_head(CLASSIC, 0, source="embed"), r"\(units,\) per example"),
    (_head(CLASSIC, 0, loss="hinge"), "unknown loss 'hinge'"),
    (_head(CLASSIC, 0, weight=-1.0), "weight must be >= 0"),
    (_head(CLASSIC, 0, weight=float("nan")), "finite"),
    (_head(CLASSIC, 0, name="aux"), "used twice"),
    (_head(CLASSIC, 0, name="lstm"), "used twice"),
    (_head(CLASSIC, 0, name="Main"), "lowercase"),
    (_head(CLASSIC, 0, name="regularization"), "reserved"),
    (_head(CLASSIC, 0, name="class"), "reserved"),
    (_node(CLASSIC, 0, layer=dense(3)), "only an embedding reads it"),
    (
        _node(CLASSIC, 0, inputs=("meta",)),
        "embedding reads a tokens input",
    ),
    (_node(CLASSIC, 2, inputs=("embed", "meta")), "merge needs equal shapes"),
    (_node(CLASSIC, 2, inputs=("lstm",)), "two or more"),
    (_node(CLASSIC, 3, layer=LayerSpec("lstm", 3)), r"needs a sequence"),
    (_node(CLASSIC, 3, layer=LayerSpec("conv", 3)), "unknown layer kind"),
    (_node(CLASSIC, 3, layer=dense(0)), "units >= 1"),
    (_node(CLASSIC, 3, layer=dense(3, "swish")), "unknown activation"),
    (_node(CLASSIC, 3, layer=dense(3, "softmax")), "softmax belongs"),
    (
        _node(CLASSIC, 1, layer=LayerSpec("lstm", 5, kernel_regularizer=R)),
        "dense, conv1d and conv2d",
    ),
    (_node(CLASSIC, 3, layer=dense(3, kernel_regularizer=Regularizer(-1.0))), "l1"),
    (_node(CLASSIC, 1, layer=LayerSpec("conv1d", 3, kernel_size=9)), "exceeds 6"),
    (_node(CLASSIC, 3, layer=dense(3, kernel_size=2)), "convolutions and pooling"),
    (_node(IMAGES, 0, layer=LayerSpec("conv2d", 2, kernel_size=7)), "exceeds"),
    (_node(IMAGES, 0, layer=LayerSpec("conv2d", 2, strides=0)), "strides"),
    (_node(IMAGES, 0, layer=LayerSpec("conv1d", 2)), "needs a sequence"),
    (_node(CLASSIC, 3, layer=LayerSpec("conv2d", 2)), "needs an image"),
    (
        _node(IMAGES, 6, layer=LayerSpec("maxpool2d", kernel_size=2, padding="same")),
        "pooling is 'valid' only",
    ),
    (_node(IMAGES, 1, layer=LayerSpec("batchnorm", causal=True)), "attention only"),
    (_node(IMAGES, 1, layer=LayerSpec("layernorm", training=True)), "training is"),
    (_node(IMAGES, 1, layer=LayerSpec("dropout")), "0 < rate < 1"),
    (_node(IMAGES, 1, layer=LayerSpec("dropout", rate=1.0)), "0 < rate < 1"),
    (_node(IMAGES, 1, layer=dense(4, trained_statistics=True)), "batchnorm only"),
    (
        _node(IMAGES, 3, layer=LayerSpec("separable_conv2d", 4, kernel_regularizer=R)),
        "dense, conv1d and conv2d",
    ),
    (_node(IMAGES, 5, inputs=("sep", "conv")), "add needs tensors of one shape"),
    (_node(IMAGES, 5, inputs=("sep",)), "two or more"),
    (_node(ATTENTION, 1, layer=LayerSpec("attention", 3)), "num_heads >= 1"),
    (_node(ATTENTION, 1, inputs=("pad_mask", "embed")), "first input is a sequence"),
    (_node(ATTENTION, 1, inputs=("embed", "embed")), "second input must be a mask"),
    (_node(ATTENTION, 3, inputs=("pad_mask",)), "padding mask; only attention"),
    (_head(ATTENTION, 0, source="pad_mask"), "branches from the padding mask"),
    (_node(ATTENTION, 0, layer=LayerSpec("embedding", 4, padding_idx=9)), r"\[0, 9\)"),
    (_node(CLASSIC, 3, layer=dense(3, padding_idx=0)), "embedding only"),
    (
        _mutate(
            ATTENTION,
            inputs=(ATTENTION.inputs[0], InputSpec("pad_mask", "mask", (4,))),
        ),
        "mask 'pad_mask' has shape",
    ),
    (_mutate(IMAGES, inputs=(InputSpec("image", shape=(2, 6, 6, 2)),)), "channels"),
    (_node(CLASSIC, 3, layer=LayerSpec("pool", 3)), "has no units"),
    (
        _mutate(CLASSIC, trunk=CLASSIC.trunk + (Node("dead", ("lstm",), dense(2)),)),
        "'dead' reaches no head",
    ),
    (
        _mutate(CLASSIC, inputs=CLASSIC.inputs + (InputSpec("unused", shape=(2,)),)),
        "'unused' reaches no head",
    ),
    (_mutate(CLASSIC, inputs=(InputSpec("text", "tokens", (6,)),)), "vocab >= 1"),
    (_mutate(CLASSIC, heads=()), "at least one head"),
    (_mutate(CLASSIC, loss_format="single"), "same loss on every head"),
    (_mutate(SINGLE, weights_format="dict"), "single loss only with a single"),
    (_head(SINGLE, 0, weight=1.0), "same weight on every head"),
    (_mutate(CLASSIC, output_structure="tuple"), "output_structure"),
    (_mutate(CLASSIC, seed=-1), "seed"),
]


@pytest.mark.parametrize(
    "spec, match", BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))]
)
def test_validate_names_the_inconsistency(spec, match):
    with pytest.raises(gradcheck.InvalidArgumentError, match=match):
        spec.validate()


def test_from_dict_rejects_unknown_fields():
    data = CLASSIC.to_dict()
    data["heads"][0]["wieght"] = 2.0
    with pytest.raises(gradcheck.InvalidArgumentError, match="wieght"):
        ModelSpec.from_dict(data)
    with pytest.raises(gradcheck.InvalidArgumentError, match="cannot read"):
        ModelSpec.from_dict({"inputs": 3, "heads": []})


def test_importing_architectures_imports_no_framework():
    code = (
        "import sys, gradcheck.architectures, gradcheck.architectures.code\n"
        "import gradcheck.strategies\n"
        "from gradcheck.architectures import ModelSpec\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- weights
def test_initial_weights_are_deterministic_and_neutral():
    w = initial_weights(SEQUENCES)
    again = initial_weights(SEQUENCES)
    assert w.keys() == again.keys()
    for layer in w:
        for name in w[layer]:
            np.testing.assert_array_equal(w[layer][name], again[layer][name])
    assert w["conv"]["kernel"].shape == (2, 3, 4)
    assert w["gru"]["input_kernel"].shape == (3, 4, 4)
    assert set(w["gru"]) == {
        "input_kernel",
        "recurrent_kernel",
        "input_bias",
        "recurrent_bias",
    }
    assert w["lstm"]["bias"].shape == (4, 3)
    assert "pool" not in w and "zeta_2" not in w
    other = initial_weights(dataclasses.replace(SEQUENCES, seed=12))
    assert not np.allclose(other["conv"]["kernel"], w["conv"]["kernel"])


def test_dropping_a_head_keeps_the_other_layers_weights():
    smaller = dataclasses.replace(SEQUENCES, heads=SEQUENCES.heads[1:])
    small = initial_weights(smaller)
    full = initial_weights(SEQUENCES)
    assert "zeta" not in small
    for layer in small:
        for name in small[layer]:
            np.testing.assert_array_equal(small[layer][name], full[layer][name])


# --------------------------------------------------------------------------- builders
def numpy(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def scalar(x):
    return float(numpy(x))


def float64_tolerance(spec):
    """Keras float64 is not exact for two activations: gelu goes through TF's
    erfc (5e-9 off) and leaky_relu's slope 0.2 is cast through float32 (1.2e-8
    relative). Everything else agrees to 1e-10."""
    inexact = {"gelu", "leaky_relu"}
    if any(layer.activation in inexact for _, layer, _ in spec.layers()):
        return 1e-7
    return 1e-10


def assert_same(spec, a, b, dtype):
    tol = float64_tolerance(spec) if dtype == "float64" else 1e-5
    for h in spec.head_names:
        np.testing.assert_allclose(
            numpy(a.outputs[h]), numpy(b.outputs[h]), rtol=tol, atol=tol, err_msg=h
        )
        np.testing.assert_allclose(
            numpy(a.losses[h]), numpy(b.losses[h]), rtol=tol, atol=tol, err_msg=h
        )
    for attr in ("regularization", "total"):
        np.testing.assert_allclose(
            numpy(getattr(a, attr)), numpy(getattr(b, attr)), rtol=tol, atol=tol
        )


_BUILT: dict = {}


def built(framework, spec, dtype):
    """Builds are cached per test session: Keras builds are slow-ish."""
    key = (framework, spec.to_json(), dtype)
    if key not in _BUILT:
        from gradcheck.architectures import build_keras, build_torch

        build = build_torch if framework == "torch" else build_keras
        _BUILT[key] = build(spec, dtype)
    return _BUILT[key]


@pytest.mark.torch
@pytest.mark.tensorflow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_torch_and_keras_builds_agree(name, dtype):
    needs("torch", "keras")
    spec = SPECS[name]
    batch = batch_for(spec)
    t = built("torch", spec, dtype).evaluate(batch)
    k = built("keras", spec, dtype).evaluate(batch)
    assert list(t.outputs) == list(k.outputs) == list(spec.head_names)
    assert_same(spec, t, k, dtype)
    assert numpy(t.outputs[spec.heads[0].name]).dtype == np.dtype(dtype)


@pytest.mark.torch
@pytest.mark.tensorflow
@settings(max_examples=8)
@given(data=st.data(), spec=architectures(max_heads=3, max_units=6))
def test_drawn_specs_build_alike_in_float64(data, spec):
    needs("torch", "keras")
    batch = data.draw(batches(spec, max_size=3))
    from gradcheck.architectures import build_keras, build_torch

    t = build_torch(spec, "float64").evaluate(batch)
    k = build_keras(spec, "float64").evaluate(batch)
    assert_same(spec, t, k, "float64")


def test_the_total_is_the_weighted_sum_plus_regularization():
    needs("torch")
    spec = VECTORS
    b = built("torch", spec, "float64")
    batch = batch_for(spec)
    e = b.evaluate(batch)
    losses = {h: scalar(v) for h, v in e.losses.items()}
    reg = scalar(e.regularization)
    expected = sum(spec.weights[h] * losses[h] for h in spec.head_names) + reg
    assert scalar(e.total) == pytest.approx(expected, rel=1e-12)
    assert reg > 0
    ones = {h: 1.0 for h in spec.head_names}
    assert scalar(b.total(batch, ones)) == pytest.approx(
        sum(losses.values()) + reg, rel=1e-12
    )
    fns = b.loss_fns(batch)
    assert list(fns) == [*spec.head_names, REGULARIZATION]
    assert b.loss_weights()[REGULARIZATION] == 1.0
    assert scalar(fns[REGULARIZATION]()) == pytest.approx(reg)


def test_sample_weights_follow_sum_over_batch_size():
    needs("torch")
    spec = SINGLE
    b = built("torch", spec, "float64")
    batch = random_batch(spec, 4, 1)
    per = (numpy(b.outputs(batch)["b"]) - batch["targets"]["b"]) ** 2
    sw = np.array([0.0, 1.0, 2.0, 0.0])
    batch["sample_weights"] = {"b": sw}
    got = scalar(b.losses(batch)["b"])
    assert got == pytest.approx((per.mean(-1) * sw).sum() / 4, rel=1e-12)


def test_torch_names_that_clash_with_module_attributes_are_refused():
    needs("torch")
    from gradcheck.architectures import build_torch

    spec = _node(SINGLE, 0, name="cuda")
    spec = _head(spec, 0, source="cuda")
    with pytest.raises(gradcheck.InvalidArgumentError, match="cuda"):
        build_torch(spec)


def test_keras_compile_args_follow_the_spec_formats():
    needs("keras")
    b = built("keras", SEQUENCES, "float32")
    args = b.compile_args()
    assert isinstance(args["loss"], list) and len(args["loss"]) == 3
    assert args["loss_weights"] == [0.5, 2.5, 1.0]
    b.model.compile(**args)
    single = built("keras", SINGLE, "float32").compile_args()
    assert single["loss_weights"] == 0.5 and not isinstance(single["loss"], list)
    classic = built("keras", CLASSIC, "float32")
    assert list(classic.compile_args()["loss"]) == ["main", "aux"]
    assert classic.model.output_names == ["main", "aux"]


# --------------------------------------------------------------------------- code
def run_code(source):
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, "<spec code>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize(
    "name", ["classic", "sequences", "vectors", "images", "attention"]
)
def test_printed_code_rebuilds_the_model(framework, name):
    needs(framework)
    spec = SPECS[name]
    source = spec.to_code(framework)
    assert "gradcheck" not in source.split('"""', 2)[2]  # only in the docstring
    ns = run_code(source)
    got = ns["evaluate"](batch_for(spec))
    want = built(framework, spec, "float64").evaluate(batch_for(spec))
    for h in spec.head_names:
        np.testing.assert_allclose(
            numpy(got["outputs"][h]), numpy(want.outputs[h]), rtol=1e-12, atol=1e-13
        )
        np.testing.assert_allclose(
            numpy(got["losses"][h]), numpy(want.losses[h]), rtol=1e-12, atol=1e-13
        )
    np.testing.assert_allclose(numpy(got["total"]), numpy(want.total), rtol=1e-12)


@pytest.mark.torch
@pytest.mark.tensorflow
@settings(max_examples=6)
@given(data=st.data(), spec=architectures(max_units=6))
def test_printed_code_of_drawn_specs_runs_alike(data, spec):
    needs("torch", "keras")
    batch = data.draw(batches(spec, max_size=3))
    from gradcheck.architectures import build_keras, build_torch

    for framework, build in (("torch", build_torch), ("keras", build_keras)):
        got = run_code(spec.to_code(framework))["evaluate"](batch)
        want = build(spec, "float64").evaluate(batch)
        np.testing.assert_allclose(numpy(got["total"]), numpy(want.total), rtol=1e-12)
        for h in spec.head_names:
            np.testing.assert_allclose(
                numpy(got["outputs"][h]), numpy(want.outputs[h]), rtol=1e-12, atol=1e-14
            )


def test_printed_code_is_readable():
    source = CLASSIC.to_code("keras")
    assert 'lstm = keras.layers.LSTM(5, name="lstm", dtype=DTYPE)(embed)' in source
    assert "model.compile(loss=LOSSES, loss_weights=WEIGHTS)" in source
    assert "WEIGHTS = {'main': 1.0, 'aux': 0.2}" in source
    compile(source, "<keras>", "exec")
    torch_source = SEQUENCES.to_code("torch")
    assert "self.gru = torch.nn.GRU(4, 4, batch_first=True)" in torch_source
    compile(torch_source, "<torch>", "exec")
    with pytest.raises(gradcheck.InvalidArgumentError, match="framework"):
        CLASSIC.to_code("jax")


# --------------------------------------------------------------------------- engine
CHECKED = [
    ("torch", "float64", "sequences"),
    ("torch", "float32", "classic"),
    ("keras", "float64", "vectors"),
    ("keras", "float32", "classic"),
]


@pytest.mark.parametrize("framework, dtype, name", CHECKED)
def test_the_engine_passes_models_built_from_specs(framework, dtype, name):
    needs(framework)
    spec = SPECS[name]
    b = built(framework, spec, dtype)
    batch = batch_for(spec)
    report = gradcheck.check_gradients(b.total_fn(batch), params=b.model)
    assert report.passed, report.message()
    report = gradcheck.check_linearity(
        b.total_fn(batch), b.loss_fns(batch), b.loss_weights(), params=b.model
    )
    assert report.passed, report.message()
    assert report.flow is not None


# --------------------------------------------------------------------------- new layers
def _torch_and_keras_tensors(spec):
    """Every torch parameter/buffer and Keras weight of fresh builds (cached ones
    have run training-mode batchnorms, which move their statistics), by layer."""
    from gradcheck.architectures import build_keras, build_torch

    t = build_torch(spec, "float64").model
    k = build_keras(spec, "float64").model
    torch_state = {n: v.detach().numpy() for n, v in t.state_dict().items()}
    keras_state = {
        name: [np.asarray(v) for v in k.get_layer(name).weights]
        for name, layer, _ in spec.layers()
        if k.get_layer(name).weights
    }
    return torch_state, keras_state


@pytest.mark.torch
@pytest.mark.tensorflow
@pytest.mark.parametrize("name", ["images", "attention"])
def test_new_layers_get_identical_weights_in_both_frameworks(name):
    """Each framework holds the neutral weights in its own layout: Keras' are the
    neutral arrays themselves; torch's are the same numbers permuted (a conv2d's
    (out, in, k, k), a depthwise kernel's c * multiplier + j rows, attention's
    transposed (in, heads * key_dim) kernels), statistics included."""
    needs("torch", "keras")
    spec = SPECS[name]
    w = initial_weights(spec)
    torch_state, keras_state = _torch_and_keras_tensors(spec)
    kinds = {n: layer.kind for n, layer, _ in spec.layers()}
    for layer, params in w.items():
        for value in keras_state[layer]:
            # every Keras weight is one neutral array, exactly
            assert any(
                v.shape == value.shape and np.array_equal(v, value)
                for v in params.values()
            ), (layer, value.shape)
        assert len(keras_state[layer]) == len(params)
        for key, value in torch_state.items():
            if key.startswith(layer + ".") and not key.endswith("num_batches_tracked"):
                # the same multiset of numbers, only moved around
                flat = np.sort(np.concatenate([v.ravel() for v in params.values()]))
                assert np.isin(value.ravel(), flat).all(), key
    if name == "images":
        bn = w["bn"]
        assert np.abs(bn["moving_mean"]).min() > 0  # trained statistics
        assert (
            not np.allclose(bn["moving_variance"], 1)
            and bn["moving_variance"].min() > 0
        )
        np.testing.assert_array_equal(
            torch_state["bn.running_var"], bn["moving_variance"]
        )
        np.testing.assert_array_equal(w["bn_train"]["moving_mean"], 0.0)
        np.testing.assert_array_equal(w["bn_train"]["moving_variance"], 1.0)
        kernel = w["dw"]["depthwise_kernel"]  # (2, 2, 4, 2): channel c, multiplier j
        np.testing.assert_array_equal(
            torch_state["dw.weight"][2 * 3 + 1, 0], kernel[:, :, 3, 1]
        )
        assert kinds["sep"] == "separable_conv2d"
        assert set(k for k in torch_state if k.startswith("sep.")) == {
            "sep.depthwise.weight",
            "sep.pointwise.weight",
            "sep.pointwise.bias",
        }


def _image_batch(seed=0, size=3):
    return batch_for(IMAGES, size, seed)


@pytest.mark.torch
@pytest.mark.tensorflow
def test_batchnorm_modes_are_fixed_by_the_spec_not_by_the_framework_mode():
    """Eval mode uses the (trained) moving statistics, training mode the batch's,
    whichever mode torch's model or Keras' call is in; one training-mode forward
    moves the moving mean alike in both (torch's momentum is 1 - Keras')."""
    needs("torch", "keras")
    import torch

    spec = ModelSpec(
        inputs=(InputSpec("image", shape=(3, 3, 2)),),
        trunk=(
            Node("frozen", ("image",), LayerSpec("batchnorm", trained_statistics=True)),
            Node(
                "live",
                ("frozen",),
                LayerSpec("batchnorm", training=True, trained_statistics=True),
            ),
        ),
        heads=(HeadSpec("main", "live", (LayerSpec("pool"), dense(1))),),
    )
    from gradcheck.architectures import build_keras, build_torch

    batch = random_batch(spec, 4, 3)
    x = batch["inputs"]["image"]
    w = initial_weights(spec)
    t = build_torch(spec, "float64")
    k = build_keras(spec, "float64")
    f, live = w["frozen"], w["live"]
    eps = 1e-3
    frozen = (x - f["moving_mean"]) / np.sqrt(f["moving_variance"] + eps) * f["gamma"]
    frozen = frozen + f["beta"]
    mean, var = frozen.mean((0, 1, 2)), frozen.var((0, 1, 2))
    want = (frozen - mean) / np.sqrt(var + eps) * live["gamma"] + live["beta"]
    want = (want.mean((1, 2)) @ w["main"]["kernel"]) + w["main"]["bias"]
    for mode in ("train", "eval"):
        getattr(t.model, mode)()
        got = t.outputs(batch)["main"].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for training in (True, False, None):
        got = np.asarray(k.model(x, training=training))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # after one training-mode forward each (torch has run 2 above, Keras 3)
    t = build_torch(spec, "float64")
    k = build_keras(spec, "float64")
    t.outputs(batch)
    k.model(x)
    moved = 0.99 * live["moving_mean"] + 0.01 * mean
    keras_live = k.model.get_layer("live")
    np.testing.assert_allclose(np.asarray(keras_live.moving_mean), moved, rtol=1e-12)
    np.testing.assert_allclose(t.model.live.running_mean.numpy(), moved, rtol=1e-12)
    n = x.size // x.shape[-1]  # torch keeps the unbiased variance, Keras the biased
    np.testing.assert_allclose(
        t.model.live.running_var.numpy(),
        0.99 * live["moving_variance"] + 0.01 * var * n / (n - 1),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        np.asarray(keras_live.moving_variance),
        0.99 * live["moving_variance"] + 0.01 * var,
        rtol=1e-12,
    )
    # the eval-mode layer never moves
    np.testing.assert_array_equal(t.model.frozen.running_mean.numpy(), f["moving_mean"])
    assert torch.is_grad_enabled()


def _dropout_spec(training):
    return ModelSpec(
        inputs=(InputSpec("x", shape=(4,)),),
        trunk=(
            Node("h", ("x",), dense(5, "tanh")),
            Node("drop", ("h",), LayerSpec("dropout", rate=0.5, training=training)),
        ),
        heads=(HeadSpec("main", "drop", (dense(1),)),),
    )


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_dropout_in_training_mode_is_nondeterministic_and_identity_otherwise(
    framework,
):
    needs(framework)
    from gradcheck.architectures import build_keras, build_torch

    build = build_torch if framework == "torch" else build_keras
    batch = random_batch(_dropout_spec(True), 8, 0)
    drops = build(_dropout_spec(True), "float64")
    assert _dropout_spec(True).stochastic and not _dropout_spec(False).stochastic
    report = gradcheck.check_gradients(drops.total_fn(batch), params=drops.model)
    assert report.status == "nondeterministic", report.message()
    keeps = build(_dropout_spec(False), "float64")
    report = gradcheck.check_gradients(keeps.total_fn(batch), params=keeps.model)
    assert report.passed, report.message()
    plain = dataclasses.replace(
        _dropout_spec(False),
        trunk=_dropout_spec(False).trunk[:1],
        heads=(HeadSpec("main", "h", (dense(1),)),),
    )
    np.testing.assert_array_equal(
        numpy(keeps.outputs(batch)["main"]),
        numpy(build(plain, "float64").outputs(batch)["main"]),
    )


def _padded_spec():
    return ModelSpec(
        inputs=(InputSpec("text", "tokens", (4,), vocab=5),),
        trunk=(Node("embed", ("text",), LayerSpec("embedding", 3, padding_idx=0)),),
        heads=(HeadSpec("main", "embed", (LayerSpec("pool"), dense(1))),),
    )


def test_padding_idx_is_torchs_and_keras_refuses_it_clearly():
    """torch leaves the padding row's gradient at zero although the row's values
    reach the loss (by design: finite differences disagree, so the strategies draw
    padding_idx only when asked); gradients of the total are still linear in the
    losses. Keras has no such row: its builder says so."""
    needs("torch")
    from gradcheck.architectures import build_torch

    spec = _padded_spec()
    batch = random_batch(spec, 4, 0)
    batch["inputs"]["text"][:, 0] = 0  # every example has a padding token
    b = build_torch(spec, "float64")
    table = b.model.embed.weight
    assert table[0].abs().sum() > 0  # the spec's weights, not torch's zero row
    b.total(batch).backward()
    assert table.grad[0].abs().max() == 0
    assert table.grad[1:].abs().max() > 0
    report = gradcheck.check_linearity(
        b.total_fn(batch), b.loss_fns(batch), b.loss_weights(), params=b.model
    )
    assert report.passed, report.message()
    assert "padding_idx=0" in spec.to_code("torch")
    if HAS_KERAS:
        from gradcheck.architectures import build_keras

        with pytest.raises(gradcheck.InvalidArgumentError, match="torch-only"):
            build_keras(spec)
