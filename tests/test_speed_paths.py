"""The measured rounding's draws on the tensors' device (issue 12): the torch
backend's ``ulp_moves`` and ``projected_gradients_at`` against the base class's
host (NumPy) definitions they replace."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcheck  # noqa: E402
from gradcheck.backends.base import Session, _numpy_dtype  # noqa: E402
from gradcheck.backends.torch import TorchSession  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402


def _session(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    # magnitudes over 60 decades (subnormal ulps in float16/bfloat16 included),
    # exact zeros, and a complex tensor (moved as its real and imaginary parts)
    w = torch.nn.Parameter(
        (torch.randn(4000, generator=gen) * torch.logspace(-30, 30, 4000)).to(dtype)
    )
    with torch.no_grad():
        w[::7] = 0
    c = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.complex64))

    def fn():
        return (w.double().clamp(-1e3, 1e3).sin().sum() + (c.abs() ** 2).sum()).float()

    s = TorchSession(fn, [], [w, c])
    s.analytic()
    return s


def _real(t):
    return torch.view_as_real(t).numpy() if t.is_complex() else t.numpy()


@pytest.mark.parametrize("low", ["float32", "float16", "bfloat16"])
def test_ulp_moves_are_whole_ulps_of_the_rounded_value(low):
    s = _session()
    try:
        moves = s.ulp_moves(low, 4, seed=123)
        again = s.ulp_moves(low, 4, seed=123)
        other = s.ulp_moves(low, 4, seed=124)
        ks = []
        for move, same, diff, x in zip(moves, again, other, s.values(), strict=True):
            # a whole number of ulps of a float32-or-narrower value is a float32
            # number: the move is held in float32 (half the memory), exactly
            m = _real(move)
            assert m.dtype == np.float32 and m.shape == x.shape
            m = m.astype(np.float64)
            # the seed decides the move (NaN where |x| overflows the low dtype, as numpy)
            assert np.array_equal(m, _real(same), equal_nan=True)
            assert not np.array_equal(m, _real(diff), equal_nan=True)
            with np.errstate(over="ignore", invalid="ignore"):
                ulp = np.spacing(np.abs(x).astype(_numpy_dtype(low))).astype(np.float64)
            assert (m[x == 0] == 0).all()  # zeros stay
            ok = (x != 0) & np.isfinite(ulp)
            k = m[ok] / ulp[ok]
            assert np.array_equal(k, np.round(k))  # whole ulps, numpy's ulps
            ks.append(k)
        k = np.concatenate(ks)
        assert set(np.unique(k).tolist()) == set(range(-4, 5))
        assert abs(k.mean()) < 0.2 and 6.0 < (k**2).mean() < 7.4  # uniform: 20/3
    finally:
        s.restore()


@pytest.mark.parametrize("low", [torch.float32, torch.float16, torch.bfloat16])
def test_spacing_fallback_equals_nextafter(low):
    """The frexp form (for devices without nextafter in that dtype) gives the
    same ulps as nextafter and as NumPy, subnormals included."""
    from gradcheck.backends.torch import _spacing, _spacing_frexp

    info = torch.finfo(low)
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(5000, generator=gen) * 2 - 1) * 30
    a = torch.exp2(a * 6).to(low)  # 2^-180 .. 2^180: zeros, subnormals, overflow
    a = a[torch.isfinite(a) & (a > 0) & (a < info.max)]
    np.testing.assert_array_equal(
        _spacing_frexp(a).double().numpy(), _spacing(a).double().numpy()
    )
    np.testing.assert_array_equal(
        _spacing(a).double().numpy(),
        np.spacing(a.double().numpy().astype(_numpy_dtype(str(low)[6:]))).astype(
            np.float64
        ),
    )
    assert (a < info.tiny).any()  # subnormals were compared


def test_projected_gradients_match_the_host_projection():
    s = _session()
    try:
        rng = np.random.default_rng(0)
        direction = [rng.standard_normal(x.shape) for x in s.values()]
        direction[1] = None  # a tensor the direction leaves alone adds nothing
        move = s.ulp_moves("float32", 4, seed=1)
        cots = [[np.ones(())], [np.full((), 0.75)]]
        for promote in (False, True):
            for handle, t in ((None, 0.0), (move, 1.0), (move, -1.0)):
                fast = s.projected_gradients_at(
                    cots, direction, promote=promote, handle=handle, t=t
                )
                host = Session.projected_gradients_at(
                    s, cots, direction, promote=promote, handle=handle, t=t
                )
                np.testing.assert_allclose(fast, host, rtol=1e-12)
    finally:
        s.restore()


def test_measured_check_keeps_verdicts_state_and_rng():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)
    )
    x = torch.randn(32, 16, generator=gen)
    before = [p.detach().clone() for p in net.parameters()]
    rng = rng_state()

    def check():
        return gradcheck.check_gradients(
            lambda: net(x).pow(2).mean(), params=net, seed=0, mode="directional"
        )

    first = check()
    assert first.status == "passed", first.message()
    assert first.error == check().error  # reproducible from the seed
    assert_same_rng(rng)
    for a, b in zip(before, net.parameters(), strict=True):
        assert torch.equal(a, b.detach())
