"""The small interface every framework backend implements.

A backend turns ``(fn, inputs, params)`` into a :class:`Session`: a named list of
differentiated tensors and four operations, exchanging NumPy float64 arrays (except
``vjp_on_device``, whose gradients may be the backend's own float64 arrays on their
devices, and the directions drawn from them, which ``prepare`` then takes as they
are):

* ``analytic()``: run ``fn`` at the user's point in the user's precision, keep the
  graph, return the outputs;
* ``vjp(cotangents)``: the framework's gradient of <v, outputs> for each tensor;
* ``prepare(direction)`` / ``outputs_at(handle, t)``: run ``fn`` at x + t*d in the
  reference precision (float64 where the function can run in it);
* ``value_and_grads(fn)``: a scalar callable's value and gradients (linearity).

The session is a context manager: on exit the user's state is restored bit for bit
(parameter storage, dtypes, .grad, requires_grad, train/eval flags, buffers, RNG
states, variable values), also when the check failed or raised.
"""

from __future__ import annotations

import functools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck.errors import NonFiniteError, ShapeChangedError, UnsupportedInputError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    kind: str  # "input" | "parameter"

    @functools.cached_property
    def size(self) -> int:  # (asked ~40 times a check: computed once)
        return math.prod(int(n) for n in self.shape)


class Session(ABC):
    framework: str
    specs: list[TensorSpec]
    output_names: list[str]
    output_shapes: list[tuple[int, ...]]
    #: dtype the numerical side runs in: "float64" when promotion worked.
    reference_dtype: str
    #: The lowest precision fn computes in internally when it is below the
    #: tensors' own (a float64 model casting to float32 in its norms), else None.
    internal_dtype: str | None = None
    notes: list[str]
    #: 2 for a derived second-order session (its outputs are fn's gradients)
    derived_order: int = 1
    #: Set by the engine for a check of a large model (the compact threshold of
    #: properties.finite_difference): keep no model-sized copy (float64 shadows,
    #: work buffers) from one evaluation to the next. Each evaluation makes the
    #: copies it needs and drops them when it ends: a few page faults more per
    #: evaluation, against several model-sized buffers held through a failing
    #: check's diagnosis. A backend may ignore it.
    lean: bool = False

    def __init__(self) -> None:
        self.notes = []
        self.forward_count = 0
        self.backward_count = 0

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    @abstractmethod
    def restore(self) -> None:
        """Put every piece of user state back exactly as it was."""

    # -- operations ----------------------------------------------------------
    @abstractmethod
    def analytic(self) -> list[np.ndarray]:
        """Outputs at x in native precision (graph kept for ``vjp``)."""

    @abstractmethod
    def vjp(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[np.ndarray | None]:
        """Gradient of sum_o <v_o, y_o> per tensor (None: not connected), as
        float64 host arrays; with ``compact`` a gradient whose own dtype is float32
        may come as a float32 array instead (its exact value: the caller reads it
        as float64 through numeric.compact.Widened). A backend may ignore it."""

    def vjp_on_device(
        self,
        cotangents: Sequence[np.ndarray],
        retain: bool = False,
        *,
        compact: bool = False,
    ) -> list[Any]:
        """``vjp``'s gradients for a caller that computes on array-API arrays
        (numeric.arrays): a backend may hand them as its own float64 arrays, real
        (a complex tensor as its real and imaginary parts), each on its tensor's
        device, so that nothing full-size is copied to the host on the way to
        the dot products and norms of a passing check. This default hands
        ``vjp``'s host arrays; so do backends whose tensors are on the CPU,
        where the NumPy arrays cost nothing more and keep the results
        unchanged to the last bit. ``compact``: as ``vjp``'s, for the host
        arrays (a caller that reads float32 ones as float64 itself)."""
        return self.vjp(cotangents, retain, compact=compact)

    def direction_draw(self, rng: np.random.Generator) -> Any:
        """The source of the probe direction's Gaussian samples
        (numeric.directions.Draw) when the gradients live on an accelerator:
        a seeded draw there, the seed taken from ``rng``. None (this default,
        and any backend on the CPU): the NumPy host draw from ``rng`` itself,
        the same direction on every machine."""
        return None

    @abstractmethod
    def prepare(self, direction: Sequence[np.ndarray | None]) -> Any:
        """Convert a direction (None = zero for that tensor) to framework tensors
        (the direction's arrays may be NumPy arrays or, after
        ``vjp_on_device``, the backend's own)."""

    @abstractmethod
    def outputs_at(self, handle: Any, t: float) -> list[np.ndarray]:
        """Outputs at x + t*d in the reference precision."""

    @abstractmethod
    def values(self) -> list[np.ndarray]:
        """The differentiated tensors' values at x, as float64 arrays."""

    def norms(self) -> list[float]:
        """L2 norm of each differentiated tensor (backends compute it in place)."""
        return [float(np.linalg.norm(v)) for v in self.values()]

    @abstractmethod
    def value_and_grads(
        self, fn: Callable[..., Any], label: str
    ) -> tuple[float, list[np.ndarray | None]]:
        """Value and per-tensor gradients of a scalar-valued callable of the inputs."""

    def ulp_moves(self, dtype: str | Sequence[str], ulps: int, seed: int) -> Any:
        """A handle (as ``prepare`` returns one) for a move of every nonzero element
        of the differentiated tensors by a random whole number of ulps, uniform in
        [-ulps, ulps], of its value rounded to ``dtype`` (NumPy's ``np.spacing``;
        one dtype for every tensor, or one per tensor); zero elements stay. Drawn
        from ``seed``: the same seed, the same move.

        This default draws on the host from ``values()``; a backend overrides it to
        draw where its tensors live (no full-size host copy per draw)."""
        dtypes = [dtype] * len(self.specs) if isinstance(dtype, str) else list(dtype)
        rng = np.random.default_rng(seed)
        return self.prepare(
            [
                rng.integers(-ulps, ulps + 1, size=x.shape)
                * np.spacing(np.abs(x).astype(_numpy_dtype(low))).astype(np.float64)
                * (x != 0)
                for x, low in zip(self.values(), dtypes, strict=True)
            ]
        )

    def gradient_reductions(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        reduce: Callable[[int, int, np.ndarray], Any],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[list[Any]]:
        """``[[reduce(row, i, g_i) for each tensor i] for each cotangent set]`` for
        the gradients ``gradients_at`` (same arguments) gives: each g_i a float64
        host array (zeros where the tensor is not connected), handed over one at
        a time, so a caller that needs numbers per tensor (norms, dot products,
        running sums) never holds a whole set of them (a float32 model's float64
        gradients are twice the model).

        This default takes the whole sets from ``gradients_at``; a backend
        overrides it to read each gradient and drop it as it goes."""
        return [
            [
                reduce(row, i, np.zeros(sp.shape) if g is None else g)
                for i, (sp, g) in enumerate(zip(self.specs, grads, strict=True))
            ]
            for row, grads in enumerate(
                self.gradients_at(  # type: ignore[attr-defined]
                    cotangent_sets, promote=promote, handle=handle, t=t
                )
            )
        ]

    def projected_gradients_at(
        self,
        cotangent_sets: Sequence[Sequence[np.ndarray]],
        direction: Sequence[np.ndarray | None],
        *,
        promote: bool,
        handle: Any = None,
        t: float = 0.0,
    ) -> list[float]:
        """sum_t <g_t, d_t> for the gradients g of ``gradients_at`` (same
        arguments) and a direction d (float64 arrays, None = zero for that tensor),
        one float per cotangent set; tensors without a gradient add nothing.

        This default reads the full gradients to the host; a backend overrides it
        to project where its tensors live."""
        return [
            sum(
                float(np.vdot(g, d))
                for g, d in zip(grads, direction, strict=True)
                if g is not None and d is not None
            )
            for grads in self.gradients_at(  # type: ignore[attr-defined]
                cotangent_sets, promote=promote, handle=handle, t=t
            )
        ]

    def jvp(self, direction: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Forward mode: the outputs' tangents J d at x in the user's precision
        (d: a direction as for ``prepare``; None = zero for that tensor), one
        float64 array per output. Backends without forward mode refuse."""
        raise UnsupportedInputError(
            f"forward mode (ad='forward') is not available for {self.framework}."
        )

    def second_order_refusal(self) -> tuple[str, str] | None:
        """For a derived second-order session: (tensor, why) when the framework
        cannot differentiate fn's gradient at all (a backward with no graph), so
        the check's verdict is "nondifferentiable"; None otherwise."""
        return None

    def unconnected_refusal(self) -> tuple[str, str] | None:
        """For a derived second-order session whose outputs (fn's gradients) the
        framework finds connected to nothing: (tensor, why) for a
        "nondifferentiable" verdict; None: the usual error (fn reads nothing)."""
        return None

    def rounding_override(self, rtol: float | None = None) -> float | None:
        """The relative gradient rounding to judge at: the user's ``rtol`` if given,
        else, when the analytical side runs in a lower precision than the tensors'
        dtype (torch.autocast), that precision's, with a note saying so; None
        (the tensors' own dtype) otherwise."""
        return rtol

    def judged_cast_free(self) -> None:
        """The finite-difference check judged a model that computes in
        ``internal_dtype`` inside on its cast-free float64 gradient: the backend
        rewrites its note on the internal precision to say so (no-op by default)."""
        return None

    def known_causes(self, location: Any) -> list[str]:
        """Notes naming deliberate gradient changes that explain a mismatch at
        ``location`` (a :class:`gradcheck.result.Location` or None): an Embedding's
        padding_idx row, hooks that rewrite gradients, straight-through tricks. The
        verdict stays a mismatch; these say why and what to do. Empty when none
        applies."""
        return []

    # -- shared helpers --------------------------------------------------------
    def finish(self, report: Any, started: float) -> Any:
        """Stamp a property's report with the work done and the backend's notes."""
        report.cost = {
            "forward": self.forward_count,
            "backward": self.backward_count,
            "seconds": time.perf_counter() - started,
        }
        report.notes = list(self.notes) + report.notes
        return report

    @property
    def device(self) -> str:
        devices = sorted({s.device for s in self.specs})
        return ",".join(devices) if devices else "cpu"

    @property
    def dtype(self) -> str:
        dtypes = sorted({s.dtype for s in self.specs})
        return dtypes[0] if len(dtypes) == 1 else "mixed(" + ",".join(dtypes) + ")"

    def check_outputs(self, outputs: list[np.ndarray], where: str) -> None:
        shapes = [o.shape for o in outputs]
        if shapes != self.output_shapes:
            raise ShapeChangedError(
                f"the function's outputs changed between two calls ({where}): first "
                f"{_describe(self.output_names, self.output_shapes)}, now "
                f"{_describe(self.output_names, shapes)}. gradcheck evaluates fn "
                "several times; make its output structure depend only on its inputs "
                "(no data-dependent shapes, no random output sizes)."
            )

    def check_finite_outputs(self, outputs: list[np.ndarray]) -> None:
        for name, out in zip(self.output_names, outputs, strict=True):
            bad = ~np.isfinite(out)
            if bad.any():
                kinds = sorted(
                    {"NaN" if math.isnan(v) else str(v) for v in out[bad].ravel()[:64]}
                )
                raise NonFiniteError(
                    f"the function's {name} is {'/'.join(kinds)} at the point to check "
                    f"({int(bad.sum())} of {out.size} elements). A loss must be finite "
                    "to have a gradient: look for log(0), 0/0, sqrt of negatives or "
                    "overflow (float16?) in the forward pass."
                )

    def check_finite_grads(
        self, grads: Sequence[np.ndarray | None], what: str = "gradient"
    ) -> None:
        for spec, g in zip(self.specs, grads, strict=True):
            if g is not None and not np.isfinite(g).all():
                n = int((~np.isfinite(g)).sum())
                raise NonFiniteError(
                    f"the framework's {what} for '{spec.name}' has {n} NaN/Inf "
                    f"elements of {g.size} while the outputs are finite: the backward "
                    "pass overflows or divides by zero (a custom backward, or "
                    "sqrt/norm at 0?)."
                )


def _numpy_dtype(name: str) -> np.dtype:
    """NumPy's version of a floating dtype's name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _describe(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> str:
    return (
        ", ".join(f"{n}{list(s)}" for n, s in zip(names, shapes, strict=False))
        or "nothing"
    )


def flatten_outputs(
    obj: Any,
    is_tensor: Callable[[Any], bool],
    is_floating: Callable[[Any], bool],
    prefix: str = "output",
) -> list[tuple[str, Any]]:
    """(name, tensor) for every floating tensor in a nested tuple/list/dict output."""
    out: list[tuple[str, Any]] = []
    if is_tensor(obj):
        if is_floating(obj):
            out.append((prefix, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(flatten_outputs(v, is_tensor, is_floating, f"{prefix}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.extend(flatten_outputs(v, is_tensor, is_floating, f"{prefix}[{i}]"))
    return out


def require_outputs(outputs: list[tuple[str, Any]], raw: Any) -> None:
    if not outputs:
        raise UnsupportedInputError(
            f"fn returned {type(raw).__name__}, which holds no floating-point tensor. "
            "Return the loss (a scalar tensor), a tensor, or a tuple/list/dict of "
            "tensors; Python numbers and .item() values carry no gradient."
        )
