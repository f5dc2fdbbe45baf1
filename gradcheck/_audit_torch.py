"""The audit's planted bugs for PyTorch (imported only when torch is audited)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _Scaled(torch.autograd.Function):
    """Identity whose backward is off by a relative ``rel``: the planted bug."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rel: float) -> torch.Tensor:
        ctx.rel = rel
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * (1 + ctx.rel), None


def scaled_backward(fn: Callable[[], Any], rel: float) -> Callable[[], Any]:
    """``fn`` with a backward ``1 + rel`` times too large."""
    return lambda: _Scaled.apply(fn(), rel)


def _assume_something_to_cut(spec: Any, head: str) -> None:
    """Reject (hypothesis ``assume``) an example whose head branches below no
    layer with weights: detaching its input changes no gradient, so there is no
    bug to catch (the audit's candidate test counts any layer but pool/merge as
    having weights; dropout, add and the 2-D pools have none)."""
    from hypothesis import assume

    from gradcheck.architectures.flow import head_branches_below_weights

    assume(head_branches_below_weights(spec, head))


@contextlib.contextmanager
def cut_head(built: Any, head: str) -> Iterator[None]:
    """Detach the input of ``head``'s first layer with parameters (the classic
    ``features.detach()`` slip), for the duration of the block."""
    _assume_something_to_cut(built.spec, head)
    spec = built.spec.head(head)
    for name in spec.layer_names():
        module = getattr(built.model, name, None)
        if module is not None:
            break
    handle = module.register_forward_pre_hook(  # tensors only: attention also
        lambda _m, args: tuple(  # gets its mask (or None) and the causal flag
            a.detach() if isinstance(a, torch.Tensor) else a for a in args
        )
    )
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- training step
TRAINING_PROPERTY = "training_step"
TRAINING_BUG = "micro-batch losses not scaled by their share of the batch"
#: no known torch bug in this path: nothing to confirm
KNOWN_FRAMEWORK_BUGS: list[tuple[str, Callable[[Any], bool]]] = []


def trainable(spec: Any) -> bool:
    """Specs whose loss over the batch is the share-weighted sum of its losses
    over micro-batches (what this step relies on): not those with a batchnorm in
    training mode, which normalizes each micro-batch by its own statistics."""
    return not any(
        layer.kind == "batchnorm" and layer.training for _, layer, _ in spec.layers()
    )


def _micro(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {
        key: {k: v[lo:hi] for k, v in (part or {}).items()}
        for key, part in batch.items()
    }


def training_check(planted: bool) -> Callable[[Any, dict[str, Any], int], Any]:
    """A user's training step on a spec model: the batch in two micro-batches, each
    micro-batch's total (sum_i w_i L_i + regularization) scaled by its share n_k/N
    and back-propagated, then an SGD step (which the check undoes). With that
    scaling the accumulated .grad is exactly the full batch's gradient whatever
    the split; the planted bug forgets the scaling (a classic: .grad about 2x)."""
    import gradcheck
    from gradcheck.architectures import build_torch

    def check(spec: Any, batch: dict[str, Any], seed: int) -> Any:
        built = build_torch(spec, "float32")
        n = len(next(iter(batch["inputs"].values())))
        parts = [(0, n // 2), (n // 2, n)]
        optimizer = torch.optim.SGD(built.model.parameters(), lr=0.1)

        def step() -> None:
            optimizer.zero_grad()
            for lo, hi in parts:
                share = 1.0 if planted else (hi - lo) / n
                (built.total(_micro(batch, lo, hi)) * share).backward()
            optimizer.step()

        return gradcheck.check_training_step(
            step,
            built.model,
            built.loss_fns(batch),
            built.loss_weights(),
            seed=seed,
        )

    return check


# ---------------------------------------------------------------- devices
def device_loss(built: Any, rel: float | None) -> Callable[[Any, Any], Any]:
    """``loss_fn(model, batch)`` for gradcheck.check_devices: the spec's total for
    the model copy it is handed (on its device). ``rel``: plant a backward off by
    ``rel`` that only happens on a GPU."""
    import copy

    def loss(model: Any, batch: Any) -> Any:
        on = copy.copy(built)
        on.model = model
        on.device = next(model.parameters()).device
        total = on.total(batch)
        if rel is not None and total.device.type == "cuda":
            total = _Scaled.apply(total, rel)
        return total

    return loss
