"""Nothing is lost: the user's torch state is bit-identical after any check."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests import torch_models as tm  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

pytestmark = pytest.mark.torch


def build(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).to(dtype)
    model[3].bias.requires_grad_(False)  # a frozen parameter
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # a stale .grad
    model.train()
    model[2].eval()  # mixed train/eval flags
    return model


def snapshot(model):
    return {
        "params": {
            n: (p.detach().clone(), p.dtype, p.data_ptr(), p.requires_grad)
            for n, p in model.named_parameters()
        },
        "grads": {
            n: None if p.grad is None else (p.grad.clone(), p.grad.data_ptr())
            for n, p in model.named_parameters()
        },
        "buffers": {n: (b.clone(), b.data_ptr()) for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same(before, model):
    after = snapshot(model)
    for n, (v, dtype, ptr, req) in before["params"].items():
        v2, dtype2, ptr2, req2 = after["params"][n]
        assert dtype2 == dtype and ptr2 == ptr and req2 == req, n
        assert torch.equal(v, v2) and v.numpy().tobytes() == v2.numpy().tobytes(), n
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), n
        if g is not None:
            assert torch.equal(g[0], g2[0]) and g[1] == g2[1], n
    for n, (b, ptr) in before["buffers"].items():
        assert (
            torch.equal(b, after["buffers"][n][0]) and ptr == after["buffers"][n][1]
        ), n
    assert before["training"] == after["training"]
    assert_same_rng(before["rng"], after["rng"])
    assert before["grad_enabled"] == after["grad_enabled"]


def consume_rngs():
    """User code that draws from every global RNG (a check must undo it)."""
    np.random.rand()
    random.random()
    torch.rand(1)


def loss_of(model, x):
    def loss():
        consume_rngs()
        model.train()  # ... and flips modes
        return model(x).pow(2).mean()

    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_restored_after_a_passing_check(dtype):
    model = build(dtype)
    x = torch.randn(10, 6, dtype=dtype)
    before = snapshot(model)
    report = gradcheck.check_gradients(loss_of(model, x), params=model)
    assert report.passed, report.message()
    assert_same(before, model)


def test_state_restored_after_a_failing_check():
    model = build()
    x = torch.randn(10, 6)

    def buggy():
        consume_rngs()
        return tm.ScaledBackward.apply(model(x), 0.5).pow(2).mean()

    before = snapshot(model)
    report = gradcheck.check_gradients(buggy, params=model)
    assert report.status == "mismatch"
    assert_same(before, model)


def test_state_restored_after_a_raising_check():
    model = build()
    x = torch.randn(10, 6)
    calls = []

    def flaky():
        consume_rngs()
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom inside the user's fn")
        model[0].weight.data.mul_(2.0)  # an fn that even mutates weights in place
        model[1].running_mean.add_(1.0)
        return model(x).pow(2).mean()

    before = snapshot(model)
    with pytest.raises(ValueError, match="boom"):
        gradcheck.check_gradients(flaky, params=model)
    assert_same(before, model)


def test_state_restored_after_a_gradcheck_error_and_linearity():
    model = build()
    x = torch.randn(10, 6)
    before = snapshot(model)
    with pytest.raises(gradcheck.NonFiniteError):
        gradcheck.check_gradients(lambda: model(x).sum() * float("nan"), params=model)
    assert_same(before, model)
    report = gradcheck.check_linearity(
        lambda: model(x)[:, 0].mean() + 2 * model(x)[:, 1].mean(),
        {"a": lambda: model(x)[:, 0].mean(), "b": lambda: model(x)[:, 1].mean()},
        {"a": 1.0, "b": 2.0},
        params=model,
    )
    assert report.passed, report.message()
    assert_same(before, model)


def test_input_tensors_are_not_touched():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x.grad = torch.ones_like(x)
    saved, ptr = x.detach().clone(), x.data_ptr()

    def fn(x):
        consume_rngs()
        x.data.mul_(3)  # in-place abuse of the argument
        return x.sin().sum()

    rng = rng_state()
    gradcheck.check_gradients(fn, (x,))
    assert_same_rng(rng)
    assert torch.equal(x.detach(), saved) and x.data_ptr() == ptr
    assert torch.equal(x.grad, torch.ones_like(x)) and x.requires_grad


def test_the_rng_comparison_sees_a_single_draw_of_each_generator():
    """A check that forgot one generator is caught even when the draw leaves
    NumPy's key array alone (it changes once every 624 draws)."""
    np.random.seed(0)
    np.random.rand()  # mid-block: the next draw moves only the position
    for draw in (np.random.rand, np.random.randn, random.random, lambda: torch.rand(1)):
        before = rng_state()
        keys = np.random.get_state()[1].copy()
        draw()
        if draw is np.random.rand:
            assert np.array_equal(keys, np.random.get_state()[1])  # the old blind spot
        with pytest.raises(AssertionError):
            assert_same_rng(before)
