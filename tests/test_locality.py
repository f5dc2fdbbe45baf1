"""check_locality: each loss reaches exactly the parameters the architecture implies."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gradcheck  # noqa: E402
from gradcheck import architectures as A  # noqa: E402
from gradcheck.architectures import (  # noqa: E402
    HeadSpec,
    InputSpec,
    LayerSpec,
    ModelSpec,
    Node,
    Regularizer,
)
from gradcheck.properties.locality import match_expected, validate_expected  # noqa: E402

pytestmark = pytest.mark.torch

#: Keras' functional-API example with a head that branches midway and a deeper head
#: whose own section (main_1) sits between the branch point and the output.
SPEC = ModelSpec(
    inputs=(InputSpec("text", "tokens", (6,), vocab=20), InputSpec("meta", shape=(3,))),
    trunk=(
        Node("embed", ("text",), LayerSpec("embedding", 8)),
        Node("lstm", ("embed",), LayerSpec("lstm", 4)),
        Node("joined", ("lstm", "meta"), LayerSpec("merge")),
        Node(
            "dense",
            ("joined",),
            LayerSpec("dense", 5, "tanh", activity_regularizer=Regularizer(l2=0.01)),
        ),
    ),
    heads=(
        HeadSpec(
            "zeta_aux",
            "lstm",
            (LayerSpec("dense", 1, "sigmoid"),),
            loss="binary_crossentropy",
            from_logits=False,
            weight=0.2,
        ),
        HeadSpec(
            "main",
            "dense",
            (
                LayerSpec("dense", 3, "tanh", kernel_regularizer=Regularizer(l1=0.01)),
                LayerSpec("dense", 1),
            ),
            loss="mse",
        ),
    ),
)


def check(built, batch, total=None, loss_fns=None, weights=None):
    return gradcheck.check_locality(
        total or built.total_fn(batch),
        loss_fns or built.loss_fns(batch),
        weights or built.loss_weights(),
        expected=built.expected_flow(),
        params=built.model,
    )


def test_expected_flow_follows_the_architecture():
    flow = A.expected_flow(SPEC, "{}.weight".format)
    assert flow["embed"] == flow["lstm"] == ["zeta_aux", "main", "regularization"]
    assert flow["zeta_aux"] == ["zeta_aux"]  # a head's own layer: its loss only
    assert flow["dense"] == ["main", "regularization"]  # below the branch point
    assert flow["main_1"] == ["main"]  # the bias of a kernel-regularized layer
    assert flow["main_1.weight"] == ["main", "regularization"]
    assert flow["main"] == ["main"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_spec_model_passes_in_torch(dtype):
    built = A.build_torch(SPEC, dtype)
    report = check(built, A.random_batch(SPEC, 8, seed=1))
    assert report.passed, report.message()
    assert report.property == "locality"
    flow = report.flow
    assert flow.expected == flow.reaches
    row = flow.tensors.index("main_1.bias")
    assert flow.reaches[row] == [False, True, False]


@pytest.mark.tensorflow
def test_spec_model_passes_in_keras():
    pytest.importorskip("tensorflow")
    built = A.build_keras(SPEC, "float32")
    report = check(built, A.random_batch(SPEC, 8, seed=1))
    assert report.passed, report.message()
    assert "main_1/kernel" in report.flow.tensors


def test_a_detached_branch_passes_linearity_but_fails_locality():
    """The aux loss computed on a detached feature is self-consistent (linearity
    holds: every side uses the same detached graph) but it never trains the trunk."""
    built = A.build_torch(SPEC, "float64")
    batch = built.convert(A.random_batch(SPEC, 8, seed=2))
    model = built.model

    def losses():
        outs, reg = model.run(batch["inputs"])
        out = model.zeta_aux(
            model.lstm(model.embed(batch["inputs"]["text"]))[0][:, -1].detach()
        )
        aux = F.binary_cross_entropy(
            out.clamp(1e-7, 1 - 1e-7), batch["targets"]["zeta_aux"]
        )
        main = F.mse_loss(outs["main"], batch["targets"]["main"])
        return {"zeta_aux": aux, "main": main, "regularization": reg}

    w = built.loss_weights()
    fns = {k: (lambda k=k: losses()[k]) for k in w}

    def total():
        return sum(w[k] * v for k, v in losses().items())

    assert gradcheck.check_linearity(total, fns, w, params=model).passed
    report = check(built, None, total=total, loss_fns=fns, weights=w)
    assert report.status == "mismatch"
    assert report.location.head == "zeta_aux"
    assert report.location.tensor.startswith(("embed", "lstm"))
    text = report.message()
    assert "locality" in text and "zeta_aux" in text and "does not reach" in text


class Leaky(torch.nn.Module):
    """Two heads; the planted bug feeds the aux head's hidden layer into main too."""

    def __init__(self, leak: bool):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(4, 6).double()
        self.aux_hidden = torch.nn.Linear(6, 3).double()
        self.aux_out = torch.nn.Linear(3, 2).double()
        self.main_out = torch.nn.Linear(6, 1).double()
        self.leak = leak

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        a = torch.tanh(self.aux_hidden(h))
        main = self.main_out(h) + (a.sum(-1, keepdim=True) if self.leak else 0)
        return main, self.aux_out(a)


EXPECTED = {"trunk": ["main", "aux"], "aux_*": ["aux"], "main_out": ["main"]}


def leaky_check(leak: bool, weights=None):
    model = Leaky(leak)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, dtype=torch.float64, generator=g)
    y = torch.randn(10, 1, dtype=torch.float64, generator=g)
    c = torch.randint(0, 2, (10,), generator=g)
    w = weights or {"main": 1.0, "aux": 0.5}

    def losses():
        main, aux = model(x)
        return {"main": F.mse_loss(main, y), "aux": F.cross_entropy(aux, c)}

    fns = {k: (lambda k=k: losses()[k]) for k in w}
    return gradcheck.check_locality(
        lambda: sum(w[k] * v for k, v in losses().items()),
        fns,
        w,
        expected=EXPECTED,
        params=model,
    )


def test_correct_hand_written_model_passes():
    report = leaky_check(False)
    assert report.passed, report.message()


def test_a_layer_shared_by_mistake_is_a_leak():
    report = leaky_check(True)
    assert report.status == "mismatch"
    assert report.location.tensor == "aux_hidden.weight"
    assert report.location.head == "main"
    assert "leak" in report.message()


def test_zero_weight_head_must_contribute_exactly_nothing():
    model = Leaky(False)
    x = torch.randn(
        5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    w = {"main": 1.0, "aux": 0.0}

    def losses():
        main, aux = model(x)
        return {"main": main.square().mean(), "aux": aux.square().mean()}

    fns = {k: (lambda k=k: losses()[k]) for k in w}

    def right():
        return sum(w[k] * v for k, v in losses().items())

    def wrong():  # the weight dict is bypassed for aux: it trains at 1e-3
        ls = losses()
        return ls["main"] + 1e-3 * ls["aux"]

    ok = gradcheck.check_locality(right, fns, w, expected=EXPECTED, params=model)
    assert ok.passed, ok.message()
    bad = gradcheck.check_locality(wrong, fns, w, expected=EXPECTED, params=model)
    assert bad.status == "mismatch"
    assert bad.location.tensor.startswith("aux_")
    assert "zero-weight" in bad.message()
    with pytest.raises(gradcheck.GradientMismatchError, match="aux"):
        gradcheck.assert_locality(wrong, fns, w, expected=EXPECTED, params=model)


def test_matching_rules():
    exp = validate_expected(
        {"heads.aux": ["a"], "heads.aux.0.weight": ["b"], "*.bias": []}, ["a", "b"]
    )
    assert match_expected("heads.aux.0.weight", exp) == {"b"}  # exact wins
    assert match_expected("heads.aux.0.bias", exp) == {"a"}  # then longest prefix
    assert match_expected("heads.main.bias", exp) == frozenset()  # then globs
    assert match_expected("trunk.weight", exp) is None
    assert match_expected(
        "lstm/lstm_cell/kernel", validate_expected({"lstm": ["a"]}, ["a"])
    ) == {"a"}


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({"trunk": ["main", "nope"]}, "not in loss_fns"),
        ({"trunk": "main"}, "list of loss names"),
        ([], "non-empty dict"),
        ({"trunk": ["main", "aux"]}, "says nothing about"),
    ],
)
def test_bad_expected_is_a_clear_error(expected, match):
    model = Leaky(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    w = {"main": 1.0, "aux": 1.0}
    fns = {"main": lambda: model(x)[0].sum(), "aux": lambda: model(x)[1].sum()}
    with pytest.raises(gradcheck.InvalidArgumentError, match=match):
        gradcheck.check_locality(
            lambda: fns["main"]() + fns["aux"](),
            fns,
            w,
            expected=expected,
            params=model,
        )
