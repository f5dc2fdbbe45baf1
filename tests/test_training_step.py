"""check_training_step: the .grad a user's training step leaves is sum_i w_i grad L_i.

Correct steps (one weighted backward, accumulation over micro-batches, a GradScaler
with unscale_) pass; the classic multi-task bugs fail with a message that names the
property, the parameter and the head; the user's state survives every outcome."""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from gradcheck import api  # noqa: E402
from gradcheck.errors import NoGradientError  # noqa: E402
from gradcheck.training_api import (  # noqa: E402
    assert_training_step,
    check_training_step,
)
from tests import torch_models as tm  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

pytestmark = pytest.mark.torch

HEADS = {"main": (2, "mse"), "aux": (4, "ce")}
WEIGHTS = {"main": 1.0, "aux": 0.3}
PROPERTY = "training-step check FAILED"


def setup(dtype=torch.float32, seed=0, batch=16, widths=(16, 16)):
    torch.manual_seed(seed)
    model = tm.MultiHead(6, list(widths), "tanh", HEADS, dtype)
    x = torch.randn(batch, 6, dtype=dtype)
    targets = tm.make_targets(model, batch, torch.Generator().manual_seed(seed))
    return model, x, targets


def head_losses(model, x, targets, rows=slice(None), detach_aux=False):
    h = model.trunk(x[rows])
    out = {}
    for name, head in model.heads.items():
        inp = h.detach() if detach_aux and name == "aux" else h
        out[name] = tm.head_loss(model.losses[name], head(inp), targets[name][rows])
    return out


def loss_fns(model, x, targets):
    """Each head's loss over the whole batch, computed on its own."""
    return {
        name: (lambda name=name: head_losses(model, x, targets)[name])
        for name in model.heads
    }


def make_step(
    model,
    x,
    targets,
    weights,
    *,
    micro=1,
    divide_by=None,
    scaler=None,
    optimizer=None,
    unscale=True,
    detach_aux=False,
    heads=None,
    then_step=False,
):
    """A training step as users write it: per micro-batch, the weighted sum of the
    heads divided by the micro-batch count, backward (through a GradScaler if any),
    then unscale_ and optionally the optimizer step."""
    divide_by = micro if divide_by is None else divide_by
    n = x.shape[0]

    def step():
        if optimizer is not None:
            optimizer.zero_grad()
        for k in range(micro):
            rows = slice(k * n // micro, (k + 1) * n // micro)
            losses = head_losses(model, x, targets, rows, detach_aux)
            total = sum(weights[h] * losses[h] for h in heads or losses) / divide_by
            (scaler.scale(total) if scaler is not None else total).backward()
        if scaler is not None and unscale:
            scaler.unscale_(optimizer)
        if then_step:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    return step


def check(model, x, targets, step, weights=WEIGHTS, **kw):
    return check_training_step(step, model, loss_fns(model, x, targets), weights, **kw)


# ---------------------------------------------------------------- correct steps pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_weighted_sum_passes_with_the_flow_matrix(dtype):
    model, x, targets = setup(dtype)
    report = check(model, x, targets, make_step(model, x, targets, WEIGHTS))
    assert report.passed, report.message()
    assert report.property == "training_step"
    assert report.dtype == str(dtype).split(".")[-1]
    flow = report.flow
    assert flow.losses == ["main", "aux"]
    assert flow.reached_by("trunk.0.weight") == ["main", "aux"]
    assert flow.reached_by("heads.aux.bias") == ["aux"]
    t = flow.tensors.index("trunk.0.weight")
    assert flow.effective_weights[t] == pytest.approx([1.0, 0.3], rel=1e-4)


@pytest.mark.parametrize("micro", [2, 4, 8])
def test_accumulation_over_equal_micro_batches_passes(micro):
    model, x, targets = setup(batch=micro * 4)
    step = make_step(model, x, targets, WEIGHTS, micro=micro)
    report = check(model, x, targets, step)
    assert report.passed, report.message()


def test_grad_scaler_with_unscale_and_a_real_optimizer_step_passes():
    model, x, targets = setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    step = make_step(
        model,
        x,
        targets,
        WEIGHTS,
        micro=4,
        scaler=scaler,
        optimizer=optimizer,
        then_step=True,
    )
    report = check(model, x, targets, step, scaler=scaler)
    assert report.passed, report.message()
    assert any("Adam.step(); gradcheck undid it" in n for n in report.notes)


def test_bfloat16_autocast_step_passes_with_autocast_option():
    model, x, targets = setup(widths=(32, 32))

    def step():
        for k in range(2):
            rows = slice(8 * k, 8 * k + 8)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = head_losses(model, x, targets, rows)
                total = sum(WEIGHTS[h] * losses[h] for h in losses) / 2
            total.backward()

    report = check(model, x, targets, step, autocast=torch.bfloat16)
    assert report.passed, report.message()
    assert "autocast to bfloat16" in report.tolerance_reason
    # bfloat16's rounding still leaves a weight applied twice visible
    twice = {"main": 1.0, "aux": 0.09}

    def step_twice():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = head_losses(model, x, targets)
            total = sum(twice[h] * losses[h] for h in losses)
        total.backward()

    report = check(model, x, targets, step_twice, autocast="bfloat16")
    assert report.status == "mismatch" and report.location.head == "aux"
    # without the option the bfloat16 rounding is (rightly) out of float32 tolerance,
    # and the report says what to do
    report = check(model, x, targets, step)
    assert report.status == "mismatch"
    assert any("autocast=torch.bfloat16" in n for n in report.notes)


# ---------------------------------------------------------------- planted bugs fail
def torch_truth(model, x, targets, weights, step):
    """What the report must say, computed by torch alone: each head's weighted
    gradient w_h * dL_h (torch.autograd.grad on the whole batch; None where the
    head does not reach a parameter) and the .grad one run of ``step`` leaves,
    started from no .grad (the model's own .grad put back afterwards)."""
    params = dict(model.named_parameters())
    losses = head_losses(model, x, targets)
    per_head = {}
    for h, loss in losses.items():
        grads = torch.autograd.grad(
            loss, list(params.values()), retain_graph=True, allow_unused=True
        )
        per_head[h] = {
            n: None if g is None else weights[h] * g
            for n, g in zip(params, grads, strict=True)
        }
    saved = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        step()
        left = {
            n: None if p.grad is None else p.grad.clone() for n, p in params.items()
        }
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    expected = {
        n: sum(per_head[h][n] for h in per_head if per_head[h][n] is not None)
        for n in params
    }
    return per_head, expected, left


def common_factor(expected, left):
    """The step's .grad over the expected gradient, where it is one number for
    all parameters together up to float32 rounding (else None)."""
    a = torch.cat([expected[n].reshape(-1).double() for n in expected])
    b = torch.cat([left[n].reshape(-1).double() for n in expected])
    factor = (a @ b / (a @ a)).item()
    return factor if (b - factor * a).norm() <= 1e-5 * b.norm() else None


def expect_failure(report, *, tensor_prefix, head, fragments, truth=None):
    """A mismatch that names the property, a parameter and a head. ``head=None``:
    any head that reaches the blamed parameter (by ``truth``, torch's own
    gradients), for bugs that wrong every head alike. With ``truth``, the
    reported numbers are torch's: the expected gradient and the step's .grad at
    the blamed element."""
    assert report.status == "mismatch", report.message()
    message = report.message()
    loc = report.location
    assert PROPERTY in message
    assert loc.tensor.startswith(tensor_prefix), message
    assert f"'{loc.tensor}'" in message
    if head is not None:
        assert loc.head == head, message
    if truth is not None:
        per_head, expected, left = truth
        assert per_head[loc.head][loc.tensor] is not None, (
            f"'{loc.head}' does not reach '{loc.tensor}' (torch says): {message}"
        )
        assert loc.numerical == pytest.approx(
            expected[loc.tensor][loc.index].item(), rel=1e-5, abs=1e-7
        ), message
        assert loc.analytical == pytest.approx(
            left[loc.tensor][loc.index].item(), rel=1e-5, abs=1e-7
        ), message
    assert f"of loss '{loc.head}'" in message
    for fragment in fragments:
        assert fragment in message, message
    with pytest.raises(gradcheck.GradientMismatchError, match=PROPERTY):
        raise gradcheck.GradientMismatchError(report)


def test_detached_aux_branch_fails_naming_aux_and_the_trunk():
    model, x, targets = setup()
    step = make_step(model, x, targets, WEIGHTS, detach_aux=True)
    report = check(model, x, targets, step)
    expect_failure(
        report,
        tensor_prefix="trunk.",
        head="aux",
        fragments=["the step's gradient carries 'aux' not at all (detached?)"],
        truth=torch_truth(model, x, targets, WEIGHTS, step),
    )


def test_weight_applied_twice_fails_with_the_effective_weight():
    model, x, targets = setup()
    twice = {"main": 1.0, "aux": 0.3 * 0.3}
    step = make_step(model, x, targets, twice)
    report = check(model, x, targets, step)
    expect_failure(
        report,
        tensor_prefix="heads.aux",
        head="aux",
        fragments=["'aux' with weight 0.09 instead of 0.3"],
        truth=torch_truth(model, x, targets, WEIGHTS, step),
    )


@pytest.mark.parametrize(
    ("divide_by", "factor", "named"), [(1, 4.0, "4x"), (16, 0.25, "1/4 = 0.25x")]
)
def test_accumulation_divided_by_the_wrong_count_is_named(divide_by, factor, named):
    model, x, targets = setup()
    step = make_step(model, x, targets, WEIGHTS, micro=4, divide_by=divide_by)
    truth = torch_truth(model, x, targets, WEIGHTS, step)
    # the bug as torch sees it: every .grad is the expected one times `factor`
    assert common_factor(truth[1], truth[2]) == pytest.approx(factor, rel=1e-4)
    report = check(model, x, targets, step)
    expect_failure(
        report,
        tensor_prefix="",
        head=None,  # every head is off by the same factor
        fragments=[
            "accumulation divided by the wrong count",
            f".grad is {named} the expected",
        ],
        truth=truth,
    )


def test_scaler_not_unscaled_names_the_scale():
    model, x, targets = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    step = make_step(
        model, x, targets, WEIGHTS, scaler=scaler, optimizer=optimizer, unscale=False
    )
    truth = torch_truth(model, x, targets, WEIGHTS, step)
    scale = scaler.get_scale()
    assert common_factor(truth[1], truth[2]) == pytest.approx(scale, rel=1e-4)
    report = check(model, x, targets, step, scaler=scaler)
    expect_failure(
        report,
        tensor_prefix="",
        head=None,  # every head is off by the same factor
        fragments=[
            f"times {scale:.0f}",
            f"the GradScaler's scale ({scale:.0f})",
            "call scaler.unscale_(optimizer)",
        ],
        truth=truth,
    )
    # without scaler= the power of two is still recognised
    report = check(model, x, targets, step)
    assert any("as large as a GradScaler's scale" in n for n in report.notes)


def test_missing_aux_loss_names_the_parameters_no_gradient_reached():
    model, x, targets = setup()
    step = make_step(model, x, targets, WEIGHTS, heads=["main"])
    report = check(model, x, targets, step)
    expect_failure(
        report,
        tensor_prefix="heads.aux",
        head="aux",
        fragments=[
            "no gradient reached 'heads.aux.weight', 'heads.aux.bias'",
            "'aux' (weight 0.3) reaches them",
        ],
    )
    t = report.flow.tensors.index("heads.aux.weight")
    assert report.tensors[t].connected is False
    with pytest.raises(gradcheck.GradientMismatchError, match="heads.aux"):
        assert_training_step(step, model, loss_fns(model, x, targets), WEIGHTS)


def test_zero_weight_head_contributes_exactly_nothing():
    model, x, targets = setup()
    w = {"main": 1.0, "aux": 0.0}
    for step in (
        make_step(model, x, targets, w),  # 0.0 * aux in the sum: zero .grad
        make_step(model, x, targets, w, heads=["main"]),  # aux left out: None
    ):
        report = check(model, x, targets, step, weights=w)
        assert report.passed, report.message()
        t = report.flow.tensors.index("heads.aux.weight")
        assert report.flow.norms[t] == [0.0, 0.0]
        assert report.flow.total_norms[t] == 0.0
    # while a head with a nonzero weight the step leaves out is caught
    assert not check(
        model, x, targets, make_step(model, x, targets, WEIGHTS, heads=["main"])
    ).passed


def test_dropout_is_replayed_for_one_forward_and_reported_otherwise():
    torch.manual_seed(0)
    model = tm.MultiHead(6, [16], "tanh", HEADS, torch.float32)
    model.trunk.append(torch.nn.Dropout(0.3))
    model.train()
    x = torch.randn(16, 6)
    targets = tm.make_targets(model, 16, torch.Generator().manual_seed(0))
    # every loss_fn and the step start from the user's RNG state: same masks
    report = check(model, x, targets, make_step(model, x, targets, WEIGHTS))
    assert report.passed, report.message()

    def backwards_micro_batches():  # the second half's masks are drawn first
        for rows in (slice(8, 16), slice(0, 8)):
            losses = head_losses(model, x, targets, rows)
            (sum(WEIGHTS[h] * losses[h] for h in losses) / 2).backward()

    report = check(model, x, targets, backwards_micro_batches)
    assert report.status == "nondeterministic", report.message()
    assert "dropout" in report.notes[0]


def test_batchnorm_in_train_mode_passes_and_its_micro_batches_are_explained():
    torch.manual_seed(0)
    model = tm.MultiHead(6, [16], "tanh", HEADS, torch.float32)
    model.trunk.insert(1, torch.nn.BatchNorm1d(16))
    x = torch.randn(16, 6)
    targets = tm.make_targets(model, 16, torch.Generator().manual_seed(0))
    # the bias feeding BatchNorm has a gradient that is zero up to rounding: the
    # floor of the model's largest gradient element keeps it from false-alarming
    report = check(model, x, targets, make_step(model, x, targets, WEIGHTS))
    assert report.passed, report.message()
    report = check(model, x, targets, make_step(model, x, targets, WEIGHTS, micro=2))
    assert report.status == "mismatch"
    assert any("BatchNorm layers in train mode" in n for n in report.notes)
    model.eval()
    report = check(model, x, targets, make_step(model, x, targets, WEIGHTS, micro=2))
    assert report.passed, report.message()


# ---------------------------------------------------------------- state restoration
def build_stateful():
    """A model with buffers, a frozen parameter, a stale .grad, mixed train/eval
    flags, an Adam optimizer and a GradScaler that have both taken real steps."""
    torch.manual_seed(0)
    model = tm.MultiHead(6, [16], "tanh", HEADS, torch.float32)
    model.trunk.insert(1, torch.nn.BatchNorm1d(16))
    model.trunk[1].eval()  # running statistics: a deterministic forward
    model.heads["main"].bias.requires_grad_(False)
    x = torch.randn(16, 6)
    targets = tm.make_targets(model, 16, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    real = make_step(
        model, x, targets, WEIGHTS, scaler=scaler, optimizer=optimizer, then_step=True
    )
    for _ in range(2):
        real()
    model.trunk[0].weight.grad = torch.full_like(model.trunk[0].weight, 7.0)
    model.heads["aux"].bias.grad = None
    return model, x, targets, optimizer, scaler


def snapshot(model, optimizer, scaler):
    return {
        "params": {
            n: (p.detach().clone(), p.data_ptr(), p.requires_grad)
            for n, p in model.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else (p.grad.clone(), p.grad.data_ptr())
            for n, p in model.named_parameters()
        },
        "buffers": {n: (b.clone(), b.data_ptr()) for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "optimizer_ptrs": {
            id(p): {k: v.data_ptr() for k, v in s.items()}
            for p, s in optimizer.state.items()
        },
        "lr": [g["lr"] for g in optimizer.param_groups],
        # the very objects: gradcheck swaps in copies and puts the originals back
        "optimizer_objects": {k: id(v) for k, v in vars(optimizer).items()},
        "scaler_objects": {k: id(v) for k, v in vars(scaler).items()},
        "scaler": copy.deepcopy(scaler.state_dict()),
        "scaler_scale": (scaler._scale, scaler._scale.clone()),
        "scaler_stages": dict(scaler._per_optimizer_states),
        "rng": rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same(before, model, optimizer, scaler):
    after = snapshot(model, optimizer, scaler)
    for n, (v, ptr, req) in before["params"].items():
        v2, ptr2, req2 = after["params"][n]
        assert ptr2 == ptr and req2 == req, n
        assert v.numpy().tobytes() == v2.numpy().tobytes(), n
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), n
        if g is not None:
            assert torch.equal(g[0], g2[0]) and g[1] == g2[1], n
    for n, (b, ptr) in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n][0]), n
        assert ptr == after["buffers"][n][1], n
    assert before["training"] == after["training"]
    _same_nested(before["optimizer"], after["optimizer"])
    assert before["optimizer_ptrs"] == after["optimizer_ptrs"]
    assert before["lr"] == after["lr"]
    assert before["optimizer_objects"] == after["optimizer_objects"]
    assert before["scaler_objects"] == after["scaler_objects"]
    assert before["scaler"] == after["scaler"]
    assert after["scaler_scale"][0] is before["scaler_scale"][0]
    assert torch.equal(after["scaler_scale"][0], before["scaler_scale"][1])
    assert before["scaler_stages"] == after["scaler_stages"]
    assert_same_rng(before["rng"], after["rng"])
    assert before["grad_enabled"] == after["grad_enabled"]


def _same_nested(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _same_nested(u, v)
    else:
        assert a == b


def consuming(step):
    """A step that also consumes every global RNG and flips modes."""

    def wrapped():
        np.random.rand()
        random.random()
        torch.rand(1)
        return step()

    return wrapped


@pytest.mark.parametrize("outcome", ["passing", "failing"])
def test_state_is_bit_identical_after_a_check(outcome):
    model, x, targets, optimizer, scaler = build_stateful()
    weights = WEIGHTS if outcome == "passing" else {"main": 1.0, "aux": 0.09}
    step = consuming(
        make_step(
            model,
            x,
            targets,
            weights,
            micro=2,
            scaler=scaler,
            optimizer=optimizer,
            then_step=True,
        )
    )
    before = snapshot(model, optimizer, scaler)
    report = check(model, x, targets, step, scaler=scaler)
    assert report.passed is (outcome == "passing"), report.message()
    assert_same(before, model, optimizer, scaler)
    # the optimizer and scaler still work: no "unscale_() has already been called"
    make_step(
        model, x, targets, WEIGHTS, scaler=scaler, optimizer=optimizer, then_step=True
    )()


def test_state_is_bit_identical_after_a_raising_step():
    model, x, targets, optimizer, scaler = build_stateful()
    inner = make_step(
        model, x, targets, WEIGHTS, scaler=scaler, optimizer=optimizer, then_step=True
    )

    @consuming
    def step():
        inner()
        model.train()
        model.trunk[0].weight.data.mul_(2.0)  # even in-place writes
        model.trunk[1].running_mean.add_(1.0)
        raise ValueError("boom inside the user's step")

    before = snapshot(model, optimizer, scaler)
    with pytest.raises(ValueError, match="boom"):
        check(model, x, targets, step, scaler=scaler)
    assert_same(before, model, optimizer, scaler)
    with pytest.raises(NoGradientError):
        check(model, x, targets, lambda: None, scaler=scaler)
    assert_same(before, model, optimizer, scaler)


def test_parameters_written_outside_an_optimizer_are_restored_and_noted():
    model, x, targets = setup()
    inner = make_step(model, x, targets, WEIGHTS)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step():
        inner()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad  # a hand-written SGD step

    report = check(model, x, targets, step)
    assert report.passed, report.message()
    assert any("outside a torch.optim.Optimizer.step()" in n for n in report.notes)
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n


# ---------------------------------------------------------------- errors
def test_step_without_backward_or_with_zero_grad_after_it_is_an_error():
    model, x, targets = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NoGradientError, match="did step_fn call backward"):
        check(model, x, targets, lambda: head_losses(model, x, targets))
    inner = make_step(model, x, targets, WEIGHTS, optimizer=optimizer, then_step=True)

    def step_then_zero():
        inner()
        optimizer.zero_grad()

    with pytest.raises(NoGradientError, match="zero_grad"):
        check(model, x, targets, step_then_zero)
    assert isinstance(NoGradientError("x"), gradcheck.GradcheckError)


def test_scaler_overflow_is_a_non_finite_error_that_names_the_skipped_step():
    model, x, targets = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    heavy = {"main": 1e3, "aux": 0.3}  # a scaled loss above float32's range
    step = make_step(model, x, targets, heavy, scaler=scaler, optimizer=optimizer)
    with pytest.raises(gradcheck.NonFiniteError, match="skip this step") as info:
        check(model, x, targets, step, weights=heavy, scaler=scaler)
    assert "'.grad has" in str(info.value) and "after step_fn, '" in str(info.value)


def test_nan_in_a_loss_is_named():
    model, x, targets = setup()
    fns = loss_fns(model, x, targets)
    fns["aux"] = lambda: head_losses(model, x, targets)["aux"] * float("nan")
    with pytest.raises(gradcheck.NonFiniteError, match="loss 'aux' is nan"):
        check_training_step(make_step(model, x, targets, WEIGHTS), model, fns, WEIGHTS)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"model": "not a module"}, gradcheck.UnsupportedInputError, "nn.Module"),
        ({"step_fn": 3}, gradcheck.UnsupportedInputError, "step_fn must be a callable"),
        ({"weights": {"main": 1.0}}, gradcheck.InvalidArgumentError, "same heads"),
        ({"weights": [1.0, 0.3]}, gradcheck.InvalidArgumentError, "must be a dict"),
        ({"scaler": object()}, gradcheck.UnsupportedInputError, "GradScaler"),
        ({"autocast": "int8"}, gradcheck.InvalidArgumentError, "autocast must be"),
        ({"seed": -1}, gradcheck.InvalidArgumentError, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
    model, x, targets = setup()
    args = {
        "step_fn": make_step(model, x, targets, WEIGHTS),
        "model": model,
        "loss_fns": loss_fns(model, x, targets),
        "weights": WEIGHTS,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        check_training_step(**args)


def test_non_scalar_loss_and_frozen_model_are_rejected():
    model, x, targets = setup()
    fns = dict(loss_fns(model, x, targets), aux=lambda: model(x)["aux"])
    step = make_step(model, x, targets, WEIGHTS)
    with pytest.raises(gradcheck.UnsupportedInputError, match="loss_fns\\['aux'\\]"):
        check_training_step(step, model, fns, WEIGHTS)
    model.requires_grad_(False)
    with pytest.raises(gradcheck.NothingToDifferentiateError, match="requires grad"):
        check(model, x, targets, step)


# ---------------------------------------------------------------- plumbing
def test_reports_are_published_with_their_label():
    model, x, targets = setup()
    seen = []
    api._listeners.append(seen.append)
    try:
        report = check(
            model, x, targets, make_step(model, x, targets, WEIGHTS), label="t1"
        )
    finally:
        api._listeners.remove(seen.append)
    assert seen == [report] and report.label == "t1"
    assert report.to_dict()["property"] == "training_step"


def test_importing_the_training_api_imports_no_framework():
    code = (
        "import sys, gradcheck.training_api, gradcheck.properties.training_step\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@given(
    w_main=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0]),
    w_aux=st.sampled_from([0.0, 1e-4, 0.3, 1.0, 300.0]),
    micro=st.integers(1, 8),
    per_micro=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 1000),
    scaled=st.booleans(),
)
def test_correct_steps_never_false_alarm(w_main, w_aux, micro, per_micro, seed, scaled):
    model, x, targets = setup(seed=seed, batch=micro * per_micro)
    weights = {"main": w_main, "aux": w_aux}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    step = make_step(
        model, x, targets, weights, micro=micro, scaler=scaler, optimizer=optimizer
    )
    report = check(model, x, targets, step, weights=weights, scaler=scaler)
    assert report.passed, report.message()
