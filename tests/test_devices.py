"""Devices: discovery and requests, TF32 state, and the CPU-vs-GPU property.

Everything but the last section runs on a CPU-only machine: the comparison core is
pure NumPy (TF32 is emulated by rounding float32 mantissas to 10 bits), and the
whole pipeline runs with devices=("cpu", "cpu"), which exercises the copying,
the double evaluation, the nondeterminism diagnosis and the state restoration.
The GPU section compares real CPU and CUDA runs and skips cleanly without a GPU.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gradcheck import devices as dv
from gradcheck.errors import (
    DeviceUnavailableError,
    GradientMismatchError,
    InvalidArgumentError,
    NonFiniteError,
    NothingToDifferentiateError,
    UnsupportedInputError,
)
from gradcheck.properties import devices as pdv
from gradcheck.properties.devices import DeviceRun, compare, judge
from tests._state import assert_same_rng, rng_state

ROOT = Path(__file__).resolve().parents[1]


# ====================================================================== helpers
def to_tf32(x: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32's 10-bit mantissa (round to nearest even)."""
    bits = np.asarray(x, dtype=np.float32).copy().view(np.uint32)
    lsb = (bits >> np.uint32(13)) & np.uint32(1)
    bits = (bits + np.uint32(0xFFF) + lsb) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def gemm_pair(seed: int = 0, m: int = 48, k: int = 256, n: int = 32):
    """A float32 GEMM result as the CPU computes it, and as a TF32 GEMM would
    (operands rounded to 10 bits, products accumulated in float32)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    cpu = (a @ b).astype(np.float64)
    tf32 = (to_tf32(a) @ to_tf32(b)).astype(np.float32).astype(np.float64)
    return cpu, tf32


GPU_OFF = {
    "framework": "torch",
    "gpu": True,
    "in_play": False,
    "reason": "TF32 is switched off on cuda:0 (compute capability 8.0).",
}
GPU_ON = {
    "framework": "torch",
    "gpu": True,
    "in_play": True,
    "matmul": True,
    "reason": "TF32 is in play on cuda:0 (compute capability 8.0) for float32 matmul "
    "kernels: operands are rounded to a 10-bit mantissa.",
}


def runs(ref, other, **kw):
    return [
        DeviceRun("cpu", {"w": ref}, loss=1.0),
        DeviceRun("cuda:0", {"w": other}, loss=1.0, **kw),
    ]


# ====================================================================== the core
def tf32_truncated(x: np.ndarray) -> np.ndarray:
    """Float32 values cut to TF32's 10-bit mantissa by truncation (toward zero):
    some conversion paths truncate instead of rounding."""
    bits = np.asarray(x, dtype=np.float32).copy().view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.parametrize("to_10_bits", [to_tf32, tf32_truncated])
@pytest.mark.parametrize("k", [16, 256, 4096])
def test_one_kernel_allowance_covers_measured_tf32_error_at_any_length(to_10_bits, k):
    """The truth: emulated TF32 GEMMs against the exact (float64) product. Their
    rms error relative to the result's rms does not grow with the sum's length
    and stays inside one kernel's allowance, rounded or truncated; and the
    float32 result of the same GEMM is judged to agree with it under that
    allowance, but not under float32's."""
    rng = np.random.default_rng(k)
    a = rng.standard_normal((48, k)).astype(np.float32)
    b = rng.standard_normal((k, 32)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tf32 = (to_10_bits(a) @ to_10_bits(b)).astype(np.float64)
    measured = np.sqrt(np.mean((tf32 - exact) ** 2) / np.mean(exact**2))
    assert 0 < measured <= pdv.tf32_rounding(1)
    cpu = (a @ b).astype(np.float64)
    assert compare({"w": cpu}, {"w": tf32}, dtypes="float32", tf32_kernels=1).passed
    assert not compare({"w": cpu}, {"w": tf32}, dtypes="float32").passed
    assert pdv.tf32_rounding(0) == 0.0  # TF32 not in play: no allowance at all


@pytest.mark.parametrize("to_10_bits", [to_tf32, tf32_truncated])
def test_a_chain_of_tf32_kernels_is_covered_and_a_planted_error_is_not(to_10_bits):
    """Four GEMMs in series (as a forward and backward chain them), each in TF32
    against the float32 chain: within the allowance for 4 kernels; the same chain
    with 3e-2 on its largest element fails under that allowance (four kernels
    allow ~1e-2 of an element that size, truncation's bias included)."""
    rng = np.random.default_rng(7)
    mats = [rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(5)]
    f32, t32 = mats[0], mats[0]
    for m in mats[1:]:
        f32 = f32 @ m
        t32 = to_10_bits(t32) @ to_10_bits(m)
    f32, t32 = f32.astype(np.float64), t32.astype(np.float64)
    assert compare({"w": f32}, {"w": t32}, dtypes="float32", tf32_kernels=4).passed
    planted = t32.copy()
    planted[np.unravel_index(np.argmax(np.abs(planted)), planted.shape)] *= 1.03
    assert not compare(
        {"w": f32}, {"w": planted}, dtypes="float32", tf32_kernels=4
    ).passed


def test_emulated_tf32_gemm_is_explained_by_tf32():
    cpu, tf32 = gemm_pair()
    plain = compare({"w": cpu}, {"w": tf32}, dtypes="float32")
    aware = compare({"w": cpu}, {"w": tf32}, dtypes="float32", tf32_kernels=1)
    assert not plain.passed and plain.plain_ratio > 3  # float32's tolerance cries wolf
    assert aware.passed and not aware.plain_passed
    report = judge(
        "torch", runs(cpu, tf32, tf32=GPU_ON, tf32_kernels=1), dtypes="float32"
    )
    assert report.passed and report.property == "devices"
    assert report.device == "cpu vs cuda:0"
    assert "TF32 accounted for" in report.tolerance_reason
    assert report.tolerance_terms["tf32_kernels[cuda:0]"] == 1
    text = "\n".join(report.notes)
    assert "TF32 explains the difference" in text
    assert "TF32 is in play on cuda:0" in text


def test_same_difference_without_tf32_in_play_fails_and_says_tf32_is_not_the_cause():
    cpu, tf32 = gemm_pair()
    report = judge("torch", runs(cpu, tf32, tf32=GPU_OFF), dtypes="float32")
    assert report.status == "mismatch"
    assert report.location is not None and report.location.tensor == "w"
    assert "TF32 is not the cause" in report.message()


def test_planted_difference_fails_even_with_tf32_accounted_for():
    cpu, tf32 = gemm_pair(seed=1)
    planted = tf32.copy()
    k = np.unravel_index(np.argmax(np.abs(planted)), planted.shape)
    planted[k] *= 1.01  # 1e-2 relative on one element
    report = judge(
        "torch", runs(cpu, planted, tf32=GPU_ON, tf32_kernels=1), dtypes="float32"
    )
    assert report.status == "mismatch"
    assert report.location.tensor == "w" and report.location.index == tuple(
        int(i) for i in k
    )
    assert report.error > report.tolerance
    assert "'w'[" in report.message()


def test_a_planted_element_is_still_caught_among_a_tf32_model_sized_allowance():
    # four TF32 kernels (a two-layer MLP's gradient): 1e-2 on a large element fails
    cpu, tf32 = gemm_pair(seed=2)
    planted = tf32.copy()
    k = np.unravel_index(np.argmax(np.abs(planted)), planted.shape)
    planted[k] *= 1.01
    assert not compare(
        {"w": cpu}, {"w": planted}, dtypes="float32", tf32_kernels=4
    ).passed


def test_tf32_allowance_cannot_hide_a_difference_measured_without_tf32():
    cpu, tf32 = gemm_pair(seed=3)
    bug = np.zeros_like(cpu)
    bug[3, 4] = 2e-3 * np.sqrt(np.mean(cpu**2))  # within TF32's slack, far above f32's
    report = judge(
        "torch",
        runs(
            cpu, tf32 + bug, tf32=GPU_ON, tf32_kernels=1, without_tf32={"w": cpu + bug}
        ),
        dtypes="float32",
    )
    assert report.status == "mismatch"
    assert report.location.tensor == "w" and report.location.index == (3, 4)
    assert "TF32 is not the cause" in report.message()


def test_tf32_measured_as_the_cause_when_it_exceeds_its_allowance():
    cpu, tf32 = gemm_pair(seed=4)
    exaggerated = cpu + 30 * (tf32 - cpu)  # far more TF32 error than modelled
    report = judge(
        "torch",
        runs(
            cpu,
            exaggerated,
            tf32=GPU_ON,
            tf32_kernels=1,
            without_tf32={"w": cpu.copy()},
        ),
        dtypes="float32",
    )
    assert report.status == "mismatch"
    assert "TF32 is the cause" in report.message()
    assert "fp32_precision = 'ieee'" in report.message()


def test_float64_gradients_are_compared_at_float64_rounding():
    cpu = np.random.default_rng(5).standard_normal((6, 5))
    assert compare({"w": cpu}, {"w": cpu * (1 + 1e-13)}, dtypes="float64").passed
    assert not compare({"w": cpu}, {"w": cpu * (1 + 1e-8)}, dtypes="float64").passed
    # TF32 never applies to float64 tensors
    loose = compare(
        {"w": cpu}, {"w": cpu * (1 + 1e-8)}, dtypes="float64", tf32_kernels=9
    )
    assert not loose.passed


def test_long_accumulations_in_another_order_pass_and_a_planted_error_does_not():
    """The truth: eight float32 sums of 10^6 terms each, accumulated front to back
    and back to front (two devices' orders), are the same gradient. With the
    accumulation length known they agree; 1e-2 on one element still fails."""
    rng = np.random.default_rng(0)
    terms = rng.uniform(-0.5, 1.5, (8, 10**6)).astype(np.float32)
    forward = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1].astype(np.float64)
    backward = np.cumsum(terms[:, ::-1], axis=1, dtype=np.float32)[:, -1]
    backward = backward.astype(np.float64)
    assert not np.array_equal(forward, backward)  # the orders do round differently
    kw = {"dtypes": "float32", "accumulation": 10**6}
    assert compare({"w": forward}, {"w": backward}, **kw).passed
    planted = backward.copy()
    planted[3] *= 1.01
    report = compare({"w": forward}, {"w": planted}, **kw)
    assert not report.passed and report.worst.index == (3,)


def test_nonfinite_on_the_other_device_and_unconnected_tensors():
    cpu = np.ones((2, 3))
    bad = cpu.copy()
    bad[1, 2] = np.nan
    report = judge("torch", runs(cpu, bad), dtypes="float32")
    assert report.status == "mismatch" and report.location.index == (1, 2)
    assert "NaN/Inf" in report.message()
    # not connected on both devices: nothing to compare, passes
    assert compare({"w": None}, {"w": None}, dtypes="float32").passed
    # connected on one device only: compared against zeros
    assert not compare({"w": None}, {"w": cpu}, dtypes="float32").passed


def test_compare_rejects_mismatched_inputs():
    with pytest.raises(InvalidArgumentError, match="different tensors"):
        compare({"a": np.ones(2)}, {"b": np.ones(2)}, dtypes="float32")
    with pytest.raises(InvalidArgumentError, match="shape"):
        compare({"a": np.ones(2)}, {"a": np.ones(3)}, dtypes="float32")
    with pytest.raises(InvalidArgumentError):
        judge("torch", [DeviceRun("cpu", {})], dtypes="float32")


def test_nondeterministic_run_fails_as_nondeterministic_with_the_op():
    cpu = np.ones((2, 2))
    report = judge(
        "torch",
        runs(
            cpu,
            cpu * 1.01,
            repeat_differs=True,
            repeat_change=1e-2,
            cause="kernels",
            flagged_ops=["index_add_cuda_"],
            switch="torch.use_deterministic_algorithms(True)",
        ),
        dtypes="float32",
    )
    assert report.status == "nondeterministic"
    assert "index_add_cuda_" in report.location.quantity
    assert "index_add_cuda_" in report.message()
    assert report.tensors[0].status == "nondeterministic"


# ====================================================================== devices.py
def test_import_is_framework_free():
    code = (
        "import sys, gradcheck.devices, gradcheck.properties.devices; "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    ("spelling", "torch_name", "tf_name"),
    [
        ("cpu", "cpu", "/CPU:0"),
        ("/CPU:0", "cpu", "/CPU:0"),
        ("cuda", "cuda:0", "/GPU:0"),
        ("cuda:1", "cuda:1", "/GPU:1"),
        ("gpu:2", "cuda:2", "/GPU:2"),
        ("/GPU:0", "cuda:0", "/GPU:0"),
        ("/device:GPU:3", "cuda:3", "/GPU:3"),
        ("/job:localhost/replica:0/task:0/device:GPU:1", "cuda:1", "/GPU:1"),
    ],
)
def test_normalize_spellings(spelling, torch_name, tf_name):
    assert dv.normalize("torch", spelling) == torch_name
    assert dv.normalize("tf", spelling) == tf_name


def test_bad_names():
    with pytest.raises(InvalidArgumentError, match="not a device"):
        dv.normalize("torch", "tpu:0")
    with pytest.raises(InvalidArgumentError, match="framework"):
        dv.normalize("jax", "cpu")


@pytest.mark.torch
def test_resolve_requests_torch():
    torch = pytest.importorskip("torch")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [f"cuda:{i}" for i in range(n)]
    assert dv.available_devices("torch") == ["cpu", *gpus]
    assert dv.resolve("torch", "auto") == ["cpu", *gpus]
    assert dv.resolve("torch", "cpu") == ["cpu"]
    assert dv.resolve("torch", ("cpu", "cpu")) == ["cpu", "cpu"]
    with pytest.raises(InvalidArgumentError, match="empty"):
        dv.resolve("torch", ())
    with pytest.raises(InvalidArgumentError):
        dv.resolve("torch", 3)
    with pytest.raises(DeviceUnavailableError, match="cuda:7"):
        dv.resolve("torch", "cuda:7")
    if n:
        assert dv.resolve("torch", "cuda") == gpus
        assert dv.resolve("torch", "all") == ["cpu", *gpus]
    else:
        for request in ("cuda", "all", ("cpu", "cuda:0")):
            with pytest.raises(DeviceUnavailableError) as info:
                dv.resolve("torch", request)
            assert "sees none" in str(info.value)
            assert "('cpu', 'cpu')" in str(info.value)  # the fix is named


@pytest.mark.torch
def test_tf32_state_and_environment_torch():
    pytest.importorskip("torch")
    state = dv.tf32_state("torch", "cpu")
    assert state["in_play"] is False and state["gpu"] is False
    assert "never applies on the CPU" in state["reason"]
    assert "torch.get_float32_matmul_precision()" in state["settings"]
    env = dv.environment(["torch"])
    json.dumps(env)  # JSON-able
    assert env["frameworks"]["torch"]["devices"][0] == "cpu"
    assert dv.tf32_note("torch", "cpu", ["float32"]) is None


@pytest.mark.torch
def test_tf32_switches_round_trip_in_every_api_state():
    # torch refuses to read legacy TF32 flags once the new fp32_precision API set
    # them, so each state gets a process of its own (they are sticky)
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import sys, torch
        from gradcheck import devices as dv
        from gradcheck.properties.devices import _torch_tf32_off
        for state in sys.argv[1:]:
            exec(state)
            before = dv.torch_tf32_settings()
            with _torch_tf32_off(torch):
                inside = dv.torch_tf32_settings()
            assert not any(inside[k] for k in ("matmul", "convolution", "rnn")), state
            assert dv.torch_tf32_settings() == before, state
        """
    )
    # one process, the states applied one on top of the other (each checked)
    states = [
        "pass",
        "torch.set_float32_matmul_precision('high')",
        "torch.backends.cudnn.allow_tf32 = False",
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
        "torch.backends.fp32_precision = 'tf32'",
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    ]
    subprocess.run(
        [sys.executable, "-c", code, *states], check=True, cwd=ROOT, timeout=120
    )


# ====================================================================== torch pipeline
def _torch_setup(dtype_name="float32"):
    torch = pytest.importorskip("torch")
    from tests import torch_models as tm

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = tm.MultiHead(5, [8], "tanh", {"a": (3, "mse"), "b": (4, "ce")}, dtype)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "x": torch.randn(16, 5, generator=gen, dtype=dtype),
        "t": tm.make_targets(model, 16, gen),
    }

    def loss_fn(m, b):
        np.random.rand()  # user code that draws from every global RNG: the
        random.random()  # check must put each generator back
        torch.rand(1)
        outs = m(b["x"])
        return sum(tm.head_loss(m.losses[n], outs[n], b["t"][n]) for n in outs)

    return torch, model, batch, loss_fn


def _snapshot(torch, model):
    return {
        "params": [
            (n, p.detach().clone(), p.data_ptr(), p.device, p.grad)
            for n, p in model.named_parameters()
        ],
        "rng": rng_state(),
        "grad": torch.is_grad_enabled(),
        "det": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "tf32": dv.torch_tf32_settings(),
    }


def _assert_same(torch, before, model):
    after = _snapshot(torch, model)
    for (n, v, ptr, dev, g), (n2, v2, ptr2, dev2, g2) in zip(
        before["params"], after["params"], strict=True
    ):
        assert n == n2 and ptr == ptr2 and dev == dev2 and g is g2
        assert torch.equal(v, v2)
    assert_same_rng(before["rng"], after["rng"])
    assert (before["grad"], before["det"]) == (after["grad"], after["det"])
    assert before["tf32"] == after["tf32"]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_cpu_passes_and_leaves_everything_alone(dtype):
    torch, model, batch, loss_fn = _torch_setup(dtype)
    x_before = batch["x"].clone()
    before = _snapshot(torch, model)
    report = pdv.check_devices(loss_fn, model, batch, devices=("cpu", "cpu"))
    assert report.passed, report.message()
    assert report.property == "devices" and report.framework == "torch"
    assert report.device == "cpu vs cpu" and report.dtype == dtype
    names = [n for n, _ in model.named_parameters()]
    assert [t.name for t in report.tensors] == names
    assert report.cost["forward"] == 4  # two evaluations per device
    json.dumps(report.to_dict())
    _assert_same(torch, before, model)
    assert torch.equal(batch["x"], x_before)


@pytest.mark.torch
def test_torch_planted_difference_on_the_second_device_names_the_tensor():
    torch, model, batch, loss_fn = _torch_setup()
    calls = {"n": 0}
    mask = torch.ones(3, 8)
    mask[1, 2] = 1.01  # 1e-2 relative on one element

    def planted(m, b):
        calls["n"] += 1
        if calls["n"] > 2:  # the second device's evaluations, consistently
            m.heads["a"].weight.register_hook(lambda g: g * mask)
        return loss_fn(m, b)

    report = pdv.check_devices(planted, model, batch, devices=("cpu", "cpu"))
    assert report.status == "mismatch"
    assert report.location.tensor == "heads.a.weight"
    assert report.location.index == (1, 2)
    assert "'heads.a.weight'[1, 2]" in report.message()
    calls["n"] = 0
    with pytest.raises(GradientMismatchError, match="heads.a.weight"):
        pdv.assert_devices(planted, model, batch, devices=("cpu", "cpu"))


@pytest.mark.torch
def test_torch_random_noise_is_nondeterministic_not_a_mismatch():
    torch, model, batch, loss_fn = _torch_setup()
    before = _snapshot(torch, model)
    calls = {"n": 0}

    def noisy(m, b):
        calls["n"] += 1
        loss = loss_fn(m, b)
        if calls["n"] > 2:  # unseeded noise on the second device
            loss = loss + 1e-3 * (torch.rand(()) * m.trunk[0].weight).sum()
        return loss

    report = pdv.check_devices(noisy, model, batch, devices=("cpu", "cpu"))
    assert report.status == "nondeterministic", report.message()
    assert report.location.tensor == "trunk.0.weight"
    assert "rand" in report.location.quantity
    assert "with the random-number state reset they agree" in report.message()
    _assert_same(torch, before, model)


@pytest.mark.torch
def test_torch_flagged_op_is_named_and_every_switch_restored():
    torch, model, batch, loss_fn = _torch_setup()
    calls = {"n": 0}

    def flagged(m, b):
        calls["n"] += 1
        # put_ has no deterministic implementation; the counter stands for a
        # kernel whose result changes from call to call (GPU atomics)
        extra = torch.zeros(8).put(torch.tensor([0, 3, 5]), m.heads["b"].bias[:3])
        return loss_fn(m, b) + 1e-3 * calls["n"] * extra.sum()

    torch.use_deterministic_algorithms(True, warn_only=True)  # the user's own
    try:
        before = _snapshot(torch, model)
        with pytest.warns(UserWarning):  # the user's warn_only setting at work
            report = pdv.check_devices(flagged, model, batch, devices=("cpu", "cpu"))
        _assert_same(torch, before, model)
    finally:
        torch.use_deterministic_algorithms(False)
    assert report.status == "nondeterministic"
    assert "put_" in report.location.quantity
    assert "names put_ as having no deterministic implementation" in report.message()


@pytest.mark.torch
def test_torch_state_restored_when_loss_fn_raises_midway():
    torch, model, batch, loss_fn = _torch_setup()
    before = _snapshot(torch, model)
    calls = {"n": 0}

    def breaks(m, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("boom")
        return loss_fn(m, b)

    with pytest.raises(KeyError):
        pdv.check_devices(breaks, model, batch, devices=("cpu", "cpu"))
    _assert_same(torch, before, model)


@pytest.mark.torch
def test_torch_bad_inputs_raise_gradcheck_errors():
    torch, model, batch, loss_fn = _torch_setup()
    cpu2 = ("cpu", "cpu")
    with pytest.raises(UnsupportedInputError, match="scalar"):
        pdv.check_devices(lambda m, b: m(b["x"])["a"], model, batch, devices=cpu2)
    with pytest.raises(NonFiniteError, match="nan"):
        pdv.check_devices(
            lambda m, b: loss_fn(m, b) * float("nan"), model, batch, devices=cpu2
        )
    with pytest.raises(UnsupportedInputError, match="model it is passed"):
        pdv.check_devices(lambda m, b: loss_fn(model, b), model, batch, devices=cpu2)
    with pytest.raises(DeviceUnavailableError, match="at least two"):
        pdv.check_devices(loss_fn, model, batch, devices=("cpu",))
    with pytest.raises(UnsupportedInputError, match="nn.Module"):
        pdv.check_devices(loss_fn, object(), batch, devices=cpu2)
    with pytest.raises(UnsupportedInputError, match="callable"):
        pdv.check_devices(None, model, batch, devices=cpu2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(NothingToDifferentiateError):
        pdv.check_devices(lambda m, b: m(b).sum(), frozen, torch.ones(2), devices=cpu2)
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(UnsupportedInputError, match="meta"):
        pdv.check_devices(lambda m, b: m(b).sum(), meta, torch.ones(2), devices=cpu2)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="sees none"):
            pdv.check_devices(loss_fn, model, batch, devices="cuda")
        with pytest.raises(DeviceUnavailableError, match="at least two"):
            pdv.check_devices(loss_fn, model, batch)  # "auto" finds only the CPU


# ====================================================================== TF pipeline
def _keras_setup():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":  # pragma: no cover
        pytest.skip("keras does not run on TensorFlow here")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(0)
    batch = (
        rng.standard_normal((16, 4)).astype("float32"),
        rng.standard_normal((16, 2)).astype("float32"),
    )

    def loss_fn(m, b):
        return tf.reduce_mean((m(b[0], training=True) - b[1]) ** 2)

    return tf, model, batch, loss_fn


def _tf_state(tf, model):
    from tensorflow.python.framework import config as tf_config

    return (
        [v.numpy().tobytes() for v in model.variables],
        tf.config.experimental.tensor_float_32_execution_enabled(),
        tf_config.is_op_determinism_enabled(),
    )


@pytest.mark.tensorflow
def test_tf_cpu_cpu_passes_and_restores_variables():
    tf, model, batch, loss_fn = _keras_setup()
    before = _tf_state(tf, model)
    report = pdv.check_devices(loss_fn, model, batch, devices=("/CPU:0", "cpu"))
    assert report.passed, report.message()
    assert report.framework == "tensorflow" and report.device == "/CPU:0 vs /CPU:0"
    assert len(report.tensors) == len(model.trainable_variables)
    assert _tf_state(tf, model) == before  # BatchNorm statistics put back


@pytest.mark.tensorflow
def test_tf_planted_difference_and_unseeded_noise():
    tf, model, batch, loss_fn = _keras_setup()
    before = _tf_state(tf, model)
    calls = {"n": 0}
    mask = np.zeros((4, 8), dtype="float32")
    mask[2, 5] = 1.0

    def planted(m, b):
        calls["n"] += 1
        loss = loss_fn(m, b)
        if calls["n"] > 2:  # adds 1e-2 to one gradient element on device two
            loss = loss + 1e-2 * tf.reduce_sum(m.trainable_variables[0] * mask)
        return loss

    report = pdv.check_devices(planted, model, batch, devices=("cpu", "cpu"))
    assert report.status == "mismatch"
    assert report.location.index == (2, 5)
    assert report.location.tensor == model.trainable_variables[0].path

    calls["n"] = 0

    def noisy(m, b):
        calls["n"] += 1
        loss = loss_fn(m, b)
        if calls["n"] > 2:
            noise = tf.random.uniform(())
            loss = loss + 1e-3 * tf.reduce_sum(noise * m.trainable_variables[0])
        return loss

    report = pdv.check_devices(noisy, model, batch, devices=("cpu", "cpu"))
    assert report.status == "nondeterministic"
    assert "RandomUniform" in report.message() or "unseeded" in report.message()
    assert _tf_state(tf, model) == before  # op determinism switched back off


@pytest.mark.tensorflow
def test_tf_tf32_switch_restored_and_state_reported():
    tf, model, batch, loss_fn = _keras_setup()
    state = dv.tf32_state("tensorflow", "/CPU:0")
    assert state["in_play"] is False
    assert (
        "tf.config.experimental.tensor_float_32_execution_enabled()"
        in (state["settings"])
    )
    driver = pdv._driver(loss_fn, model, batch)
    try:
        before = tf.config.experimental.tensor_float_32_execution_enabled()
        with driver.tf32_off():
            assert not tf.config.experimental.tensor_float_32_execution_enabled()
        assert tf.config.experimental.tensor_float_32_execution_enabled() == before
    finally:
        driver.restore()
    assert dv.available_devices("tensorflow")[0] == "/CPU:0"


# ====================================================================== real GPUs
def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch


@pytest.fixture
def tf32_flags():
    """Run a test with torch's TF32 switches put back afterwards."""
    torch = _cuda()
    precision = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    yield torch
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn


class _ConvNet:
    """A small conv + MLP torch model (built lazily: torch may be absent)."""

    @staticmethod
    def build(torch, width=64):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv1d(3, 16, 5),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 28, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, 4),
        )

    @staticmethod
    def batch(torch):
        gen = torch.Generator().manual_seed(1)
        return torch.randn(32, 3, 32, generator=gen), torch.randn(32, 4, generator=gen)

    @staticmethod
    def loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()


def test_gpu_torch_cpu_vs_cuda_with_tf32_on_and_off(tf32_flags):
    torch = tf32_flags
    model, batch = _ConvNet.build(torch, 512), _ConvNet.batch(torch)
    before = _snapshot(torch, model)
    capable = torch.cuda.get_device_capability(0) >= (8, 0)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True
    on = pdv.check_devices(_ConvNet.loss, model, batch, devices=("cpu", "cuda:0"))
    assert on.passed, on.message()
    assert any(n.startswith("cuda:0:") for n in on.notes)
    if capable:
        assert on.tolerance_terms["tf32_kernels[cuda:0]"] >= 4
        assert "TF32 accounted for" in on.tolerance_reason
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    off = pdv.check_devices(_ConvNet.loss, model, batch, devices=("cpu", "cuda:0"))
    assert off.passed, off.message()
    assert "TF32 accounted for" not in off.tolerance_reason
    assert not torch.backends.cudnn.allow_tf32
    _assert_same(torch, before, model)


@pytest.mark.parametrize("gpu_factor", [1.0, 1 + 1e-7])
def test_gpu_torch_float64_agrees_tightly(gpu_factor):
    """float64 on CPU and GPU: a correct model passes, and a GPU-only backward off
    by 1e-7 at one element (far below anything float32 could see) is a
    mismatch at the tensor it reaches."""
    torch = _cuda()
    from tests import torch_models as tm

    class Squares(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6, dtype=torch.float64))

        def forward(self, x):
            factor = gpu_factor if x.is_cuda else 1.0
            return tm.OneWrongElement.apply(x @ self.w, 7, factor)

    if gpu_factor == 1.0:  # the conv net too
        torch.manual_seed(0)
        model = _ConvNet.build(torch).double()
        x, y = _ConvNet.batch(torch)
        report = pdv.check_devices(
            _ConvNet.loss, model, (x.double(), y.double()), devices=("cpu", "cuda:0")
        )
        assert report.passed, report.message()
    torch.manual_seed(0)
    model = Squares()
    x = torch.randn(10, 6, dtype=torch.float64)
    report = pdv.check_devices(
        lambda m, b: m(b).sum(), model, x, devices=("cpu", "cuda:0")
    )
    if gpu_factor == 1.0:
        assert report.passed, report.message()
    else:
        assert report.status == "mismatch", report.message()
        assert report.location.tensor == "w"


def test_gpu_torch_cuda_only_bug_is_a_mismatch_not_tf32(tf32_flags):
    torch = tf32_flags
    from tests import torch_models as tm

    torch.set_float32_matmul_precision("high")

    class CudaBug(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            h = x @ self.w
            # squares h; its backward is 10% wrong at one element on the GPU only
            return tm.OneWrongElement.apply(h, 7, 1.1 if h.is_cuda else 1.0)

    torch.manual_seed(0)
    model = CudaBug()
    x = torch.randn(10, 6)
    report = pdv.check_devices(
        lambda m, b: m(b).sum(), model, x, devices=("cpu", "cuda:0")
    )
    assert report.status == "mismatch", report.message()
    assert report.location.tensor == "w"
    assert "TF32 is not the cause" in report.message()


def test_gpu_torch_index_add_atomics_are_nondeterministic():
    torch = _cuda()

    class Gather(torch.nn.Module):
        """The backward of index_select is index_add_: float32 atomics on CUDA."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.randn(8))

        def forward(self, idx, c):
            return (self.p.index_select(0, idx) * c).sum() + (self.p**2).sum()

    gen = torch.Generator().manual_seed(0)
    n = 1 << 18
    half = torch.randint(0, 8, (n // 2,), generator=gen)
    idx = torch.cat([half, half])
    weights = torch.randn(n // 2, generator=gen) * 1e3
    c = torch.cat([weights, -weights])  # exact sums cancel: order shows in the result
    report = pdv.check_devices(
        lambda m, b: m(*b), Gather(), (idx, c), devices=("cpu", "cuda:0")
    )
    # no skip on a "mismatch": the two GPU sums differ by summation order alone
    # (2^17 atomic adds per element that cancel), which is no wrong gradient, so
    # "mismatch" is a wrong verdict and fails here
    assert report.status == "nondeterministic", report.message()
    assert "index_add" in report.message()
    assert not torch.are_deterministic_algorithms_enabled()


def _tf_gpu():
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_logical_devices("GPU"):
        pytest.skip("needs a TensorFlow GPU")
    return tf


@pytest.mark.tensorflow
def test_gpu_tf_cpu_vs_gpu_with_tf32_on_and_off():
    tf = _tf_gpu()
    _, model, batch, loss_fn = _keras_setup()
    before = _tf_state(tf, model)
    enabled = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        tf.config.experimental.enable_tensor_float_32_execution(True)
        on = pdv.check_devices(loss_fn, model, batch, devices=("/CPU:0", "/GPU:0"))
        assert on.passed, on.message()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        off = pdv.check_devices(loss_fn, model, batch, devices=("/CPU:0", "/GPU:0"))
        assert off.passed, off.message()
        assert "TF32 accounted for" not in off.tolerance_reason
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(enabled)
    assert _tf_state(tf, model) == before
