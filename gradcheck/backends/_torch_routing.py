"""Routing decisions held fixed across a check's evaluations (mixture of experts).

A mixture-of-experts layer picks, per token, the k experts with the largest router
scores (``torch.topk``). The pick is piecewise constant in the weights: torch's
gradient is the derivative with the pick held fixed, while a finite difference
whose step moves a score past another's sees a different function (the token's
output jumps to another expert's). With random weights many scores are close
(a zero-initialised router makes every pick a tie), so some pick flips within
almost any step and the differences do not converge.

:class:`RoutingReplay` makes the checked function the one torch differentiates:
the first evaluation at the point records the index output of every ``topk`` on a
floating tensor, in call order; every later evaluation replays them (the indices
from the record, the values gathered from the current input at those indices, so
they stay differentiable) and counts the decisions that would have flipped. It is
entered only around gradcheck's own calls of fn.

``argmax``/``argmin`` along a dim of a floating tensor (Switch Transformers' and
NLLB-MoE's routers) are held the same way. Nothing else: ``max(dim)``/``sort``
values are differentiable functions
whose ties are kinks gradcheck must still report, and an ``argsort`` of random
noise (ViT-MAE's masking) is nondeterminism to report, not a decision to hide.
"""

from __future__ import annotations

from typing import Any

import torch

_TOPK = (torch.topk, torch.Tensor.topk)
#: index-only choices (Switch Transformers' and NLLB-MoE's top-1/top-2 routers)
_ARG = (torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin)


def _topk_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, int]:
    x = args[0] if args else kwargs["input"]
    k = args[1] if len(args) > 1 else kwargs["k"]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    return x, int(k), int(dim)


class RoutingRecord:
    """The recorded decisions of one check and what replaying them found."""

    def __init__(self) -> None:
        #: index tensors of the ``topk`` calls of one evaluation, in call order;
        #: None until the first evaluation has run
        self.indices: list[torch.Tensor] | None = None
        #: decisions (rows of a topk) per evaluation
        self.decisions = 0
        #: most decisions that flipped in one evaluation, and how many
        #: evaluations replayed at all
        self.most_flipped = 0
        self.replays = 0
        #: set when an evaluation's topk calls did not match the record
        #: (another count or shape): that evaluation ran unheld
        self.diverged: str | None = None
        #: where the recorded calls ran, and which ops they were (for the note)
        self.where: list[str] = []
        self.ops: list[str] = []

    @property
    def active(self) -> bool:
        return self.indices is None or bool(self.indices)

    def mode(self) -> RoutingReplay:
        return RoutingReplay(self)

    def note(self) -> str | None:
        if not self.indices or not self.replays:
            return None
        calls = len(self.indices)
        where = list(dict.fromkeys(self.where))
        places = ", ".join(where[:3]) + (
            f" and {len(where) - 3} more" if len(where) > 3 else ""
        )
        text = (
            f"routing: fn picks with {'/'.join(dict.fromkeys(self.ops))} ({calls} call"
            f"{'s' if calls != 1 else ''} in {places}, {self.decisions} decisions per "
            f"evaluation); {self.most_flipped} of {self.decisions} routing decisions "
            "flip within the step; held fixed at the point's choice, as the gradient "
            "does (topk values stay differentiable: gathered at the recorded indices)."
        )
        if self.diverged:
            text += (
                f" Some evaluations could not be held ({self.diverged}): they ran "
                "with their own choices."
            )
        return text


class RoutingReplay(torch.overrides.TorchFunctionMode):
    """Record (first evaluation) or replay (later ones) ``topk`` index outputs."""

    def __init__(self, record: RoutingRecord):
        super().__init__()
        self.record = record
        self.recording = record.indices is None
        self.seen: list[torch.Tensor] = []
        self.dims: list[int | None] = []
        self.flipped = 0
        self.failed: str | None = None

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        rec = self.record
        if exc and exc[0] is not None:
            return
        if self.recording:
            rec.indices = self.seen
            rec.decisions = sum(
                _rows(i, d) for i, d in zip(self.seen, self.dims, strict=True)
            )
            return
        if self.failed is None and len(self.seen) != len(rec.indices or []):
            self.failed = (
                f"{len(self.seen)} topk calls instead of {len(rec.indices or [])}"
            )
        if self.failed is not None:
            rec.diverged = rec.diverged or self.failed
            return
        rec.replays += 1
        rec.most_flipped = max(rec.most_flipped, self.flipped)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ARG:
            return self._arg(func, args, kwargs)
        if func not in _TOPK:
            return func(*args, **kwargs)
        x, _, dim = _topk_args(args, kwargs)
        out = func(*args, **kwargs)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return out
        i = len(self.seen)
        self.seen.append(out.indices.detach().clone())
        self.dims.append(dim)
        if self.recording:
            self.record.where.append(_caller())
            self.record.ops.append("torch.topk")
            return out
        held = self.record.indices or []
        if self.failed is not None:
            return out
        if i >= len(held) or held[i].shape != out.indices.shape:
            self.failed = f"topk call {i + 1} has another shape or count"
            return out
        want = held[i].to(out.indices.device)
        with torch.no_grad():
            mine = out.indices.sort(dim=dim).values
            theirs = want.sort(dim=dim).values
            rows = (mine != theirs).movedim(dim, -1)
            if rows.numel():  # a top-0 (an empty selection) decides nothing
                self.flipped += int(rows.reshape(-1, rows.shape[-1]).any(-1).sum())
        values = torch.gather(x, dim, want)
        return torch.return_types.topk((values, want.clone()))

    def _arg(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """argmax/argmin along a dim of a floating tensor: recorded, then replayed
        (the indices are the whole output: nothing to gather)."""
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        out = func(*args, **kwargs)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or dim is None:
            return out
        i = len(self.seen)
        self.seen.append(out.detach().clone())
        self.dims.append(None)
        if self.recording:
            self.record.where.append(_caller())
            self.record.ops.append(f"torch.{_name(func)}")
            return out
        held = self.record.indices or []
        if self.failed is not None:
            return out
        if i >= len(held) or held[i].shape != out.shape:
            self.failed = f"{_name(func)} call {i + 1} has another shape or count"
            return out
        want = held[i].to(out.device)
        self.flipped += int((want != out).sum())
        return want.clone()


def _name(func: Any) -> str:
    return getattr(func, "__name__", "topk")


def _rows(indices: torch.Tensor, dim: int | None) -> int:
    if not indices.dim():
        return 1
    if dim is None:  # argmax/argmin: every element is one decision
        return indices.numel()
    return indices.numel() // max(indices.shape[dim], 1)


def _caller() -> str:
    """The Python function that called topk (e.g. 'MixtralTopKRouter.forward'),
    read from the stack once per recorded call."""
    import os
    import sys

    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith((torch_dir, os.path.dirname(__file__))):
            return getattr(code, "co_qualname", code.co_name)
        frame = frame.f_back
    return "fn"
