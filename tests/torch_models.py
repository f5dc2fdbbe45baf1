"""Small torch models and planted-bug autograd Functions shared by the torch tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "sigmoid": torch.nn.Sigmoid,
    "softplus": torch.nn.Softplus,
}


class MultiHead(torch.nn.Module):
    """A trunk and heads that branch from the trunk's output."""

    def __init__(self, n_in, widths, act, heads, dtype=torch.float64, norm=False):
        super().__init__()
        layers, prev = [], n_in
        for w in widths:
            layers.append(torch.nn.Linear(prev, w))
            if norm:
                layers.append(torch.nn.LayerNorm(w))
            layers.append(ACTIVATIONS[act]())
            prev = w
        self.trunk = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(prev, size) for name, (size, _) in heads.items()}
        )
        self.losses = {name: kind for name, (_, kind) in heads.items()}
        self.to(dtype)

    def forward(self, x):
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def head_loss(kind, out, target):
    if kind == "mse":
        return F.mse_loss(out, target)
    if kind == "ce":
        return F.cross_entropy(out, target)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out, target)
    if kind == "huber":
        return F.huber_loss(out, target)
    raise ValueError(kind)


def make_targets(model, batch, generator):
    targets = {}
    dtype = next(model.parameters()).dtype
    for name, head in model.heads.items():
        kind, size = model.losses[name], head.out_features
        if kind == "ce":
            targets[name] = torch.randint(0, size, (batch,), generator=generator)
        elif kind == "bce":
            targets[name] = torch.randint(0, 2, (batch, size), generator=generator).to(
                dtype
            )
        else:
            targets[name] = torch.randn(batch, size, generator=generator, dtype=dtype)
    return targets


def loss_fns(model, x, targets):
    def one(name):
        return lambda: head_loss(model.losses[name], model(x)[name], targets[name])

    return {name: one(name) for name in model.heads}


def total_fn(model, x, targets, weights):
    def total():
        outs = model(x)
        return sum(
            weights[n] * head_loss(model.losses[n], outs[n], targets[n]) for n in outs
        )

    return total


# --- planted-bug autograd Functions ---------------------------------------------------
class ScaledBackward(torch.autograd.Function):
    """y = x * 2, with a backward scaled by (1 + rel)."""

    rel = 0.0

    @staticmethod
    def forward(ctx, x, rel):
        ctx.rel = rel
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2 * (1 + ctx.rel), None


class TransposedBackward(torch.autograd.Function):
    """y = x @ W (square W) whose backward multiplies by W instead of W^T."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, x.T @ g  # wrong: should be g @ w.T


class Square(torch.autograd.Function):
    """y = x**2 with its correct backward; planted bugs subclass it and replace
    ``backward``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OneWrongElement(torch.autograd.Function):
    """Elementwise y = x**2 whose backward is wrong at one flat index."""

    @staticmethod
    def forward(ctx, x, index, factor):
        ctx.save_for_backward(x)
        ctx.index, ctx.factor = index, factor
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = (2 * x * g).clone()
        grad.view(-1)[ctx.index] *= ctx.factor
        return grad, None, None


class IgnoresGradOutput(torch.autograd.Function):
    """y = sin(x) whose backward forgets to multiply by grad_output."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.cos(x)


class PermutedBackward(torch.autograd.Function):
    """y = x * c (c a vector) whose backward swaps two elements: the sparse error
    that fooled torch's fast mode (pytorch#57166)."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(c)
        return x * c

    @staticmethod
    def backward(ctx, g):
        (c,) = ctx.saved_tensors
        grad = g * c
        grad = grad.clone()
        grad[..., [0, 1]] = grad[..., [1, 0]]
        return grad, None
