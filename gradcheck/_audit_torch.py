"""Audit cases for PyTorch (imported only when torch is installed and audited)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

import gradcheck
from gradcheck.audit import Case

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


def cases(
    i: int, dtype_name: str, seed: int, rel: float, activations: tuple[str, ...]
) -> Iterator[Case]:
    dtype = DTYPES[dtype_name]
    model, x, y, c, w = _model(seed, dtype, activations)

    def losses(bug: float = 0.0, detach: bool = False) -> dict[str, torch.Tensor]:
        h = model["trunk"](x)
        if bug:
            h = _Scaled.apply(h, bug)
        return {
            "main": F.mse_loss(model["heads"]["main"](h), y),
            "aux": F.cross_entropy(
                model["heads"]["aux"](h.detach() if detach else h), c
            ),
        }

    def total(**kw):
        return lambda: sum(w[k] * v for k, v in losses(**kw).items())

    fns = {k: (lambda k=k: losses()[k]) for k in w}
    w_detect = dict(w, aux=w["aux"] or 0.3)  # a detached branch needs a weight to miss
    tag = f"torch/{dtype_name}/model{i}"
    yield Case(
        f"{tag}/finite_difference",
        "torch",
        dtype_name,
        "finite_difference",
        True,
        lambda: gradcheck.check_gradients(total(), params=model, seed=seed, label=tag),
    )
    yield Case(
        f"{tag}/finite_difference/planted_scaled_backward_{rel:g}",
        "torch",
        dtype_name,
        "finite_difference",
        False,
        lambda: gradcheck.check_gradients(
            total(bug=rel), params=model, seed=seed, label=tag
        ),
    )
    yield Case(
        f"{tag}/linearity",
        "torch",
        dtype_name,
        "linearity",
        True,
        lambda: gradcheck.check_linearity(
            total(), fns, w, params=model, seed=seed, label=tag
        ),
    )
    yield Case(
        f"{tag}/linearity/planted_detached_aux_branch",
        "torch",
        dtype_name,
        "linearity",
        False,
        lambda: gradcheck.check_linearity(
            lambda: losses()["main"] + w_detect["aux"] * losses(detach=True)["aux"],
            fns,
            w_detect,
            params=model,
            seed=seed,
            label=tag,
        ),
    )
