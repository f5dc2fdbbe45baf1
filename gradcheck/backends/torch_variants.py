"""The PyTorch driver of check_variants and check_devices: one model's gradients
under ``torch.compile``, autocast and on any device, evaluated on deep copies of
the model (the user's module, its ``.grad`` and buffers are never touched), with
the op log of every eager evaluation, the TF32 and determinism switches, and the
user's global state (RNGs, grad mode, switches) put back at the end. See
:mod:`gradcheck.properties.variants` for what is compared and the tolerance."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gradcheck import devices as dv
from gradcheck.backends import torch_devices as td
from gradcheck.backends.variants_base import Driver, Evaluation, assemble, same
from gradcheck.errors import NothingToDifferentiateError, UnsupportedInputError
from gradcheck.numeric import tolerance as tl

__all__ = ["TorchVariantDriver", "driver", "owns", "placement"]

FRAMEWORK = "torch"

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def owns(model: Any) -> bool:
    return isinstance(model, torch.nn.Module)


def driver(loss_fn: Callable[..., Any], model: Any, batch: Any) -> TorchVariantDriver:
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.layers.Layer):
        raise UnsupportedInputError(
            "a Keras model on the torch backend cannot be copied to another "
            "device by gradcheck; check it with KERAS_BACKEND=tensorflow, or "
            "check the equivalent torch.nn.Module."
        )
    return TorchVariantDriver(loss_fn, model, batch)


@contextlib.contextmanager
def placement(device: str) -> Iterator[str]:
    """Where an evaluation named ``device`` computes: the block runs with that
    device current (``torch.cuda.device`` for a GPU, so a tensor loss_fn creates
    with ``device="cuda"`` lands there) and gets the torch device to copy the
    model and batch to. The one seam between a device's name and the hardware:
    the tests patch it (with :func:`gpu_available`) to run a GPU variant's whole
    path on the CPU, with a device-only bug of their own."""
    if dv.known_gpu(device):
        with torch.cuda.device(dv._gpu_index(device)):
            yield device
    else:
        yield device  # "cpu", or a device gradcheck does not know ("mps")


def gpu_available(device: str) -> str | None:
    """Why the GPU ``device`` cannot be used here (None: it can)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (
            f"this torch ({torch.__version__}) is a CPU-only build"
            if getattr(torch.version, "cuda", None) is None
            else "torch.cuda.is_available() is False (no NVIDIA driver or GPU "
            "visible; check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
        return f"{device} needs a GPU and torch sees none: {why}."
    if dv._gpu_index(device) >= count:
        return (
            f"{device} asked for, but torch sees {count} GPU(s) (indices count "
            "from 0 among the visible GPUs, after CUDA_VISIBLE_DEVICES)."
        )
    return None


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


class TorchVariantDriver(Driver):
    """Evaluates ``loss_fn(model_copy, batch_copy)`` under a variant; keeps and
    restores the user's state (RNGs, grad mode, determinism and TF32 switches)."""

    framework = "torch"
    switch = "torch.use_deterministic_algorithms(True)"
    #: the reference of a float32 (or half) model is eager float64 (a float64 copy)
    reference_float64 = True

    def __init__(self, loss_fn: Callable[..., Any], model: Any, batch: Any):
        self.loss_fn = loss_fn
        self.model = model
        self.batch = batch
        self.evaluations = 0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise NothingToDifferentiateError(
                "the model has no parameter that requires grad: nothing to compare."
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
        self.home = str(named[0][1].device)
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
        self._det = td.deterministic_state()

    # -- what can run here ---------------------------------------------------------
    def supported(self, variant: Any) -> None:
        if variant.xla:
            raise UnsupportedInputError(
                f"variant '{variant.name}': 'xla' is TensorFlow's jit_compile; for a "
                "torch model use 'compile'."
            )

    def unavailable(self, variant: Any) -> str | None:
        device = dv.canonical("torch", variant.device or self.home)
        if dv.known_gpu(device):
            why = gpu_available(device)
            if why is not None:
                return why
        if variant.autocast is not None:
            with placement(device) as target:
                where = torch.device(target).type
                is_available = getattr(torch.amp, "is_autocast_available", None)
                if is_available is not None and not is_available(where):
                    return f"torch {torch.__version__} has no autocast on {where}."
                try:
                    with torch.autocast(
                        where, dtype=_AUTOCAST_DTYPES[variant.autocast]
                    ):
                        a = torch.ones(2, 2, device=target)
                        (a @ a).sum()
                except Exception as exc:
                    return (
                        f"torch {torch.__version__} does not support autocast to "
                        f"{variant.autocast} on {where}: {type(exc).__name__}: "
                        f"{str(exc)[:160]}"
                    )
        if variant.compiled and not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile."
        return None

    def precision(self) -> str:
        order = ["float16", "bfloat16", "float32", "float64"]
        known = [d for d in self.dtypes.values() if d in order]
        return max(known, key=order.index) if known else "float32"

    # -- RNG -------------------------------------------------------------------------
    def _seed(self, target: str, seed: int) -> None:
        """Every generator loss_fn may draw from, reset before each evaluation:
        torch's CPU generator and the device's (seeded), NumPy's and Python's
        (back to their state at the start of the check). Dropout then draws the
        same mask in every evaluation on one device."""
        torch.random.default_generator.manual_seed(seed)
        if dv.known_gpu(target):
            torch.cuda.init()
            with torch.cuda.device(dv._gpu_index(target)):
                torch.cuda.manual_seed(seed)
        np.random.set_state(self._np)
        random.setstate(self._py)

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, how: Evaluation) -> dict[str, Any]:
        """See :meth:`Driver.gradients`. ``compiled``: ``torch.compile(loss_fn)``
        (default backend), called twice; the compile time is the first call's
        extra time plus the compiler's import and resets. ``float64``: model and
        batch in float64 (the reference)."""
        name = dv.canonical("torch", how.device or self.home)
        switches = contextlib.nullcontext() if how.tf32 else self.tf32_off()
        with placement(name) as target, switches:
            return self._gradients(name, target, how)

    def _gradients(self, name: str, target: str, how: Evaluation) -> dict[str, Any]:
        model = td.copy_model(self.model, target)
        batch = td.move(self.batch, target)
        if how.float64:
            model = model.double()
            batch = _floating(batch, lambda t: t.double())
        if how.perturb is not None:
            _perturb(model, how.perturb)
            batch = _floating(batch, _mover(how.perturb))
        params = dict(model.named_parameters())
        sources = [params[n] for n in self.names]
        fn = self.loss_fn
        setup = time.perf_counter()
        if how.compiled:  # the compiler's import and reset count as compile time
            _dynamo_reset()
            fn = torch.compile(self.loss_fn)
        overhead = time.perf_counter() - setup
        runs: list[dict[str, Any]] = []
        for _ in range(2 if (how.compiled or how.repeat) else 1):
            self._seed(target, how.seed)
            started = time.perf_counter()
            logging = contextlib.nullcontext() if how.compiled else td.op_logging()
            try:
                with (
                    torch.inference_mode(False),
                    torch.enable_grad(),
                    self._autocast(target, how.autocast),
                    _fallback_random(how.compiled),
                    logging as log,
                ):
                    loss = fn(model, batch)
                    td.check_loss(loss)
                    hooks = _magnitude_hooks(loss, how.seed) if how.magnitude else []
                    if loss.requires_grad:
                        grads = torch.autograd.grad(
                            loss.reshape(()) * how.loss_scale
                            if how.loss_scale != 1.0
                            else loss.reshape(()),
                            sources,
                            allow_unused=True,
                        )
                    else:
                        grads = (None,) * len(sources)
                    for h in hooks:
                        h.remove()
            except RuntimeError as exc:
                clear = td.device_error(exc, name)
                if clear is not None:
                    raise clear from exc
                raise
            if dv.known_gpu(target):
                torch.cuda.synchronize(target)
            self.evaluations += 1
            runs.append(
                {
                    "loss": float(loss.detach().to("cpu", torch.float64)),
                    "grads": {
                        n: None
                        if g is None
                        else np.array(
                            g.detach().to("cpu", torch.float64).numpy(), copy=True
                        )
                        / how.loss_scale
                        for n, g in zip(self.names, grads, strict=True)
                    },
                    "seconds": time.perf_counter() - started,
                    "log": log,
                }
            )
        teardown = time.perf_counter()
        if how.compiled:
            _dynamo_reset()
        overhead += time.perf_counter() - teardown
        return assemble(runs, compiled=how.compiled, setup=overhead)

    @contextlib.contextmanager
    def _autocast(self, device: str, dtype: str | None) -> Iterator[None]:
        if dtype is None:
            yield
            return
        with torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[dtype]):
            yield

    # -- switches ----------------------------------------------------------------------
    def probe(self, **kw: Any) -> tuple[list[str], bool | None]:
        flagged: list[str] = []
        results: list[dict[str, Any]] = []
        with td.deterministic_warnings(flagged):
            for _ in range(2):
                results.append(self.gradients(**kw))
        flagged = list(dict.fromkeys(flagged))
        agrees = same(results[0], results[1]) if len(results) == 2 else None
        return flagged, agrees

    @contextlib.contextmanager
    def tf32_off(self) -> Iterator[None]:
        with td.tf32_off_switches(torch):
            yield

    def restore(self) -> None:
        td.set_deterministic(*self._det)
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


def _mover(perturb: tuple[int, float]) -> Callable[[Any], Any]:
    """``x -> x (1 + r u)``, u uniform in [-1, 1] from a NumPy generator of the
    given seed (no global RNG drawn), r the relative move but at least one ulp of
    the tensor's own dtype: a float16 tensor inside a float32 model moves too."""
    rng = np.random.default_rng(perturb[0])

    def move(t: Any) -> Any:
        relative = max(perturb[1], tl.eps(t.dtype))
        u = torch.from_numpy(rng.uniform(-1.0, 1.0, tuple(t.shape)))
        u = u.to(device=t.device, dtype=torch.float64)
        moved = (t.detach().double() * (1.0 + relative * u)).to(t.dtype)
        return moved.requires_grad_(t.requires_grad)

    return move


def _perturb(model: Any, perturb: tuple[int, float]) -> None:
    move = _mover(perturb)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(move(p))


def _magnitude_hooks(loss: Any, seed: int) -> list[Any]:
    """Pre-hooks on every node of ``loss``'s backward graph that replace each
    incoming cotangent ``g`` by ``|g| * xi``, xi random signs (a generator of
    its own, seeded: no global RNG drawn). What reaches a parameter is then
    J^T(|g| xi) at every step: the size of the terms its gradient sums, none of
    their cancellation - the scale at which a low precision rounds them
    (an L1 penalty's +-c cotangents that cancel, a small head's share absorbed
    into them). Returns the handles (removed after the backward)."""
    if loss.grad_fn is None:
        return []
    gen = torch.Generator(device=loss.device).manual_seed(seed + 7919)

    def hook(grad_outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        out = []
        for g in grad_outputs:
            if g is None or not g.is_floating_point():
                out.append(g)
                continue
            signs = torch.randint(0, 2, g.shape, generator=gen, device=g.device)
            out.append(g.abs() * (2 * signs - 1).to(g.dtype))
        return tuple(out)

    handles, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ != "AccumulateGrad":
            handles.append(node.register_prehook(hook))
        todo.extend(n for n, _ in node.next_functions)
    return handles


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
