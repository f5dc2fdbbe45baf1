"""TensorFlow's device plumbing for check_variants / check_devices: the op log of an
evaluation (op callbacks: TF32-eligible kernels, random-number ops, ops with
nondeterministic GPU kernels), the op-determinism and TF32 switches. The driver
that uses them is
:class:`gradcheck.backends.tensorflow_variants.TensorflowVariantDriver`."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from gradcheck.backends.variants_base import OpLog

__all__ = ["determinism_enabled", "op_determinism", "op_logging", "tf32_off"]


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
def op_logging() -> Iterator[OpLog]:
    """Record what the eager evaluation inside the block runs (see OpLog)."""
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


# ====================================================================== switches
@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off inside the block (TensorFlow's one switch), back as it was after."""
    exp = tf.config.experimental
    before = exp.tensor_float_32_execution_enabled()
    try:
        exp.enable_tensor_float_32_execution(False)
        yield
    finally:
        exp.enable_tensor_float_32_execution(before)


@contextlib.contextmanager
def op_determinism(flagged: list[str]) -> Iterator[bool]:
    """TensorFlow's op determinism on inside the block (off again after, if the
    user had it off); yields False when it cannot be switched back off, and then
    does not touch it. An op it refuses (an unseeded random op, an op without a
    deterministic kernel) ends the block and is appended to ``flagged``."""
    try:
        from tensorflow.python.framework import config as tf_config
    except ImportError:  # pragma: no cover
        yield False
        return
    disable = getattr(tf_config, "disable_op_determinism", None)
    was = determinism_enabled()
    if disable is None or was is None:
        yield False
        return
    try:
        if not was:
            tf.config.experimental.enable_op_determinism()
        try:
            yield True
        except (tf.errors.OpError, RuntimeError) as exc:
            flagged.extend(_tf_flagged(exc))
    finally:
        if not was:
            disable()


def determinism_enabled() -> bool | None:
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
