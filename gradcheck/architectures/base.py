"""What both builders return: a model plus its losses, written once.

A *batch* is a dict of NumPy arrays (or framework tensors)::

    {"inputs": {input name: (N, *shape)},            float, or int token ids
     "targets": {head: (N, units)},                  int (N,) for sparse CE
     "sample_weights": {head: (N,)}}                 optional, per head

Every head's loss is Keras' ``sum_over_batch_size`` reduction: the per-example
losses, times the head's sample weights if given, summed and divided by N. The
total is ``sum_i w_i * loss_i + regularization``, where regularization is the sum
of the kernel penalties and the activity penalties (each divided by N, as Keras
does); loss weights do not scale it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradcheck.architectures.flow import expected_flow
from gradcheck.architectures.spec import REGULARIZATION, HeadSpec, ModelSpec
from gradcheck.errors import InvalidArgumentError

__all__ = ["Built", "Evaluation"]

DTYPES = ("float32", "float64")


@dataclass
class Evaluation:
    """One forward pass: outputs and losses by head name (head order)."""

    outputs: dict[str, Any]
    losses: dict[str, Any]
    regularization: Any
    total: Any


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype is one of {DTYPES}, got {dtype!r}")
    return dtype


def has_regularization(spec: ModelSpec) -> bool:
    return any(
        layer.kernel_regularizer is not None or layer.activity_regularizer is not None
        for _, layer, _ in spec.layers()
    )


class Built(ABC):
    """A model built from ``spec`` in one framework, with its losses.

    ``model`` is the framework's model (``nn.Module`` / ``keras.Model``); pass it as
    ``params=`` to the checks. Methods take a batch (see the module docstring)."""

    framework = ""
    #: how the framework names a layer's kernel tensor ("{}.weight" in torch)
    kernel_format = "{}/kernel"

    def __init__(self, spec: ModelSpec, model: Any, dtype: str):
        self.spec = spec
        self.model = model
        self.dtype = dtype
        self.regularized = has_regularization(spec)

    # ------------------------------------------------------------ per framework
    @abstractmethod
    def convert(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch as framework tensors of the model's dtype."""

    @abstractmethod
    def forward(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """Head outputs (dict in head order) and the regularization scalar."""

    @abstractmethod
    def head_loss(
        self, head: HeadSpec, output: Any, target: Any, sample_weight: Any
    ) -> Any:
        """One head's sum_over_batch_size loss."""

    # ------------------------------------------------------------ shared
    def evaluate(
        self, batch: Mapping[str, Any], weights: Mapping[str, float] | None = None
    ) -> Evaluation:
        b = self.convert(batch)
        outputs, reg = self.forward(b["inputs"])
        sw = b.get("sample_weights") or {}
        losses = {
            h.name: self.head_loss(
                h, outputs[h.name], b["targets"][h.name], sw.get(h.name)
            )
            for h in self.spec.heads
        }
        w = self.spec.weights if weights is None else weights
        total = reg
        for name, value in losses.items():
            total = total + w[name] * value
        return Evaluation(outputs, losses, reg, total)

    def outputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.forward(self.convert(batch)["inputs"])[0]

    def losses(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return self.evaluate(batch).losses

    def total(
        self, batch: Mapping[str, Any], weights: Mapping[str, float] | None = None
    ) -> Any:
        return self.evaluate(batch, weights).total

    def total_fn(
        self, batch: Mapping[str, Any], weights: Mapping[str, float] | None = None
    ) -> Callable[[], Any]:
        """A closure for ``check_gradients``: the total loss on this batch."""
        b = self.convert(batch)
        return lambda: self.evaluate(b, weights).total

    def loss_fns(self, batch: Mapping[str, Any]) -> dict[str, Callable[[], Any]]:
        """Closures for ``check_linearity``: one per head, plus ``"regularization"``
        when the spec has regularizers (weight 1 in :meth:`loss_weights`)."""
        b = self.convert(batch)
        fns: dict[str, Callable[[], Any]] = {
            h.name: (lambda n=h.name: self.evaluate(b).losses[n])
            for h in self.spec.heads
        }
        if self.regularized:
            fns[REGULARIZATION] = lambda: self.forward(b["inputs"])[1]
        return fns

    def loss_weights(
        self, weights: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """The weights that go with :meth:`loss_fns`."""
        w = dict(self.spec.weights if weights is None else weights)
        if self.regularized:
            w[REGULARIZATION] = 1.0
        return w

    def expected_flow(self) -> dict[str, list[str]]:
        """What the architecture implies: ``{layer or kernel tensor: losses that
        reach it}``, the ``expected=`` of :func:`gradcheck.check_locality`, with the
        loss names of :meth:`loss_fns`."""
        return expected_flow(self.spec, self.kernel_format.format)
