"""The pytest plugin through pytester: options, recording, reports, marker, xdist.

An installed gradcheck registers the plugin as a pytest11 entry point, which inner
sessions load by themselves; a source checkout on PYTHONPATH needs
``-p gradcheck.pytest_plugin`` (passing both would register it twice). Runs are
in-process where possible; xdist and the import check need a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# In-process runs restore sys.modules afterwards, and extension modules (numpy,
# torch) cannot be imported twice: import what the inner sessions use up front.
import gradcheck.cli  # noqa: F401
import gradcheck.pytest_plugin  # noqa: F401
import gradcheck.report  # noqa: F401

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - the torch-using runs skip themselves
    pass

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(
        ep.value == "gradcheck.pytest_plugin" for ep in entry_points(group="pytest11")
    )


PLUGIN = (() if _entry_point_installed() else ("-p", "gradcheck.pytest_plugin")) + (
    "-p",
    "no:cacheprovider",
)

TESTS = """
import pytest
torch = pytest.importorskip("torch")
import gradcheck


class Squared(torch.autograd.Function):  # x**2 with a backward 1% off: a planted bug
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x * 1.01


def x64():
    return torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_()


def test_good():
    assert gradcheck.check_gradients(lambda x: (x.sin() * x).sum(), (x64(),)).passed


def test_bad():
    gradcheck.assert_gradients(lambda x: Squared.apply(x).sum(), (x64(),))


def test_labelled():
    gradcheck.check_gradients(lambda x: x.exp().sum(), (x64(),), label="mine")
"""

FIXTURE_TESTS = """
import pytest
torch = pytest.importorskip("torch")


def x64():
    return torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_()


def test_fixture(gradcheck):
    report = gradcheck.check_gradients(lambda x: x.tanh().sum(), (x64(),))
    assert report.passed and gradcheck.device == "cpu"


@pytest.mark.gradcheck(seed=3, mode="directional", rtol=1e-6)
def test_marker(gradcheck):
    report = gradcheck.check_gradients(lambda x: x.tanh().sum(), (x64(),))
    assert (report.seed, report.mode) == (3, "directional")
    report = gradcheck.check_gradients(lambda x: x.tanh().sum(), (x64(),), seed=5)
    assert report.seed == 5  # a keyword passed to the fixture wins


@pytest.mark.gradcheck(seed=4, mode="full")
def test_linearity(gradcheck):
    w = torch.nn.Parameter(x64().detach())
    losses = {"a": lambda: (w * w).sum(), "b": lambda: w.sin().sum()}
    total = lambda: losses["a"]() + 0.5 * losses["b"]()
    report = gradcheck.assert_linearity(total, losses, {"a": 1.0, "b": 0.5}, params=[w])
    assert report.seed == 4
    assert report.flow.reached_by(report.flow.tensors[0]) == ["a", "b"]
"""


BAD_MARKER = """
import pytest


class TestC:
    @pytest.mark.gradcheck({})
    def test_x(self):
        pass
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*PLUGIN, *args)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "text",
    [
        "--gradcheck-report=PATH",
        "--gradcheck-json=PATH",
        "--gradcheck-seed=S",
        "--gradcheck-device={auto,cpu,cuda,all}",
        "--gradcheck-profile={ci,thorough}",
        "gradcheck_report",
        "gradcheck_seed",
        "Default:",
    ],
)
def test_options_in_help(pytester, text):
    result = _run(pytester, "--help")
    assert result.ret == 0
    assert text in result.stdout.str()


def test_records_passing_and_failing_checks_with_node_ids(pytester):
    pytester.makepyfile(test_rec=TESTS)
    out = pytester.path / "reports" / "gc.json"
    html = pytester.path / "reports" / "gc.html"
    result = _run(
        pytester, "--gradcheck-json", str(out), "--gradcheck-report", str(html)
    )
    result.assert_outcomes(passed=2, failed=1)
    doc = _json(out)
    assert doc["schema"] == "gradcheck-report/1"
    by_id = {c["id"]: c for c in doc["checks"]}
    assert set(by_id) == {
        "test_rec.py::test_good",
        "test_rec.py::test_bad",
        "test_rec.py::test_labelled",
    }
    assert by_id["test_rec.py::test_good"]["outcome"] == "ok"
    bad = by_id["test_rec.py::test_bad"]
    assert bad["outcome"] == "failed" and bad["report"]["status"] == "mismatch"
    assert bad["report"]["label"] == "test_rec.py::test_bad"  # labelled with node id
    assert by_id["test_rec.py::test_labelled"]["report"]["label"] == "mine"
    assert doc["summary"]["checks"] == 3 and doc["summary"]["failed"] == 1
    assert doc["environment"]["torch"]
    text = html.read_text()
    assert "test_rec.py::test_bad" in text and "<svg" in text
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_terminal_summary_lists_failing_check(pytester):
    pytester.makepyfile(test_rec=TESTS)
    result = _run(pytester)
    result.stdout.fnmatch_lines(
        [
            "*= gradcheck =*",
            "FAILED test_rec.py::test_bad: gradcheck: finite-difference check FAILED "
            "(mismatch)*",
            "3 gradient checks in 3 tests: 2 passed, 1 failed (mismatch 1, passed 2)",
        ]
    )


def test_no_checks_no_summary(pytester):
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = _run(pytester)
    assert result.ret == 0
    assert "gradient checks" not in result.stdout.str()


def test_marker_defaults_and_seed_reach_reports(pytester, monkeypatch):
    monkeypatch.setenv("GRADCHECK_SEED", "11")
    pytester.makepyfile(test_fix=FIXTURE_TESTS, test_rec=TESTS)
    out = pytester.path / "gc.json"
    result = _run(pytester, "--gradcheck-seed", "7", "--gradcheck-json", str(out))
    result.assert_outcomes(passed=5, failed=1)
    seeds = {
        (c["id"].split("::")[1], c["report"]["seed"]) for c in _json(out)["checks"]
    }
    assert seeds == {
        ("test_fixture", 7),  # the session seed through the fixture
        ("test_marker", 3),  # the marker's
        ("test_marker", 5),  # the call's
        ("test_linearity", 4),
        ("test_good", 7),  # the session seed through $GRADCHECK_SEED
        ("test_bad", 7),
        ("test_labelled", 7),
    }
    assert os.environ["GRADCHECK_SEED"] == "11"  # restored after the session


def test_marker_order_and_ad_reach_check_gradients(pytester):
    """@pytest.mark.gradcheck(order=2, ad="forward") are the fixture's defaults."""
    pytester.makepyfile(
        test_o="""
import pytest
torch = pytest.importorskip("torch")

@pytest.mark.gradcheck(order=2, ad="forward")
def test_second(gradcheck):
    x = torch.linspace(-1, 1, 4, dtype=torch.float64, requires_grad=True)
    report = gradcheck.check_gradients(lambda x: x.sin(), x)
    assert (report.order, report.ad) == (2, "forward"), report.headline()
    assert report.passed, report.message()
"""
    )
    _run(pytester).assert_outcomes(passed=1)


def test_ini_options_and_command_line_wins(pytester):
    pytester.makeini(
        "[pytest]\ngradcheck_json = out/gc.json\ngradcheck_seed = 5\n"
        "gradcheck_device = cpu\n"
    )
    pytester.makepyfile(test_fix=FIXTURE_TESTS)
    result = _run(pytester, "--gradcheck-seed", "6")
    result.assert_outcomes(passed=3)
    doc = _json(pytester.path / "out" / "gc.json")
    fixture = [c for c in doc["checks"] if c["id"].endswith("test_fixture")]
    assert fixture[0]["report"]["seed"] == 6
    assert doc["environment"]["device (fixture)"] == "cpu"


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("rtoll=1e-3", "unknown keyword(s) rtoll"),
        ("0.1", "keywords only"),
        ("mode='fast'", "mode='fast'"),
        ("seed=-1", "seed=-1"),
        ("step=0", "step=0"),
        ("order=3", "order=3"),
        ("ad='sideways'", "ad='sideways'"),
    ],
)
def test_bad_marker_is_a_collection_error(pytester, marker, message):
    pytester.makepyfile(test_m=BAD_MARKER.format(marker))
    result = _run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting test_m.py*"])
    assert message in result.stdout.str()
    assert "test_m.py::TestC::test_x" in result.stdout.str()
    result.assert_outcomes(errors=1)


def test_bad_marker_under_xdist_is_a_collection_error(pytester, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_m=BAD_MARKER.format("rtoll=1e-3"))
    result = pytester.runpytest_subprocess(*PLUGIN, "-n", "2", timeout=120)
    assert result.ret != pytest.ExitCode.OK  # xdist says 1, plain pytest 2
    result.stdout.fnmatch_lines(["*ERROR collecting test_m.py*"])
    assert "unknown keyword(s) rtoll" in result.stdout.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gradcheck-seed", "x"), "non-negative integer"),
        (("--gradcheck-seed", "-3"), "non-negative integer"),
        (("-o", "gradcheck_device=tpu"), "gradcheck_device = 'tpu'"),
        (("--gradcheck-device", "tpu"), "invalid choice"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, message):
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_profile_option_loads_and_restores_hypothesis_profile(pytester):
    settings = pytest.importorskip("hypothesis").settings
    before = settings.get_current_profile_name()
    pytester.makepyfile(
        "from hypothesis import settings\n\n"
        "def test_profile():\n"
        "    assert settings.get_current_profile_name() == 'thorough'\n"
    )
    result = _run(pytester, "--gradcheck-profile", "thorough")
    result.assert_outcomes(passed=1)
    assert settings.get_current_profile_name() == before


def test_unregistered_profile_loads_gradcheck_default(pytester, monkeypatch):
    # a fresh process: this session registered "thorough" in its conftest
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(
        "from hypothesis import settings\n\n"
        "def test_profile():\n"
        "    assert settings.get_current_profile_name() == 'thorough'\n"
        "    assert settings().max_examples == 200 and settings().deadline is None\n"
    )
    result = pytester.runpytest_subprocess(
        *PLUGIN, "--gradcheck-profile", "thorough", "--gradcheck-json", "out.json"
    )
    result.assert_outcomes(passed=1)
    doc = _json(pytester.path / "out.json")
    profile = doc["environment"]["hypothesis profile"]
    assert profile == "thorough (gradcheck's default)"


DEVICE_TESTS = """
import pytest
from gradcheck.errors import DeviceUnavailableError
torch = pytest.importorskip("torch")


def test_devices(gradcheck):
    assert gradcheck.devices("torch")[0] == "cpu"
    # auto: the first GPU where there is one, else the CPU
    assert gradcheck.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_check_devices(gradcheck):
    model = torch.nn.Linear(3, 2).double()
    batch = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    loss = lambda m, b: m(b).square().sum()
    report = gradcheck.check_devices(loss, model, batch, devices=("cpu", "cpu"))
    assert report.property == "devices" and report.passed
    # auto: CPU vs GPU where there is one; on a CPU-only machine, skipped here
    report = gradcheck.check_devices(loss, model, batch)
    assert torch.cuda.is_available()
    assert report.passed and report.device.startswith("cpu vs cuda:0"), report.message()


def test_cuda_requested(gradcheck):
    # --gradcheck-device cuda: the GPU where there is one, else a clear error
    if torch.cuda.is_available():
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        assert gradcheck.device == "cuda:0" and gradcheck.devices("torch") == gpus
    else:
        with pytest.raises(DeviceUnavailableError, match="GPU"):
            gradcheck.device
"""


@pytest.mark.torch
def test_device_option_selects_devices(pytester):
    """Right with and without a GPU: no outcome depends on skipping a GPU test."""
    pytester.makepyfile(DEVICE_TESTS)
    result = _run(pytester, "--gradcheck-device", "cuda", "-k", "cuda_requested")
    result.assert_outcomes(passed=1)
    result = _run(pytester, "--gradcheck-device", "auto", "-k", "not cuda_requested")
    gpu = torch.cuda.is_available()
    # without a GPU, check_devices under auto skips its test (by design)
    result.assert_outcomes(passed=1 + gpu, skipped=1 - gpu)


def test_xdist_controller_writes_one_json_with_both_workers(pytester, monkeypatch):
    pytest.importorskip("xdist")
    pytest.importorskip("torch")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_rec=TESTS, test_fix=FIXTURE_TESTS)
    out = pytester.path / "gc.json"
    html = pytester.path / "gc.html"
    result = pytester.runpytest_subprocess(
        *PLUGIN,
        "-n",
        "2",
        "--dist",
        "loadfile",
        "--gradcheck-json",
        str(out),
        "--gradcheck-report",
        str(html),
        timeout=120,
    )
    result.assert_outcomes(passed=5, failed=1)
    doc = _json(out)
    assert len(doc["checks"]) == 7
    assert {c["worker"] for c in doc["checks"]} == {"gw0", "gw1"}
    assert {c["id"].split("::")[0] for c in doc["checks"]} == {
        "test_rec.py",
        "test_fix.py",
    }
    assert "test_rec.py::test_bad" in html.read_text()
    result.stdout.fnmatch_lines(["FAILED test_rec.py::test_bad: *", "JSON report: *"])
    assert sorted(p.name for p in pytester.path.glob("*gc*")) == ["gc.html", "gc.json"]


def test_loading_the_plugin_imports_no_framework():
    code = (
        "import sys, gradcheck.pytest_plugin\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


VARIANT_AND_DISTRIBUTED_TESTS = """
import pytest
torch = pytest.importorskip("torch")


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def step(model, shard):
    x, y = shard
    ((model(x) - y) ** 2).mean().backward()


def step_divided(model, shard):
    x, y = shard
    (((model(x) - y) ** 2).mean() / torch.distributed.get_world_size()).backward()


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


def test_gpu_only_variants_skip_here(gradcheck):
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    report = gradcheck.check_variants(loss, build(), batch(), variants="cuda")
    assert report.passed  # reached on a GPU machine only


def test_distributed(gradcheck):
    assert gradcheck.check_distributed(build, step, batch()).passed
    with pytest.raises(AssertionError, match="1/world_size"):
        gradcheck.assert_distributed(build, step_divided, batch())
"""


@pytest.mark.torch
def test_fixture_check_variants_skips_and_check_distributed_runs(pytester):
    """check_variants with only GPU variants skips its test on a CPU-only machine
    (status "skipped": the JSON records the check as skipped); check_distributed
    on the fixture spawns ranks that import the test module's build/step."""
    pytester.makepyfile(test_vd=VARIANT_AND_DISTRIBUTED_TESTS)
    out = pytester.path / "vd.json"
    result = _run(pytester, "--gradcheck-json", str(out))
    gpu = torch.cuda.is_available()
    result.assert_outcomes(passed=1 + gpu, skipped=1 - gpu)
    doc = _json(out)
    outcomes = {c["id"].split("::")[1]: c["outcome"] for c in doc["checks"]}
    assert outcomes["test_gpu_only_variants_skip_here"] == ("ok" if gpu else "skipped")
    statuses = [c["report"]["status"] for c in doc["checks"]]
    assert statuses.count("mismatch") == 1 and "passed" in statuses
    if not gpu:
        assert doc["summary"]["by_status"]["skipped"] == 1
        # the summary counts it as skipped, not as a failing check
        result.stdout.fnmatch_lines(
            ["3 gradient checks in 2 tests: 1 passed, 1 failed, 1 skipped*"]
        )
        assert "FAILED test_vd.py::test_gpu_only" not in result.stdout.str()
