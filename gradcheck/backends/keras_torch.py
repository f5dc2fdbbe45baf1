"""Keras on PyTorch, for check_keras_model: per-loss gradients by
``torch.autograd.grad``, the ``.grad`` of the variables' torch Parameters and torch's
global generators saved and restored. See :mod:`gradcheck.backends.keras_step`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["TorchOps"]


class TorchOps:
    """Eager forward pass, ``torch.autograd.grad`` per loss (graph retained)."""

    name = "torch"

    def value_and_grads(
        self,
        compute: Callable[[], dict[str, Any]],
        variables: Sequence[Any],
        scale: float,
    ) -> tuple[dict[str, Any], dict[str, list[np.ndarray | None]]]:
        params = [v.value for v in variables]
        with torch.enable_grad():
            losses = compute()
            grads = {}
            for name, value in losses.items():
                if not getattr(value, "requires_grad", False):
                    grads[name] = [None] * len(params)
                    continue
                gs = torch.autograd.grad(
                    value * scale, params, retain_graph=True, allow_unused=True
                )
                grads[name] = [
                    None if g is None else g.detach().cpu().double().numpy() / scale
                    for g in gs
                ]
        return losses, grads

    def components(self, variable: Any) -> list[Any] | None:
        """Per-replica copies exist under tf.distribute only."""
        return None

    def grad_state(self, variables: Sequence[Any]) -> list[Any]:
        out = []
        for v in variables:
            p = getattr(v, "value", None)
            if p is not None and hasattr(p, "grad"):
                g = p.grad
                out.append((p, None if g is None else g.detach().clone()))
        return out

    def restore_grad_state(self, saved: list[Any]) -> None:
        for p, g in saved:
            p.grad = g

    def rng_state(self) -> Any:
        """torch's global generators: Keras' torch backend draws an unseeded
        Dropout's mask from them (torch.nn.functional.dropout)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return torch.random.get_rng_state(), cuda

    def restore_rng(self, saved: Any) -> None:
        cpu, cuda = saved
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
