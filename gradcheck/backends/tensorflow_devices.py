"""The devices property's TensorFlow / Keras driver: the user's model run under
``tf.device``, evaluation with an op log (op callbacks), RNG, op determinism and TF32
switches, and restoring every variable. See :mod:`gradcheck.properties.devices`."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradcheck.backends import tensorflow as tfb
from gradcheck.backends.devices_base import Driver, Evaluation, OpLog, same
from gradcheck.errors import NothingToDifferentiateError, UnsupportedInputError
from gradcheck.numeric import tolerance as tl

__all__ = ["TensorflowDriver", "owns"]

FRAMEWORK = "tensorflow"


def owns(model: Any) -> bool:
    """Whether ``model`` is this driver's (a Keras Model/Layer or a tf.Module)."""
    return tfb._is_container(model)


def driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> TensorflowDriver:
    return TensorflowDriver(loss_fn, model, batch)


# ====================================================================== op logs
_TF_MATMUL = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum"}
_TF_RANDOM_PREFIXES = (
    "Random",
    "StatelessRandom",
    "StatelessTruncatedNormal",
    "StatelessMultinomial",
    "StatelessParameterizedTruncatedNormal",
    "Stateful",
    "TruncatedNormal",
    "ParameterizedTruncatedNormal",
    "Multinomial",
    "RngReadAndSkip",
    "RngSkip",
)
_TF_REDUCTIONS = {"Sum", "Mean", "BiasAddGrad", "UnsortedSegmentSum", "SegmentSum"}
#: ops with nondeterministic GPU kernels (TF determinism docs and release notes)
_TF_NONDETERMINISTIC = {
    "UnsortedSegmentSum",
    "UnsortedSegmentProd",
    "SegmentSum",
    "SegmentMean",
    "SparseSegmentSum",
    "SparseSegmentMean",
    "SparseSegmentSqrtN",
    "ScatterAdd",
    "ResourceScatterAdd",
    "ScatterNdAdd",
    "ResourceScatterNdAdd",
    "TensorScatterAdd",
    "ScatterNd",
    "Conv2DBackpropFilter",
    "Conv3DBackpropFilterV2",
    "DepthwiseConv2dNativeBackpropFilter",
    "BiasAddGrad",
    "SparseSoftmaxCrossEntropyWithLogits",
    "SoftmaxCrossEntropyWithLogits",
    "ResizeBilinearGrad",
    "ResizeNearestNeighborGrad",
    "ResizeBicubicGrad",
    "CudnnRNNBackprop",
    "CudnnRNNBackpropV2",
    "CudnnRNNBackpropV3",
    "Bincount",
    "DenseBincount",
    "CTCLoss",
    "CTCLossV2",
}


def _prod(shape: Sequence[Any]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _tf_record(log: OpLog, op_type: Any, inputs: Any, attrs: Any, outputs: Any) -> None:
    name = op_type.decode() if isinstance(op_type, bytes) else str(op_type)
    if name.startswith("__inference") or name.startswith("__forward"):
        log.opaque = True  # a tf.function: its ops are not seen one by one
        return
    if name.startswith(_TF_RANDOM_PREFIXES):
        log.random.add(name)
    outs = list(outputs or ())
    device = str(getattr(outs[0], "device", "")) if outs else ""
    on_gpu = "GPU" in device.upper()
    if on_gpu and name in _TF_NONDETERMINISTIC:
        log.candidates.add(name)
    ins = list(inputs or ())
    if not ins:
        return
    attr = dict(zip(attrs[::2], attrs[1::2], strict=False)) if attrs else {}
    shapes = [tuple(int(s) if s is not None else 1 for s in i.shape) for i in ins]
    k = 0
    if name == "MatMul" and len(shapes[0]) == 2:
        k = shapes[0][0] if attr.get("transpose_a") else shapes[0][-1]
    elif name.startswith("BatchMatMul") and len(shapes[0]) >= 2:
        k = shapes[0][-2] if attr.get("adj_x") else shapes[0][-1]
    elif name in ("Conv2D", "Conv3D", "Conv1D") and len(ins) > 1:
        k = _prod(shapes[1][:-1])
    elif name.startswith("Conv") and "BackpropFilter" in name and len(ins) > 2:
        k = _prod(shapes[2][:-1])
    elif name.startswith("Conv") and "BackpropInput" in name and len(ins) > 2:
        f = shapes[1]
        k = _prod(f[:-2]) * f[-1]
    elif name in _TF_REDUCTIONS and outs:
        out_shape = tuple(int(s) if s is not None else 1 for s in outs[0].shape)
        k = _prod(shapes[0]) // max(1, _prod(out_shape))
    log.accumulation = max(log.accumulation, int(k))
    if not on_gpu or getattr(ins[0], "dtype", None) is None:
        return
    if getattr(ins[0].dtype, "name", "") != "float32" and not (
        name.startswith("Conv") and "Backprop" in name
    ):
        return
    if name in _TF_MATMUL:
        log.tf32["matmul"] += 1
    elif name.startswith("Conv") or name.startswith("DepthwiseConv"):
        log.tf32["convolution"] += 1
    elif name.startswith("CudnnRNN"):
        log.tf32["rnn"] += max(1, shapes[0][0] if shapes[0] else 1)


@contextlib.contextmanager
def _tf_logging() -> Iterator[OpLog]:
    log = OpLog()
    try:
        from tensorflow.python.framework import op_callbacks
    except ImportError:  # pragma: no cover - private module moved
        log.working = False
        yield log
        return

    def callback(op_type, inputs, attrs, outputs, op_name=None, graph=None):
        if graph is not None:  # graph construction, not execution
            return None
        try:
            _tf_record(log, op_type, inputs, attrs, outputs)
        except Exception:  # a log must never break the user's computation
            log.working = False
        return None

    op_callbacks.add_op_callback(callback)
    try:
        yield log
    finally:
        op_callbacks.remove_op_callback(callback)


# ====================================================================== driver
class TensorflowDriver(Driver):
    framework = "tensorflow"
    switch = "tf.config.experimental.enable_op_determinism()"

    def __init__(self, loss_fn: Callable[..., Any], model: Any, batch: Any):
        self.tf = tf
        self.tfb = tfb
        self.loss_fn = loss_fn
        self.model = model
        self.batch = batch
        self.evaluations = 0
        containers, named, _skipped = tfb._collect_params(model)
        tracked: dict[int, Any] = {}
        self._state = tfb._State([])

        def track(v: Any) -> Any:
            key = id(tfb._tf_var(v))
            if key not in tracked:
                tracked[key] = tfb._Var(v)
                self._state.variables.append(tracked[key])
            return tracked[key]

        sources: list[tuple[str, Any]] = []
        seen: set[int] = set()
        for name, v in named:
            var = track(v)
            if id(var.tf_var) in seen or not tfb._is_floating(v):
                continue
            seen.add(id(var.tf_var))
            sources.append((name, var))
        for container in containers:
            for v in container.variables:
                track(v)
        for v in tfb._rng_states(containers):
            track(v).rng = True
        if not sources:
            self._state.restore()
            raise NothingToDifferentiateError(
                "the model has no trainable floating-point variable (build it by "
                "calling it once on an example batch): nothing to compare."
            )
        names = [n for n, _ in sources]
        self.names = [
            n if names.count(n) == 1 else f"{n} (#{i})" for i, n in enumerate(names)
        ]
        self._sources = [var for _, var in sources]
        self.dtypes = {
            n: tl.canonical_dtype(var.tf_var.dtype)
            for n, var in zip(self.names, self._sources, strict=True)
        }
        self._tf32_enabled = tf.config.experimental.tensor_float_32_execution_enabled()
        self._determinism = _tf_determinism_enabled()

    def evaluate(self, device: str) -> Evaluation:
        tf = self.tf
        tfb = self.tfb
        watched = [v.tf_var for v in self._sources]
        self.evaluations += 1
        try:
            with _tf_logging() as log, tf.device(device):
                with tf.GradientTape() as tape:
                    tape.watch(watched)
                    loss = self.loss_fn(self.model, self.batch)
                if (
                    not isinstance(loss, tf.Tensor)
                    or not loss.dtype.is_floating
                    or int(tf.size(loss)) != 1
                ):
                    what = (
                        f"a tensor of shape {loss.shape.as_list()} ({loss.dtype.name})"
                        if isinstance(loss, tf.Tensor)
                        else type(loss).__name__
                    )
                    raise UnsupportedInputError(
                        f"loss_fn(model, batch) must return a scalar floating tensor "
                        f"(the loss); got {what}. Reduce it (tf.reduce_mean) as "
                        "training does."
                    )
                grads = tape.gradient(
                    loss, watched, unconnected_gradients=tf.UnconnectedGradients.NONE
                )
                value = float(np.asarray(loss.numpy(), dtype=np.float64).reshape(()))
                arrays = {
                    n: None if g is None else tfb._to_numpy(g)
                    for n, g in zip(self.names, grads, strict=True)
                }
        finally:
            self._state.reset_variables()
        return Evaluation(value, arrays, log)

    def seed(self, device: str, seed: int) -> None:
        # every device starts from the model's own seed-generator states
        self._reset_rng()

    def _reset_rng(self) -> None:
        for v in self._state.variables:
            if v.rng:
                v.reset()
        st = self._state
        if st.tf_generator is not None:
            st.tf_generator.state.assign(st.tf_generator_state)
        if st.keras_seed is not None:
            st.keras_seed.reset()
        np.random.set_state(st.rng_np)
        random.setstate(st.rng_py)

    def rng_snapshot(self, device: str) -> Any:
        return None  # the entry state, see rng_reset

    def rng_reset(self, snapshot: Any) -> None:
        self._reset_rng()

    def probe(self, device: str, snapshot: Any) -> tuple[list[str], bool | None]:
        try:
            from tensorflow.python.framework import config as tf_config
        except ImportError:  # pragma: no cover
            return [], None
        disable = getattr(tf_config, "disable_op_determinism", None)
        if disable is None or self._determinism is None:
            return [], None  # it could not be switched back off: do not touch it
        flagged: list[str] = []
        results: list[Evaluation] = []
        try:
            if not self._determinism:
                self.tf.config.experimental.enable_op_determinism()
            for _ in range(2):
                self.rng_reset(snapshot)
                try:
                    results.append(self.evaluate(device))
                except (self.tf.errors.OpError, RuntimeError) as exc:
                    flagged.extend(_tf_flagged(exc))
                    break
        finally:
            if not self._determinism:
                disable()
        agrees = same(results[0], results[1]) if len(results) == 2 else None
        return list(dict.fromkeys(flagged)), agrees

    @contextlib.contextmanager
    def tf32_off(self) -> Iterator[None]:
        exp = self.tf.config.experimental
        before = exp.tensor_float_32_execution_enabled()
        try:
            exp.enable_tensor_float_32_execution(False)
            yield
        finally:
            exp.enable_tensor_float_32_execution(before)

    def restore(self) -> None:
        exp = self.tf.config.experimental
        if exp.tensor_float_32_execution_enabled() != self._tf32_enabled:
            exp.enable_tensor_float_32_execution(self._tf32_enabled)
        self._state.restore()


def _tf_determinism_enabled() -> bool | None:
    try:
        from tensorflow.python.framework import config as tf_config

        return bool(tf_config.is_op_determinism_enabled())
    except Exception:
        return None


def _tf_flagged(exc: BaseException) -> list[str]:
    message = str(exc)
    if "require a seed" in message:
        return ["an unseeded random op (tf.random.* without seed)"]
    ops = re.findall(r"\[Op:(\w+)\]", message)
    if ops:
        return ops
    op = getattr(getattr(exc, "op", None), "type", None)
    return (
        [str(op)] if op else [f"{type(exc).__name__}: {message.splitlines()[0][:120]}"]
    )
