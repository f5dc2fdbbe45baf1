"""Mixture-of-experts routing (issue 17): the top-k decisions are held fixed at the
point's (recorded at the first evaluation, replayed in every later one), as the
gradient holds them; the report says how many flip within the step; a wrong
backward in one expert is still a mismatch; nothing of the mode outlives the
check, and the user's model is left bit-identical."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

pytestmark = pytest.mark.torch

_Scale = scaled_backward(1e-3)


class TinyMoE(torch.nn.Module):
    """Per-token top-2 of 4 experts (Mixtral's router: softmax, topk,
    renormalised weights). ``zero_router``: every score ties (afmoe's init), so
    any step moves some decision. ``planted``: expert ``planted``'s output goes
    through an identity whose backward is 1e-3 off."""

    def __init__(self, zero_router=False, planted=None, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(6, 8)
        self.router = torch.nn.Linear(8, 4, bias=False)
        if zero_router:
            torch.nn.init.zeros_(self.router.weight)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.out = torch.nn.Linear(8, 3)
        self.planted = planted
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        probs = torch.softmax(self.router(h), -1)
        top, idx = torch.topk(probs, 2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel() == 0:
                continue
            y = torch.tanh(expert(h[rows]))
            if self.planted == e:
                y = _Scale.apply(y)
            mixed = mixed.index_add(0, rows, y * top[rows, slot, None])
        return self.out(mixed)


def _x(dtype=torch.float64):
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _loss(model, x):
    return lambda: model(x).pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moe_with_tied_router_passes_and_says_how_many_decisions_flip(dtype):
    model, x = TinyMoE(zero_router=True, dtype=dtype), _x(dtype)
    report = gradcheck.check_gradients(_loss(model, x), params=model, seed=0)
    assert report.passed, report.message()
    assert "nearby point" not in report.message()  # judged at x itself
    note = next(n for n in report.notes if n.startswith("routing: "))
    assert "routing decisions flip within the step" in note
    assert "12 decisions per evaluation" in note  # 12 tokens, 1 topk call
    flipped = int(note.split("); ")[1].split(" of ")[0])
    assert flipped > 0, note  # a zero router ties everywhere: steps move picks
    assert "TinyMoE.forward" in note


def test_without_the_replay_the_same_model_is_not_differentiable():
    """The replay is what makes the tied model checkable at its own point: turned
    off, the steps cross decisions and the differences at x do not converge."""
    from gradcheck.backends import _torch_routing

    model, x = TinyMoE(zero_router=True), _x()
    saved = _torch_routing._TOPK
    _torch_routing._TOPK = ()
    try:
        report = gradcheck.check_gradients(_loss(model, x), params=model, seed=0)
    finally:
        _torch_routing._TOPK = saved
    # differences at x do not converge: at best the check moves to a nearby point
    assert not report.passed or "nearby point" in report.message(), report.message()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zero_router", [False, True])
def test_a_wrong_backward_in_one_expert_is_a_mismatch(dtype, zero_router):
    # expert 2 is one every tied token picks (torch's topk breaks the tie 2, 3)
    model, x = TinyMoE(zero_router=zero_router, planted=2, dtype=dtype), _x(dtype)
    report = gradcheck.check_gradients(_loss(model, x), params=model, seed=0)
    assert report.status == "mismatch", report.message()


def test_the_mode_is_gone_and_the_model_bit_identical_after_the_check():
    model, x = TinyMoE(zero_router=True), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: (p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()}
    model.train()
    rng = rng_state()
    gradcheck.check_gradients(_loss(model, x), params=model, seed=0)
    assert_same_rng(rng)
    assert model.training and all(m.training for m in model.modules())
    assert torch.overrides._get_current_function_mode_stack() == []
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]) and v.dtype == before[n].dtype, n
    for n, p in model.named_parameters():
        assert (p.data_ptr(), p.requires_grad) == params[n], n
        assert p.grad is None
    # topk outside the check is torch's own again
    probs = torch.tensor([[0.1, 0.5, 0.4]], dtype=torch.float64)
    assert torch.topk(probs, 1).indices.tolist() == [[1]]


def test_a_function_without_topk_gets_no_routing_note():
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    report = gradcheck.check_gradients(lambda: (w.sin() * w).sum(), params=[w])
    assert report.passed
    assert not any(n.startswith("routing: ") for n in report.notes)


def test_a_changed_number_of_topk_calls_runs_unheld_and_says_so():
    calls = []

    def fn(w):
        calls.append(1)
        out = torch.topk(w, 2).values.sum()
        if len(calls) > 2:  # from the third call on, one more topk
            out = out + torch.topk(w * 2, 1).values.sum()
        return out

    w = torch.tensor([1.0, 3.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    from gradcheck.backends.torch import TorchSession

    with TorchSession(fn, (w,), None) as s:
        s.analytic()
        s.outputs_at(s.prepare([torch.ones(4).numpy()]), 1e-3)
        s.outputs_at(s.prepare([torch.ones(4).numpy()]), 1e-3)
        note = s._routing_record.note()
    assert note is not None and "could not be held" in note


# ------------------------------------------------------------------ transformers
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hf_mixtral_passes(dtype):
    pytest.importorskip("transformers")
    reports = gradcheck.check_model(
        "hf:mixtral", dtype=dtype, properties="fd", timeout=None
    )
    (report,) = list(reports)
    assert report.passed, report.message()
    assert any(n.startswith("routing: ") for n in report.notes)


def test_hf_mixtral_with_a_wrong_expert_backward_is_a_mismatch():
    pytest.importorskip("transformers")
    from gradcheck.backends import _hf

    model, inputs, _ = _hf.build("mixtral", {}, "hf:mixtral", 0, 10**7)
    experts = model.layers[0].mlp.experts
    handle = experts.register_forward_hook(lambda m, i, o: _Scale.apply(o))
    proj = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    try:
        report = gradcheck.check_gradients(
            lambda: (model(**inputs).last_hidden_state * proj).sum(), params=model
        )
    finally:
        handle.remove()
    assert report.status == "mismatch", report.message()


def _hf_mixtral_grouped_mm():
    """hf:mixtral as a user builds it: transformers' default experts
    implementation, grouped_mm (torch._grouped_mm), float32."""
    pytest.importorskip("transformers")
    from transformers import AutoModel

    from gradcheck.backends import _hf

    cfg = _hf.shrink_config(_hf.load_config("mixtral"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    proj = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    return model, lambda: (model(input_ids=ids).last_hidden_state * proj).sum()


def test_grouped_mm_experts_get_a_float64_reference():
    """torch's CPU grouped_mm refuses float64; the reference evaluations run it
    as one matmul per expert, so a float32 MoE model still gets its float64
    reference (it fell back to float32 and was called nondifferentiable)."""
    model, loss = _hf_mixtral_grouped_mm()
    report = gradcheck.check_gradients(loss, params=model, seed=0)
    assert report.passed, report.message()
    assert report.reference_dtype == "float64"


def test_grouped_mm_experts_with_a_wrong_backward_are_a_mismatch():
    model, loss = _hf_mixtral_grouped_mm()
    handle = model.layers[1].mlp.experts.register_forward_hook(
        lambda m, i, o: _Scale.apply(o)
    )
    try:
        report = gradcheck.check_gradients(loss, params=model, seed=0)
    finally:
        handle.remove()
    assert report.status == "mismatch", report.message()
    assert report.reference_dtype == "float64"


def test_grouped_mm_float64_matches_torch_kernel_in_float32():
    from gradcheck.backends.torch import _grouped_mm_float64

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g)  # the kernel wants 16-byte rows
    b = torch.randn(3, 16, 8, generator=g)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)  # an empty group, a tail
    want = torch._grouped_mm(a, b, offs=offs)[:6]
    got = _grouped_mm_float64(a.double(), b.double(), offs)
    assert torch.allclose(got[:6].float(), want, atol=1e-5)
    assert torch.equal(got[6:], torch.zeros(2, 8, dtype=torch.float64))


def test_type_float32_in_a_reference_evaluation_stays_float64():
    """DeepSeek-style routers (glm4_moe_lite, exaone_moe, minicpm5_moe) cast with
    ``h.type(torch.float32)``: the float64 reference must not round through
    float32 there (it did, and their differences did not converge at x)."""
    from gradcheck.backends.torch import _PromoteToFloat64

    x = torch.randn(3, dtype=torch.float64) / 3
    with _PromoteToFloat64():
        assert x.type(torch.float32).dtype == torch.float64
        assert x.type("torch.FloatTensor").dtype == torch.float64
        assert x.type() == "torch.DoubleTensor"
        assert torch.equal(x.type(torch.float32), x)
    assert x.type(torch.float32).dtype == torch.float32  # outside: torch's own


@pytest.mark.parametrize("spec", ["hf:glm4_moe_lite", "hf:exaone_moe"])
def test_hf_group_routed_moe_passes_in_float64(spec):
    pytest.importorskip("transformers")
    (report,) = list(
        gradcheck.check_model(spec, dtype="float64", properties="fd", timeout=None)
    )
    assert report.passed, report.message()
    assert "nearby point" not in report.message()


class TinySwitch(torch.nn.Module):
    """Switch Transformers' top-1 router: argmax of the router softmax picks the
    expert, the max probability scales its output."""

    def __init__(self, planted=False):
        super().__init__()
        torch.manual_seed(0)
        self.router = torch.nn.Linear(6, 3, bias=False)
        torch.nn.init.zeros_(self.router.weight)  # every pick a tie
        self.experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
        self.planted = planted
        self.double()

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        pick = torch.argmax(probs, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.where(pick == e)[0]
            if rows.numel():
                y = torch.tanh(expert(x[rows])) * probs[rows, e, None]
                if self.planted:
                    y = _Scale.apply(y)
                out = out.index_add(0, rows, y)
        return out.pow(2).mean()


@pytest.mark.parametrize("planted", [False, True])
def test_argmax_routing_is_held_too(planted):
    model, x = TinySwitch(planted), _x()
    report = gradcheck.check_gradients(lambda: model(x), params=model, seed=0)
    if planted:
        assert report.status == "mismatch", report.message()
        return
    assert report.passed and "nearby point" not in report.message(), report.message()
    note = next(n for n in report.notes if n.startswith("routing: "))
    assert note.startswith("routing: fn picks with torch.argmax (1 call in TinySwitch")
    assert int(note.split("); ")[1].split(" of ")[0]) > 0, note
