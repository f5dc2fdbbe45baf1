"""The tensor path of a directional check (issue 12: vector math where the tensors
live), exercised on the CPU since this project's machines have no GPU.

``TorchSession.gradients_on_device = True`` makes the torch session hand its
gradients to the engine as float64 torch tensors (what it does by default for
tensors off the CPU), so the hot path's dot products and norms run in torch
through numeric.arrays; ``draw_on_device = True`` also draws the probe direction
with torch.randn on the tensors' device instead of NumPy's host draw. The
verdicts must be those of the NumPy path: the same status, the same numbers up to
the order of the summations, the same blamed tensor and element."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import gradcheck  # noqa: E402
from gradcheck.backends import torch as torch_backend  # noqa: E402
from gradcheck.backends.torch import TorchSession  # noqa: E402
from gradcheck.properties import finite_difference as fd_engine  # noqa: E402
from tests._planted import scaled_backward  # noqa: E402
from tests._state import assert_same_rng, rng_state  # noqa: E402

DTYPES = (torch.float32, torch.float64)


def _two_heads(dtype: torch.dtype, bug: bool, unused: bool = False):
    """A small trunk with a regression and a 3-class head; ``bug``: the trunk's
    output passes a backward scaled by 1 + 1e-2; ``unused``: one more parameter
    that the loss never reads (a gradient of None)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "trunk": torch.nn.Sequential(
                torch.nn.Linear(8, 16),
                torch.nn.Tanh(),
                torch.nn.Linear(16, 12),
                torch.nn.Tanh(),
            ),
            "main": torch.nn.Linear(12, 1),
            "aux": torch.nn.Linear(12, 3),
        }
    )
    if unused:
        model["spare"] = torch.nn.Linear(4, 2)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=g, dtype=dtype)
    y = torch.randn(5, 1, generator=g, dtype=dtype)
    c = torch.randint(0, 3, (5,), generator=g)
    wrong = scaled_backward(1e-2)

    def loss() -> torch.Tensor:
        h = model["trunk"](x)
        if bug:
            h = wrong.apply(h)
        return F.mse_loss(model["main"](h), y) + 0.5 * F.cross_entropy(
            model["aux"](h), c
        )

    return model, loss


def _check(monkeypatch, dtype, bug, *, on_device, draw=None, unused=False, spy=None):
    monkeypatch.setattr(TorchSession, "gradients_on_device", on_device)
    monkeypatch.setattr(TorchSession, "draw_on_device", draw)
    model, loss = _two_heads(dtype, bug, unused)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = rng_state()
    report = gradcheck.check_gradients(loss, params=model, mode="directional")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert_same_rng(rng)
    return report


def _close(a: float | None, b: float | None, rel: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _same_numbers(host, dev) -> None:
    """Every number the two reports compared, bit for bit."""
    assert [t.analytical for t in host.tensors] == [t.analytical for t in dev.tensors]
    assert [t.grad_norm for t in host.tensors] == [t.grad_norm for t in dev.tensors]
    assert (host.error, host.tolerance) == (dev.error, dev.tolerance)
    assert host.tolerance_terms == dev.tolerance_terms
    assert [(s.step, s.estimate) for s in host.steps] == [
        (s.step, s.estimate) for s in dev.steps
    ]
    assert host.location == dev.location


def _device_reductions(monkeypatch) -> None:
    """Make numeric.arrays reduce torch CPU tensors with torch's own vecdot and
    vector_norm, as it reduces tensors on an accelerator (host arrays keep
    NumPy's routines)."""
    real = fd_engine.xa._host_view
    monkeypatch.setattr(
        fd_engine.xa,
        "_host_view",
        lambda x: None if isinstance(x, torch.Tensor) else real(x),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bug", [False, True], ids=["correct", "planted"])
@pytest.mark.parametrize("reductions", ["host", "device"])
def test_tensor_path_gives_the_numpy_verdict(monkeypatch, dtype, bug, reductions):
    """The tensor path's verdict is the host path's. Its CPU tensors are reduced
    by NumPy's routines on shared-memory views (reductions="host", what runs on
    the CPU): the same bits. Reduced by torch (reductions="device", what runs
    on an accelerator): the same numbers up to the order of the summations."""
    host = _check(monkeypatch, dtype, bug, on_device=False)
    if reductions == "device":
        _device_reductions(monkeypatch)
    seen: list[type] = []
    real = TorchSession.vjp_on_device

    def spy(self, *args, **kwargs):
        grads = real(self, *args, **kwargs)
        seen.extend(type(g) for g in grads)
        return grads

    monkeypatch.setattr(TorchSession, "vjp_on_device", spy)
    if not bug:
        # a passing check copies no gradient to the host
        def no_host_copy(t):
            raise AssertionError("a gradient was copied to the host")

        monkeypatch.setattr(torch_backend, "_to_host64", no_host_copy)
        monkeypatch.setattr(torch_backend, "_to_host_narrow", no_host_copy)
        monkeypatch.setattr(fd_engine.xa, "to_host", no_host_copy)
    dev = _check(monkeypatch, dtype, bug, on_device=True)
    assert seen and all(t is torch.Tensor for t in seen)

    assert host.status == dev.status == ("mismatch" if bug else "passed")
    if reductions == "host":
        _same_numbers(host, dev)
    # the compared numbers: the same up to the order of the sums (torch's
    # reductions against NumPy's BLAS ones on the same direction)
    scale = max(abs(t.analytical) for t in host.tensors)
    for a, b in zip(host.tensors, dev.tensors, strict=True):
        assert abs(a.analytical - b.analytical) <= 1e-12 * scale
        assert _close(a.grad_norm, b.grad_norm)
    assert abs(host.error - dev.error) <= 1e-12 * scale
    assert _close(host.tolerance, dev.tolerance, 1e-6)
    assert len(host.steps) == len(dev.steps)
    for a, b in zip(host.steps, dev.steps, strict=True):
        assert _close(a.step, b.step)  # from the direction's norms
        assert abs(a.estimate - b.estimate) <= 1e-10 * scale
    if bug:
        assert host.location is not None and dev.location is not None
        assert host.location.tensor == dev.location.tensor == "trunk.0.weight"
        assert host.location.index == dev.location.index
        assert _close(host.location.analytical, dev.location.analytical)
        assert _close(host.location.numerical, dev.location.numerical)
    else:
        assert host.location is None and dev.location is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unconnected_tensor_on_the_tensor_path(monkeypatch, dtype):
    """A parameter the loss never reads has no gradient: its zeros (and its
    direction) stay NumPy's beside the tensors, and the verdict is unchanged."""
    host = _check(monkeypatch, dtype, False, on_device=False, unused=True)
    dev = _check(monkeypatch, dtype, False, on_device=True, unused=True)
    assert host.status == dev.status == "passed"
    assert [t.connected for t in dev.tensors] == [t.connected for t in host.tensors]
    assert not dev.tensors[-1].connected
    _same_numbers(host, dev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bug", [False, True], ids=["correct", "planted"])
def test_direction_drawn_on_the_device(monkeypatch, dtype, bug):
    """The device draw (torch.randn with a seeded torch.Generator where the
    gradients live): another direction, so other numbers, the same verdicts;
    seeded, so a check repeats itself exactly."""
    calls: list[tuple] = []
    real = TorchSession.direction_draw

    def spy(self, rng):
        draw = real(self, rng)
        assert draw is not None

        def counted(shape, like):
            calls.append(tuple(shape))
            return draw(shape, like)

        return counted

    monkeypatch.setattr(TorchSession, "direction_draw", spy)
    first = _check(monkeypatch, dtype, bug, on_device=True, draw=True)
    again = _check(monkeypatch, dtype, bug, on_device=True, draw=True)
    monkeypatch.setattr(TorchSession, "direction_draw", real)
    host = _check(monkeypatch, dtype, bug, on_device=False)
    assert calls  # the direction came from torch's generator
    assert first.status == again.status == host.status
    assert first.status == ("mismatch" if bug else "passed")
    assert first.error == again.error
    assert [t.analytical for t in first.tensors] == [
        t.analytical for t in again.tensors
    ]
    assert [t.analytical for t in first.tensors] != [t.analytical for t in host.tensors]
    if bug:
        assert first.location.tensor == host.location.tensor == "trunk.0.weight"


def test_nonfinite_gradient_on_the_tensor_path(monkeypatch):
    """A NaN gradient found on the device names the tensor, as on the host."""

    nan_backward = scaled_backward(float("nan"))  # backward: g * (1 + nan)
    w = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(40, dtype=torch.float64))
    reports = []
    for on_device in (True, False):
        monkeypatch.setattr(TorchSession, "gradients_on_device", on_device)
        reports.append(
            gradcheck.check_gradients(
                lambda: (nan_backward.apply(w) * b).sum(),
                params=[w, b],
                mode="directional",
            )
        )
    device, host = reports
    assert device.status == host.status != "passed"
    assert device.location is not None and device.location == host.location
    assert np.isfinite(b.detach().numpy()).all()


@pytest.mark.parametrize("bug", [False, True], ids=["correct", "planted"])
def test_float32_reference_on_the_tensor_path(monkeypatch, bug):
    """fn that cannot run in float64 (a float32-only kernel): the
    reference falls back to float32 and phi is corrected for rounding x + t d to
    float32 from the host values; the tensor path's verdict is the host path's."""
    wrong = scaled_backward(1e-1)

    def make():
        torch.manual_seed(3)
        w = torch.nn.Parameter(torch.randn(6, 5))
        b = torch.nn.Parameter(torch.randn(5))
        const = torch.randn(5, 4)

        def loss():
            h = torch.tanh(w @ const)
            if h.dtype != torch.float32:  # a float32-only kernel: the
                raise TypeError("float32 only")  # reference runs in float32
            h = torch.mm(h.T.contiguous(), torch.ones(6, 3))
            out = h.sum() + (b**2).sum()
            return wrong.apply(out) if bug else out

        return [w, b], loss

    reports = []
    for flag in (False, True):
        monkeypatch.setattr(TorchSession, "gradients_on_device", flag)
        params, loss = make()
        reports.append(
            gradcheck.check_gradients(loss, params=params, mode="directional")
        )
    host, dev = reports
    assert host.reference_dtype == dev.reference_dtype == "float32"
    assert host.status == dev.status == ("mismatch" if bug else "passed")
    _same_numbers(host, dev)


def test_device_draw_with_an_unconnected_tensor(monkeypatch):
    """The device draw for a tensor without a gradient (its zeros are NumPy's):
    host samples from the same torch generator; the check passes."""
    report = _check(
        monkeypatch, torch.float64, False, on_device=True, draw=True, unused=True
    )
    assert report.status == "passed"
    assert not report.tensors[-1].connected


def test_batched_reductions(monkeypatch):
    """numeric.arrays.norms / vdots: NumPy's routines for host arrays (a torch
    CPU tensor gives its NumPy copy's bits), the tensors' own reductions
    otherwise (forced here), None as 0; mismatched lists are refused."""
    from gradcheck.errors import InvalidArgumentError
    from gradcheck.numeric import arrays as xa

    rng = np.random.default_rng(0)
    a = [rng.standard_normal((30, 7)), None, rng.standard_normal(5)]
    b = [rng.standard_normal((30, 7)), rng.standard_normal(3), rng.standard_normal(5)]
    ta = [None if x is None else torch.from_numpy(x.copy()) for x in a]
    tb = [torch.from_numpy(x.copy()) for x in b]
    want_n = [float(np.linalg.norm(x)) if x is not None else 0.0 for x in a]
    want_d = [
        0.0 if x is None else float(np.vdot(x, y)) for x, y in zip(a, b, strict=True)
    ]
    assert xa.norms(a) == xa.norms(ta) == want_n
    assert xa.vdots(a, b) == xa.vdots(ta, tb) == want_d
    assert xa.norm(ta[0]) == want_n[0] and xa.vdot(ta[2], tb[2]) == want_d[2]
    _device_reductions(monkeypatch)
    assert np.allclose(xa.norms(ta), want_n, rtol=1e-14, atol=0)
    assert np.allclose(xa.vdots(ta, tb), want_d, rtol=1e-12, atol=0)
    with pytest.raises(InvalidArgumentError, match="vdots of 3 and 2"):
        xa.vdots(a, b[:2])
    host = xa.to_host(torch.arange(4, dtype=torch.float32))
    assert type(host) is np.ndarray and host.dtype == np.float64
    assert host.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("float64_there", [True, False], ids=["cuda-like", "mps-like"])
def test_default_follows_the_device(monkeypatch, float64_there):
    """By default (no flag set) the tensor path and the device draw are taken
    exactly when the tensors live off the CPU on a device that computes in
    float64 (CUDA); a device without float64 (Apple's MPS) keeps the host path.
    Simulated on the CPU: the session is told its tensors are elsewhere."""
    monkeypatch.setattr(
        TorchSession, "_accelerators", lambda self: {torch.device("cuda", 0)}
    )
    monkeypatch.setattr(torch_backend, "_holds_float64", lambda d: float64_there)
    seen: list[type] = []
    drawn: list[bool] = []
    real_vjp, real_draw = TorchSession.vjp_on_device, TorchSession.direction_draw

    def vjp_spy(self, *args, **kwargs):
        grads = real_vjp(self, *args, **kwargs)
        seen.extend(type(g) for g in grads)
        return grads

    def draw_spy(self, rng):
        draw = real_draw(self, rng)
        drawn.append(draw is not None)
        return draw

    monkeypatch.setattr(TorchSession, "vjp_on_device", vjp_spy)
    monkeypatch.setattr(TorchSession, "direction_draw", draw_spy)
    model, loss = _two_heads(torch.float32, False)
    report = gradcheck.check_gradients(loss, params=model, mode="directional")
    assert report.status == "passed"
    if float64_there:
        assert seen and all(t is torch.Tensor for t in seen)
        assert drawn == [True]
    else:
        assert seen and all(t is np.ndarray for t in seen)
        assert drawn == []  # the host path draws with NumPy, not asking
