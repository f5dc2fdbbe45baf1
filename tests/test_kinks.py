"""Many units exactly on kinks at once (issue 10, item 2).

At a fresh initialisation whose activations vanish (BatchNorm's zero bias after an
all-zero input feeding ReLU6, as in transformers' MobileNetV2), many units sit
exactly on a kink. The framework's subgradient then need not lie between the
one-sided derivatives along the probe direction, so neither "between" nor
"outside" decides. The check re-runs at a nearby point where the function is
smooth: a correct backward gives `nondifferentiable` (with the census of kinks and
the nearby verdict), a wrong one stays a `mismatch`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402

pytestmark = pytest.mark.torch


_Scale = scaled_backward(1e-3)


class Kinked(torch.nn.Module):
    """A conv-BN-ReLU6 block on an input with all-zero channels: with BatchNorm's
    fresh statistics and zero bias every unit fed by them sits exactly on ReLU6's
    kink at 0; a head on top carries the loss."""

    def __init__(self, planted: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.act = torch.nn.ReLU6()
        self.mix = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 4)
        self.planted = planted

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        h = torch.tanh(self.mix(h))
        if self.planted:
            h = _Scale.apply(h)
        return self.head(h.mean((2, 3)))


def _case(dtype, planted=False, seed=0):
    torch.manual_seed(seed)
    model = Kinked(planted).to(dtype).eval()
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    x[:, :, :3] = 0.0  # half of every image is zero: those units sit on the kink
    y = torch.randn(4, 4, dtype=dtype)

    def loss():
        out = model(x)
        return torch.nn.functional.mse_loss(out, y) + 0.3 * out.pow(2).mean()

    return model, loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_exact_kinks_with_a_correct_backward_are_nondifferentiable(dtype):
    model, loss = _case(dtype)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "nondifferentiable", report.message()
    text = " ".join(report.notes)
    assert "nearby point" in text and "matches finite differences" in text, text
    # the census names the place and the count (torch backend)
    assert "sit exactly on a kink" in text and "act" in text, text


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_wrong_backward_at_many_kinks_is_still_a_mismatch(dtype):
    model, loss = _case(dtype, planted=True)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()
    assert "nearby point" in " ".join(report.notes)
    assert report.location is not None
    assert report.location.tensor.startswith(("conv", "bn", "mix")), report.message()


def test_the_census_counts_units_exactly_on_a_kink():
    from gradcheck.backends._torch_kinks import KinkCensus, module_names

    model, _ = _case(torch.float64)
    x = torch.zeros(2, 3, 6, 6, dtype=torch.float64)
    with KinkCensus(module_names([model])) as census, torch.no_grad():
        model(x)
    rows = {where: (n, size) for where, n, size in census.rows()}
    # all-zero input, fresh BatchNorm (mean 0, bias 0): every ReLU6 input is 0
    assert rows == {"act": (2 * 16 * 6 * 6, 2 * 16 * 6 * 6)}


def test_checks_leave_the_model_untouched_on_the_nearby_path():
    model, loss = _case(torch.float32, planted=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    gradcheck.check_gradients(loss, params=model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.grad for p in model.parameters()] == grads
    assert not model.training


class NearKinks(torch.nn.Module):
    """Units a hair (~3e-7 of their scale) away from ReLU's kink: the usual
    finite-difference step (~6e-6 of the scale in float64) crosses them, so the
    differences do not converge at x although the function is differentiable
    there (issue 10 item 3: deep ReLU stacks)."""

    def __init__(self, planted: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(8, 64)
        self.out = torch.nn.Linear(64, 3)
        self.planted = planted

    def forward(self, x):
        h = torch.relu(self.lin(x))
        if self.planted:
            h = _Scale.apply(h)
        return self.out(h)


def _near_case(dtype, planted=False):
    torch.manual_seed(0)
    model = NearKinks(planted).to(dtype).eval()
    x = torch.randn(16, 8, dtype=dtype)
    with torch.no_grad():  # put every first-row unit 3e-7 off its kink
        pre = x[0] @ model.lin.weight.T
        offset = 3e-7 * torch.sign(torch.randn(64, dtype=dtype))
        model.lin.bias.copy_(-pre + offset)
    y = torch.randn(16, 3, dtype=dtype)

    def loss():
        return torch.nn.functional.mse_loss(model(x), y)

    return model, loss


def test_differences_that_cross_near_kinks_converge_at_smaller_steps():
    model, loss = _near_case(torch.float64)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "passed", report.message()
    assert any("smaller steps" in n or "nearby point" in n for n in report.notes)


def test_a_wrong_backward_near_kinks_is_a_mismatch():
    model, loss = _near_case(torch.float64, planted=True)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()


# ------------------------------------- normalisations over a flat input (neucodec)
def test_flat_norms_counts_groups_with_zero_input_variance():
    """NeuCodec's decoder at a fresh init: every frame the same latent, so its
    one-channel GroupNorm groups see variance 0 (slope 1/sqrt(eps), gradients
    1e17 downstream). The LayerNorm after it normalises those rows again (the
    GroupNorm made them 0: flat too); the other rows have a spread."""
    from gradcheck.backends._torch_kinks import FlatNorms, module_names

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.GroupNorm(4, 4, eps=1e-6), torch.nn.LayerNorm(6)
    ).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    x[0, :2] = 1.5  # two channels of sample 0 constant over time
    with FlatNorms(module_names([model])) as census:
        model(x)
    assert census.rows() == [("0", 2, 8), ("1", 2, 8)]


def test_a_mismatch_at_flat_norms_names_them():
    """A wrong backward (x1.1) in a model whose GroupNorm reads a constant (its
    bias broadcast over time): the mismatch stays, and the note names the flat
    normalisation as what makes gradients there huge."""
    wrong = scaled_backward(0.1).apply

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = torch.nn.Linear(3, 4).double()
            self.norm = torch.nn.GroupNorm(4, 4, eps=1e-6).double()

        def forward(self, x):
            flat = self.inp.bias[None, :, None].expand(1, 4, 5)
            return self.norm(flat).sum() + wrong(self.inp(x)).pow(2).sum()

    model, x = Flat(), torch.randn(5, 3, dtype=torch.float64)
    report = gradcheck.check_gradients(
        lambda: model(x), params=model, seed=0, mode="directional"
    )
    assert report.status == "mismatch", report.message()
    assert "4 normalisation groups see an input of (near) zero variance" in (
        report.message()
    ), report.message()
    assert "'norm' (4 of 4)" in report.message()
