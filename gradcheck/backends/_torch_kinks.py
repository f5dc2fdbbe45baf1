"""Kink census for PyTorch: how many units sit exactly on a kink at the point.

A piecewise-linear activation (ReLU, ReLU6/hardtanh, clamp, hardswish, leaky ReLU,
threshold, abs, maximum/minimum ties) is not differentiable where its input equals
a breakpoint. One such unit makes the one-sided derivatives differ; many at once
(a fresh init whose activations vanish, BatchNorm's zero bias feeding ReLU6) make
any finite-difference verdict at that point meaningless. The census runs one
forward pass in the user's precision with a TorchFunctionMode that counts, per
module, the inputs exactly at a breakpoint, so a verdict can say how many and where.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _breakpoints(func: Callable, args: tuple, kwargs: dict) -> list[Any] | None:
    """The breakpoints of ``func`` applied to its first argument, or None."""
    if func in (F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_):
        return [0.0]
    if func in (F.leaky_relu, torch.abs, torch.Tensor.abs):
        return [0.0]
    if func is F.relu6:
        return [0.0, 6.0]
    if func is F.hardtanh:
        return [
            _arg(args, kwargs, 1, "min_val", -1.0),
            _arg(args, kwargs, 2, "max_val", 1.0),
        ]
    if func in (F.hardswish, F.hardsigmoid):
        return [-3.0, 3.0]
    if func is F.threshold:
        return [_arg(args, kwargs, 1, "threshold", 0.0)]
    if func in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip):
        bounds = [
            _arg(args, kwargs, 1, "min", None),
            _arg(args, kwargs, 2, "max", None),
        ]
        return [b for b in bounds if b is not None]
    return None


class _ModuleStack(torch.overrides.TorchFunctionMode):
    """A TorchFunctionMode that knows the innermost module running (by name), from
    global forward pre/post hooks installed for the block only."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.stack: list[str] = []
        self._hooks: list[Any] = []

    def __enter__(self):
        def pre(module, _inputs):
            self.stack.append(self.names.get(id(module), type(module).__name__))

        def post(_module, _inputs, _output):
            if self.stack:
                self.stack.pop()

        reg = torch.nn.modules.module
        self._hooks = [
            reg.register_module_forward_pre_hook(pre),
            reg.register_module_forward_hook(post),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        super().__exit__(*exc)

    @property
    def where(self) -> str:
        return self.stack[-1] if self.stack else "fn"


class _Census(_ModuleStack):
    """Counts of units found in some state, out of the units looked at, keyed by
    the innermost module: (module, count, units) rows."""

    def __init__(self, names: dict[int, str]):
        super().__init__(names)
        self.counts: dict[str, list[int]] = {}

    def _add(self, n: int, size: int) -> None:
        if n == 0:
            return
        row = self.counts.setdefault(self.where, [0, 0])
        row[0] += n
        row[1] += size

    def rows(self) -> list[tuple[str, int, int]]:
        return [(w, n, size) for w, (n, size) in self.counts.items()]


class KinkCensus(_Census):
    """Counts inputs exactly at a breakpoint, keyed by the innermost module."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        points = _breakpoints(func, args, kwargs)
        x = args[0] if args else kwargs.get("input")
        if points and isinstance(x, torch.Tensor) and x.is_floating_point():
            self._count(x, points)
        elif func in (torch.maximum, torch.minimum, torch.max, torch.min) and (
            len(args) == 2
            and all(isinstance(a, torch.Tensor) for a in args)
            and args[0].is_floating_point()
        ):
            try:
                self._add(int((args[0] == args[1]).sum()), max(a.numel() for a in args))
            except RuntimeError:
                pass  # shapes that do not broadcast: the op itself will say so
        return func(*args, **kwargs)

    def _count(self, x: torch.Tensor, points: Iterable[Any]) -> None:
        with torch.no_grad():
            on = torch.zeros((), dtype=torch.int64, device=x.device)
            for p in points:
                on = on + (x == p).sum()
        self._add(int(on), x.numel())


class FlatNorms(_Census):
    """Counts normalisation groups whose input has (near) zero variance, keyed by
    the innermost module: GroupNorm / LayerNorm / RMSNorm / InstanceNorm over an
    input of variance <= FLAT_VARIANCE x eps. There the normalisation's slope is
    1/sqrt(eps) (1e3 for eps = 1e-6) and it is linear only within ~sqrt(eps) of
    the input: NeuCodec's and XCodec2's decoders at a fresh init read the same
    latent at every frame (every quantizer code 0), their one-channel GroupNorm
    groups see variance exactly 0, and four of them in a row make gradients of
    1e17 around an output at rounding level, which no finite difference follows."""

    FLAT_VARIANCE = 1e-6

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            groups = self._groups(func, x, args, kwargs)
            if groups is not None:
                flat, eps = groups
                with torch.no_grad():
                    var = flat.double().var(-1, unbiased=False)
                    n = int((var <= self.FLAT_VARIANCE * eps).sum())
                self._add(n, var.numel())
        return func(*args, **kwargs)

    @staticmethod
    def _groups(
        func: Any, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, float] | None:
        """The input as (groups, values per group) and the op's eps, or None."""
        if func is F.group_norm:
            g = int(_arg(args, kwargs, 1, "num_groups", 1))
            eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
            return x.reshape(x.shape[0], g, -1).reshape(-1, x[0].numel() // g), eps
        if func in (F.layer_norm, getattr(F, "rms_norm", None)):
            shape = _arg(args, kwargs, 1, "normalized_shape", None)
            if shape is None:
                return None
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            eps = _arg(args, kwargs, 4 if func is F.layer_norm else 3, "eps", None)
            eps = 1e-5 if eps is None else float(eps)
            return x.reshape(-1, int(torch.tensor(x.shape[-k:]).prod())), eps
        if func is F.instance_norm and x.dim() > 2:
            eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
            return x.reshape(x.shape[0] * x.shape[1], -1), eps
        return None


def module_names(roots: Iterable[torch.nn.Module]) -> dict[int, str]:
    names: dict[int, str] = {}
    for root in roots:
        for name, m in root.named_modules():
            names.setdefault(id(m), name or type(m).__name__)
    return names


_ORDER = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


class LowPrecisionWatch(_ModuleStack):
    """Notes where a model computes below its own precision: a float64 model whose
    RMSNorm does ``hidden_states.to(torch.float32)`` (llama, qwen2, mistral), T5's
    variance, gemma's ``x.float()``. Its float64 gradient then carries float32
    rounding, and judging it at float64's would cry wolf. Records, per module, the
    ops whose floating result is of lower precision than ``dtype``."""

    def __init__(self, dtype: torch.dtype, names: dict[int, str]):
        super().__init__(names)
        self.level = _ORDER.get(dtype, 0)
        self.lowest: torch.dtype | None = None
        self.places: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            level = _ORDER.get(out.dtype, 3)
            if level < self.level:
                if self.lowest is None or level < _ORDER[self.lowest]:
                    self.lowest = out.dtype
                self.places[self.where] = self.places.get(self.where, 0) + 1
        return out


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", str(func))
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if owner is torch.Tensor or func in _TENSOR_METHODS:
        return f"Tensor.{name}"
    module = getattr(func, "__module__", "") or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


_TENSOR_METHODS = {
    getattr(torch.Tensor, n)
    for n in dir(torch.Tensor)
    if not n.startswith("__") and callable(getattr(torch.Tensor, n, None))
}


def _python_caller() -> tuple[str, str]:
    """The innermost Python function outside torch on the stack and its place:
    ('ViTMAEEmbeddings.random_masking', 'modeling_vit_mae.py:215')."""
    import os
    import sys

    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith((torch_dir, os.path.dirname(__file__))):
            place = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
            return getattr(code, "co_qualname", code.co_name), place
        frame = frame.f_back
    return "fn", ""


def _in_function_forward() -> bool:
    """Whether a custom autograd.Function's forward is running (torch runs it with
    grad disabled, on inputs that require grad: not a cut of fn's)."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "apply" and code.co_filename.endswith(
            ("autograd/function.py", "autograd\\function.py")
        ):
            return True
        frame = frame.f_back
    return False


def _python_callers(n: int) -> list[tuple[str, str]]:
    """The ``n`` innermost Python frames outside torch and gradcheck, innermost
    first: where a no_grad region was entered is one of them."""
    import os
    import sys

    torch_dir = os.path.dirname(torch.__file__)
    ours = os.path.dirname(os.path.dirname(__file__))  # the gradcheck package
    frame = sys._getframe(2)
    out: list[tuple[str, str]] = []
    while frame is not None and len(out) < n:
        code = frame.f_code
        if not code.co_filename.startswith((torch_dir, ours)):
            place = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
            out.append((getattr(code, "co_qualname", code.co_name), place))
        frame = frame.f_back
    return out


_DETACH = {torch.Tensor.detach, torch.Tensor.detach_, torch.detach}


class CallWatch(_ModuleStack):
    """What one call of fn does that a verdict may need to name (the first call
    at the point only):

    * ``random_ops``: the ops that draw from torch's CPU random number generator
      (its state moves across the op): ``torch.rand`` in ViT-MAE's
      ``random_masking``, dropout left in train mode; each evaluation of such a
      function sees other random numbers, hence other values;
    * ``detaches``: ``.detach()`` of a tensor that requires grad (FastSpeech2's
      pitch and energy predictors read a detached encoder output by design): the
      gradient stops there while the values still flow;
    * ``no_grad``: ops that read a tensor requiring grad while fn itself turned
      grad mode off (``with torch.no_grad():`` inside fn: PE-Audio's frozen DAC
      encoder): the first op of each such region. Recorded only when the call
      began with grad enabled (gradcheck's own no_grad evaluations are not fn's).

    Keys are "op in caller (file:line, module 'name')", values counts."""

    def __init__(self, names: dict[int, str]):
        super().__init__(names)
        self.random_ops: dict[str, int] = {}
        self.detaches: dict[str, int] = {}
        self.no_grad: dict[str, int] = {}
        self._grad_at_entry = True
        self._in_region = False

    def __enter__(self):
        self._grad_at_entry = torch.is_grad_enabled()
        return super().__enter__()

    def _no_grad_read(self, args: tuple, kwargs: dict) -> bool:
        if not self._grad_at_entry or torch.is_grad_enabled():
            return False
        if _in_function_forward():  # autograd.Function.forward runs grad-free
            return False
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return True
            if isinstance(a, (list, tuple)) and any(
                isinstance(b, torch.Tensor) and b.requires_grad for b in a
            ):
                return True
        return False

    def _key(self, func: Callable) -> str:
        caller, place = _python_caller()
        where = [place] if place else []
        if self.where != "fn":
            where.append(f"module '{self.where}'")
        return f"{_func_name(func)} in {caller}" + (
            f" ({', '.join(where)})" if where else ""
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DETACH:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                key = self._key(func)
                self.detaches[key] = self.detaches.get(key, 0) + 1
            return func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self._in_region = False
        elif not self._in_region and self._no_grad_read(args, kwargs or {}):
            # the first op of a no_grad region that reads a tensor requiring grad
            self._in_region = True
            outer = _python_callers(3)[1:]
            key = (
                "torch.no_grad() around "
                + self._key(func)
                + "".join(f", called from {c} ({p})" for c, p in outer)
            )
            self.no_grad[key] = self.no_grad.get(key, 0) + 1
        state = torch.get_rng_state()
        out = func(*args, **(kwargs or {}))
        if not torch.equal(state, torch.get_rng_state()):
            key = self._key(func)
            self.random_ops[key] = self.random_ops.get(key, 0) + 1
        return out


class PassDetach(torch.overrides.TorchFunctionMode):
    """A counterfactual for a mismatch that fn's detaches may explain: while
    active, ``.detach()`` / ``torch.detach`` of a tensor that requires grad
    returns an identity view that keeps the graph (same values, the gradient
    passes). A gradient taken under it is the derivative of the function fn
    computes, as if the model had not stopped the gradient there; when that one
    matches the finite differences, the detaches are the whole mismatch.
    ``detach_`` (in place) is left alone. ``passed`` counts the detaches made
    identities.

    A straight-through quantizer ``x + (q(x) - x).detach()`` computes q(x), whose
    derivative is q's. Passing the detach gives autograd's derivative of q, which
    is q's true one (0 between its steps: ``round`` has a zero gradient) except
    where q casts to an 8-bit float: torch's gradient of such a cast is the
    identity (the framework's own straight-through), while the cast is piecewise
    constant. Kolibri 1.1's NVFP4 keys round their block scale through
    ``float8_e4m3fn``: with that cast passing the gradient the counterfactual
    missed the finite differences by 2% (59.38 against 58.27) and could not
    confirm the cause. So casts to a float type of one byte or less, of a tensor
    that requires grad, are held constant here (their derivative between
    steps); ``held`` counts them. A model's float32/16 casts are not such
    steps: the reference evaluations run them in float64."""

    def __init__(self):
        super().__init__()
        self.passed = 0
        self.held = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.detach, torch.detach):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                self.passed += 1
                return x.view_as(x)
        out = func(*args, **(kwargs or {}))
        if func in _CASTS and _to_byte_float(out):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad:
                self.held += 1
                return out.detach()
        return out


_CASTS = (torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as)


def _to_byte_float(out: Any) -> bool:
    """``out`` is a tensor of a floating dtype of one byte or less (float8 / float4
    variants): the result of a quantizing cast."""
    return (
        isinstance(out, torch.Tensor)
        and out.dtype.is_floating_point
        and out.dtype.itemsize <= 1
    )


class NanOrigin(_ModuleStack):
    """Finds the op whose backward first turns a finite incoming gradient into
    NaN/Inf: during one forward it hooks every autograd node the ops create
    (recording the op and the innermost module); in the backward the first node
    whose outputs (the gradients it passes on) are non-finite while the gradients
    it received are finite is the origin, e.g. longformer's float64 softmax over
    a row masked with finfo.min (a -inf row in float32: 0 * NaN)."""

    def __init__(self, names: dict[int, str]):
        super().__init__(names)
        self.origin: str | None = None
        self._hooked: set[int] = set()
        self._handles: list[Any] = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where, name = self.where, _func_name(func)
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        for t in leaves:
            node = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if node is None or id(node) in self._hooked:
                continue
            self._hooked.add(id(node))

            def hook(grad_inputs, grad_outputs, node=node, where=where, name=name):
                if self.origin is not None:
                    return
                if _finite(grad_outputs) and not _finite(grad_inputs):
                    self.origin = (
                        f"{name} ({node.name()}) in module '{where}'"
                        if where != "fn"
                        else f"{name} ({node.name()})"
                    )

            self._handles.append(node.register_hook(hook))
        return out


def _finite(grads: Any) -> bool:
    return all(
        bool(torch.isfinite(g).all())
        for g in grads
        if isinstance(g, torch.Tensor) and (g.is_floating_point() or g.is_complex())
    )


class ForwardOrigin(torch.overrides.TorchFunctionMode):
    """Where a model's own forward first goes wrong in a precision, for a message
    that names the producer, not the op that trips over it (one more forward,
    under no_grad, by the caller):

    * ``nonfinite``: the first op whose floating result holds NaN/Inf while its
      floating inputs are finite (ProphetNet in float64: ``(1.0 - mask) *
      finfo(float64).min``, the ``1.0 - mask`` of an integer mask being float32,
      i.e. ``0 * -inf``);
    * ``low``: where a tensor below ``dtype`` was made from inputs that are not
      (a factory with a hard-coded or default dtype, ``torch.zeros(...,
      dtype=torch.float)`` in FastSpeech2's length_regulator, a ``.float()``).
      When the forward raises, it is the maker of the low-precision tensor the
      failing op received (followed through the ops in between), or None when
      that op received none (Aria's grouped_mm refusing float64 itself: its
      RoPE's harmless ``.float()`` must not be blamed); otherwise the first
      maker (ProphetNet's NaN comes after it).

    Each is "op in caller (file:line)" or None."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.level = _ORDER.get(dtype, 0)
        self.nonfinite: str | None = None
        self.low: str | None = None
        self.raised = False
        #: id -> (tensor, maker) for low-precision tensors of this forward (the
        #: tensor is kept so that its id is not reused)
        self._made: dict[int, tuple[torch.Tensor, str]] = {}

    @staticmethod
    def _floats(args: tuple, kwargs: dict) -> list[torch.Tensor]:
        out = []
        for a in (*args, *kwargs.values()):
            items = a if isinstance(a, (list, tuple)) else (a,)
            out += [
                t
                for t in items
                if isinstance(t, torch.Tensor) and t.is_floating_point()
            ]
        return out

    def _place(self, func: Callable) -> str:
        caller, place = _python_caller()
        return f"{_func_name(func)} in {caller}" + (f" ({place})" if place else "")

    def _maker(self, ins: list[torch.Tensor]) -> str | None:
        for t in ins:
            got = self._made.get(id(t))
            if got is not None and got[0] is t:
                return got[1]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = self._floats(args, kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception:
            if not self.raised:
                self.raised = True
                self.low = self._maker(
                    [t for t in ins if _ORDER.get(t.dtype, 3) < self.level]
                )
            raise
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if _ORDER.get(out.dtype, 3) < self.level:
            maker = self._maker(ins)
            if maker is None:
                maker = (
                    self._place(func) + f" -> {str(out.dtype).replace('torch.', '')}"
                )
                if self.low is None and not self.raised:
                    self.low = maker
            self._made[id(out)] = (out, maker)
        if (
            self.nonfinite is None
            and out.numel()
            and not bool(torch.isfinite(out).all())
        ):
            if all(bool(torch.isfinite(t).all()) for t in ins):
                self.nonfinite = self._place(func)
        return out


def forward_origin(call: Callable[[], Any], dtype: torch.dtype) -> ForwardOrigin:
    """Run ``call`` (a model's forward) once under no_grad and ForwardOrigin;
    whatever it raises is swallowed (the caller has its own exception)."""
    watch = ForwardOrigin(dtype)
    try:
        with torch.no_grad(), watch:
            call()
    except Exception:
        if not watch.raised:  # raised outside any op: no tensor to trace
            watch.low = None
    return watch
