"""check_gradients on PyTorch: planted bugs fail, correct code passes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests import torch_models as tm  # noqa: E402

pytestmark = pytest.mark.torch

DTYPES = [torch.float64, torch.float32]
#: the relative error each dtype promises to catch
DETECT = {torch.float64: 1e-5, torch.float32: 1e-3}


def leaf(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


# --------------------------------------------------------------------------- smooth
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: (x.sin() * x.exp()).sum(),
        lambda x: torch.tanh(x @ x.T).mean(),
        lambda x: torch.logsumexp(x, dim=-1),
        lambda x: (x.softmax(-1) * x).sum(),
    ],
    ids=["sin_exp", "tanh_gram", "logsumexp", "softmax"],
)
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_correct_functions_pass(dtype, fn, mode):
    x = leaf(5, 6, dtype=dtype)
    report = gradcheck.check_gradients(fn, (x,), mode=mode)
    assert report.passed, report.message()
    assert report.error <= report.tolerance
    assert report.reference_dtype == "float64"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_scaled_backward_is_caught_at_promised_precision(dtype, mode):
    rel = DETECT[dtype]
    x = leaf(4, 5, dtype=dtype)
    w = leaf(5, 3, dtype=dtype, seed=1)

    def fn(x, w, rel=rel):
        return torch.tanh(tm.ScaledBackward.apply(x, rel) @ w).sum()

    assert gradcheck.check_gradients(
        lambda x, w: fn(x, w, 0.0), (x, w), mode=mode
    ).passed
    report = gradcheck.check_gradients(fn, (x, w), mode=mode)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bug",
    ["transposed", "ignores_grad_output", "permuted"],
)
def test_structural_backward_bugs_fail(dtype, bug):
    x = leaf(6, 6, dtype=dtype)
    w = leaf(6, 6, dtype=dtype, seed=1)
    c = leaf(6, dtype=dtype, seed=2).detach()
    fns = {
        "transposed": lambda x, w: torch.tanh(tm.TransposedBackward.apply(x, w)).sum(),
        "ignores_grad_output": lambda x, w: (
            (tm.IgnoresGradOutput.apply(x) ** 2).sum() + (w * 0).sum()
        ),
        "permuted": lambda x, w: (tm.PermutedBackward.apply(x, c) * w).sum(),
    }
    report = gradcheck.check_gradients(fns[bug], (x, w), mode="directional")
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    assert report.location.index is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", [0, 4321, 9999])
def test_single_wrong_element_in_10000_is_found(dtype, index):
    x = leaf(100, 100, dtype=dtype, seed=3)

    def fn(x):
        return tm.OneWrongElement.apply(x, index, 1.5).sum()

    report = gradcheck.check_gradients(fn, (x,))
    assert report.mode == "directional"
    assert report.status == "mismatch", report.message()
    assert report.location.index == (index // 100, index % 100)
    loc = report.location
    assert loc.numerical == pytest.approx(
        2 * x.detach().view(-1)[index].item(), rel=1e-3
    )
    assert loc.analytical == pytest.approx(
        3 * x.detach().view(-1)[index].item(), rel=1e-3
    )
    # the message names the tensor, the element, both values, dtype and seed
    msg = report.message()
    for part in (
        "inputs[0]",
        f"[{index // 100}, {index % 100}]",
        "numerical",
        "analytical",
        "seed=0",
        str(dtype).split(".")[1],
    ):
        assert part in msg


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("dtype", DTYPES)
def test_buggy_layer_inside_model_is_blamed_by_name(dtype):
    torch.manual_seed(0)
    model = tm.MultiHead(
        6, [8, 8], "tanh", {"main": (1, "mse"), "aux": (3, "ce")}, dtype
    )
    x = torch.randn(16, 6, dtype=dtype)
    targets = tm.make_targets(model, 16, torch.Generator().manual_seed(0))

    def total():
        h = model.trunk[0](x)
        h = (
            tm.ScaledBackward.apply(h, DETECT[dtype]) / 2
        )  # bug in trunk[0]'s input grad
        h = model.trunk[1:](h)
        return tm.head_loss("mse", model.heads["main"](h), targets["main"])

    report = gradcheck.check_gradients(total, params=model)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor.startswith("trunk.0.")
    assert report.location.index is not None


@given(
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    act=st.sampled_from(sorted(tm.ACTIVATIONS)),
    heads=st.dictionaries(
        st.sampled_from(["main", "aux", "aux2"]),
        st.tuples(st.integers(1, 5), st.sampled_from(["mse", "ce", "bce", "huber"])),
        min_size=1,
        max_size=3,
    ),
    weights=st.lists(
        st.sampled_from([0.0, 1e-4, 0.3, 1.0, 7.5]), min_size=3, max_size=3
    ),
    batch=st.integers(1, 17),
    dtype=st.sampled_from(DTYPES),
    norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_no_false_alarms_on_random_multihead_models(
    widths, act, heads, weights, batch, dtype, norm, seed
):
    torch.manual_seed(seed)
    model = tm.MultiHead(5, widths, act, heads, dtype, norm=norm)
    x = torch.randn(batch, 5, dtype=dtype)
    targets = tm.make_targets(model, batch, torch.Generator().manual_seed(seed))
    w = dict(zip(model.heads, weights, strict=False))
    report = gradcheck.check_gradients(
        tm.total_fn(model, x, targets, w), params=model, seed=seed
    )
    # ReLU-type kinks may be called nondifferentiable, never a mismatch
    assert report.status != "mismatch", report.message()
    if act not in ("relu",):
        assert report.status == "passed", report.message()


# --------------------------------------------------------------------------- kinks
TIE = torch.tensor([0.0, 1.0, 5.0, -3.0], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["directional", "full"])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.relu(x).sum(),
        lambda x: torch.where(x >= 0, x, -x).sum(),  # |x| whose gradient at 0 is +1
        lambda x: torch.stack([x, TIE]).max(dim=0).values.sum(),  # argmax picks x
    ],
    ids=["relu_at_0", "abs_at_0", "max_tie"],
)
def test_kinks_are_nondifferentiable_not_mismatch(fn, mode):
    x = torch.tensor([0.0, 1.5, -2.0, 0.7], dtype=torch.float64, requires_grad=True)
    report = gradcheck.check_gradients(fn, (x,), mode=mode)
    assert report.status == "nondifferentiable", report.message()
    assert report.location is not None and report.location.tensor == "inputs[0]"
    assert report.location.index == (0,)


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_symmetric_subgradient_at_a_kink_passes(mode):
    # torch's abs'(0) = 0 and maximum's tie split 0.5/0.5 equal the central difference
    x = torch.tensor([0.0, 1.5, -2.0, 0.7], dtype=torch.float64, requires_grad=True)
    c = x.detach().clone()
    assert gradcheck.check_gradients(lambda x: x.abs().sum(), (x,), mode=mode).passed
    assert gradcheck.check_gradients(
        lambda x: torch.maximum(x, c).sum(), (x,), mode=mode
    ).passed


def test_kink_with_a_wrong_gradient_is_still_a_mismatch():
    class BadRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x >= 0) * 3.0  # 3x too large everywhere

    x = torch.tensor([0.0, 1.5, -2.0, 0.7], dtype=torch.float64, requires_grad=True)
    report = gradcheck.check_gradients(
        lambda x: BadRelu.apply(x).sum(), (x,), mode="directional"
    )
    assert report.status == "mismatch", report.message()


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_networks_mostly_pass(dtype):
    statuses = []
    for seed in range(12):
        torch.manual_seed(seed)
        model = tm.MultiHead(
            8, [32, 32], "relu", {"main": (1, "mse"), "aux": (4, "ce")}, dtype
        )
        x = torch.randn(32, 8, dtype=dtype)
        targets = tm.make_targets(model, 32, torch.Generator().manual_seed(seed))
        r = gradcheck.check_gradients(
            tm.total_fn(model, x, targets, {"main": 1.0, "aux": 0.5}),
            params=model,
            seed=seed,
        )
        statuses.append(r.status)
    assert "mismatch" not in statuses
    assert statuses.count("passed") >= 10, statuses


# --------------------------------------------------------------------------- nondeterminism
def test_dropout_in_train_mode_is_nondeterministic():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    ).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    report = gradcheck.check_gradients(lambda: model(x).pow(2).mean(), params=model)
    assert report.status == "nondeterministic", report.message()
    model.eval()
    assert gradcheck.check_gradients(
        lambda: model(x).pow(2).mean(), params=model
    ).passed


def test_dropout_in_a_small_model_is_nondeterministic_in_full_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)
    ).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    report = gradcheck.check_gradients(lambda: model(x).pow(2).mean(), params=model)
    assert report.mode == "full"
    assert report.status == "nondeterministic", report.message()


# --------------------------------------------------------------------------- outputs
def test_multi_output_dict_and_non_floating_outputs():
    x = leaf(3, 4)

    def fn(x):
        return {"a": x.sin(), "b": (x**2).sum(dim=0), "idx": x.argmax(), "n": 3}

    report = gradcheck.check_gradients(fn, (x,), mode="directional")
    assert report.passed, report.message()


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_jacobian_of_vector_output_catches_one_wrong_entry(dtype):
    x = leaf(7, dtype=dtype)
    report = gradcheck.check_gradients(
        lambda x: tm.OneWrongElement.apply(
            x, 3, 1.01 if dtype == torch.float64 else 1.05
        ),
        (x,),
    )
    assert report.mode == "full"
    assert report.status == "mismatch", report.message()
    assert report.location.index == (3,)
    assert "output[3]" in report.location.quantity


def test_float16_and_bfloat16_checks_run_without_false_alarms():
    for dtype in (torch.float16, torch.bfloat16):
        x = leaf(8, 8, dtype=torch.float32).detach().to(dtype).requires_grad_(True)
        report = gradcheck.check_gradients(
            lambda x: torch.tanh(x).sum(), (x,), mode="directional"
        )
        assert report.passed, report.message()
        assert report.reference_dtype == "float64"


def test_to_dict_is_json_serialisable_and_complete():
    import json

    x = leaf(50, 50)
    report = gradcheck.check_gradients(
        lambda x: tm.OneWrongElement.apply(x, 7, 2.0).sum(), (x,)
    )
    d = json.loads(json.dumps(report.to_dict()))
    for key in (
        "status",
        "passed",
        "error",
        "tolerance",
        "tolerance_reason",
        "location",
        "tensors",
        "seed",
        "dtype",
        "device",
        "message",
        "steps",
    ):
        assert key in d
    assert d["location"]["index"] == [0, 7]
    assert d["passed"] is False
    assert all(math.isfinite(s["step"]) for s in d["steps"])


def test_seed_changes_direction_and_is_reported():
    x = leaf(10, 10)
    r1 = gradcheck.check_gradients(lambda x: x.sin().sum(), (x,), seed=1)
    r2 = gradcheck.check_gradients(lambda x: x.sin().sum(), (x,), seed=2)
    assert r1.seed == 1 and r2.seed == 2
    assert r1.tensors[0].analytical != r2.tensors[0].analytical


def test_assert_gradients_raises_assertion_error_with_report():
    x = leaf(20, 20)
    with pytest.raises(gradcheck.GradientMismatchError) as info:
        gradcheck.assert_gradients(
            lambda x: tm.OneWrongElement.apply(x, 5, 0.0).sum(), (x,)
        )
    assert isinstance(info.value, AssertionError)
    assert info.value.report.location.index == (0, 5)
    assert "tensor(" not in str(info.value)  # no tensor dumps
    assert gradcheck.assert_gradients(lambda x: x.sin().sum(), (x,)).passed


def test_grad_rounding_override_is_validated():
    x = leaf(3)
    with pytest.raises(gradcheck.InvalidArgumentError):
        gradcheck.check_gradients(lambda x: x.sum(), (x,), rtol=-1)
    with pytest.raises(gradcheck.InvalidArgumentError):
        gradcheck.check_gradients(lambda x: x.sum(), (x,), mode="fast")
    with pytest.raises(gradcheck.InvalidArgumentError):
        gradcheck.check_gradients(lambda x: x.sum(), (x,), step=2.0)
    with pytest.raises(gradcheck.InvalidArgumentError):
        gradcheck.check_gradients(lambda x: x.sum(), (x,), seed=-3)


def test_numerical_side_falls_back_to_native_with_a_note():
    x = leaf(6, 6, dtype=torch.float32)

    def fn(x):  # a kernel that only takes float32: no float64 reference possible
        if x.dtype != torch.float32:
            raise TypeError("this kernel takes float32 only")
        return x.sin().sum()

    report = gradcheck.check_gradients(fn, (x,), mode="directional")
    assert report.passed, report.message()
    assert report.reference_dtype == "float32"
    assert any("not float64" in n for n in report.notes)


class Float32OnlyBug(torch.autograd.Function):
    """Correct in float64, 1e-3 too large on the float32 path only."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        scale = 1.001 if x.dtype == torch.float32 else 1.0
        return g * x.cos() * scale


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_bug_on_the_float32_path_only_is_a_mismatch(mode):
    x = (
        leaf(6, 7, dtype=torch.float32)
        if mode == "directional"
        else leaf(7, dtype=torch.float32)
    )
    report = gradcheck.check_gradients(
        lambda x: Float32OnlyBug.apply(x).sum(), (x,), mode=mode
    )
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[0]"
    x64 = x.detach().double().requires_grad_(True)
    assert gradcheck.check_gradients(
        lambda x: Float32OnlyBug.apply(x).sum(), (x64,), mode=mode
    ).passed


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_ill_conditioned_float32_function_is_not_a_false_alarm(mode):
    # LayerNorm over one feature: x - mean(x) is pure float32 rounding, amplified by
    # 1/sqrt(eps); the float32 gradient legitimately differs from float64
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 1),
        torch.nn.LayerNorm(1),
        torch.nn.GELU(),
        torch.nn.Linear(1, 1),
    )
    x = torch.randn(3, 5)
    report = gradcheck.check_gradients(
        lambda: 1e-4 * model(x).pow(2).mean(), params=model, mode=mode
    )
    assert report.status == "passed", report.message()


# --------------------------------------------------------------------------- edge cases
# (the OpInfo sweep, benchmarks/opinfo_sweep.py, found each of these)
def f64(*shape, seed=0):
    return leaf(*shape, dtype=torch.float64, seed=seed)


@pytest.mark.parametrize(
    "fn, shapes, what",
    [
        (torch.cos, [(1, 0, 3)], "every differentiated tensor is empty"),
        (lambda a: a.flip(0), [(5, 0, 10)], "every differentiated tensor is empty"),
        (lambda a, b: a * b, [(0, 3), (3,)], "every output is empty"),
    ],
    ids=["cos", "flip", "broadcast_to_empty"],
)
def test_empty_tensors_pass_with_a_note_saying_nothing_was_compared(fn, shapes, what):
    args = tuple(f64(*s, seed=i) for i, s in enumerate(shapes))
    report = gradcheck.check_gradients(fn, args)
    assert report.passed, report.message()
    assert any(what in n and "nothing was compared" in n for n in report.notes)


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_partly_empty_checks_the_non_empty_part(mode):
    empty, x = f64(0, 4), f64(6, 7, seed=1)
    ok = gradcheck.check_gradients(lambda a, b: (a * 2, b.sin()), (empty, x), mode=mode)
    assert ok.passed, ok.message()
    assert any("inputs[0] [0, 4]" in n and "output[0] [0, 4]" in n for n in ok.notes)
    report = gradcheck.check_gradients(
        lambda a, b: (a * 2, tm.OneWrongElement.apply(b, 3, 1.5)), (empty, x), mode=mode
    )
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "inputs[1]" and report.location.index == (0, 3)


def test_sparse_inputs_are_refused_by_name_with_the_fix():
    dense = f64(5, 5)
    sparse = dense.detach().to_sparse_csr().requires_grad_(True)
    with pytest.raises(gradcheck.UnsupportedInputError, match=r"inputs\[0\].*to_dense"):
        gradcheck.check_gradients(
            lambda a: (a @ torch.eye(5).double()).sum(), (sparse,)
        )
    with pytest.raises(gradcheck.UnsupportedInputError, match=r"output.*to_dense"):
        gradcheck.check_gradients(lambda a: (2 * a).to_sparse(), (dense,))
    # the suggested fix: a dense tensor, converted inside fn
    assert gradcheck.check_gradients(
        lambda a: torch.sparse.mm(a.to_sparse(), torch.ones(5, 2).double()), (dense,)
    ).passed


def test_sparse_gradients_are_read_as_dense():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    idx = torch.tensor([1, 2, 2, 5])
    report = gradcheck.check_gradients(lambda: emb(idx).pow(2).sum(), params=emb)
    assert report.passed, report.message()


def test_zero_tensor_gradient_is_read_as_zeros():
    x = torch.tensor([0.5, -1.5, 2.0, -0.3], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.sgn(x).sum(), x)
    assert g._is_zerotensor()  # what the backend receives
    report = gradcheck.check_gradients(lambda a: torch.sgn(a) + 0 * a, (x,))
    assert report.passed, report.message()
    assert gradcheck.check_gradients(torch.sgn, (f64(20, 20),)).passed


class SavedStat(torch.autograd.Function):
    """(x * scale, mean(x)) with the mean marked non-differentiable, as
    native_batch_norm marks its saved statistics."""

    @staticmethod
    def forward(ctx, x, scale):
        mean = x.mean()
        ctx.mark_non_differentiable(mean)
        ctx.scale = scale
        return x * 2, mean

    @staticmethod
    def backward(ctx, g, _gmean):
        return g * 2 * ctx.scale, None


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_outputs_torch_declares_non_differentiable_are_not_compared(mode):
    x = f64(4, 5)
    report = gradcheck.check_gradients(
        lambda a: SavedStat.apply(a, 1.0), (x,), mode=mode
    )
    assert report.passed, report.message()
    assert any(
        "output[1] is not differentiable per torch" in n and "not compared" in n
        for n in report.notes
    ), report.notes
    assert report.mode.startswith(mode)
    # the differentiable output is still checked
    bad = gradcheck.check_gradients(
        lambda a: SavedStat.apply(a, 1.001), (x,), mode=mode
    )
    assert bad.status == "mismatch", bad.message()
    # batch_norm's saved mean/rstd, as OpInfo's native_layer_norm returns them
    w, b = f64(5, seed=1), f64(5, seed=2)
    ln = gradcheck.check_gradients(
        lambda a, w, b: torch.native_layer_norm(a, (5,), w, b, 1e-5), (x, w, b)
    )
    assert ln.passed, ln.message()


def test_a_lone_output_that_does_not_require_grad_is_still_an_error():
    x = f64(3)
    with pytest.raises(gradcheck.GradcheckError, match="do not depend"):
        gradcheck.check_gradients(lambda a: a.detach() * 2, (x,))
    with pytest.raises(gradcheck.GradcheckError, match="do not depend"):
        gradcheck.check_gradients(lambda a: (a.detach() * 2, a.detach().sin()), (x,))


class WrongImag(torch.autograd.Function):
    """exp(i x) whose backward drops the imaginary part's contribution."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.polar(torch.ones_like(x), x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g.real * torch.sin(x)  # misses + g.imag * cos(x)


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_complex_outputs_are_checked_in_both_parts_on_a_float64_reference(mode):
    x = f64(6)
    ok = gradcheck.check_gradients(
        lambda a: torch.polar(torch.ones_like(a), a), (x,), mode=mode
    )
    assert ok.passed and ok.reference_dtype == "float64", ok.message()
    bad = gradcheck.check_gradients(WrongImag.apply, (x,), mode=mode)
    assert bad.status == "mismatch", bad.message()
    # complex128 outputs of a float32 function keep the float64 reference
    x32 = leaf(5, 5, dtype=torch.float32)
    eig = gradcheck.check_gradients(lambda a: torch.linalg.eigvals(a), (x32,))
    assert eig.passed and eig.reference_dtype == "float64", eig.message()


class ZeroBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1e-3

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


def test_piecewise_constant_functions_pass_where_no_jump_is_crossed():
    # the analytical gradient is exactly zero: the finite difference is trusted
    # relative to the function's own scale, not to a derivative of size zero
    x = f64(20, 20)
    for fn in (
        torch.floor,
        torch.sign,
        lambda a: torch.div(a, 0.3, rounding_mode="trunc"),
    ):
        report = gradcheck.check_gradients(fn, (x,))
        assert report.passed, report.message()
    # ... a jump at the point is still seen, and a missing gradient still fails
    y = torch.tensor([1.0, 0.3], dtype=torch.float64, requires_grad=True)
    assert gradcheck.check_gradients(torch.floor, (y,)).status == "nondifferentiable"
    bad = gradcheck.check_gradients(lambda a: ZeroBackward.apply(a), (x,))
    assert bad.status == "mismatch", bad.message()


def test_a_zero_gradient_tensor_does_not_force_an_untrustworthy_step():
    # the unused input's direction is large (normalised by the floor), so the
    # first step is tiny and its rounding too large to trust: Richardson coarsens
    a, b = f64(20, 20, 20), f64(20, 20, 20, seed=1)
    report = gradcheck.check_gradients(lambda a, b: b.clone(), (a, b))
    assert report.passed, report.message()


@pytest.mark.parametrize("mode", ["directional", "full"])
def test_c1_but_not_c2_point_is_not_a_mismatch(mode):
    # x|x| at 0 (i1e's shape there): O(h) central-difference error
    x = torch.tensor([0.0, 0.4, -1.1, 2.0, 0.7], dtype=torch.float64)
    report = gradcheck.check_gradients(
        lambda a: torch.special.i1e(a), (x.requires_grad_(True),), mode=mode
    )
    assert report.passed, report.message()


# ---------------------------------------------------------------------------------
# float32 ill-conditioning judged by the backward's measured rounding noise
# (cotangent rescaling + ulp moves, each draw against float64 at the same point)
# ---------------------------------------------------------------------------------
def _with_bug(f, bug):
    """f with its backward replaced by bug(true gradient)."""

    class Buggy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return f(x)

        @staticmethod
        def backward(ctx, v):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(f(xx), xx, v)
            return bug(g, v)

    return Buggy.apply


def _scaled(factor):
    return lambda g, v: g * factor


_F32_CASES = {
    # true Jacobian 0 (p=0.5 over a dim of size 1): O(1) terms cancel
    "normalize": (
        lambda x: torch.nn.functional.normalize(x, p=0.5, dim=0),
        lambda: torch.randn(1, 2, 4, 5, generator=torch.Generator().manual_seed(2)),
        lambda g, v: g + 1e-3 * v,
    ),
    # 2 elements normalised: Jacobian entries ~1e-6 from cancelling O(1/std) terms (std >> eps)
    "layer_norm": (
        lambda x: torch.nn.functional.layer_norm(x, (2,)),
        lambda: torch.tensor([[0.5, -2.0]]),
        lambda g, v: g + 1e-3 * v.abs().sum() * torch.tensor([[1.0, 0.0]]),
    ),
    "group_norm": (
        lambda x: torch.nn.functional.group_norm(x, 1),
        lambda: torch.tensor([[0.5, -2.0]]),
        lambda g, v: g + 1e-3 * v.abs().sum() * torch.tensor([[1.0, 0.0]]),
    ),
    # x = 1e4: the backward rounds an intermediate ~1e4 to its ulp (~6e-4 relative)
    "logcumsumexp": (
        lambda x: torch.logcumsumexp(x, 0),
        lambda: torch.cat(
            [
                torch.full((1, 5, 5), 1e4),
                torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(0)),
            ]
        ),
        _scaled(1 + 1e-2),
    ),
}


@pytest.mark.parametrize("name", sorted(_F32_CASES))
def test_float32_ill_conditioned_passes_and_planted_bug_fails(name):
    f, make, bug = _F32_CASES[name]
    x = make().float().requires_grad_(True)
    ok = gradcheck.check_gradients(f, (x,), seed=0)
    assert ok.passed, ok.message()
    bad = gradcheck.check_gradients(_with_bug(f, bug), (x,), seed=0)
    assert not bad.passed and bad.status == "mismatch", bad.message()


# --------------------------------------------------------------------------- issue 10, items 5-8
class ClosureMatmul(torch.autograd.Function):
    """x @ w.T where x is a float32 batch the module captured (not an argument):
    forward and backward both read it. ``factor`` plants a backward bug."""

    factor = 1.0

    @staticmethod
    def forward(ctx, w, x):
        ctx.x = x  # kept as is: float32, also on the float64 reference
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        return (g.t() @ ctx.x) * ClosureMatmul.factor, None


class ClosureModel(torch.nn.Module):
    def __init__(self, x):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(12, 10))
        self.head = torch.nn.Linear(12, 1)
        self.x = x

    def forward(self):
        return self.head(torch.tanh(ClosureMatmul.apply(self.w, self.x))).pow(2).mean()


@pytest.mark.parametrize("factor, status", [(1.0, "passed"), (1.001, "mismatch")])
@pytest.mark.parametrize("mode", ["directional", "full"])
def test_custom_function_reading_captured_float32_runs_on_the_float64_reference(
    factor, status, mode, monkeypatch
):
    """Item 5: a planted bug makes the check take the float64 gradient, whose
    backward multiplies float64 by the captured float32 batch: it ran under the
    promotion (it raised 'expected m1 and m2 to have the same dtype' before)."""
    monkeypatch.setattr(ClosureMatmul, "factor", factor)
    torch.manual_seed(0)
    model = ClosureModel(torch.randn(16, 10))
    report = gradcheck.check_gradients(model, params=model, mode=mode)
    assert report.status == status, report.message()
    assert report.reference_dtype == "float64"
    assert not any("not run on float64" in n for n in report.notes)
    if status == "mismatch":
        assert report.location is not None and report.location.tensor == "w"
        assert any("float64 gradient misses" in n for n in report.notes)


class Float32OnlyBackward(torch.autograd.Function):
    """A backward that refuses anything but float32 (and is 1% off)."""

    @staticmethod
    def forward(ctx, h):
        return h * 1.0

    @staticmethod
    def backward(ctx, g):
        if g.dtype != torch.float32:
            raise TypeError("this kernel takes float32 only")
        return g * 1.01


def test_a_backward_that_cannot_run_in_float64_is_a_clear_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh())
    x = torch.randn(16, 10)

    def loss():
        return Float32OnlyBackward.apply(model(x)).pow(2).mean()

    with pytest.raises(gradcheck.GradcheckError, match="float64") as info:
        gradcheck.check_gradients(loss, params=model, mode="directional")
    err = info.value
    assert isinstance(err, gradcheck.errors.ReferencePrecisionError)
    assert isinstance(err, TypeError)  # the original type is kept ...
    assert isinstance(err.__cause__, TypeError)  # ... and the original is the cause
    assert "dtype-agnostic" in str(err)


class WrongTanh(torch.autograd.Function):
    """tanh with a differentiable backward (create_graph works), ``factor`` off."""

    factor = 1.0

    @staticmethod
    def forward(ctx, h):
        y = torch.tanh(h)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * WrongTanh.factor


@pytest.mark.parametrize("factor, status", [(1.0, "passed"), (1.01, "mismatch")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_penalty_differentiating_inside_fn(factor, status, dtype, monkeypatch):
    """Item 6: fn calls torch.autograd.grad(..., create_graph=True) (a WGAN-GP
    style penalty). The reference evaluations need grad mode (they raised 'element
    0 of tensors does not require grad' under no_grad); a wrong backward inside
    the penalty's graph is a mismatch."""
    monkeypatch.setattr(WrongTanh, "factor", factor)
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(6, 16).to(dtype), torch.nn.Linear(16, 1).to(dtype)
    model = torch.nn.ModuleDict({"l1": lin1, "l2": lin2})
    x = torch.randn(8, 6, dtype=dtype)

    def loss():
        xi = x.clone().requires_grad_(True)
        out = lin2(WrongTanh.apply(lin1(xi)))
        (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        return out.pow(2).mean() + 0.5 * (g.norm(dim=1) - 1).pow(2).mean()

    report = gradcheck.check_gradients(loss, params=model, mode="directional")
    assert report.status == status, report.message()
    assert report.reference_dtype == "float64"
    assert any("differentiates inside" in n for n in report.notes)


def _autocast_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {"l1": torch.nn.Linear(16, 32), "l2": torch.nn.Linear(32, 4)}
    )


@pytest.mark.parametrize("factor, status", [(1.0, "passed"), (1.5, "mismatch")])
def test_check_inside_autocast_judges_at_its_precision(factor, status, monkeypatch):
    """Item 7: under torch.autocast(bfloat16) the analytical side runs in
    bfloat16, the reference in float64 outside autocast, the tolerance is
    bfloat16's, and a note says so (it said 'nondeterministic' before: autocast's
    weight cache served stale casts after gradcheck swapped the weights)."""
    monkeypatch.setattr(WrongTanh, "factor", factor)
    model = _autocast_model()
    x, y = torch.randn(64, 16), torch.randn(64, 4)

    def loss():
        h = WrongTanh.apply(model["l1"](x))
        return torch.nn.functional.mse_loss(model["l2"](h).float(), y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model["l2"](torch.tanh(model["l1"](x)))
        report = gradcheck.check_gradients(loss, params=model)
        after = model["l2"](torch.tanh(model["l1"](x)))
    assert report.status == status, report.message()
    assert report.reference_dtype == "float64"
    assert any("torch.autocast('cpu', dtype=torch.bfloat16)" in n for n in report.notes)
    assert "6e-02" in report.message()  # bfloat16's gradient rounding is the one used
    # the user's autocast context goes on with their own weights, not gradcheck's
    assert torch.equal(before, after)


def test_autocast_with_an_explicit_rtol_keeps_the_users_rtol():
    model = _autocast_model()
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = gradcheck.check_gradients(
            lambda: model["l2"](torch.tanh(model["l1"](x))).float().pow(2).mean(),
            params=model,
            rtol=0.1,
        )
    assert report.passed, report.message()
    assert any(
        "torch.autocast('cpu'" in n and "judged at your rtol=0.1" in n
        for n in report.notes
    ), report.message()


class PaddedTagger(torch.nn.Module):
    def __init__(self, **emb):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8, **emb)
        self.head = torch.nn.Linear(8, 1)
        with torch.no_grad():  # loaded weights: the padding row is not zero
            self.emb.weight.normal_()

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).pow(2).mean()


def test_padding_idx_in_the_loss_is_a_mismatch_that_names_padding_idx():
    """Item 8: torch zeroes the padding row's gradient by design; the mismatch is
    right, and the message says why and what to do."""
    torch.manual_seed(0)
    model = PaddedTagger(padding_idx=0)
    with_pad = torch.tensor([[3, 0, 5, 7], [0, 2, 9, 1]])
    report = gradcheck.check_gradients(lambda: model(with_pad), params=model)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "emb.weight" and report.location.index[0] == 0
    assert "'emb.weight' row 0 is nn.Embedding's padding_idx" in report.message()
    assert "keep padding ids out" in report.message()
    no_pad = torch.tensor([[3, 4, 5, 7], [6, 2, 9, 1]])
    assert gradcheck.check_gradients(lambda: model(no_pad), params=model).passed


def test_padding_idx_is_not_blamed_for_a_real_bug_elsewhere():
    torch.manual_seed(0)
    model = PaddedTagger(padding_idx=0)
    ids = torch.tensor([[3, 4, 5, 7], [6, 2, 9, 1]])

    def loss():
        return tm.ScaledBackward.apply(model.emb(ids), 1.01).tanh().sum()

    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()
    assert "padding_idx" not in report.message()


def test_embedding_max_norm_is_named():
    """Rows above max_norm are renormalised in place, outside autograd: not the
    function torch differentiates. Whatever the verdict, the message names it."""
    torch.manual_seed(0)
    model = PaddedTagger(max_norm=1.0)
    ids = torch.tensor([[3, 4, 5, 7], [6, 2, 9, 1]])
    report = gradcheck.check_gradients(lambda: model(ids), params=model)
    # the first forward renormalises the rows to just below max_norm: at steps
    # small enough not to push them back over it, the function is a plain lookup
    # and torch's gradient is right there (a smaller-step pass); at the usual step
    # the renormalisation kicks in. The verdict may be either; the note is not.
    assert report.status in ("mismatch", "nondifferentiable", "passed")
    assert "nn.Embedding(max_norm=1) and 20 of its rows" in report.message()
    model = PaddedTagger(max_norm=100.0)  # no row reaches it: nothing to say
    report = gradcheck.check_gradients(lambda: model(ids), params=model)
    assert report.passed and "max_norm" not in report.message(), report.message()


@pytest.mark.parametrize("kind", ["tensor", "module"])
def test_gradient_hooks_are_named(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    )
    x = torch.randn(16, 10)
    if kind == "tensor":
        handle = model[0].weight.register_hook(lambda g: g * 0.5)
    else:  # halves what flows back into the first layer
        handle = model[2].register_full_backward_hook(
            lambda m, gin, gout: (gin[0] * 0.5,)
        )
    try:
        report = gradcheck.check_gradients(lambda: model(x).pow(2).mean(), params=model)
        assert report.status == "mismatch", report.message()
        expected = "gradient hook" if kind == "tensor" else "module backward hooks"
        assert expected in report.message()
    finally:
        handle.remove()
    report = gradcheck.check_gradients(lambda: model(x).pow(2).mean(), params=model)
    assert report.passed and "hook" not in report.message()


def test_straight_through_estimator_is_named():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12))
    x = torch.randn(16, 10)

    def loss():  # quantise the weights, straight-through
        w = model[0].weight
        q = w + (torch.round(w * 4) / 4 - w).detach()
        return torch.tanh(x @ q.t() + model[0].bias).pow(2).mean()

    report = gradcheck.check_gradients(loss, params=model)
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "0.weight"
    assert "straight-through" in report.message()


def test_gradient_penalty_at_a_kink_is_nondifferentiable_with_the_census():
    """The kink census runs fn once more: with grad enabled when fn
    differentiates inside, so the units on ReLU's kink are still counted."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    ).double()
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.randn(8, 4, dtype=torch.float64)
    x[:3] = 0  # 3 rows x 16 units exactly at ReLU's kink

    def loss():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        return out.pow(2).mean() + 0.5 * (g.norm(dim=1) - 1).pow(2).mean()

    report = gradcheck.check_gradients(loss, params=model, mode="directional")
    assert report.status == "nondifferentiable", report.message()
    assert "48 unit(s) sit exactly on a kink" in report.message()
