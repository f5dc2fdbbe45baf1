"""Planted bugs shared by the tests: an identity whose backward is off by a
relative amount, the kind of bug a custom op ships with."""

from __future__ import annotations


def scaled_backward(delta: float = 1e-3, only_float32: bool = False):
    """An autograd Function: forward is the identity, backward multiplies the
    incoming gradient by 1 + delta (``only_float32``: only a float32 gradient,
    a bug in the float32 kernel alone, the float64 path right)."""
    import torch

    class ScaledBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            if only_float32 and g.dtype != torch.float32:
                return g
            return g * (1 + delta)

    return ScaledBackward
