"""A float64 model that computes in float32 inside (issue 17: RMSNorm's
`hidden_states.to(torch.float32)` in llama/qwen2/mistral, T5's variance): its
float64 gradient carries float32 rounding. The check says so, judges it at float32
precision (no false alarm) and still catches a wrong backward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402

pytestmark = pytest.mark.torch


class RMSNorm(torch.nn.Module):
    def __init__(self, n, cast=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.cast = cast

    def forward(self, h):
        dtype = h.dtype
        if self.cast:  # as transformers' LlamaRMSNorm does
            h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


_Scale = scaled_backward(1e-3)


def _case(cast=True, planted=False):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "inp": torch.nn.Linear(16, 64),
            "norm": RMSNorm(64, cast),
            "mlp": torch.nn.Linear(64, 64),
            "norm2": RMSNorm(64, cast),
            "out": torch.nn.Linear(64, 4),
        }
    ).double()
    x = torch.randn(32, 16, dtype=torch.float64)

    def loss():
        h = model["norm"](model["inp"](x))
        h = torch.nn.functional.silu(model["mlp"](h))
        # attention-style softmax computed in float32, as many decoders do
        low = torch.float32 if cast else torch.float64
        h = h * torch.softmax(h, -1, dtype=low).to(h.dtype) * 64
        if planted:
            h = _Scale.apply(h)
        return model["out"](model["norm2"](h)).pow(2).mean()

    return model, loss


def test_float64_model_computing_in_float32_inside_is_judged_at_float32():
    # judged at float64's rounding this model is a false alarm (error 6.1e-07 >
    # tolerance 1.8e-07 with the watch switched off)
    model, loss = _case()
    report = gradcheck.check_gradients(loss, params=model)
    assert report.passed, report.message()
    assert "computes in float32 internally (" in report.message()
    assert "norm" in report.message()


def test_a_wrong_backward_in_such_a_model_is_still_a_mismatch():
    model, loss = _case(planted=True)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()


def test_a_pure_float64_model_keeps_float64_precision():
    model, loss = _case(cast=False)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.passed, report.message()
    assert "internally" not in report.message()
    assert "float64 1e-10" in report.tolerance_reason
