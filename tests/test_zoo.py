"""A model zoo of real torch architectures (transformers, built from configs with random
weights; tests/zoo.py): finite differences and linearity give the right verdict on the
correct models, a planted 1e-3 backward in the first block is a mismatch, and every
check leaves the model's state bit-identical."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import gradcheck  # noqa: E402
from tests import zoo  # noqa: E402

pytestmark = pytest.mark.torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Checks over ~15 s on 2 CPU cores: fresh MobileNetV2's kinks send the check to a
#: nearby point and take a census (sixteen blocks of depthwise convs, which float64
#: runs one channel at a time).
SLOW_FD = {"mobilenet_v2_fresh"}


def _cases(slow=frozenset()):
    return [
        pytest.param(m, d, id=f"{m}-{d}", marks=[pytest.mark.slow] if m in slow else [])
        for m in zoo.ZOO
        for d in DTYPES
    ]


def _build(model, dtype):
    case = zoo.build(model, DTYPES[dtype])
    # a stale .grad the checks must leave alone
    p = case.net["main"].weight
    p.grad = torch.full_like(p, 7.0)
    return case


@pytest.mark.parametrize(("model", "dtype"), _cases(SLOW_FD))
def test_finite_differences(model, dtype):
    case = _build(model, dtype)
    before = zoo.snapshot(case.net)
    report = gradcheck.check_gradients(case.total, params=case.net)
    zoo.assert_same_state(before, case.net)
    expected = zoo.EXPECTED_FD.get(model, ("passed",))
    assert report.status in expected, report.message()
    assert report.dtype == dtype
    if report.status == "nondifferentiable":
        # the reason is given: the kink, where it is, the nearby point's verdict
        assert any("kink" in note for note in report.notes), report.message()


def _reach(case):
    """Which loss reaches which tensor, by plain autograd in the model's dtype."""
    reach = {}
    for name, loss in case.losses().items():
        case.net.zero_grad(set_to_none=True)
        loss().backward()
        for n, p in case.net.named_parameters():
            if p.grad is not None and bool(p.grad.ne(0).any()):
                reach.setdefault(n, []).append(name)
    case.net.zero_grad(set_to_none=True)
    return reach


@pytest.mark.parametrize(("model", "dtype"), _cases())
def test_linearity(model, dtype):
    case = zoo.build(model, DTYPES[dtype])
    reach = _reach(case)
    p = case.net["main"].weight
    p.grad = torch.full_like(p, 7.0)
    before = zoo.snapshot(case.net)
    report = gradcheck.check_linearity(
        case.total, case.losses(), zoo.WEIGHTS, params=case.net
    )
    zoo.assert_same_state(before, case.net)
    assert report.status == "passed", report.message()
    # the flow matrix says what autograd says (at MobileNetV2's fresh init the
    # features are ~1e-27 and the aux loss underflows to an exact 0 in float32)
    flow = report.flow
    assert {t: flow.reached_by(t) for t in flow.tensors} == {
        t: reach.get(t, []) for t in flow.tensors
    }
    assert reach["main.weight"] == ["main"]
    assert any(r == ["main", "aux"] for r in reach.values()) or (
        model == "mobilenet_v2_fresh" and dtype == "float32"
    )


def _affected(case):
    """Parameters whose autograd gradient the planted bug changes (upstream of it)."""

    def grads():
        case.net.zero_grad(set_to_none=True)
        case.total().backward()
        out = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in case.net.named_parameters()
        }
        case.net.zero_grad(set_to_none=True)
        return out

    clean = grads()
    with zoo.plant_bug(case):
        buggy = grads()
    return {n for n in clean if not torch.equal(clean[n], buggy[n])}


@pytest.mark.parametrize(("model", "dtype"), _cases())
def test_planted_bug_is_a_mismatch(model, dtype):
    case = zoo.build(model, DTYPES[dtype])
    affected = _affected(case)
    assert affected and "main.weight" not in affected  # the bug is in the body
    p = case.net["main"].weight
    p.grad = torch.full_like(p, 7.0)
    before = zoo.snapshot(case.net)
    with zoo.plant_bug(case):
        report = gradcheck.check_gradients(case.total, params=case.net)
    zoo.assert_same_state(before, case.net)
    assert report.status == "mismatch", report.message()
    assert report.location is not None and report.location.tensor in affected, (
        report.message()
    )
