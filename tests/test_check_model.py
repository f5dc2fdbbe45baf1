"""gradcheck.check_model, `gradcheck check-model` and `pytest --gradcheck-model`:
real architectures by name, a planted bug through each front door, unbuildable
specs, bad overrides, timeouts, the user's model left as it was.

The ``tests.test_check_model:<name>`` specs below are the module:callable form.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import gradcheck
import gradcheck.cli  # noqa: F401 - imported once (pytester runs in-process)
import gradcheck.pytest_plugin  # noqa: F401
from gradcheck import models
from gradcheck.cli import main
from gradcheck.report import build_document

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_plugin import PLUGIN  # noqa: E402  (how inner sessions load it)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


HERE = "tests.test_check_model"


# ---------------------------------------------------------------- models by callable
class ScaledIdentity(torch.autograd.Function):
    """The identity whose backward scales the gradient by 1 + 1e-3: a planted bug."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + 1e-3)


class MLP(torch.nn.Module):
    def __init__(self, planted: bool = False):
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.hidden = torch.nn.Linear(12, 12)
        self.out = torch.nn.Linear(12, 3)
        self.planted = planted

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.hidden(h)
        if self.planted:
            h = ScaledIdentity.apply(h)  # on a hidden layer
        return self.out(torch.tanh(h))


def _mlp(planted: bool):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLP(planted), torch.randn(5, 6)


def correct_mlp():
    return _mlp(False)


def planted_mlp():
    return _mlp(True)


def planted_bert():
    """Shrunk BERT with the planted identity on the first block's feed-forward
    output (a forward hook on encoder.layer.0.intermediate.dense)."""
    from gradcheck.backends import _hf

    model, inputs, _ = _hf.build("bert", {}, "hf:bert", 0, models.MAX_PARAMETERS)
    dense = model.encoder.layer[0].intermediate.dense
    dense.register_forward_hook(lambda mod, args, out: ScaledIdentity.apply(out))
    return model, inputs


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        time.sleep(1.0)
        return self.lin(x)


def slow_model():
    return Slow(), torch.ones(2, 3)


def not_a_model():
    return "a string"


class Float64Fails(torch.nn.Module):
    """A framework exception in forward, in float64 only (as torch's grouped_mm)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        if x.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, got Double")
        return self.lin(x)


def float64_fails():
    return Float64Fails(), torch.ones(2, 3)


class NaNAtInit(torch.nn.Module):
    """A model whose output is NaN at its weights: a fully masked softmax row."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        scores = self.lin(x).masked_fill(torch.ones(4, dtype=torch.bool), -torch.inf)
        return scores.softmax(-1)


def nan_at_init():
    return NaNAtInit(), torch.ones(2, 3)


class Greedy(torch.nn.Module):
    """Asks for 12 GiB in forward (torch.empty: no page is touched unless the
    allocation succeeds, so without a limit this costs no memory either)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        torch.empty(3 * 2**30, dtype=torch.float32)
        return self.lin(x)


def greedy_model():
    return Greedy(), torch.ones(2, 3)


class KeepsRouterF32(torch.nn.Module):
    """Keeps its router Linear in float32 through .to(float64) (as a model's
    _keep_in_fp32_modules does): its float64 checks have mixed dtypes."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.router = torch.nn.Linear(4, 2)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.router.float()
        return self

    def forward(self, x):
        h = torch.tanh(self.body(x))
        gate = self.router(h.float()).softmax(-1)[:, :1].to(h.dtype)
        return h * gate


def keeps_router_f32():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return KeepsRouterF32(), torch.randn(5, 3)


class KeepsCaches(torch.nn.Module):
    """Keeps tensors as plain attributes, as RecurrentGemma (its last state, a
    non-leaf carrying the forward's graph) and Mimi (a float32 codebook cached
    on the first forward) do: the float64 copy must deep-copy and convert them."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.state = None
        self._embed = None

    def forward(self, x):
        if self._embed is None:
            self._embed = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
        h = torch.tanh(self.lin(x)) + x @ self._embed.t()
        self.state = h * 2  # carries the graph
        return h


def keeps_caches():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return KeepsCaches(), torch.randn(5, 3)


class Float32Constant(torch.nn.Module):
    """Makes a float32 constant in its forward: fine in float32, raises in
    float64 (as FastSpeech2's length_regulator torch.zeros(dtype=torch.float))."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        h = self.lin(x)
        bias = torch.zeros(4, 4, dtype=torch.float)
        return h @ bias + h


def float32_constant():
    return Float32Constant(), torch.ones(2, 3)


class LogOfNegative(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return torch.log(-self.lin(x).abs() - 1.0)


def log_of_negative():
    return LogOfNegative(), torch.ones(2, 3)


class RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("call model.train() before backward")


class TrainOnlyBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return RaisingBackward.apply(self.lin(x))


def train_only_backward():
    return TrainOnlyBackward(), torch.ones(2, 3)


class TrainAssertedBackward(torch.autograd.Function):
    """Reformer's reversible layers in small: a linear layer whose backward
    asserts train mode; ``scale`` != 1 plants a wrong weight gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, module, scale):
        ctx.module, ctx.scale = module, scale
        ctx.save_for_backward(h, weight)
        return torch.nn.functional.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, g):
        assert ctx.module.training, "make sure to use `model.train()` to train it"
        h, weight = ctx.saved_tensors
        return g @ weight, ctx.scale * g.T @ h, g.sum(0), None, None


class TrainModeBackward(torch.nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Dropout(0.5)  # kept in eval mode: deterministic
        self.scale = scale

    def forward(self, x):
        torch.seed()  # as Reformer's train-mode forward: reseeds torch's RNG
        h = torch.tanh(self.inp(x))
        lin = self.lin
        return self.drop(
            TrainAssertedBackward.apply(h, lin.weight, lin.bias, self, self.scale)
        )


class WritesGradBackward(torch.autograd.Function):
    """Reformer's reversible Function in small: its backward runs the layer's
    backward with .backward(), so the layer's parameters get their gradient
    in .grad and none is returned for them (torch.autograd.grad sees none)."""

    @staticmethod
    def forward(ctx, h, module):
        ctx.module = module
        ctx.save_for_backward(h)
        with torch.no_grad():
            return module.lin(h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            ctx.module.lin(h).backward(g)
        return h.grad, None


class WritesGrad(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return WritesGradBackward.apply(torch.tanh(self.inp(x)), self)


def train_mode_backward():
    torch.manual_seed(0)
    return TrainModeBackward(), torch.randn(2, 3)


# ---------------------------------------------------------------- library
@pytest.mark.parametrize("spec", ["hf:bert", "hf:vit"])
def test_hf_models_pass_fd_in_float32_and_float64(spec):
    reports = models.check_model(spec, dtype="float32,float64", properties="fd")
    assert isinstance(reports, models.ModelReports) and len(reports) == 2
    for report, dtype in zip(reports, ("float32", "float64"), strict=True):
        assert report.status == "passed", report.message()
        assert report.property == "finite_difference" and report.dtype == dtype
        assert report.framework == "torch"
        assert report.label == f"{spec} fd {dtype}"
        row = models.row(report)
        assert row["model"] == spec and row["property"] == "fd"
        assert 10_000 < row["parameters"] < 200_000  # shrunk: hidden 32, 2 layers
    assert reports.passed and not reports.mismatches


def test_llama_linearity_and_locality_with_overrides():
    spec = "hf:llama?num_hidden_layers=1&hidden_size=64"
    checker = models.Checker(spec)
    checker.build()
    model, inputs = checker._built
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert len(model.layers) == 1
    assert set(inputs) == {"input_ids", "attention_mask"}
    reports = models.check_model(spec, properties="linearity,locality")
    assert [r.status for r in reports] == ["passed", "passed"], reports[1].message()
    flow = reports[1].flow
    weights = models.draw_weights(0)
    assert flow.losses == ["main", "aux"] and flow.weights == [
        weights["main"],
        weights["aux"],
    ]
    assert flow.reached_by("layers.0.mlp.down_proj.weight") == ["main", "aux"]


@pytest.mark.slow  # blame by bisection: ~30 s on 2 shared cores
def test_planted_bug_in_bert_is_a_mismatch():
    (fd,) = models.check_model(f"{HERE}:planted_bert", properties="fd")
    assert fd.status == "mismatch", fd.message()
    assert fd.location is not None


def test_planted_bug_in_a_callable_model_is_a_mismatch():
    reports = models.check_model(f"{HERE}:planted_mlp", properties="fd,linearity")
    assert reports[0].status == "mismatch", reports[0].message()
    assert reports[0].location.tensor in (
        "inp.weight",
        "inp.bias",
        "hidden.weight",
        "hidden.bias",
    )
    # the wrong backward scales both heads alike: the total is still their sum
    assert reports[1].status == "passed", reports[1].message()
    assert models.check_model(f"{HERE}:correct_mlp", properties="fd").passed


def test_unbuildable_specs_are_reports_not_exceptions():
    reports = models.check_model("hf:not_a_model", dtype="float32,float64")
    assert len(reports) == 6
    assert {r.status for r in reports} == {"unbuildable"}
    assert "has no model type 'not_a_model'" in reports[0].notes[0]
    (typo,) = models.check_model("hf:berd", properties="fd")
    assert "close: bert" in typo.notes[0]
    assert len(reports[0].notes[0]) < 600  # the reason, not transformers' list of types
    assert (
        reports[0].headline()
        == "gradcheck: finite-difference check not run (unbuildable)"
    )
    assert "Traceback" not in reports[0].message()
    (bad,) = models.check_model(f"{HERE}:not_a_model", properties="fd")
    assert bad.status == "unbuildable" and "str" in bad.notes[0]
    (missing,) = models.check_model("no_such_module_h7:build", properties="fd")
    assert missing.status == "unbuildable" and "no_such_module_h7" in missing.notes[0]
    doc = build_document([{"id": r.label, "report": r} for r in reports])
    assert doc["summary"]["by_status"]["unbuildable"] == 6
    json.dumps(reports[0].to_dict())  # NaN error/tolerance are JSON-safe


def test_parameter_limit_refuses_before_running():
    (report,) = models.check_model("hf:bert", properties="fd", max_parameters=10_000)
    assert report.status == "unbuildable"
    assert "over the limit of 10,000" in report.notes[0]


def test_bad_overrides_and_options_are_errors():
    with pytest.raises(
        gradcheck.InvalidArgumentError,
        match="num_hidden_layer'.*Valid keys:.*num_hidden_layers",
    ):
        models.check_model("hf:llama?num_hidden_layer=1")
    with pytest.raises(gradcheck.InvalidArgumentError, match="not an integer"):
        models.check_model("hf:llama?hidden_size=big")
    with pytest.raises(gradcheck.InvalidArgumentError, match="key=value"):
        models.parse_spec("hf:llama?hidden_size")
    with pytest.raises(gradcheck.InvalidArgumentError, match="unknown property"):
        models.check_model("hf:bert", properties="fd,speed")
    with pytest.raises(gradcheck.InvalidArgumentError, match="unknown dtype"):
        models.check_model("hf:bert", dtype="float16")
    with pytest.raises(gradcheck.InvalidArgumentError, match="spec"):
        models.parse_spec("bert")


def test_shrink_reaches_nested_configs():
    from gradcheck.backends import _hf

    cfg = _hf.shrink_config(_hf.load_config("clip"))
    for sub in (cfg.text_config, cfg.vision_config):
        assert sub.hidden_size == 32 and sub.num_hidden_layers == 2
        assert sub.num_attention_heads == 2 and sub.attention_dropout == 0.0
    assert cfg.text_config.vocab_size <= 1024
    assert cfg.vision_config.image_size <= 64
    moe = _hf.shrink_config(_hf.load_config("mixtral"))
    assert moe.num_local_experts <= 4 and moe.num_experts_per_tok <= 2
    audio = _hf.shrink_config(_hf.load_config("wav2vec2"))
    assert max(audio.conv_dim) == 32 and audio.num_hidden_layers == 2
    swin = _hf.shrink_config(_hf.load_config("swin"))  # per-stage lists, window
    # every stage kept (backbones name and read them per stage), each 1 deep,
    # the first 16 wide (doubling per stage)
    assert len(swin.depths) == swin.num_layers == 4 and len(swin.stage_names) == 5
    assert swin.embed_dim == 16 and max(swin.depths) == 1 and max(swin.num_heads) == 2
    assert swin.image_size // swin.patch_size // 2 ** (len(swin.depths) - 1) == 2
    assert swin.window_size == 2


def test_user_model_object_is_unchanged():
    model, x = correct_mlp()
    model.train()
    model.inp.training = False  # mixed flags come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    reports = models.check_model(model, inputs=x, dtype="float32,float64")
    assert [r.status for r in reports] == ["passed"] * 6, [r.message() for r in reports]
    assert all(r.label.startswith("<tests.test_check_model.MLP>") for r in reports)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_model_object_without_inputs_is_unbuildable_with_advice():
    model, _ = correct_mlp()
    (report,) = models.check_model(model, properties="fd")
    assert report.status == "unbuildable" and "pass inputs=" in report.notes[0]


def test_weights_are_drawn_by_hypothesis_from_the_seed():
    w0 = models.draw_weights(0)
    assert w0 == models.draw_weights(0)
    for seed in range(4):
        w = models.draw_weights(seed)
        assert min(w.values()) > 0 and max(w.values()) >= 2 * min(w.values())
    assert len({tuple(models.draw_weights(s).values()) for s in range(4)}) > 1


def test_timeout_stops_a_check_and_reports_it():
    (report,) = models.check_model(f"{HERE}:slow_model", properties="fd", timeout=3)
    assert report.status == "timeout"
    assert "took more than 3 s" in report.notes[0]


def test_a_model_nan_at_its_point_is_an_error_that_says_so():
    reports = models.check_model(f"{HERE}:nan_at_init", dtype="float32")
    assert [r.status for r in reports] == ["error"] * 3
    note = reports[0].notes[0]
    assert note.startswith("NaNAtInit's output is not finite (8 of 8 elements")
    assert "the model's own forward, before any loss or gradient" in note


def test_a_framework_exception_is_an_error_report_not_a_traceback(capfd):
    for timeout in (None, 60):
        reports = models.check_model(
            f"{HERE}:float64_fails", dtype="float32,float64", timeout=timeout
        )
        statuses = [r.status for r in reports]
        assert statuses == ["passed"] * 3 + ["error"] * 3, statuses
        note = reports[3].notes[0]
        assert note.startswith(
            "Float64Fails's forward raises in float64, though it runs in float32"
        ), note
        assert "RuntimeError: Expected mat_a to be Float32, got Double" in note
        assert "(at tests/test_check_model.py:" in note  # where: the model's line
        assert "nothing to check in float64" in note
    assert "Traceback" not in capfd.readouterr().err


def test_one_worker_serves_many_models_and_is_replaced_after_a_timeout():
    models.retire_worker()
    (first,) = models.check_model(f"{HERE}:correct_mlp", properties="fd", timeout=60)
    pid = models._WORKER["proc"].pid
    # refused on the meta count in the worker: unbuildable, not "out of memory"
    (big,) = models.check_model(
        "hf:bert", properties="fd", timeout=60, max_parameters=10_000
    )
    assert big.status == "unbuildable" and "over the limit of 10,000" in big.notes[0]
    assert "memory" not in big.notes[0].split("checking it")[0]
    assert models._WORKER["proc"].pid == pid  # no new process, no new import
    (slow,) = models.check_model(f"{HERE}:slow_model", properties="fd", timeout=0.5)
    assert slow.status == "timeout"
    assert "proc" not in models._WORKER  # killed with the check
    (after,) = models.check_model(f"{HERE}:correct_mlp", properties="fd", timeout=60)
    assert after.status == first.status == "passed"
    assert models._WORKER["proc"].pid != pid
    assert after.error == first.error  # a fresh or a reused worker: one verdict


def test_worker_exits_when_its_parent_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import threading, time\n"
        "from gradcheck import models\n"
        "def show():\n"
        "    while 'proc' not in models._WORKER:\n"
        "        time.sleep(0.1)\n"
        "    print(models._WORKER['proc'].pid, flush=True)\n"
        "threading.Thread(target=show, daemon=True).start()\n"
        f"models.check_model('{HERE}:slow_model', properties='fd', timeout=600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{worker}/status").read_text()
        except FileNotFoundError:
            break
        if "\nState:\tZ" in state:  # exited, not yet reaped by pid 1
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the orphaned worker kept running")


def test_worker_memory_limit_makes_an_allocation_a_reported_error(monkeypatch):
    models.retire_worker()
    monkeypatch.setattr(models, "WORKER_MEMORY", 4 * 2**30)
    try:
        (report,) = models.check_model(
            f"{HERE}:greedy_model", properties="fd", timeout=60
        )
    finally:
        models.retire_worker()
    assert report.status == "error", report.notes
    assert report.notes[0].startswith("out of memory: ")
    assert "4 GiB address-space limit" in report.notes[0]


def test_a_model_transformers_cannot_build_says_so():
    (report,) = models.check_model("hf:evolla", properties="fd")
    assert report.status == "unbuildable"
    assert (
        "from its default config either (not gradcheck's shrink)" in (report.notes[0])
    )


@pytest.mark.parametrize(
    "model_type, limit",
    [
        ("luke", 1_000_000),  # entity vocabulary of 500,000
        ("blt", 1_000_000),  # hash-embedding vocabulary of 3,000,012
        ("falcon", 200_000),  # ffn_hidden_size
        ("deepseek_v32", 1_000_000),  # the indexer's heads, LoRA ranks
        ("glm4v", 1_000_000),  # the vision merger's out_hidden_size
        ("efficientnet", 1_000_000),  # width / depth coefficients
        ("mobilenet_v1", 1_000_000),  # depth multiplier
        ("levit", 1_000_000),  # strict int fields (drop_path_rate stays an int)
        ("prophetnet", 1_000_000),  # a num_hidden_layers setter that refuses
        ("reformer", 1_000_000),  # axial position parts add up to the width
        ("squeezebert", 1_000_000),  # embedding_size follows hidden_size
        ("bit", 1_000_000),  # group-norm groups divide the shrunk widths
    ],
)
def test_shrink_brings_wide_configs_small(model_type, limit):
    from gradcheck.backends import _hf

    cfg = _hf.shrink_config(_hf.load_config(model_type))
    n = _hf.count_parameters_meta(cfg)
    assert n is not None and n < limit, n


@pytest.mark.parametrize("model_type", ["bamba", "zamba2", "mamba2"])
def test_shrink_fits_mamba2_heads_to_the_inner_width(model_type):
    from gradcheck.backends import _hf

    model, _, n = _hf.build(model_type, {}, f"hf:{model_type}", 0, 1_000_000)
    assert n < 200_000  # and its forward ran: heads x head size = expand x width


@pytest.mark.parametrize("model_type", ["qwen2_vl", "glm4v"])
def test_multimodal_rope_sections_fit_the_shrunk_heads(model_type):
    from gradcheck.backends import _hf

    model, _, _ = _hf.build(model_type, {}, f"hf:{model_type}", 0, 1_000_000)
    sections = model.config.get_text_config().rope_parameters["mrope_section"]
    assert 3 <= sum(sections) <= 8  # half the rotary width of a 16-wide head


def test_shrink_sets_an_unset_top_k_of_an_moe():
    from gradcheck.backends import _hf

    cfg = _hf.shrink_config(_hf.load_config("deepseek_v2"))  # default: None
    assert cfg.num_experts_per_tok == 2 and cfg.n_routed_experts == 4


class _NeedsPixels(torch.nn.Module):
    """A multimodal model that needs both inputs and then fails on its own."""

    main_input_name = "input_ids"

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(vocab_size=10)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None):
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        raise RuntimeError("the towers' widths disagree")


def test_unbuildable_reason_is_the_one_with_every_input_given():
    from gradcheck.backends import _hf

    with pytest.raises(RuntimeError, match="widths disagree"):
        _hf._working_inputs(_NeedsPixels(), 0)


def test_audio_inputs_follow_the_shrink_and_the_model_s_layout():
    whisper = models.Checker("hf:whisper")
    whisper.build()
    model, inputs = whisper._built
    assert model.config.max_source_positions == 32
    assert tuple(inputs["input_features"].shape) == (2, 80, 64)  # not 3,000 frames
    s2t = models.Checker("hf:speech_to_text")  # (batch, frames, features)
    s2t.build()
    model, inputs = s2t._built
    assert tuple(inputs["input_features"].shape) == (2, 64, 80)
    mimi = models.Checker("hf:mimi")  # a codec: (batch, 1, samples)
    mimi.build()
    assert tuple(mimi._built[1]["input_values"].shape) == (2, 1, 4000)


def test_shrink_keeps_one_layer_of_each_kind_and_per_layer_overrides():
    from gradcheck.backends import _hf

    cfg = _hf.shrink_config(_hf.load_config("gemma4_text"))  # heterogeneous
    assert cfg.num_hidden_layers == 2
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    assert _hf.count_parameters_meta(cfg) < 2_000_000
    plain = _hf.shrink_config(_hf.load_config("gemma4_text"), each_kind=False)
    assert plain.layer_types == ["sliding_attention"] * 2
    llama = _hf.shrink_config(_hf.load_config("llama"))
    assert llama.num_hidden_layers == 2


# ---------------------------------------------------------------- CLI
def test_cli_planted_bug_exits_1_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(
        [
            "check-model",
            f"{HERE}:planted_mlp",
            "hf:not_a_model",
            f"{HERE}:correct_mlp",
            "--properties",
            "fd",
            "--dtype",
            "float32,float64",
            "--timeout",
            "0",
            "--json",
            str(out),
            "--report",
            str(tmp_path / "html"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 1, text
    lines = [line for line in text.splitlines() if " fd float" in line]
    assert len(lines) == 6  # one per model x property x dtype: the run went on
    assert lines[0].startswith("mismatch") and "params" in lines[0]
    assert "unbuildable" in lines[2] and "not_a_model" in lines[2]
    assert lines[4].startswith("passed")
    assert text.splitlines()[0] == (
        "loss: main (a seeded random projection of the first output) x "
        f"{models.draw_weights(0)['main']:g} + aux (its mean square) x "
        f"{models.draw_weights(0)['aux']:g}; weights drawn by Hypothesis from seed 0"
    )
    data = json.loads(out.read_text())
    assert data["weights"] == models.draw_weights(0) and data["seed"] == 0
    rows = data["rows"]
    assert [set(r) for r in rows] == [
        {"model", "property", "dtype", "status", "seconds", "parameters", "message"}
    ] * 6
    assert [r["status"] for r in rows] == ["mismatch"] * 2 + ["unbuildable"] * 2 + [
        "passed"
    ] * 2
    assert rows[4]["parameters"] == 6 * 12 + 12 + 12 * 12 + 12 + 12 * 3 + 3
    html = (tmp_path / "html" / "check-model.html").read_text()
    assert "<h2>Models</h2>" in html and 'class="badge s-unbuildable"' in html


def test_cli_unbuildable_alone_exits_0(capsys):
    code = main(
        ["check-model", "hf:not_a_model", "--properties", "fd", "--timeout", "0"]
    )
    assert code == 0
    assert "unbuildable" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["hf:llama?num_hidden_layer=1"], "Valid keys"),
        (["hf:bert", "--dtype", "float16"], "float32, float64"),
        (["hf:bert", "--properties", "speed"], "fd, linearity, locality"),
        (["nonsense"], "hf:<model_type>"),
    ],
)
def test_cli_usage_errors_exit_2(argv, needle, capsys):
    try:
        code = main(["check-model", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    assert needle in captured.out + captured.err


# ---------------------------------------------------------------- pytest plugin
def test_plugin_generates_one_test_per_model_property_dtype(pytester):
    pytester.syspathinsert(ROOT)
    result = pytester.runpytest_inprocess(
        *PLUGIN,
        "--gradcheck-model",
        f"{HERE}:planted_mlp",
        "--gradcheck-model",
        f"{HERE}:correct_mlp",
        "--gradcheck-model",
        "hf:not_a_model",
        "--gradcheck-model-properties",
        "fd",
        "--gradcheck-model-dtype",
        "float64",
        "-rs",
    )
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    out = result.stdout.str()
    assert "gradcheck-models::tests.test_check_model:planted_mlp[fd-float64]" in out
    assert "finite-difference check FAILED (mismatch)" in out
    assert "Traceback" not in out
    assert "not run (unbuildable)" in out


def test_plugin_ini_and_bad_override(pytester):
    pytester.syspathinsert(ROOT)
    pytester.makeini(
        f"""
        [pytest]
        gradcheck_models = {HERE}:correct_mlp
        gradcheck_model_properties = fd,linearity
        gradcheck_model_dtype = float32
        """
    )
    result = pytester.runpytest_inprocess(*PLUGIN, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*correct_mlp?linearity-float32? PASSED*"])
    bad = pytester.runpytest_inprocess(*PLUGIN, "--gradcheck-model", "hf:bert?hidden=1")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown override 'hidden'" in bad.stderr.str()


# ---------------------------------------------------------------- keras
def test_keras_application_builds_at_32x32():
    pytest.importorskip("keras")
    checker = models.Checker("keras:MobileNetV3Small")
    checker.build()
    model, x = checker._built
    assert checker.framework == "tensorflow"
    assert x.shape == (2, 32, 32, 3)
    assert 100_000 < checker.parameters < 5_000_000
    import keras

    policy = keras.config.dtype_policy().name
    model64, x64 = checker._keras_in("float64")  # rebuilt under a float64 policy
    assert {str(w.dtype) for w in model64.trainable_weights} == {"float64"}
    assert x64.dtype == "float64" and keras.config.dtype_policy().name == policy
    (bad,) = models.check_model("keras:NoSuchNet", properties="fd")
    assert bad.status == "unbuildable" and "MobileNetV3Small" in bad.notes[0]


@pytest.mark.slow
def test_keras_application_fd():
    pytest.importorskip("keras")
    (report,) = models.check_model("keras:MobileNetV3Small", properties="fd")
    assert report.status in ("passed", "nondifferentiable"), report.message()


def test_plugin_timeout_skips_the_test_with_the_reason(pytester):
    pytester.syspathinsert(ROOT)
    result = pytester.runpytest_inprocess(
        *PLUGIN,
        "--gradcheck-model",
        f"{HERE}:slow_model",
        "--gradcheck-model-properties",
        "fd",
        "--gradcheck-model-dtype",
        "float32",
        "--gradcheck-model-timeout",
        "3",
        "-rs",
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*not run (timeout)*took more than 3 s*"])
    bad = pytester.runpytest_inprocess(
        *PLUGIN, "--gradcheck-model", "hf:bert", "--gradcheck-model-timeout", "-1"
    )
    assert bad.ret == pytest.ExitCode.USAGE_ERROR


@pytest.mark.slow  # reads every transformers model class: about a minute
def test_hf_star_expands_to_model_types_taking_ids_pixels_or_audio():
    specs = models.expand_specs(["hf:*"])
    names = {s.name for s in specs}
    assert {"bert", "llama", "t5", "vit", "wav2vec2", "whisper", "clip"} <= names
    # main input another kind (time series, video): not ids, pixels or audio
    assert not {"patchtst", "informer", "vjepa2", "perceiver"} & names
    assert all(s.kind == "hf" and s.text == f"hf:{s.name}" for s in specs)
    assert len(names) == len(specs) > 200


def test_a_row_s_dtype_is_the_one_asked_for_and_a_kept_float32_is_named():
    (fd,) = models.check_model(
        f"{HERE}:keeps_router_f32", properties="fd", dtype="float64"
    )
    assert fd.dtype.startswith("mixed("), fd.dtype  # the report: what ran
    row = models.row(fd)
    assert row["dtype"] == "float64"  # the row: what was asked for
    assert fd.status == "passed", fd.message()
    (note,) = [n for n in fd.notes if n.startswith("parameters in")]
    assert note.startswith("parameters in float32 and float64: the model keeps ")
    assert "router.weight, router.bias in float32 after .to(float64)" in note
    (f32,) = models.check_model(f"{HERE}:keeps_router_f32", properties="fd")
    assert not any(n.startswith("parameters in") for n in f32.notes)
    assert models.row(f32)["dtype"] == f32.dtype == "float32"


def test_float64_copy_of_a_model_with_cached_tensor_attributes():
    reports = models.check_model(
        f"{HERE}:keeps_caches", dtype="float32,float64", properties="fd,locality"
    )
    assert [r.status for r in reports] == ["passed"] * 4, [r.message() for r in reports]


def test_a_float64_forward_error_names_the_op_that_made_float32():
    (report,) = models.check_model(
        f"{HERE}:float32_constant", properties="fd", dtype="float64"
    )
    assert report.status == "error"
    note = report.notes[0]
    assert "forward raises in float64" in note
    assert (
        "The first float32 tensor of this float64 forward is made by torch.zeros"
        in (note)
    )
    assert "test_check_model.py" in note.split("made by", 1)[1]


def test_a_non_finite_output_names_the_first_nan_op():
    (report,) = models.check_model(f"{HERE}:log_of_negative", properties="fd")
    assert report.status == "error"
    assert "output is not finite" in report.notes[0]
    assert "The first NaN/Inf comes from torch.log" in report.notes[0]


def test_locality_names_a_raising_backward_as_fd_does():
    fd, loc = models.check_model(
        f"{HERE}:train_only_backward", properties="fd,locality"
    )
    assert fd.status == loc.status == "error"
    assert loc.notes[0].startswith(
        "the backward pass through TrainOnlyBackward's first output raised "
        "AssertionError: call model.train() before backward"
    ), loc.notes[0]
    # it asks for train mode: tried, and said so, as it raises there too
    assert "(checked in train mode, as the model's own error" in fd.notes[0]


def test_a_model_whose_backward_demands_train_mode_is_checked_in_train_mode():
    from tests._state import assert_same_rng, rng_state

    model, x = train_mode_backward()
    model.eval()
    model.lin.training = True  # mixed flags come back as they were
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = rng_state()
    reports = models.check_model(model, inputs=x, dtype="float32,float64")
    assert [r.status for r in reports] == ["passed"] * 6, [r.message() for r in reports]
    for r in reports:
        assert r.notes[0].startswith(
            "checked in train mode: TrainModeBackward's own code refuses eval mode "
            "(AssertionError: make sure to use `model.train()`"
        ), r.notes[0]
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert_same_rng(rng)


def test_a_wrong_backward_that_demands_train_mode_is_a_mismatch():
    model, x = train_mode_backward()
    model.scale = 1.5  # the layer's weight gradient 50% too large
    fd, loc = models.check_model(model, inputs=x, properties="fd,locality")
    assert fd.status == "mismatch", fd.message()
    assert fd.notes[0].startswith("checked in train mode"), fd.notes
    assert loc.status == "passed", loc.message()  # the reach is right


def test_train_mode_is_asked_for_by_the_model_not_by_gradcheck_messages():
    from gradcheck.errors import BackwardError

    inner = AssertionError("put the model in training mode first")
    outer = BackwardError("the backward pass through fn raised: model.train()")
    outer.__cause__ = inner
    assert models._wants_train(outer) == (
        "AssertionError: put the model in training mode first"
    )
    own = BackwardError("see model.train()")  # gradcheck's own words: not read
    own.__cause__ = ValueError("shapes differ")
    assert models._wants_train(own) is None


def test_gradients_written_to_grad_by_a_backward_count_and_are_named():
    """What a backward writes to .grad counts (loss.backward() sees it); the note
    names those parameters: torch.autograd.grad / torch.func alone would not."""
    torch.manual_seed(0)
    model, x = WritesGrad(), torch.randn(2, 3)
    (fd,) = models.check_model(model, inputs=x, properties="fd", dtype="float64")
    assert fd.status == "passed", fd.message()
    assert fd.notes[0].startswith(
        "2 parameters ('lin.weight', 'lin.bias') get their gradient only as a side "
        "effect of WritesGrad's backward: it writes them to .grad"
    ), fd.notes[0]
    assert all(p.grad is None for p in model.parameters())  # put back
