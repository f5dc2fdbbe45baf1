"""Speed paths of the engine (issues 12 and 17): one host BLAS thread during a
check, float64 shadows of a model kept across checks until its parameters change,
and the probe direction built with fewer full-size temporaries. Each must leave
verdicts, determinism per seed and the user's state exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

import gradcheck
from gradcheck import _blas


def test_blas_single_threaded_inside_and_restored_after():
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    with _blas.single_threaded():
        assert _blas.threads() == 1
        with _blas.single_threaded():  # nested: the outer block's count survives
            assert _blas.threads() == 1
        assert _blas.threads() == 1
    assert _blas.threads() == before


def test_blas_count_restored_when_the_block_raises():
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    with pytest.raises(RuntimeError), _blas.single_threaded():
        raise RuntimeError("boom")
    assert _blas.threads() == before


def test_a_check_runs_with_one_blas_thread_and_restores_the_count():
    torch = pytest.importorskip("torch")
    before = _blas.threads()
    if before is None:
        pytest.skip("NumPy loaded no OpenBLAS here")
    seen = []
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))

    def fn():
        seen.append(_blas.threads())
        return (w.sin() ** 2).sum()

    assert gradcheck.check_gradients(fn, params=[w]).passed
    assert seen and set(seen) == {1}
    assert _blas.threads() == before
    np.dot(np.ones(3), np.ones(3))  # NumPy still works after the restore


def _gaussian_reference(rng, shape):
    """The Box-Muller draw as written before the in-place version."""
    n = int(np.prod(shape, dtype=np.int64))
    half = (n + 1) // 2
    u = rng.random((2, half), dtype=np.float32)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))
    angle = np.float32(2 * np.pi) * u[1]
    out = np.empty(2 * half, dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle), out=out[half:])
    return out[:n].reshape(shape)


@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (7,), (3, 5), (257, 129)])
def test_in_place_gaussian_draws_the_same_numbers(shape):
    from gradcheck.numeric.directions import gaussian

    for seed in range(3):
        ref = _gaussian_reference(np.random.default_rng(seed), shape)
        got = gaussian(np.random.default_rng(seed), shape)
        low = gaussian(np.random.default_rng(seed), shape, dtype=np.float32)
        assert got.dtype == np.float64 and low.dtype == np.float32
        assert np.array_equal(got, ref)
        assert np.array_equal(low.astype(np.float64), ref)


def test_probe_direction_is_the_formula_bit_for_bit():
    from gradcheck.numeric.directions import ALIGNED, FLOOR, probe_direction

    rng = np.random.default_rng(1)
    grads = [
        rng.standard_normal((300, 7)),
        np.zeros(5),  # no gradient: Gaussian part only, divided by the floor
        rng.standard_normal(11) * 1e-9,
        rng.standard_normal(4),
    ]
    got, norms = probe_direction(grads, np.random.default_rng(4))
    again, _ = probe_direction(grads, np.random.default_rng(4))
    ref_rng = np.random.default_rng(4)
    gnorms = [float(np.linalg.norm(g)) for g in grads]
    floor = FLOOR * max(gnorms)
    for g, gn, d, d2, norm in zip(grads, gnorms, got, again, norms, strict=True):
        z = _gaussian_reference(ref_rng, g.shape)
        if gn > 0:
            z += (ALIGNED / gn) * g
        assert norm == max(gn, floor)
        z *= 1.0 / norm
        assert np.array_equal(d, z) and np.array_equal(d, d2)


@pytest.mark.parametrize("block", [7, 1 << 15])
def test_streamed_direction_is_probe_direction_of_the_widened_gradients(
    monkeypatch, block
):
    """A float32 gradient read as it came (no float64 copy): its norm, its
    direction and <g, d>, |d|^2 summed block by block are those of the widened
    copy, the direction bit for bit and the sums to float64 rounding; a float64
    gradient keeps probe_direction's own path and sums (None). Blocks of 7
    elements put many block boundaries inside every tensor."""
    from gradcheck.numeric import blocks
    from gradcheck.numeric import directions as dirs

    monkeypatch.setattr(blocks, "BLOCK", block)
    rng = np.random.default_rng(1)
    grads = [
        rng.standard_normal((300, 7)).astype(np.float32),
        np.zeros(5, np.float32),  # no gradient: Gaussian part over the floor
        (rng.standard_normal(11) * 1e-9).astype(np.float32),
        rng.standard_normal(4),  # float64: probe_direction's own path
        rng.standard_normal((40, 41)).astype(np.float32),
    ]
    wide = [g.astype(np.float64) for g in grads]
    gnorms = [blocks.host_norm(g) for g in grads]
    want_norms = [float(np.linalg.norm(g)) for g in wide]
    np.testing.assert_allclose(gnorms, want_norms, rtol=1e-14)
    assert gnorms[3] == want_norms[3]  # float64: NumPy's own routine
    got, normalisers, sums = dirs.streamed_probe_direction(
        grads, np.random.default_rng(4), gnorms
    )
    want, want_normalisers = dirs.probe_direction(
        wide, np.random.default_rng(4), gnorms
    )
    assert normalisers == want_normalisers
    for t, (g, d, w, sm) in enumerate(zip(wide, got, want, sums, strict=True)):
        assert d.dtype == np.float64 and np.array_equal(d, w), t
        if grads[t].dtype == np.float64:
            assert sm is None
            continue
        gd, dd = sm
        np.testing.assert_allclose(gd, np.dot(g.ravel(), w.ravel()), rtol=1e-13)
        np.testing.assert_allclose(dd, np.dot(w.ravel(), w.ravel()), rtol=1e-13)
    # a float64 sum over many blocks, not float32 accumulation (whose error
    # is ~1e-7 relative, as large as the errors a float32 check looks for)
    big = np.full(1 << 20, 0.1, np.float32)
    exact = float(np.linalg.norm(big.astype(np.float64)))
    assert blocks.host_norm(big) == pytest.approx(exact, rel=1e-11)
    assert float(np.linalg.norm(big)) != pytest.approx(exact, rel=1e-9)


def test_float32_check_reads_its_gradients_without_a_float64_copy(monkeypatch):
    """A passing float32 directional check takes torch's float32 gradients as
    NumPy views (no float64 copy, _to_host64 never called) and gives the
    verdict of the float64 copies; a failing one widens them for its diagnosis
    and names the planted tensor."""
    torch = pytest.importorskip("torch")
    import gradcheck
    from gradcheck.backends import torch as torch_backend
    from tests._planted import scaled_backward

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    x = torch.randn(9, 6)
    calls: list[tuple[int, ...]] = []
    real = torch_backend._to_host64

    def counted(t):
        calls.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(torch_backend, "_to_host64", counted)
    report = gradcheck.check_gradients(
        lambda: model(x).pow(2).mean(), params=model, mode="directional"
    )
    assert report.status == "passed", report.message
    assert calls == []
    bug = scaled_backward(1e-3)
    hook = model[2].register_forward_hook(lambda _m, _a, out: bug.apply(out))
    try:
        failing = gradcheck.check_gradients(
            lambda: model(x).pow(2).mean(), params=model, mode="directional"
        )
    finally:
        hook.remove()
    assert failing.status == "mismatch", failing.message
    assert failing.location is not None
    assert failing.location.tensor.startswith(("0.", "2.")), failing.location


def test_kept_gaussian_part_gives_the_same_direction_and_generator_state():
    from gradcheck.numeric import directions as dirs

    rng = np.random.default_rng(7)
    grads = [rng.standard_normal((300, 300)), rng.standard_normal(300)]
    dirs._memo = None
    first_rng = np.random.default_rng(3)
    first, _ = dirs.probe_direction(grads, first_rng)
    assert dirs._memo is not None  # 90,300 elements: kept
    again_rng = np.random.default_rng(3)
    again, _ = dirs.probe_direction(grads, again_rng)  # from the kept samples
    dirs._memo = None
    fresh_rng = np.random.default_rng(3)
    fresh, _ = dirs.probe_direction(grads, fresh_rng)
    for a, b, c in zip(first, again, fresh, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    # the generator continues exactly as after a real draw
    later = [r.random(4) for r in (first_rng, again_rng, fresh_rng)]
    assert np.array_equal(later[0], later[1]) and np.array_equal(later[0], later[2])
    # another seed or other shapes draw anew
    other, _ = dirs.probe_direction(grads, np.random.default_rng(4))
    assert not np.array_equal(other[0], first[0])
    # same shapes, another gradient: the same Gaussian part, the direction
    # built from the new gradient ((z + 3 g/|g|) / |g| halves when g doubles)
    twice, _ = dirs.probe_direction([g * 2 for g in grads], np.random.default_rng(3))
    np.testing.assert_allclose(twice[0] * 2, first[0], rtol=1e-12)
    assert not np.array_equal(
        dirs.probe_direction([grads[0] + 1, grads[1]], np.random.default_rng(3))[0][0],
        first[0],
    )


# ------------------------------------------------------------------ torch buffers
def _mlp(torch, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 3)
    ).to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    return model, x


def _verdict(report):
    return (
        report.status,
        report.error,
        report.tolerance,
        [t.analytical for t in report.tensors],
        [(s.step, s.estimate) for s in report.steps],
    )


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_kept_buffers_never_carry_old_values(dtype_name):
    """A parameter changed in place between two checks (through .data, which
    bumps no version counter, and through an optimizer step) is checked at its
    new values: the second check is bit-identical to one on a fresh copy of the
    changed model with nothing kept, and the user's state is untouched."""
    torch = pytest.importorskip("torch")
    from gradcheck.backends import _torch_pool
    from tests._state import assert_same_rng, rng_state

    dtype = getattr(torch, dtype_name)
    model, x = _mlp(torch, dtype)
    _torch_pool.clear()
    assert gradcheck.check_gradients(
        lambda: (model(x) ** 2).mean(), params=model
    ).passed
    assert _torch_pool.held_bytes() > 0  # the float64 buffers were kept
    kept = {id(b) for b in _torch_pool._free.values()}
    with torch.no_grad():
        model[0].weight.data.mul_(1.5)  # no version bump
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(x) ** 2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    before = rng_state()
    second = gradcheck.check_gradients(lambda: (model(x) ** 2).mean(), params=model)
    assert_same_rng(before)
    for k, v in model.state_dict().items():  # the user's values, bit for bit
        assert torch.equal(v, snapshot[k])
    assert all(p.grad is None for p in model.parameters())
    assert kept & {id(b) for b in _torch_pool._free.values()}  # reused, given back

    fresh_model, _ = _mlp(torch, dtype)
    fresh_model.load_state_dict(snapshot)
    _torch_pool.clear()
    fresh = gradcheck.check_gradients(
        lambda: (fresh_model(x) ** 2).mean(), params=fresh_model
    )
    assert _verdict(second) == _verdict(fresh)
    # and not the verdict of the model before the change
    old_model, _ = _mlp(torch, dtype)
    old = gradcheck.check_gradients(
        lambda: (old_model(x) ** 2).mean(), params=old_model
    )
    assert _verdict(second) != _verdict(old)


def test_kept_buffers_are_bounded_and_host_only():
    torch = pytest.importorskip("torch")
    from gradcheck.backends import _torch_pool

    _torch_pool.clear()
    big = torch.empty(_torch_pool.LIMIT_BYTES // 8 + 1, dtype=torch.float64)
    _torch_pool.give([big])  # larger than the bound: not kept
    assert _torch_pool.held_bytes() == 0
    half = _torch_pool.LIMIT_BYTES // 8 // 2
    a, b, c = (torch.empty(half, dtype=torch.float64) for _ in range(3))
    _torch_pool.give([a, b])
    assert _torch_pool.held_bytes() == _torch_pool.LIMIT_BYTES
    _torch_pool.give([c])  # the oldest goes
    assert _torch_pool.held_bytes() == _torch_pool.LIMIT_BYTES
    assert _torch_pool.take((half,), torch.float64, torch.device("cpu")) is b
    assert _torch_pool.take((half,), torch.float64, torch.device("cpu")) is c
    other = _torch_pool.take((half,), torch.float64, torch.device("cpu"))
    assert other is not a and other.shape == (half,)
    assert _torch_pool.take((3,), torch.float32, "cpu").dtype == torch.float32
    _torch_pool.clear()
    assert _torch_pool.held_bytes() == 0


# ------------------------------------------------------------------ host arrays
def _ptr(a) -> int:
    return int(a.__array_interface__["data"][0])


def test_workspace_reuses_only_arrays_nothing_refers_to():
    from gradcheck.numeric import workspace

    torch = pytest.importorskip("torch")
    workspace.clear()
    shape = (512, 128)  # 512 KiB of float64: above MIN_BYTES
    a = workspace.empty(shape)
    where = _ptr(a)
    b = workspace.empty(shape)
    other = _ptr(b)
    assert other != where  # a is still referenced
    del a
    c = workspace.empty(shape)
    reused = _ptr(c)
    assert reused == where  # nothing referred to it any more: reused
    view = c[:3]
    del c
    fresh = _ptr(workspace.empty(shape))
    assert fresh not in (where, other)  # a view keeps c, b is held
    del view
    shared = torch.from_numpy(workspace.empty(shape, np.float32))
    again = _ptr(workspace.empty(shape, np.float32))
    assert again != shared.data_ptr()  # a tensor sharing its memory keeps it
    assert workspace.empty((3,)).shape == (3,)  # small: plain np.empty
    assert workspace.held_bytes() <= workspace.LIMIT_BYTES
    del b
    workspace.clear()
    assert workspace.held_bytes() == 0


def test_reference_evaluations_widen_each_tensor_once():
    """x + t d is formed from x's exact widening: a session makes it once per
    tensor and both points of a central difference read it (the widening copy
    was a third of forming the points); a lean session (Session.lean: a large
    model) makes no float64 copy of a tensor the direction moves, only of those
    a restricted direction leaves where they are (in its one float64 buffer
    per tensor, see TorchSession._shadow). The values are those of
    x + t d from a float64 copy either way."""
    torch = pytest.importorskip("torch")
    from gradcheck.backends.torch import TorchSession

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh())
    x = torch.randn(5, 8)
    d = [
        np.random.default_rng(i).standard_normal(sh)
        for i, sh in enumerate([(4, 8), (4,)])
    ]
    w, b = (p.detach().double() for p in model[0].parameters())
    want = {
        t: float(
            torch.tanh(
                x.double() @ (w + t * torch.as_tensor(d[0])).T
                + b
                + t * torch.as_tensor(d[1])
            ).sum()
        )
        for t in (1e-3, -1e-3)
    }
    for lean in (False, True):
        with TorchSession(lambda: model(x).sum(), [], model) as s:
            s.lean = lean
            s.analytic()
            handle = s.prepare(d)
            moved = {t: float(s.outputs_at(handle, t)[0]) for t in want}
            if lean:
                assert not s._f64  # every tensor moved: no copies
            else:
                widened = {k: v[1].data_ptr() for k, v in s._f64.items()}
                assert len(widened) == 2  # one per tensor, for both points
                s.outputs_at(handle, 1e-3)
                assert {k: v[1].data_ptr() for k, v in s._f64.items()} == widened
            only = [d[0], None]  # the bias stays: its float64 copy is read
            s.outputs_at(s.prepare(only), 1e-3)
            # (a lean session's copy of it is its one float64 shadow)
            assert len(s._f64) == (0 if lean else 2)
        for t, v in moved.items():
            assert abs(v - want[t]) <= 1e-12 * abs(want[t]), (lean, t)


@pytest.mark.parametrize("case", ["passing", "failing", "full", "forward"])
def test_report_cost_says_where_the_time_went(monkeypatch, case):
    """cost["reference_seconds"] holds every finite-difference evaluation the
    check made (the passing check's central difference, a failure's diagnosis,
    full mode's columns) and cost["gradient_seconds"] the framework's derivative
    judged (the forward and VJP at x, full mode's rows, forward mode's JVPs),
    each within cost["seconds"]: the session's calls are slowed by a known
    sleep, and each part holds its own calls' sleeps and not the other's."""
    torch = pytest.importorskip("torch")
    import time

    from gradcheck.backends import torch as torch_backend
    from tests._planted import scaled_backward

    pause = 0.01
    calls = {"outputs_at": 0, "analytic": 0, "vjp": 0, "jvp": 0}
    session = torch_backend.TorchSession
    for name in calls:
        real = getattr(session, name)

        def slowed(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            time.sleep(pause)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(session, name, slowed)
    torch.manual_seed(0)
    small = case == "full"
    model = torch.nn.Sequential(
        torch.nn.Linear(3 if small else 6, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 1 if small else 3),
    )
    x = torch.randn(5, model[0].in_features)
    hook = None
    if case == "failing":
        bug = scaled_backward(1e-2)
        hook = model[2].register_forward_hook(lambda _m, _a, out: bug.apply(out))
    try:
        report = gradcheck.check_gradients(
            lambda: model(x).pow(2).mean(),
            params=model,
            mode="full" if small else "directional",
            ad="forward" if case == "forward" else "reverse",
        )
    finally:
        if hook is not None:
            hook.remove()
    assert report.status == ("mismatch" if case == "failing" else "passed"), (
        report.message
    )
    cost = report.cost
    gradient, reference = cost["gradient_seconds"], cost["reference_seconds"]
    assert calls["outputs_at"] >= 2 and calls["analytic"] >= 1
    # every evaluation's sleep is in the reference part, and only those
    assert reference >= calls["outputs_at"] * pause
    assert reference < (calls["outputs_at"] + 1) * pause + cost["seconds"] - gradient
    # the derivative judged is the gradient part: every analytic call, VJP and
    # JVP of a passing check (a failure's diagnosis takes more gradients of its
    # own, the check's own work: there, run()'s forward and VJP)
    judged = sum(calls[k] for k in ("analytic", "vjp", "jvp"))
    if case == "failing":
        judged = 2
    elif case == "forward":
        assert calls["jvp"] >= 1
    elif case == "full":
        assert calls["vjp"] >= 2  # run()'s VJP, then the retained graph's release
    assert gradient >= judged * pause
    assert gradient < cost["seconds"] - calls["outputs_at"] * pause
    assert gradient + reference <= cost["seconds"]
