"""`gradcheck audit`: exit codes, JSON report, skipped frameworks, usage errors,
shrunk counterexamples printed as code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradcheck import audit, cli


def test_usage_errors_exit_2(capsys):
    for argv in (
        ["audit", "--examples", "0"],
        ["audit", "--framework", "jax"],
        ["audit", "--device", "tpu"],
        ["audit", "--profile", "quick"],
        ["audit", "--seed", "x"],
        ["bogus"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "invalid" in capsys.readouterr().err
    assert cli.main([]) == 2  # no command: help, usage error


def run_audit(tmp_path, *extra):
    out, html = tmp_path / "sub" / "audit.json", tmp_path / "sub" / "audit.html"
    code = cli.main(["audit", *extra, "--json", str(out), "--report", str(html)])
    return code, out, html


def test_audit_torch_writes_json_and_html_and_exits_0(tmp_path, capsys):
    pytest.importorskip("torch")
    code, out, html = run_audit(tmp_path, "--framework", "torch", "--examples", "1")
    printed = capsys.readouterr().out
    assert code == 0, printed
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "torch/float32/locality: planted a head&#39;s input detached" in page
    data = json.loads(out.read_text())
    assert data["summary"]["all_ok"] is True
    assert data["command"] == {
        "framework": "torch",
        "device": "auto",
        "examples": 1,
        "profile": "ci",
        "seed": 0,
    }
    cases = [c for c in data["cases"] if c["skip"] is None]
    props = {c["property"] for c in cases}
    assert {"finite_difference", "linearity", "locality"} <= props
    for case in cases:
        assert case["ok"] is True
        assert case["examples"] == 1
        assert case["verdict"] == ("holds" if case["planted"] is None else "caught")
        # a planted bug is caught by "mismatch" alone: every example, not just one
        expected = "passed" if case["planted"] is None else "mismatch"
        assert case["report"]["status"] == expected, case["name"]
        assert case["statuses"] == {expected: case["examples"]}, case["name"]
    assert any(c["planted"] for c in cases) and any(not c["planted"] for c in cases)
    assert data["environment"]["torch"]
    assert not list(out.parent.glob(".audit.json.*"))  # no temp file left behind
    assert "jobs as expected" in printed and "every property holds" in printed


def test_missing_framework_is_skipped_not_a_crash(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    real = audit.available
    monkeypatch.setattr(audit, "available", lambda fw: fw != "tensorflow" and real(fw))
    monkeypatch.setattr(audit, "jobs", lambda fws, seed, device="auto": _few(fws, seed))
    code, out, _ = run_audit(tmp_path, "--examples", "1")
    assert code == 0
    data = json.loads(out.read_text())
    assert "tensorflow" in data["skipped"]
    assert "skipped tensorflow" in capsys.readouterr().out


REAL_JOBS = audit.jobs


def _few(frameworks, seed, device="auto"):
    """The float64 linearity jobs only: fast."""
    for job in REAL_JOBS(frameworks, seed, device):
        if job.property == "linearity" and job.dtype == "float64":
            yield job


def test_a_counterexample_exits_1_and_is_shrunk_to_code(tmp_path, monkeypatch, capsys):
    """A planted bug that goes unseen: the audit fails, shrinks the model and prints
    code that rebuilds it."""
    pytest.importorskip("torch")

    def unseen(frameworks, seed, device="auto"):
        correct = None
        for job in _few(frameworks, seed, device):
            if job.planted is None:
                correct = job.check
            else:  # "plant" nothing: the correct total, expected to be caught
                job.planted, job.check = "nothing at all", correct
            yield job

    monkeypatch.setattr(audit, "jobs", unseen)
    code, out, html = run_audit(tmp_path, "--framework", "torch", "--examples", "3")
    printed = capsys.readouterr().out
    assert code == 1
    assert "counterexample" in printed and "this code reproduces it" in printed
    data = json.loads(out.read_text())
    bad = [c for c in data["cases"] if not c["ok"]]
    assert len(bad) == 1 and bad[0]["verdict"] == "counterexample"
    source = bad[0]["code"]
    compile(source, "<counterexample>", "exec")
    # shrunk: a minimal model has the fewest heads the job allows (2) and tiny layers
    spec = audit_spec(bad[0]["spec"])
    assert len(spec.heads) == 2
    assert "Shrunk counterexample" in html.read_text()


@pytest.mark.parametrize("status", ["nondifferentiable", "nondeterministic"])
def test_a_planted_bug_judged_anything_but_mismatch_is_not_caught(
    tmp_path, monkeypatch, capsys, status
):
    """A verdict that is not "mismatch" on a planted bug says the check could not
    judge the gradient: the audit reports a counterexample and exits 1."""
    pytest.importorskip("torch")

    def unjudged(frameworks, seed, device="auto"):
        for job in _few(frameworks, seed, device):
            if job.planted is not None:
                real = job.check

                def check(spec, batch, seed, real=real):
                    report = real(spec, batch, seed)
                    assert report.status == "mismatch"  # the real verdict
                    report.status = status  # ... replaced by a non-catch
                    return report

                job.check = check
            yield job

    monkeypatch.setattr(audit, "jobs", unjudged)
    code, out, _ = run_audit(tmp_path, "--framework", "torch", "--examples", "2")
    assert code == 1, capsys.readouterr().out
    data = json.loads(out.read_text())
    verdicts = {c["planted"] is None: c["verdict"] for c in data["cases"]}
    assert verdicts == {True: "holds", False: "counterexample"}


def test_job_expectations():
    """Correct models must pass; a planted bug counts as caught only by mismatch."""
    from gradcheck.result import CheckReport

    correct, planted = None, None
    for job in REAL_JOBS(["torch"], 0):
        if job.property == "linearity" and job.dtype == "float64":
            if job.planted is None:
                correct = job
            else:
                planted = job
    for status in ("passed", "mismatch", "nondifferentiable", "nondeterministic"):
        report = CheckReport(
            "linearity", status, "torch", "cpu", "float64", 0, "analytic", 0, 1, ""
        )
        assert correct.as_expected(report) is (status == "passed"), status
        assert planted.as_expected(report) is (status == "mismatch"), status


def audit_spec(data):
    from gradcheck.architectures import ModelSpec

    return ModelSpec.from_dict(data)


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gradcheck.cli", "audit", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert "--examples" in out.stdout and "--device" in out.stdout
    assert "--profile" in out.stdout and "thorough" in out.stdout


def test_asking_for_a_gpu_that_is_not_there_is_a_usage_error(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, _ = run_audit(tmp_path, "--framework", "torch", "--device", "cuda")
    assert code == 2
    assert "GPU" in capsys.readouterr().out
    assert not out.exists()


def test_without_a_gpu_the_cpu_vs_gpu_jobs_are_skipped_with_the_reason():
    pytest.importorskip("torch")
    import torch

    listed = list(audit.jobs(["torch"], 0))
    devices = [j for j in listed if j.property == "devices"]
    assert len(devices) == 4  # 2 dtypes x correct/planted
    if not torch.cuda.is_available():
        assert all("no GPU" in j.skip for j in devices)


def test_the_cpu_vs_gpu_job_runs_its_pipeline(monkeypatch):
    """The job's check itself, pointed at (cpu, cpu): what a GPU machine runs."""
    pytest.importorskip("torch")
    job = next(audit._device_jobs("torch", "float32", ["cpu"], "auto"))
    out = audit.run_job(job, 2, 0)
    assert out.verdict == "holds", out.report.message() if out.report else out.error
    assert out.report.property == "devices"


# ------------------------------------------------------------------ schedule
def _job(framework, prop, planted=None, device="cpu", skip=None):
    return audit.Job(
        framework, prop, "float32", planted, None, None, skip=skip, device=device
    )


def test_schedule_runs_shared_workers_together_and_the_longest_first():
    """Side by side, the processes take groups of plan indices: the jobs sharing
    a worker process run back to back in one process (both MirroredStrategy jobs
    on one worker, the DDP pair on one pair of ranks), longest first, every job
    exactly once."""
    planned = [
        _job("torch", "linearity"),
        _job("torch", "distributed[ddp]"),
        _job("tensorflow", "finite_difference", "bug"),
        _job("torch", "distributed[ddp]", "bug"),
        _job("tensorflow", "keras_training", device="MirroredStrategy:2"),
        _job("torch", "devices", skip="no GPU"),
        _job("tensorflow", "keras_training", "bug", device="MirroredStrategy:2"),
        _job("torch", "locality"),
    ]
    schedule = audit._schedule(planned)
    assert schedule == [[4, 6], [1, 3], [2], [0], [7], [5]]
    assert sorted(i for group in schedule for i in group) == list(range(len(planned)))
