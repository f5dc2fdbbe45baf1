"""Repro bundles from check_keras_model: a planted bug in a Model subclass's
train_step writes a bundle (Keras' JSON config, compile config, weights, the
batch; the subclass by module:qualname), the bundle replays in-process and
through ``gradcheck replay``, edited versions are named, a correct model writes
nothing, a class defined in a function gives a bundle that says why.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from gradcheck import repro  # noqa: E402
from gradcheck.keras_api import check_keras_model  # noqa: E402
from tests._repro import cli_replay  # noqa: E402
from tests.test_keras_training import ScalesGrads, compiled, data  # noqa: E402

pytestmark = pytest.mark.tensorflow

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("keras does not run on TensorFlow here", allow_module_level=True)


def _check(model, repro_dir, **kw):
    """check_keras_model with ``repro_dir``: the public parameter where
    keras_api.py has it, else the same wiring (the check, then
    repro.write_keras_bundle with its seed and rtol)."""
    x, y, sw = data()
    if "repro_dir" in inspect.signature(check_keras_model).parameters:
        return check_keras_model(model, x, y, sample_weight=sw, repro_dir=repro_dir)
    report = check_keras_model(model, x, y, sample_weight=sw)
    repro.write_keras_bundle(
        repro_dir,
        report,
        model,
        x,
        y,
        sample_weight=sw,
        options={"seed": report.seed, "rtol": None},
    )
    return report


def test_keras_train_step_bundle_replays(tmp_path, capsys):
    model = compiled("dict", ScalesGrads)
    report = _check(model, tmp_path)
    assert report.status == "mismatch", report.message()
    bundle = Path(report.repro_bundle)
    assert bundle.parent == tmp_path
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"] is True, doc["not_replayable_because"]
    call = doc["call"]
    assert call["entry"] == "check_keras_model"
    assert call["custom_objects"] == {
        "ScalesGrads": "tests.test_keras_training:ScalesGrads"
    }
    assert call["keras_model"]["class_name"] == "ScalesGrads"
    assert call["compile"]["loss_weights"] == {"main": 1.0, "aux": 0.3, "extra": 0.0}
    with np.load(bundle / "inputs.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["batch.x"], data()[0])

    result = repro.replay(bundle)
    assert result.reproduced, result.lines()
    assert result.report.error == pytest.approx(report.error, rel=1e-5)
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().splitlines()[-1] == "reproduced: mismatch", out

    doc["versions"]["keras"] = "2.0.0"
    (bundle / "bundle.json").write_text(json.dumps(doc))
    code, out = cli_replay(capsys, bundle)
    assert code == 0, out
    assert f"versions differ in keras: bundle 2.0.0, here {keras.__version__}" in out


def test_a_correct_keras_model_writes_nothing(tmp_path):
    assert _check(compiled("dict"), tmp_path).passed
    assert not list(tmp_path.iterdir())


def test_a_local_model_class_gives_a_bundle_that_says_why(tmp_path, capsys):
    class Local(ScalesGrads):
        pass

    report = _check(compiled("dict", Local), tmp_path)
    assert report.status == "mismatch"
    doc = json.loads((Path(report.repro_bundle) / "bundle.json").read_text())
    assert doc["replayable"] is False
    assert "Local" in doc["not_replayable_because"]
    code, out = cli_replay(capsys, report.repro_bundle)
    assert code == 2 and "cannot be replayed" in out
