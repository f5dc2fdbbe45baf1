"""PyTorch backend.

What is differentiated: floating tensors in ``inputs`` with ``requires_grad``, and
``params`` (an ``nn.Module``'s parameters that require grad, or a list/dict of
tensors). ``fn`` usually closes over the module, so the backend substitutes values
by swapping ``param.data`` (never writing into the user's storage) and restores
the original storage objects afterwards.

Reference precision: every evaluation at x + t*d first tries float64 copies of the
differentiated tensors, the module's other floating parameters and buffers, and the
floating inputs (Chainer's trick). If ``fn`` cannot run that way (a float32 tensor
captured in a closure, an explicit ``.float()``), the backend falls back to the
native precision and says so in the report's notes.

Outputs: every floating tensor in fn's (nested) result, complex ones as their
real and imaginary parts. An output that autograd declares constant (it does not
require grad while another output does: batch_norm's saved statistics, outputs
marked non-differentiable) is left out with a note, as torch.autograd.gradcheck
leaves it out. Sparse tensors are refused (inputs, parameters, outputs) with the
fix; sparse and ZeroTensor gradients are read as their dense values.

Placement: everything runs where the user's tensors live. The float64 copies, the
perturbation x + t*d and the scratch buffers are made on each tensor's own device,
and only results (outputs, gradients) travel to the host, as float64 NumPy arrays.
The reference therefore runs on the same GPU as the model, not on a float64 CPU
copy. Accuracy is the same: CUDA float64 arithmetic is IEEE binary64 as on the CPU
(library functions such as exp/tanh may differ by an ulp, ~1e-16, far below any
tolerance here); TF32 never touches float64. Cost decides: a CPU copy would move
every parameter, buffer and input to the host for each of the dozens of reference
evaluations and run them at CPU speed, and a function that builds tensors on
``x.device`` (or a model with hard-wired ``.cuda()`` calls) might not run there at
all. float64 throughput is 1/2 of float32 on data-centre GPUs (A100/H100) and
1/32-1/64 on consumer cards, which for a model of any size is still no slower than
the CPU. The analytical side runs in the user's dtype on the same device; where
TF32 is in play there (float32 on Ampere or newer), a note says so.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from gradcheck.backends import _torch_pool
from gradcheck.backends._torch_routing import RoutingRecord
from gradcheck.backends.base import (
    Session,
    TensorSpec,
    flatten_outputs,
    require_outputs,
)
from gradcheck.errors import (
    BackwardError,
    FunctionRaisedError,
    GradcheckError,
    NonFiniteError,
    NothingToDifferentiateError,
    ReferencePrecisionError,
    UnsupportedInputError,
    wrap_exception,
)
from gradcheck.numeric import compact as cpt
from gradcheck.numeric import workspace
from gradcheck.numeric.arrays import to_host
from gradcheck.numeric.tolerance import canonical_dtype, gradient_rounding

FRAMEWORK = "torch"

_LOW = (torch.float32, torch.float16, torch.bfloat16)
#: complex dtypes below complex128: a reference evaluation widens them to
#: complex128 as it widens _LOW to float64 (complex64 judged against complex128)
_LOW_COMPLEX = (torch.complex64, torch.complex32)
_TO_LOW = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
#: the real dtype of each complex dtype: a complex tensor is checked as its real
#: and imaginary parts (torch.view_as_real), a tensor of that real dtype
_REAL_OF = {
    torch.complex128: torch.float64,
    torch.complex64: torch.float32,
    torch.complex32: torch.float16,
}


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The reference dtype of a floating or complex dtype: float64 or complex128."""
    return torch.complex128 if dtype.is_complex else torch.float64


def _widen_dtype(v: Any) -> Any:
    """A dtype argument asking for low precision, widened (float32 -> float64,
    complex64 -> complex128); anything else unchanged."""
    if v in _LOW:
        return torch.float64
    if v in _LOW_COMPLEX:
        return torch.complex128
    return v


class _PromoteToFloat64(torch.overrides.TorchFunctionMode):
    """Run every op in float64: low-precision floating tensors an op receives (closure
    captured data, constants) are cast up, and requests for float32/16 (``.float()``,
    ``dtype=torch.float32``) become float64. Used only for reference evaluations,
    whose outputs are then checked to be float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in _REWRITTEN and _nothing_to_widen(args, kwargs):
            # the common case (a matmul, an activation on float64 tensors): the
            # slow path below would change nothing; skipping its pytree walk
            # over the arguments saves ~10 us per op of every reference forward
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("dtype") is None:
            # a new tensor in torch's default dtype (float32): float64 here, as
            # every op's result is (SuperPoint fills torch.zeros(...) buffers with
            # its keypoints and descriptors)
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.dtype in _LOW:
                return out.to(torch.float64)
            return out
        if _writes_low(func, args):
            # an in-place write into a low-precision tensor (a buffer made before
            # the mode, or with an explicit dtype): promoting it would write into a
            # float64 copy and lose the write (SuperPoint's keypoints were all zero
            # in LightGlue's reference: a false mismatch); it lands, rounded
            target = args[0]
            rest = torch.utils._pytree.tree_map(_up, args[1:])
            return func(target, *rest, **{k: _up(v) for k, v in kwargs.items()})
        if func in _TO_LOW:
            # x.float() on a float64 reference tensor stays float64 (rounding
            # through float32 would cost the reference its precision); a copy, as
            # .float() copies a float64 tensor, so an in-place op on the result
            # cannot reach a float64 tensor of the user's
            x = args[0]
            return x.clone() if x.dtype == torch.float64 else x.to(torch.float64)
        args = torch.utils._pytree.tree_map(_up, args)
        asked_low = kwargs.get("dtype") in _LOW + _LOW_COMPLEX
        kwargs = {
            k: (_widen_dtype(v) if k == "dtype" else _up(v)) for k, v in kwargs.items()
        }
        if func is torch.Tensor.type and _type_to_low(args, kwargs):
            # x.type(torch.float32) (DeepSeek-style routers): as .float() above
            x = args[0]
            return x.clone() if x.dtype == torch.float64 else x.to(torch.float64)
        if func is _GROUPED_MM and _grouped_in_float64(args, kwargs):
            return _grouped_mm_float64(*args, **kwargs)
        if func is torch.Tensor.to:
            asked_low = asked_low or any(a in _LOW + _LOW_COMPLEX for a in args[1:])
            args = tuple(_widen_dtype(a) for a in args)
            if asked_low:  # x.to(float32) copies a float64 x: so does this
                kwargs["copy"] = True
        return func(*args, **kwargs)


#: factories whose result, given no dtype, is torch's default float dtype
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.linspace,
}


#: every dtype a reference evaluation widens
_LOW_ANY = frozenset(_LOW + _LOW_COMPLEX)


def _nothing_to_widen(args: tuple, kwargs: dict | None) -> bool:
    """True when _PromoteToFloat64 would hand ``args``/``kwargs`` on unchanged:
    no low-precision tensor among them, no container (whose tensors the pytree
    walk would reach) among the positional ones, no ``dtype`` keyword. Together
    with ``func`` outside _REWRITTEN, the op then runs as it is."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.dtype in _LOW_ANY:
                return False
        elif isinstance(a, (list, tuple, dict)):
            return False
    if kwargs:
        if "dtype" in kwargs:
            return False
        for a in kwargs.values():
            if isinstance(a, torch.Tensor) and a.dtype in _LOW_ANY:
                return False
    return True


def _writes_low(func: Any, args: tuple) -> bool:
    """``func`` writes into its first argument in place (``x[i] = v``,
    ``x.copy_(v)``, ``x.add_(v)``), a low-precision floating tensor."""
    target = args[0] if args else None
    if not (isinstance(target, torch.Tensor) and target.dtype in _LOW):
        return False
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (
        name.endswith("_") and not name.endswith("__") and not name.startswith("_")
    )


_GROUPED_MM = getattr(torch, "_grouped_mm", None)
_LOW_TYPES = ("FloatTensor", "HalfTensor", "BFloat16Tensor")
#: the functions _PromoteToFloat64 treats beyond widening their tensor arguments
#: (factories, casts to low precision, x.to/x.type, the grouped matmul): never
#: on its fast path
_REWRITTEN = frozenset(
    _FACTORIES
    | _TO_LOW
    | {torch.Tensor.type, torch.Tensor.to}
    | ({_GROUPED_MM} if _GROUPED_MM is not None else set())
)


def _type_to_low(args: tuple, kwargs: dict) -> bool:
    """``x.type(torch.float32)`` / ``x.type("torch.FloatTensor")``: a cast to a
    low-precision floating type (``x.type()`` without one returns a string)."""
    want = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(want, str):
        return want.rsplit(".", 1)[-1] in _LOW_TYPES
    return want in _LOW


def _grouped_in_float64(args: tuple, kwargs: dict) -> bool:
    """A 2-D x 3-D grouped matmul with offsets (the mixture-of-experts layout:
    tokens sorted by expert, one weight matrix per expert) on float64 operands,
    which torch's CPU kernel refuses ("Expected mat_a to be Float32, BFloat16 or
    Float16")."""
    a = args[0] if args else kwargs.get("mat_a")
    b = args[1] if len(args) > 1 else kwargs.get("mat_b")
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and isinstance(offs, torch.Tensor)
        and a.dtype == torch.float64
        and a.dim() == 2
        and b.dim() == 3
    )


def _grouped_mm_float64(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: Any = None,
) -> torch.Tensor:
    """``torch._grouped_mm`` for a reference evaluation in float64: rows
    offs[i-1]:offs[i] of mat_a times mat_b[i], one differentiable matmul per
    group; rows past offs[-1] are zeros (the kernel ignores them)."""
    pieces, start = [], 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            pieces.append(mat_a[start:end] @ mat_b[i])
        start = end
    rest = mat_a.shape[0] - start
    if rest > 0:
        pieces.append(mat_a.new_zeros(rest, mat_b.shape[-1]))
    out = (
        torch.cat(pieces)
        if pieces
        else mat_a.new_zeros(mat_a.shape[0], mat_b.shape[-1])
    )
    return out if bias is None else out + bias


def _up(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _LOW:
        return x.to(torch.float64)
    if isinstance(x, torch.Tensor) and x.dtype in _LOW_COMPLEX:
        return x.to(torch.complex128)
    return x


def _hold_grads(sources: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, Any]]:
    """Each leaf source's ``.grad`` taken aside (``None`` while a backward runs),
    so what the backward itself writes there can be read: see
    :func:`_with_side_grads`."""
    held = [(s, s.grad) for s in sources if s.is_leaf]
    for s, _ in held:
        s.grad = None
    return held


def _with_side_grads(
    grads: Sequence[torch.Tensor | None],
    sources: Sequence[torch.Tensor],
    held: list[tuple[torch.Tensor, Any]],
    side: set[int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """``grads`` plus what the backward wrote to the sources' ``.grad`` as a side
    effect; every ``.grad`` put back as it was (``held``), also on raise.

    A custom ``autograd.Function.backward`` may call ``.backward()`` itself
    (Reformer's reversible layers recompute their activations and backpropagate
    through them inside their backward): the parameters' gradients then go to
    ``.grad`` and ``torch.autograd.grad`` gets ``None`` for them, while
    ``loss.backward()`` - what a training step runs - sees them. The checks judge
    the gradient a training step sees, so those writes count.

    ``side`` (a session's record) gets the index of every source whose whole
    gradient came that way: ``torch.autograd.grad`` gave None and the write is
    not all zeros (the session's note names them, see TorchSession.finish)."""
    try:
        out = []
        for i, (g, s) in enumerate(zip(grads, sources, strict=True)):
            w = s.grad if s.is_leaf else None
            if w is not None:
                if side is not None and g is None and i not in side:
                    if bool(w.ne(0).any()):
                        side.add(i)
                g = w if g is None else g + w.to(g.dtype)
            out.append(g)
        return tuple(out)
    finally:
        _restore_grads(held)


def _restore_grads(held: list[tuple[torch.Tensor, Any]]) -> None:
    """Every ``.grad`` :func:`_hold_grads` took aside, put back as it was."""
    for s, g in held:
        s.grad = g


def _autograd_grad(
    outputs: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    *,
    retain: bool,
    promote: bool,
    side: set[int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """torch.autograd.grad(outputs, sources, grad_outputs, allow_unused=True); with
    ``promote`` the backward runs under :class:`_PromoteToFloat64` too; gradients
    the backward writes to ``.grad`` itself count (``side``: see
    :func:`_with_side_grads`).

    A custom ``autograd.Function.backward`` (or a hook) may use float32 tensors it
    captured (``g @ X`` with a closure's X): on a float64 reference its gradient
    input is float64, and without the mode the op raises "expected m1 and m2 to
    have the same dtype". ``torch.autograd.grad`` cannot simply be called inside
    the mode: it hands itself to the active mode, which runs it with the mode
    popped, so the engine is called directly, with the mode on the stack (the
    engine runs Python backward functions with the caller's mode stack)."""
    held = _hold_grads(sources)
    try:
        if not promote:
            grads = torch.autograd.grad(
                list(outputs),
                list(sources),
                list(grad_outputs),
                retain_graph=retain,
                allow_unused=True,
            )
        else:
            run = getattr(torch.autograd.graph, "_engine_run_backward", None)
            if run is None:  # pragma: no cover - torch < 2.3
                run = torch.autograd.Variable._execution_engine.run_backward
            with _PromoteToFloat64():
                grads = run(
                    tuple(outputs),
                    tuple(grad_outputs),
                    retain,
                    False,
                    tuple(sources),
                    True,
                    accumulate_grad=False,
                )
    except BaseException:
        _restore_grads(held)
        raise
    return _with_side_grads(grads, sources, held, side)


def _active_autocast(devices: Sequence[str]) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of a torch.autocast context active for these devices."""
    for kind in sorted({torch.device(d).type for d in devices}):
        try:
            if torch.is_autocast_enabled(kind):
                return kind, torch.get_autocast_dtype(kind)
        except (
            RuntimeError,
            TypeError,
            AttributeError,
        ):  # device type without autocast
            continue
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


#: Fixes for framework errors seen inside a checked function (message fragment ->
#: what it means and what to do).
_HINTS = (
    (
        "does not require grad and does not have a grad_fn",
        "fn differentiates something that has no graph here: torch.autograd.grad or "
        ".backward() inside fn needs its inputs to require grad and grad mode on; "
        "do not wrap that part in torch.no_grad() or detach it",
    ),
    (
        "modified by an inplace operation",
        "fn changes a tensor in place after autograd saved it for the backward "
        "pass; clone it before the in-place op or use the out-of-place version",
    ),
    (
        "leaf Variable that requires grad",
        "fn writes in place into a parameter (or a view of one) that requires "
        "grad; autograd forbids it: do the update outside fn under torch.no_grad(), "
        "or compute out of place",
    ),
    (
        "backward through the graph a second time",
        "the graph of fn's output was already used: fn called .backward() or "
        "autograd.grad on it itself (pass retain_graph=True there), or returns a "
        "tensor computed outside fn or cached between calls (compute everything "
        "the loss needs inside fn)",
    ),
    (
        "same dtype",
        "fn mixes dtypes in one op; make it dtype-agnostic (use x.dtype, no "
        "hard-coded float32 constants)",
    ),
    (
        "required positional argument",
        "gradcheck calls fn(*inputs): pass fn's arguments as inputs=(...), or "
        "close over them and take none",
    ),
    (
        "meta tensor",
        "a tensor on the 'meta' device has no data; materialise the model "
        "(model.to_empty(device='cpu') and initialise, or load weights)",
    ),
)


def _hint(exc: BaseException) -> str:
    text = str(exc)
    for fragment, fix in _HINTS:
        if fragment in text:
            return fix + "."
    return ""


def _fn_raised(
    exc: BaseException, label: str, where: str, cls: type = FunctionRaisedError
) -> FunctionRaisedError:
    hint = _hint(exc)
    return wrap_exception(
        cls,
        exc,
        f"{label} raised {_first_line(exc)} ({where}). "
        + (hint + " " if hint else "")
        + "The original exception is the __cause__ of this one.",
    )


def _cut(report: Any) -> bool:
    """Whether a detach can explain a mismatch: a locality/linearity violation
    (a loss reaches less, or with another weight), or finite differences that
    see a dependence torch's gradient does not (a detached value flowing on)."""
    return report.status == "mismatch"


class NonFiniteGradientError(NonFiniteError):
    """A NaN/Inf gradient where the function is finite: ``tensor``, the first
    non-finite element's ``index`` and ``origin`` (the op and module whose
    backward produced it, or None). A finite-difference check can report it as
    a mismatch at that element."""

    def __init__(
        self,
        message: str,
        tensor: str,
        index: tuple[int, ...],
        origin: str | None,
    ):
        super().__init__(message)
        self.tensor = tensor
        self.index = index
        self.origin = origin


def owns(obj: Any) -> bool:
    return isinstance(obj, (torch.Tensor, torch.nn.Module))


def _is_floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy that shares nothing with the tensor (one pass).

    Gradients come in forms NumPy cannot read directly: a ZeroTensor (autograd's
    "known to be zero", e.g. sgn's gradient on real inputs) is read as zeros, a
    sparse gradient (Embedding(sparse=True)) as its dense value."""
    if t._is_zerotensor():
        return np.zeros(tuple(t.shape), dtype=np.float64)
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():  # its real and imaginary parts, as the spec says
        t = torch.view_as_real(t.detach().resolve_conj())
    out = t.detach().to("cpu", torch.float64)
    return out.numpy() if out.data_ptr() != t.data_ptr() else out.numpy().copy()


def _to_host64(t: torch.Tensor) -> np.ndarray:
    """_to_numpy's array, written into a host array from numeric.workspace (one
    no longer referenced from an earlier check where there is one: no fresh
    pages to fault in); the forms _to_numpy converts specially go through it."""
    if t._is_zerotensor() or t.layout != torch.strided or t.is_complex():
        return _to_numpy(t)
    out = workspace.empty(tuple(t.shape), np.float64)
    torch.from_numpy(out).copy_(t.detach())
    return out


def _to_host_narrow(t: torch.Tensor) -> np.ndarray:
    """A gradient for a compact caller (Session.vjp(compact=True)): a float32 or
    narrower floating gradient as a float32 host array holding its exact value
    (the tensor's own storage where it is a contiguous float32 CPU tensor: no
    copy), anything else as _to_host64 reads it."""
    if (
        t._is_zerotensor()
        or t.layout != torch.strided
        or t.is_complex()
        or not t.is_floating_point()
        or t.dtype == torch.float64
    ):
        return _to_host64(t)
    out = t.detach().to("cpu", torch.float32)
    return out.numpy() if out.is_contiguous() else out.contiguous().numpy()


def _to_device64(t: torch.Tensor, ours: set[int]) -> torch.Tensor:
    """A gradient as a real float64 tensor on its own device, for
    Session.vjp_on_device: the values _to_numpy reads (a ZeroTensor as zeros, a
    sparse gradient as its dense value, a complex one as its real and imaginary
    parts), without the copy to the host. A float64 gradient that autograd made
    for this call is handed over as it is; one whose storage is in ``ours`` (the
    session's or the user's: a custom backward returning a saved tensor) is
    copied, since that storage is written again."""
    if t._is_zerotensor():
        return torch.zeros(tuple(t.shape), dtype=torch.float64, device=t.device)
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if t.dtype != torch.float64:
        return t.to(torch.float64)
    if t.untyped_storage().data_ptr() in ours:
        return t.clone()
    return t


_FLOAT64_ON: dict[str, bool] = {}


def _holds_float64(device: torch.device) -> bool:
    """Whether tensors of ``device``'s type can be float64 (not on Apple's MPS),
    tried once per device type with a one-element tensor."""
    known = _FLOAT64_ON.get(device.type)
    if known is None:
        try:
            torch.zeros(1, dtype=torch.float64, device=device)
            known = True
        except (RuntimeError, TypeError):
            known = False
        _FLOAT64_ON[device.type] = known
    return known


def _all_finite(grads: Sequence[Any]) -> list[bool]:
    """Whether each array (None: True) holds only finite values; the tensors'
    flags are computed on their devices and read together (one transfer of a few
    booleans per device, not one per tensor)."""
    flags: list[Any] = []
    for g in grads:
        if g is None:
            flags.append(True)
        elif isinstance(g, torch.Tensor):
            flags.append(torch.isfinite(g).all())
        else:
            flags.append(bool(np.isfinite(g).all()))
    on: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        if isinstance(f, torch.Tensor):
            on.setdefault(f.device, []).append(i)
    for where in on.values():
        read = torch.stack([flags[i] for i in where]).cpu().tolist()
        for i, ok in zip(where, read, strict=True):
            flags[i] = bool(ok)
    return flags


def _drain(
    grads: list[torch.Tensor | None], read: Callable[[torch.Tensor], Any]
) -> list[Any]:
    """Each gradient read to the host and dropped from ``grads`` as it is read
    (peak memory: never every gradient twice at once); None stays None."""
    out: list[np.ndarray | None] = []
    for i, g in enumerate(grads):
        grads[i] = None
        out.append(None if g is None else read(g))
        del g
    return out


def _cotangent(v: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A cotangent (float64 NumPy) as a fresh contiguous tensor of ``like``'s
    dtype and device: an empty NumPy array's strides can be odd, and
    view_as_real's backward needs a unit last stride."""
    out = torch.empty(np.shape(v), dtype=like.dtype, device=like.device)
    return out.copy_(torch.as_tensor(np.asarray(v)))


def _direction_tensor(d: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A direction (float64 NumPy, real pairs for a complex tensor) as a float64
    / complex128 tensor on ``like``'s device."""
    out = torch.as_tensor(d, dtype=torch.float64, device=like.device)
    return torch.view_as_complex(out.contiguous()) if like.is_complex() else out


def _project(
    grads: Sequence[torch.Tensor | None], direction: Sequence[torch.Tensor | None]
) -> float:
    """sum_t <g_t, d_t> in float64 on the tensors' devices (d from prepare(); a
    complex tensor as its real and imaginary parts, a ZeroTensor as zeros, a
    sparse gradient as its dense value, as _to_numpy reads them)."""
    total = 0.0
    for g, d in zip(grads, direction, strict=True):
        if g is None or d is None or g._is_zerotensor():
            continue
        g = g.detach()
        if g.layout != torch.strided:
            g = g.to_dense()
        if g.is_complex():
            g, d = torch.view_as_real(g.resolve_conj()), torch.view_as_real(d)
        total += _dot64(g.reshape(-1), d.reshape(-1))
    return total


#: Elements per piece of a widened dot product (8 MB per float64 operand).
DOT_CHUNK = 1 << 20


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> of two flat tensors in float64. Operands that are not float64 are
    widened a piece at a time (DOT_CHUNK elements), not whole: a float32
    gradient and direction of BERT-base's embedding would need two 188 MB
    float64 copies at once."""
    wide = torch.float64
    if (a.dtype == wide and b.dtype == wide) or a.numel() <= DOT_CHUNK:
        return float(torch.dot(a.to(wide), b.to(wide)))
    total = torch.zeros((), dtype=wide, device=a.device)  # one sync, at the end
    for i in range(0, a.numel(), DOT_CHUNK):
        j = i + DOT_CHUNK
        total += torch.dot(a[i:j].to(wide), b[i:j].to(wide))
    return float(total)


def _spacing(a: torch.Tensor) -> torch.Tensor:
    """np.spacing of a non-negative tensor in its own dtype: nextafter(a, inf) - a,
    exact; where the device has no nextafter for that dtype, from frexp."""
    try:
        return torch.nextafter(a, a.new_tensor(float("inf"))).sub_(a)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - device specific
        return _spacing_frexp(a)


def _spacing_frexp(a: torch.Tensor) -> torch.Tensor:
    """_spacing from the exponent (float32 result): a in [2^k, 2^(k+1)) has ulp
    eps * 2^k; below the smallest normal number, the subnormal spacing tiny * eps
    (every dtype's exponent fits float32, so frexp is exact for its values)."""
    info = torch.finfo(a.dtype)
    _, e = torch.frexp(a.float())
    eps = torch.full(a.shape, info.eps, dtype=torch.float32, device=a.device)
    return torch.ldexp(eps, e - 1).clamp_min(info.tiny * info.eps)


def _require_dense(t: torch.Tensor, name: str, where: str) -> None:
    """Sparse (COO/CSR/...) tensors are refused early, by name, with the fix."""
    if t.layout == torch.strided:
        return
    if where == "output":
        fix = f"return {name}.to_dense() from fn"
    else:
        fix = (
            "pass a dense tensor (x.to_dense()) and convert it inside fn, e.g. "
            f"fn(x) = op(x.to_sparse{'_csr' if t.layout == torch.sparse_csr else ''}()"
            ", ...): the same gradient, on a strided tensor gradcheck can perturb"
        )
    raise UnsupportedInputError(
        f"{name} is a sparse tensor (layout {t.layout}); gradcheck perturbs and "
        f"compares dense (strided) tensors only: {fix}."
    )


def _real_view(o: torch.Tensor) -> torch.Tensor:
    """A complex output as its real and imaginary parts (a trailing dimension of
    2, differentiable): both are compared, and a complex128 output is a float64
    one for the reference precision."""
    if not o.is_complex():
        return o
    return torch.view_as_real(o.resolve_conj() if o.is_conj() else o)


class _State:
    """Everything of the user's that a check could disturb, and how to put it back."""

    def __init__(self, modules: list[torch.nn.Module], params: list[torch.Tensor]):
        self.rng_cpu = torch.get_rng_state()
        # reading the CUDA states would initialise CUDA: only when it already is
        self.rng_cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        self.rng_np = np.random.get_state()
        self.rng_py = random.getstate()
        self.grad_enabled = torch.is_grad_enabled()
        self.training = [(m, m.training) for root in modules for m in root.modules()]
        self.buffers = [
            (m, name, buf)
            for root in modules
            for m in root.modules()
            for name, buf in list(m._buffers.items())
        ]
        self.params = [(p, p.data, p.requires_grad, p.grad) for p in params]

    def restore(self) -> None:
        for p, data, req, grad in self.params:
            p.data = data
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not grad:
                p.grad = grad
        for m, name, buf in self.buffers:
            m._buffers[name] = buf
        for m, flag in self.training:
            m.training = flag
        torch.set_grad_enabled(self.grad_enabled)
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            # fn started CUDA during the check: return every generator to the
            # state it was initialised in (its initial seed, offset 0), which is
            # what the user's first CUDA draw would have seen
            for gen in torch.cuda.default_generators:
                gen.manual_seed(gen.initial_seed())
        np.random.set_state(self.rng_np)
        random.setstate(self.rng_py)


def _collect_params(
    params: Any,
) -> tuple[list[torch.nn.Module], list[tuple[str, torch.Tensor]]]:
    """(modules, [(name, tensor)]) for every tensor in ``params``; computed
    (non-leaf) tensors are refused, see _require_leaf."""
    modules, named = _collect_params_unchecked(params)
    for name, p in named:
        _require_leaf(p, name)
    return modules, named


def _require_leaf(p: torch.Tensor, name: str) -> None:
    """gradcheck substitutes values into the tensors passed as params (their
    .data); a tensor computed from others (a view, w * 2) is not what fn reads,
    so its substitution would change nothing."""
    if p.grad_fn is None:
        return
    raise UnsupportedInputError(
        f"params entry '{name}' was computed from other tensors ({p.grad_fn.name()}),"
        " so it is not what fn reads: gradcheck substitutes values into the tensors "
        "you pass. Pass the leaf tensors themselves (the Parameters, e.g. "
        "params=[model.fc.weight]), or make the computed tensor an input of fn "
        "(inputs=(t,) with fn(t))."
    )


def _collect_params_unchecked(
    params: Any,
) -> tuple[list[torch.nn.Module], list[tuple[str, torch.Tensor]]]:
    if params is None:
        return [], []
    if isinstance(params, torch.nn.Module):
        return [params], list(params.named_parameters())
    if isinstance(params, torch.Tensor):
        return [], [("params", params)]
    if isinstance(params, dict):
        items = list(params.items())
    elif isinstance(params, (list, tuple)):
        items = [(f"params[{i}]", p) for i, p in enumerate(params)]
    else:
        raise UnsupportedInputError(
            f"params must be an nn.Module, a tensor, or a list/dict of tensors; got "
            f"{type(params).__name__}."
        )
    modules, named = [], []
    for name, p in items:
        if isinstance(p, torch.nn.Module):
            modules.append(p)
            named.extend((f"{name}.{n}", q) for n, q in p.named_parameters())
        elif isinstance(p, torch.Tensor):
            named.append((str(name), p))
        else:
            raise UnsupportedInputError(
                f"params entry {name!r} is a {type(p).__name__}, not a torch tensor or module."
            )
    return modules, named


class TorchSession(Session):
    framework = FRAMEWORK

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[Any], params: Any):
        super().__init__()
        self.fn = fn
        self.inputs = list(inputs)
        self.modules, named_params = _collect_params(params)
        all_params = [p for _, p in named_params]
        for root in self.modules:  # frozen params of the module are not differentiated
            all_params.extend(
                p for p in root.parameters() if not any(p is q for q in all_params)
            )
        self._state = _State(self.modules, all_params)
        self._all_params = all_params
        # .grad is set aside (restored by identity): an fn that calls .backward()
        # inside would otherwise accumulate into the user's .grad tensors in place
        for p in all_params:
            if p.grad is not None:
                p.grad = None
        try:
            self._setup(named_params)
        except BaseException:
            self._state.restore()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, named_params: list[tuple[str, torch.Tensor]]) -> None:
        specs: list[TensorSpec] = []
        self.diff: list[
            tuple[str, int | torch.Tensor]
        ] = []  # ("input", idx) | ("param", tensor)
        skipped: list[str] = []
        for i, x in enumerate(self.inputs):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                if not _is_floating(x):
                    raise UnsupportedInputError(
                        f"inputs[{i}] requires grad but is {x.dtype}."
                    )
                _require_dense(x, f"inputs[{i}]", "input")
                self.diff.append(("input", i))
                specs.append(self._spec(f"inputs[{i}]", x, "input"))
            elif isinstance(x, torch.Tensor) and _is_floating(x):
                skipped.append(f"inputs[{i}] (requires_grad=False)")
        seen: set[int] = set()
        for name, p in named_params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not _is_floating(p):
                skipped.append(f"'{name}' ({p.dtype})")
                continue
            if not p.requires_grad:
                skipped.append(f"'{name}' (requires_grad=False)")
                continue
            _require_dense(p, f"'{name}'", "parameter")
            self.diff.append(("param", p))
            specs.append(self._spec(name, p, "parameter"))
        if not specs:
            nested = [
                f"inputs[{i}]"
                for i, x in enumerate(self.inputs)
                if isinstance(x, (list, tuple, dict))
                and any(
                    isinstance(t, torch.Tensor) and t.requires_grad
                    for t in torch.utils._pytree.tree_leaves(x)
                )
            ]
            if nested:
                skipped.append(
                    f"{', '.join(nested)} (a list/tuple/dict: tensors nested in an "
                    "input are passed to fn as they are, not differentiated; pass "
                    "them as separate inputs)"
                )
            found = "; skipped: " + ", ".join(skipped) if skipped else ""
            raise NothingToDifferentiateError(
                "nothing to differentiate: no floating-point tensor in inputs or params "
                f"requires a gradient{found}. Pass params=model (its parameters that "
                "require grad are checked) or inputs with requires_grad=True; integer "
                "tensors have no gradient."
            )
        for spec in specs:
            if spec.dtype not in ("float64", "float32", "float16", "bfloat16"):
                raise UnsupportedInputError(
                    f"'{spec.name}' has dtype {spec.dtype}, which gradcheck does not check."
                )
        meta = [s.name for s in specs if s.device == "meta"]
        if meta:
            raise UnsupportedInputError(
                f"{', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''} "
                f"{'is' if len(meta) == 1 else 'are'} on the 'meta' device: shapes "
                "without data, so there are no values to perturb or gradients to "
                "read. Materialise the model first (model.to_empty(device='cpu') "
                "and initialise it, or load its weights)."
            )
        self.specs = specs
        self._note_tf32(specs)
        self._note_max_norm()
        #: (device type, dtype) of a torch.autocast context the check runs in: the
        #: native side runs under it, the float64 reference outside it
        self.autocast = _active_autocast([s.device for s in specs])
        #: whether reference evaluations record a graph: fn differentiates inside
        #: (gradient penalties); decided by the first reference evaluation
        self._ref_grad: bool | None = None
        # Work on clones: the user's storage is never written, even by an fn that
        # mutates its tensors in place. Every evaluation hands fn fresh values of the
        # differentiated tensors (x + t d, or a clone of x: _evaluate, jvp,
        # _on_clones), which live only as long as the evaluation and its graph: no
        # session-long copy of the model (on BERT-base, 0.44 GB less at the peak).
        # Buffers (BatchNorm statistics) are cloned once, and again per evaluation.
        self._original = {id(p): data for p, data, _, _ in self._state.params}
        self._native = dict(self._original)
        self._native_buffers = [
            (m, name, b.clone() if b is not None else None)
            for m, name, b in self._state.buffers
        ]
        self._install_buffers(self._native_buffers)
        self.reference_dtype = "float64"
        self._f64: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch_buffers: dict[int, torch.Tensor] = {}
        self._shadows: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._widen_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        #: work buffers taken from _torch_pool, given back by restore()
        self._pool_taken: list[torch.Tensor] = []
        #: (ids, arrays, tensors) of the direction projected_gradients_at last used
        self._projection_direction: tuple[list[int], list, list] | None = None
        self._promoted: bool | None = None  # decided at the first reference evaluation
        self._graph: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        #: Indices (in flatten_outputs' order) of the outputs compared, and how many
        #: floating outputs fn returns: decided by the first analytic() call.
        self._keep: list[int] | None = None
        self._n_outputs = 0
        #: fn's topk routing decisions at the point, held in every evaluation
        self._routing_record = RoutingRecord()
        #: ops that drew random numbers, and .detach() calls on tensors that
        #: require grad, in the first call of fn ("op in caller (module)" ->
        #: count); None until that call (see CallWatch)
        self._random_ops: dict[str, int] | None = None
        self._detaches: dict[str, int] = {}
        #: no_grad regions inside fn that read tensors requiring grad (CallWatch)
        self._no_grads: dict[str, int] = {}
        #: indices (in self.diff) of the tensors whose gradient a backward wrote
        #: to .grad itself, torch.autograd.grad getting None (see
        #: _with_side_grads): named in a note by finish()
        self._side_grads: set[int] = set()
        #: set while passing_detaches() is active: fn's calls run under it
        self._pass_detach: Any = None
        self._last_cotangents: list[np.ndarray] | None = None
        #: a derived function's (see second_order_session) output names
        self._output_labels: list[str] | None = None
        #: (tensor, note) when a derived function's gradient cannot be
        #: differentiated at all (see second_order_refusal)
        self._refusal: tuple[str, str] | None = None

    def _note_tf32(self, specs: list[TensorSpec]) -> None:
        """Say so when float32 tensors live on a GPU where TF32 is in play: the
        analytical gradients then carry TF32's rounding, not float32's."""
        from gradcheck.devices import tf32_note

        for device in sorted({s.device for s in specs if s.device.startswith("cuda")}):
            dtypes = [s.dtype for s in specs if s.device == device]
            note = tf32_note(FRAMEWORK, device, dtypes)
            if note:
                self.notes.append(note)

    def _note_max_norm(self) -> None:
        """nn.Embedding(max_norm=...) renormalises the rows it looks up in place,
        outside autograd: the function gradcheck differentiates numerically is not
        the one torch differentiates (whatever the verdict, mismatch or
        nondifferentiable). Named up front when a differentiated weight has rows
        above max_norm."""
        names = {
            id(ref): s.name
            for (kind, ref), s in zip(self.diff, self.specs, strict=True)
            if kind == "param"
        }
        for root in self.modules:
            for m in root.modules():
                if not isinstance(m, torch.nn.Embedding) or m.max_norm is None:
                    continue
                name = names.get(id(m.weight))
                if name is None:
                    continue
                norms = torch.linalg.vector_norm(
                    m.weight.detach().double(), ord=m.norm_type, dim=1
                )
                over = int((norms > m.max_norm).sum())
                if over:
                    self.notes.append(
                        f"'{name}' is the weight of nn.Embedding(max_norm={m.max_norm:g})"
                        f" and {over} of its rows are longer than that: each forward "
                        "renormalises the rows it looks up in place, outside autograd, "
                        "so torch's gradient ignores a dependence that finite "
                        "differences see (and the weights change between calls); check "
                        "with max_norm=None, or renormalise outside the loss."
                    )

    @staticmethod
    def _spec(name: str, t: torch.Tensor, kind: str) -> TensorSpec:
        if t.is_complex():
            # checked as its real and imaginary parts (torch's convention: the
            # gradient of a real L is dL/dRe z + i dL/dIm z, so its view_as_real
            # is the gradient w.r.t. those parts); complex64 -> float32 tolerances
            return TensorSpec(
                f"view_as_real({name})",
                (*t.shape, 2),
                canonical_dtype(_REAL_OF[t.dtype]),
                str(t.device),
                kind,
            )
        return TensorSpec(
            name, tuple(t.shape), canonical_dtype(t.dtype), str(t.device), kind
        )

    def _install_buffers(
        self, buffers: list[tuple[torch.nn.Module, str, torch.Tensor | None]]
    ) -> None:
        for m, name, b in buffers:
            m._buffers[name] = b

    def judged_cast_free(self) -> None:
        i = getattr(self, "_internal_note", None)
        if i is None:
            return
        low = self.internal_dtype
        self.notes[i] = (
            f"this model computes in {low} internally ({self._internal_places}): "
            f"the reference evaluations run those casts in float64, so its cast-free "
            f"float64 gradient (the backward of that promoted forward) is judged "
            f"against the finite differences at float64 precision, and its own "
            f"gradient (with the casts) against the cast-free one on its measured "
            f"{low} rounding."
        )

    def finish(self, report: Any, started: float) -> Any:
        note = self._routing_record.note()
        if note is not None:
            self.notes = [n for n in self.notes if not n.startswith("routing: ")]
            self.notes.append(note)
        side = self._side_note()
        if side is not None:
            self.notes.insert(0, side)
        if report.status == "nondeterministic" and self._random_ops:
            ops = list(self._random_ops)
            report.notes.insert(
                0,
                "fn draws from torch's random number generator in every call: "
                + "; ".join(ops[:4])
                + (f" and {len(ops) - 4} more" if len(ops) > 4 else "")
                + ": each evaluation sees other random numbers, so the function "
                "gradcheck differentiates is not one function. Pass the random "
                "tensors in (or seed a torch.Generator inside fn), or switch the "
                "random op off for the check.",
            )
        if report.status == "mismatch" and self._detaches and _cut(report):
            cuts = list(self._detaches)
            report.notes.append(
                "fn detaches tensors that require grad: "
                + "; ".join(cuts[:4])
                + (f" and {len(cuts) - 4} more" if len(cuts) > 4 else "")
                + ": the gradient stops there; where the detached value flows on to "
                "the outputs, finite differences see a dependence torch's gradient "
                "does not, and a loss reaches less than the wiring says. If by "
                "design (a predictor trained on a stopped input), that detach is the "
                "cause, not a bug in a backward."
            )
        if report.status == "mismatch" and self._no_grads:
            cuts = list(self._no_grads)
            report.notes.append(
                "fn turns grad mode off around tensors that require grad: "
                + "; ".join(cuts[:4])
                + (f" and {len(cuts) - 4} more" if len(cuts) > 4 else "")
                + ": no gradient flows back through what runs there (a frozen "
                "sub-network by design, or a forgotten torch.no_grad()), while its "
                "values still reach the outputs: finite differences see that "
                "dependence, torch's gradient does not."
            )
        return super().finish(report, started)

    def _side_note(self) -> str | None:
        """Where some parameters got their gradient only as a side effect of the
        backward (written to ``.grad`` by a ``.backward()`` call inside a custom
        ``autograd.Function``: Reformer's reversible layers) and none from
        ``torch.autograd.grad``: a note naming them, read from the check's own
        backward passes (said on a pass too: the user's torch.func /
        autograd.grad code would not see those gradients)."""
        side = [
            spec.name
            for i, ((kind, _), spec) in enumerate(
                zip(self.diff, self.specs, strict=True)
            )
            if kind == "param" and i in self._side_grads
        ]
        if not side:
            return None
        shown = ", ".join(f"'{k}'" for k in side[:3])
        more = f" and {len(side) - 3} more" if len(side) > 3 else ""
        owner = (
            f"{type(self.modules[0]).__name__}'s" if len(self.modules) == 1 else "fn's"
        )
        return (
            f"{len(side)} parameter{'s' if len(side) != 1 else ''} ({shown}{more}) "
            f"get{'s' if len(side) == 1 else ''} their gradient only as a "
            f"side effect of {owner} backward: it writes them to .grad (a "
            ".backward() call inside a custom autograd.Function) and returns none to "
            "torch.autograd.grad. The checks count those writes, as loss.backward() "
            "(a training step) does; code that differentiates with "
            "torch.autograd.grad or torch.func gets no gradient for them."
        )

    def _watch_first_call(self) -> Any:
        """On the first call of fn at the point: which ops draw random numbers
        (see RandomOpWatch); nothing on later calls."""
        if self._random_ops is not None:
            return contextlib.nullcontext()
        from gradcheck.backends._torch_kinks import CallWatch, module_names

        watch = CallWatch(module_names(self.modules))
        self._random_ops, self._detaches = watch.random_ops, watch.detaches
        self._no_grads = watch.no_grad
        return watch

    def passing_detaches(self) -> Any:
        """A context in which fn's ``.detach()`` of tensors that require grad pass
        the gradient (PassDetach): the finite-difference check takes one more
        gradient under it to test whether fn's detaches are the whole mismatch.
        None when the first call of fn detached nothing that requires grad."""
        if not self._detaches:
            return None
        from gradcheck.backends._torch_kinks import PassDetach

        @contextlib.contextmanager
        def passing() -> Any:
            self._pass_detach = PassDetach()
            try:
                yield self._pass_detach
            finally:
                self._pass_detach = None
                self._graph = None

        return passing()

    def second_order_refusal(self) -> tuple[str, str] | None:
        return self._refusal

    def restore(self) -> None:
        self._graph = None
        self._clear_autocast_cache()
        self._state.restore()
        self._release_pooled()

    def kink_census(self) -> list[tuple[str, int, int]]:
        """(module, units exactly on a kink, units) at x, from one forward pass in
        the user's precision (see _torch_kinks)."""
        from gradcheck.backends._torch_kinks import KinkCensus

        return self._census(KinkCensus)

    def flat_norms(self) -> list[tuple[str, int, int]]:
        """(module, normalisation groups with (near) zero input variance, groups)
        at x, from one forward pass in the user's precision (see FlatNorms)."""
        from gradcheck.backends._torch_kinks import FlatNorms

        return self._census(FlatNorms)

    def _census(self, kind: Any) -> list[tuple[str, int, int]]:
        """The rows of a census mode of _torch_kinks (KinkCensus, FlatNorms) over
        one forward pass at x in the user's precision."""
        from gradcheck.backends._torch_kinks import module_names

        with kind(module_names(self.modules)) as census:
            self._evaluate(
                [None] * len(self.diff),
                0.0,
                promote=False,
                record=bool(self._ref_grad),  # fn differentiates inside
            )
        return census.rows()

    def _clear_autocast_cache(self) -> None:
        """Autocast caches its low-precision copies of parameters per parameter
        object, not per value: after a .data swap it would hand back the copy of
        another point (two gradients at one point then differ, and the user's next
        forward in the same autocast context would see gradcheck's perturbed
        weights). Cleared before each native evaluation and on restore."""
        if getattr(self, "autocast", None) is not None:
            torch.clear_autocast_cache()

    def rounding_override(self, rtol: float | None = None) -> float | None:
        if self.autocast is None:
            return rtol
        kind, dtype = self.autocast
        low = canonical_dtype(dtype)
        rho = gradient_rounding(low)
        native = max((gradient_rounding(s.dtype) for s in self.specs), default=0.0)
        if rtol is not None:
            judged = f"judged at your rtol={rtol:g}"
        elif rho > native:
            judged = (
                f"judged at {low}'s gradient rounding ({rho:.0e}) instead of "
                f"{self.dtype}'s (pass rtol= to override)"
            )
        else:
            judged, rho = f"judged at {self.dtype}'s gradient rounding", None
        self.notes.append(
            f"torch.autocast('{kind}', dtype=torch.{low}) is active: the analytical "
            f"side ran under it, so its gradients carry {low} rounding; the float64 "
            f"reference ran outside autocast; {judged}."
        )
        return rtol if rtol is not None else rho

    # ------------------------------------------------------------------ calls
    def _routing(self, at_point: bool) -> Any:
        """The mode that holds fn's topk routing decisions at the point's (see
        _torch_routing): it records during the first call at the point and
        replays in every later one; nothing once fn is known to make none."""
        record = self._routing_record
        if not record.active or (record.indices is None and not at_point):
            return contextlib.nullcontext()
        return record.mode()

    def _call(
        self, inputs: list[Any], where: str, *, at_point: bool = False
    ) -> list[tuple[str, torch.Tensor]]:
        """fn's floating outputs, flattened: those compared (see _choose_outputs),
        complex ones as their real and imaginary parts (_real_view). An exception
        from fn becomes a FunctionRaisedError saying ``where`` it happened."""
        try:
            with self._routing(at_point), self._pass_detach or contextlib.nullcontext():
                raw = self.fn(*inputs)
        except GradcheckError:
            raise
        except Exception as exc:
            raise _fn_raised(exc, "fn", where) from exc
        outs = flatten_outputs(raw, lambda o: isinstance(o, torch.Tensor), _is_floating)
        require_outputs(outs, raw)
        if self._output_labels is not None and len(outs) == len(self._output_labels):
            outs = [
                (lab, o) for lab, (_, o) in zip(self._output_labels, outs, strict=True)
            ]
        self.forward_count += 1
        for name, o in outs:
            _require_dense(o, name, "output")
        if self._keep is not None and len(outs) == self._n_outputs:
            # (a changed structure is left whole for check_outputs to report)
            outs = [outs[i] for i in self._keep]
        return [
            (f"view_as_real({n})" if o.is_complex() else n, _real_view(o))
            for n, o in outs
        ]

    def _choose_outputs(self, outs: list[tuple[str, torch.Tensor]]) -> list[int]:
        """The outputs to compare, decided once from the first graph-recording call.

        An output that does not require grad although every differentiated tensor
        does is one the framework declares constant: the op marks it
        non-differentiable (batch_norm's saved mean and rstd), or it is detached
        or built without the inputs. Its gradient is undefined, so it is left out,
        as torch.autograd.gradcheck leaves it out, and a note names it. When no
        output requires grad nothing is left to compare: all are kept, and the
        check reports that the outputs do not depend on the inputs."""
        keep = [i for i, (_, o) in enumerate(outs) if o.requires_grad]
        if not keep or len(keep) == len(outs):
            return list(range(len(outs)))
        dropped = [n for i, (n, _) in enumerate(outs) if i not in keep]
        kept = ", ".join(outs[i][0] for i in keep)
        self.notes.append(
            f"{', '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} not "
            "differentiable per torch (requires_grad=False though the differentiated "
            "tensors require grad: marked non-differentiable by the op, detached, or "
            f"constant): not compared; compared: {kept}."
        )
        return keep

    def _diff_inputs_native(self) -> list[Any]:
        inputs = list(self.inputs)
        for kind, ref in self.diff:
            if kind == "input":
                inputs[ref] = self.inputs[ref].detach().clone().requires_grad_(True)
        return inputs

    @contextlib.contextmanager
    def _on_clones(self) -> Iterator[None]:
        """fn called at x in its own precision, with a graph (analytic,
        value_and_grads): each differentiated parameter holds a fresh clone of its
        value for the call, so an fn that writes its parameters in place writes
        the clone. The graph keeps what it saved of the clones until the backward
        frees it; the parameters point at their own storage again afterwards."""
        params = [p for kind, p in self.diff if kind == "param"]
        self._lean_native()
        try:
            for p in params:
                p.data = self._native[id(p)].clone()
            yield
        finally:
            for p in params:
                p.data = self._native[id(p)]

    def analytic(self) -> list[np.ndarray]:
        inputs = self._diff_inputs_native()
        where = (
            "at the point you gave, in its own precision, before gradcheck changed "
            "anything: fn's own error; call it once yourself to see it"
            if self.forward_count == 0
            else "at the point you gave, called again by gradcheck"
        )
        self._clear_autocast_cache()
        watch = None
        if self._keep is None and self.dtype == "float64":
            # the first call: does a float64 model compute below float64 inside?
            from gradcheck.backends._torch_kinks import LowPrecisionWatch, module_names

            watch = LowPrecisionWatch(torch.float64, module_names(self.modules))
        # the clones first: the watches see fn's ops, not gradcheck's own copies
        with (
            self._on_clones(),
            torch.enable_grad(),
            watch or contextlib.nullcontext(),
            self._watch_first_call(),
        ):
            outs = self._call(inputs, where, at_point=True)
        if watch is not None and watch.lowest is not None:
            self.internal_dtype = canonical_dtype(watch.lowest)
            places = sorted(watch.places, key=lambda w: -watch.places[w])
            self._internal_places = ", ".join(places[:4]) + (
                f" and {len(places) - 4} more" if len(places) > 4 else ""
            )
            self._internal_note = len(self.notes)
            self.notes.append(
                f"this model computes in {self.internal_dtype} internally ("
                + self._internal_places
                + f"): judged at {self.internal_dtype} precision (its float64 gradient "
                f"carries {self.internal_dtype} rounding); the reference evaluations "
                "run those casts in float64."
            )
        if self._keep is None:
            self._n_outputs = len(outs)
            # a derived function's outputs are gradients: one without a graph is
            # a backward torch cannot differentiate, compared, never left out
            self._keep = (
                list(range(len(outs)))
                if self._output_labels is not None
                else self._choose_outputs(outs)
            )
            outs = [outs[i] for i in self._keep]
        self.output_names = [n for n, _ in outs]
        self.output_shapes = [tuple(o.shape) for _, o in outs]
        sources = [inputs[ref] if kind == "input" else ref for kind, ref in self.diff]
        self._graph = ([o for _, o in outs], sources)
        return [_to_numpy(o) for _, o in outs]

    def check_finite_grads(
        self, grads: Sequence[np.ndarray | None], what: str = "gradient"
    ) -> None:
        """A NaN/Inf gradient of a finite function is a wrong gradient: raised as
        :class:`NonFiniteGradientError` naming the tensor, its first non-finite
        element and, from one more forward and backward at the point, the op
        (and module) whose backward turned a finite gradient non-finite."""
        bad = [
            (spec, g)
            for spec, g, ok in zip(self.specs, grads, _all_finite(grads), strict=True)
            if not ok
        ]
        if not bad:
            return
        spec, g = bad[0]
        g = to_host(g)  # the gradients of vjp_on_device: read on the host here
        flags = ~np.isfinite(g)
        first = np.unravel_index(int(np.flatnonzero(flags)[0]), g.shape)
        index = tuple(int(i) for i in first)
        kinds = "/".join(sorted({"NaN" if np.isnan(v) else "Inf" for v in g[flags]}))
        origin = self._nonfinite_origin()
        others = [s.name for s, _ in bad[1:]]
        text = (
            f"torch's {what} for '{spec.name}' has {int(flags.sum())} {kinds} elements "
            f"of {g.size} (the first at {list(index)}) while the function is finite "
            "there: a wrong gradient at any tolerance."
            + (
                f" The first non-finite gradient comes from the backward of {origin}: "
                "it received a finite gradient and passed on NaN/Inf (a softmax over "
                "a row that is all -inf, e.g. a mask of finfo.min added in float32, "
                "gives probabilities whose backward multiplies 0 by NaN; sqrt/norm "
                "at 0, a division by 0 in a custom backward)."
                if origin
                else " The backward pass overflows or divides by zero (a custom "
                "backward, sqrt/norm at 0, a softmax over an all -inf row?)."
            )
            + (
                f" Also non-finite: {', '.join(repr(o) for o in others[:4])}"
                + (f" and {len(others) - 4} more" if len(others) > 4 else "")
                + "."
                if others
                else ""
            )
        )
        raise NonFiniteGradientError(text, spec.name, index, origin)

    def _nonfinite_origin(self) -> str | None:
        """The op whose backward first turns a finite gradient non-finite, from
        one forward (under NanOrigin) and backward at the point with the last
        cotangents; None when that cannot be found."""
        from gradcheck.backends._torch_kinks import NanOrigin, module_names

        cot = self._last_cotangents
        if cot is None:
            return None
        watch = NanOrigin(module_names(self.modules))

        def then(outs, sources):
            pairs = [
                (o, torch.as_tensor(v, dtype=o.dtype, device=o.device))
                for (_, o), v in zip(outs, cot, strict=True)
                if o.requires_grad
            ]
            if pairs:
                torch.autograd.grad(
                    [o for o, _ in pairs],
                    sources,
                    [v for _, v in pairs],
                    allow_unused=True,
                )

        try:
            with watch:
                self._evaluate([None] * len(self.diff), 0.0, False, then)
        except Exception:
            return None
        finally:
            watch.remove()
        return watch.origin

    def vjp(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[np.ndarray | None]:
        grads = self._vjp_tensors(cotangents, retain)
        # into host arrays reused across checks (numeric.workspace)
        return _drain(grads, _to_host_narrow if compact else _to_host64)

    #: Whether vjp_on_device hands the gradients as float64 tensors on their
    #: devices (True) or as vjp's host arrays (False); None: tensors exactly when
    #: a differentiated tensor lives off the CPU. On the CPU the host arrays are
    #: NumPy's (the reductions stay NumPy's BLAS ones, bit for bit the results
    #: gradcheck always gave); True there is for tests of the tensor path.
    gradients_on_device: bool | None = None
    #: Whether direction_draw draws on the tensors' devices (torch.randn with a
    #: seeded torch.Generator there) instead of NumPy's host draw; None: exactly
    #: when the gradients are tensors off the CPU. True on the CPU: tests only.
    draw_on_device: bool | None = None

    def _accelerators(self) -> set[torch.device]:
        """The devices other than the CPU that differentiated tensors live on."""
        devices = {torch.device(sp.device) for sp in self.specs}
        return {d for d in devices if d.type != "cpu"}

    def _off_cpu(self) -> bool:
        return bool(self._accelerators())

    def _tensor_gradients(self) -> bool:
        flag = self.gradients_on_device
        if flag is not None:
            return bool(flag)
        # off the CPU, where every such device computes in float64 (Apple's MPS
        # does not: its gradients go to the host, as before)
        devices = self._accelerators()
        return bool(devices) and all(_holds_float64(d) for d in devices)

    def vjp_on_device(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[Any]:
        """The base class's gradients as real float64 tensors on each tensor's
        device (widened there: no host copy), where gradients_on_device says so;
        vjp's host arrays otherwise (``compact``: a float32 CPU gradient as a
        NumPy view of torch's own, no copy)."""
        if not self._tensor_gradients():
            return self.vjp(cotangents, retain, compact=compact)
        grads = self._vjp_tensors(cotangents, retain)
        ours = self._own_storages()
        return _drain(grads, lambda g: _to_device64(g, ours))

    def direction_draw(self, rng: np.random.Generator) -> Any:
        """A Draw on the gradients' devices (see draw_on_device): one
        torch.Generator per device, seeded from ``rng``, each tensor's samples
        drawn in turn. Its numbers are torch's (per device type), not NumPy's:
        a check on an accelerator replays on the same kind of device."""
        flag = self.draw_on_device
        if not (
            (self._tensor_gradients() and self._off_cpu()) if flag is None else flag
        ):
            return None
        seed = int(rng.integers(np.iinfo(np.int64).max))
        generators: dict[torch.device, torch.Generator] = {}

        def draw(shape: tuple[int, ...], like: Any) -> Any:
            where = (
                like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
            )
            gen = generators.get(where)
            if gen is None:
                gen = generators[where] = torch.Generator(device=where)
                gen.manual_seed(seed)
            z = torch.randn(shape, generator=gen, dtype=torch.float64, device=where)
            # a host array (a tensor without a gradient: zeros on the host) gets
            # host samples
            return z if isinstance(like, torch.Tensor) else z.numpy()

        return draw

    def _own_storages(self) -> set[int]:
        """Storages a backward may hand back that the session or the user writes
        again: the session's work buffers (pooled ones and a lean session's
        float64 shadows), the parameters' values, the inputs."""
        ours = {b.untyped_storage().data_ptr() for b in self._pool_taken}
        ours.update(
            b.untyped_storage().data_ptr() for _, b, _ in self._shadows.values()
        )
        ours.update(x.untyped_storage().data_ptr() for x in self._original.values())
        ours.update(
            x.untyped_storage().data_ptr()
            for x in self.inputs
            if isinstance(x, torch.Tensor) and x.layout == torch.strided
        )
        return ours

    def _vjp_tensors(
        self, cotangents: Sequence[np.ndarray], retain: bool
    ) -> list[torch.Tensor | None]:
        """The backward of vjp, its gradients as torch returns them."""
        assert self._graph is not None, "analytic() first"
        self._last_cotangents = list(cotangents)
        outs, sources = self._graph
        grad_outputs = [_cotangent(v, o) for v, o in zip(cotangents, outs, strict=True)]
        pairs = [
            (o, v) for o, v in zip(outs, grad_outputs, strict=True) if o.requires_grad
        ]
        if not pairs:
            return [None] * len(sources)
        try:
            grads = _autograd_grad(
                [o for o, _ in pairs],
                sources,
                [v for _, v in pairs],
                retain=retain,
                promote=False,
                side=self._side_grads,
            )
        except GradcheckError:
            raise
        except Exception as exc:
            raise _fn_raised(
                exc,
                "the backward pass through fn",
                "at the point you gave, in its own precision; the forward ran: a "
                "custom autograd.Function.backward or a hook raised, or the graph "
                "fn built cannot be differentiated",
                BackwardError,
            ) from exc
        self.backward_count += 1
        if not retain:
            self._graph = None
        return list(grads)

    def jvp(self, direction: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Forward mode at x, in the user's precision: fn's outputs' tangents along
        ``direction`` (torch.autograd.forward_ad: dual inputs; a parameter gets
        its tangent by an in-place copy of a dual tensor into a fresh clone of
        its value, so fn's closure over the Parameter sees it). A custom
        Function's ``jvp`` runs here. An op without forward AD raises
        UnsupportedInputError naming it."""
        import torch.autograd.forward_ad as fwad

        handle = self.prepare(direction)
        inputs = list(self.inputs)
        self._graph = None
        self._clear_autocast_cache()
        where = "at the point you gave, in forward mode (torch.autograd.forward_ad)"
        # a derived (order 2) function differentiates inside: forward over
        # reverse, with its inputs requiring grad (duals of leaves) and grad on
        derived = self._output_labels is not None
        try:
            with fwad.dual_level(), torch.set_grad_enabled(derived):
                with torch.no_grad():
                    self._install_buffers(
                        [
                            (m, n, None if b is None else b.clone())
                            for m, n, b in self._native_buffers
                        ]
                    )
                    for (kind, ref), d in zip(self.diff, handle, strict=True):
                        if kind == "param" and d is not None:
                            own = self._native[id(ref)]
                            ref.data = own.detach().clone()
                            ref.copy_(fwad.make_dual(own.detach(), d.to(own.dtype)))
                for (kind, ref), d in zip(self.diff, handle, strict=True):
                    if kind == "input":
                        value = self.inputs[ref].detach().clone()
                        value.requires_grad_(derived)
                        inputs[ref] = (
                            value
                            if d is None
                            else fwad.make_dual(value, d.to(value.dtype))
                        )
                outs = self._call(inputs, where, at_point=True)
                tangents = []
                for _, o in outs:
                    tan = fwad.unpack_dual(o).tangent
                    tangents.append(
                        np.zeros(tuple(o.shape)) if tan is None else _to_numpy(tan)
                    )
        except FunctionRaisedError as exc:
            cause = exc.__cause__
            text = str(cause or "")
            if isinstance(cause, NotImplementedError) or "forward AD" in text:
                custom = "custom autograd.Function" in text
                raise UnsupportedInputError(
                    "forward mode (ad='forward') is not available for fn: torch "
                    f"says {_first_line(cause or exc).rstrip('.')}. Check this "
                    "function with ad='reverse'"
                    + (
                        ", or give the custom autograd.Function a jvp (staticmethod "
                        "jvp(ctx, *tangents), with ctx.save_for_forward)."
                        if custom
                        else " (that op has no forward-mode derivative in this "
                        "torch build)."
                    )
                ) from exc
            raise
        finally:
            for p in self._all_params:
                p.data = self._native[id(p)]
            self._install_buffers(self._native_buffers)
        self.forward_count += 1
        return tangents

    def value_and_grads(
        self, fn: Callable[..., Any], label: str
    ) -> tuple[float, list[np.ndarray | None]]:
        inputs = self._diff_inputs_native()
        self._clear_autocast_cache()
        try:
            with (
                self._on_clones(),  # (outside the watches, as in analytic)
                torch.enable_grad(),
                self._watch_first_call(),
                self._routing(True),
            ):
                raw = fn(*inputs)
        except GradcheckError:
            raise
        except Exception as exc:
            raise _fn_raised(
                exc, label, "at the point you gave, in its own precision"
            ) from exc
        self.forward_count += 1
        if (
            not isinstance(raw, torch.Tensor)
            or not _is_floating(raw)
            or raw.numel() != 1
        ):
            shape = (
                list(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            )
            fix = (
                "return the tensor itself: a Python number (.item(), float()) "
                "carries no gradient"
                if isinstance(raw, (int, float))
                else "reduce it (mean/sum) as your training code does"
            )
            raise UnsupportedInputError(
                f"{label} must return a scalar floating tensor (a loss); got {shape}; "
                f"{fix}."
            )
        sources = [inputs[ref] if kind == "input" else ref for kind, ref in self.diff]
        if raw.requires_grad:
            loss = raw.reshape(())
            try:
                grads = _autograd_grad(
                    [loss],
                    sources,
                    [torch.ones_like(loss)],
                    retain=False,
                    promote=False,
                    side=self._side_grads,
                )
            except Exception as exc:
                raise _fn_raised(
                    exc,
                    f"the backward pass through {label}",
                    "at the point you gave; the forward ran",
                    BackwardError,
                ) from exc
            self.backward_count += 1
        else:
            grads = (None,) * len(sources)
        return float(raw.detach().double().cpu()), [
            None if g is None else _to_numpy(g) for g in grads
        ]

    # ------------------------------------------------------------------ diagnosis
    def known_causes(self, location: Any) -> list[str]:
        """:meth:`_known_causes`, then the custom ``autograd.Function``s in fn's
        graph: their hand-written backward is the first suspect of a mismatch
        (transformers' YosoCumulation, whose backward is not its forward's
        derivative)."""
        self._nodes: list[Any] = []
        notes = self._known_causes(location)
        try:
            flat = self.flat_norms()
        except Exception:  # a diagnosis only
            flat = []
        if flat:
            total = sum(n for _, n, _ in flat)
            where = ", ".join(f"'{w}' ({n} of {size})" for w, n, size in flat[:3])
            more = f" and {len(flat) - 3} more modules" if len(flat) > 3 else ""
            notes.append(
                f"{total} normalisation groups see an input of (near) zero variance "
                f"at this point ({where}{more}): each multiplies the gradient by up "
                "to 1/sqrt(eps) and is linear only within ~sqrt(eps) of its input, so "
                "gradients there are huge and finite differences cannot follow the "
                "function (an input constant over what is normalised: a degenerate "
                "point of a fresh init, e.g. every quantizer code equal); judge the "
                "model at a point where they see a spread."
            )
        if location is None or location.tensor not in [s.name for s in self.specs]:
            return notes
        custom = {}
        for node in self._nodes:
            cls = getattr(node, "_forward_cls", None)
            module = getattr(cls, "__module__", "") or ""
            if cls is None or module.startswith("torch."):
                continue
            custom[f"{cls.__qualname__} ({module})"] = None
        if custom:
            names = list(custom)
            notes.append(
                "fn's graph holds "
                + (
                    "a custom autograd.Function with a hand-written backward: "
                    if len(names) == 1
                    else f"{len(names)} custom autograd.Functions with hand-written "
                    "backwards: "
                )
                + ", ".join(names[:4])
                + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                + "; a backward that is not the derivative of its forward is the "
                "first suspect: check the Function alone (gradcheck.check_gradients("
                "lambda *a: F.apply(*a), inputs) on float64 inputs)."
            )
        return notes

    def _known_causes(self, location: Any) -> list[str]:
        """Deliberate gradient changes that explain a mismatch at ``location``.

        Looks at the graph of one more forward pass at the user's point (nodes
        are read, nothing is run backward) and at the modules passed: an
        Embedding's padding_idx row (EmbeddingBackward0 saves padding_idx, also
        for F.embedding), Embedding(max_norm=...) (renormalises rows in place,
        outside autograd: no trace in the graph), module backward hooks
        (BackwardHookFunction nodes, the modules' and the global hook dicts),
        tensor hooks on the blamed tensor (register_hook). Then the numbers at
        the blamed element: a flat function with a nonzero torch gradient is a
        straight-through estimator; a zero torch gradient where the function
        changes is a cut path (detach, no_grad, .data)."""
        if location is None:
            return []
        names = [s.name for s in self.specs]
        if location.tensor not in names:
            return []
        i = names.index(location.tensor)
        kind, ref = self.diff[i]
        target = self.inputs[ref] if kind == "input" else ref
        name = location.tensor
        notes: list[str] = []
        try:
            nodes = self._graph_nodes()
        except Exception:  # fn raised this time: judge from the modules alone
            nodes = []
        self._nodes = nodes
        row = location.index[0] if location.index else None
        for node in nodes:
            if node.name() != "EmbeddingBackward0":
                continue
            pad = int(getattr(node, "_saved_padding_idx", -1))
            weight = node.next_functions[0][0] if node.next_functions else None
            if pad >= 0 and row == pad and getattr(weight, "variable", None) is target:
                notes.append(
                    f"'{name}' row {pad} is nn.Embedding's padding_idx: torch zeroes "
                    "its gradient by design; keep padding ids out of the positions "
                    "your loss sees, or exclude this row."
                )
                break
        hooks = len(getattr(target, "_backward_hooks", None) or {})
        if hooks:
            notes.append(
                f"'{name}' has {hooks} gradient hook{'s' if hooks > 1 else ''} "
                "(tensor.register_hook): a hook that returns a changed gradient "
                "(clipping, scaling, zeroing) changes what torch reports, by design; "
                "check without it (remove the handle) or expect its change."
            )
        hooked = [
            n
            for root in self.modules
            for n, m in root.named_modules()
            if m._backward_hooks or m._backward_pre_hooks
        ]
        global_hooks = (
            torch.nn.modules.module._global_backward_hooks
            or torch.nn.modules.module._global_backward_pre_hooks
        )
        if (
            hooked
            or global_hooks
            or any(n.name() == "BackwardHookFunctionBackward" for n in nodes)
        ):
            where = (
                "on "
                + ", ".join(
                    f"'{n or type(self.modules[0]).__name__}'" for n in hooked[:3]
                )
                if hooked
                else "on the path (global or on a module not passed as params)"
            )
            notes.append(
                f"module backward hooks are registered {where} "
                "(register_full_backward_hook / register_full_backward_pre_hook): one "
                "that returns changed gradients changes what torch reports, by "
                "design; check without it (remove the handle)."
            )
        if notes or location.numerical is None or location.analytical is None:
            return notes
        num, ana = float(location.numerical), float(location.analytical)
        if ana != 0.0 and abs(num) <= 1e-3 * abs(ana):
            notes.append(
                f"the function does not change with {location.describe()} (numerical "
                f"{num:.3e}) but torch's gradient is {ana:.3e}: a straight-through "
                "estimator (x + (q(x) - x).detach(), a custom backward passing the "
                "gradient through round/sign/argmax) gives such a gradient on "
                "purpose; if so, the mismatch is by design: check the function "
                "without that trick."
            )
        elif ana == 0.0 and num != 0.0:
            notes.append(
                f"torch's gradient for {location.describe()} is exactly 0 while the "
                f"function changes with it (numerical {num:.3e}): the path is cut: "
                ".detach(), torch.no_grad(), .data, a custom backward or a hook "
                "returning zeros; by design or by mistake"
                + (
                    " (fn runs torch.no_grad() regions: see the note naming them)."
                    if self._no_grads
                    else "."
                )
            )
        return notes

    def _graph_nodes(self, limit: int = 200_000) -> list[Any]:
        """The autograd nodes of fn's graph at the user's point (one forward)."""
        self.analytic()
        assert self._graph is not None
        outs = self._graph[0]
        self._graph = None
        stack = [o.grad_fn for o in outs if o.grad_fn is not None]
        seen: dict[int, Any] = {}
        while stack and len(seen) < limit:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            stack.extend(n for n, _ in node.next_functions if n is not None)
        return list(seen.values())

    # ------------------------------------------------------------------ reference evaluations
    def prepare(self, direction: Sequence[np.ndarray | None]) -> Any:
        # a compact direction (numeric.compact.Widened) is used as stored: its
        # float32 arrays become float32 tensors (no copy on the CPU), and every
        # evaluation forms x + t d from them in float64 (_evaluate)
        # a direction of tensors (drawn after vjp_on_device) stays on its device:
        # read as it is where it is float64 there already (it is never written)
        arrays = cpt.narrow(direction)
        handles = []
        for (kind, ref), d in zip(self.diff, arrays, strict=True):
            base = self.inputs[ref] if kind == "input" else self._state_data(ref)
            if isinstance(d, torch.Tensor):
                d = d.detach().to(base.device, torch.float64)
                handles.append(
                    torch.view_as_complex(d.contiguous()) if base.is_complex() else d
                )
            elif d is not None and d.dtype == np.float32 and not base.is_complex():
                handles.append(torch.from_numpy(d).to(base.device))
            else:
                handles.append(None if d is None else _direction_tensor(d, base))
        return handles

    def _state_data(self, p: torch.Tensor) -> torch.Tensor:
        return self._original[id(p)]

    def values(self) -> list[np.ndarray]:
        return [
            _to_numpy(self.inputs[ref] if kind == "input" else self._state_data(ref))
            for kind, ref in self.diff
        ]

    def outputs_at(self, handle: Any, t: float) -> list[np.ndarray]:
        if self._promoted is None:
            try:
                outs = self._reference(handle, t, promote=True)
            except Exception as exc:  # fn cannot run in float64: fall back below
                cause = exc.__cause__ if isinstance(exc, FunctionRaisedError) else None
                reason = _first_line(cause or exc)[:200]
            else:
                stayed = next((o for _, o in outs if o.dtype != torch.float64), None)
                if stayed is None:
                    self._promoted = True
                    return self._finish(outs)
                reason = "its outputs stayed " + canonical_dtype(stayed.dtype)
            self._promoted = False
            self.reference_dtype = self.dtype
            self.notes.append(
                f"the numerical side runs in {self.dtype}, not float64, because fn could "
                f"not run on float64 copies ({reason}); tolerances are wider and small "
                "errors may go unseen. Make fn dtype-agnostic (no hard-coded dtypes, "
                "no non-torch math on tensors) to enable the float64 reference."
            )
        return self._finish(self._reference(handle, t, promote=self._promoted))

    def _reference(
        self, handle: Any, t: float, promote: bool
    ) -> list[tuple[str, torch.Tensor]]:
        """Outputs at x + t*d, under no_grad unless fn needs grad mode.

        A function that differentiates inside (torch.autograd.grad(...,
        create_graph=True) for a gradient penalty, .backward() on an inner loss)
        raises under no_grad. The first reference evaluation finds out: if it
        raises under no_grad and runs with grad enabled, every later one records
        the graph (its outputs are detached), and a note says so."""
        if self._ref_grad is not None:
            return self._evaluate(handle, t, promote, record=self._ref_grad)
        try:
            outs = self._evaluate(handle, t, promote)
        except Exception as first:
            try:
                outs = self._evaluate(handle, t, promote, record=True)
            except Exception:
                raise first from first.__cause__
            self._ref_grad = True
            self.notes.append(
                "fn needs grad mode to run (it differentiates inside: "
                "torch.autograd.grad or .backward(), e.g. a gradient penalty); its "
                "reference evaluations ran with grad enabled, their outputs detached."
            )
            return outs
        self._ref_grad = False
        return outs

    def _as64(self, x: torch.Tensor) -> torch.Tensor:
        """A float64 copy of one of the user's tensors, made once per session.
        Reference evaluations hand these to fn; fn must not modify its parameters in
        place (the user's own storage is protected either way). The storage comes
        from the host buffers kept across checks (_torch_pool); the values are
        copied from ``x`` here, every session."""
        if self.lean:  # one float64 buffer per tensor (see _shadow)
            buf, holds_x = self._shadow(x, holds_x=True)
            return buf if holds_x else buf.copy_(x.detach())
        key = id(x)
        cached = self._f64.get(key)
        if cached is None or cached[0] is not x:
            # a copy, never an alias: a float64 tensor would otherwise be handed
            # to fn as is, and an fn that writes in place would reach its storage
            buf = self._pooled(x.shape, _wide(x.dtype), x.device)
            cached = (x, buf.copy_(x.detach()))
            self._f64[key] = cached
        return cached[1]

    def _pooled(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A work buffer from _torch_pool, given back when the session restores."""
        buf = _torch_pool.take(tuple(shape), dtype, device)
        self._pool_taken.append(buf)
        return buf

    def _release_pooled(self) -> None:
        """Hand this session's work buffers back (restore): nothing of the
        session may read them afterwards, so its caches of them go too."""
        taken, self._pool_taken = self._pool_taken, []
        self._f64.clear()
        self._scratch_buffers.clear()
        self._shadows.clear()
        self._widen_buffers.clear()
        self._projection_direction = None
        _torch_pool.give(taken)

    def _moved(
        self, own: torch.Tensor, d: torch.Tensor, t: float, grad: bool
    ) -> torch.Tensor:
        """x + t d in the wide dtype, in _scratch's buffer, from x's exact
        widening and d as prepared (float64, or a compact direction's float32).
        Both operands are widened by copies first: torch's mixed-dtype add is
        5-7x slower than a copy and a same-dtype add together (23M elements on
        this project's 2-core machine: 114-131 ms against 15 + 25 ms). The
        numbers are those of the one-pass mixed add."""
        out = self._scratch(own, grad)
        if d.dtype != out.dtype:
            d = out.copy_(d)
        base = own.detach()
        if base.dtype != out.dtype:
            # x's widening made once per session (_as64) and read by every moved
            # point (a central difference forms two); a lean session's one
            # buffer per tensor is the moved point itself, and a graph-recording
            # evaluation keeps its own: widened into the shared buffer instead
            base = (
                self._as64(own)
                if not (self.lean or grad)
                else self._widened(base, out.dtype)
            )
        return torch.add(base, d, alpha=t, out=out)

    def _moved_native(
        self, own: torch.Tensor, d: torch.Tensor, t: float
    ) -> torch.Tensor:
        """x + t d rounded to x's own dtype: a native evaluation's point. Where d
        has x's dtype and t is +-1 (the measured rounding's ulp moves) it is one
        add in that dtype: IEEE rounds the exact sum once, so the value is the
        correctly rounded x + t d, as the wide sum rounded back gives it where
        that sum is exact (every ulp move), with no wide buffer at all. Otherwise
        the wide sum (_moved), rounded."""
        if d.dtype == own.dtype and t in (1.0, -1.0):
            return torch.add(own.detach(), d, alpha=t)
        return self._moved(own, d, t, False).to(own.dtype)

    def _widened(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` copied into a buffer of ``dtype`` shared by every tensor of the
        session (sized to the largest asked for): a moved point's exact widening
        of x, read at once by _moved."""
        key = (dtype, x.device)
        buf = self._widen_buffers.get(key)
        if buf is None or buf.numel() < x.numel():
            buf = self._widen_buffers[key] = self._pooled((x.numel(),), dtype, x.device)
        return buf[: x.numel()].view(x.shape).copy_(x)

    def _shadow(self, x: torch.Tensor, holds_x: bool) -> tuple[torch.Tensor, bool]:
        """A lean session's (Session.lean) one float64 buffer per tensor, in place
        of _as64's copy and _scratch's buffer, each of which is the model's size
        in float64 again: (buffer, whether it holds x already). An evaluation
        uses a tensor either unmoved (_as64: x copied in again where a moved
        point was written since, a copy into memory already touched) or moved
        (_scratch: x + t d written over it), never both. Not pooled: an
        evaluation in the native precision drops them all (_lean_native)."""
        key = id(x)
        cached = self._shadows.get(key)
        if cached is None or cached[0] is not x:
            buf = torch.empty(x.shape, dtype=_wide(x.dtype), device=x.device)
            cached = (x, buf, False)
        self._shadows[key] = (x, cached[1], holds_x)
        return cached[1], cached[2]

    def _lean_native(self) -> None:
        """Before an evaluation in the native precision, which reads no float64
        shadow: a lean session holds none through it (the measured rounding's
        draws run several native forwards and backwards in a row; the
        diagnosis takes the gradient at x again) and makes them again after."""
        if self.lean:
            self._shadows.clear()

    def _scratch(self, x: torch.Tensor, grad: bool) -> torch.Tensor:
        """A float64 buffer per tensor, reused by every no-grad evaluation: no
        fresh pages to fault in per evaluation (a graph-recording evaluation gets
        its own, since its graph may keep it)."""
        if grad:
            return torch.empty(x.shape, dtype=_wide(x.dtype), device=x.device)
        if self.lean:
            return self._shadow(x, holds_x=False)[0]
        buf = self._scratch_buffers.get(id(x))
        if buf is None:
            buf = self._scratch_buffers[id(x)] = self._pooled(
                x.shape, _wide(x.dtype), x.device
            )
        return buf

    def norms(self) -> list[float]:
        # a scale for the step size: the native precision is plenty. Computed on
        # each tensor's device and read together, one transfer per device (not a
        # synchronisation per tensor: hundreds on a GPU model)
        values = [
            torch.linalg.vector_norm(
                (
                    self.inputs[ref] if kind == "input" else self._state_data(ref)
                ).detach()
            )
            for kind, ref in self.diff
        ]
        out = [0.0] * len(values)
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(values):
            by_device.setdefault(v.device, []).append(i)
        for where in by_device.values():
            read = torch.stack([values[i].to(torch.float64) for i in where]).tolist()
            for i, v in zip(where, read, strict=True):
                out[i] = float(v)
        return out

    @staticmethod
    def _buffer_copy(b: torch.Tensor, promote: bool) -> torch.Tensor:
        # a fresh copy per evaluation: forward passes update buffers in place
        # (BatchNorm statistics), and every evaluation must start from the same state
        return b.to(_wide(b.dtype)) if promote and _is_floating(b) else b.clone()

    def gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[list[np.ndarray | None]]:
        """Framework gradients of <v, y> at x + t*d, one list per cotangent set,
        in float64 (``promote``, as the reference evaluations) or native precision."""
        return self._gradients(
            cotangent_sets,
            promote,
            handle,
            t,
            self._read_gradients,
        )

    def _read_gradients(self, grads: list[torch.Tensor | None]) -> list[Any]:
        """A backward's gradients as float64 host arrays, each tensor dropped from
        ``grads`` once read (never all of them twice at once). A CPU float64
        gradient that autograd made for this call is handed over as it is (no
        copy: 0.88 GB less on BERT-base); one whose storage is the session's or
        the user's (a custom backward returning a saved tensor) is copied, since
        that storage is written again."""
        return _drain(grads, self._host_reader())

    def _host_reader(self) -> Callable[[torch.Tensor], np.ndarray]:
        """How _read_gradients reads one gradient: see there."""
        ours = self._own_storages()

        def read(g: torch.Tensor) -> np.ndarray:
            if (
                g.device.type == "cpu"
                and g.dtype == torch.float64
                and g.layout == torch.strided
                and not g._is_zerotensor()
                and g.is_contiguous()
                and not g.requires_grad
                and g.untyped_storage().data_ptr() not in ours
            ):
                return g.detach().numpy()
            return _to_numpy(g)

        return read

    def projected_gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        direction: Sequence[np.ndarray | None],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[float]:
        """sum_t <g_t, d_t> per cotangent set, as the base class defines it, with
        the dot products taken on the tensors' devices: no gradient is copied to
        the host (the measured rounding's draws take only these scalars)."""
        cached = self._projection_direction
        # the arrays' ids (a compact direction's stored ones: iterating it would
        # make fresh float64 arrays whose ids mean nothing)
        ids = [id(d) for d in cpt.narrow(direction)]
        if cached is None or cached[0] != ids:
            # the direction's tensors are made once per probe, not once per draw;
            # the arrays are kept so their ids stay theirs while cached
            cached = (ids, cpt.narrow(direction), self.prepare(direction))
            self._projection_direction = cached
        dirs = cached[2]
        return self._gradients(
            cotangent_sets, promote, handle, t, lambda grads: _project(grads, dirs)
        )

    def ulp_moves(self, dtype: str | Sequence[str], ulps: int, seed: int) -> Any:
        """The base class's move, drawn on each tensor's device (a torch.Generator
        per device seeded with ``seed``): the ulp of |x| rounded to ``dtype`` is
        nextafter(|x|, inf) - |x| in that dtype, exactly np.spacing's value."""
        dtypes = [dtype] * len(self.diff) if isinstance(dtype, str) else list(dtype)
        generators: dict[torch.device, torch.Generator] = {}
        handles = []
        for (kind, ref), name in zip(self.diff, dtypes, strict=True):
            low = getattr(torch, name)
            own = self.inputs[ref] if kind == "input" else self._state_data(ref)
            own = own.detach()
            x = torch.view_as_real(own.resolve_conj()) if own.is_complex() else own
            gen = generators.get(x.device)
            if gen is None:
                gen = generators[x.device] = torch.Generator(x.device)
                gen.manual_seed(seed)
            ulp = _spacing(x.abs().to(low))
            # a whole number of ulps of a float32 or narrower value is a float32
            # number (a power of two times |k| <= ulps): the move is held in
            # float32 then, half the memory of float64 (0.44 GB on BERT-base),
            # the same values
            exact32 = low.itemsize <= 4 and ulps < 1 << 24
            move = torch.randint(
                -ulps,
                ulps + 1,
                tuple(x.shape),
                generator=gen,
                dtype=torch.float32 if exact32 else torch.float64,
                device=x.device,
            )
            move.mul_(ulp).masked_fill_(x == 0, 0.0)
            handles.append(torch.view_as_complex(move) if own.is_complex() else move)
        return handles

    def gradient_reductions(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        reduce: Callable[[int, int, np.ndarray], Any],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[list[Any]]:
        """The base class's reductions, each gradient read to the host (as
        gradients_at reads it) and dropped before the next is read."""
        rows = iter(range(len(cotangent_sets)))
        specs = self.specs

        def read(grads: list[torch.Tensor | None]) -> list[Any]:
            row = next(rows)
            host = self._host_reader()
            out = []
            for i in range(len(grads)):
                g, grads[i] = grads[i], None
                a = np.zeros(specs[i].shape) if g is None else host(g)
                del g
                out.append(reduce(row, i, a))
                del a
            return out

        return self._gradients(cotangent_sets, promote, handle, t, read)

    def _gradients(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        promote: bool,
        handle: Any,
        t: float,
        read: Callable[[Sequence[torch.Tensor | None]], Any],
    ) -> list[Any]:
        """gradients_at's evaluation, each set's gradients handed to ``read``."""
        if handle is None:
            handle = [None] * len(self.diff)
        promote = promote and self._promoted is not False

        def then(outs, sources):
            result = []
            for i, cot in enumerate(cotangent_sets):
                pairs = [
                    (o, _cotangent(v, o))
                    for (_, o), v in zip(outs, cot, strict=True)
                    if o.requires_grad
                ]
                if not pairs:
                    result.append(read([None] * len(sources)))
                    continue
                grads = list(
                    _autograd_grad(
                        [o for o, _ in pairs],
                        sources,
                        [v for _, v in pairs],
                        retain=i < len(cotangent_sets) - 1,
                        promote=promote,
                        side=self._side_grads,
                    )
                )
                self.backward_count += 1
                result.append(read(grads))  # read may drop each tensor as it goes
                del grads
            return result

        try:
            return self._evaluate(handle, t, promote, then)
        except GradcheckError:
            raise
        except Exception as exc:
            if promote:
                raise _fn_raised(
                    exc,
                    "the backward pass through fn",
                    "on float64 copies, where fn's forward ran: a custom "
                    "autograd.Function.backward or hook that builds float32 tensors "
                    "(hard-coded dtypes, NumPy). gradcheck needs this float64 "
                    "gradient to tell float32 rounding from a bug; make the backward "
                    "dtype-agnostic (use grad_output.dtype and saved tensors), or "
                    "check a float64 copy of the model (model.double())",
                    ReferencePrecisionError,
                ) from exc
            raise _fn_raised(
                exc,
                "the backward pass through fn",
                "at a point near the one you gave, in its own precision",
                BackwardError,
            ) from exc

    def _finish(self, outs: list[tuple[str, torch.Tensor]]) -> list[np.ndarray]:
        arrays = [_to_numpy(o) for _, o in outs]
        self.check_outputs(arrays, "at a finite-difference point")
        return arrays

    def _evaluate(
        self,
        handle: Any,
        t: float,
        promote: bool,
        then: Callable[[list[tuple[str, torch.Tensor]], list[torch.Tensor]], Any]
        | None = None,
        *,
        record: bool = False,
    ) -> Any:
        """Run fn at x + t*d. Without ``then``: under no_grad (with grad enabled if
        ``record``; outputs detached), return the outputs. With ``then``: record
        the graph and return ``then(outputs, sources)``, called while the
        substituted values are still in place (and, when ``promote``, with
        autocast off, as the whole reference evaluation)."""

        self._graph = None  # a new graph may replace the leaves' grad accumulators
        if not promote:
            self._lean_native()
        # tensors the direction moves get x + t d below (_moved: from x's
        # widening made once per session; a lean session makes no float64 copy
        # of them, on BERT-base 0.9 GB less)
        moved = {
            ("input", ref) if kind == "input" else ("param", id(ref))
            for (kind, ref), d in zip(self.diff, handle, strict=True)
            if d is not None
        }
        inputs = [
            x
            if ("input", i) in moved or not isinstance(x, torch.Tensor)
            else self._as64(x)
            if promote and _is_floating(x)
            else x.detach().clone()
            for i, x in enumerate(self.inputs)
        ]
        grad = then is not None or record
        where = (
            "at a point gradcheck evaluates near the one you gave (x + t*d"
            + (", on float64 copies" if promote else "")
            + (", grad enabled" if grad else ", under no_grad")
            + "); fn ran at your point, so something in it depends on the values, "
            "the precision or grad mode (an assert, a data-dependent shape or index, "
            "a hard-coded dtype)"
        )
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.set_grad_enabled(grad))
                if promote and self.autocast is not None:
                    stack.enter_context(torch.autocast(self.autocast[0], enabled=False))
                elif not promote:
                    self._clear_autocast_cache()
                with torch.no_grad():
                    if promote:
                        for p in self._all_params:
                            if _is_floating(p) and ("param", id(p)) not in moved:
                                p.data = self._as64(self._native[id(p)])
                    self._install_buffers(
                        [
                            (m, n, None if b is None else self._buffer_copy(b, promote))
                            for m, n, b in self._native_buffers
                        ]
                    )
                    sources = []
                    for (kind, ref), d in zip(self.diff, handle, strict=True):
                        own = (
                            self.inputs[ref]
                            if kind == "input"
                            else self._native[id(ref)]
                        )
                        if d is not None:  # x + t d, formed in float64
                            # a native evaluation's graph keeps the rounded
                            # copy, not the float64 sum: the shared buffer then
                            value = (
                                self._moved(own, d, t, grad)
                                if promote
                                else self._moved_native(own, d, t)
                            )
                        elif promote:
                            value = self._as64(own)
                        else:
                            value = own.detach().clone()
                        if kind == "input":
                            if grad:  # a fresh leaf of its own
                                value = value.detach().clone().requires_grad_(True)
                            inputs[ref] = value
                            sources.append(value)
                        else:
                            ref.data = value
                            sources.append(ref)
                at_point = t == 0.0 or all(d is None for d in handle)
                if promote:
                    with _PromoteToFloat64():
                        outs = self._call(inputs, where, at_point=at_point)
                else:
                    outs = self._call(inputs, where, at_point=at_point)
                if then is not None:
                    return then(outs, sources)
                return [(n, o.detach()) for n, o in outs] if grad else outs
        finally:
            for p in self._all_params:
                p.data = self._native[id(p)]
            self._install_buffers(self._native_buffers)


# ---------------------------------------------------------------------- order 2
def _double_backward(
    outputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    sources: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """torch.autograd.grad(..., create_graph=True, allow_unused=True), calling the
    engine directly so that a reference evaluation's _PromoteToFloat64 mode stays
    on the stack for Python backward functions (see _autograd_grad)."""
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None:  # pragma: no cover - torch < 2.3
        run = torch.autograd.Variable._execution_engine.run_backward
    return run(
        tuple(outputs),
        tuple(grad_outputs),
        True,
        True,
        tuple(sources),
        True,
        accumulate_grad=False,
    )


def _graph_has(roots: Sequence[Any], name: str, limit: int = 100_000) -> bool:
    """Whether an autograd node called ``name`` is reachable from ``roots``."""
    stack, seen = [r for r in roots if r is not None], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == name:
            return True
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


def _once_differentiable(roots: Sequence[Any], limit: int = 100_000) -> list[str]:
    """Custom autograd.Functions in a forward graph whose backward is wrapped by
    torch.autograd.function.once_differentiable."""
    found: dict[str, None] = {}
    stack, seen = [r for r in roots if r is not None], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        backward = getattr(cls, "backward", None)
        code = getattr(backward, "__code__", None)
        if (
            getattr(backward, "__wrapped__", None) is not None
            and code is not None
            and code.co_filename.replace("\\", "/").endswith("autograd/function.py")
        ):
            found[f"{cls.__qualname__} ({cls.__module__})"] = None
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(found)


def second_order_session(
    fn: Callable[..., Any], inputs: Sequence[Any], params: Any, seed: int
) -> TorchSession:
    """A session on the derived function

        g(inputs, grad_outputs) = torch.autograd.grad(fn(inputs), tensors,
                                                      grad_outputs, create_graph=True)

    (one gradient per differentiated tensor of fn: its inputs that require grad
    and its parameters), whose Jacobian holds fn's second derivatives: w.r.t. the
    inputs and parameters, Hessian-vector products of <grad_outputs, fn>; w.r.t.
    grad_outputs (seeded Gaussian cotangents, 1 for a scalar output, themselves
    differentiated), fn's Jacobian as the backward applies it. Checking g at order
    1 is gradgradcheck's question, with everything the engine does for order 1
    (float64 reference, measured rounding, blame by name). g's outputs are named
    ``grad[<tensor>]``, the cotangents ``grad_outputs[k]``.

    A gradient that carries no graph (a backward run under no_grad, on detached
    tensors, or marked @once_differentiable) is compared as a constant: where fn's
    second derivative is not zero, finite differences see it change and the check
    fails at the tensor; when no gradient can be differentiated at all, the
    session's second_order_refusal() says so and the check's verdict is
    "nondifferentiable"."""
    from gradcheck.numeric.directions import cotangents

    probe = TorchSession(fn, inputs, params)
    try:
        probe.analytic()
        assert probe._graph is not None
        outs = probe._graph[0]
        out_names = list(probe.output_names)
        keep = list(probe._keep or [])
        n_outputs = probe._n_outputs
        first_specs = list(probe.specs)
        input_idx = [ref for kind, ref in probe.diff if kind == "input"]
        # outputs torch declares constant carry no cotangent (order 1 leaves
        # them out too)
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        shapes = [tuple(outs[i].shape) for i in live]
        rng = np.random.default_rng([seed, 13])
        # fresh contiguous tensors (an empty NumPy array's strides can be odd,
        # and view_as_real's backward needs a unit last stride)
        grad_outputs = [
            torch.empty(v.shape, dtype=outs[i].dtype, device=outs[i].device)
            .copy_(torch.as_tensor(v))
            .requires_grad_(True)
            for i, v in zip(live, cotangents(shapes, rng), strict=True)
        ]
        probe._graph = None
    finally:
        probe.restore()
    n = len(inputs)
    holder: dict[str, Any] = {}

    def derived(*args: Any) -> tuple[torch.Tensor, ...]:
        session: TorchSession = holder["session"]
        xs = list(args[:n])
        vs = list(args[n:])
        at_point = all(
            isinstance(a, torch.Tensor) and a.requires_grad
            for a in [*(xs[i] for i in input_idx), *vs]
        )
        with torch.enable_grad():
            for i in input_idx:
                if not xs[i].requires_grad:  # a no-grad reference evaluation
                    xs[i] = xs[i].detach().requires_grad_(True)
            raw = fn(*xs)
            flat = flatten_outputs(
                raw, lambda o: isinstance(o, torch.Tensor), _is_floating
            )
            if len(flat) == n_outputs:
                flat = [flat[i] for i in keep]
            ys = [_real_view(o) for _, o in flat]
            if len(ys) != len(out_names):
                raise GradcheckError(
                    f"fn returned {len(ys)} floating outputs here and "
                    f"{len(out_names)} at the point: make its output structure "
                    "depend only on its inputs."
                )
            pairs = [
                (ys[i], v) for i, v in zip(live, vs, strict=True) if ys[i].requires_grad
            ]
            sources = [xs[i] for i in input_idx] + [
                ref for kind, ref in session.diff if kind == "param"
            ]
            grads: Sequence[torch.Tensor | None] = (
                _double_backward(
                    [y for y, _ in pairs],
                    [v.to(y.dtype) for y, v in pairs],
                    sources,
                )
                if pairs
                else [None] * len(sources)
            )
        if at_point and not holder.get("diagnosed"):
            holder["diagnosed"] = True
            session._refusal, note = _second_order_diagnosis(ys, grads, first_specs)
            if note:
                session.notes.append(note)
        # a gradient that is exactly zero with no graph (floor, round,
        # trunc-division: their backward returns zeros) is the constant 0, whose
        # derivative is 0: it stays on the graph of the cotangents (times 0), so
        # the check compares it instead of finding "nothing connected"; a
        # nonzero one without a graph is judged as it is
        with torch.enable_grad():
            anchor = sum((v * 0).sum() for v in vs) if vs else None
        out = []
        for g, src in zip(grads, sources, strict=True):
            if g is None:
                g = torch.zeros_like(src)
            elif (
                anchor is not None and g.grad_fn is None and not bool(g.detach().any())
            ):
                g = g + anchor
            out.append(g)
        return tuple(out)

    session = TorchSession(derived, [*inputs, *grad_outputs], params)
    holder["session"] = session
    session._output_labels = [f"grad[{s.name}]" for s in first_specs]
    session.derived_order = 2
    session.specs = [
        TensorSpec(
            f"grad_outputs[{k - n}]" if s.kind == "input" and k >= n else s.name,
            s.shape,
            s.dtype,
            s.device,
            s.kind,
        )
        for k, s in zip(
            [ref if kind == "input" else -1 for kind, ref in session.diff],
            session.specs,
            strict=True,
        )
    ]
    session.notes.append(
        "order 2: the function checked is g(inputs, grad_outputs) = "
        "torch.autograd.grad(fn(inputs), tensors, grad_outputs, create_graph=True) "
        "(grad_outputs: seeded cotangents of "
        + ", ".join(out_names[i] for i in live)
        + "); its derivatives w.r.t. the inputs and parameters are fn's second "
        "derivatives (Hessian-vector products), w.r.t. grad_outputs the Jacobian "
        "the backward applies."
    )
    return session


def _second_order_diagnosis(
    ys: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    specs: Sequence[TensorSpec],
) -> tuple[tuple[str, str] | None, str | None]:
    """(refusal, note). refusal: (tensor, note) when torch cannot differentiate
    fn's gradient at all: a backward marked @once_differentiable (its gradient
    carries an error node), or every nonzero gradient without a graph (a backward
    run under no_grad or on detached tensors). None when some gradient can be
    differentiated: a constant one among them is then judged by finite
    differences (a mismatch where fn's second derivative is not zero), and the
    note names it."""
    roots = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    once = _once_differentiable([y.grad_fn for y in ys])
    if once and _graph_has(roots, "torch::autograd::Error"):
        name = next(
            s.name
            for s, g in zip(specs, grads, strict=True)
            if g is not None
            and g.grad_fn is not None
            and _graph_has([g.grad_fn], "torch::autograd::Error")
        )
        return (
            name,
            (
                f"torch cannot differentiate the gradient of '{name}': the backward of "
                + ", ".join(once[:3])
                + " is marked @once_differentiable, so the gradient it returns carries "
                "an error node instead of a graph (differentiating it raises 'trying to "
                "differentiate twice a function that was marked with "
                "@once_differentiable'). There is no second derivative to check: write "
                "that backward in differentiable torch ops (without "
                "@once_differentiable, no_grad or detach) to use it at order 2."
            ),
        ), None
    detached = [
        s.name
        for s, g in zip(specs, grads, strict=True)
        if g is not None and not g.requires_grad and bool(g.detach().abs().sum() > 0)
    ]
    connected = [g for g in grads if g is not None and g.requires_grad]
    if detached and not connected:
        return (
            detached[0],
            (
                "torch's gradient of fn carries no graph ("
                + ", ".join(f"'{d}'" for d in detached[:4])
                + "): the backward ran without recording (under torch.no_grad, on "
                "detached tensors or .data, or NumPy), so torch cannot differentiate it "
                "(torch.autograd.grad on it raises 'does not require grad'). There is "
                "no second derivative to check: write the backward in differentiable "
                "torch ops to use it at order 2."
            ),
        ), None
    if detached:
        return None, (
            "torch's gradient for "
            + ", ".join(f"'{d}'" for d in detached[:4])
            + " carries no graph (its backward ran under torch.no_grad, on detached "
            "tensors or .data): torch takes its derivative as 0, which finite "
            "differences judge."
        )
    return None, None
