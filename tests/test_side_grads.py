"""Gradients a backward writes to ``.grad`` itself (a custom Function calling
``.backward()`` inside its backward: Reformer's reversible layers) count, as
``loss.backward()`` counts them; the user's ``.grad`` is left as it was."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402


class _Recompute(torch.autograd.Function):
    """y = tanh(x @ W.T); backward recomputes the forward with grad enabled and
    backpropagates through it, so W's gradient lands in W.grad and None is
    returned for it (the reversible-layer pattern). ``scale`` plants a bug."""

    @staticmethod
    def forward(ctx, x, w, layer, scale):
        ctx.save_for_backward(x)
        ctx.layer, ctx.scale = layer, scale
        with torch.no_grad():
            return torch.tanh(x @ w.T)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = torch.tanh(x @ ctx.layer.weight.T)
            y.backward(g * ctx.scale)  # writes layer.weight.grad
        return x.grad, None, None, None


class _Reversible(torch.nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(4, 5, bias=False)
        self.head = torch.nn.Linear(5, 2)
        self.scale = scale

    def forward(self, x):
        h = _Recompute.apply(x, self.inner.weight, self.inner, self.scale)
        return self.head(h)


def _x():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_written_to_grad_by_the_backward_count(dtype):
    model = _Reversible().to(getattr(torch, dtype))
    x = _x().to(model.head.weight.dtype)
    sentinel = torch.full_like(model.inner.weight, 7.0)
    model.inner.weight.grad = sentinel.clone()
    report = gradcheck.check_gradients(lambda: model(x).square().sum(), params=model)
    assert report.passed, report.message()
    assert torch.equal(model.inner.weight.grad, sentinel)  # put back exactly
    assert model.head.weight.grad is None


def test_a_wrong_gradient_written_to_grad_is_a_mismatch():
    model = _Reversible(scale=1.01).double()
    x = _x().double()
    report = gradcheck.check_gradients(lambda: model(x).square().sum(), params=model)
    assert report.status == "mismatch", report.message()
    assert "inner.weight" in report.message()
    assert model.inner.weight.grad is None


def test_check_model_says_which_parameters_only_dot_grad_sees():
    model = _Reversible().double()
    [report] = gradcheck.check_model(
        model, inputs={"x": _x().double()}, dtype="float64", properties="fd"
    )
    assert report.passed, report.message()
    note = " ".join(report.notes)
    assert "'inner.weight'" in note and "torch.func" in note, note
    assert "_Reversible's backward" in note, note
    assert "'head.weight'" not in note, note
    [plain] = gradcheck.check_model(
        torch.nn.Linear(4, 2).double(),
        inputs={"input": _x().double()},
        dtype="float64",
        properties="fd",
    )
    assert plain.passed, plain.message()
    assert not any("side effect" in n for n in plain.notes), plain.notes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_check_itself_names_the_parameters_only_dot_grad_sees(dtype):
    """The note comes from the check's own backward passes (no rerun): a plain
    check_gradients says it too, and a model whose backward writes nothing to
    .grad gets none."""
    model = _Reversible().to(getattr(torch, dtype))
    x = _x().to(model.head.weight.dtype)
    report = gradcheck.check_gradients(lambda: model(x).square().sum(), params=model)
    assert report.passed, report.message()
    side = [n for n in report.notes if "side effect" in n]
    assert len(side) == 1 and side[0].startswith("1 parameter ('inner.weight') gets"), (
        side
    )
    lin = torch.nn.Linear(4, 2).to(x.dtype)
    plain = gradcheck.check_gradients(lambda: lin(x).square().sum(), params=lin)
    assert not any("side effect" in n for n in plain.notes), plain.notes
