"""The OpInfo sweep (benchmarks/opinfo_sweep.py) on a fixed subset of PyTorch's op
database: gradcheck's float64 verdicts agree with torch.autograd.gradcheck's (or
every disagreement is explained), and no sample that passed in float64 mismatches
in float32. The full sweep's table is reports/opinfo.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal's op_db imports it

pytestmark = [pytest.mark.slow, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "opinfo_sweep.py"

#: The subset: op ids, the same samples as the full sweep (first, last and evenly
#: spread, 4 at most per op). About 10 s of work on one core.
SUBSET = (
    # smooth elementwise, linear algebra and shape ops
    "sin",
    "tanh",
    "erf",
    "sqrt",
    "add",
    "lerp",
    "where",
    "addmm",
    "baddbmm",
    "bmm",
    "matmul",
    "einsum",
    "trace",
    "cat",
    "nn.functional.linear",
    "nn.functional.conv2d",
    "nn.functional.embedding",
    "nn.functional.gelu",
    "softmax",
    "log_softmax",
    # reductions and losses
    "sum",
    "mean",
    "var",
    "std",
    "cumsum",
    "logsumexp",
    "norm",
    "nn.functional.mse_loss",
    "nn.functional.cross_entropy",
    "nn.functional.huber_loss",
    # kinked ops (ReLU, |x|, clamp, max and its ties, sorting)
    "abs",
    "nn.functional.relu",
    "clamp",
    "max.reduction_with_dim",
    "amax",
    "sort",
    # random (OpInfo seeds it per call)
    "nn.functional.dropout",
    # disagreements the sweep must explain: a step function (kink), outputs
    # autograd marks non-differentiable, a float32 input in a float64 sample, an
    # op whose backward mishandles undefined output gradients
    "floor",
    "native_batch_norm",
    "cov",
    "native_group_norm",
    # complex inputs and outputs (refused before issue 13)
    "fft.fft",
    "view_as_complex",
    "polar",
)


def _load():
    name = "opinfo_sweep"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep():
    return _load()


@pytest.fixture(scope="module")
def run(sweep):
    selection = sweep.select_ops(SUBSET, exact=True)
    results = sweep.sweep(selection.ops, seed=0, budget=60.0)
    return selection, results, sweep.summarize(selection, results)


def _samples(results):
    return [r for o in results for r in o.results]


def test_subset_is_what_it_claims(run, sweep):
    selection, results, summary = run
    ran = {o.op for o in results}
    assert ran == set(SUBSET), set(SUBSET) ^ ran  # an op renamed in op_db
    assert not summary["ops_sample_generation_failed"]
    # most samples got a verdict from both tools: refusals do not hide the check
    assert summary["compared"] >= 0.9 * summary["samples_run"] > 0, summary


#: The measured reasons (benchmarks/opinfo_sweep.py, explain) that can excuse a
#: sample where gradcheck says "mismatch" and torch.autograd.gradcheck passes.
MISMATCH_EXPLAINED_BY = {
    # central differences at gradcheck's element confirm the backward is wrong
    "PyTorch bug (gradcheck right)",
    # gradcheck passes on the outputs autograd marks differentiable
    "non-differentiable output",
    # two calls at the same point give different outputs
    "sampling",
}


def test_float64_verdicts_agree_or_are_explained(run, sweep):
    _, results, summary = run
    disagreements = [r for r in _samples(results) if r.comparison == "disagree"]
    unexplained = [
        (r.op, r.index, r.torch64.verdict, r.gc64.status, r.gc64.message)
        for r in disagreements
        if r.category == sweep.UNEXPLAINED
    ]
    assert not unexplained, unexplained
    # gradcheck says mismatch where torch passes: a false alarm unless a
    # measurement explains it
    false_alarms = [
        (r.op, r.index, r.category, r.explanation, r.gc64.message)
        for r in _samples(results)
        if r.torch64.verdict == "passed"
        and r.gc64.status == "mismatch"
        and r.category not in MISMATCH_EXPLAINED_BY
    ]
    assert not false_alarms, false_alarms
    assert summary["gradcheck_false_alarms_float64"] == 0
    assert summary["disagreements_explained"] == summary["disagree"]
    # the kinked ops' samples avoid their kinks: both tools pass them
    for r in _samples(results):
        if r.op in ("abs", "nn.functional.relu", "clamp", "amax"):
            assert (r.torch64.verdict, r.gc64.verdict) == ("passed", "passed"), r


def test_float32_never_mismatches_where_float64_passed(run):
    _, results, summary = run
    bad = [
        (r.op, r.index, r.gc32.message)
        for r in _samples(results)
        if r.gc64.verdict == "passed" and r.gc32.status == "mismatch"
    ]
    assert summary["float32_mismatches_where_float64_passed"] == len(bad) == 0, bad
    assert summary["float32_where_float64_passed"] > 0


def test_gradcheck_never_crashes(run):
    _, results, _ = run
    crashes = [
        (r.op, r.index, r.gc64.message, r.gc32.message)
        for r in _samples(results)
        if "crash" in (r.gc64.verdict, r.gc32.verdict)
    ]
    assert not crashes


def test_report_and_json(run, sweep, tmp_path):
    selection, results, summary = run
    out = tmp_path / "opinfo.md"
    settings = {"max_samples": 4, "seed": 0, "budget": 60.0, "workers": 1}
    sweep.write_markdown(
        out, summary, results, command="test", wall_seconds=1.0, settings=settings
    )
    text = out.read_text()
    assert f"{summary['agree']} / {summary['compared']}" in text
    assert "## Disagreements (float64)" in text and "## Float32 failures" in text
    for r in _samples(results):
        if r.comparison == "disagree":
            assert f"| {r.op} | #{r.index} " in text
    json.dumps(sweep.to_json(summary, results, settings))


def _result(sweep, op, torch_verdict, gc_verdict, gc_status, **evidence):
    o = sweep.Outcome
    res = sweep.SampleResult(
        op,
        0,
        "T(3,)",
        torch64=o(torch_verdict, "jacobian" if torch_verdict == "failed" else ""),
        gc64=o(gc_verdict, gc_status),
        gc32=o("skipped"),
    )
    res.evidence = evidence
    return sweep.classify(res)


KINK = {"kink": True, "where": (1e-2, 1.0, 1e-3, 1.0), "steps": []}
SMOOTH = {"kink": False, "where": None, "steps": []}
WRONG = {
    "confirmed": True,
    "error": 5e-9,
    "uncertainty": 5e-11,
    "numerical": 1 / 6,
    "analytical": 0.16666667163,
}
RIGHT = dict(WRONG, confirmed=False, error=1e-11)


def test_explanations(sweep):
    """The classification rules, on made-up outcomes: a category comes from a
    measurement, never from the op's name."""
    assert _result(sweep, "sin", "passed", "passed", "passed").comparison == "agree"
    at = {"element": [0, [1]]}
    kink = _result(
        sweep, "sin", "passed", "failed", "nondifferentiable", kink=KINK, **at
    )
    assert kink.category == "kink" and "inputs[0][1]" in kink.explanation
    # a piecewise op whose kink the measurement does not find is not waved through
    for op in ("abs", "sin"):
        smooth = _result(
            sweep, op, "passed", "failed", "nondifferentiable", kink=SMOOTH, **at
        )
        assert smooth.category == sweep.UNEXPLAINED
        assert _result(sweep, op, "passed", "failed", "nondifferentiable").category == (
            sweep.UNEXPLAINED
        )
    # sampling: measured, not by name
    assert _result(
        sweep, "sin", "passed", "failed", "mismatch", repeat_differs=True
    ).category == ("sampling")
    assert _result(
        sweep, "bernoulli", "passed", "failed", "mismatch", repeat_differs=False
    ).category == (sweep.FALSE_ALARM)
    # a mismatch where torch passes: a false alarm unless the backward is measured
    # wrong, also on an op with a hand-written note
    for op in ("sin", "nn.functional.hardsigmoid"):
        assert _result(sweep, op, "passed", "failed", "mismatch").category == (
            sweep.FALSE_ALARM
        )
        assert _result(
            sweep, op, "passed", "failed", "mismatch", backward_error=RIGHT, **at
        ).category == (sweep.FALSE_ALARM)
        wrong = _result(
            sweep, op, "passed", "failed", "mismatch", backward_error=WRONG, **at
        )
        assert wrong.category == "PyTorch bug (gradcheck right)"
    assert (
        _result(sweep, "cov", "failed", "passed", "passed", float32_inputs=[1]).category
        == "float32 input"
    )
    assert (
        _result(
            sweep, "x", "failed", "passed", "passed", torch_on_concatenated="passed"
        ).category
        == "undefined-grad path"
    )
    assert (
        _result(
            sweep,
            "x",
            "passed",
            "failed",
            "mismatch",
            gradcheck_on_differentiable_outputs="passed",
            nondifferentiable_outputs=[1],
        ).category
        == "non-differentiable output"
    )
    # torch fails where gradcheck passes, with nothing measured: PyTorch's own
    # xfail marks do not explain it
    marked = sweep.classify(
        _result(sweep, "x", "failed", "passed", "passed"), marks=["xfail"]
    )
    assert marked.category == sweep.UNEXPLAINED
    refused = _result(sweep, "sin", "passed", "refused", "NonFiniteError")
    assert refused.comparison == "not compared" and not refused.category


class _WrongBackward:
    """x**3 elementwise, its backward off by a relative ``rel`` at element 1."""

    @staticmethod
    def make(rel):
        import torch

        class F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x**3

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                grad = 3 * x * x * g
                grad[1] = grad[1] * (1 + rel)
                return grad

        return F.apply


def test_measurements_on_known_functions(sweep):
    """The measurements that classify, on functions whose truth is known."""
    import torch

    x = torch.tensor([0.7, -1.3, 0.0, 2.1], dtype=torch.float64)
    # kinks and jumps are found at their element; smooth functions have none
    assert sweep.measure_kink(torch.abs, (x,), 0, (2,))["kink"]  # |x| at 0
    assert sweep.measure_kink(torch.floor, (x + 3.0,), 0, (2,))["kink"]  # jump at 3
    assert sweep.measure_kink(torch.relu, (x + 1e-4,), 0, (2,))["kink"]  # kink near
    for fn in (torch.sin, torch.exp, lambda t: t**3, torch.tanh):
        assert not sweep.measure_kink(fn, (x,), 0, (1,))["kink"], fn
        assert not sweep.measure_kink(fn, (x,), 0, (2,))["kink"], fn
    # a backward wrong by 1e-6 relative is confirmed, a correct one is not; both
    # with every output as a cotangent and with random ones (many outputs)
    for n in (4, 300):
        xs = torch.linspace(-2, 2, n, dtype=torch.float64)
        for rel, expected in ((1e-6, True), (0.0, False)):
            out = sweep.measure_backward_error(
                _WrongBackward.make(rel), (xs,), 0, (1,), seed=0
            )
            assert out["confirmed"] is expected, (n, rel, out)
    # same point, different outputs: a sampling op
    assert sweep.repeat_differs(lambda t: t + torch.rand(()), (x,))
    assert not sweep.repeat_differs(torch.sin, (x,))


def test_cli(sweep, tmp_path):
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    argv = ["--ops", "sin,abs", "--exact", "--max-samples", "1", "--memory-gb", "0"]
    assert sweep.main([*argv, "--out", str(out), "--json", str(js), "-q"]) == 0
    data = json.loads(js.read_text())
    assert data["summary"]["ops_run"] == 2 and data["summary"]["samples_run"] == 2
    assert "--ops sin,abs" in out.read_text()


#: ops whose complex128 / order-2 / forward-mode samples the quick test compares
EXTRA_OPS = ("sin", "mul", "fft.fft", "polar", "softmax")


@pytest.fixture(scope="module")
def extra(sweep):
    db = {sweep.op_id(op): op for op in sweep.op_db()}
    found = []
    for oid in EXTRA_OPS:
        found += sweep.run_extra(
            db[oid], sweep.ALL_CHECKS, max_samples=2, seed=0, budget=60.0
        )
    return found


def test_complex_second_order_and_forward_agree_with_torch(extra, sweep):
    kinds = {e.kind for e in extra}
    assert kinds == set(sweep.EXTRA_KINDS), kinds
    compared = [e for e in extra if e.comparison != "not compared"]
    assert len(compared) >= 0.9 * len(extra) > 0
    unexplained = [
        (e.kind, e.op, e.index, e.torch.message, e.gc.message)
        for e in compared
        if e.comparison == "disagree" and e.category == sweep.UNEXPLAINED
    ]
    assert not unexplained, unexplained
    crashes = [(e.kind, e.op, e.gc.message) for e in extra if e.gc.verdict == "crash"]
    assert not crashes


def test_extra_report_sections(extra, sweep, tmp_path):
    op = sweep.OpResult("several", extra=extra)
    selection = sweep.Selection(ops=[], total=1)
    summary = sweep.summarize(selection, [op])
    for kind in sweep.EXTRA_KINDS:
        assert summary["extra"][kind]["samples"] > 0
    out = tmp_path / "opinfo.md"
    settings = {"max_samples": 2, "seed": 0, "budget": 60.0, "workers": 1}
    sweep.write_markdown(
        out, summary, [op], command="test", wall_seconds=1.0, settings=settings
    )
    text = out.read_text()
    assert "## Complex, second order and forward mode" in text
    assert "Agreement over everything" in text
    assert "gradgradcheck" in text and "check_forward_ad=True" in text
