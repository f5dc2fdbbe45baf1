"""A float64 model that computes in float32 inside (issue 17: RMSNorm's
`hidden_states.to(torch.float32)` in llama/qwen2/mistral, T5's variance): its
float64 gradient carries float32 rounding. The check says so and judges it in two
steps (no false alarm): the cast-free float64 gradient (the backward of the
reference evaluations' forward, where those casts run in float64) against the
finite differences at float64 precision, so a bug on every path is caught at
float64 sensitivity (1e-7); the model's own gradient against the cast-free one on
its measured float32 rounding, so a bug on the float32 path only is caught at
float32 sensitivity."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

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


def _case(cast=True, planted=False, delta=1e-3):
    scale = scaled_backward(delta)
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
            h = scale.apply(h)
        return model["out"](model["norm2"](h)).pow(2).mean()

    return model, loss


def test_float64_model_computing_in_float32_inside_passes_on_its_cast_free_gradient():
    # judged at float64's rounding its own gradient is a false alarm (error 6.1e-07
    # > tolerance 1.8e-07 with the watch switched off); the cast-free one is not
    model, loss = _case()
    report = gradcheck.check_gradients(loss, params=model)
    assert report.passed, report.message()
    assert "computes in float32 internally (" in report.message()
    assert "norm" in report.message()
    assert "cast-free float64 gradient" in report.tolerance_reason
    assert "float64 1e-10" in report.tolerance_reason
    assert any("within its measured float32 rounding" in n for n in report.notes)


def test_a_wrong_backward_in_such_a_model_is_still_a_mismatch():
    model, loss = _case(planted=True)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()


@pytest.mark.parametrize("delta", [1e-6, 1e-7])
def test_a_bug_on_every_path_is_caught_at_float64_sensitivity(delta):
    model, loss = _case(planted=True, delta=delta)
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.status == "mismatch", report.message()
    assert any("on every precision's path" in n for n in report.notes)


def test_judged_at_float32_precision_a_1e_7_bug_would_pass(monkeypatch):
    """Why the cast-free gradient is judged: on the model's own gradient (float32
    precision, as before) a 1e-7 bug on every path passes."""
    from gradcheck.properties import finite_difference as F

    monkeypatch.setattr(F, "_cast_free_applies", lambda s, o: False)
    model, loss = _case(planted=True, delta=1e-7)
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.status == "passed", report.message()


class _Float32PathBug(RMSNorm):
    """RMSNorm whose float32 section holds a backward off by delta for float32
    gradients only: the cast-free (float64) path is right."""

    def __init__(self, n, delta):
        super().__init__(n)
        self.fn = scaled_backward(delta, only_float32=True)

    def forward(self, h):
        dtype = h.dtype
        h = self.fn.apply(h.to(torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


def _float32_path_case(delta):
    torch.manual_seed(0)
    norm = _Float32PathBug(64, delta) if delta else RMSNorm(64)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), norm, torch.nn.Tanh(), torch.nn.Linear(64, 4)
    ).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    return model, lambda: model(x).pow(2).mean()


def test_a_bug_on_the_float32_path_only_is_caught_against_the_cast_free_gradient():
    model, loss = _float32_path_case(None)
    assert gradcheck.check_gradients(loss, params=model, seed=0).passed
    model, loss = _float32_path_case(1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = rng_state()
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.status == "mismatch", report.message()
    assert report.location is not None and report.location.tensor == "0.bias"
    assert any("a bug on the float32 code path only" in n for n in report.notes)
    # the user's state is bit-identical after the failing check
    assert_same_rng(rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training


def test_a_pure_float64_model_keeps_float64_precision():
    model, loss = _case(cast=False)
    report = gradcheck.check_gradients(loss, params=model)
    assert report.passed, report.message()
    assert "internally" not in report.message()
    assert "float64 1e-10" in report.tolerance_reason


def test_no_cast_free_gradient_falls_back_to_float32_precision(monkeypatch):
    """A backward that cannot run on float64 copies (a custom backward building
    float32 tensors) leaves no cast-free gradient: the check is judged at float32
    precision as before, and says why."""
    from gradcheck.backends.torch import TorchSession
    from gradcheck.errors import ReferencePrecisionError

    native = TorchSession.gradients_at

    def no_promoted(self, cotangent_sets, *, promote, handle=None, t=0.0):
        if promote:
            raise ReferencePrecisionError("the backward pass through fn raised")
        return native(self, cotangent_sets, promote=False, handle=handle, t=t)

    monkeypatch.setattr(TorchSession, "gradients_at", no_promoted)
    model, loss = _case()
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.passed, report.message()
    assert "cast-free" not in report.tolerance_reason
    assert any(
        "could not be taken" in n and "judged at float32 precision" in n
        for n in report.notes
    )
    assert any(
        "judged at float32 precision (its float64 gradient" in n for n in report.notes
    )


def test_a_vision_tower_computing_in_float32_inside_passes_in_float64():
    """hf:qwen3_5_vision (rotary embedding and attention in float32 inside a
    float64 model): its own gradient sat at 1.3x its measured float32 rounding
    from the cast-free float64 gradient (a false alarm of the cast-free
    judgement's step 2); judged at float32 precision against the finite
    differences it passes, so the check passes and says why."""
    pytest.importorskip("transformers")
    from gradcheck import models

    checker = models.Checker("hf:qwen3_5_vision")
    checker.build()
    report = checker.run("fd", "float64")
    assert report.status == "passed", report.message()
