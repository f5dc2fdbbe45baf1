"""Audit cases for PyTorch (imported only when torch is installed and audited)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gradcheck.audit import Losses

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _Scaled(torch.autograd.Function):
    """Identity whose backward is off by a relative ``rel``: the planted bug."""

    @staticmethod
    def forward(ctx, x, rel):
        ctx.rel = rel
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * (1 + ctx.rel), None


ACT = {
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "softplus": torch.nn.Softplus,
    "relu": torch.nn.ReLU,
}


def _model(seed: int, dtype: torch.dtype, activations: tuple[str, ...]):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n_in, width = int(rng.integers(3, 12)), int(rng.integers(4, 32))
    n_cls, batch = int(rng.integers(2, 6)), int(rng.integers(4, 33))
    act = ACT[activations[int(rng.integers(len(activations)))]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trunk = torch.nn.Sequential(
            torch.nn.Linear(n_in, width), act(), torch.nn.Linear(width, width), act()
        )
        heads = torch.nn.ModuleDict(
            {"main": torch.nn.Linear(width, 1), "aux": torch.nn.Linear(width, n_cls)}
        )
    model = torch.nn.ModuleDict({"trunk": trunk, "heads": heads}).to(dtype)
    x = torch.randn(batch, n_in, generator=g, dtype=dtype)
    y = torch.randn(batch, 1, generator=g, dtype=dtype)
    c = torch.randint(0, n_cls, (batch,), generator=g)
    weights = {"main": 1.0, "aux": float(rng.choice([0.0, 1e-3, 0.3, 2.5]))}
    return model, x, y, c, weights


def build(
    dtype_name: str, seed: int, rel: float, activations: tuple[str, ...]
) -> tuple[torch.nn.Module, Losses, dict[str, float]]:
    """A seeded two-head model, its per-head losses and loss weights."""
    model, x, y, c, w = _model(seed, DTYPES[dtype_name], activations)

    def losses(planted: bool = False, detach: bool = False) -> dict[str, torch.Tensor]:
        h = model["trunk"](x)
        if planted:
            h = _Scaled.apply(h, rel)
        return {
            "main": F.mse_loss(model["heads"]["main"](h), y),
            "aux": F.cross_entropy(
                model["heads"]["aux"](h.detach() if detach else h), c
            ),
        }

    return model, losses, w
