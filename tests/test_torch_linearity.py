"""check_linearity on PyTorch: grad(total) = sum_i w_i grad(L_i), and the flow matrix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests import torch_models as tm  # noqa: E402

pytestmark = pytest.mark.torch

HEADS = {"zeta_main": (1, "mse"), "alpha_aux": (4, "ce")}  # not in sorted order
WEIGHTS = {"zeta_main": 1.0, "alpha_aux": 0.3}


def setup(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = tm.MultiHead(6, [8, 8], "tanh", HEADS, dtype)
    x = torch.randn(12, 6, dtype=dtype)
    targets = tm.make_targets(model, 12, torch.Generator().manual_seed(seed))
    return model, x, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correct_total_passes_and_flow_matrix_matches_architecture(dtype):
    model, x, targets = setup(dtype)
    report = gradcheck.check_linearity(
        tm.total_fn(model, x, targets, WEIGHTS),
        tm.loss_fns(model, x, targets),
        WEIGHTS,
        params=model,
    )
    assert report.passed, report.message()
    flow = report.flow
    assert flow.losses == ["zeta_main", "alpha_aux"]
    assert flow.reached_by("trunk.0.weight") == ["zeta_main", "alpha_aux"]
    assert flow.reached_by("heads.zeta_main.weight") == ["zeta_main"]
    assert flow.reached_by("heads.alpha_aux.bias") == ["alpha_aux"]
    t = flow.tensors.index("trunk.0.weight")
    assert flow.effective_weights[t] == pytest.approx([1.0, 0.3], rel=1e-4)


def test_detached_branch_fails_and_names_the_aux_loss():
    model, x, targets = setup()

    def total():
        h = model.trunk(x)
        main = tm.head_loss("mse", model.heads["zeta_main"](h), targets["zeta_main"])
        aux = tm.head_loss(
            "ce", model.heads["alpha_aux"](h.detach()), targets["alpha_aux"]
        )
        return main + 0.3 * aux

    report = gradcheck.check_linearity(
        total, tm.loss_fns(model, x, targets), WEIGHTS, params=model
    )
    assert report.status == "mismatch"
    assert report.location.tensor.startswith("trunk.")
    assert report.location.head == "alpha_aux"
    assert "'alpha_aux' not at all (detached?)" in report.message()
    with pytest.raises(gradcheck.GradientMismatchError, match="alpha_aux"):
        gradcheck.assert_linearity(
            total, tm.loss_fns(model, x, targets), WEIGHTS, params=model
        )


def test_weight_applied_twice_reports_the_effective_weight():
    model, x, targets = setup()
    twice = {"zeta_main": 1.0, "alpha_aux": 0.3 * 0.3}
    report = gradcheck.check_linearity(
        tm.total_fn(model, x, targets, twice),
        tm.loss_fns(model, x, targets),
        WEIGHTS,
        params=model,
    )
    assert report.status == "mismatch"
    assert report.location.head == "alpha_aux"
    assert "'alpha_aux' with weight 0.09 instead of 0.3" in report.message()


def test_swapped_losses_with_asymmetric_values_fail():
    model, x, targets = setup()
    swapped = {"zeta_main": 0.3, "alpha_aux": 1.0}
    report = gradcheck.check_linearity(
        tm.total_fn(model, x, targets, swapped),
        tm.loss_fns(model, x, targets),
        WEIGHTS,
        params=model,
    )
    assert report.status == "mismatch"
    assert any("value" in n for n in report.notes)


def test_zero_weight_head_contributes_nothing():
    model, x, targets = setup()
    w = {"zeta_main": 1.0, "alpha_aux": 0.0}
    report = gradcheck.check_linearity(
        tm.total_fn(model, x, targets, w),
        tm.loss_fns(model, x, targets),
        w,
        params=model,
    )
    assert report.passed
    t = report.flow.tensors.index("heads.alpha_aux.weight")
    assert report.flow.norms[t] == [0.0, 0.0]
    assert report.flow.total_norms[t] == 0.0


def test_extra_regularizer_in_total_is_reported():
    model, x, targets = setup()
    base = tm.total_fn(model, x, targets, WEIGHTS)

    def total():
        return base() + 1e-2 * model.trunk[0].weight.pow(2).sum()

    report = gradcheck.check_linearity(
        total, tm.loss_fns(model, x, targets), WEIGHTS, params=model
    )
    assert report.status == "mismatch"
    assert report.location.tensor == "trunk.0.weight"
    # fixed by declaring the regularizer as a loss of its own with weight 1
    fns = dict(
        tm.loss_fns(model, x, targets), l2=lambda: model.trunk[0].weight.pow(2).sum()
    )
    assert gradcheck.check_linearity(
        total, fns, dict(WEIGHTS, l2=1e-2), params=model
    ).passed


def test_dropout_total_is_nondeterministic():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    ).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    fns = {
        "a": lambda: model(x)[:, 0].mean(),
        "b": lambda: model(x)[:, 1].pow(2).mean(),
    }
    report = gradcheck.check_linearity(
        lambda: model(x)[:, 0].mean() + model(x)[:, 1].pow(2).mean(),
        fns,
        {"a": 1.0, "b": 1.0},
        params=model,
    )
    assert report.status == "nondeterministic", report.message()


@pytest.mark.parametrize(
    ("loss_fns", "weights", "match"),
    [
        ({}, {}, "non-empty dict"),
        ({"a": lambda: 0}, {"b": 1.0}, "same heads"),
        ({"a": lambda: 0}, [1.0], "must be a dict"),
        ({"a": lambda: 0}, {"a": "x"}, "not a number"),
        ({"a": lambda: 0}, {"a": float("inf")}, "not finite"),
        ({"a": 3}, {"a": 1.0}, "not callable"),
    ],
)
def test_bad_arguments_raise_clear_errors(loss_fns, weights, match):
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(gradcheck.InvalidArgumentError, match=match):
        gradcheck.check_linearity(lambda x: x.sum(), loss_fns, weights, (x,))


def test_loss_that_is_not_a_scalar_is_rejected():
    model, x, targets = setup()
    with pytest.raises(
        gradcheck.UnsupportedInputError, match="loss_fns\\['a'\\].*scalar"
    ):
        gradcheck.check_linearity(
            lambda: model(x)["zeta_main"].sum(),
            {"a": lambda: model(x)["zeta_main"]},
            {"a": 1.0},
            params=model,
        )


@given(
    w_main=st.sampled_from([0.0, 1e-6, 0.5, 1.0, 3e3]),
    w_aux=st.sampled_from([0.0, 1e-6, 0.25, 1.0, 3e3]),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_linearity_holds_for_any_weights(w_main, w_aux, seed, dtype):
    model, x, targets = setup(dtype, seed)
    w = {"zeta_main": w_main, "alpha_aux": w_aux}
    report = gradcheck.check_linearity(
        tm.total_fn(model, x, targets, w),
        tm.loss_fns(model, x, targets),
        w,
        params=model,
    )
    assert report.passed, report.message()
