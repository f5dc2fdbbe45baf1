"""What the devices property needs from a framework, framework-free.

:class:`Driver` is one framework's way to evaluate a model's loss and gradients on a
device, switch TF32 and determinism, and keep the user's state; the drivers live in
:mod:`gradcheck.backends.torch_devices` and
:mod:`gradcheck.backends.tensorflow_devices` and are reached through
:func:`gradcheck.backends.device_driver`. :class:`OpLog` is what one evaluation ran,
recorded by the driver's op logging."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcheck import devices as dv

__all__ = ["Driver", "Evaluation", "OpLog", "same"]


@dataclass
class Evaluation:
    loss: float
    grads: dict[str, np.ndarray | None]
    log: OpLog


def same(a: Evaluation, b: Evaluation) -> bool:
    if not (a.loss == b.loss or (math.isnan(a.loss) and math.isnan(b.loss))):
        return False
    for name, ga in a.grads.items():
        gb = b.grads[name]
        if (ga is None) != (gb is None):
            return False
        if ga is not None and not np.array_equal(ga, gb, equal_nan=True):
            return False
    return True


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
    """One framework's way to evaluate, switch TF32/determinism and keep state."""

    framework: str
    switch: str
    names: list[str]
    dtypes: dict[str, str]
    evaluations: int

    @abstractmethod
    def seed(self, device: str, seed: int) -> None:
        """Reset the random-number state before the first evaluation on a device,
        so each device starts from the same state whatever the device order."""

    @abstractmethod
    def evaluate(self, device: str) -> Evaluation:
        """Loss and gradient of every parameter on ``device``, in the model's dtype,
        as float64 NumPy copies, with the op log of the evaluation."""

    def tf32_state(self, device: str) -> dict[str, Any]:
        return dv.tf32_state(self.framework, device)

    @abstractmethod
    def tf32_off(self) -> contextlib.AbstractContextManager[None]:
        """TF32 switched off inside the block, every switch restored after."""

    @abstractmethod
    def rng_snapshot(self, device: str) -> Any:
        """The random-number state now (what :meth:`rng_reset` returns to)."""

    @abstractmethod
    def rng_reset(self, snapshot: Any) -> None:
        """Put the random-number state back to ``snapshot``."""

    @abstractmethod
    def probe(self, device: str, snapshot: Any) -> tuple[list[str], bool | None]:
        """Two evaluations with the framework's determinism switch on (restored
        after), the RNG reset before each: (ops it names, whether they agree)."""

    @abstractmethod
    def restore(self) -> None:
        """Put every piece of user state back as it was before the check."""
