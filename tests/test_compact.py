"""Compact gradients and directions (numeric.compact, issue 17's peak memory).

A directional check of a model of at least ``COMPACT_MIN_ELEMENTS`` elements holds
its gradients and probe direction in float32 where they are float32, and no
session-long copy of the model's parameters. These tests run the engine with the
threshold at 0 (every directional check compact) and ask what the large-model
path must give: the same verdicts (a correct model passes, a planted backward
bug is a mismatch blamed on its tensor, float32 and float64), the user's state
bit for bit, and the memory actually saved (the float32 storage is used)."""

from __future__ import annotations

import numpy as np
import pytest

from gradcheck.numeric import compact as cpt
from gradcheck.numeric import directions as dirs
from gradcheck.numeric.compact import Widened

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from gradcheck.properties import finite_difference as fdp  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402


# ----------------------------------------------------------------- the container
def test_widened_reads_float32_arrays_as_their_exact_float64_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(5)  # float64: handed out as is
    w = Widened([a, None, b])
    assert len(w) == 3 and w.shapes() == [(3, 4), None, (5,)]
    assert w.sizes() == [12, 0, 5] and w.nbytes() == a.nbytes + b.nbytes
    first = w[0]
    assert first.dtype == np.float64 and np.array_equal(first, a.astype(np.float64))
    assert w[1] is None and w[2] is b
    assert [x is None for x in w] == [False, True, False]
    assert isinstance(w[1:], Widened) and w[1:].narrow[1] is b
    # a float32 dot product would round; the widened one is float64 throughout
    assert float(np.vdot(w[0], w[0])) == float(np.vdot(a.astype(np.float64), a))


def test_subset_keeps_a_widened_compact_and_a_list_a_list():
    a, b = np.ones(2, np.float32), np.zeros(3, np.float32)
    sub = cpt.subset(Widened([a, b]), [1])
    assert isinstance(sub, Widened) and sub.narrow == [None, b]
    assert cpt.subset([a, b], [0]) == [a, None]
    assert cpt.narrow(Widened([a])) == [a] and cpt.narrow((a,)) == [a]


def test_compact_directions_are_the_float64_directions_rounded_once():
    rng_g = np.random.default_rng(1)
    grads = [rng_g.standard_normal(s) for s in ((40, 30), (7,), (3, 3))]
    grads[1][:] = 0.0  # a tensor without gradient: the floor normalises it
    low = [g.astype(np.float32) for g in grads]
    wide = [g.astype(np.float64) for g in low]  # the float64 path's inputs
    gn = [float(np.linalg.norm(g)) for g in wide]
    d64, n64 = dirs.probe_direction(wide, np.random.default_rng(7), gn)
    d32, n32 = dirs.probe_direction(Widened(low), np.random.default_rng(7), gn)
    assert isinstance(d32, Widened) and n32 == n64
    for full, compact in zip(d64, d32.narrow, strict=True):
        assert compact.dtype == np.float32
        assert np.array_equal(compact, full.astype(np.float32))


def test_a_direction_outside_float32_range_stays_float64():
    g = np.full(4, 1e35)  # a float64 model's huge gradient: 1/norm ~ 5e-36
    d, _ = dirs.probe_direction(Widened([g]), np.random.default_rng(0), [2e35])
    assert d.narrow[0].dtype == np.float64 and np.all(d.narrow[0] != 0)


# ----------------------------------------------------------------- the engine
class _TwoHead(torch.nn.Module):
    def __init__(self, bug: float = 0.0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(6, 16).to(dtype)
        self.a = torch.nn.Linear(16, 3).to(dtype)
        self.b = torch.nn.Linear(16, 2).to(dtype)
        self.bug = scaled_backward(bug) if bug else None

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        if self.bug is not None:
            h = self.bug.apply(h)
        return self.a(h), self.b(h)


def _loss(model, x):
    ya, yb = model(x)
    return (ya**2).mean() + 0.3 * (yb * torch.linspace(-1, 1, 2, dtype=yb.dtype)).sum()


@pytest.fixture
def compact_engine(monkeypatch):
    """Every directional check compact; counts the Widened containers made."""
    made: list[Widened] = []

    class Counted(Widened):
        def __init__(self, arrays):
            super().__init__(arrays)
            made.append(self)

    monkeypatch.setattr(fdp, "COMPACT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fdp, "Widened", Counted)
    return made


def _check(model, x, **kw):
    return gradcheck.check_gradients(
        lambda: _loss(model, x), params=model, mode="directional", seed=3, **kw
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_correct_model_passes_and_planted_bug_fails_on_the_compact_path(
    compact_engine, dtype
):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=dtype)
    good = _check(_TwoHead(dtype=dtype), x)
    assert good.status == "passed", good.headline()
    assert compact_engine and compact_engine[0].narrow[0].dtype == (
        np.float32 if dtype == torch.float32 else np.float64
    )
    bad = _check(_TwoHead(bug=1e-3, dtype=dtype), x)
    assert bad.status == "mismatch", bad.headline()
    assert bad.location is not None and bad.location.tensor.startswith("trunk.")


def test_compact_and_full_paths_agree(monkeypatch):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    full = _check(_TwoHead(), x)
    monkeypatch.setattr(fdp, "COMPACT_MIN_ELEMENTS", 0)
    small = _check(_TwoHead(), x)
    assert full.status == small.status == "passed"
    # the analytical side per tensor: <g_t, d_t> with d_t rounded to float32
    for a, b in zip(full.tensors, small.tensors, strict=True):
        assert a.grad_norm == b.grad_norm  # the gradient itself: exactly the same
        assert b.analytical == pytest.approx(a.analytical, rel=1e-5, abs=1e-6)


class _WritesItsWeights(torch.nn.Module):
    """A forward that rescales its own weight in place (a max-norm constraint
    written as a side effect): gradcheck must never write the user's storage."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.mul_(0.5)
        return torch.tanh(self.lin(x)).sum()


@pytest.mark.parametrize("compact", [False, True])
def test_user_storage_is_untouched_by_an_fn_that_writes_its_weights(
    monkeypatch, compact
):
    if compact:
        monkeypatch.setattr(fdp, "COMPACT_MIN_ELEMENTS", 0)
    model = _WritesItsWeights()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    weight = model.lin.weight
    storage, before = weight.data, weight.detach().clone()
    grad_before = weight.grad
    rng = rng_state()
    report = gradcheck.check_gradients(
        lambda: model(x), params=model, mode="directional", seed=0
    )
    assert report.status in ("passed", "mismatch", "nondeterministic")
    assert model.lin.weight is weight and weight.data.data_ptr() == storage.data_ptr()
    assert torch.equal(weight.detach(), before) and weight.grad is grad_before
    assert_same_rng(rng)


def test_large_model_uses_the_compact_path_without_being_told():
    n = fdp.COMPACT_MIN_ELEMENTS
    assert n == 1 << 24  # 128 MB per float64 set: see the constant's comment
    lin = torch.nn.Linear(1 << 12, 1 << 12, bias=False)  # 2**24 elements
    x = torch.randn(2, 1 << 12, generator=torch.Generator().manual_seed(0))
    seen = []
    from gradcheck.backends import torch as tb

    original = tb.TorchSession.vjp

    def spy(self, cot, retain=False, *, compact=False):
        out = original(self, cot, retain, compact=compact)
        seen.append((compact, [None if g is None else g.dtype for g in out]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tb.TorchSession, "vjp", spy)
        report = gradcheck.check_gradients(
            lambda: torch.tanh(lin(x)).square().mean(), params=lin, seed=0
        )
    assert report.status == "passed", report.headline()
    assert seen[0] == (True, [np.float32])


def test_gradients_are_handed_over_without_a_copy_unless_the_storage_is_reused():
    from gradcheck import backends

    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    x = torch.randn(3, dtype=torch.float64)
    with backends.open_session(lambda x: (w * x).sum(), (x,), [w]) as s:
        s.analytic()
        fresh = torch.randn(3, dtype=torch.float64)
        pooled = s._pooled((3,), torch.float64, torch.device("cpu")).copy_(fresh)
        grads = [fresh, None, pooled, w.detach(), x]
        out = s._read_gradients(grads)
        assert grads == [None] * 5  # each tensor dropped once read
        assert np.shares_memory(out[0], fresh.numpy()) and out[1] is None
        # the session's buffer, the user's parameter and input: copied (a custom
        # backward may return a saved tensor, whose storage is written again)
        for arr, t in zip(out[2:], (pooled, w.detach(), x), strict=True):
            assert not np.shares_memory(arr, t.numpy())
            assert np.array_equal(arr, t.numpy())
        # a lean session's float64 shadow of a parameter (written again by the
        # next evaluation at a moved point): copied too
        s.lean = True
        shadow = s._as64(s._native[id(w)])
        (arr,) = s._read_gradients([shadow])
        assert not np.shares_memory(arr, shadow.numpy())
        assert np.array_equal(arr, shadow.numpy())


def test_widened_dot_in_pieces_is_the_float64_dot(monkeypatch):
    from gradcheck.backends import torch as tb

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10_007, generator=gen)
    b = torch.randn(10_007, generator=gen) * 1e3
    exact = float(np.dot(a.numpy().astype(np.float64), b.numpy().astype(np.float64)))
    monkeypatch.setattr(tb, "DOT_CHUNK", 1000)
    assert tb._dot64(a, b) == pytest.approx(exact, rel=1e-13)
    # a float32 dot product would be off by far more than that
    assert abs(float(torch.dot(a, b)) - exact) > 1e-13 * abs(exact)


# ----------------------------------------------------------------- a failing check's memory
class _TwoHeadFloat32Bug(_TwoHead):
    """The planted bug in the float32 kernel alone (the float64 path right): a
    failing float32 check then runs the precision split and its rounding draws."""

    def __init__(self):
        super().__init__()
        self.bug = scaled_backward(1e-3, only_float32=True)


@pytest.mark.parametrize("compact", [False, True])
def test_a_float32_only_bug_is_caught_with_or_without_the_lean_path(
    monkeypatch, compact
):
    if compact:
        monkeypatch.setattr(fdp, "COMPACT_MIN_ELEMENTS", 0)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    bad = _check(_TwoHeadFloat32Bug(), x)
    assert bad.status == "mismatch", bad.headline()
    assert bad.location is not None and bad.location.tensor.startswith("trunk.")
    assert any("float32 code path only" in n for n in bad.notes), bad.notes
    assert _check(_TwoHead(), x).status == "passed"


def test_a_lean_session_holds_no_float64_copy_through_a_native_evaluation(
    monkeypatch,
):
    from gradcheck.backends import torch as tb

    monkeypatch.setattr(fdp, "COMPACT_MIN_ELEMENTS", 0)
    seen = []
    original = tb.TorchSession._evaluate

    def spy(self, handle, t, promote, then=None, **kw):
        out = original(self, handle, t, promote, then, **kw)
        seen.append(
            (self.lean, promote, len(self._f64), len(self._scratch_buffers))
            + ((len(self._shadows),) if not promote else ())
        )
        return out

    monkeypatch.setattr(tb.TorchSession, "_evaluate", spy)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    assert _check(_TwoHeadFloat32Bug(), x).status == "mismatch"
    assert {s[0] for s in seen} == {True} and {s[1] for s in seen} == {True, False}
    # no cached float64 copy or per-tensor scratch: one shadow per tensor, and
    # none once a native evaluation has run
    assert all(s[2] == 0 and s[3] == 0 for s in seen)
    assert all(s[4] == 0 for s in seen if not s[1])


def test_native_ulp_moves_are_the_wide_sum_rounded():
    from gradcheck import backends

    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(
        torch.randn(4096, generator=gen)
        * 10.0 ** torch.randint(-30, 30, (4096,), generator=gen)
    )
    with backends.open_session(lambda: (w * w).sum(), (), [w]) as s:
        s.analytic()
        (move,) = s.ulp_moves("float32", 4, seed=3)
        assert move.dtype == torch.float32 and bool((move != 0).any())
        own = w.detach()
        for t in (1.0, -1.0):
            got = s._moved_native(own, move, t)
            wide = (own.double() + t * move.double()).float()
            assert torch.equal(got, wide)
            assert got.data_ptr() != own.data_ptr()


def test_rounding_draw_statistics_in_pieces_are_the_stacked_ones(monkeypatch):
    monkeypatch.setattr(cpt, "PIECE", 7)
    rng = np.random.default_rng(0)
    specs = [type("S", (), {"size": n})() for n in (23, 5)]
    g32 = [
        [rng.standard_normal(n).astype(np.float32) for n in (23, 5)] for _ in range(6)
    ]
    g64 = [[rng.standard_normal(n) for n in (23, 5)] for _ in range(6)]
    base = [rng.standard_normal(n) for n in (23, 5)]
    scales = rng.uniform(0.5, 2.0, 6)
    for elementwise in (False, True):
        stats = fdp._Draws(1, specs, elementwise)
        for k in range(6):
            held = [list(g32[k])]
            add = stats.adder(held, float(scales[k]), [base] if elementwise else None)
            for t in range(2):
                add(0, t, g64[k][t])
            assert held == [[None, None]]  # each native gradient dropped once used
        for t in range(2):
            errs = np.stack([(g32[k][t] - g64[k][t]) / scales[k] for k in range(6)])
            spread = np.std(errs, axis=0, ddof=1)
            if elementwise:
                moves = np.stack([g64[k][t] / scales[k] - base[t] for k in range(6)])
                want = fdp.NOISE_SIGMAS * (spread + np.sqrt(np.mean(moves**2, axis=0)))
                got = stats.elements()[0, :23] if t == 0 else stats.elements()[0, 23:]
                np.testing.assert_allclose(got, want, rtol=1e-12)
            else:
                want = fdp.NOISE_SIGMAS * np.linalg.norm(spread)
                assert stats.tensor_norms()[0][t] == pytest.approx(want, rel=1e-12)


def test_the_float64_gradient_summary_in_pieces_is_the_whole_arrays_one(
    monkeypatch,
):
    monkeypatch.setattr(cpt, "PIECE", 5)
    rng = np.random.default_rng(1)
    g = [rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(3)]
    other = [rng.standard_normal((4, 6)), rng.standard_normal(3)]
    d = [rng.standard_normal((4, 6)).astype(np.float32), None]
    ctx = type("Ctx", (), {"grads": Widened(g)})()
    reduce = fdp._Against.reducer(ctx, Widened(d))
    summary = fdp._Against([reduce(0, t, o) for t, o in enumerate(other)])
    wide = [a.astype(np.float64) for a in g]
    assert summary.along == pytest.approx(
        float(np.vdot(other[0], d[0].astype(np.float64))), rel=1e-13
    )
    for t in range(2):
        assert summary.norms[t] == pytest.approx(np.linalg.norm(other[t]), rel=1e-13)
        assert summary.devs[t] == pytest.approx(
            np.linalg.norm(wide[t] - other[t]), rel=1e-13
        )
        diff = np.abs(wide[t] - other[t]).reshape(-1)
        k = int(np.argmax(diff))
        assert summary.worst[t] == (k, other[t].reshape(-1)[k], wide[t].reshape(-1)[k])


def test_torch_gradient_reductions_read_what_gradients_at_gives():
    from gradcheck import backends
    from gradcheck.backends.base import Session

    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    b = torch.nn.Parameter(torch.randn(3, generator=gen))
    unused = torch.nn.Parameter(torch.randn(2, generator=gen))
    x = torch.randn(4, 5, generator=gen)
    with backends.open_session(lambda: torch.tanh(x @ w + b), (), [w, b, unused]) as s:
        s.analytic()
        cots = [[np.ones((4, 3))], [np.linspace(-1, 1, 12).reshape(4, 3)]]

        def reduce(row, t, g):
            return (row, t, g.dtype, g.shape, float(np.linalg.norm(g)))

        for promote in (False, True):
            got = s.gradient_reductions(cots, reduce, promote=promote)
            want = Session.gradient_reductions(s, cots, reduce, promote=promote)
            assert got == want and got[1][2][4] == 0.0  # the unused one: zeros
