"""The training-step property's PyTorch side: what the user's model, scaler and
autocast are, the sandbox the user's callables run in, and the two sides (each
loss's own gradient by ``torch.autograd.grad``; the ``.grad`` ``step_fn`` leaves).
See :mod:`gradcheck.properties.training_step` for the property itself.

Sandbox: the torch backend's ``_State`` snapshots parameters' storage, ``.grad``,
``requires_grad``, train/eval flags, buffers, grad mode and RNG; on top of it every
call gets fresh clones of the parameters and buffers, the ``GradScaler``'s
attributes are swapped for copies, and an optimizer whose ``step()`` runs inside
``step_fn`` is switched, by a global step pre-hook, to a copy of its state at that
moment."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradcheck.backends.base import TensorSpec
from gradcheck.backends.torch import TorchSession, _State, _to_numpy
from gradcheck.errors import (
    InvalidArgumentError,
    NonFiniteError,
    NothingToDifferentiateError,
    UnsupportedInputError,
)
from gradcheck.numeric import tolerance as tl

__all__ = [
    "Sandbox",
    "autocast_dtype",
    "batchnorm_in_train_mode",
    "check_model",
    "check_scaler",
    "device_type",
    "loss_and_grads",
    "step_grads",
    "trainable",
]


# ---------------------------------------------------------------------- inputs
def check_model(model: Any) -> None:
    """Raise unless ``model`` is a torch.nn.Module with data to train."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedInputError(
            f"model must be a torch.nn.Module (the module whose parameters step_fn "
            f"trains); got {type(model).__name__}."
        )
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise UnsupportedInputError(
            f"{', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''} "
            "live on the 'meta' device, which has no data: nothing to train or "
            "check. Materialise the model first (model.to_empty(device='cpu') and "
            "load or initialise its weights)."
        )


def check_scaler(scaler: Any) -> None:
    """Raise unless ``scaler`` is None or a torch.amp.GradScaler."""
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise UnsupportedInputError(
            f"scaler must be a torch.amp.GradScaler (the one step_fn uses) or None; "
            f"got {type(scaler).__name__}."
        )


def autocast_dtype(autocast: Any) -> Any:
    """The dtype of the torch.autocast ``step_fn`` runs under (None: none)."""
    if autocast is None:
        return None
    if isinstance(autocast, str):
        autocast = getattr(torch, tl.canonical_dtype(autocast), None)
    if autocast not in (torch.bfloat16, torch.float16):
        raise InvalidArgumentError(
            f"autocast must be None, torch.bfloat16 or torch.float16 (the dtype of the "
            f"torch.autocast step_fn runs under); got {autocast!r}."
        )
    return autocast


def trainable(model: Any) -> tuple[list[tuple[str, Any]], list[TensorSpec]]:
    """The trainable floating-point parameters, named, with their specs."""
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and p.is_floating_point()
    ]
    if not named:
        raise NothingToDifferentiateError(
            f"{type(model).__name__} has no floating-point parameter that requires grad: "
            "there is no gradient for a training step to leave."
        )
    specs = [TorchSession._spec(n, p, "parameter") for n, p in named]
    for spec in specs:
        if spec.dtype not in tl.GRADIENT_ROUNDING:
            raise UnsupportedInputError(
                f"'{spec.name}' has dtype {spec.dtype}, which gradcheck does not check."
            )
    return named, specs


# ---------------------------------------------------------------------- sandbox
class Sandbox:
    """Runs the user's callables on working copies of everything they could change.

    ``fresh()`` before each call: parameters and buffers become clones of the
    originals (``.grad`` None: gradcheck's zero_grad, so stale gradients cannot
    hide an accumulation bug), train/eval flags, ``requires_grad`` and the RNG go back
    to the user's, the scaler gets copies of its attributes, optimizers go back to
    their original state. An optimizer is switched to a deep copy of its state (the
    parameters themselves excluded) the first time its ``step()`` runs in a call:
    a global step pre-hook, limited to this thread, sees every
    ``torch.optim.Optimizer`` without the user having to name it. ``restore()``
    puts back the original objects, which no call ever wrote.
    """

    def __init__(self, model: Any, scaler: Any):
        self.torch = torch
        self.state = _State([model], list(model.parameters()))
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.scaler = scaler
        self.scaler_saved = None if scaler is None else dict(scaler.__dict__)
        self.optimizers: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.active: set[int] = set()
        self.stepped: list[str] = []
        self.thread = threading.get_ident()
        self.hook = register_optimizer_step_pre_hook(self._on_step)

    def fresh(self, *, reset_rng: bool = True) -> None:
        st = self.state
        self._put_back_optimizers()
        self.active.clear()
        for p, data, req, _ in st.params:
            p.data = data.clone()
            if p.requires_grad != req:
                p.requires_grad_(req)
            p.grad = None
        for m, name, buf in st.buffers:
            m._buffers[name] = None if buf is None else buf.clone()
        for m, flag in st.training:
            m.training = flag
        if reset_rng:
            self.torch.set_rng_state(st.rng_cpu)
            if st.rng_cuda is not None:
                self.torch.cuda.set_rng_state_all(st.rng_cuda)
            np.random.set_state(st.rng_np)
            random.setstate(st.rng_py)
        if self.scaler is not None:
            work = {
                k: (
                    v.clone()
                    if isinstance(v, self.torch.Tensor)
                    else copy.deepcopy(v)
                    if isinstance(v, (dict, list))
                    else v
                )
                for k, v in self.scaler_saved.items()
            }
            _set_dict(self.scaler, work)

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != self.thread:
            return None
        key = id(optimizer)
        if key not in self.optimizers:
            self.optimizers[key] = (optimizer, dict(optimizer.__dict__))
        if key in self.active:  # a second step() in the same call keeps its copy
            return None
        self.active.add(key)
        self.stepped.append(type(optimizer).__name__)
        saved = self.optimizers[key][1]
        # deepcopy with the parameters pre-seeded in the memo: state keyed by the
        # Parameter objects and param_groups listing them keep the very same objects
        memo = {
            id(p): p for g in saved.get("param_groups", ()) for p in g.get("params", ())
        }
        work = {}
        for k, v in saved.items():
            if k in ("state", "param_groups"):
                work[k] = copy.deepcopy(v, memo)
            elif isinstance(v, (dict, list, set)):
                work[k] = copy.copy(v)  # hook registries: new container, same hooks
            else:
                work[k] = v
        _set_dict(optimizer, work)
        return None

    def _put_back_optimizers(self) -> None:
        for optimizer, saved in self.optimizers.values():
            _set_dict(optimizer, dict(saved))

    def params_rewritten(self) -> list[str]:
        """Names of parameters whose working copy step_fn changed."""
        return [
            self.names[id(p)]
            for p, data, _, _ in self.state.params
            if p.data.shape != data.shape or not self.torch.equal(p.data, data)
        ]

    def restore(self) -> None:
        try:
            self.hook.remove()
            self._put_back_optimizers()
            if self.scaler is not None:
                _set_dict(self.scaler, dict(self.scaler_saved))
        finally:
            self.state.restore()


def _set_dict(obj: Any, values: dict[str, Any]) -> None:
    d = obj.__dict__
    d.clear()
    d.update(values)


# ---------------------------------------------------------------------- the two sides
def loss_and_grads(
    fn: Callable[[], Any],
    name: str,
    params: list[Any],
    specs: Sequence[TensorSpec],
    device_type: str,
    amp: Any,
) -> tuple[float, list[np.ndarray | None]]:
    label = f"loss_fns[{name!r}]"
    ctx = (
        torch.autocast(device_type, dtype=amp)
        if amp is not None
        else contextlib.nullcontext()
    )
    with torch.enable_grad(), ctx:
        raw = fn()
    if (
        not isinstance(raw, torch.Tensor)
        or not raw.is_floating_point()
        or raw.numel() != 1
    ):
        shape = list(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise UnsupportedInputError(
            f"{label} must return a scalar floating tensor (that head's loss over the "
            f"whole batch); got {shape}. Reduce it (mean/sum) as your training code does."
        )
    value = float(raw.detach().double().cpu())
    if not math.isfinite(value):
        raise NonFiniteError(
            f"loss '{name}' is {value} at the point to check. A loss must be finite to "
            "have a gradient: look for log(0), 0/0 or overflow in it."
        )
    if raw.requires_grad:
        found = torch.autograd.grad(raw.reshape(()), params, allow_unused=True)
    else:
        found = (None,) * len(params)
    out = [None if g is None else _to_numpy(_dense(g)) for g in found]
    for spec, g in zip(specs, out, strict=True):
        if g is not None and not np.isfinite(g).all():
            raise NonFiniteError(
                f"the gradient of loss '{name}' for '{spec.name}' has "
                f"{int((~np.isfinite(g)).sum())} NaN/Inf elements of {g.size} while "
                "the loss is finite: the backward pass overflows or divides by zero."
            )
    return value, out


def step_grads(
    step_fn: Callable[[], Any], named: list[tuple[str, Any]]
) -> list[np.ndarray | None]:
    with torch.enable_grad():
        step_fn()
    out: list[np.ndarray | None] = []
    for name, p in named:
        g = p.grad
        if g is None:
            out.append(None)
            continue
        if tuple(g.shape) != tuple(p.shape):
            raise UnsupportedInputError(
                f"after step_fn, '{name}'.grad has shape {list(g.shape)}, not the "
                f"parameter's {list(p.shape)}."
            )
        out.append(_to_numpy(_dense(g)))
    return out


def _dense(g: Any) -> Any:
    # nn.Embedding(sparse=True) leaves a sparse .grad
    return g if g.layout == torch.strided else g.to_dense()


def device_type(named: list[tuple[str, Any]]) -> str:
    """The device type ("cpu", "cuda") of the first trainable parameter."""
    return next(p for _, p in named).device.type


# ---------------------------------------------------------------------- diagnoses
def batchnorm_in_train_mode(model: Any) -> bool:
    """Whether ``model`` has a BatchNorm layer in train mode."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    return any(isinstance(m, bn) and m.training for m in model.modules())
