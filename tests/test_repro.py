"""Repro bundles and ``gradcheck replay``: a planted bug caught through each front
door (assertion, pytest plugin, check_model / check-model, audit) writes a bundle;
the bundle replays (``reproduced: mismatch``); recorded versions that differ are
named; a corrupt, missing or not replayable bundle is a clear GradcheckError (exit
2 from the CLI), never a traceback. A correct model writes no bundle.

The functions and models below are module-level so that bundles can name them
(``tests.test_repro:planted_square``): that is what a replay imports.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import gradcheck
import gradcheck.cli  # noqa: F401 - imported once (pytester runs in-process)
import gradcheck.pytest_plugin  # noqa: F401
from gradcheck import models, repro
from gradcheck.cli import main

torch = pytest.importorskip("torch")

# pytester's in-process runs drop the modules first imported inside them, and
# torch's dynamo (imported by the first torch.manual_seed) and transformers'
# lazily loaded models cannot be imported twice: load them here, at collection,
# whichever test file's inner session would otherwise be first.
importlib.import_module("torch._dynamo")

try:
    from transformers import LlamaConfig, LlamaModel  # noqa: F401
except ImportError:  # pragma: no cover - the hf test skips itself
    pass

from tests._repro import cli_replay, edit_bundle, list_bundles  # noqa: E402
from tests.test_plugin import PLUGIN  # noqa: E402  (how inner sessions load it)

pytest_plugins = ["pytester"]

HERE = "tests.test_repro"


# ---------------------------------------------------------------- planted bugs
class ScaledIdentity(torch.autograd.Function):
    """The identity whose backward scales the gradient by 1 + 1e-3."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-3)


def planted_square(x, w):
    """(x * w)**2 summed, with the planted backward on x * w."""
    return ScaledIdentity.apply(x * w).pow(2).sum()


def tf_planted(x):
    """TensorFlow: sin(x)**2 summed, with a backward scaled by 1 + 1e-3 on sin."""
    import tensorflow as tf

    @tf.custom_gradient
    def scaled(h):
        return tf.identity(h), lambda g: g * (1 + 1e-3)

    return tf.reduce_sum(scaled(tf.sin(x)) ** 2)


def correct_square(x, w):
    return (x * w).pow(2).sum()


class Net(torch.nn.Module):
    """A tiny MLP; ``planted`` puts the scaled backward on its hidden layer."""

    def __init__(self, planted: bool = True):
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        self.out = torch.nn.Linear(6, 2)
        self.planted = planted

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.planted:
            h = ScaledIdentity.apply(h)
        return self.out(h)

    def loss(self, x):
        return self(x).pow(2).sum()


class NeedsArgs(Net):
    def __init__(self, width):
        super().__init__(planted=True)


def planted_mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net(True), torch.randn(5, 4)


def correct_mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net(False), torch.randn(5, 4)


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w


# ---------------------------------------------------------------- assertion
def test_assertion_writes_a_bundle_that_replays(tmp_path, capsys):
    with pytest.raises(gradcheck.GradientMismatchError) as info:
        gradcheck.assert_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    report = info.value.report
    (bundle,) = list_bundles(tmp_path)
    assert report.repro_bundle == str(bundle)
    assert f"repro bundle: {bundle}" in str(info.value)  # the message names it
    assert bundle.name.startswith("tests.test_repro-planted_square-float64-")
    assert {p.name for p in bundle.iterdir()} == {
        "bundle.json",
        "report.json",
        "README.txt",
        "inputs.npz",
    }
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"] is True
    assert doc["call"]["entry"] == "check_gradients"
    assert doc["call"]["fn"] == {"kind": "importable", "name": f"{HERE}:planted_square"}
    assert doc["call"]["options"]["seed"] == 0
    assert doc["verdict"]["status"] == "mismatch"
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["gradcheck"] == gradcheck.__version__
    assert {"python", "numpy", "tensorflow", "keras", "transformers"} <= set(
        doc["versions"]
    )
    assert doc["machine"]["cpu"]
    with np.load(bundle / "inputs.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs.0"], _inputs()[0].detach().numpy())
    assert "gradcheck replay" in (bundle / "README.txt").read_text()
    assert json.loads((bundle / "report.json").read_text())["repro_bundle"] == str(
        bundle
    )

    code, out = cli_replay(capsys, bundle)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == "reproduced: mismatch"
    assert "versions differ" not in out


def test_passing_check_writes_no_bundle(tmp_path):
    report = gradcheck.check_gradients(correct_square, _inputs(), repro_dir=tmp_path)
    assert report.passed and report.repro_bundle is None
    assert not list(tmp_path.iterdir())
    assert "repro bundle" not in report.message()


def test_an_unwritable_repro_dir_is_a_note_never_a_lost_verdict(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    report = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=blocker)
    assert report.status == "mismatch" and report.repro_bundle is None
    assert any(n.startswith("no repro bundle written: ") for n in report.notes)
    with pytest.raises(gradcheck.InvalidArgumentError, match="repro_dir"):
        gradcheck.check_gradients(planted_square, _inputs(), repro_dir=3)


def test_same_failure_twice_keeps_one_bundle_and_never_overwrites(tmp_path):
    first = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    again = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    assert first.repro_bundle == again.repro_bundle
    other = gradcheck.check_gradients(
        planted_square, _inputs(), repro_dir=tmp_path, seed=1
    )
    assert other.repro_bundle != first.repro_bundle
    # a different bundle under a taken name gets a suffix, the old one stays
    taken = Path(first.repro_bundle)
    doc = json.loads((taken / "bundle.json").read_text())
    doc["id"] = "someone-else"
    (taken / "bundle.json").write_text(json.dumps(doc))
    third = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    assert third.repro_bundle == f"{taken}-2"
    assert json.loads((taken / "bundle.json").read_text())["id"] == "someone-else"


def test_module_params_replay_with_the_stored_state_dict(tmp_path, capsys):
    torch.manual_seed(1)
    net = Net(True).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    report = gradcheck.check_gradients(net.loss, (x,), params=net, repro_dir=tmp_path)
    assert report.status == "mismatch"
    bundle = Path(report.repro_bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["fn"] == {"kind": "params_method", "name": "loss"}
    assert doc["call"]["params"]["class"] == f"{HERE}:Net"
    with np.load(bundle / "weights.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inp.weight"], net.inp.weight.detach())
    result = repro.replay(bundle)
    assert result.reproduced and result.report.status == "mismatch"
    # the stored weights, not a fresh Net(): the same numbers
    assert result.report.error == pytest.approx(report.error, rel=1e-6)
    assert result.report.location.describe() == report.location.describe()


def test_not_replayable_bundle_says_what_is_missing(tmp_path, capsys):
    x, w = _inputs()
    report = gradcheck.check_gradients(
        lambda a: planted_square(a, w), (x,), repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)  # written all the same, data to read
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"] is False
    assert "lambda" in doc["not_replayable_because"]
    code, out = cli_replay(capsys, bundle)
    assert code == 2
    assert "cannot be replayed" in out and "define it at module level" in out
    assert "Traceback" not in out

    net = NeedsArgs(3).double()
    report = gradcheck.check_gradients(
        net, (torch.randn(2, 4, dtype=torch.float64),), params=net, repro_dir=tmp_path
    )
    code, out = cli_replay(capsys, report.repro_bundle)
    assert code == 2 and "needs constructor arguments" in out


@pytest.mark.slow  # TensorFlow's import
def test_tensorflow_inputs_replay(tmp_path):
    tf = pytest.importorskip("tensorflow")
    x = tf.Variable(tf.constant(np.linspace(-1.0, 1.0, 5)))
    report = gradcheck.check_gradients(tf_planted, (x,), repro_dir=tmp_path)
    assert report.status == "mismatch"
    doc = json.loads((Path(report.repro_bundle) / "bundle.json").read_text())
    (leaf,) = doc["call"]["inputs"]["tuple"]
    assert leaf["framework"] == "tensorflow" and leaf["variable"] is True
    result = repro.replay(report.repro_bundle)
    assert result.reproduced and result.report.framework == "tensorflow"
    assert result.report.error == pytest.approx(report.error, rel=1e-6)


# ---------------------------------------------------------------- versions, verdicts
def _planted_bundle(tmp_path) -> Path:
    report = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    return Path(report.repro_bundle)


def test_versions_that_differ_are_named_and_the_check_still_reruns(tmp_path, capsys):
    bundle = _planted_bundle(tmp_path)
    edit_bundle(bundle, lambda d: d["versions"].update(torch="1.0.0", numpy="0.1"))
    code, out = cli_replay(capsys, bundle)
    assert code == 0, out
    assert (
        f"versions differ in numpy: bundle 0.1, here {np.__version__}; torch: "
        f"bundle 1.0.0, here {torch.__version__}"
    ) in out
    assert out.strip().splitlines()[-1] == "reproduced: mismatch"


def test_a_verdict_that_does_not_reproduce_exits_1(tmp_path, capsys):
    bundle = _planted_bundle(tmp_path)

    def fixed(doc):  # as if the bug had been fixed since: the replay passes
        doc["call"]["fn"]["name"] = f"{HERE}:correct_square"
        doc["versions"]["torch"] = "1.0.0"

    edit_bundle(bundle, fixed)
    code, out = cli_replay(capsys, bundle)
    assert code == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        f"not reproduced: passed, versions differ in torch: bundle 1.0.0, here "
        f"{torch.__version__}"
    )
    assert "recorded mismatch" in last


# ---------------------------------------------------------------- bad bundles
def test_missing_and_corrupt_bundles_are_clear_errors(tmp_path, capsys):
    def bad(path, needle):
        with pytest.raises(gradcheck.GradcheckError, match=needle):
            repro.replay(path)
        code, out = cli_replay(capsys, path)
        assert code == 2 and "gradcheck replay: error:" in out, out
        assert "Traceback" not in out

    bad(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    bad(tmp_path / "empty", "has no bundle.json")

    bundle = _planted_bundle(tmp_path / "b")
    (bundle / "bundle.json").write_text("{not json")
    bad(bundle, "not valid JSON")

    bundle = _planted_bundle(tmp_path / "c")
    edit_bundle(bundle, lambda d: d.update(format="gradcheck-repro/99"))
    bad(bundle, "format 'gradcheck-repro/99'")

    bundle = _planted_bundle(tmp_path / "d")
    (bundle / "inputs.npz").unlink()
    bad(bundle, "inputs.npz is missing")

    bundle = _planted_bundle(tmp_path / "e")
    (bundle / "inputs.npz").write_bytes(b"garbage")
    bad(bundle, "sha256 differs")

    # a pickled object array, its hash made to match: np.load refuses it
    bundle = _planted_bundle(tmp_path / "f")
    np.savez(bundle / "inputs.npz", **{"inputs.0": np.array([{"a": 1}], dtype=object)})
    edit_bundle(
        bundle,
        lambda d: d["files"]["inputs.npz"].update(
            sha256=repro._sha256(bundle / "inputs.npz")
        ),
    )
    bad(bundle, "not a NumPy .npz of plain arrays")
    with zipfile.ZipFile(bundle / "inputs.npz") as z:  # it was an object array
        assert z.namelist() == ["inputs.0.npy"]

    # a tampered call naming the standard library is refused, not run
    bundle = _planted_bundle(tmp_path / "g")
    edit_bundle(bundle, lambda d: d["call"]["fn"].update(name="os:system"))
    bad(bundle, "standard library")

    bundle = _planted_bundle(tmp_path / "h")
    edit_bundle(bundle, lambda d: d["call"]["fn"].update(name="no_such_module_r5:fn"))
    bad(bundle, "cannot import 'no_such_module_r5'")

    bundle = _planted_bundle(tmp_path / "i")
    edit_bundle(bundle, lambda d: d["call"].pop("inputs"))
    bad(bundle, "malformed call")


# ---------------------------------------------------------------- check_model
def test_check_model_writes_a_bundle_for_a_mismatch_only(tmp_path, capsys):
    assert models.check_model(
        f"{HERE}:correct_mlp", properties="fd", repro_dir=tmp_path
    ).passed
    assert not list(tmp_path.iterdir())
    reports = models.check_model(
        f"{HERE}:planted_mlp", properties="fd,linearity", repro_dir=tmp_path
    )
    fd, lin = reports
    assert fd.status == "mismatch" and lin.passed
    assert lin.repro_bundle is None
    (bundle,) = list_bundles(tmp_path)
    assert fd.repro_bundle == str(bundle)
    assert bundle.name.startswith("tests.test_repro-planted_mlp-fd-float32-")
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["spec"] == f"{HERE}:planted_mlp"
    assert doc["call"]["property"] == "fd" and doc["call"]["dtype"] == "float32"
    assert {p.name for p in bundle.iterdir()} >= {"weights.npz", "inputs.npz"}
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


def test_replay_loads_the_stored_weights_and_checks_their_shapes(tmp_path, capsys):
    (fd,) = models.check_model(
        f"{HERE}:planted_mlp", properties="fd", repro_dir=tmp_path
    )
    bundle = Path(fd.repro_bundle)
    # weights that differ from what the callable builds: the replay uses them
    data = dict(np.load(bundle / "weights.npz", allow_pickle=False))
    data["out.weight"] = data["out.weight"] * 2
    np.savez(bundle / "weights.npz", **data)
    edit_bundle(
        bundle,
        lambda d: d["files"]["weights.npz"].update(
            sha256=repro._sha256(bundle / "weights.npz")
        ),
    )
    result = repro.replay(bundle)
    assert result.reproduced
    assert result.report.error != pytest.approx(fd.error, rel=1e-3)
    # a shape that does not fit the rebuilt model is a clear error
    data["out.weight"] = np.zeros((3, 6), dtype=np.float32)
    np.savez(bundle / "weights.npz", **data)
    edit_bundle(
        bundle,
        lambda d: (
            d["files"]["weights.npz"].update(
                sha256=repro._sha256(bundle / "weights.npz")
            ),
            d["call"]["weights"]["out.weight"].update(shape=[3, 6]),
        ),
    )
    code, out = cli_replay(capsys, bundle)
    assert code == 2 and "weight 'out.weight': stored shape (3, 6)" in out, out


def test_check_model_on_a_model_object_replays_from_its_class(tmp_path, capsys):
    torch.manual_seed(2)
    net, x = Net(True), torch.randn(3, 4)
    (fd,) = models.check_model(net, inputs=x, properties="fd", repro_dir=tmp_path)
    assert fd.status == "mismatch"
    doc = json.loads((Path(fd.repro_bundle) / "bundle.json").read_text())
    assert doc["call"]["spec"] is None and doc["call"]["model"] == {
        "class": f"{HERE}:Net"
    }
    result = repro.replay(fd.repro_bundle)
    assert result.reproduced
    assert result.report.error == pytest.approx(fd.error, rel=1e-5)


def test_cli_check_model_repro_dir_in_a_worker_process(tmp_path, capsys):
    code = main(
        [
            "check-model",
            f"{HERE}:planted_mlp",
            "--properties",
            "fd",
            "--repro-dir",
            str(tmp_path),
            "--timeout",
            "120",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    (bundle,) = list_bundles(tmp_path)
    assert f"repro bundle: {bundle}" in out
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


def test_hf_spec_bundle_stores_and_reloads_the_weights(tmp_path):
    pytest.importorskip("transformers")
    spec = "hf:llama?num_hidden_layers=1"
    checker = models.Checker(spec)
    report = checker.run("linearity", "float32")
    assert report.passed, report.message()
    # a passing check writes no bundle; write one to test the weights' round trip
    bundle = repro.write_model_bundle(tmp_path, report, checker, "linearity", "float32")
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["spec"] == spec
    assert "layers.0.mlp.down_proj.weight" in doc["call"]["weights"]
    result = repro.replay(bundle)
    assert result.reproduced and result.report.status == "passed"
    assert result.report.error == pytest.approx(report.error, rel=1e-4, abs=1e-12)


@pytest.mark.slow
def test_keras_spec_bundle_replays_with_its_weights(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    checker = models.Checker("keras:MobileNetV3Small")
    report = checker.run("fd", "float32")
    bundle = repro.write_model_bundle(tmp_path, report, checker, "fd", "float32")
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["framework"] == "tensorflow" and doc["call"]["weights"]
    result = repro.replay(bundle)
    assert result.reproduced, result.lines()


# ---------------------------------------------------------------- pytest plugin
INNER = f"""
import torch
import gradcheck
from {HERE} import planted_square, correct_square


def _xw():
    g = torch.Generator().manual_seed(3)
    return tuple(
        torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )


def test_assertion():
    gradcheck.assert_gradients(planted_square, _xw())


def test_fixture(gradcheck):
    gradcheck.assert_gradients(planted_square, _xw())


def test_correct():
    gradcheck.assert_gradients(correct_square, _xw())
"""


def test_plugin_writes_bundles_for_failing_checks_and_models(pytester, capsys):
    pytester.makepyfile(test_inner=INNER)
    out_dir = pytester.path / "bundles"
    result = pytester.runpytest_inprocess(
        *PLUGIN,
        f"--gradcheck-repro-dir={out_dir}",
        "--gradcheck-json=gc.json",
        f"--gradcheck-model={HERE}:planted_mlp",
        "--gradcheck-model-properties=fd",
        "--gradcheck-model-dtype=float32",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=1, failed=3)
    bundles = list_bundles(out_dir)
    # the two assertions are the same failure: one bundle; the model its own
    assert len(bundles) == 2, bundles
    text = result.stdout.str()
    for bundle in bundles:
        assert f"repro bundle: {bundle}" in text
    doc = json.loads((pytester.path / "gc.json").read_text())
    named = {c["report"]["repro_bundle"] for c in doc["checks"]}
    assert named == {None, *map(str, bundles)}
    assert gradcheck.repro.session_dir() is None  # restored after the session
    for bundle in bundles:
        code, out = cli_replay(capsys, bundle)
        assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


def test_plugin_ini_option(pytester):
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\ngradcheck_repro_dir = out\n")
    result = pytester.runpytest_inprocess(*PLUGIN, "-k", "assertion")
    result.assert_outcomes(failed=1)
    assert len(list_bundles(pytester.path / "out")) == 1


def test_html_report_names_the_bundle(tmp_path):
    pytest.importorskip("jinja2")
    from gradcheck.report import build_document, write_html

    report = gradcheck.check_gradients(planted_square, _inputs(), repro_dir=tmp_path)
    page = write_html(
        tmp_path / "r.html", build_document([{"id": "t", "report": report}])
    ).read_text()
    assert f"gradcheck replay {report.repro_bundle}" in page


# ---------------------------------------------------------------- audit
def test_audit_planted_bug_bundle_replays(tmp_path, monkeypatch, capsys):
    from gradcheck import audit

    real = audit.jobs
    name = "torch/float64/finite_difference: planted backward scaled by 1+1e-05"

    def one_job(fws, seed, device="auto"):
        return (j for j in real(fws, seed, device) if j.name == name)

    monkeypatch.setattr(audit, "jobs", one_job)
    bundles = tmp_path / "bundles"
    code = main(
        [
            "audit",
            "--framework",
            "torch",
            "--device",
            "cpu",
            "--examples",
            "1",
            "--workers",
            "1",
            "--progress",
            "lines",
            "--seed",
            "4",
            "--json",
            str(tmp_path / "a.json"),
            "--report",
            str(tmp_path / "a.html"),
            "--repro-dir",
            str(bundles),
        ]
    )
    assert code == 0, capsys.readouterr().out
    (bundle,) = list_bundles(bundles)
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["repro_bundles"] == [str(bundle)]
    (case,) = data["cases"]
    assert case["report"]["repro_bundle"] == str(bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["entry"] == "audit" and doc["call"]["job"] == name
    assert doc["call"]["check_seed"] == 4 and doc["call"]["spec"]["heads"]
    monkeypatch.setattr(audit, "jobs", real)  # the replay finds the job itself
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().endswith("reproduced: mismatch"), out
