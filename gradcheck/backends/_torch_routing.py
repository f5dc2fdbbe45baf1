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
NLLB-MoE's routers) are held the same way.

So are the other discrete decisions a forward takes on floating values, which
select rather than compute: a comparison of a floating tensor (``>``, ``==``,
``torch.gt`` ...: a threshold, SuperPoint's non-maximum suppression
``scores == max_pool(scores)``) replays its recorded boolean result, and the
index output of ``max``/``min`` along a dim (LightGlue's mutual-nearest-neighbour
check reads it) replays its recorded indices, the values gathered at them (still
differentiable: at a tie, the index torch's gradient flows to). LightGlue's
keypoint matching took other branches in the float64 reference than in the
evaluation whose gradient is judged (float32 against float64 at the point: 2 of
4096 NMS equalities, 5 of 4096 score thresholds, 32 of 32 nearest neighbours;
its own float64 against the cast-free reference: 32 of 32 neighbours): the
finite differences differentiated another function and the check ended a
mismatch at 99% error. Held, they differentiate the branch torch's gradient is
of, and a note names the decisions that would have flipped (op and calling
function). ``sort``/``argsort`` are not held: an ``argsort`` of random noise
(ViT-MAE's masking) is nondeterminism to report, not a decision to hide.
"""

from __future__ import annotations

from typing import Any

import torch

_TOPK = (torch.topk, torch.Tensor.topk)
#: index-only choices (Switch Transformers' and NLLB-MoE's top-1/top-2 routers)
_ARG = (torch.argmax, torch.Tensor.argmax, torch.argmin, torch.Tensor.argmin)
#: comparisons: their boolean result on a floating tensor is a decision
_CMP = {
    f
    for name in ("gt", "lt", "ge", "le", "eq", "ne")
    for f in (
        getattr(torch, name),
        getattr(torch.Tensor, name),
        getattr(torch.Tensor, f"__{name}__"),
    )
} | {
    torch.greater,
    torch.less,
    torch.greater_equal,
    torch.less_equal,
    torch.not_equal,
}
#: max/min along a dim: (values, indices), the indices a decision
_MAXMIN = (torch.max, torch.Tensor.max, torch.min, torch.Tensor.min)
#: the ops whose calls the "routing" note counts (the others: "decisions")
_ROUTING_OPS = ("torch.topk", "torch.argmax", "torch.argmin")


def _topk_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, int]:
    x = args[0] if args else kwargs["input"]
    k = args[1] if len(args) > 1 else kwargs["k"]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    return x, int(k), int(dim)


def _floating(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class RoutingRecord:
    """The recorded decisions of one check and what replaying them found."""

    def __init__(self) -> None:
        #: the decisions of one evaluation (index tensors of topk/argmax/max(dim),
        #: boolean results of comparisons), in call order; None until the first
        #: evaluation has run
        self.indices: list[torch.Tensor] | None = None
        #: decisions (rows of a topk) per evaluation, routing calls only
        self.decisions = 0
        #: most routing decisions that flipped in one evaluation, and how many
        #: evaluations replayed at all
        self.most_flipped = 0
        self.replays = 0
        #: set when an evaluation's calls did not match the record (another
        #: count or shape): that evaluation ran unheld
        self.diverged: str | None = None
        #: where the recorded calls ran, and which ops they were (for the note)
        self.where: list[str] = []
        self.ops: list[str] = []
        #: per recorded call: its decisions, and the most of them that flipped
        #: in one evaluation
        self.sizes: list[int] = []
        self.flips: dict[int, int] = {}
        #: per recorded call: True where the point sits exactly on the decision
        #: (an ordering comparison with equal sides, a max/min tie): a kink to
        #: report, so that call is never held
        self.ties: list[bool] = []

    @property
    def active(self) -> bool:
        return self.indices is None or bool(self.indices)

    def mode(self) -> RoutingReplay:
        return RoutingReplay(self)

    def note(self) -> str | None:
        if not self.indices or not self.replays:
            return None
        routing = [i for i, op in enumerate(self.ops) if op in _ROUTING_OPS]
        text = self._routing_note(routing) if routing else ""
        flipped = [
            (i, n)
            for i, n in sorted(self.flips.items())
            if n and self.ops[i] not in _ROUTING_OPS
        ]
        if flipped:
            shown = "; ".join(
                f"{n} of {self.sizes[i]} {self.ops[i]} in {self.where[i]}"
                for i, n in flipped[:4]
            ) + (f"; and {len(flipped) - 4} more calls" if len(flipped) > 4 else "")
            text += (" " if text else "") + (
                "decisions: fn selects with comparisons or max/min indices of "
                "floating values, and some differ from those of the evaluation at "
                f"the point whose gradient is judged ({shown}; the most in one "
                "evaluation: a float64 reference of a lower-precision evaluation, "
                "or a step crossing a threshold, moves them); held fixed at the "
                "point's choice, as the gradient does, so the finite differences "
                "differentiate the branch torch's gradient is of."
            )
        if self.diverged:
            text += (
                f" Some evaluations could not be held ({self.diverged}): they ran "
                "with their own choices."
            )
        return text or None

    def _routing_note(self, calls_at: list[int]) -> str:
        calls = len(calls_at)
        where = list(dict.fromkeys(self.where[i] for i in calls_at))
        ops = dict.fromkeys(self.ops[i] for i in calls_at)
        places = ", ".join(where[:3]) + (
            f" and {len(where) - 3} more" if len(where) > 3 else ""
        )
        return (
            f"routing: fn picks with {'/'.join(ops)} ({calls} call"
            f"{'s' if calls != 1 else ''} in {places}, {self.decisions} decisions per "
            f"evaluation); {self.most_flipped} of {self.decisions} routing decisions "
            "flip within the step; held fixed at the point's choice, as the gradient "
            "does (topk values stay differentiable: gathered at the recorded indices)."
        )


class RoutingReplay(torch.overrides.TorchFunctionMode):
    """Record (first evaluation) or replay (later ones) the decisions of fn."""

    def __init__(self, record: RoutingRecord):
        super().__init__()
        self.record = record
        self.recording = record.indices is None
        self.seen: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.routing: list[bool] = []
        self.ties: list[bool] = []
        self.flipped: dict[int, int] = {}
        self.failed: str | None = None

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        rec = self.record
        if exc and exc[0] is not None:
            return
        if self.recording:
            rec.indices = self.seen
            rec.sizes = self.sizes
            rec.ties = self.ties
            rec.decisions = sum(
                n for n, r in zip(self.sizes, self.routing, strict=True) if r
            )
            return
        if self.failed is None and len(self.seen) != len(rec.indices or []):
            self.failed = (
                f"{len(self.seen)} decision calls instead of {len(rec.indices or [])}"
            )
        if self.failed is not None:
            rec.diverged = rec.diverged or self.failed
            return
        rec.replays += 1
        routing = sum(n for i, n in self.flipped.items() if rec.ops[i] in _ROUTING_OPS)
        rec.most_flipped = max(rec.most_flipped, routing)
        for i, n in self.flipped.items():
            rec.flips[i] = max(rec.flips.get(i, 0), n)

    def _held(
        self, out: torch.Tensor, op: str, size: int, tie: Any = False
    ) -> torch.Tensor | None:
        """Record ``out`` (a decision tensor) or return the recorded one (None:
        not held, run with fn's own). ``tie``: a callable telling, at the point
        (recording), whether it sits exactly on this decision: such a call is
        a kink gradcheck reports, and is never held (``|x|`` written as
        ``where(x >= 0, x, -x)`` at 0, a max over equal values)."""
        i = len(self.seen)
        self.seen.append(out.detach().clone())
        self.sizes.append(size)
        self.routing.append(op in _ROUTING_OPS)
        if self.recording:
            self.record.where.append(_caller())
            self.record.ops.append(op)
            self.ties.append(bool(tie()) if callable(tie) else False)
            return None
        held = self.record.indices or []
        if self.failed is not None:
            return None
        if i >= len(held) or held[i].shape != out.shape or self.record.ops[i] != op:
            self.failed = f"{op} call {i + 1} has another shape or count"
            return None
        if i < len(self.record.ties) and self.record.ties[i]:
            return None
        return held[i].to(out.device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ARG:
            return self._arg(func, args, kwargs)
        if func in _CMP:
            return self._compare(func, args, kwargs)
        if func in _MAXMIN:
            return self._maxmin(func, args, kwargs)
        if func not in _TOPK:
            return func(*args, **kwargs)
        x, _, dim = _topk_args(args, kwargs)
        out = func(*args, **kwargs)
        if not _floating(x):
            return out
        rows = _rows(out.indices, dim)
        want = self._held(out.indices, "torch.topk", rows)
        if want is None:
            return out
        with torch.no_grad():
            mine = out.indices.sort(dim=dim).values
            theirs = want.sort(dim=dim).values
            diff = (mine != theirs).movedim(dim, -1)
            if diff.numel():  # a top-0 (an empty selection) decides nothing
                self._flip(int(diff.reshape(-1, diff.shape[-1]).any(-1).sum()))
        values = torch.gather(x, dim, want)
        return torch.return_types.topk((values, want.clone()))

    def _flip(self, n: int) -> None:
        if n:
            i = len(self.seen) - 1
            self.flipped[i] = self.flipped.get(i, 0) + n

    def _arg(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """argmax/argmin along a dim of a floating tensor: recorded, then replayed
        (the indices are the whole output: nothing to gather)."""
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        out = func(*args, **kwargs)
        if not _floating(x) or dim is None:
            return out
        want = self._held(out, f"torch.{_name(func)}", out.numel())
        if want is None:
            return out
        self._flip(int((want != out).sum()))
        return want.clone()

    def _compare(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A comparison with a floating operand: its boolean result, recorded,
        then replayed."""
        out = func(*args, **kwargs)
        if not (
            isinstance(out, torch.Tensor)
            and out.dtype == torch.bool
            and any(_floating(a) for a in args[:2])
        ):
            return out
        name = _name(func).strip("_")

        def tie() -> bool:  # an ordering comparison with equal sides at the point
            if name in ("eq", "ne", "not_equal"):
                return False  # equality is the decision itself (NMS's maxima)
            a = args[0]
            b = args[1] if len(args) > 1 else kwargs.get("other")
            try:
                with torch.no_grad():
                    return bool(torch.eq(a, b).any())
            except (TypeError, RuntimeError):  # operands torch.eq does not take
                return False

        want = self._held(out, f"Tensor.{name}", out.numel(), tie)
        if want is None:
            return out
        self._flip(int((want != out).sum()))
        return want.clone()

    def _maxmin(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """max/min along a dim of a floating tensor: the indices recorded, then
        replayed with the values gathered at them."""
        out = func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not (_floating(x) and isinstance(dim, int) and isinstance(out, tuple)):
            return out
        values, indices = out
        keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))

        def tie() -> bool:  # the extreme value twice along dim at the point
            with torch.no_grad():
                v = values if keep else values.unsqueeze(dim)
                return bool(((x == v).sum(dim) > 1).any())

        want = self._held(indices, f"torch.{_name(func)}(dim)", indices.numel(), tie)
        if want is None:
            return out
        flipped = int((want != indices).sum())
        if not flipped:  # fn's own output (its backward saves no input values)
            return out
        self._flip(flipped)
        at = want if keep else want.unsqueeze(dim)
        # gathered from a copy: gather's backward keeps its input, which fn may
        # change in place later (Grounding DINO masks its class scores so)
        got = torch.gather(x.clone(), dim, at)
        got = got if keep else got.squeeze(dim)
        return type(out)((got, want.clone()))


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
