"""The tolerance table's one calibrated constant, re-measured.

GRADIENT_ROUNDING["float32"] claims >= 10x headroom over the relative L2 rounding
of float32 gradients (against float64) of common layer kinds. If a framework update
made backward passes noisier, this test says so before users see false alarms.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from gradcheck.numeric import tolerance as tl  # noqa: E402

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


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", ["ce_logits", "ce_probs", "mse"])
def test_float32_gradient_rounding_has_10x_headroom(name, loss):
    torch.manual_seed(0)
    make_model, make_x = MODELS[name]
    m32 = make_model()
    m64 = copy.deepcopy(m32).double()
    x = make_x()
    y = torch.randint(0, 5, (x.shape[0],))
    losses = {
        "ce_logits": lambda o: torch.nn.functional.cross_entropy(o, y),
        "ce_probs": lambda o: torch.nn.functional.nll_loss(torch.log(o.softmax(-1)), y),
        "mse": lambda o: o.pow(2).mean(),
    }
    x64 = x.double() if x.is_floating_point() else x
    g32 = torch.autograd.grad(losses[loss](m32(x)), list(m32.parameters()))
    g64 = torch.autograd.grad(losses[loss](m64(x64)), list(m64.parameters()))
    gmax = max(float(b.norm()) for b in g64)
    for a, b in zip(g32, g64, strict=True):
        # the same floor the engine applies to (near-)zero gradients
        rel = float((a.double() - b).norm()) / max(
            float(b.norm()), tl.ROUNDING_FLOOR * gmax
        )
        assert rel * 10 <= tl.GRADIENT_ROUNDING["float32"], (name, loss, rel)
