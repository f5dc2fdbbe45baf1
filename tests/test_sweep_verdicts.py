"""Verdicts settled on the full hf:* sweep (issue 17; reports/findings.md sections
7-9): small models with each model family's pattern, not the transformers models
themselves (those are checked where that is quick, slow-marked).

* a detach that is the whole mismatch (D-FINE, DEIMv2, PP-DocLayout, RT-DETR, DAC):
  the finite-difference check confirms it with one more gradient taken with the
  detaches passing it; a wrong backward next to a detach is still a mismatch that
  the detaches do not explain;
* a step that saturates a steep path (D-FINE at a fresh init: gradients 1e17 next
  to 1): a correct function passes, a wrong gradient on it is still a mismatch;
* a torch.no_grad() region inside fn (PE-Audio's frozen DAC encoder) is named.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

pytestmark = pytest.mark.torch


def _f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ------------------------------------------- a detach that is the whole mismatch
class _DetachedReference(torch.nn.Module):
    """D-FINE / RT-DETR's pattern: the encoder proposes reference points, which the
    decoder reads detached (by design) while it also reads the encoder's features
    with the gradient. ``wrong``: a custom backward on the decoder path that scales
    its gradient by 1.01 (a real bug beside the designed detach)."""

    def __init__(self, detach=True, wrong=False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 6).double()
        self.ref_head = torch.nn.Linear(6, 2).double()
        self.decoder = torch.nn.Linear(8, 3).double()
        self.detach, self.wrong = detach, wrong

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        ref = torch.sigmoid(self.ref_head(h))
        if self.detach:
            ref = ref.detach()
        if self.wrong:
            h = _Scaled.apply(h)
        return self.decoder(torch.cat([h, ref], -1))


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 1.01 * g


def _check(model, x):
    return gradcheck.check_gradients(
        lambda: model(x).pow(2).mean(), params=model, seed=0
    )


def test_a_designed_detach_is_confirmed_as_the_whole_mismatch():
    model, x = _DetachedReference(), _f64(5, 4)
    before = rng_state()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = _check(model, x)
    assert_same_rng(before)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and p.grad is None, n
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "cause confirmed: with fn's 1 detach of tensors that require grad" in text
    assert "the detaches are the whole mismatch, not a wrong backward" in text
    assert (
        "Tensor.detach in _DetachedReference.forward (test_sweep_verdicts.py:" in text
    )
    # the counterfactual left no trace: the model's own graph still stops there
    model(x).pow(2).mean().backward()
    assert model.ref_head.weight.grad is None


def test_a_wrong_backward_beside_a_detach_is_not_explained_by_it():
    report = _check(_DetachedReference(wrong=True), _f64(5, 4))
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "cause confirmed" not in text
    assert "the detaches do not explain the whole mismatch" in text
    # a custom autograd.Function's forward runs grad-free: not a no_grad region
    assert "no_grad" not in text


def test_without_the_detach_it_passes_and_no_counterfactual_runs():
    report = _check(_DetachedReference(detach=False), _f64(5, 4))
    assert report.passed, report.message()
    assert "detach" not in report.message()


def test_the_planted_backward_bug_alone_is_a_mismatch_with_no_detach_note():
    report = _check(_DetachedReference(detach=False, wrong=True), _f64(5, 4))
    assert report.status == "mismatch", report.message()
    assert "detach" not in report.message()


# ------------------------------------------------ a step that saturates a steep path
class _SteepAndFlat(torch.nn.Module):
    """D-FINE at a fresh init: one path's gradient is ~1e12 (activations ~1e-16
    behind normalisations with var << eps multiply it by 1/sqrt(eps) each), the
    rest O(1). The probe direction divides the O(1) tensors by 1% of the largest
    gradient, so a step sized from their values alone moves the steep path far
    into saturation (tanh), where finite differences see a flat function.
    ``scale``: a planted bug multiplying the steep path's gradient."""

    def __init__(self, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.steep = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.flat = torch.nn.Linear(4, 3).double()
        self.scale = scale

    def forward(self, x):
        s = _Scaled2.apply(self.steep, self.scale) if self.scale != 1.0 else self.steep
        return torch.tanh(1e12 * s) + self.flat(x)


class _Scaled2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.k * g, None


@pytest.mark.parametrize("mode", ["full", "directional"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_steep_path_next_to_flat_ones_passes(dtype, mode):
    model, x = (
        _SteepAndFlat().to(getattr(torch, dtype)),
        _f64(5, 4).to(getattr(torch, dtype)),
    )
    proj = _f64(5, 3, seed=1).to(x.dtype)
    report = gradcheck.check_gradients(
        lambda: (model(x) * proj).sum(), params=model, seed=0, mode=mode
    )
    assert report.passed, report.message()


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_a_wrong_gradient_on_the_steep_path_is_still_a_mismatch(mode):
    model, x = _SteepAndFlat(scale=1.001), _f64(5, 4)
    proj = _f64(5, 3, seed=1)
    report = gradcheck.check_gradients(
        lambda: (model(x) * proj).sum(), params=model, seed=0, mode=mode
    )
    assert report.status == "mismatch", report.message()
    assert report.location is not None and report.location.tensor == "steep"


# ------------------------------------------------------------- a no_grad region
class _FrozenEncoder(torch.nn.Module):
    """PE-Audio's pattern: a frozen codec encoder run under torch.no_grad()."""

    def __init__(self, frozen=True):
        super().__init__()
        torch.manual_seed(0)
        self.codec = torch.nn.Linear(4, 4).double()
        self.head = torch.nn.Linear(4, 2).double()
        self.frozen = frozen

    def encode(self, x):
        return torch.tanh(self.codec(x))

    def forward(self, x):
        if self.frozen:
            with torch.no_grad():
                h = self.encode(x)
        else:
            h = self.encode(x)
        return self.head(h)


def test_a_no_grad_region_inside_fn_is_named_with_its_caller():
    model, x = _FrozenEncoder(), _f64(5, 4)
    report = _check(model, x)
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "fn turns grad mode off around tensors that require grad" in text
    assert "torch.no_grad() around" in text
    assert "called from _FrozenEncoder.forward (test_sweep_verdicts.py:" in text


def test_without_the_no_grad_region_it_passes():
    report = _check(_FrozenEncoder(frozen=False), _f64(5, 4))
    assert report.passed, report.message()
    assert "no_grad" not in report.message()


# ----------------------------------------------------------- the hf models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["rt_detr", "d_fine", "mm-grounding-dino"])
def test_hf_detection_detach_is_confirmed(model_type):
    pytest.importorskip("transformers")
    (report,) = gradcheck.check_model(
        f"hf:{model_type}", dtype="float64", properties="fd"
    )
    assert report.status == "mismatch", report.message()
    assert "cause confirmed" in report.message()


@pytest.mark.slow
def test_hf_pe_audio_encoder_names_its_no_grad():
    pytest.importorskip("transformers")
    (report,) = gradcheck.check_model(
        "hf:pe_audio_encoder", dtype="float64", properties="fd"
    )
    assert report.status == "mismatch", report.message()
    assert "PeAudioEncoderEmbedder.forward (modeling_pe_audio.py:" in (report.message())


# ------------------------------- where a float64 forward goes wrong (models.py)
class _DtypeLess(torch.nn.Module):
    """ProphetNet's and FastSpeech2's patterns in a float64 model: ``1.0 - mask``
    of an integer mask is float32 (torch's default dtype), times
    finfo(float64).min is 0 * -inf = NaN; a buffer made with dtype=torch.float
    meets the float64 decoder."""

    def __init__(self, kind):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4).double()
        self.kind = kind

    def forward(self, x, mask):
        h = self.proj(x)
        if self.kind == "mask":
            bias = (1.0 - mask[:, None, :]) * torch.finfo(h.dtype).min
            return torch.softmax(h @ h.transpose(-1, -2) + bias, -1)
        out = torch.zeros(h.shape, dtype=torch.float)  # as length_regulator
        out[:] = h
        return self.proj(out)


def test_forward_origin_names_the_producer_not_the_consumer():
    from gradcheck.backends._torch_kinks import forward_origin

    x, mask = _f64(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    masked, buffered = _DtypeLess("mask"), _DtypeLess("buffer")
    watch = forward_origin(lambda: masked(x, mask), torch.float64)
    assert watch.low is not None and watch.low.startswith("torch.__rsub__ in")
    assert "test_sweep_verdicts.py:" in watch.low and watch.low.endswith("-> float32")
    assert watch.nonfinite is not None and "Tensor.mul in" in watch.nonfinite
    watch = forward_origin(lambda: buffered(x, mask), torch.float64)
    assert watch.low is not None and watch.low.startswith("torch.zeros in")
    assert watch.nonfinite is None
    # a float64-clean forward: nothing to name
    clean = torch.nn.Linear(4, 4).double()
    watch = forward_origin(lambda: clean(x), torch.float64)
    assert watch.low is None and watch.nonfinite is None


def test_forward_origin_blames_only_what_reaches_the_failing_op():
    """A harmless float32 cast early on (RoPE's .float()) is not blamed for an op
    that refuses float64 itself; the buffer whose float32 reaches the failing op
    is, through the ops in between."""
    from gradcheck.backends._torch_kinks import forward_origin

    x = _f64(2, 3, 4)
    lin = torch.nn.Linear(4, 4).double()

    def refuses_float64():
        _ = x.float().sin()  # a harmless cast, re-cast or unused
        raise RuntimeError("this kernel has no float64")  # as grouped_mm on CPU

    watch = forward_origin(refuses_float64, torch.float64)
    assert watch.low is None, watch.low

    def op_refuses_float64():
        _ = x.float().sin()
        return torch.mm(x[0], torch.ones(5, 5, dtype=torch.float64))  # raises

    watch = forward_origin(op_refuses_float64, torch.float64)
    assert watch.raised and watch.low is None, watch.low

    def trips():
        _ = x.float().sin()
        buf = torch.zeros(x.shape, dtype=torch.float)
        buf[:] = x
        return lin(buf.transpose(0, 1).transpose(0, 1))

    watch = forward_origin(trips, torch.float64)
    assert watch.low is not None and watch.low.startswith("torch.zeros in"), watch.low


# ------------------- a straight-through quantizer with an 8-bit float scale (kolibri)
def _nvfp4_like(x):
    """Kolibri 1.1's ``nvfp4_fake_quantize`` in small: blocks of 4 scaled by their
    max / 6, the scale rounded through float8_e4m3fn (whose cast torch
    differentiates as an identity), magnitudes rounded to the E2M1 grid."""
    blocks = x.unflatten(-1, (-1, 4))
    scale = (blocks.abs().amax(-1, keepdim=True) / 6).clamp(2**-9, 448)
    scale = scale.to(torch.float8_e4m3fn).to(x.dtype)
    scaled = blocks / scale
    mag = scaled.abs().clamp(max=6)
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    return (torch.round(mag / step) * step).copysign(scaled).mul(scale).flatten(-2)


class _StraightThroughKeys(torch.nn.Module):
    """Kolibri 1.1's sparse layer: queries as computed, keys rounded with a
    straight-through gradient (``k + (q(k) - k).detach()``, by design). The
    function's derivative reaches the weights through the queries only (the
    rounded keys are piecewise constant); torch's gradient also through the keys,
    as if unrounded. ``wrong``: a custom backward scaling the query path's gradient
    by 1.01 (a real bug beside the designed straight-through)."""

    def __init__(self, wrong=False):
        super().__init__()
        torch.manual_seed(0)
        self.q = torch.nn.Linear(8, 8).double()
        self.k = torch.nn.Linear(8, 8).double()
        self.wrong = wrong

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.wrong:
            q = _Scaled.apply(q)
        k = k + (_nvfp4_like(k) - k).detach()
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ x


def test_a_straight_through_quantizer_with_a_float8_scale_is_confirmed():
    """Without holding the float8 cast the counterfactual passes the scale's
    gradient through it (torch's identity) and misses: 'do not explain' (the
    kolibri1_1 sweep rows before this was settled)."""
    model, x = _StraightThroughKeys(), _f64(6, 8)
    report = _check(model, x)
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "cause confirmed: with fn's 1 detach of tensors that require grad" in text
    assert "1 cast to an 8-bit float held constant" in text
    assert "Tensor.detach in _StraightThroughKeys.forward" in text


def test_a_wrong_backward_beside_a_straight_through_quantizer_is_not_explained():
    report = _check(_StraightThroughKeys(wrong=True), _f64(6, 8))
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "cause confirmed" not in text
    assert "the detaches do not explain the whole mismatch" in text


def test_pass_detach_holds_only_byte_float_casts_of_tensors_that_require_grad():
    from gradcheck.backends._torch_kinks import PassDetach

    x = _f64(4).requires_grad_(True)
    with PassDetach() as mode:
        held = x.to(torch.float8_e4m3fn)
        kept = x.to(torch.float32)
        plain = _f64(4).to(torch.float8_e5m2)  # no gradient to hold
        through = x.detach()
    assert mode.held == 1 and mode.passed == 1
    assert not held.requires_grad and kept.requires_grad and through.requires_grad
    assert plain.dtype == torch.float8_e5m2 and not plain.requires_grad


# ---------------------- selections by comparison, buffers filled in place (lightglue)
class _Selected(torch.nn.Module):
    """LightGlue / SuperPoint's patterns: scores kept where they pass a threshold
    (a comparison decides; one score sits 1e-6 from it, so the decision flips
    within the step), each row's best match picked by ``max(dim)``'s index, and
    the kept values written into a ``torch.zeros`` buffer made in torch's default
    dtype (float32), as SuperPoint pads its keypoints. ``wrong``: a custom
    backward scaling the score path's gradient by 1.01."""

    def __init__(self, x, wrong=False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 6)
        self.wrong = wrong
        with torch.no_grad():  # within any step of it (exactly on it: a kink)
            self.threshold = float(self.lin.double()(x.double())[0, 0]) * (1 + 1e-6)
            self.lin.float()

    def forward(self, x):
        s = self.lin(x)
        if self.wrong:
            s = _Scaled.apply(s)
        kept = torch.where(s > self.threshold, s, torch.zeros_like(s))
        best = s.max(-1)  # the index is the decision
        out = torch.zeros(x.shape[0], 7)  # default dtype: float32
        out[:, :6] = kept * 2.0
        out[:, 6] = best.values * (best.indices + 1)
        return out


def test_selections_are_held_and_a_buffer_filled_in_place_reaches_the_reference():
    """Before: the float64 reference wrote into a float64 copy of the float32
    buffer (all zero: the finite differences saw nothing, a mismatch at 99%) and
    the threshold flipped within the step (one-sided derivatives differ)."""
    x = _f64(5, 4).float()
    model = _Selected(x)
    proj = _f64(5, 7, seed=1).float()
    before = rng_state()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = gradcheck.check_gradients(
        lambda: (model(x) * proj).sum(), params=model, seed=0
    )
    assert_same_rng(before)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and p.grad is None, n
    assert report.passed, report.message()
    text = report.message()
    assert "decisions: fn selects with comparisons" in text
    assert "Tensor.gt in _Selected.forward" in text


def test_a_wrong_backward_on_a_held_selection_is_still_a_mismatch():
    x = _f64(5, 4).float()
    model = _Selected(x, wrong=True)
    proj = _f64(5, 7, seed=1).float()
    report = gradcheck.check_gradients(
        lambda: (model(x) * proj).sum(), params=model, seed=0
    )
    assert report.status == "mismatch", report.message()


def test_the_float64_reference_keeps_in_place_writes_into_float32_tensors():
    from gradcheck.backends.torch import _PromoteToFloat64

    src = _f64(3)
    kept = torch.zeros(3, dtype=torch.float32)  # made before the mode
    with _PromoteToFloat64():
        fresh = torch.zeros(3)  # torch's default dtype: float64 here
        fresh[:] = src
        kept[:] = src
        kept.add_(1.0)
    assert fresh.dtype == torch.float64 and torch.equal(fresh, src)
    assert kept.dtype == torch.float32
    assert torch.equal(kept, (src.float() + 1.0))


# -------------------------- a detach in a model whose reference is noisy (grounding-dino)
class _Rounded(torch.autograd.Function):
    """Noise the float64 reference cannot lift: the value rounded to 12 decimals
    in NumPy (Grounding DINO's reference scatters by ~1e-12 the same way, from
    its depth); the backward is the identity, the unrounded derivative."""

    @staticmethod
    def forward(ctx, x):
        import numpy as np

        return torch.from_numpy(np.round(x.detach().numpy(), 12))

    @staticmethod
    def backward(ctx, g):
        return g


class _NoisyDetachedReference(_DetachedReference):
    def forward(self, x):
        return _Rounded.apply(super().forward(x))


@pytest.mark.parametrize("wrong", [False, True])
def test_the_detach_counterfactual_allows_the_differences_measured_noise(wrong):
    """Without the measured noise the counterfactual missed by 2.3e-05 against a
    Richardson error of 1.2e-05 ("do not explain ... a mismatch of its own", as
    grounding-dino's 1.6x); a 1.01 wrong backward beside the detach stays
    unexplained."""
    model, x = _NoisyDetachedReference(wrong=wrong), _f64(5, 4)
    report = _check(model, x)
    assert report.status == "mismatch", report.message()
    text = report.message()
    if wrong:
        assert "cause confirmed" not in text
        assert "the detaches do not explain the whole mismatch" in text
    else:
        assert "cause confirmed: with fn's 2 detaches" in text
        assert "with the differences' measured noise" in text
