"""PyTorch's device plumbing for check_variants / check_devices: copies of the model
and batch on a device, the op log of an evaluation (TorchDispatchMode: TF32-eligible
kernels, random-number ops, ops with nondeterministic CUDA kernels), the
deterministic-algorithms and TF32 switches. The driver that uses them is
:class:`gradcheck.backends.torch_variants.TorchVariantDriver`."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

try:
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover - very old torch
    TorchDispatchMode = None

from gradcheck import devices as dv
from gradcheck.backends.variants_base import OpLog
from gradcheck.errors import UnsupportedInputError

__all__ = [
    "check_loss",
    "copy_model",
    "deterministic_warnings",
    "device_error",
    "move",
    "op_logging",
    "tf32_off_switches",
]


# ====================================================================== op logs
_TORCH_MATMUL = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "addbmm",
    "_addmm_activation",
    "matmul",
}
_TORCH_CONV = {
    "convolution",
    "convolution_backward",
    "_convolution",
    "cudnn_convolution",
    "cudnn_convolution_transpose",
}
_TORCH_RNN = {"_cudnn_rnn", "_cudnn_rnn_backward"}
_TORCH_REDUCTIONS = {"sum", "mean", "nansum", "index_add", "index_add_", "scatter_add"}
_TORCH_RANDOM = {
    "rand",
    "randn",
    "randint",
    "rand_like",
    "randn_like",
    "randint_like",
    "randperm",
    "bernoulli",
    "bernoulli_",
    "normal",
    "normal_",
    "uniform_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "random_",
    "multinomial",
    "native_dropout",
    "_fused_dropout",
    "rrelu_with_noise",
    "poisson",
    "binomial",
    "_standard_gamma",
    "_sample_dirichlet",
}
#: ops with nondeterministic CUDA kernels (torch.use_deterministic_algorithms docs)
_TORCH_NONDETERMINISTIC = {
    "index_add",
    "index_add_",
    "index_put",
    "index_put_",
    "_index_put_impl_",
    "_unsafe_index_put",
    "put_",
    "scatter_add",
    "scatter_add_",
    "scatter_reduce",
    "scatter_reduce_",
    "index_reduce",
    "index_reduce_",
    "index_copy",
    "index_copy_",
    "embedding_dense_backward",
    "_embedding_bag_backward",
    "_embedding_bag_dense_backward",
    "_embedding_bag",
    "convolution_backward",
    "upsample_linear1d_backward",
    "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward",
    "_adaptive_avg_pool2d_backward",
    "adaptive_avg_pool2d_backward",
    "_adaptive_avg_pool3d_backward",
    "adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward",
    "max_pool3d_with_indices_backward",
    "avg_pool3d_backward",
    "reflection_pad1d_backward",
    "reflection_pad2d_backward",
    "reflection_pad3d_backward",
    "replication_pad1d_backward",
    "replication_pad2d_backward",
    "replication_pad3d_backward",
    "nll_loss2d_forward",
    "_ctc_loss_backward",
    "grid_sampler_2d_backward",
    "grid_sampler_3d_backward",
    "histc",
    "bincount",
    "kthvalue",
    "median",
    "cumsum",
    "max_unpool2d",
    "max_unpool3d",
}


def _torch_record(
    log: OpLog, torch: Any, func: Any, args: Sequence[Any], out: Any
) -> None:
    name = func.overloadpacket.__name__
    if name in _TORCH_RANDOM:
        log.random.add(name)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        return
    on_gpu = first.is_cuda
    if on_gpu and name in _TORCH_NONDETERMINISTIC:
        log.candidates.add(name)
    k = 0
    if name in ("mm", "bmm", "matmul"):
        k = int(args[0].shape[-1])
    elif name in ("addmm", "baddbmm", "_addmm_activation"):
        k = int(args[1].shape[-1])
    elif name == "addbmm":
        k = int(args[1].shape[0]) * int(args[1].shape[-1])
    elif name in ("convolution", "_convolution"):
        w = args[1]
        transposed = bool(args[6]) if len(args) > 6 else False
        k = w.numel() // max(1, int(w.shape[1] if transposed else w.shape[0]))
    elif name == "convolution_backward":
        grad_out, w = args[0], args[2]
        k = max(
            grad_out.numel() // max(1, int(grad_out.shape[1])),
            w.numel() // max(1, int(w.shape[1])),
        )
    elif name in _TORCH_REDUCTIONS and isinstance(out, torch.Tensor):
        k = first.numel() // max(1, out.numel())
    log.accumulation = max(log.accumulation, k)
    if not on_gpu or first.dtype != torch.float32:
        return
    if name in _TORCH_MATMUL:
        log.tf32["matmul"] += 1
    elif name in _TORCH_CONV:
        log.tf32["convolution"] += 1
    elif name in _TORCH_RNN:
        steps = 1
        with contextlib.suppress(Exception):
            batch_first = bool(args[10])
            steps = int(first.shape[1] if batch_first else first.shape[0])
        log.tf32["rnn"] += max(1, steps)


@contextlib.contextmanager
def op_logging() -> Iterator[OpLog]:
    """Record what the evaluation inside the block runs (see OpLog)."""
    log = OpLog()
    if TorchDispatchMode is None:  # pragma: no cover - very old torch
        log.working = False
        yield log
        return

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            try:
                _torch_record(log, torch, func, args, out)
            except Exception:  # a log must never break the user's computation
                log.working = False
            return out

    with _Mode():
        yield log


# ====================================================================== device moves
#: torch's messages for tensors on different devices
_DEVICE_ERROR = re.compile(
    r"same device|Expected .*device|device type|to be on .*(cuda|cpu)", re.IGNORECASE
)


def device_error(exc: BaseException, device: str) -> BaseException | None:
    """A clear UnsupportedInputError for torch's "tensors on different devices"
    errors (a tensor loss_fn took from elsewhere stayed where it was); None for
    any other error."""
    if not isinstance(exc, RuntimeError) or not _DEVICE_ERROR.search(str(exc)):
        return None
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UnsupportedInputError(
        f"loss_fn failed on {device}: {type(exc).__name__}: {first}. gradcheck moves "
        "the model and the tensors inside batch (dicts, lists, tuples) to each "
        "device; a tensor loss_fn takes from elsewhere (a closure, a global) stays "
        "where it is. Pass it in batch, or create it on the device of the model's "
        "parameters."
    )


def copy_model(model: Any, device: str) -> Any:
    """A deep copy of ``model`` on ``device`` (the user's module is never moved)."""
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:
        raise UnsupportedInputError(
            f"the model cannot be deep-copied ({type(exc).__name__}: "
            f"{str(exc)[:160]}); gradcheck copies it to each device so the "
            "user's module is never moved. Remove un-copyable attributes "
            "(open files, locks, hooks holding them)."
        ) from exc
    return copied.to(device)


def move(obj: Any, device: str) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, namedtuples) copied
    to ``device``; a floating tensor that required grad still does."""
    if isinstance(obj, torch.Tensor):
        moved = obj.detach().to(device, copy=True)
        if obj.requires_grad and moved.is_floating_point():
            moved.requires_grad_(True)
        return moved
    if isinstance(obj, dict):
        items = [(k, move(v, device)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj


# ====================================================================== switches
def deterministic_state() -> tuple[bool, bool]:
    """(deterministic algorithms on, warn-only) as the user set them."""
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def set_deterministic(mode: bool, warn_only: bool) -> None:
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is not None:  # leaves torch._inductor.config alone
        setter(mode, warn_only=warn_only)
    else:  # pragma: no cover - older torch
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


@contextlib.contextmanager
def deterministic_warnings(flagged: list[str]) -> Iterator[None]:
    """Deterministic algorithms on in warn-only mode inside the block (the user's
    setting back after); the ops torch names as having no deterministic
    implementation, from its warnings or from a kernel that refuses outright,
    are appended to ``flagged``."""
    before = deterministic_state()
    try:
        set_deterministic(True, warn_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except RuntimeError as exc:
                found = _torch_flagged(str(exc))
                if not found:
                    raise
                flagged.extend(found)
        for w in caught:
            flagged.extend(_torch_flagged(str(w.message)))
    finally:
        set_deterministic(*before)


_TORCH_FLAG_RE = re.compile(r"([\w.:]+) does not have a deterministic implementation")


def _torch_flagged(message: str) -> list[str]:
    found = _TORCH_FLAG_RE.findall(message)
    if not found and "CuBLAS" in message and "deterministic" in message:
        found = ["cuBLAS matmul (CUBLAS_WORKSPACE_CONFIG unset)"]
    return found


@contextlib.contextmanager
def tf32_off_switches(torch: Any) -> Iterator[None]:
    """TF32 off for matmuls, cuDNN convolutions and RNNs; every switch back as it
    was on exit. Uses the API family the current state was set with: torch
    refuses to read a legacy flag after the new fp32_precision API set it."""
    legacy_mm = dv._try(torch.get_float32_matmul_precision)
    legacy_cudnn = dv._try(lambda: torch.backends.cudnn.allow_tf32)
    new = {
        "matmul": (torch.backends.cuda.matmul, "fp32_precision"),
        "conv": (torch.backends.cudnn.conv, "fp32_precision"),
        "rnn": (torch.backends.cudnn.rnn, "fp32_precision"),
    }
    undo: list[Callable[[], None]] = []

    def set_new(key: str) -> None:
        obj, attr = new[key]
        before = dv._try(lambda: getattr(obj, attr))
        if before is None or before == "ieee":
            return
        setattr(obj, attr, "ieee")
        undo.append(lambda: setattr(obj, attr, before))

    try:
        if legacy_mm is not None and legacy_mm != "highest":
            torch.set_float32_matmul_precision("highest")
            undo.append(lambda: torch.set_float32_matmul_precision(legacy_mm))
        elif legacy_mm is None:
            set_new("matmul")
        if legacy_cudnn is not None and legacy_cudnn:
            torch.backends.cudnn.allow_tf32 = False
            undo.append(lambda: setattr(torch.backends.cudnn, "allow_tf32", True))
        # whatever the legacy switches left on (new-API state), switch off too
        now = dv.torch_tf32_settings()
        if now["matmul"] is not False:
            set_new("matmul")
        if now["convolution"] is not False:
            set_new("conv")
        if now["rnn"] is not False:
            set_new("rnn")
        yield
    finally:
        for fn in reversed(undo):
            fn()


def check_loss(loss: Any) -> None:
    """loss_fn(model, batch) must give a scalar floating tensor: else a clear
    UnsupportedInputError (also used by torch_variants)."""
    if (
        not isinstance(loss, torch.Tensor)
        or not loss.is_floating_point()
        or loss.numel() != 1
    ):
        what = (
            f"a tensor of shape {list(loss.shape)} ({loss.dtype})"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise UnsupportedInputError(
            f"loss_fn(model, batch) must return a scalar floating tensor "
            f"(the loss); got {what}. Reduce it (mean/sum) as training "
            "does; .item() and Python floats carry no gradient."
        )
