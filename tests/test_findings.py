"""Verdicts that need words (issue 17; written up in reports/findings.md). Each
finding has a minimal model with the bug (the verdict, and the words that name the
place) and the same model without it (passed, no such words); the transformers
models the findings come from are checked too where that is quick."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

pytestmark = pytest.mark.torch


def _f64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------ yoso: a wrong backward
def _yoso():
    yoso = pytest.importorskip("transformers.models.yoso.modeling_yoso")
    return yoso.YosoCumulation


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def test_yoso_cumulation_backward_is_not_its_derivative():
    """transformers' YosoCumulation (use_expectation=True, the default) returns
    hash_code_len/2 * E * k as the query gradient; the derivative of its forward
    (1 - acos(q.k)/pi)**tau is tau (1 - acos/pi)**(tau-1) / (pi sqrt(1-(q.k)^2)) k.
    gradcheck names the query (and key), and value, whose backward is exact,
    passes on its own."""
    cumulation = _yoso()
    mask = torch.ones(2, 5, dtype=torch.float64)
    cfg = {"hash_code_len": 8}
    q, k = _unit(_f64(2, 5, 4, seed=1)), _unit(_f64(2, 5, 4, seed=2))
    v = _f64(2, 5, 4, seed=3)

    def attend(q, k, v):
        return cumulation.apply(mask, mask, _unit(q), _unit(k), v, cfg)

    q.requires_grad_(True)
    report = gradcheck.check_gradients(attend, (q, k, v), seed=0)
    assert report.status == "mismatch", report.message()
    assert report.location is not None and report.location.tensor == "inputs[0]"
    q.requires_grad_(False)
    k.requires_grad_(True)
    report = gradcheck.check_gradients(attend, (q, k, v), seed=0)
    assert report.status == "mismatch", report.message()
    k.requires_grad_(False)
    v.requires_grad_(True)
    assert gradcheck.check_gradients(attend, (q, k, v), seed=0).passed


def test_a_correct_custom_function_passes_without_a_suspect_note():
    from tests.torch_models import Square

    x = _f64(6).requires_grad_(True)
    report = gradcheck.check_gradients(lambda x: Square.apply(x).sum(), (x,))
    assert report.passed, report.message()
    assert "custom autograd.Function" not in report.message()


def test_hf_yoso_is_a_mismatch_naming_the_custom_backward():
    pytest.importorskip("transformers")
    (report,) = list(
        gradcheck.check_model("hf:yoso", dtype="float64", properties="fd", timeout=None)
    )
    assert report.status == "mismatch", report.message()
    assert report.location is not None and report.location.tensor
    assert "YosoCumulation (transformers.models.yoso.modeling_yoso)" in (
        report.message()
    )


# ------------------------------------------- longformer: NaN gradient, finite loss
def _masked_softmax_loss(low: bool):
    """Longformer's pattern: a float64 model adds finfo(float64).min to masked
    scores, takes the softmax in float32 (-inf for a fully masked row: NaN
    probabilities), then zeroes the masked rows. The loss is finite; the softmax's
    backward multiplies 0 by NaN. ``low=False``: the softmax in float64."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 4).double()
    x = _f64(3, 4)
    masked = torch.tensor([False, True, False])
    add = torch.zeros(3, 4, dtype=torch.float64)
    add[masked] = torch.finfo(torch.float64).min

    def loss():
        scores = proj(x) + add
        p = torch.softmax(scores, -1, dtype=torch.float32 if low else None)
        p = p.to(torch.float64).masked_fill(masked[:, None], 0.0)
        return (p * x).sum()

    return proj, loss


def test_nan_gradient_of_a_finite_loss_names_the_place():
    model, loss = _masked_softmax_loss(low=True)
    assert math.isfinite(float(loss().detach()))
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.status == "mismatch", report.message()
    text = report.message()
    tensor, index = report.location.tensor, report.location.index
    origin = "softmax" if "softmax" in text else None
    assert tensor == "weight"
    assert index is not None and len(index) == 2
    assert origin is not None and "softmax" in origin
    assert "'weight' has" in text and "NaN" in text and "softmax" in text


def test_the_same_masking_with_a_float64_softmax_passes():
    model, loss = _masked_softmax_loss(low=False)
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.passed, report.message()


def test_hf_longformer_float64_nan_gradient_names_the_attention_softmax():
    pytest.importorskip("transformers")
    (report,) = list(
        gradcheck.check_model(
            "hf:longformer", dtype="float64", properties="fd", timeout=None
        )
    )
    text = report.message()
    assert report.status in ("mismatch", "error"), text  # error: until the lead's
    assert "embeddings.word_embeddings.weight" in text
    assert "softmax" in text and "attention.self" in text


# ------------------------------------------------ vit_mae: random masks in eval
class _RandomMask(torch.nn.Module):
    """ViT-MAE's random_masking: keep a random half of the tokens, drawn with
    torch.rand in every forward (also in eval)."""

    def __init__(self, generator=None):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        self.generator = generator

    def random_masking(self, h):
        if self.generator is not None:
            self.generator.manual_seed(0)  # the same mask at every call
        noise = torch.rand(h.shape[0], generator=self.generator, dtype=h.dtype)
        keep = torch.argsort(noise)[: h.shape[0] // 2]
        return h[keep]

    def forward(self, x):
        return self.random_masking(torch.tanh(self.lin(x))).pow(2).sum()


def test_random_masking_in_eval_is_nondeterministic_naming_the_call():
    model, x = _RandomMask().eval(), _f64(8, 4)
    rng = rng_state()
    report = gradcheck.check_gradients(lambda: model(x), params=model, seed=0)
    assert_same_rng(rng)
    assert report.status == "nondeterministic", report.message()
    assert "torch.rand in _RandomMask.random_masking (test_findings.py:" in (
        report.message()
    )


def test_a_seeded_mask_is_deterministic_and_passes():
    model, x = _RandomMask(torch.Generator()).eval(), _f64(8, 4)
    report = gradcheck.check_gradients(lambda: model(x), params=model, seed=0)
    assert report.passed, report.message()
    assert "random number generator" not in report.message()


def test_hf_vit_mae_is_nondeterministic_naming_random_masking():
    pytest.importorskip("transformers")
    (report,) = list(
        gradcheck.check_model(
            "hf:vit_mae", dtype="float32", properties="fd", timeout=None
        )
    )
    assert report.status == "nondeterministic", report.message()
    text = report.message()
    assert "torch.rand in ViTMAEEmbeddings.random_masking (modeling_vit_mae.py:" in text
    assert "module 'embeddings')" in text


# -------------------------------------- fastspeech2_conformer: a designed detach
class _DetachedPredictor(torch.nn.Module):
    """FastSpeech2's pattern: a predictor reads the encoder's output detached
    (trained on a stopped input) and its prediction is added back."""

    def __init__(self, detach=True):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 4).double()
        self.predictor = torch.nn.Linear(4, 4).double()
        self.detach = detach

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        p = self.predictor(h.detach() if self.detach else h)
        return h, p


def _heads(model, x):
    losses = {
        "main": lambda: model(x)[0].pow(2).mean(),
        "pitch": lambda: model(x)[1].pow(2).mean(),
    }
    w = {"main": 0.5, "pitch": 0.25}

    def total():
        h, p = model(x)
        return 0.5 * h.pow(2).mean() + 0.25 * p.pow(2).mean()

    return total, losses, w


def test_locality_names_the_detach_that_cuts_the_path():
    model, x = _DetachedPredictor(), _f64(6, 4)
    total, losses, w = _heads(model, x)
    expected = {
        n: ["main", "pitch"] if "encoder" in n else ["pitch"]
        for n, _ in model.named_parameters()
    }
    report = gradcheck.check_locality(
        total, losses, w, expected=expected, params=model, seed=0
    )
    assert report.status == "mismatch", report.message()
    assert "Tensor.detach in _DetachedPredictor.forward (test_findings.py:" in (
        report.message()
    )


def test_without_the_detach_locality_passes_and_names_none():
    model, x = _DetachedPredictor(detach=False), _f64(6, 4)
    total, losses, w = _heads(model, x)
    expected = {
        n: ["main", "pitch"] if "encoder" in n else ["pitch"]
        for n, _ in model.named_parameters()
    }
    report = gradcheck.check_locality(
        total, losses, w, expected=expected, params=model, seed=0
    )
    assert report.passed, report.message()
    assert "detaches" not in report.message()


# ------------------------------------------------- a float64 model in float32 inside
def test_float64_model_computing_in_float32_says_so_in_those_words():
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))

        def forward(self, h):
            low = h.to(torch.float32)  # as LlamaRMSNorm does
            low = low * torch.rsqrt(low.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.w * low.to(h.dtype)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8).double(), Norm())
    x = _f64(5, 4)
    report = gradcheck.check_gradients(
        lambda: model(x).pow(2).mean(), params=model, seed=0
    )
    assert report.passed, report.message()
    assert (
        "this model computes in float32 internally (1): judged at float32 precision"
        in report.message()
    )


# ------------------- float64 in models that hard-code float32 (sections 9 and 10)
class _Regulated(torch.nn.Module):
    """FastSpeech2Conformer's inference path: transformers' own length_regulator
    (its buffer is torch.zeros(..., dtype=torch.float)) between two float layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 4)
        self.decoder = torch.nn.Conv1d(4, 4, 1)

    def forward(self, x):
        fs2 = pytest.importorskip(
            "transformers.models.fastspeech2_conformer.modeling_fastspeech2_conformer"
        )
        h = fs2.length_regulator(self.encoder(x), torch.tensor([[1, 2, 1]]))
        return self.decoder(h.transpose(1, 2))


class _MaskedEncoder(torch.nn.Module):
    """ProphetNet's mask: (1.0 - int mask) is float32 whatever the model's dtype;
    times finfo(float64).min it is 0 * -inf = NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, attention_mask):
        h = self.proj(x)
        bias = (1.0 - attention_mask[:, None, :]) * torch.finfo(h.dtype).min
        return torch.softmax(h @ h.transpose(-1, -2) + bias, -1) @ h


def test_length_regulator_float32_buffer_is_caught_in_float64():
    model, x = _Regulated(), torch.randn(1, 3, 4)
    f32, f64 = gradcheck.check_model(
        model, inputs=(x,), dtype="float32,float64", properties="fd"
    )
    assert f32.passed, f32.message()
    assert f64.status == "error", f64.message()
    assert "forward raises in float64, though it runs in float32" in f64.message()


def test_dtype_less_mask_gives_nan_in_float64_and_is_caught():
    model = _MaskedEncoder()
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    f32, f64 = gradcheck.check_model(
        model,
        inputs={"x": x, "attention_mask": mask},
        dtype="float32,float64",
        properties="fd",
    )
    assert f32.passed, f32.message()
    assert f64.status == "error", f64.message()
    assert "output is not finite" in f64.message()
