"""Repro bundles from check_variants, check_devices, check_distributed and
check_cross_framework: a planted bug writes a bundle, the bundle replays
(in-process and through ``gradcheck replay``), edited versions are named, a
correct check writes nothing, the user's model and RNG states are bit-identical
afterwards, and a replay that cannot run the failing GPU variant says
"skipped (no GPU here: ...)" instead of a pass.

Everything a bundle names is module-level here (``tests.test_repro_variants:...``)
or in tests/_dist_models.py: that is what a replay imports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gradcheck
from gradcheck import repro
from tests._repro import assert_replays, cli_replay, edit_bundle, list_bundles
from tests._state import assert_same_rng, rng_state

pytest_plugins = ["pytester"]

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from tests.torch_models import Square  # noqa: E402

HAS_GPU = torch.cuda.is_available()
HERE = "tests.test_repro_variants"


# ---------------------------------------------------------------- helpers
def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {
            n: None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "dtype": {n: p.dtype for n, p in model.named_parameters()},
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for n, g in before["grad"].items():
        h = after["grad"][n]
        assert (g is None and h is None) or torch.equal(g, h), n
    for key in ("requires_grad", "training", "dtype"):
        assert before[key] == after[key], key


# ---------------------------------------------------------------- variants
class WrongUnderAutocast(nn.Module):
    """Scales the gradient through its hidden layer by 1.1 only under autocast
    (a loss-scale factor not undone); ``bug=False``: correct."""

    def __init__(self, bug: bool = True) -> None:
        super().__init__()
        self.bug = bug
        self.inner = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.outer = nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.inner(x)))
        if self.bug and torch.is_autocast_enabled(x.device.type):
            h = h * 1.1 - h.detach() * 0.1
        return self.outer(h)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _model(bug: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = WrongUnderAutocast(bug)
    model.eval()  # dropout off: the mode is part of what is recorded
    return model


#: a module-level model: the replay loads the stored state into this very object
#: (and puts its own back)
SHARED = _model()


def test_variants_bundle_replays_and_leaves_the_model_alone(tmp_path, capsys):
    model = _model()
    model.inner.bias.requires_grad_(False)  # frozen: recorded, and put back
    model.outer.weight.grad = torch.full_like(model.outer.weight, 3.0)
    before = _snapshot(model)
    torch.manual_seed(42)
    rng = rng_state()
    report = gradcheck.check_variants(
        ce_loss, model, _batch(), variants="autocast:bfloat16", repro_dir=tmp_path
    )
    assert report.status == "mismatch", report.message()
    _assert_same(before, model)
    assert_same_rng(rng)
    [bundle] = list_bundles(tmp_path)
    assert report.repro_bundle == str(bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    call = doc["call"]
    assert doc["replayable"], doc["not_replayable_because"]
    assert call["entry"] == "check_variants"
    assert call["loss_fn"] == {
        "kind": "importable",
        "name": "tests.test_repro_variants:ce_loss",
    }
    assert call["model"]["class"] == "tests.test_repro_variants:WrongUnderAutocast"
    assert call["model"]["frozen"] == ["inner.bias"]
    assert call["model"]["training"] == []  # eval mode everywhere
    assert call["variants"] == "autocast:bfloat16"
    assert call["options"] == {"seed": 0, "rtol": None}
    assert set(doc["files"]) == {"inputs.npz", "weights.npz"}
    assert "autocast:bfloat16/inner.weight" in call["failing"]
    # plain data: arrays without pickles
    with np.load(bundle / "inputs.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["batch.0"], _batch()[0].numpy())
    result = repro.replay(bundle)
    # the rebuilt model is the recorded one: the same tensor fails, same error
    assert result.report.location.tensor == report.location.tensor
    assert result.report.error == report.error
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0", numpy="0.1")
    _assert_same(before, model)
    assert_same_rng(rng)


def test_a_module_level_model_is_loaded_and_put_back(tmp_path, capsys):
    before = _snapshot(SHARED)
    report = gradcheck.check_variants(
        ce_loss,
        SHARED,
        _batch(),
        variants=("autocast:bfloat16",),
        seed=3,
        label="shared model",
        repro_dir=tmp_path,
    )
    assert report.status == "mismatch"
    [bundle] = list_bundles(tmp_path)
    assert bundle.name.startswith("shared-model-variants-float32-")
    call = json.loads((bundle / "bundle.json").read_text())["call"]
    assert call["model"]["ref"] == "tests.test_repro_variants:SHARED"
    assert call["variants"] == ["autocast:bfloat16"]
    assert call["options"]["seed"] == 3
    # the module-level model moved on since: the replay uses the stored weights,
    # and puts the moved ones back
    saved = SHARED.inner.weight.detach().clone()
    with torch.no_grad():
        SHARED.inner.weight.add_(1.0)
    SHARED.train()
    moved = _snapshot(SHARED)
    try:
        result = repro.replay(bundle)
        assert result.reproduced, result.lines()
        assert result.report.error == report.error
        assert result.report.label == "shared model"
        _assert_same(moved, SHARED)
    finally:
        with torch.no_grad():
            SHARED.inner.weight.copy_(saved)
        SHARED.eval()
    _assert_same(before, SHARED)
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and "gradcheck.check_variants(" in out, out


def test_correct_variants_and_devices_write_nothing(tmp_path):
    model = _model(bug=False)
    report = gradcheck.check_variants(
        ce_loss, model, _batch(), variants="autocast:bfloat16", repro_dir=tmp_path
    )
    assert report.passed, report.message()
    report = _check_square_devices(tmp_path, _square_model(bug=False))
    assert report.passed, report.message()
    skipped = gradcheck.check_variants(
        ce_loss, model, _batch(), variants="cuda", repro_dir=tmp_path
    )
    if not HAS_GPU:
        assert skipped.status == "skipped"
    assert list_bundles(tmp_path) == []


def test_the_session_directory_reaches_variants(tmp_path):
    repro.set_session_dir(tmp_path)
    try:
        report = gradcheck.check_variants(
            ce_loss, _model(), _batch(), variants="autocast:bfloat16"
        )
    finally:
        repro.set_session_dir(None)
    assert report.status == "mismatch"
    assert [str(p) for p in list_bundles(tmp_path)] == [report.repro_bundle]


def test_a_lambda_loss_gives_a_bundle_that_says_why(tmp_path, capsys):
    report = gradcheck.check_variants(
        lambda m, b: ce_loss(m, b),
        _model(),
        _batch(),
        variants="autocast:bfloat16",
        repro_dir=tmp_path,
    )
    assert report.status == "mismatch"
    bundle = Path(report.repro_bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert not doc["replayable"]
    assert "lambda" in doc["not_replayable_because"]
    code, out = cli_replay(capsys, bundle)
    assert code == 2 and "cannot be replayed" in out and "lambda" in out


# ---------------------------------------------------------------- devices
class _WrongInFloat32(Square):
    """Squares; its backward is 1% off in float32 only (the float64 reference
    is right): a CPU float32 kernel bug that check_devices(("cpu", "cpu"))
    names."""

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        factor = 1.01 if h.dtype == torch.float32 else 1.0
        return 2 * h * g * factor


class Squares(nn.Module):
    def __init__(self, bug: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bug = bug
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        h = x @ self.w
        return _WrongInFloat32.apply(h) if self.bug else h * h


def square_loss(model, batch):
    return model(batch["x"]).sum()


def _square_model(bug: bool = True) -> nn.Module:
    return Squares(bug)


def _square_batch():
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(5, 4, generator=g)}


def _check_square_devices(repro_dir, model=None):
    """check_devices(("cpu", "cpu")) of square_loss on ``model`` (default: the
    square model with its planted CPU kernel bug)."""
    model = _square_model() if model is None else model
    return gradcheck.check_devices(
        square_loss, model, _square_batch(), devices=("cpu", "cpu"), repro_dir=repro_dir
    )


def test_devices_bundle_replays(tmp_path, capsys):
    model = _square_model()
    before = _snapshot(model)
    rng = rng_state()
    report = _check_square_devices(tmp_path, model)
    assert report.status == "mismatch", report.message()
    _assert_same(before, model)
    assert_same_rng(rng)
    [bundle] = list_bundles(tmp_path)
    call = json.loads((bundle / "bundle.json").read_text())["call"]
    assert call["entry"] == "check_devices"
    assert call["devices"] == ["cpu", "cpu"]
    assert call["failing"] == ["cpu/w"]
    assert "devices=['cpu', 'cpu']" in repro.describe_call(call)
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0", numpy="0.1")
    _assert_same(before, model)


def _as_if_on_a_gpu(bundle: Path, key: str, request, failing) -> None:
    def edit(doc):
        doc["call"][key] = request
        doc["call"]["failing"] = failing

    edit_bundle(bundle, edit)


@pytest.mark.skipif(HAS_GPU, reason="tells what a machine without a GPU says")
def test_a_gpu_device_bundle_replayed_without_a_gpu_says_skipped(tmp_path, capsys):
    """A bundle recorded where cuda:0 failed (made here by editing one written on
    the CPU, as bundle.json is plain JSON): replayed without a GPU, the check is
    skipped, and the replay says so instead of claiming a pass."""
    report = _check_square_devices(tmp_path)
    bundle = Path(report.repro_bundle)
    _as_if_on_a_gpu(bundle, "devices", ["cpu", "cuda:0"], ["cuda:0/w"])
    result = repro.replay(bundle)
    assert result.report.status == "skipped" and not result.reproduced
    line = result.verdict_line()
    assert line.startswith("not reproduced: skipped (no GPU here: 'cuda:0' skipped: ")
    assert line.endswith(
        "(the bundle recorded mismatch; nothing else to compare ran here)"
    )
    code, out = cli_replay(capsys, bundle)
    assert code == 1, out
    assert out.strip().splitlines()[-1] == line


@pytest.mark.skipif(HAS_GPU, reason="tells what a machine without a GPU says")
def test_a_failing_gpu_variant_skipped_here_is_not_a_pass(tmp_path, capsys):
    """Recorded: autocast passed and cuda failed. Here autocast passes again and
    cuda cannot run: "not reproduced: skipped (no GPU here ...)", never
    "not reproduced: passed"."""
    report = gradcheck.check_variants(
        ce_loss, _model(), _batch(), variants="autocast:bfloat16", repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)
    _as_if_on_a_gpu(
        bundle, "variants", ["autocast:float16", "cuda"], ["cuda/inner.weight"]
    )
    # and a model whose autocast is right (rebuilt by its class from the bundle)
    edit_bundle(
        bundle, lambda d: d["call"]["model"].update({"class": f"{HERE}:CorrectModel"})
    )
    result = repro.replay(bundle)
    assert result.report.status == "passed"  # autocast:float16 ran and passed
    assert not result.reproduced
    assert result.verdict_line().startswith(
        "not reproduced: skipped (no GPU here: 'cuda' skipped: "
    )
    assert result.verdict_line().endswith(
        "(the bundle recorded mismatch; what did run here: passed)"
    )
    code, out = cli_replay(capsys, bundle)
    assert code == 1 and "not reproduced: skipped (no GPU here" in out, out


@pytest.mark.skipif(HAS_GPU, reason="tells what a machine without a GPU says")
def test_a_model_recorded_on_a_gpu_is_not_moved_to_the_cpu(tmp_path, capsys):
    """The model's device is the reference device: a bundle whose model lived
    on cuda:0 is skipped here, not checked on the CPU (where it may pass)."""
    report = gradcheck.check_variants(
        ce_loss, _model(), _batch(), variants="autocast:bfloat16", repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["call"]["model"]["device"] == "cpu"
    edit_bundle(bundle, lambda d: d["call"]["model"].update(device="cuda:0"))
    result = repro.replay(bundle)
    assert result.report.status == "skipped" and not result.reproduced
    assert result.verdict_line().startswith(
        "not reproduced: skipped (no GPU here: 'cuda:0' skipped: the model was on "
        "cuda:0 when recorded"
    )
    code, out = cli_replay(capsys, bundle)
    assert code == 1 and "no GPU here" in out, out


class CorrectModel(WrongUnderAutocast):
    def __init__(self) -> None:
        super().__init__(bug=False)


# ---------------------------------------------------------------- Keras variants
try:  # the Keras case needs module-level classes Keras can deserialize by name
    import keras
    import tensorflow as tf
except ImportError:  # pragma: no cover - torch-only installs
    keras = None

if keras is not None and keras.backend.backend() == "tensorflow":

    class WrongUnderXla(keras.layers.Layer):
        """Scales the gradient by 1 + 1e-3 only inside a traced (XLA) function."""

        def call(self, h):
            if not tf.executing_eagerly():
                return h * (1 + 1e-3) - tf.stop_gradient(h) * 1e-3
            return h

    def keras_loss(model, batch):
        logits = model(batch[0], training=True)
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                batch[1], logits, from_logits=True
            )
        )


@pytest.mark.tensorflow
def test_keras_variants_bundle_replays(tmp_path, capsys):
    if keras is None or keras.backend.backend() != "tensorflow":
        pytest.skip("needs Keras on TensorFlow")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh"),
            WrongUnderXla(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(8, 6)).astype("float32"), np.arange(8) % 3)
    before = [v.numpy().copy() for v in model.variables]
    report = gradcheck.check_variants(
        keras_loss, model, batch, variants="xla", repro_dir=tmp_path
    )
    assert report.status == "mismatch", report.message()
    [bundle] = list_bundles(tmp_path)
    doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["replayable"], doc["not_replayable_because"]
    assert doc["call"]["model"]["kind"] == "keras"
    assert doc["call"]["model"]["custom_objects"] == {
        "WrongUnderXla": "tests.test_repro_variants:WrongUnderXla"
    }
    # a replay rebuilds the model from its config: change the user's weights
    # to show the stored ones are used
    model.layers[0].kernel.assign(model.layers[0].kernel * 0)
    result = repro.replay(bundle)
    assert result.reproduced, result.lines()
    assert result.report.error == pytest.approx(report.error, rel=1e-6)
    model.layers[0].kernel.assign(before[0])
    for a, v in zip(before, model.variables, strict=True):
        assert np.array_equal(a, v.numpy()), v.path
    code, out = cli_replay(capsys, bundle)
    assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


# ---------------------------------------------------------------- distributed
from tests import _dist_models as dm  # noqa: E402


def test_nondeterministic_distributed_bundle_replays(tmp_path, capsys):
    """A step that draws random numbers: nondeterministic, decided in this process
    without starting ranks (fast)."""
    rng = rng_state()
    report = gradcheck.check_distributed(
        dm.build_dropout, dm.step_plain, dm.batch(), repro_dir=tmp_path
    )
    assert report.status == "nondeterministic", report.message()
    assert_same_rng(rng)
    [bundle] = list_bundles(tmp_path)
    doc = json.loads((bundle / "bundle.json").read_text())
    call = doc["call"]
    assert doc["replayable"], doc["not_replayable_because"]
    assert call["build"] == "tests._dist_models:build_dropout"
    # step_plain is another name of one function: the bundle names its own
    assert repro._resolve(call["step"], "step") is dm.step_plain
    assert (call["world_size"], call["backend"], call["wrap"]) == (2, "gloo", "ddp")
    assert call["options"] == {"seed": 0, "rtol": None, "timeout": 120.0}
    with np.load(bundle / "inputs.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["batch.x"], dm.batch()["x"].numpy())
    assert_replays(bundle, "nondeterministic", capsys, torch="1.0.0", numpy="0.1")
    assert_same_rng(rng)


@pytest.mark.slow
def test_distributed_mismatch_bundle_replays_on_two_ranks(tmp_path, capsys):
    from gradcheck.backends import torch_distributed as td

    cached = dm.build_cached()
    before = _snapshot(cached)
    with td.keep_workers():
        report = gradcheck.check_distributed(
            dm.build_cached, dm.step_divides, dm.batch(), timeout=60, repro_dir=tmp_path
        )
        assert report.status == "mismatch", report.message()
        [bundle] = list_bundles(tmp_path)
        assert_replays(bundle, "mismatch", capsys, torch="1.0.0", numpy="0.1")
        ok = gradcheck.check_distributed(
            dm.build, dm.step, dm.batch(), timeout=60, repro_dir=tmp_path
        )
    assert ok.passed, ok.message()
    assert list_bundles(tmp_path) == [bundle]  # the correct step wrote nothing
    _assert_same(before, cached)
    result = repro.replay(bundle)
    assert "1/world_size" in result.report.message()


def test_a_local_step_is_refused_before_any_bundle(tmp_path):
    def step(model, shard):  # not importable: the ranks could not run it
        dm.step(model, shard)

    with pytest.raises(gradcheck.GradcheckError):
        gradcheck.check_distributed(dm.build, step, dm.batch(), repro_dir=tmp_path)
    assert list_bundles(tmp_path) == []


# ---------------------------------------------------------------- cross-framework
def _spec():
    from gradcheck.architectures import HeadSpec, InputSpec, LayerSpec, ModelSpec, Node

    return ModelSpec(
        inputs=(InputSpec("x", shape=(4,)),),
        trunk=(Node("dense", ("x",), LayerSpec("dense", 5, "tanh")),),
        heads=(
            HeadSpec("main", "dense", (LayerSpec("dense", 2),), loss="mse"),
            HeadSpec("aux", "dense", (LayerSpec("dense", 1),), loss="mse", weight=0.3),
        ),
    )


@pytest.fixture
def wrong_torch_mse(monkeypatch):
    """The torch build's 'main' loss 0.1% off (a loss definition that differs
    between the frameworks)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    from gradcheck.architectures import torch_builder

    real = torch_builder.per_example_loss

    def wrong(head, y, t):
        out = real(head, y, t)
        return out * 1.001 if head.name == "main" else out

    monkeypatch.setattr(torch_builder, "per_example_loss", wrong)
    return monkeypatch


@pytest.mark.tensorflow
def test_cross_framework_bundle_replays(tmp_path, capsys, wrong_torch_mse):
    spec = _spec()
    rng = rng_state()
    report = gradcheck.check_cross_framework(
        spec, dtype="float32", seed=4, repro_dir=tmp_path
    )
    assert report.status == "mismatch", report.message()
    assert_same_rng(rng)
    [bundle] = list_bundles(tmp_path)
    doc = json.loads((bundle / "bundle.json").read_text())
    call = doc["call"]
    assert doc["replayable"], doc["not_replayable_because"]
    assert call["entry"] == "check_cross_framework"
    assert call["spec"] == spec.to_dict()
    assert (call["dtype"], call["options"]) == ("float32", {"seed": 4, "rtol": None})
    assert set(doc["files"]) == {"batch.npz"}  # the batch drawn from the seed
    assert_replays(bundle, "mismatch", capsys, torch="1.0.0", numpy="0.1")
    # the bug fixed (here: the patch undone): not reproduced, and said so
    wrong_torch_mse.undo()
    code, out = cli_replay(capsys, bundle)
    assert code == 1, out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith("not reproduced: passed, versions differ in numpy: bundle 0.1")
    )
    assert_same_rng(rng)


@pytest.mark.tensorflow
def test_correct_cross_framework_writes_nothing(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    report = gradcheck.check_cross_framework(
        _spec(), dtype="float64", repro_dir=tmp_path
    )
    assert report.passed, report.message()
    assert list_bundles(tmp_path) == []


def test_a_tampered_spec_is_a_clear_error(tmp_path, wrong_torch_mse):
    report = gradcheck.check_cross_framework(
        _spec(), dtype="float32", repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)
    edit_bundle(bundle, lambda d: d["call"]["spec"].update(heads="not heads"))
    with pytest.raises(repro.ReproBundleError, match="stored spec is invalid"):
        repro.replay(bundle)


# ---------------------------------------------------------------- pytest plugin
INNER = f"""
from {HERE} import _batch, _model, _square_batch, _square_model, ce_loss, square_loss


def test_variants_bug(gradcheck):
    gradcheck.assert_variants(ce_loss, _model(), _batch(), variants="autocast:bfloat16")


def test_devices_bug(gradcheck):
    report = gradcheck.check_devices(
        square_loss, _square_model(), _square_batch(), devices=("cpu", "cpu")
    )
    assert report.passed, report.message()


def test_variants_right(gradcheck):
    gradcheck.assert_variants(
        ce_loss, _model(bug=False), _batch(), variants="autocast:bfloat16"
    )
"""


def test_plugin_repro_dir_reaches_variants_and_devices(pytester, capsys):
    from tests.test_plugin import PLUGIN

    pytester.makepyfile(test_inner=INNER)
    out_dir = pytester.path / "bundles"
    result = pytester.runpytest_inprocess(
        *PLUGIN, f"--gradcheck-repro-dir={out_dir}", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=1, failed=2)
    bundles = list_bundles(out_dir)
    entries = sorted(
        json.loads((b / "bundle.json").read_text())["call"]["entry"] for b in bundles
    )
    assert entries == ["check_devices", "check_variants"]
    for bundle in bundles:
        assert f"repro bundle: {bundle}" in result.stdout.str()
        code, out = cli_replay(capsys, bundle)
        assert code == 0 and out.strip().endswith("reproduced: mismatch"), out


def test_a_bundle_pointing_at_the_standard_library_is_refused(tmp_path, capsys):
    """Loading a bundle runs nothing from it, and a tampered bundle.json cannot
    make a replay call into the standard library."""
    report = _check_square_devices(tmp_path)
    bundle = Path(report.repro_bundle)
    edit_bundle(bundle, lambda d: d["call"]["loss_fn"].update(name="os:system"))
    with pytest.raises(repro.ReproBundleError, match="standard library"):
        repro.replay(bundle)
    code, out = cli_replay(capsys, bundle)
    assert code == 2 and "standard library" in out, out
    report = gradcheck.check_distributed(
        dm.build_dropout, dm.step_plain, dm.batch(), repro_dir=tmp_path
    )
    bundle = Path(report.repro_bundle)
    edit_bundle(bundle, lambda d: d["call"].update(build="subprocess:run"))
    with pytest.raises(repro.ReproBundleError, match="standard library"):
        repro.replay(bundle)
