"""What check_variants (and check_devices, its device-only form) needs from a
framework, framework-free.

:class:`Driver` is one framework's way to evaluate a model's loss and gradients
under a variant (a device, autocast, a compiler), switch TF32 and determinism, and
keep the user's state; the drivers live in
:mod:`gradcheck.backends.torch_variants` and
:mod:`gradcheck.backends.tensorflow_variants` and are reached through
:func:`gradcheck.backends.variant_driver`. :class:`OpLog` is what one evaluation
ran, recorded by the framework's op logging (``torch_devices`` / ``tensorflow_devices``).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck import devices as dv

__all__ = ["Driver", "Evaluation", "OpLog", "assemble", "change", "same"]


def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two evaluations (``{"loss": float, "grads": {name: array | None}}``) are
    bitwise the same."""
    la, lb = a["loss"], b["loss"]
    if not (la == lb or (math.isnan(la) and math.isnan(lb))):
        return False
    for name, ga in a["grads"].items():
        gb = b["grads"][name]
        if (ga is None) != (gb is None):
            return False
        if ga is not None and not np.array_equal(ga, gb, equal_nan=True):
            return False
    return True


def change(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest relative change between two evaluations: |loss_a - loss_b| / |loss_a|
    and, per tensor, max|g_a - g_b| / max|g_a|."""
    la, lb = a["loss"], b["loss"]
    worst = 0.0 if la == lb else abs(la - lb) / max(abs(la), 1e-300)
    for name, ga in a["grads"].items():
        gb = b["grads"][name]
        if ga is None or gb is None or ga.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            scale = float(np.max(np.abs(ga)))
            diff = float(np.max(np.abs(ga - gb)))
        if scale > 0 and math.isfinite(diff):
            worst = max(worst, diff / scale)
    return worst


@dataclass(frozen=True)
class Evaluation:
    """What one :meth:`Driver.gradients` call evaluates, for every driver.

    ``device``: where (None: the model's own); ``autocast``: torch autocast
    dtype; ``compiled``: ``torch.compile(loss_fn)``; ``xla``: TensorFlow's
    ``jit_compile``; ``perturb=(seed, relative)``: at a point moved by
    ``relative`` x u, u uniform in [-1, 1], at least one ulp of each tensor's own
    dtype; ``float64``: model and batch cast to float64 (the reference);
    ``seed``: torch's generators are seeded with it; ``repeat``: evaluated twice
    (does a second call agree bitwise?); ``tf32=False``: TF32 switched off during
    the call (and back after); ``loss_scale``: the gradient of ``loss_scale x
    loss``, divided back by ``loss_scale`` (a power of two: exact unless a value
    leaves the precision's range - what float16's underflow measurement needs);
    ``magnitude``: every cotangent of the backward replaced, node by node, by
    its absolute value with a random sign (seeded by ``seed``), so each
    parameter's "gradient" is the size of the terms its true gradient sums,
    with none of their cancellation (torch, with ``float64``)."""

    device: str | None = None
    autocast: str | None = None
    compiled: bool = False
    xla: bool = False
    perturb: tuple[int, float] | None = None
    float64: bool = False
    seed: int = 0
    repeat: bool = False
    tf32: bool = True
    loss_scale: float = 1.0
    magnitude: bool = False


def assemble(
    runs: list[dict[str, Any]], *, compiled: bool, setup: float = 0.0
) -> dict[str, Any]:
    """One :meth:`Driver.gradients` result from its calls at the point (one, or
    two when compiled or repeated): the last call's loss and gradients, the first
    call's op log, the compile time of a compiled call (``setup``, the
    compiler's own, plus the first call's extra time) and whether the two calls
    differed bitwise."""
    out = dict(runs[-1])
    out["log"] = runs[0]["log"]
    out["compile_seconds"] = (
        setup + max(0.0, runs[0]["seconds"] - runs[-1]["seconds"]) if compiled else 0.0
    )
    if len(runs) == 2:
        differs = not same(runs[0], runs[1])
        out["repeat_differs"] = differs
        out["repeat_change"] = change(runs[0], runs[1]) if differs else 0.0
    return out


class OpLog:
    """What one evaluation ran: TF32-eligible float32 GPU kernels by family, the
    longest accumulation, random-number ops, ops with nondeterministic GPU
    kernels. ``opaque``: something ran that the log cannot see into (a compiled
    graph), so a kernel count of 0 is not to be trusted."""

    def __init__(self) -> None:
        self.tf32: dict[str, int] = {"matmul": 0, "convolution": 0, "rnn": 0}
        self.accumulation = 0
        self.random: set[str] = set()
        self.candidates: set[str] = set()
        self.opaque = False
        self.working = True

    def tf32_kernels(self, state: Mapping[str, Any], default: int) -> int:
        """TF32 kernels that ran, by the families ``state`` has on; ``default``
        when the log could not count them."""
        if not state.get("in_play"):
            return 0
        n = sum(count for family, count in self.tf32.items() if state.get(family))
        if n == 0 and (self.opaque or not self.working):
            return default
        return n


class Driver(ABC):
    """One framework's evaluations of ``loss_fn(model, batch)`` under variants.

    Attributes: ``framework``; ``switch`` (the determinism switch's name, for
    notes); ``names`` (trainable parameters, in order); ``dtypes`` (name ->
    dtype); ``home`` (the device the model lives on); ``evaluations`` (gradient
    evaluations so far); ``reference_float64`` (the model can be evaluated in
    float64 for the reference)."""

    framework: str
    switch: str
    names: list[str]
    dtypes: dict[str, str]
    home: str
    evaluations: int
    reference_float64: bool

    @abstractmethod
    def supported(self, variant: Any) -> None:
        """Raise UnsupportedInputError for a variant the framework has no form of."""

    @abstractmethod
    def unavailable(self, variant: Any) -> str | None:
        """Why ``variant`` cannot run on this machine (None: it can)."""

    def gradients(self, **options: Any) -> dict[str, Any]:
        """One evaluation at the point, as :class:`Evaluation` ``options`` say
        (the one definition of what a call can ask; every driver implements
        :meth:`evaluate`). Every random-number generator gradcheck can reach is
        reset (seeded with ``seed``) before each call. Returns ``loss``,
        ``grads`` (float64 NumPy, None: not connected), ``seconds``,
        ``compile_seconds``, ``log`` (the OpLog of an eager call) and, when
        ``repeat`` or compiled, ``repeat_differs``/``repeat_change`` (a second
        call at the same point differed bitwise, by how much)."""
        return self.evaluate(Evaluation(**options))

    @abstractmethod
    def evaluate(self, how: Evaluation) -> dict[str, Any]:
        """One evaluation (see :meth:`gradients`)."""

    def tf32_state(self, device: str) -> dict[str, Any]:
        """devices.tf32_state of ``device`` (CPU: never in play)."""
        return dv.tf32_state(self.framework, device)

    @abstractmethod
    def tf32_off(self) -> contextlib.AbstractContextManager[None]:
        """TF32 switched off inside the block, every switch restored after."""

    @abstractmethod
    def probe(self, **kw: Any) -> tuple[list[str], bool | None]:
        """Two evaluations (``gradients(**kw)``) with the framework's determinism
        switch on (restored after): (ops it names, whether the two agree)."""

    @abstractmethod
    def precision(self) -> str:
        """The model's floating dtype (the widest of its trainable parameters)."""

    @abstractmethod
    def restore(self) -> None:
        """Put every piece of user state back as it was before the check."""
