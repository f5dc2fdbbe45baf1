"""gradcheck.check_distributed: the user's step under DistributedDataParallel (and
FSDP2) in 2 spawned processes against one process on the whole batch. A correct
step passes; the three planted bugs of issue 14 are caught and named (a loss
divided by the world size, a forward through model.module, a head unused on one
rank); a rank that raises or hangs gives a verdict, never a hang; the user's
objects and random states are left exactly."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gradcheck
from gradcheck.properties import distributed as dp
from tests._state import assert_same_rng, rng_state

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests import _dist_models as m  # noqa: E402


def _our_workers() -> list[int]:
    """Worker processes of this test process still alive (Linux /proc)."""
    if not os.path.isdir("/proc"):
        return []
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"_torch_distributed_worker" in cmd:
            found.append(int(pid))
    return found


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def shared():
    """One pair of worker processes for the checks that leave it usable (a
    passed or mismatched check; one whose rank failed respawns)."""
    from gradcheck.backends import torch_distributed as td

    with td.keep_workers():
        yield


# ---------------------------------------------------------------- correct
def test_correct_ddp_step_passes_with_its_evidence_and_leaves_state_alone():
    from gradcheck.pytest_plugin import GradcheckFixture

    cached = m.build_cached()
    cached.trunk.weight.grad = torch.full_like(cached.trunk.weight, 7.0)
    before, grad_before = _params(cached), cached.trunk.weight.grad.clone()
    torch.manual_seed(123)
    rng = rng_state()
    hook = sys.excepthook  # init_process_group replaces it: put back
    # through the pytest fixture (check_distributed on it, as the other checks)
    fx = GradcheckFixture({}, None, "auto")
    report = fx.check_distributed(m.build_cached, m.step, m.batch(), timeout=60)
    assert report.passed, report.message()
    assert_same_rng(rng)
    assert sys.excepthook is hook
    assert not torch.distributed.is_initialized()
    after = _params(cached)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(cached.trunk.weight.grad, grad_before)
    assert cached.head_a.weight.grad is None
    assert report.property == "distributed" and report.mode == "ddp"
    assert report.reference_dtype == "float64" and report.dtype == "float32"
    assert [t.name for t in report.tensors] == [n for n, _ in cached.named_parameters()]
    assert all(t.status == "passed" and t.error <= t.tolerance for t in report.tensors)
    text = " ".join(report.notes)
    assert "world size 2, wrap ddp, backend gloo" in text
    assert "rank 0" in text and "rank 1" in text
    assert report.cost["world_size"] == 2
    assert report.cost["spawn_seconds"] > 0 and report.cost["seconds"] > 0
    assert {"rank_seconds[0]", "rank_seconds[1]"} <= set(report.cost)
    assert _our_workers() == []


def test_a_step_written_for_the_wrapper_runs_in_one_process_too(shared):
    """The single-process reference runs the step on the model wrapped in a
    process group of one: model.module and get_world_size() work there."""
    report = gradcheck.check_distributed(m.build, m.step_wrapper_api, m.batch())
    assert report.passed, report.message()


# ---------------------------------------------------------------- planted
def test_loss_divided_by_world_size_is_a_mismatch_that_says_so(shared):
    report = gradcheck.check_distributed(m.build, m.step_divides, m.batch())
    assert report.status == "mismatch"
    assert "1/world_size (1/2)" in report.message()
    assert "divides the loss by the world size" in report.message()
    with pytest.raises(gradcheck.GradientMismatchError, match="1/world_size"):
        gradcheck.assert_distributed(m.build, m.step_divides, m.batch())
    assert gradcheck.assert_distributed(m.build, m.step, m.batch()).passed


def test_forward_through_model_module_is_not_synchronised(shared):
    report = gradcheck.check_distributed(m.build, m.step_module, m.batch())
    assert report.status == "mismatch"
    text = report.message()
    assert "gradients were not synchronised" in text
    assert "model.module" in text
    assert report.location is not None


def test_head_unused_on_one_rank_is_a_verdict_not_a_raw_exception(shared):
    report = gradcheck.check_distributed(
        m.build, m.step_unused_head, m.unused_batch(), timeout=30
    )
    assert report.status == "mismatch", report.message()
    text = report.message()
    assert "Expected to have finished reduction" in text
    assert "'head_b.weight' (no gradient on rank 1)" in text
    assert "find_unused_parameters" in text
    assert report.location.tensor == "head_b.weight"
    # the same step with DDP told about unused parameters is right
    ok = gradcheck.check_distributed(
        m.build,
        m.step_unused_head,
        m.unused_batch(),
        wrap_kwargs={"find_unused_parameters": True},
    )
    assert ok.passed, ok.message()
    assert any("without a gradient on some ranks" in n for n in ok.notes)


# ---------------------------------------------------------------- never a hang
def test_a_rank_that_raises_gives_an_error_with_its_exception():
    report = gradcheck.check_distributed(m.build, m.step_raises, m.batch(), timeout=20)
    assert report.status == "error"
    assert (
        "rank 1 failed during step: ValueError: rank 1 cannot read its shard"
        in (report.notes[0])
    )
    assert math.isnan(report.error)


def test_weights_that_differ_in_the_ranks_are_named(shared):
    """build() gives the same weights twice here but others in each rank (DDP
    would broadcast rank 0's and hide it): the ranks compare their weights with
    this process's before wrapping."""
    report = gradcheck.check_distributed(m.build_per_process, m.step, m.batch())
    assert report.status == "error"
    assert "build() must return the same weights each call" in report.notes[0]
    assert "seed inside build()" in report.notes[0]
    assert "rank(s) [0, 1]" in report.notes[0]


def test_a_rank_stuck_in_a_collective_times_out_and_every_process_ends():
    kept = _our_workers()  # the module's shared pair, if open
    report = gradcheck.check_distributed(m.build, m.step_hangs, m.batch(), timeout=3)
    assert report.status == "timeout", report.message()
    assert "rank 0" in report.notes[0] and "Timed out" in report.notes[0]
    assert _our_workers() == kept


def test_kept_workers_serve_several_checks(shared):
    from gradcheck.backends import torch_distributed as td

    a = gradcheck.check_distributed(m.build, m.step, m.batch())
    b = gradcheck.check_distributed(m.build_batchnorm, m.step_batchnorm, m.batch())
    assert len(td._POOLS) == 1 and len(_our_workers()) == 2
    assert a.passed
    assert "kept from the previous check" in " ".join(b.notes)
    assert b.cost["spawn_seconds"] == 0.0
    # BatchNorm's batch statistics: not a mean over samples, and said so
    assert b.status == "mismatch"
    assert "SyncBatchNorm" in b.message()
    assert "synchronised correctly" in b.message()
    with td.keep_workers():  # nested: the outer keeps them
        pass
    assert len(td._POOLS) == 1


def test_leaving_keep_workers_ends_every_worker():
    from gradcheck.backends import torch_distributed as td

    assert td._KEEP == [1]  # the module's shared pool is open
    td._KEEP[0] -= 1
    try:
        with td.keep_workers():
            pass
        assert td._POOLS == {} and _our_workers() == []
    finally:
        td._KEEP[0] += 1


# ---------------------------------------------------------------- bad input
def _local_build():
    return m.build()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"build": lambda: m.build()}, gradcheck.UnsupportedInputError, "module level"),
        (
            {"step": lambda model, s: m.step(model, s)},
            gradcheck.UnsupportedInputError,
            "step",
        ),
        (
            {"build": m.build_unseeded},
            gradcheck.InvalidArgumentError,
            "seed inside build",
        ),
        ({"batch": m.batch(7)}, gradcheck.InvalidArgumentError, "multiple of 2"),
        (
            {"batch": (torch.ones(4, 2), torch.ones(6))},
            gradcheck.UnsupportedInputError,
            "dim 0",
        ),
        ({"batch": 3}, gradcheck.UnsupportedInputError, "holds no tensor"),
        ({"wrap": "zero"}, gradcheck.InvalidArgumentError, "wrap must be"),
        ({"world_size": 0}, gradcheck.InvalidArgumentError, "world_size"),
        ({"timeout": -1}, gradcheck.InvalidArgumentError, "timeout"),
        ({"wrap_kwargs": [1]}, gradcheck.InvalidArgumentError, "wrap_kwargs"),
        ({"build": m.batch}, gradcheck.UnsupportedInputError, "nn.Module"),
    ],
)
def test_bad_input_is_a_clear_gradcheck_error_before_any_process_starts(
    kwargs, error, match
):
    call = {"build": m.build, "step": m.step, "batch": m.batch()}
    call.update(kwargs)
    rng = rng_state()
    with pytest.raises(error, match=match):
        gradcheck.check_distributed(
            call.pop("build"), call.pop("step"), call.pop("batch"), **call
        )
    assert_same_rng(rng)


def test_a_step_that_raises_in_this_process_names_step():
    with pytest.raises(gradcheck.GradcheckError, match="step raised KeyError") as info:
        gradcheck.check_distributed(m.build, m.step_keyerror, m.batch())
    assert isinstance(info.value, KeyError)  # except KeyError still catches it


def test_random_step_is_nondeterministic_without_starting_ranks():
    report = gradcheck.check_distributed(m.build_dropout, m.step_plain, m.batch())
    assert report.status == "nondeterministic"
    assert "dropout" in report.notes[0]
    assert "no rank was started" in " ".join(report.notes)
    with pytest.raises(gradcheck.GradientMismatchError, match="nondeterministic"):
        gradcheck.assert_distributed(m.build_dropout, m.step_plain, m.batch())


# ---------------------------------------------------------------- the verdict's math
def _evidence(ranks, w=2, rng=None):
    rng = rng or np.random.default_rng(0)
    shards64 = [{"w": rng.normal(size=(5, 3))} for _ in range(w)]
    noise = [{"w": s["w"] + rng.normal(scale=1e-7, size=(5, 3))} for s in shards64]
    ref = {"w": sum(s["w"] for s in shards64) / w}
    return dp.Evidence(
        names=["w"],
        dtype="float32",
        world_size=w,
        reference=ref,
        reference_dtype="float64",
        single={"w": ref["w"].copy()},
        shards=noise,
        shards32=noise,
        shards64=shards64,
        single32={"w": ref["w"] + rng.normal(scale=1e-7, size=(5, 3))},
        ranks=ranks(ref, noise),
    )


def _launch():
    return dp.Launch(2, "ddp", "gloo", 0.5, [0.01, 0.02])


@pytest.mark.parametrize(
    ("ranks", "status", "cause"),
    [
        (lambda r, s: [{"w": r["w"] + 1e-8}] * 2, "passed", None),
        (lambda r, s: [{"w": r["w"] / 2}] * 2, "mismatch", "1/world_size"),
        (lambda r, s: [{"w": r["w"] * 2}] * 2, "mismatch", "world_size (2) times"),
        (lambda r, s: [s[0], s[1]], "mismatch", "not synchronised"),
        (lambda r, s: [{"w": r["w"] * 1.01}] * 2, "mismatch", "beyond the measured"),
        (
            lambda r, s: [{"w": r["w"]}, {"w": r["w"] * 1.5}],
            "mismatch",
            "ranks hold different",
        ),
    ],
)
def test_verdicts_from_the_evidence(ranks, status, cause):
    report = dp.report(_evidence(ranks), _launch(), seed=0, rtol=None, cost={})
    assert report.status == status
    if cause:
        assert cause in report.message()


def test_tolerance_is_the_measured_rounding_and_scales_to_float64():
    ev = _evidence(lambda r, s: [{"w": r["w"]}] * 2)
    t32 = dp.tolerances(ev)["w"]
    assert 1e-7 < t32.sigma < 1e-6  # the planted rounding noise, measured
    ev.dtype = "float64"
    t64 = dp.tolerances(ev)["w"]
    assert t64.sigma == pytest.approx(t32.sigma * 2.0**-52 / 2.0**-23)


def test_property_module_imports_no_framework():
    text = Path(dp.__file__).read_text()
    import re

    assert not re.search(r"^\s*(import|from) (torch|tensorflow|keras)", text, re.M)


# ---------------------------------------------------------------- slow
@pytest.mark.slow
def test_fsdp2_correct_passes_and_divided_loss_is_caught():
    ok = gradcheck.check_distributed(m.build, m.step, m.batch(), wrap="fsdp")
    assert ok.passed, ok.message()
    assert ok.mode == "fsdp"
    bad = gradcheck.check_distributed(m.build, m.step_divides, m.batch(), wrap="fsdp")
    assert bad.status == "mismatch" and "1/world_size" in bad.message()


@pytest.mark.slow
def test_under_torchrun_the_same_call_reads_rank_and_world_size(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys
            sys.path.insert(0, {str(root)!r})
            import gradcheck
            from tests import _dist_models as m
            ok = gradcheck.check_distributed(m.build, m.step, m.batch(), timeout=60)
            bad = gradcheck.check_distributed(m.build, m.step_module, m.batch(), timeout=60)
            with open(f"result-{{os.environ['RANK']}}.json", "w") as f:
                json.dump({{"rank": os.environ["RANK"], "ok": ok.status,
                           "bad": bad.status, "notes": ok.notes}}, f)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    # each rank writes a file (two ranks printing to one pipe interleave)
    lines = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert len(lines) == 2, out.stdout + out.stderr
    assert {x["rank"] for x in lines} == {"0", "1"}
    assert all(x["ok"] == "passed" and x["bad"] == "mismatch" for x in lines), lines
    assert any("under torchrun" in n for n in lines[0]["notes"])


# ---------------------------------------------------------------- audit jobs
def _audit_jobs(compile_: bool):
    from gradcheck import _audit_distributed

    return {
        (j.property, j.planted is not None): j
        for j in _audit_distributed.jobs(0, compile=compile_)
    }


def test_audit_jobs_hold_on_correct_models_and_catch_the_planted_bugs():
    from gradcheck import _audit_distributed, audit

    found = _audit_jobs(False)
    assert set(found) == {
        ("variants[autocast:bfloat16]", False),
        ("variants[autocast:bfloat16]", True),
        ("distributed[ddp]", False),
        ("distributed[ddp]", True),
    }
    try:
        for (_prop, planted), job in found.items():
            out = audit.run_job(job, examples=3, seed=0)
            assert out.ok, (job.name, out.error, out.report and out.report.message())
            assert out.verdict == ("caught" if planted else "holds")
    finally:
        _audit_distributed.close()
    # one pair at most: the jobs share it (and the module's shared pair, if open)
    assert len(_our_workers()) <= 2


@pytest.mark.slow
def test_audit_compile_jobs():
    from gradcheck import audit

    found = _audit_jobs(True)
    for planted in (False, True):
        out = audit.run_job(found["variants[compile]", planted], examples=3, seed=0)
        assert out.verdict == ("caught" if planted else "holds"), out.error


@pytest.mark.slow
def test_a_port_taken_before_the_ranks_bind_it_is_retried(monkeypatch):
    import socket

    from gradcheck.backends import torch_distributed as td

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    ports = [busy]
    real = td._free_port
    monkeypatch.setattr(td, "_free_port", lambda: ports.pop() if ports else real())
    try:
        report = gradcheck.check_distributed(m.build, m.step, m.batch(), timeout=5)
    finally:
        taken.close()
    assert report.passed, report.message()
    assert ports == []  # the taken port was tried first
    assert f"127.0.0.1:{busy};" not in " ".join(report.notes)
    assert "spawned on 127.0.0.1:" in " ".join(report.notes)


# ---------------------------------------------------------------- wire format
def _only_builtins_and_numpy(obj, path="batch"):
    """Every object in ``obj`` is a builtin or a NumPy array/scalar: nothing
    whose class pickle must find in a gradcheck module."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _only_builtins_and_numpy(k, f"{path} key")
            _only_builtins_and_numpy(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _only_builtins_and_numpy(v, f"{path}[{i}]")
    else:
        module = type(obj).__module__
        assert module in ("builtins", "numpy") or module.startswith("numpy."), (
            path,
            type(obj),
        )


def test_the_batch_crosses_as_builtins_and_numpy_and_comes_back_exactly():
    from gradcheck.backends import torch_distributed as td

    batch = {
        "x": torch.randn(4, 3, dtype=torch.float64).requires_grad_(),
        "pair": (torch.arange(4), torch.randn(4, 2).to(torch.bfloat16)),
        "mask": torch.tensor([True, False, True, True]),
    }
    wire = td.portable(batch)
    _only_builtins_and_numpy(wire)
    assert wire["x"]["dtype"] == "float64" and wire["x"][td.TENSOR] == 1
    back = td.unportable(td.shard(wire, 1, 2))
    assert torch.equal(back["x"], batch["x"].detach()[2:])
    assert back["x"].requires_grad and back["x"].dtype == torch.float64
    assert torch.equal(back["pair"][0], batch["pair"][0][2:])
    assert back["pair"][1].dtype == torch.bfloat16
    assert torch.equal(back["pair"][1], batch["pair"][1][2:])
    assert torch.equal(back["mask"], batch["mask"][2:])
    assert td.batch_size(wire) == 4


def test_a_second_import_of_the_backend_does_not_break_the_check():
    """CI's failure: pytester dropped gradcheck.backends.torch_distributed from
    sys.modules, a later import made a second module object, and the check -
    holding the first - pickled a batch class the second did not own
    (PicklingError ... not the same object as ...torch_distributed._Leaf).
    IPython's autoreload does the same to users. Both module objects are live
    here; a 2-rank check still runs and passes (module state restored after)."""
    import importlib

    import gradcheck.backends as backends

    name = "gradcheck.backends.torch_distributed"
    first = sys.modules[name]
    try:
        del sys.modules[name]
        second = importlib.import_module(name)
        assert second is not first
        # what CI had: the check uses the first module (the package attribute)
        # while pickle finds classes through sys.modules' second one; then the
        # other way round
        for used, found in ((first, second), (second, first)):
            backends.torch_distributed = used
            sys.modules[name] = found
            report = gradcheck.check_distributed(m.build, m.step, m.batch(), timeout=60)
            assert report.passed, report.message()
    finally:
        sys.modules[name] = first
        backends.torch_distributed = first
