"""The variants property's PyTorch driver: one model's gradients under
``torch.compile``, autocast and on other devices, evaluated on deep copies of the
model (the user's module, its ``.grad`` and buffers are never touched). See
:mod:`gradcheck.properties.variants` for what is compared and the tolerance."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gradcheck import devices as dv
from gradcheck.backends.torch_devices import TorchDriver, check_loss
from gradcheck.errors import UnsupportedInputError

__all__ = ["TorchVariantDriver", "driver", "owns"]

FRAMEWORK = "torch"

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def owns(model: Any) -> bool:
    return isinstance(model, torch.nn.Module)


def driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> TorchVariantDriver:
    return TorchVariantDriver(loss_fn, model, batch)


def _floating(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every floating tensor inside (dicts, lists,
    tuples, namedtuples); other leaves as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        items = [(k, _floating(v, fn)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_floating(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_floating(v, fn) for v in obj)
    return obj


class TorchVariantDriver(TorchDriver):
    """Evaluates ``loss_fn(model_copy, batch_copy)`` under a variant; keeps and
    restores the user's state like the devices driver (RNG, grad mode, switches)."""

    def __init__(self, loss_fn: Callable[..., Any], model: Any, batch: Any):
        super().__init__(loss_fn, model, batch)
        first = next(p for p in model.parameters() if p.requires_grad)
        self.home = str(first.device)

    # -- what can run here ---------------------------------------------------------
    #: the reference of a float32 model is eager float64 (a float64 copy)
    reference_float64 = True

    def supported(self, variant: Any) -> None:
        """Raise UnsupportedInputError for a variant torch has no form of."""
        if variant.xla:
            raise UnsupportedInputError(
                f"variant '{variant.name}': 'xla' is TensorFlow's jit_compile; for a "
                "torch model use 'compile'."
            )

    def unavailable(self, variant: Any) -> str | None:
        """Why the variant cannot run on this machine (None: it can)."""
        device, autocast = variant.device, variant.autocast
        compiled = variant.compiled
        if device is not None and dv.is_gpu(device):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = dv._gpu_index(device)
            if count == 0:
                why = (
                    f"this torch ({torch.__version__}) is a CPU-only build"
                    if getattr(torch.version, "cuda", None) is None
                    else "torch.cuda.is_available() is False"
                )
                return f"{device} needs a GPU and torch sees none: {why}."
            if index >= count:
                return f"{device} asked for, but torch sees {count} GPU(s)."
        where = self._device_type(device)
        if autocast is not None:
            dtype = _AUTOCAST_DTYPES[autocast]
            is_available = getattr(torch.amp, "is_autocast_available", None)
            if is_available is not None and not is_available(where):
                return f"torch {torch.__version__} has no autocast on {where}."
            try:
                with torch.autocast(where, dtype=dtype):
                    a = torch.ones(2, 2, device=device or self.home)
                    (a @ a).sum()
            except Exception as exc:
                return (
                    f"torch {torch.__version__} does not support autocast to "
                    f"{autocast} on {where}: {type(exc).__name__}: {str(exc)[:160]}"
                )
        if compiled and not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile."
        return None

    def _device_type(self, device: str | None) -> str:
        return torch.device(device or self.home).type

    # -- evaluation ----------------------------------------------------------------
    def gradients(
        self,
        *,
        device: str | None = None,
        autocast: str | None = None,
        compiled: bool = False,
        xla: bool = False,
        perturb: tuple[int, float] | None = None,
        float64: bool = False,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Gradient of every trainable parameter of a fresh copy of the model, as
        float64 NumPy arrays (None: not connected), with the loss and timings.

        ``perturb=(seed, relative)``: every floating parameter and batch tensor is
        moved to ``x * (1 + relative * u)``, u uniform in [-1, 1] (NumPy generator
        of that seed: no global RNG drawn). ``float64``: model and batch in float64
        (the reference). ``compiled``: ``torch.compile(loss_fn)`` (default
        backend), called twice; the compile time is the first call's extra time plus the
        compiler's import and resets."""
        target = device or self.home
        model = self._copy(target)
        batch = self._move(self.batch, target)
        if float64:
            model = model.double()
            batch = _floating(batch, lambda t: t.double())
        if perturb is not None:
            rng = np.random.default_rng(perturb[0])

            def move(t: Any) -> Any:
                u = torch.from_numpy(rng.uniform(-1.0, 1.0, tuple(t.shape)))
                u = u.to(device=t.device, dtype=torch.float64)
                moved = (t.detach().double() * (1.0 + perturb[1] * u)).to(t.dtype)
                return moved.requires_grad_(t.requires_grad)

            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.copy_(move(p))
            batch = _floating(batch, move)
        params = dict(model.named_parameters())
        sources = [params[n] for n in self.names]
        fn = self.loss_fn
        setup = time.perf_counter()
        if compiled:  # the compiler's import and reset count as compile time
            _dynamo_reset()
            fn = torch.compile(self.loss_fn)
        calls = 2 if compiled else 1
        overhead = time.perf_counter() - setup
        seconds: list[float] = []
        grads: Any = None
        loss: Any = None
        for _ in range(calls):
            self.seed(target, seed)
            started = time.perf_counter()
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                self._autocast(target, autocast),
                _fallback_random(compiled),
            ):
                loss = fn(model, batch)
                check_loss(loss)
                if loss.requires_grad:
                    grads = torch.autograd.grad(
                        loss.reshape(()), sources, allow_unused=True
                    )
                else:
                    grads = (None,) * len(sources)
            if target != "cpu" and dv.is_gpu(target):
                torch.cuda.synchronize(target)
            seconds.append(time.perf_counter() - started)
            self.evaluations += 1
        teardown = time.perf_counter()
        if compiled:
            _dynamo_reset()
        overhead += time.perf_counter() - teardown
        arrays = {
            n: None
            if g is None
            else np.array(g.detach().to("cpu", torch.float64).numpy(), copy=True)
            for n, g in zip(self.names, grads, strict=True)
        }
        return {
            "loss": float(loss.detach().to("cpu", torch.float64)),
            "grads": arrays,
            "seconds": seconds[-1],
            "compile_seconds": overhead + max(0.0, seconds[0] - seconds[-1])
            if compiled
            else 0.0,
        }

    @contextlib.contextmanager
    def _autocast(self, device: str, dtype: str | None) -> Iterator[None]:
        if dtype is None:
            yield
            return
        with torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[dtype]):
            yield

    def precision(self) -> str:
        """The model's floating dtype (the widest of its trainable parameters)."""
        order = ["float16", "bfloat16", "float32", "float64"]
        known = [d for d in self.dtypes.values() if d in order]
        return max(known, key=order.index) if known else "float32"


def _dynamo_reset() -> None:
    """Forget compiled graphs (each variant compiles a fresh copy's loss_fn)."""
    import torch._dynamo as dynamo

    dynamo.reset()


@contextlib.contextmanager
def _fallback_random(compiled: bool) -> Iterator[None]:
    """Inductor draws random numbers with its own generator; with fallback_random
    it calls the eager ops, so dropout draws what eager draws from the same seed."""
    if not compiled:
        yield
        return
    try:
        from torch._inductor import config
    except Exception:  # pragma: no cover - inductor missing
        yield
        return
    with config.patch(fallback_random=True):
        yield
