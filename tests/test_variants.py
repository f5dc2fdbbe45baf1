"""gradcheck.check_variants: gradients under torch.compile, autocast and other
devices against eager execution, with a tolerance measured from the variant's
rounding. Correct models pass; a model wrong only under one variant is caught and
named; GPU variants are skipped without a GPU; the user's state is left exactly."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

import gradcheck
from gradcheck.properties.variants import Variant, judge_tensor, parse_variant
from tests._state import assert_same_rng, rng_state

torch = pytest.importorskip("torch")

from tests.torch_models import Square  # noqa: E402

nn = torch.nn
F = torch.nn.functional

HAS_GPU = torch.cuda.is_available()


# ---------------------------------------------------------------- models
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.head(F.gelu(self.bn(self.conv(x))).flatten(1))


class _Block(nn.Module):
    """A tiny pre-norm transformer block with a classifier head."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.norm2(x))
        return self.head(x.mean(1))


class _WrongUnderAutocast(nn.Module):
    """Scales the gradient through its hidden layer by 1.1 only under autocast (a
    loss-scale factor not undone); the value is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 16)
        self.outer = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        if torch.is_autocast_enabled(x.device.type):
            h = h * 1.1 - h.detach() * 0.1
        return self.outer(h)


class _WrongUnderCompile(nn.Module):
    """Scales the gradient through its hidden layer by 1 + 1e-3 only when compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 16)
        self.outer = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        if torch.compiler.is_compiling():
            h = h * (1 + 1e-3) - h.detach() * 1e-3
        return self.outer(h)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batch(shape=(8, 6)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g), torch.randint(
        0, 3, (shape[0],), generator=g
    )


AUTOCAST = ("autocast:bfloat16", "autocast:float16")


# ---------------------------------------------------------------- parsing
def test_parse_variants():
    assert parse_variant("compile") == Variant("compile", compiled=True)
    v = parse_variant("cuda+autocast:float16")
    assert (v.device, v.autocast, v.compiled) == ("cuda", "float16", False)
    v = parse_variant("compile + cuda:1 + autocast:bf16")
    assert (v.device, v.autocast, v.compiled) == ("cuda:1", "bfloat16", True)
    assert parse_variant("xla").xla
    for bad in ("", "jit", "autocast:int8", "cuda:x", "compile+compile", "xla+compile"):
        with pytest.raises(gradcheck.InvalidArgumentError):
            parse_variant(bad)


def test_bad_arguments_are_clear_errors():
    model, batch = _mlp(), _batch()
    with pytest.raises(gradcheck.InvalidArgumentError, match="unknown part"):
        gradcheck.check_variants(_ce, model, batch, variants="fast")
    with pytest.raises(gradcheck.InvalidArgumentError, match="twice"):
        gradcheck.check_variants(_ce, model, batch, variants=("compile", "compile"))
    with pytest.raises(
        gradcheck.UnsupportedInputError, match="TensorFlow's jit_compile"
    ):
        gradcheck.check_variants(_ce, model, batch, variants="xla")
    with pytest.raises(gradcheck.UnsupportedInputError, match="callable"):
        gradcheck.check_variants(3, model, batch, variants="autocast")
    with pytest.raises(gradcheck.UnsupportedInputError, match="torch.nn.Module, a"):
        gradcheck.check_variants(_ce, object(), batch, variants="autocast")


# ---------------------------------------------------------------- correct models pass
@pytest.mark.parametrize(
    "make, batch",
    [
        (_mlp, _batch()),
        (_Conv, _batch((4, 2, 5, 5))),
        (_Block, _batch((3, 5, 8))),
    ],
    ids=["mlp", "conv", "transformer"],
)
def test_correct_models_pass_autocast(make, batch):
    torch.manual_seed(0)
    model = make()
    report = gradcheck.check_variants(_ce, model, batch, variants=AUTOCAST)
    assert report.passed, report.message()
    assert report.property == "variants"
    assert report.reference_dtype == "float64"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [t.name for t in report.tensors] == [
        f"{v}/{n}" for v in AUTOCAST for n in names
    ]
    assert all(t.status == "passed" for t in report.tensors)
    assert {t.dtype for t in report.tensors} == {"bfloat16", "float16"}
    for v in AUTOCAST:
        assert any(f"variant '{v}'" in n and "passed" in n for n in report.notes)
    assert report.cost["compile_seconds"] == 0.0
    assert report.cost["seconds"] > 0


class _Embed(nn.Module):
    """Token embeddings, LayerNorm, a dense layer and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.lin(self.norm(self.emb(tokens)))).mean(1))


def _seeded(kind: str, seed: int):
    g = torch.Generator().manual_seed(100 + seed)
    y = torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
        )
        return model, (torch.randn(6, 6, generator=g), y)
    if kind == "conv":
        return _Conv(), (torch.randn(6, 2, 5, 5, generator=g), y)
    if kind == "attention":
        return _Block(), (torch.randn(6, 5, 8, generator=g), y)
    return _Embed(), (torch.randint(0, 20, (6, 7), generator=g), y)


KINDS = ("mlp", "conv", "attention", "embedding")


@pytest.mark.parametrize("kind", KINDS)
def test_correct_models_pass_autocast_on_several_seeds(kind):
    """No false alarm: the per-tensor tolerance (no whole-gradient allowance)
    holds every correct model of each kind on three seeds, bfloat16 and
    float16."""
    for seed in range(3):
        model, batch = _seeded(kind, seed)
        report = gradcheck.check_variants(
            _ce, model, batch, variants=AUTOCAST, seed=seed
        )
        assert report.passed, (kind, seed, report.message())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_correct_models_pass_compile_on_several_seeds(kind):
    for seed in range(2):
        model, batch = _seeded(kind, seed)
        report = gradcheck.check_variants(
            _ce, model, batch, variants=("compile", "compile+autocast:bfloat16")
        )
        assert report.passed, (kind, seed, report.message())


class _AuxHead(nn.Module):
    """A trunk with a classifier and an auxiliary head whose loss weight is
    small, so its layer holds well under 1% of the gradient's norm. ``rel``:
    the auxiliary layer's gradient is (1 + rel)x only under autocast."""

    def __init__(self, rel: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.big = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)
        self.aux = nn.Linear(64, 4)
        self.rel = rel

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.big(x))))
        w, b = self.aux.weight, self.aux.bias
        if self.rel and torch.is_autocast_enabled(x.device.type):
            w = w * (1 + self.rel) - w.detach() * self.rel
            b = b * (1 + self.rel) - b.detach() * self.rel
        return self.head(h), F.linear(h, w, b)


def _aux_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(16, 32, generator=g),
        torch.randint(0, 3, (16,), generator=g),
        torch.randn(16, 4, generator=g),
    )


def _aux_loss(model, batch, weight=0.003):
    logits, aux = model(batch[0])
    return F.cross_entropy(logits, batch[1]) + weight * F.mse_loss(aux, batch[2])


@pytest.mark.parametrize("variant", AUTOCAST)
@pytest.mark.parametrize("seed", [0, 1])
def test_ten_percent_off_in_a_small_layer_is_caught(variant, seed):
    """The aux layer holds < 1% of the gradient's norm; its gradient 10% off only
    under autocast fails there (it passed at 0.01x / 0.07x of the tolerance when
    the allowance was one ulp of the whole gradient), and names that layer; the
    correct model passes."""
    ok = gradcheck.check_variants(
        _aux_loss, _AuxHead(0.0, seed), _aux_batch(seed), variants=variant, seed=0
    )
    assert ok.passed, ok.message()
    norms = {t.name.split("/")[1]: t.grad_norm for t in ok.tensors}
    aux = np.hypot(norms["aux.weight"], norms["aux.bias"])
    assert aux < 0.01 * np.sqrt(sum(n * n for n in norms.values()))
    bad = gradcheck.check_variants(
        _aux_loss, _AuxHead(0.1, seed), _aux_batch(seed), variants=variant, seed=0
    )
    assert bad.status == "mismatch", bad.message()
    failed = {t.name.split("/")[1] for t in bad.tensors if t.status == "mismatch"}
    assert "aux.weight" in failed and failed <= {"aux.weight", "aux.bias"}
    assert bad.location.tensor in ("aux.weight", "aux.bias")


class _L1Penalty(nn.Module):
    """An L1 activity penalty whose +-c cotangents cancel exactly in the bias's
    sum (inputs in pairs of opposite sign, bias 0), beside a head weighted 1e-6:
    the bias's true gradient is the head's ~1e-7, which bfloat16 and float16
    absorb into the c's (and the c's cancel to 0) in every evaluation alike -
    what a generated audit model hit (32x its tolerance)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(1, 4)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.inner.bias.zero_()

    def forward(self, x):
        h = self.inner(x)
        return self.head(h.mean(1)), h


def _l1_loss(model, batch):
    out, h = model(batch[0])
    return 0.0625 * h.abs().sum() / h.shape[0] + 1e-6 * F.mse_loss(out, batch[1])


def _l1_batch(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(4, 3, 1, generator=g) + 0.5
    return torch.cat([v, -v], 1), torch.randn(4, 1, generator=g)


def test_terms_that_cancel_exactly_are_measured(monkeypatch):
    """The float64 backward with every cotangent made |g| x random sign gives
    the size of the terms 'inner.bias' sums (the c's): one ulp of it is the
    rounding that absorbed the head's share. Without it (patched out) the
    correct model fails; with it, it passes on every seed."""
    from gradcheck.properties import variants as pv

    for seed in range(2):
        report = gradcheck.check_variants(
            _l1_loss, _L1Penalty(), _l1_batch(seed), variants=AUTOCAST
        )
        assert report.passed, report.message()
    own = pv._own

    def without_magnitude(driver, ref, seed):
        own(driver, ref, seed)
        ref.magnitude = None

    monkeypatch.setattr(pv, "_own", without_magnitude)
    bare = gradcheck.check_variants(
        _l1_loss, _L1Penalty(), _l1_batch(0), variants="autocast:bfloat16"
    )
    assert bare.status == "mismatch" and bare.location.tensor == "inner.bias"


class _PositiveOnly(Square):
    """y = x^2 whose backward refuses a negative cotangent (as a custom kernel
    may): the rewritten cotangents of the magnitude pass are refused."""

    @staticmethod
    def backward(ctx, g):
        if (g < 0).any():
            raise RuntimeError("negative cotangent")
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_a_backward_that_refuses_the_magnitude_pass_is_judged_without_it():
    model = _mlp()
    report = gradcheck.check_variants(
        lambda m, b: _PositiveOnly.apply(m(b[0])).sum(),
        model,
        _batch(),
        variants="autocast:bfloat16",
    )
    assert report.passed, report.message()
    assert any(
        "could not be measured" in n and "negative cotangent" in n for n in report.notes
    ), report.notes


def test_float16_underflow_passes_with_a_note():
    """An auxiliary loss weighted 1e-6: its layer's gradients (~1e-8) are below
    float16's range and come out flushed under autocast:float16, the same in
    every evaluation. Measured with the loss scaled, they pass with a note that
    says so; bfloat16 (float32's range) has no such note."""
    model, batch = _AuxHead(0.0, 0), _aux_batch(0)
    report = gradcheck.check_variants(
        lambda m, b: _aux_loss(m, b, weight=1e-6), model, batch, variants=AUTOCAST
    )
    assert report.passed, report.message()
    notes = [n for n in report.notes if "underflow" in n]
    assert len(notes) == 1 and "'autocast:float16'" in notes[0], report.notes
    assert "aux.weight" in notes[0] and "GradScaler" in notes[0]
    assert "range_t" in report.tolerance_reason


def test_a_variant_the_framework_cannot_run_here_is_skipped():
    """oneDNN has no float16 LSTM on the CPU: that variant is skipped with the
    framework's error quoted, the others still run."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    report = gradcheck.check_variants(
        lambda m, b: m(b)[0].square().mean(), lstm, x, variants=AUTOCAST
    )
    skipped = [n for n in report.notes if "'autocast:float16' skipped" in n]
    if not skipped:
        pytest.skip("this torch runs an LSTM under float16 autocast on the CPU")
    assert report.passed and "the eager reference ran" in skipped[0]
    assert {t.name.split("/")[0] for t in report.tensors} == {"autocast:bfloat16"}


def test_loss_scale_is_exact_for_float32():
    """Driver.gradients(loss_scale=2^k) divides back exactly: float32 (no range
    loss) gives the same gradients bit for bit."""
    from gradcheck.backends import variant_driver

    d = variant_driver(_ce, _mlp(), _batch())
    try:
        a = d.gradients()["grads"]
        b = d.gradients(loss_scale=2.0**16)["grads"]
    finally:
        d.restore()
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


# ---------------------------------------------------------------- bugs are caught
@pytest.mark.parametrize("variant", AUTOCAST)
def test_bug_only_under_autocast_is_caught(variant):
    torch.manual_seed(0)
    model = _WrongUnderAutocast()
    report = gradcheck.check_variants(_ce, model, _batch(), variants=variant)
    assert report.status == "mismatch", report.message()
    assert report.location is not None
    assert report.location.tensor in ("inner.weight", "inner.bias")
    failed = {t.name for t in report.tensors if t.status == "mismatch"}
    assert failed == {f"{variant}/inner.weight", f"{variant}/inner.bias"}
    assert any(f"variant '{variant}'" in n and "MISMATCH" in n for n in report.notes)
    assert "inner.weight" in report.message() or "inner.bias" in report.message()
    with pytest.raises(gradcheck.GradientMismatchError, match="variants check FAILED"):
        gradcheck.assert_variants(_ce, model, _batch(), variants=variant)


def test_the_same_model_passes_in_eager_and_the_bug_is_named_per_variant():
    """Two variants: the failing one is named, the passing one reported passed."""
    torch.manual_seed(0)
    model = _WrongUnderAutocast()
    report = gradcheck.check_variants(
        _ce, model, _batch(), variants=("autocast:bfloat16", "cuda")
    )
    assert report.status == "mismatch"
    assert "gradient under variant 'autocast:bfloat16'" in report.location.quantity
    if not HAS_GPU:
        assert any("variant 'cuda' skipped" in n for n in report.notes)


def test_judge_tensor_tolerance_is_the_measured_spread():
    """Pure NumPy: the tolerance follows the spread, and a consistent bias in the
    variant's evaluations cancels out of the spread."""
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50,))
    base = ref * 1.01  # a 1% bias...
    moved = [base + rng.normal(scale=1e-4, size=50) for _ in range(2)]
    t = judge_tensor("w", ref, base, base, moved, eps=2.0**-24)
    assert t.sigma == pytest.approx(1e-4 * np.sqrt(50 / 2), rel=0.3)
    assert t.ratio > 1  # ...is not absorbed into the tolerance
    unbiased = [ref + (m - base) for m in moved]
    variant = ref + rng.normal(scale=1e-4, size=50)
    ok = judge_tensor("w", ref, variant, unbiased[0], unbiased[1:], 2.0**-24)
    assert ok.ratio <= 1


def test_a_rounding_every_evaluation_shares_is_measured_per_tensor():
    """Pure NumPy. A generated model's bias whose true gradient is 0 came out
    2e-6 under a correct bfloat16 autocast in every evaluation, moved or not
    (spread 0): the spread of the same computation in float32 (points moved by
    a float32 ulp, ~2e-10), scaled by eps_bf16 / eps_f32 = 2^16, measures it.
    The allowance is this tensor's own: a 10% error in a small tensor of the
    same model is not hidden by the rest of the gradient, and a bug float32
    shares (the float32 evaluations all off) cancels out of the spread."""
    eps, rho = 2.0**-7, 2.0**-7 / 2.0**-23
    ref = np.zeros(2)
    variant = np.array([2.041e-6, -3.2e-6])
    o0 = np.array([1.2e-10, -2.0e-10])
    own = [o0 + np.array([2e-10, 1e-10]), o0 - np.array([1e-10, 3e-10])]
    bare = judge_tensor("zeta.bias", ref, variant, variant, [variant] * 2, eps)
    assert bare.ratio == np.inf  # spread 0, reference 0: nothing allowed
    ok = judge_tensor(
        "zeta.bias",
        ref,
        variant,
        variant,
        [variant] * 2,
        eps,
        own_base=o0,
        own_moved=own,
        own_ratio=rho,
    )
    assert ok.ratio <= 1 and ok.inherited > 0
    # a small tensor (1e-3, the rest of the gradient O(1)): 10% off fails
    r = np.array([1e-3, -2e-3, 5e-4])
    f32 = [r * (1 + 6e-8 * np.array([1, -1, 1])), r * (1 - 6e-8)]
    kw = dict(own_base=r, own_moved=f32, own_ratio=rho)
    assert judge_tensor("aux.weight", r, 1.1 * r, r, [r, r], eps, **kw).ratio > 1
    right = judge_tensor("aux.weight", r, r * (1 + eps / 2), r, [r, r], eps, **kw)
    assert right.ratio <= 1
    # float32 itself 10% off at every point: no allowance grows from it
    bug = [1.1 * r, 1.1 * r]
    shared = dict(own_base=1.1 * r, own_moved=bug, own_ratio=rho)
    t = judge_tensor("aux.weight", r, 1.1 * r, 1.1 * r, bug, eps, **shared)
    assert t.inherited == 0 and t.ratio > 1


def test_float16_underflow_is_measured_and_noted():
    """Pure NumPy: gradients below float16's range come out flushed (0) in every
    evaluation; the loss-scaled evaluation has them: the tensor passes, flagged
    as underflowing; a wrong gradient of the same size still fails."""
    eps = 2.0**-10
    r = np.array([3e-8, -5e-9, 2e-8])
    flushed = np.zeros(3)
    bare = judge_tensor("aux.weight", r, flushed, flushed, [flushed] * 2, eps)
    assert bare.ratio > 1 and not bare.underflow
    scaled = r * (1 + 1e-4)
    t = judge_tensor(
        "aux.weight", r, flushed, flushed, [flushed] * 2, eps, rescaled=[scaled]
    )
    assert t.ratio <= 1 and t.underflow
    assert t.range_loss == pytest.approx(np.linalg.norm(scaled))
    big = np.array([0.3, -0.2, 0.1])
    off = judge_tensor(
        "w", big, 1.1 * big, 1.1 * big, [1.1 * big] * 2, eps, rescaled=[1.1 * big]
    )
    assert off.ratio > 1 and not off.underflow


def test_correct_attention_under_bfloat16_autocast_passes():
    """A key bias (true gradient 0: softmax ignores a shift common to a row) and a
    query bias with a small gradient, under a correct bfloat16 autocast."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(24)
            self.query = torch.nn.Linear(4, 4)
            self.key = torch.nn.Linear(4, 4)
            self.value = torch.nn.Linear(4, 4)

        def forward(self, x):
            q, k, v = self.query(x), self.key(x), self.value(x)
            return torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v

    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    report = gradcheck.check_variants(
        lambda m, b: (m(b) ** 2).mean(), Attention(), x, variants="autocast:bfloat16"
    )
    assert report.passed, report.message()


# ---------------------------------------------------------------- devices
def test_gpu_variants_are_skipped_without_a_gpu():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    model, batch = _mlp(), _batch()
    report = gradcheck.check_variants(
        _ce, model, batch, variants=("cuda", "cuda:1", "cuda+autocast:float16")
    )
    assert report.status == "skipped" and not report.passed
    assert report.headline() == "gradcheck: variants check skipped"
    assert "variant 'cuda' skipped" in report.message()
    assert report.tensors == []
    assert report.notes[0].startswith("SKIPPED")
    # assert_variants does not raise on a skipped report
    again = gradcheck.assert_variants(_ce, model, batch, variants="cuda")
    assert again.status == "skipped"
    assert report.to_dict()["status"] == "skipped"
    for v in ("cuda", "cuda:1", "cuda+autocast:float16"):
        assert any(f"variant '{v}' skipped" in n and "GPU" in n for n in report.notes)
    mixed = gradcheck.check_variants(
        _ce, model, batch, variants=("autocast:bfloat16", "cuda")
    )
    assert mixed.passed and mixed.mode == "variants"
    assert {t.name.split("/")[0] for t in mixed.tensors} == {"autocast:bfloat16"}


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_variants_on_a_gpu():
    model, batch = _mlp(), _batch()
    report = gradcheck.check_variants(
        _ce, model, batch, variants=("cuda", "cuda+autocast:float16")
    )
    assert report.passed, report.message()
    bad = gradcheck.check_variants(
        _ce, _WrongUnderAutocast(), batch, variants="cuda+autocast:float16"
    )
    assert bad.status == "mismatch"


def test_cpu_device_variant_runs_here():
    report = gradcheck.check_variants(_ce, _mlp(), _batch(), variants="cpu")
    assert report.passed, report.message()
    assert report.mode == "variants"


# ---------------------------------------------------------------- state
class _Stateful(nn.Module):
    """BatchNorm in train mode (buffers move), dropout (draws random numbers), a
    frozen parameter and a submodule in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.outer = nn.Linear(16, 3)

    def forward(self, x):
        return self.outer(self.frozen(self.drop(torch.tanh(self.bn(self.inner(x))))))


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {
            n: None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for n, g in before["grad"].items():
        other = after["grad"][n]
        assert (g is None) == (other is None), n
        if g is not None:
            assert torch.equal(g, other), n
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]


def test_user_state_is_left_bit_identical():
    torch.manual_seed(0)
    model = _Stateful()
    model.outer.weight.grad = torch.full_like(model.outer.weight, 0.5)
    batch = _batch()
    torch.manual_seed(123)
    before, rng = _snapshot(model), rng_state()
    grad_mode = torch.is_grad_enabled()
    report = gradcheck.check_variants(_ce, model, batch, variants=AUTOCAST)
    assert report.passed, report.message()  # dropout draws the same each time
    _assert_same(before, _snapshot(model))
    assert_same_rng(rng)
    assert torch.is_grad_enabled() == grad_mode
    assert "frozen.weight" not in {t.name.split("/")[1] for t in report.tensors}


def test_rtol_replaces_the_measured_tolerance():
    model, batch = _mlp(), _batch()
    loose = gradcheck.check_variants(
        _ce, _WrongUnderAutocast(), batch, variants="autocast:float16", rtol=0.5
    )
    assert loose.passed
    tight = gradcheck.check_variants(
        _ce, model, batch, variants="autocast:bfloat16", rtol=1e-9
    )
    assert tight.status == "mismatch"
    assert "rtol" in tight.tolerance_reason


# ---------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_correct_passes_and_a_compile_only_bug_is_caught():
    """One compile each (tens of seconds on a small CPU): a correct model passes;
    one whose gradient is 1e-3 off only when compiled fails, naming the tensor; the
    compile time is reported apart from the check time."""
    torch.manual_seed(0)
    good = _mlp()
    report = gradcheck.check_variants(_ce, good, _batch(), variants="compile")
    assert report.passed, report.message()
    assert report.cost["compile_seconds"] > 0
    assert report.cost["compile_seconds[compile]"] == report.cost["compile_seconds"]
    assert report.cost["seconds"] > 0  # the check's own time, compile excluded

    torch.manual_seed(0)
    bad = _WrongUnderCompile()
    before = copy.deepcopy(bad.state_dict())
    report = gradcheck.check_variants(_ce, bad, _batch(), variants="compile")
    assert report.status == "mismatch", report.message()
    assert report.location.tensor in ("inner.weight", "inner.bias")
    assert any("variant 'compile'" in n and "MISMATCH" in n for n in report.notes)
    assert "compile" in report.message()
    for k, v in before.items():
        assert torch.equal(v, bad.state_dict()[k])


@pytest.mark.slow
def test_compile_combined_with_autocast_on_a_conv_net():
    """A generic combination: compiled and autocast at once; the spread is measured
    on the eager autocast run, the compile time kept apart."""
    torch.manual_seed(0)
    report = gradcheck.check_variants(
        _ce, _Conv(), _batch((4, 2, 5, 5)), variants="compile+autocast:bfloat16"
    )
    assert report.passed, report.message()
    assert {t.dtype for t in report.tensors} == {"bfloat16"}
    assert report.cost["compile_seconds[compile+autocast:bfloat16]"] > 0


# ---------------------------------------------------------------- fixture
def _fixture(**defaults):
    """What the plugin's ``gradcheck`` fixture hands a test (marker defaults)."""
    from gradcheck.pytest_plugin import GradcheckFixture

    return GradcheckFixture(defaults, None, "auto")


def test_a_parameter_no_execution_reaches_passes_and_a_head_cut_under_autocast_fails():
    """A head the loss never uses has no gradient in any execution: the variants
    agree (it used to read as 'connected in one execution and not the other')."""

    class TwoHeads(nn.Module):
        def __init__(self, cut: bool = False) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.a, self.b = (
                nn.Linear(6, 8),
                nn.Linear(8, 3),
                nn.Linear(8, 1),
            )
            self.cut = cut

        def forward(self, x):
            z = torch.tanh(self.trunk(x))
            if self.cut and torch.is_autocast_enabled(x.device.type):
                z = z.detach()  # planted: the trunk loses its gradient under autocast
            return self.a(z), self.b(z)

    def loss(model, batch):  # head b is computed, never used
        return F.cross_entropy(model(batch[0])[0], batch[1])

    ok = gradcheck.check_variants(loss, TwoHeads(), _batch(), variants="autocast")
    assert ok.passed, ok.message()
    assert {t.name for t in ok.tensors if t.name.endswith(("b.weight", "b.bias"))}
    bad = gradcheck.check_variants(
        loss, TwoHeads(cut=True), _batch(), variants="autocast"
    )
    assert bad.status == "mismatch" and "trunk" in bad.location.tensor


def test_fixture_exposes_check_variants():
    fx = _fixture()
    report = fx.check_variants(_ce, _mlp(), _batch(), variants="autocast")
    assert report.passed
    assert fx.assert_variants(_ce, _mlp(), _batch(), variants="autocast").passed
    loose = _fixture(rtol=0.5)  # the test's @pytest.mark.gradcheck(rtol=...) applies
    bug = _WrongUnderAutocast()
    assert loose.check_variants(_ce, bug, _batch(), variants="autocast").passed
    with pytest.raises(gradcheck.GradientMismatchError):
        fx.assert_variants(_ce, bug, _batch(), variants="autocast")


def test_fixture_skips_when_no_variant_can_run():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(pytest.skip.Exception, match="check_variants"):
        _fixture().check_variants(_ce, _mlp(), _batch(), variants="cuda")


def test_no_framework_import_in_the_property_module():
    import pathlib
    import re

    text = (
        pathlib.Path(gradcheck.__file__).parent / "properties/variants.py"
    ).read_text()
    assert not re.search(r"^\s*(import|from) (torch|tensorflow|keras)", text, re.M)


# ---------------------------------------------------------------- TensorFlow: xla
@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("needs KERAS_BACKEND=tensorflow")
    return keras


def _keras_case(keras, bug: bool = False, dropout: bool = False):
    import numpy as np
    import tensorflow as tf

    class WrongUnderXla(keras.layers.Layer):
        """Scales the gradient by 1 + 1e-3 only inside a traced (XLA) function."""

        def call(self, h):
            if not tf.executing_eagerly():
                return h * (1 + 1e-3) - tf.stop_gradient(h) * 1e-3
            return h

    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(16, activation="tanh")]
    layers += [WrongUnderXla()] if bug else []
    layers += [keras.layers.Dropout(0.2)] if dropout else []
    model = keras.Sequential([*layers, keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])

    def loss_fn(model, batch):
        logits = model(batch[0], training=True)
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                batch[1], logits, from_logits=True
            )
        )

    return model, (x, y), loss_fn


def test_xla_correct_keras_model_passes_and_state_is_restored(keras):
    import numpy as np

    model, batch, loss_fn = _keras_case(keras)
    before = [v.numpy().copy() for v in model.variables]
    rng = rng_state()
    report = gradcheck.check_variants(
        loss_fn, model, batch, variants=("xla", "cpu", "cuda")
    )
    assert report.passed, report.message()
    assert report.framework == "tensorflow" and report.reference_dtype == "float32"
    assert {t.name.split("/")[0] for t in report.tensors} == {"xla", "cpu"}
    if not HAS_GPU:
        assert any("variant 'cuda' skipped" in n for n in report.notes)
    assert "compile_seconds[xla]" in report.cost
    for a, v in zip(before, model.variables, strict=True):
        assert np.array_equal(a, v.numpy()), v.path
    assert_same_rng(rng)


def test_xla_only_bug_is_caught(keras):
    model, batch, loss_fn = _keras_case(keras, bug=True)
    report = gradcheck.check_variants(loss_fn, model, batch, variants="xla")
    assert report.status == "mismatch", report.message()
    assert "dense" in report.location.tensor
    assert any("variant 'xla'" in n and "MISMATCH" in n for n in report.notes)


def test_xla_with_dropout_in_training_mode_is_named_not_a_mismatch(keras):
    model, batch, loss_fn = _keras_case(keras, dropout=True)
    report = gradcheck.check_variants(loss_fn, model, batch, variants="xla")
    assert report.status == "nondeterministic", report.message()
    assert any("draws random numbers" in n for n in report.notes)


def test_torch_variants_on_a_keras_model_are_clear_errors(keras):
    model, batch, loss_fn = _keras_case(keras)
    for v in ("compile", "autocast:bfloat16"):
        with pytest.raises(gradcheck.UnsupportedInputError, match="torch variant"):
            gradcheck.check_variants(loss_fn, model, batch, variants=v)


# ---------------------------------------------------------------- one engine with check_devices
def test_device_spellings_parse_and_a_half_model_gets_a_float64_reference():
    assert parse_variant("/GPU:1").device == "/GPU:1"
    assert parse_variant("gpu:0+autocast:float16").device == "gpu:0"
    torch.manual_seed(0)
    model = _mlp().to(torch.bfloat16)
    x, y = _batch()
    report = gradcheck.check_variants(_ce, model, (x.bfloat16(), y), variants="cpu")
    assert report.passed, report.message()
    assert report.reference_dtype == "float64" and report.dtype == "bfloat16"
    assert {t.dtype for t in report.tensors} == {"bfloat16"}


def test_a_variant_drawing_from_a_generator_of_its_own_is_noted_nondeterministic():
    """Two evaluations at the point differ (a generator gradcheck cannot reset):
    noted, with the random op named; the noise is in the measured spread too, so
    a correct model is not failed for it."""
    own = torch.Generator().manual_seed(0)

    def noisy(model, batch):
        return _ce(model, batch) + 1e-6 * torch.rand((), generator=own) * sum(
            p.sum() for p in model.parameters()
        )

    report = gradcheck.check_variants(noisy, _mlp(), _batch(), variants="cpu")
    assert report.status in ("passed", "nondeterministic"), report.message()
    assert any(
        n.startswith("cpu is nondeterministic") and "Random ops ran (rand)" in n
        for n in report.notes
    )


def test_check_devices_and_check_variants_give_one_verdict(monkeypatch):
    """The same device through both front doors: the same engine, the same
    numbers (a simulated cuda:0 on the CPU, its backward 10% off at one
    element)."""
    from gradcheck.backends import torch_variants as tv
    from tests import torch_models as tm

    on = {"gpu": False}

    @contextlib.contextmanager
    def placement(device):
        on["gpu"] = device == "cuda:0"
        try:
            yield "cpu"
        finally:
            on["gpu"] = False

    monkeypatch.setattr(tv, "placement", placement)
    monkeypatch.setattr(tv, "gpu_available", lambda d: None)

    class Squares(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return tm.OneWrongElement.apply(x @ self.w, 7, 1.1 if on["gpu"] else 1.0)

    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    loss = lambda m, b: m(b).sum()  # noqa: E731
    v = gradcheck.check_variants(loss, Squares(), x, variants=("cpu", "cuda:0"))
    d = gradcheck.check_devices(loss, Squares(), x, devices=("cpu", "cuda:0"))
    assert v.status == d.status == "mismatch"
    assert (v.property, d.property) == ("variants", "devices")
    assert (
        [(t.name, t.status) for t in v.tensors]
        == [(t.name, t.status) for t in d.tensors]
        == [("cpu/w", "passed"), ("cuda:0/w", "mismatch")]
    )
    assert v.error == d.error and v.tolerance == d.tolerance
    assert v.location.index == d.location.index
