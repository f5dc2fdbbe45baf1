"""The audit's model of Keras' loss/weight pairing (gradcheck._audit_tensorflow)
against what check_keras_model finds Keras 3.15 doing, for every way a user can
write the compile config of a two-head model whose outputs are defined out of
sorted name order (main before aux), with asymmetric losses and weights.

The audit's "correct models" Keras job draws only specs the model says Keras
trains as written, and its known-bug job only specs it says Keras mis-pairs; if
the model were wrong, either job would turn up a counterexample. This test pins
the model on hand-made specs so a Keras upgrade that changes the pairing fails
here with a readable reason."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck.architectures import (  # noqa: E402
    HeadSpec,
    InputSpec,
    LayerSpec,
    ModelSpec,
    Node,
    build_keras,
)
from gradcheck.keras_api import check_keras_model  # noqa: E402
from gradcheck.properties.keras_training import (  # noqa: E402
    compile_built,
    keras_data,
)
from gradcheck.strategies import batches  # noqa: E402

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)

from gradcheck import _audit_tensorflow as audit_tf  # noqa: E402

BASE = ModelSpec(
    inputs=(InputSpec("x", shape=(3,)),),
    trunk=(Node("hidden", ("x",), LayerSpec("dense", 4, "tanh")),),
    heads=(
        HeadSpec("main", "hidden", (LayerSpec("dense", 1),), loss="mse", weight=1.0),
        HeadSpec(
            "aux",
            "hidden",
            (LayerSpec("dense", 1),),
            loss="binary_crossentropy",
            weight=0.3,
        ),
    ),
    seed=1,
)

COMBOS = [
    (out, loss, weights)
    for out, (loss, weights) in itertools.product(
        ("list", "dict"), itertools.product(("dict", "list"), repeat=2)
    )
]


def one_batch(spec):
    from hypothesis import HealthCheck, given, settings

    found = []

    @settings(max_examples=1, database=None, suppress_health_check=list(HealthCheck))
    @given(batches(spec, min_size=4, max_size=4, sample_weights=False))
    def draw(b):
        found.append(b)

    draw()
    return found[0]


@pytest.mark.parametrize("out,loss,weights", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_pairing_model_matches_keras(out, loss, weights):
    spec = dataclasses.replace(
        BASE, output_structure=out, loss_format=loss, weights_format=weights
    )
    built = build_keras(spec, "float32")
    model = compile_built(built, optimizer="sgd")
    x, y, sw = keras_data(built, one_batch(spec))
    report = check_keras_model(model, x, y, sample_weight=sw)
    trains_as_written = audit_tf.trainable(spec)
    assert report.passed == trains_as_written, (
        f"the audit's model says Keras pairs {audit_tf.keras_pairing(spec)}; "
        + report.message()
    )
    assert audit_tf._shows_pairing_bug(spec) == (not trains_as_written)


def test_every_combination_is_either_trained_as_written_or_a_known_bug():
    """The pinned Keras 3.15 facts: which combinations Keras mis-pairs."""
    mispaired = {
        c
        for c in COMBOS
        if not audit_tf.trainable(
            dataclasses.replace(
                BASE, output_structure=c[0], loss_format=c[1], weights_format=c[2]
            )
        )
    }
    assert mispaired == {
        ("list", "list", "dict"),  # dict weights flattened sorted next to a list
        ("dict", "dict", "list"),  # list weights packed into the sorted loss dict
        ("dict", "list", "dict"),  # list loss paired with sorted outputs
        ("dict", "list", "list"),  # both lists paired with sorted outputs
    }


def test_zero_weights_give_an_exact_zero_total_that_passes():
    """Every weight 0: Keras reports loss 0 and the independent total is 0, with a
    tolerance of 0 -- an exact agreement, not a failure (an audit counterexample
    before the fix)."""
    heads = tuple(dataclasses.replace(h, weight=0.0) for h in BASE.heads)
    spec = dataclasses.replace(BASE, heads=heads[:1])
    built = build_keras(spec, "float32")
    model = compile_built(built, optimizer="sgd")
    x, y, sw = keras_data(built, one_batch(spec))
    report = check_keras_model(model, x, y, sample_weight=sw)
    assert report.passed, report.message()
