"""Planted bugs shared by the tests: an identity whose backward is off by a
relative amount, the kind of bug a custom op ships with."""

from __future__ import annotations


def scaled_backward(delta: float = 1e-3):
    """An autograd Function: forward is the identity, backward multiplies the
    incoming gradient by 1 + delta."""
    import torch

    class ScaledBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            return g * (1 + delta)

    return ScaledBackward
