"""`gradcheck audit`: exit codes, JSON report, skipped frameworks, usage errors."""

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
        ["audit", "--seed", "x"],
        ["bogus"],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "invalid" in capsys.readouterr().err
    assert cli.main([]) == 2  # no command: help, usage error


def test_audit_torch_writes_json_and_exits_0(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "sub" / "audit.json"
    html = tmp_path / "sub" / "audit.html"
    code = cli.main(
        ["audit", "--framework", "torch", "--examples", "1", "--json", str(out)]
        + ["--report", str(html)]
    )
    assert code == 0, capsys.readouterr().out
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "planted_detached_aux_branch" in page
    data = json.loads(out.read_text())
    assert data["summary"]["all_ok"] is True
    assert data["summary"]["cases"] == len(data["cases"]) == 8
    names = {c["name"] for c in data["cases"]}
    assert any("planted" in n for n in names)
    for case in data["cases"]:
        assert case["ok"] is True
        assert case["report"]["status"] in (
            "passed",
            "mismatch",
            "nondifferentiable",
            "nondeterministic",
        )
        assert case["expected"] in ("passed", "caught")
    assert data["environment"]["torch"]
    assert not list(out.parent.glob(".audit.json.*"))  # no temp file left behind
    assert "cases as expected" in capsys.readouterr().out


def test_missing_framework_is_skipped_not_a_crash(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    real = audit.available
    monkeypatch.setattr(audit, "available", lambda fw: fw != "tensorflow" and real(fw))
    out = tmp_path / "a.json"
    argv = ["audit", "--examples", "1", "--json", str(out)]
    assert cli.main([*argv, "--report", str(tmp_path / "a.html")]) == 0
    data = json.loads(out.read_text())
    assert "tensorflow" in data["skipped"]
    assert "skipped tensorflow" in capsys.readouterr().out


def test_failing_case_exits_1(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    original = audit.cases

    def inverted(fw, examples, seed):  # expect the opposite of the truth
        for case in original(fw, examples, seed):
            case.expect_pass = not case.expect_pass
            yield case

    monkeypatch.setattr(audit, "cases", inverted)
    assert (
        cli.main(
            [
                "audit",
                "--framework",
                "torch",
                "--examples",
                "1",
                "--json",
                str(tmp_path / "a.json"),
                "--report",
                str(tmp_path / "a.html"),
            ]
        )
        == 1
    )


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gradcheck.cli", "audit", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert "--examples" in out.stdout and "Default: 3" in out.stdout
