"""The tolerance table's one calibrated constant, re-measured.

GRADIENT_ROUNDING["float32"] is a prior, not a verdict: the rounding of float32
gradients differs between CPUs (Intel vs AMD, BLAS kernels) and GPUs, so a failed
comparison is re-judged with rounding measured at check time (the precision split).
These tests assert what users need on whatever machine runs them: float32 checks of
common layer kinds pass, and the same checks catch a 1e-3 backward. The prior's
headroom over the rounding measured here is reported, not asserted.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from gradcheck.numeric import tolerance as tl  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402

pytestmark = pytest.mark.torch


class _Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 12)
        self.lstm = torch.nn.LSTM(12, 24, batch_first=True)
        self.conv = torch.nn.Conv1d(24, 16, 3)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 5)

    def forward(self, x):
        h = self.lstm(self.emb(x))[0].transpose(1, 2)
        return self.out(self.norm(torch.relu(self.conv(h)).mean(-1)))


MODELS = {
    "mlp_tanh": (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)
        ),
        lambda: torch.randn(64, 32),
    ),
    "mlp_relu_layernorm": (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(32, 128),
            torch.nn.LayerNorm(128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 5),
        ),
        lambda: torch.randn(64, 32),
    ),
    "embedding_lstm_conv": (_Seq, lambda: torch.randint(0, 40, (16, 10))),
}


_ScaleGrad = scaled_backward(1e-3)


LOSSES = ["ce_logits", "ce_probs", "mse"]


def _setup(name, loss, planted=False):
    torch.manual_seed(0)
    make_model, make_x = MODELS[name]
    model = make_model()
    x = make_x()
    y = torch.randint(0, 5, (x.shape[0],))
    losses = {
        "ce_logits": lambda o: torch.nn.functional.cross_entropy(o, y),
        "ce_probs": lambda o: torch.nn.functional.nll_loss(torch.log(o.softmax(-1)), y),
        "mse": lambda o: o.pow(2).mean(),
    }

    def fn():
        out = model(x)
        return losses[loss](_ScaleGrad.apply(out) if planted else out)

    return model, x, fn


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", LOSSES)
def test_float32_checks_pass_on_correct_models_on_this_machine(
    name, loss, record_property
):
    """What users need from the rounding allowance: no false alarm on common layer
    kinds, on whatever CPU runs the suite (CI machines differ: Intel vs AMD rounding
    differs by ~40%). The headroom of the table's prior over the rounding measured
    here is reported (junit property / -rA output), not asserted: a constant
    calibrated on one CPU does not transfer to another."""
    model, _, fn = _setup(name, loss)
    report = gradcheck.check_gradients(fn, params=model)
    assert report.passed, report.message()
    rel = _float32_vs_float64_rounding(name, loss)
    headroom = tl.GRADIENT_ROUNDING["float32"] / rel if rel > 0 else float("inf")
    record_property("float32_rounding", rel)
    record_property("table_headroom", headroom)
    print(
        f"{name}/{loss}: measured float32 rounding {rel:.2e}, table prior headroom {headroom:.1f}x"
    )


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", LOSSES)
def test_float32_checks_catch_a_1e3_backward_on_the_same_models(name, loss):
    """The same checks must fail when the backward is off by 1e-3 (the test above
    could otherwise pass with any allowance, however loose)."""
    model, _, fn = _setup(name, loss, planted=True)
    report = gradcheck.check_gradients(fn, params=model)
    assert report.status == "mismatch", report.message()


def _float32_vs_float64_rounding(name, loss) -> float:
    model, x, fn = _setup(name, loss)
    g32 = torch.autograd.grad(fn(), list(model.parameters()))
    model.double()
    if x.is_floating_point():
        x.data = x.data.double()
    g64 = torch.autograd.grad(fn(), list(model.parameters()))
    gmax = max(float(b.norm()) for b in g64)
    worst = 0.0
    for a, b in zip(g32, g64, strict=True):
        # the same floor the engine applies to (near-)zero gradients
        rel = float((a.double() - b).norm()) / max(
            float(b.norm()), tl.ROUNDING_FLOOR * gmax
        )
        worst = max(worst, rel)
    return worst
