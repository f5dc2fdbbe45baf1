"""_PromoteToFloat64's fast path (an op whose arguments it would not change runs as
it is) gives what its full path gives: the same dtypes and the same values, bit for
bit, for ops that need widening, casts, factories, containers and dtype keywords."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gradcheck.backends import torch as tb  # noqa: E402


def _cases():
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, 5, dtype=torch.float64, generator=g)
    w64 = torch.randn(3, 5, dtype=torch.float64, generator=g)
    x32 = torch.randn(4, 5, generator=g)
    c32 = torch.randn(5, generator=g)  # a closure's float32 constant
    z64 = torch.randn(4, 5, dtype=torch.complex128, generator=g)

    def buffer_write():
        buf = torch.zeros(4, 5, dtype=torch.float32)  # made inside: widened
        buf[0] = x64[0]
        return buf

    def low_buffer_write():
        out = torch.empty(2, 5, dtype=torch.float32)  # explicit dtype: stays
        out.copy_(x64[:2])
        return out

    return {
        "linear f64": lambda: F.linear(x64, w64),
        "tanh f64": lambda: torch.tanh(x64) * 2.0,
        "f32 input to f64 weight": lambda: F.linear(x32, w64),
        "f32 constant": lambda: x64 + c32,
        "cat of f32 and f64": lambda: torch.cat([x32, x64]),
        "x.float()": lambda: x64.float(),
        "x.to(float32)": lambda: x64.to(torch.float32),
        "x.type(float32)": lambda: x64.type(torch.float32),
        "sum(dtype=float32)": lambda: x64.sum(dtype=torch.float32),
        "softmax dtype kwarg": lambda: F.softmax(x64, dim=-1, dtype=torch.float32),
        "zeros factory": lambda: torch.zeros(3) + x64[0, :3],
        "tensor factory": lambda: torch.tensor([1.0, 2.0]),
        "write into a buffer made inside": buffer_write,
        "write into an explicit float32 buffer": low_buffer_write,
        "complex128": lambda: z64 * z64.conj(),
        "integer op": lambda: torch.arange(6).reshape(2, 3).sum(0),
        "max(dim) tuple": lambda: x64.max(dim=1),
        "keyword tensor": lambda: torch.where(x64 > 0, x64, other=x32),
    }


def _run(fn, fast: bool, monkeypatch):
    if not fast:
        monkeypatch.setattr(tb, "_nothing_to_widen", lambda args, kwargs: False)
    else:
        monkeypatch.undo()
    with tb._PromoteToFloat64():
        out = fn()
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(_cases()))
def test_fast_path_gives_what_the_full_path_gives(name, monkeypatch):
    fn = _cases()[name]
    slow = _run(fn, False, monkeypatch)
    fast = _run(fn, True, monkeypatch)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert torch.equal(a, b), name


def test_the_fast_path_is_taken_for_plain_float64_ops():
    x = torch.randn(3, 3, dtype=torch.float64)
    assert tb._nothing_to_widen((x, x), None)
    assert tb._nothing_to_widen((x, 2.0), {"alpha": 3})
    assert not tb._nothing_to_widen((x, x.float()), None)
    assert not tb._nothing_to_widen(([x, x],), None)
    assert not tb._nothing_to_widen((x,), {"dtype": torch.float32})
    assert not tb._nothing_to_widen((x,), {"other": x.float()})
    for func in (torch.zeros, torch.Tensor.float, torch.Tensor.to, torch.Tensor.type):
        assert func in tb._REWRITTEN
