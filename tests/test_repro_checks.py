"""Repro bundles from check_linearity, check_locality and check_training_step:
a planted bug writes a bundle, the bundle replays (in-process and through
``gradcheck replay``), edited versions are named, a correct check writes nothing,
a function that cannot be imported gives a bundle that says why.

Everything a bundle names is module-level here (``tests.test_repro_checks:...``):
that is what a replay imports.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

import gradcheck
from gradcheck import repro
from tests._repro import assert_replays, cli_replay, list_bundles
from tests._state import assert_same_rng, rng_state

pytest_plugins = ["pytester"]

torch = pytest.importorskip("torch")

HERE = "tests.test_repro_checks"


# ---------------------------------------------------------------- linearity
def _xw():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w


def head_main(x, w):
    return (x * w).sin().sum()


def head_aux(x, w):
    return (x * w).pow(2).mean()


def total_wrong(x, w):
    """aux weighted 0.5 where the weights say 0.7: the planted bug."""
    return head_main(x, w) + 0.5 * head_aux(x, w)


def total_right(x, w):
    return head_main(x, w) + 0.7 * head_aux(x, w)


HEADS = {"main": head_main, "aux": head_aux}
WEIGHTS = {"main": 1.0, "aux": 0.7}


def test_linearity_bundle_replays(tmp_path, capsys):
    report = gradcheck.check_linearity(
        total_wrong, HEADS, WEIGHTS, _xw(), repro_dir=tmp_path
    )
    assert report.status == "mismatch", report.message()
    (bundle,) = list_bundles(tmp_path)
    assert report.repro_bundle == str(bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"] is True
    call = doc["call"]
    assert call["entry"] == "check_linearity"
    assert call["total_fn"] == {"kind": "importable", "name": f"{HERE}:total_wrong"}
    assert call["loss_fns"]["aux"] == {"kind": "importable", "name": f"{HERE}:head_aux"}
    assert call["weights"] == WEIGHTS and call["options"]["seed"] == 0
    with np.load(bundle / "inputs.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs.1"], _xw()[1].detach().numpy())
    assert (
        "gradcheck.check_linearity(tests.test_repro_checks:total_wrong"
        in (bundle / "README.txt").read_text()
    )
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0")


def test_correct_linearity_and_locality_write_nothing(tmp_path):
    assert gradcheck.check_linearity(
        total_right, HEADS, WEIGHTS, _xw(), repro_dir=tmp_path
    ).passed
    net = Heads(leak=False).double()
    assert _check_locality(net, repro_dir=tmp_path).passed
    assert not list(tmp_path.iterdir())


def test_a_lambda_gives_a_bundle_that_says_why_it_cannot_replay(tmp_path, capsys):
    report = gradcheck.check_linearity(
        lambda x, w: total_wrong(x, w), HEADS, WEIGHTS, _xw(), repro_dir=tmp_path
    )
    doc = json.loads((Path(report.repro_bundle) / "bundle.json").read_text())
    assert doc["replayable"] is False
    assert "total_fn" in doc["not_replayable_because"]
    assert "define it at module level" in doc["not_replayable_because"]
    code, out = cli_replay(capsys, report.repro_bundle)
    assert code == 2 and "cannot be replayed" in out and "Traceback" not in out


def test_a_fixed_bug_is_not_reproduced_and_says_which_versions_differ(tmp_path, capsys):
    report = gradcheck.check_linearity(
        total_wrong, HEADS, WEIGHTS, _xw(), repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    doc["call"]["total_fn"]["name"] = f"{HERE}:total_right"  # as if fixed since
    doc["versions"]["numpy"] = "0.1"
    (bundle / "bundle.json").write_text(json.dumps(doc))
    code, out = cli_replay(capsys, bundle)
    assert code == 1, out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(
            f"not reproduced: passed, versions differ in numpy: bundle 0.1, here "
            f"{np.__version__}"
        )
    )


# ---------------------------------------------------------------- locality
class Heads(torch.nn.Module):
    """A trunk and two heads; ``leak``: the aux head also reads the main head's
    output (a wiring bug: aux's loss reaches main's head)."""

    def __init__(self, leak: bool = True):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            self.trunk = torch.nn.Linear(3, 4)
            self.main_head = torch.nn.Linear(4, 1)
            self.aux_head = torch.nn.Linear(4, 1)
        self.leak = leak

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        main = self.main_head(h)
        aux = self.aux_head(h) + (main if self.leak else 0)
        return main, aux

    def main_loss(self, x):
        return self(x)[0].pow(2).mean()

    def aux_loss(self, x):
        return self(x)[1].abs().mean()

    def total(self, x):
        return self.main_loss(x) + 0.7 * self.aux_loss(x)

    def losses(self):
        return {"main": self.main_loss, "aux": self.aux_loss}


EXPECTED = {"trunk": ["main", "aux"], "main_head": ["main"], "aux_head": ["aux"]}


def _x():
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(2)).double()


def _check_locality(net, **kwargs):
    """check_locality of ``net``'s heads against EXPECTED, on _x()."""
    return gradcheck.check_locality(
        net.total,
        net.losses(),
        WEIGHTS,
        (_x(),),
        params=net,
        expected=EXPECTED,
        **kwargs,
    )


def test_locality_bundle_replays_with_the_stored_weights(tmp_path, capsys):
    net = Heads(leak=True).double()
    report = _check_locality(net, repro_dir=tmp_path)
    assert report.status == "mismatch", report.message()
    (bundle,) = list_bundles(tmp_path)
    call = json.loads((bundle / "bundle.json").read_text())["call"]
    assert call["entry"] == "check_locality"
    assert call["total_fn"] == {"kind": "params_method", "name": "total"}
    assert call["loss_fns"]["aux"] == {"kind": "params_method", "name": "aux_loss"}
    assert call["params"]["class"] == f"{HERE}:Heads"
    assert call["expected"] == EXPECTED
    result = repro.replay(bundle)
    assert result.reproduced
    assert result.report.location.describe() == report.location.describe()
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0")


# ---------------------------------------------------------------- training step
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(3)
    MODEL = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
# drawn without a seed: a replay in another process gets other numbers at
# import, and must put the recorded batch back
X = torch.randn(8, 3, dtype=torch.float64)
Y = torch.randn(8, 2, dtype=torch.float64)
OPT = torch.optim.SGD(MODEL.parameters(), lr=0.1)
STEP_WEIGHTS = {"main": 1.0, "aux": 0.3}


def main_loss():
    return (MODEL(X)[:, 0] - Y[:, 0]).pow(2).mean()


def aux_loss():
    return (MODEL(X)[:, 1] - Y[:, 1]).pow(2).mean()


STEP_LOSSES = {"main": main_loss, "aux": aux_loss}


AUX_WEIGHT = torch.tensor(0.3, dtype=torch.float64)


def _micro(xs, ys):
    out = MODEL(xs)
    main = (out[:, 0] - ys[:, 0]).pow(2).mean()
    aux = (out[:, 1] - ys[:, 1]).pow(2).mean()
    return main + AUX_WEIGHT * aux  # a global tensor read by a helper


def step_forgets_to_divide():
    """Two micro-batches accumulated without dividing by 2: the planted bug."""
    OPT.zero_grad()
    for xs, ys in zip(X.chunk(2), Y.chunk(2), strict=True):
        _micro(xs, ys).backward()
    OPT.step()


def step_right():
    OPT.zero_grad()
    for xs, ys in zip(X.chunk(2), Y.chunk(2), strict=True):
        (_micro(xs, ys) / 2).backward()
    OPT.step()


def _check_step(step, repro_dir):
    """check_training_step with ``repro_dir``: the public parameter where
    training_api.py has it, else the same wiring it needs (the check, then
    repro.write_training_bundle with its seed and rtol)."""
    if "repro_dir" in inspect.signature(gradcheck.check_training_step).parameters:
        return gradcheck.check_training_step(
            step, MODEL, STEP_LOSSES, STEP_WEIGHTS, repro_dir=repro_dir
        )
    report = gradcheck.check_training_step(step, MODEL, STEP_LOSSES, STEP_WEIGHTS)
    repro.write_training_bundle(
        repro_dir,
        report,
        step,
        MODEL,
        STEP_LOSSES,
        STEP_WEIGHTS,
        options={"seed": report.seed, "rtol": None},
    )
    return report


def test_training_step_bundle_replays_its_recorded_batch(tmp_path, capsys):
    global X
    report = _check_step(step_forgets_to_divide, tmp_path)
    assert report.status == "mismatch", report.message()
    (bundle,) = list_bundles(tmp_path)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"] is True, doc["not_replayable_because"]
    call = doc["call"]
    assert call["entry"] == "check_training_step"
    assert call["step_fn"] == {
        "kind": "importable",
        "name": f"{HERE}:step_forgets_to_divide",
    }
    assert call["model"]["ref"] == f"{HERE}:MODEL"
    # the tensors the step, its helpers and the loss functions read
    assert set(call["globals"]) == {f"{HERE}:{n}" for n in ("X", "Y", "AUX_WEIGHT")}
    with np.load(bundle / "weights.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["0.weight"], MODEL[0].weight.detach())

    # another batch and other weights here, as in another process: the replay
    # uses the recorded ones, and puts everything of the module's back after
    recorded_x, live_x = X.clone(), torch.zeros_like(X)
    X = live_x
    try:
        with torch.no_grad():
            MODEL[0].weight.add_(1.0)
        state = {k: v.clone() for k, v in MODEL.state_dict().items()}
        before = rng_state()
        result = repro.replay(bundle)
        assert_same_rng(before)
        assert result.reproduced, result.lines()
        assert result.report.error == pytest.approx(report.error, rel=1e-6)
        assert X is live_x and not X.any()
        for k, v in MODEL.state_dict().items():
            assert torch.equal(v, state[k]), k
        with torch.no_grad():
            MODEL[0].weight.sub_(1.0)
    finally:
        X = recorded_x
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0")


def test_a_large_global_tensor_is_named_not_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(repro, "GLOBAL_TENSOR_BYTES", 100)  # X: 8 x 3 float64
    report = _check_step(step_forgets_to_divide, tmp_path)
    doc = json.loads((Path(report.repro_bundle) / "bundle.json").read_text())
    assert doc["call"]["globals"][f"{HERE}:X"] == {
        "skipped": "192 bytes, over the 100-byte limit: not stored"
    }
    assert "tensor" in doc["call"]["globals"][f"{HERE}:AUX_WEIGHT"]
    assert repro.replay(report.repro_bundle).reproduced


def test_correct_training_step_writes_nothing(tmp_path):
    assert _check_step(step_right, tmp_path).passed
    assert not list_bundles(tmp_path)


def test_training_step_public_repro_dir_parameter(tmp_path):
    if "repro_dir" not in inspect.signature(gradcheck.check_training_step).parameters:
        pytest.skip("training_api.check_training_step has no repro_dir= yet")
    report = gradcheck.check_training_step(
        step_forgets_to_divide, MODEL, STEP_LOSSES, STEP_WEIGHTS, repro_dir=tmp_path
    )
    assert report.repro_bundle and Path(report.repro_bundle).parent == tmp_path


# ---------------------------------------------------------------- pytest plugin
INNER = f"""
import gradcheck
from {HERE} import HEADS, WEIGHTS, _xw, total_right, total_wrong


def test_linearity_bug():
    gradcheck.assert_linearity(total_wrong, HEADS, WEIGHTS, _xw())


def test_linearity_right():
    gradcheck.assert_linearity(total_right, HEADS, WEIGHTS, _xw())
"""


def test_plugin_repro_dir_reaches_linearity(pytester, capsys):
    from tests.test_plugin import PLUGIN

    pytester.makepyfile(test_inner=INNER)
    out_dir = pytester.path / "bundles"
    result = pytester.runpytest_inprocess(
        *PLUGIN, f"--gradcheck-repro-dir={out_dir}", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=1, failed=1)
    (bundle,) = list_bundles(out_dir)
    assert f"repro bundle: {bundle}" in result.stdout.str()
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


def test_the_session_directory_reaches_linearity_and_locality(tmp_path):
    saved = repro.session_dir()
    repro.set_session_dir(tmp_path)
    try:
        report = gradcheck.check_linearity(total_wrong, HEADS, WEIGHTS, _xw())
        net = Heads(leak=True).double()
        loc = _check_locality(net)
    finally:
        repro.set_session_dir(saved)
    assert report.repro_bundle and loc.repro_bundle
    assert len(list_bundles(tmp_path)) == 2
