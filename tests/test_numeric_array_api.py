"""The numeric core on the array API: torch tensors in, torch tensors out, on their
device, with NumPy's numbers; and on array_api_strict, the standard's reference
implementation, whose arrays refuse anything outside the standard and whose
"devices" refuse to mix (the static no-framework test is in test_numeric.py: it
runs without torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradcheck.errors import InvalidArgumentError, NonFiniteError
from gradcheck.numeric import arrays
from gradcheck.numeric import differences as fd
from gradcheck.numeric import directions as dirs

try:
    import torch
except ImportError:  # the torch tests skip; the array_api_strict ones still run
    torch = None
try:
    import array_api_strict as xps
except ImportError:  # pinned in requirements/ci.txt; the torch tests still run
    xps = None

EPS64 = float(np.finfo(np.float64).eps)


def torch_test(f):
    f = pytest.mark.skipif(torch is None, reason="needs PyTorch")(f)
    return pytest.mark.torch(f)


strict_test = pytest.mark.skipif(xps is None, reason="needs array-api-strict")


# ---------------------------------------------------------------------------------
# torch tensors (CPU here; CUDA too where one is present)

DEVICES = (
    [] if torch is None else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
)


def _same(t, a) -> None:
    """t (a torch tensor) holds exactly a's float64 values."""
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    got = t.detach().cpu().numpy()
    want = np.asarray(a, dtype=np.float64)
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes(), (got, want)


def _on(t, dev: str) -> None:
    assert isinstance(t, torch.Tensor), type(t)
    assert t.device.type == dev, (t.device, dev)


def _same_estimate(et: fd.DerivativeEstimate, en: fd.DerivativeEstimate, dev: str):
    for name in ("value", "error", "truncation", "rounding"):
        _on(getattr(et, name), dev)
        _same(getattr(et, name), getattr(en, name))
    assert (et.step, et.coarse) == (en.step, en.coarse)
    assert [h for h, _ in et.curve] == [h for h, _ in en.curve]
    for (_, dt), (_, dn) in zip(et.curve, en.curve, strict=True):
        _same(dt, dn)
    assert sorted(et.values) == sorted(en.values)
    for t in en.values:
        _on(et.values[t][0], dev)
        _same(et.values[t][0], en.values[t][0])


def _pair(f, dev, dtype=None):
    """phi for NumPy and the same numbers as torch tensors on ``dev``."""

    def phi_np(t):
        v = np.asarray(f(t), dtype=np.float64)
        return v, np.abs(v)

    def phi_torch(t):
        v, s = phi_np(t)
        return (
            torch.as_tensor(v, device=dev, dtype=dtype),
            torch.as_tensor(s, device=dev, dtype=dtype),
        )

    return phi_np, phi_torch


SCALAR_FUNCTIONS = [
    lambda t: math.sin(1.3 * (t + 0.4)) * math.exp(-0.7 * t),
    lambda t: math.exp(50 * t),  # truncation-dominated: refines
    lambda t: 0.5 * t - 0.5 * t * abs(t),  # C1, not C2: the nested-gap rule
    lambda t: 1e-3 + 1e-12 * t,  # rounding-dominated: coarsens
]


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("k", range(len(SCALAR_FUNCTIONS)))
def test_richardson_on_torch_is_numpy_to_the_bit_and_stays_on_device(dev, k):
    phi_np, phi_torch = _pair(SCALAR_FUNCTIONS[k], dev)
    kw = dict(ulps=16, max_refinements=5)
    en = fd.richardson(phi_np, 1e-2, EPS64, 1e-11, **kw)
    et = fd.richardson(phi_torch, 1e-2, EPS64, 1e-11, **kw)
    _same_estimate(et, en, dev)


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_richardson_on_torch_vectors_with_a_numpy_budget(dev):
    a = np.random.default_rng(3).standard_normal((6, 3))

    def f(t):
        return np.sin(a[:, 0] + t * a[:, 1]) * np.exp(t * a[:, 2])

    budget = np.geomspace(1e-13, 1e-7, 6)  # NumPy's: moved to the device
    phi_np, phi_torch = _pair(f, dev)
    en = fd.richardson(phi_np, 1e-3, EPS64, budget, ulps=16)
    et = fd.richardson(phi_torch, 1e-3, EPS64, budget, ulps=16)
    _same_estimate(et, en, dev)
    # and a budget that is already a tensor on the device
    tb = torch.as_tensor(budget, device=dev)
    _same_estimate(fd.richardson(phi_torch, 1e-3, EPS64, tb, ulps=16), en, dev)


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_float32_tensors_are_promoted_on_their_device(dev):
    f = SCALAR_FUNCTIONS[0]
    phi_np32 = _pair(lambda t: np.float32(f(t)), dev)[0]
    _, phi_t32 = _pair(lambda t: np.float32(f(t)), dev, dtype=torch.float32)
    en, et = fd.ladder(phi_np32, 1e-3), fd.ladder(phi_t32, 1e-3)
    _same_estimate(et, en, dev)  # float32 values, promoted exactly: the same bits


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_ladder_and_one_sided_on_torch(dev):
    a = np.random.default_rng(4).standard_normal((5, 2))
    phi_np, phi_torch = _pair(lambda t: np.sin(a[:, 0] + t * a[:, 1]), dev)
    _same_estimate(
        fd.ladder(phi_torch, 1e-2, below=1, above=2),
        fd.ladder(phi_np, 1e-2, below=1, above=2),
        dev,
    )
    kink = _pair(lambda t: abs(t) + 2 * t, dev)
    fn, bn, _ = fd.one_sided(kink[0], 1e-4)
    ft, bt, values = fd.one_sided(kink[1], 1e-4)
    _on(ft, dev), _on(bt, dev)
    _same(ft, fn), _same(bt, bn)
    assert float(ft) == pytest.approx(3.0) and float(bt) == pytest.approx(1.0)
    assert all(v[0].device.type == dev for v in values.values())


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_non_finite_tensor_values_raise(dev):
    def phi(t):
        v = torch.log(torch.tensor(t, dtype=torch.float64, device=dev))
        return v, v.abs()

    with pytest.raises(NonFiniteError, match="domain"):
        fd.richardson(phi, 1e-3, EPS64, 1e-9, ulps=16)


@torch_test
def test_a_phi_that_changes_library_is_refused():
    def phi(t):
        v = np.float64(math.sin(t))
        return (torch.tensor(v), torch.tensor(1.0)) if t < 0 else (v, np.float64(1))

    with pytest.raises(InvalidArgumentError, match="one library"):
        fd.richardson(phi, 1e-3, EPS64, 1e-9, ulps=16)
    with pytest.raises(InvalidArgumentError, match="more than one library"):
        arrays.namespace(np.ones(2), torch.ones(2))


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_noise_level_on_torch(dev):
    rng = np.random.default_rng(7)
    for sigma in (1e-10, 1e-7, 1e-4):
        v = np.sin(1 + np.arange(-4, 5) * 1e-4) + sigma * rng.standard_normal(9)
        want = fd.noise_level(v)
        got = fd.noise_level(torch.as_tensor(v, device=dev))
        assert want is not None and got == pytest.approx(want, rel=1e-12)
    assert fd.noise_level(torch.exp(torch.arange(7.0, device=dev))) is None
    assert fd.noise_level(torch.ones(7, device=dev)) == 0.0
    with pytest.raises(ValueError):
        fd.noise_level(torch.ones(3, device=dev))


def _grads(rng, dev=None):
    g = [
        rng.standard_normal((30, 20)) * 1e3,
        rng.standard_normal(7) * 1e-3,
        np.zeros(4),  # zero gradient: the floor normalises it
        np.zeros((0, 3)),  # empty tensor
        rng.standard_normal(()),  # 0-d
    ]
    return g if dev is None else [torch.as_tensor(x, device=dev) for x in g]


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_probe_direction_on_torch_is_numpy_to_the_bit(dev):
    gn = _grads(np.random.default_rng(0))
    gt = _grads(np.random.default_rng(0), dev)
    norms_in = [float(np.linalg.norm(g)) for g in gn]
    dn, nn = dirs.probe_direction(gn, np.random.default_rng(5), norms_in)
    dt, nt = dirs.probe_direction(gt, np.random.default_rng(5), norms_in)
    assert nt == nn
    for a, b in zip(dt, dn, strict=True):
        _on(a, dev)
        _same(a, b)
    # norms computed on the device: torch's summation order, the same to rounding
    dn, nn = dirs.probe_direction(gn, np.random.default_rng(5))
    dt, nt = dirs.probe_direction(gt, np.random.default_rng(5))
    assert nt == pytest.approx(nn, rel=1e-14)
    for a, b in zip(dt, dn, strict=True):
        _on(a, dev)
        np.testing.assert_allclose(a.cpu().numpy(), b, rtol=1e-13, atol=0)


def _torch_draw(seed: int):
    """A backend's own draw: torch's generator, on the gradient's device."""
    gens: dict = {}

    def draw(shape, like):
        dev = like.device if like is not None else torch.device("cpu")
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        return torch.randn(shape, generator=gens[dev], device=dev, dtype=torch.float64)

    return draw


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_probe_direction_with_a_backend_draw_stays_on_device(dev):
    gt = _grads(np.random.default_rng(0), dev)
    d1, norms = dirs.probe_direction(gt, _torch_draw(11))
    d2, _ = dirs.probe_direction(gt, _torch_draw(11))
    d3, _ = dirs.probe_direction(gt, _torch_draw(12))
    for a, b, g in zip(d1, d2, gt, strict=True):
        _on(a, dev)
        assert a.dtype == torch.float64 and a.shape == g.shape
        assert torch.equal(a, b)  # seeded
    assert not torch.equal(d1[0], d3[0])
    # the aligned component: <g_t, d_t> = N(0, 1) + 3 for a tensor above the floor
    assert 0.5 < float(torch.vdot(gt[0].reshape(-1), d1[0].reshape(-1))) < 6
    assert norms[1] == pytest.approx(dirs.FLOOR * norms[0])


@torch_test
def test_a_bad_draw_is_refused_with_a_fix():
    g = [torch.ones(3, 2)]
    with pytest.raises(InvalidArgumentError, match="shape it is asked for"):
        dirs.probe_direction(g, lambda shape, like: torch.zeros(5))
    with pytest.raises(InvalidArgumentError, match="default_rng"):
        dirs.probe_direction(g, 42)
    # a float32 draw is promoted: directions are float64 whatever the draw
    (d,), _ = dirs.probe_direction(g, lambda shape, like: torch.ones(shape))
    assert d.dtype == torch.float64


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_cotangents_and_gaussian_follow_like(dev):
    shapes = [(), (1,), (10, 10), (0,)]
    like = torch.zeros(2, dtype=torch.float32, device=dev)
    cn = dirs.cotangents(shapes, np.random.default_rng(3))
    ct = dirs.cotangents(shapes, np.random.default_rng(3), like=like)
    for a, b in zip(ct, cn, strict=True):
        _on(a, dev)
        _same(a, b)
    assert all(isinstance(c, np.ndarray) for c in cn)  # no like: NumPy, as before
    gt = dirs.gaussian(np.random.default_rng(9), (1001,), like=like)
    _on(gt, dev)
    _same(gt, dirs.gaussian(np.random.default_rng(9), (1001,)))
    ck = dirs.cotangents(shapes, _torch_draw(0), like=like)
    assert all(c.device.type == dev for c in ck)
    assert float(torch.linalg.vector_norm(ck[2])) == pytest.approx(1.0, rel=0.3)


@torch_test
@pytest.mark.parametrize("dev", DEVICES)
def test_norm_and_vdot(dev):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((40, 30)), rng.standard_normal((40, 30))
    assert arrays.norm(a) == float(np.linalg.norm(a))  # NumPy: its own routine
    assert arrays.vdot(a, b) == float(np.vdot(a, b))
    assert arrays.abs_dot(a, b) == float(np.abs(a * b).sum())
    ta, tb = torch.as_tensor(a, device=dev), torch.as_tensor(b, device=dev)
    assert arrays.norm(ta) == pytest.approx(arrays.norm(a), rel=1e-14)
    assert arrays.vdot(ta, tb) == pytest.approx(arrays.vdot(a, b), rel=1e-12)
    assert arrays.abs_dot(ta, tb) == pytest.approx(arrays.abs_dot(a, b), rel=1e-14)
    assert arrays.device(ta).type == dev and arrays.device(a) == "cpu"


# ---------------------------------------------------------------------------------
# array_api_strict: nothing outside the standard, and devices that refuse to mix (a
# result created on the default device, or a host value not moved, raises there)


def _strict(a, dev: str):
    return xps.asarray(np.asarray(a, dtype=np.float64), device=xps.Device(dev))


def _same_strict(x, a, dev: str) -> None:
    assert arrays.namespace(x) is xps and x.dtype == xps.float64
    assert x.device == xps.Device(dev), (x.device, dev)
    got = np.from_dlpack(x.to_device(xps.Device("CPU_DEVICE")))
    want = np.asarray(a, dtype=np.float64)
    assert got.shape == want.shape and got.tobytes() == want.tobytes(), (got, want)


@strict_test
@pytest.mark.parametrize("dev", ["device1", "device2"])
def test_differences_on_array_api_strict(dev):
    a = np.random.default_rng(5).standard_normal((4, 2))
    sa = [_strict(a[:, 0], dev), _strict(a[:, 1], dev)]

    def phi_np(t):
        y = np.sin(a[:, 0] + t * a[:, 1])
        return y, np.abs(y)

    def phi_strict(t):
        y = xps.sin(sa[0] + t * sa[1])
        return y, xps.abs(y)

    budget = np.geomspace(1e-13, 1e-8, 4)  # NumPy's: moved to the device
    pairs = [
        (
            fd.richardson(phi_strict, 1e-3, EPS64, budget, ulps=16),
            fd.richardson(phi_np, 1e-3, EPS64, budget, ulps=16),
        ),
        (fd.ladder(phi_strict, 1e-2), fd.ladder(phi_np, 1e-2)),
    ]
    for es, en in pairs:
        for name in ("value", "error", "truncation", "rounding"):
            _same_strict(getattr(es, name), getattr(en, name), dev)
        assert (es.step, es.coarse) == (en.step, en.coarse)
    fs, bs, _ = fd.one_sided(phi_strict, 1e-4)
    fn, bn, _ = fd.one_sided(phi_np, 1e-4)
    _same_strict(fs, fn, dev), _same_strict(bs, bn, dev)
    v = np.sin(1 + np.arange(9) * 1e-4) + 1e-9 * np.random.default_rng(
        0
    ).standard_normal(9)
    assert fd.noise_level(_strict(v, dev)) == pytest.approx(
        fd.noise_level(v), rel=1e-12
    )


@strict_test
def test_directions_on_array_api_strict_follow_each_gradient_device():
    gn = [np.random.default_rng(1).standard_normal((5, 3)), np.zeros(4), np.ones(())]
    devs = ["device1", "device2", "CPU_DEVICE"]  # a model split over devices
    gs = [_strict(g, d) for g, d in zip(gn, devs, strict=True)]
    given = [float(np.linalg.norm(g)) for g in gn]
    ds, ns = dirs.probe_direction(gs, np.random.default_rng(8), given)
    dn, nn = dirs.probe_direction(gn, np.random.default_rng(8), given)
    assert ns == nn
    for x, y, d in zip(ds, dn, devs, strict=True):
        _same_strict(x, y, d)
    _, ns = dirs.probe_direction(gs, np.random.default_rng(8))  # norms on the devices
    assert ns == pytest.approx(nn, rel=1e-14)
    like = _strict(0.0, "device2")
    cs = dirs.cotangents([(), (6,)], np.random.default_rng(2), like=like)
    cn = dirs.cotangents([(), (6,)], np.random.default_rng(2))
    for x, y in zip(cs, cn, strict=True):
        _same_strict(x, y, "device2")


@strict_test
def test_a_device_without_float64_is_refused_with_a_fix():
    dev = xps.Device("no_float64")
    a = xps.asarray([0.3, -1.2], dtype=xps.float32, device=dev)

    def phi(t):
        y = xps.sin(a + t)
        return y, xps.abs(y)

    with pytest.raises(InvalidArgumentError, match="float64.*no_float64"):
        fd.richardson(phi, 1e-3, EPS64, 1e-9, ulps=16)
    with pytest.raises(InvalidArgumentError, match="float64"):
        dirs.probe_direction([a], np.random.default_rng(0))
