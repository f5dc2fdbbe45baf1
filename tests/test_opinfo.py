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


def test_float64_verdicts_agree_or_are_explained(run, sweep):
    _, results, summary = run
    disagreements = [r for r in _samples(results) if r.comparison == "disagree"]
    unexplained = [
        (r.op, r.index, r.torch64.verdict, r.gc64.status, r.gc64.message)
        for r in disagreements
        if r.category == sweep.UNEXPLAINED
    ]
    assert summary["agreement"] >= 0.99 or not unexplained, unexplained
    false_alarms = [
        (r.op, r.index, r.gc64.message)
        for r in disagreements
        if r.category == "gradcheck false alarm"
    ]
    assert not false_alarms
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


def test_explanations(sweep):
    """The classification rules, on made-up outcomes."""
    assert _result(sweep, "sin", "passed", "passed", "passed").comparison == "agree"
    kink = _result(sweep, "abs", "passed", "failed", "nondifferentiable")
    assert kink.category == "kink"
    # nondifferentiable on a smooth op is not waved through as a kink
    smooth = _result(sweep, "sin", "passed", "failed", "nondifferentiable")
    assert smooth.category == sweep.UNEXPLAINED
    assert _result(sweep, "bernoulli", "passed", "failed", "mismatch").category == (
        "sampling"
    )
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
    refused = _result(sweep, "sin", "passed", "refused", "NonFiniteError")
    assert refused.comparison == "not compared" and not refused.category


def test_cli(sweep, tmp_path):
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    argv = ["--ops", "sin,abs", "--exact", "--max-samples", "1", "--memory-gb", "0"]
    assert sweep.main([*argv, "--out", str(out), "--json", str(js), "-q"]) == 0
    data = json.loads(js.read_text())
    assert data["summary"]["ops_run"] == 2 and data["summary"]["samples_run"] == 2
    assert "--ops sin,abs" in out.read_text()
