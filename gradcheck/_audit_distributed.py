"""Audit jobs for the ways a torch model trains besides plain eager execution:
``torch.compile`` and ``autocast:bfloat16`` (:func:`gradcheck.check_variants`)
and DistributedDataParallel in two processes
(:func:`gradcheck.check_distributed`), each on correct generated models and with
a planted bug that only shows in that way of running.

Imported only when torch is audited. The DDP jobs keep one pair of worker
processes for every example of the audit process (spawning a pair costs seconds:
:func:`gradcheck.backends.torch_distributed.keep_workers`); :func:`close` ends
them, and so does the end of the process (a worker leaves when its stdin
closes).
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import gradcheck
from gradcheck.audit import Job, _specs
from gradcheck.result import CheckReport

__all__ = ["PLANTED", "SpecBuild", "SpecStep", "close", "jobs"]

#: relative size of each planted bug. compile runs in float32 (measured
#: rounding ~1e-6 relative on these models): a backward off by 1e-3, the
#: audit's float32 detection limit. bfloat16 keeps 8 bits, and on some
#: generated models its measured rounding reaches most of a tensor's gradient
#: (a tolerance of 0.85 ||g|| was seen: sums that cancel), so no small relative
#: error is catchable on every model; the planted bug is the classic one, a
#: loss scale of 8 not undone (gradients 8x: relative error 7). DDP's bug is the
#: loss divided by the world size (a factor 1/2 with two ranks).
PLANTED = {"compile": 1e-3, "autocast:bfloat16": 7.0}
#: compile jobs draw from a small family of dense models, and a batch of 6:
#: every new graph costs inductor seconds of C++ compilation (a dense/layernorm
#: family of two layers took 130 s wall for 10 examples on the audit machine),
#: while graphs that differ only in weights hit inductor's graph cache. LSTM
#: and attention models also make dynamo fall back to eager for whole frames
#: (recompile limits), where nothing compiled would be checked.
_COMPILE_SPECS = dict(
    layer_kinds=("dense",),
    activations=("tanh",),
    losses=("mse",),
    min_heads=1,
    max_heads=1,
    min_layers=1,
    max_layers=1,
    min_units=3,
    max_units=3,
    max_head_layers=1,
    max_features=3,
    allow_extra_inputs=False,
    allow_residual=False,
    allow_regularizers=False,
)

#: generated models whose loss is a mean over their samples and draws nothing
#: at random: what data parallelism must reproduce exactly (no batchnorm in
#: training mode, no dropout, no regularizers, which SpecModule.forward does not
#: return)
_DDP_SPECS = dict(allow_regularizers=False, allow_dropout=False, max_units=5)


def _mean_over_samples(spec: Any) -> bool:
    return not any(
        layer.kind == "batchnorm" and layer.training for _, layer, _ in spec.layers()
    )


# ---------------------------------------------------------------- the user code
def _planted(total: torch.Tensor, rel: float) -> torch.Tensor:
    """The same value, a gradient ``1 + rel`` times too large."""
    return total * (1 + rel) - total.detach() * rel


@dataclass
class VariantLoss:
    """``loss_fn(model, batch)`` for check_variants on a spec model; ``planted``:
    "compile" / "autocast" plants a backward off by ``rel`` only there."""

    spec: Any
    dtype: str
    planted: str | None = None
    rel: float = 0.0

    def __call__(self, model: Any, batch: Any) -> torch.Tensor:
        from gradcheck.architectures.torch_builder import TorchBuilt

        first = next(model.parameters())
        built = TorchBuilt(self.spec, model, self.dtype, str(first.device))
        built.torch_dtype = first.dtype  # the float64 reference copy
        total = built.total(batch)
        if self.planted == "compile" and torch.compiler.is_compiling():
            total = _planted(total, self.rel)
        if self.planted == "autocast" and torch.is_autocast_enabled(first.device.type):
            total = _planted(total, self.rel)
        return total


@dataclass
class SpecBuild:
    """``build()`` for check_distributed: the spec's model (same weights on every
    call: they come from the spec). A module-level class, so the ranks import
    it."""

    spec: Any
    dtype: str = "float32"

    def __call__(self) -> torch.nn.Module:
        from gradcheck.architectures import build_torch

        return build_torch(self.spec, self.dtype).model


@dataclass
class SpecStep:
    """``step(model, shard)``: the forward through the (DDP-wrapped) model, the
    heads' weighted losses, backward. ``planted``: the loss divided by the world
    size although DDP averages."""

    spec: Any
    dtype: str = "float32"
    planted: bool = False

    def __call__(self, model: Any, shard: Any) -> None:
        from gradcheck.architectures.torch_builder import TorchBuilt

        inner = getattr(model, "module", model)
        built = TorchBuilt(self.spec, inner, self.dtype)
        outputs = model(shard["inputs"])
        sw = shard.get("sample_weights") or {}
        total = sum(
            self.spec.weights[h.name]
            * built.head_loss(
                h, outputs[h.name], shard["targets"][h.name], sw.get(h.name)
            )
            for h in self.spec.heads
        )
        if self.planted:
            total = total / torch.distributed.get_world_size()
        total.backward()


def _tensors(spec: Any, batch: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The NumPy batch as torch tensors (floating ones in ``dtype``; token inputs
    and sparse targets int64)."""
    from gradcheck.architectures import build_torch

    return build_torch(spec, dtype).convert(batch)


# ---------------------------------------------------------------- the checks
def _variants_check(variant: str, planted: bool) -> Callable[..., CheckReport]:
    kind = "compile" if variant == "compile" else "autocast"

    def check(spec: Any, batch: dict[str, Any], seed: int) -> CheckReport:
        from gradcheck.architectures import build_torch

        built = build_torch(spec, "float32")
        loss = VariantLoss(spec, "float32", kind if planted else None, PLANTED[variant])
        with _one_compile_thread():
            report = gradcheck.check_variants(
                loss,
                built.model,
                _tensors(spec, batch, "float32"),
                variants=variant,
                seed=seed,
            )
        _no_zero_gradient(planted, report)
        return report

    return check


@contextlib.contextmanager
def _one_compile_thread() -> Iterator[None]:
    """Inductor compiles in this process, not in a pool of compile workers: for
    the audit's tiny graphs the pool's start costs more than it saves (a first
    compile took 15 s wall with the pool, 5.7 s without, on the loaded 2-core
    audit machine; the checked gradients are the same)."""
    try:
        from torch._inductor import config
    except Exception:  # pragma: no cover - no inductor: compile is skipped
        yield
        return
    with config.patch(compile_threads=1):
        yield


def _no_zero_gradient(planted: bool, report: CheckReport) -> None:
    """Reject (hypothesis ``assume``) a planted example whose gradient is exactly
    zero (every unit dead for this batch): a scaled zero is zero, there is no
    bug to catch."""
    if planted and report.passed and all(t.grad_norm == 0 for t in report.tensors):
        from hypothesis import assume

        assume(False)


_KEPT: list[Any] = []


def _keep() -> None:
    """Enter keep_workers once per process (left by :func:`close` or at exit)."""
    if not _KEPT:
        from gradcheck.backends.torch_distributed import keep_workers

        ctx = keep_workers()
        ctx.__enter__()
        _KEPT.append(ctx)
        atexit.register(close)


def close() -> None:
    """End the DDP jobs' worker processes."""
    while _KEPT:
        with contextlib.suppress(Exception):
            _KEPT.pop().__exit__(None, None, None)


def _ddp_check(planted: bool) -> Callable[..., CheckReport]:
    def check(spec: Any, batch: dict[str, Any], seed: int) -> CheckReport:
        _keep()
        n = len(next(iter(batch["inputs"].values())))
        even = n - n % 2  # two ranks: an equal shard each
        data = _tensors(spec, _first(batch, even), "float32")
        report = gradcheck.check_distributed(
            SpecBuild(spec), SpecStep(spec, planted=planted), data, seed=seed
        )
        _no_zero_gradient(planted, report)
        return report

    return check


def _first(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        key: {k: v[:n] for k, v in (part or {}).items()} for key, part in batch.items()
    }


# ---------------------------------------------------------------- the jobs
def jobs(seed: int, *, compile: bool = True) -> Iterator[Job]:
    """compile and autocast:bfloat16 (check_variants) and DDP (check_distributed,
    2 processes), each on correct models and with a bug planted where only that
    way of running shows it. ``seed`` is the audit's (the jobs draw through
    hypothesis with the seed run_job gets). ``compile=False`` leaves the two
    compile jobs out (inductor compiles every new graph: the slowest jobs)."""
    del seed  # run_job seeds each job's search
    for variant in (
        ("compile", "autocast:bfloat16") if compile else ("autocast:bfloat16",)
    ):
        rel = PLANTED[variant]
        small = _COMPILE_SPECS if variant == "compile" else {"max_units": 5}
        batch = 6 if variant == "compile" else 1  # one shape: fewer compiles
        yield Job(
            "torch",
            f"variants[{variant}]",
            "float32",
            None,
            _variants_check(variant, False),
            _specs(**small),
            min_batch=batch,
        )
        yield Job(
            "torch",
            f"variants[{variant}]",
            "float32",
            f"a backward off by {rel:g} only under {variant}"
            if variant == "compile"
            else f"a loss scale of {rel + 1:g} not undone under {variant}",
            _variants_check(variant, True),
            _specs(**small, min_weight=0.01),
            min_batch=batch,
        )
    yield Job(
        "torch",
        "distributed[ddp]",
        "float32",
        None,
        _ddp_check(False),
        _specs(_mean_over_samples, **_DDP_SPECS),
        min_batch=2,
    )
    yield Job(
        "torch",
        "distributed[ddp]",
        "float32",
        "the loss divided by the world size (DDP already averages)",
        _ddp_check(True),
        _specs(_mean_over_samples, **_DDP_SPECS, min_weight=0.01),
        min_batch=2,
    )
