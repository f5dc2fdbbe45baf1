"""The hf build moves a finite scalar quantizer off the all-codes-alike point of a
random init (NeuCodec, XCodec2), and leaves one whose codes already spread."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gradcheck.backends import _hf  # noqa: E402


class _FSQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.levels = torch.nn.Buffer(torch.tensor([5, 5, 5]))

    def forward(self, z):
        q = torch.round(z)
        return z + (q - z).detach()  # straight-through rounding


class _Quantizer(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.quantizer = _FSQ()
        self.project_in = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.project_in.weight.mul_(scale)
            self.project_in.bias.mul_(scale)

    def forward(self, x):
        return self.quantizer(self.project_in(x))


class _Codec(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.enc = torch.nn.Linear(4, 8)
        self.quantizer = _Quantizer(scale)

    def forward(self, x):
        return self.quantizer(self.enc(x))


def _inputs():
    return {"x": torch.randn(16, 4, generator=torch.Generator().manual_seed(0))}


def test_a_narrow_projection_is_spread_over_one_level():
    torch.manual_seed(0)
    model = _Codec(scale=1e-3)
    inputs = _inputs()
    with torch.no_grad():
        assert not model(**inputs).any()  # every code rounds to 0
    rng = torch.get_rng_state()
    assert _hf._spread_scalar_quantizers(model, inputs) == ["quantizer.project_in"]
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        z = model.quantizer.project_in(model.enc(inputs["x"]))
        assert float(z.std()) == pytest.approx(1.0, rel=1e-5)
        assert len(torch.unique(model(**inputs))) > 2  # the codes spread now


def test_a_projection_whose_codes_spread_is_left_alone():
    torch.manual_seed(0)
    model = _Codec(scale=30.0)
    before = [p.detach().clone() for p in model.parameters()]
    assert _hf._spread_scalar_quantizers(model, _inputs()) == []
    assert all(
        torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)
    )


def test_a_model_without_a_scalar_quantizer_is_not_run():
    model = torch.nn.Linear(4, 2)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert _hf._spread_scalar_quantizers(model, {"input": torch.randn(2, 4)}) == []
    assert calls == []
