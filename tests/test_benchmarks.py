"""The benchmark script runs end to end (quick mode): no timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_engine.py"
RATIOS = (
    "A_check32_over_train32",
    "B_check64_over_torch_gradcheck64",
    "check64_over_train64",
)


def _load():
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_result(res: dict) -> None:
    for key in RATIOS:
        value = res["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    for name, check in res["checks"].items():
        assert check["status"] == "passed", (name, check["message"])
        assert check["forward"] > 0 and check["backward"] > 0, name
    assert res["torch_gradcheck"]["passed"] is True
    assert res["model"]["parameters"] > 0


def test_run_quick():
    bench = _load()
    res = bench.run(quick=True, repeats=1)
    _check_result(res)
    assert res["method"]["repeats"] == 1
    assert res["model"]["quick"] is True
    json.dumps(res)  # what the script writes


def test_script_writes_json(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Ratios" in proc.stdout or "ratio" in proc.stdout
    res = json.loads(out.read_text())
    _check_result(res)
    assert res["method"]["repeats"] == 2


def test_floor_table_splits_the_check_from_its_reports(capsys):
    """--floor's rows carry the check's parts read from its reports' cost
    (gradient, reference, own) beside the plain-torch floor's two parts, and
    print_floor prints them."""
    bench = _load()
    rows = bench.floor_table(repeats=2, quick=True)
    assert [r["model"] for r in rows] == ["MLP relu", "MLP tanh"]
    for r in rows:
        parts = r["check_parts_s"]
        keys = {"gradient", "reference", "own", "floor_gradient", "floor_reference"}
        assert set(parts) == keys, parts
        assert all(math.isfinite(v) and v >= 0 for v in parts.values()), parts
        assert parts["gradient"] > 0 and parts["reference"] > 0
    bench.print_floor(rows)
    out = capsys.readouterr().out
    assert "gradient" in out and "reference" in out and "own" in out
    json.dumps(rows)
