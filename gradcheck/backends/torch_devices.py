"""The devices property's PyTorch driver: per-device copies of the model and batch,
evaluation with an op log (TorchDispatchMode), RNG, deterministic-algorithms and
TF32 switches, and restoring all of it. See :mod:`gradcheck.properties.devices`."""

from __future__ import annotations

import contextlib
import copy
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

try:
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover - very old torch
    TorchDispatchMode = None

from gradcheck import devices as dv
from gradcheck.backends.devices_base import Driver, Evaluation, OpLog, same
from gradcheck.errors import NothingToDifferentiateError, UnsupportedInputError
from gradcheck.numeric import tolerance as tl

__all__ = ["TorchDriver", "owns", "tf32_off_switches"]

FRAMEWORK = "torch"


def owns(model: Any) -> bool:
    """Whether ``model`` is this driver's (a torch.nn.Module)."""
    return isinstance(model, torch.nn.Module)


def driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> TorchDriver:
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.layers.Layer):
        raise UnsupportedInputError(
            "a Keras model on the torch backend cannot be copied to another "
            "device by gradcheck; check it with KERAS_BACKEND=tensorflow, or "
            "check the equivalent torch.nn.Module."
        )
    return TorchDriver(loss_fn, model, batch)


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
def _torch_logging(torch: Any) -> Iterator[OpLog]:
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


# ====================================================================== driver
#: torch's messages for tensors on different devices
_DEVICE_ERROR = re.compile(
    r"same device|Expected .*device|device type|to be on .*(cuda|cpu)", re.IGNORECASE
)


def _wrap_device_error(exc: BaseException, device: str) -> BaseException:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UnsupportedInputError(
        f"loss_fn failed on {device}: {type(exc).__name__}: {first}. gradcheck moves "
        "the model and the tensors inside batch (dicts, lists, tuples) to each "
        "device; a tensor loss_fn takes from elsewhere (a closure, a global) stays "
        "where it is. Pass it in batch, or create it on the device of the model's "
        "parameters."
    )


class TorchDriver(Driver):
    framework = "torch"
    switch = "torch.use_deterministic_algorithms(True)"

    def __init__(self, loss_fn: Callable[..., Any], model: Any, batch: Any):
        self.torch = torch
        self.loss_fn = loss_fn
        self.model = model
        self.batch = batch
        self.evaluations = 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise NothingToDifferentiateError(
                "the model has no parameter that requires grad: nothing to compare "
                "across devices."
            )
        meta = [n for n, p in named if p.device.type == "meta"]
        if meta:
            raise UnsupportedInputError(
                f"parameters {meta[:4]} are on the 'meta' device (no values): "
                "materialise the model (to_empty + load weights) before checking."
            )
        bad = [n for n, p in named if not p.is_floating_point()]
        if bad:
            raise UnsupportedInputError(f"parameters {bad[:4]} are not floating point.")
        self.names = [n for n, _ in named]
        self.dtypes = {n: tl.canonical_dtype(p.dtype) for n, p in named}
        # state to restore
        self._rng_cpu = torch.get_rng_state()
        self._cuda_was_initialized = (
            torch.cuda.is_available() and torch.cuda.is_initialized()
        )
        self._rng_cuda = (
            torch.cuda.get_rng_state_all() if self._cuda_was_initialized else None
        )
        self._np = np.random.get_state()
        self._py = random.getstate()
        self._grad = torch.is_grad_enabled()
        self._det = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )

    # -- evaluation ------------------------------------------------------------
    def _copy(self, device: str) -> Any:
        try:
            model = copy.deepcopy(self.model)
        except Exception as exc:
            raise UnsupportedInputError(
                f"the model cannot be deep-copied ({type(exc).__name__}: "
                f"{str(exc)[:160]}); gradcheck copies it to each device so the "
                "user's module is never moved. Remove un-copyable attributes "
                "(open files, locks, hooks holding them)."
            ) from exc
        return model.to(device)

    def _move(self, obj: Any, device: str) -> Any:
        torch = self.torch
        if isinstance(obj, torch.Tensor):
            moved = obj.detach().to(device, copy=True)
            if obj.requires_grad and moved.is_floating_point():
                moved.requires_grad_(True)
            return moved
        if isinstance(obj, dict):
            items = [(k, self._move(v, device)) for k, v in obj.items()]
            try:
                return type(obj)(items)
            except TypeError:
                return dict(items)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(self._move(v, device) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._move(v, device) for v in obj)
        return obj

    def evaluate(self, device: str) -> Evaluation:
        torch = self.torch
        model = self._copy(device)
        batch = self._move(self.batch, device)
        params = dict(model.named_parameters())
        sources = [params[n] for n in self.names]
        self.evaluations += 1
        try:
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                _torch_logging(torch) as log,
            ):
                loss = self.loss_fn(model, batch)
                check_loss(loss)
                if loss.requires_grad:
                    grads = torch.autograd.grad(
                        loss.reshape(()), sources, allow_unused=True
                    )
                else:
                    grads = (None,) * len(sources)
        except RuntimeError as exc:
            if _DEVICE_ERROR.search(str(exc)):
                raise _wrap_device_error(exc, device) from exc
            raise
        value = float(loss.detach().to("cpu", torch.float64))
        arrays = {
            n: None
            if g is None
            else np.array(g.detach().to("cpu", torch.float64).numpy(), copy=True)
            for n, g in zip(self.names, grads, strict=True)
        }
        return Evaluation(value, arrays, log)

    # -- RNG ---------------------------------------------------------------------
    def _cuda_index(self, device: str) -> int | None:
        return dv._gpu_index(device) if dv.is_gpu(device) else None

    def seed(self, device: str, seed: int) -> None:
        torch = self.torch
        torch.random.default_generator.manual_seed(seed)
        index = self._cuda_index(device)
        if index is not None:
            torch.cuda.init()
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)

    def rng_snapshot(self, device: str) -> Any:
        torch = self.torch
        index = self._cuda_index(device)
        cuda = None if index is None else (index, torch.cuda.get_rng_state(index))
        return (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def rng_reset(self, snapshot: Any) -> None:
        cpu, cuda, np_state, py_state = snapshot
        self.torch.set_rng_state(cpu)
        if cuda is not None:
            self.torch.cuda.set_rng_state(cuda[1], cuda[0])
        np.random.set_state(np_state)
        random.setstate(py_state)

    # -- switches ------------------------------------------------------------------
    def _set_deterministic(self, mode: bool, warn_only: bool) -> None:
        setter = getattr(self.torch._C, "_set_deterministic_algorithms", None)
        if setter is not None:  # leaves torch._inductor.config alone
            setter(mode, warn_only=warn_only)
        else:  # pragma: no cover - older torch
            self.torch.use_deterministic_algorithms(mode, warn_only=warn_only)

    def probe(self, device: str, snapshot: Any) -> tuple[list[str], bool | None]:
        flagged: list[str] = []
        results: list[Evaluation] = []
        try:
            self._set_deterministic(True, warn_only=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(2):
                    self.rng_reset(snapshot)
                    try:
                        results.append(self.evaluate(device))
                    except RuntimeError as exc:  # a kernel that refuses outright
                        flagged.extend(_torch_flagged(str(exc)))
                        break
            for w in caught:
                flagged.extend(_torch_flagged(str(w.message)))
        finally:
            self._set_deterministic(*self._det)
        flagged = list(dict.fromkeys(flagged))
        agrees = same(results[0], results[1]) if len(results) == 2 else None
        return flagged, agrees

    @contextlib.contextmanager
    def tf32_off(self) -> Iterator[None]:
        with tf32_off_switches(self.torch):
            yield

    def restore(self) -> None:
        torch = self.torch
        self._set_deterministic(*self._det)
        torch.set_grad_enabled(self._grad)
        torch.set_rng_state(self._rng_cpu)
        if self._rng_cuda is not None:
            torch.cuda.set_rng_state_all(self._rng_cuda)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            # CUDA started during the check: put every generator back to its
            # fresh state (seeded with the seed it was initialised with)
            for index in range(torch.cuda.device_count()):
                gen = torch.cuda.default_generators[index]
                gen.manual_seed(gen.initial_seed())
        np.random.set_state(self._np)
        random.setstate(self._py)


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
